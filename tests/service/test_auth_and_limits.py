import json

import numpy as np
import pytest

from service.auth import check_api_key
from service.errors import UnauthorizedError

BODY = {
    "inputs": [
        {"name": "input", "shape": [1, 36], "datatype": "FP32", "data": [1.0] * 36},
    ]
}


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("Bearer s3cret-but-longer", False),
        ("Bearer s3cre", False),
        ("Basic s3cret", False),
        ("s3cret", False),
        ("", False),
        (None, False),
    ],
)
def test_check_api_key(header, ok):
    if ok:
        check_api_key(b"s3cret", header)
    else:
        with pytest.raises(UnauthorizedError):
            check_api_key(b"s3cret", header)


def test_no_key_configured_lets_everything_through():
    check_api_key(None, None)


def test_key_guards_inference_and_repository_but_not_health_or_metrics(make_client):
    client = make_client(api_key="s3cret")
    for method, path in [
        ("post", "/v2/models/tiny/infer"),
        ("post", "/v1/models/tiny:predict"),
        ("get", "/v2/models/tiny"),
        ("get", "/v1/models"),
        ("post", "/v2/repository/index"),
        ("post", "/v2/repository/models/tiny/unload"),
    ]:
        response = getattr(client, method)(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["error"]
    wrong = client.post("/v2/models/tiny/infer", json=BODY, headers={"Authorization": "Bearer x"})
    assert wrong.json() == {"error": "invalid API key"}
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/v2", "/docs"):
        assert client.get(path).status_code == 200, path
    good = client.post(
        "/v2/models/tiny/infer", json=BODY, headers={"Authorization": "Bearer s3cret"}
    )
    assert good.status_code == 200


def test_body_over_the_limit_is_413_from_content_length(make_client):
    client = make_client(max_body_bytes=2048)
    response = client.post("/v2/models/tiny/infer", content=b"x" * 4096)
    assert response.status_code == 413
    assert response.json() == {
        "error": "request body of 4096 bytes exceeds the limit of 2048 bytes (BNN_MAX_BODY_BYTES)"
    }


def test_chunked_body_over_the_limit_is_413_without_reading_it_all(make_client):
    client = make_client(max_body_bytes=2048)
    sent = []

    def chunks():
        for _ in range(100):
            sent.append(1024)
            yield b"x" * 1024

    response = client.post("/v2/models/tiny/infer", content=chunks())
    assert response.status_code == 413
    assert "exceeds the limit of 2048 bytes" in response.json()["error"]


def test_body_under_the_limit_passes(make_client):
    client = make_client(max_body_bytes=4096)
    assert client.post("/v2/models/tiny/infer", content=json.dumps(BODY)).status_code == 200


def test_batch_per_request_limit_is_400(make_client):
    client = make_client(max_request_batch=4)
    x = np.zeros((5, 36)).tolist()
    response = client.post("/v1/models/tiny:predict", json={"instances": x})
    assert response.status_code == 400
    assert response.json() == {
        "error": "input 'input': batch of 5 instances exceeds the limit of 4 "
        "(BNN_MAX_REQUEST_BATCH)"
    }
    assert client.post("/v1/models/tiny:predict", json={"instances": x[:4]}).status_code == 200
