"""The app through TestClient (lifespan run) with a numpy linear model behind the engine API."""

import json

import numpy as np
import pytest

from tests.model.factory import tiny_spec
from tests.service.numpy_model import expected_logits

SPEC = tiny_spec()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 1, 6, 6)).astype(np.float32)


def v2_input(x: np.ndarray, datatype: str = "FP32", flat: bool = False, shape=None) -> dict:
    data = x.ravel().tolist() if flat else x.tolist()
    return {"name": "input", "shape": list(shape or x.shape), "datatype": datatype, "data": data}


def outputs_by_name(body: dict) -> dict:
    return {out["name"]: out for out in body["outputs"]}


def test_server_metadata_and_health(client):
    assert client.get("/v2").json() == {
        "name": "bnnserve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "model_repository"],
    }
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_ready_and_config(client):
    meta = client.get("/v2/models/tiny").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 6, 6]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, 3]),
        ("probabilities", "FP32", [-1, 3]),
        ("predicted_class", "INT64", [-1]),
        ("label", "BYTES", [-1]),
    ]
    assert meta["versions"] == ["1"]
    assert client.get("/v2/models/tiny/versions/1").json()["parameters"]["version"] == "1"
    assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
    assert client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    config = client.get("/v2/models/tiny/config").json()
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 6, 6]}]


@pytest.mark.parametrize("n", [1, 5, 64])
@pytest.mark.parametrize("flat", [False, True])
def test_v2_json_inference_matches_the_model(client, n, flat):
    x = images(n, seed=n)
    response = client.post(
        "/v2/models/tiny/infer", json={"id": f"r{n}", "inputs": [v2_input(x, flat=flat)]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("tiny", "1", f"r{n}")
    out = outputs_by_name(body)
    want = expected_logits(SPEC, x)
    np.testing.assert_allclose(np.reshape(out["logits"]["data"], (n, 3)), want, rtol=1e-6)
    assert out["predicted_class"]["data"] == want.argmax(1).tolist()
    assert out["label"]["data"] == [SPEC.labels[i] for i in want.argmax(1)]
    probabilities = np.reshape(out["probabilities"]["data"], (n, 3))
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)


@pytest.mark.parametrize("datatype", ["UINT8", "INT32", "INT64", "FP16", "FP64"])
def test_v2_accepts_every_numeric_datatype(client, datatype):
    x = images(3)
    response = client.post("/v2/models/tiny/infer", json={"inputs": [v2_input(x, datatype)]})
    assert response.status_code == 200, response.text
    logits = np.reshape(outputs_by_name(response.json())["logits"]["data"], (3, 3))
    np.testing.assert_allclose(logits, expected_logits(SPEC, x), rtol=1e-6)


def test_flattened_instances_are_accepted(client):
    x = images(2)
    response = client.post(
        "/v2/models/tiny/infer", json={"inputs": [v2_input(x, shape=[2, 36], flat=True)]}
    )
    assert response.status_code == 200, response.text


def test_requested_outputs_only_and_in_order(client):
    x = images(2)
    response = client.post(
        "/v2/models/tiny/infer",
        json={
            "inputs": [v2_input(x)],
            "outputs": [{"name": "predicted_class"}, {"name": "logits"}],
        },
    )
    assert [o["name"] for o in response.json()["outputs"]] == ["predicted_class", "logits"]
    assert response.json()["outputs"][0]["datatype"] == "INT64"


def test_v2_binary_request_and_response(client):
    x = images(4, seed=3)
    header = {
        "inputs": [
            {"name": "input", "shape": [4, 1, 6, 6], "datatype": "FP32",
             "parameters": {"binary_data_size": x.nbytes}}
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                    {"name": "label"}],
    }  # fmt: skip
    raw = json.dumps(header).encode()
    # No Content-Type header at all, as some V2 clients send.
    response = client.post(
        "/v2/models/tiny/infer",
        content=raw + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(raw))},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    logits_meta, label_meta = meta["outputs"]
    assert logits_meta["parameters"]["binary_data_size"] == 4 * 3 * 4
    logits = np.frombuffer(response.content[length:], "<f4").reshape(4, 3)
    np.testing.assert_allclose(logits, expected_logits(SPEC, x), rtol=1e-6)
    assert label_meta["data"] == [SPEC.labels[i] for i in expected_logits(SPEC, x).argmax(1)]


def test_binary_data_output_for_all_outputs(client):
    x = images(1)
    body = {"inputs": [v2_input(x)], "parameters": {"binary_data_output": True}}
    response = client.post("/v2/models/tiny/infer", json=body)
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    assert sizes[:3] == [12, 12, 8]
    assert length + sum(sizes) == len(response.content)


def test_request_without_content_type_is_parsed_as_json(client):
    body = json.dumps({"inputs": [v2_input(images(1))]}).encode()
    response = client.post("/v2/models/tiny/infer", content=body)
    assert response.status_code == 200, response.text


def test_simple_rest_predict(client):
    x = images(3, seed=9)
    response = client.post("/v1/models/tiny:predict", json={"instances": x.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    want = expected_logits(SPEC, x)
    assert body["model_version"] == "1"
    for prediction, row in zip(body["predictions"], want, strict=True):
        assert prediction["class_index"] == int(row.argmax())
        assert prediction["label"] == SPEC.labels[row.argmax()]
        assert list(prediction["probabilities"]) == list(SPEC.labels)
        assert prediction["probabilities"][prediction["label"]] == max(
            prediction["probabilities"].values()
        )
    flat = client.post(
        "/v1/models/tiny/versions/1:predict", json={"instances": x.reshape(3, -1).tolist()}
    )
    assert flat.json()["predictions"] == body["predictions"]


def test_v1_models_lists_versions_and_state(client):
    assert client.get("/v1/models").json() == {
        "models": [
            {
                "name": "tiny",
                "versions": [{"version": "1", "state": "READY", "reason": ""}],
                "serving_version": "1",
            }
        ]
    }


# --- errors: every body is {"error": ...} with the table's status -------------------------------
@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v2/models/nope/infer", {"inputs": [v2_input(images(1))]}, 404, "model 'nope' not found"),
        ("/v2/models/tiny/versions/7/infer", {"inputs": [v2_input(images(1))]}, 404, "no version 7"),
        ("/v2/models/tiny/versions/x/infer", {"inputs": [v2_input(images(1))]}, 404, "invalid version"),
        ("/v2/models/tiny/infer", {"inputs": [{**v2_input(images(1)), "name": "x"}]}, 400,
         "unknown input 'x'; this model's input is 'input'"),
        ("/v2/models/tiny/infer", {"inputs": [v2_input(np.zeros((3, 65), np.float32))]}, 400,
         "input 'input': expected shape [-1, 1, 6, 6] (or [-1, 36]), got [3, 65]"),
        # the declared datatype is refused before the data is looked at
        ("/v2/models/tiny/infer", {"inputs": [v2_input(images(1), "BYTES", shape=[1])]}, 400,
         "numeric type: FP32, FP16, FP64, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, "
         "UINT64), got BYTES"),
        ("/v2/models/tiny/infer", {"inputs": [v2_input(images(1), "BOOL")]}, 400, "got BOOL"),
        ("/v2/models/tiny/infer", {"inputs": [v2_input(images(1))], "outputs": [{"name": "z"}]},
         400, "unknown output 'z'"),
        ("/v1/models/tiny:predict", {"instances": [[1, 2]]}, 400, "expected shape [-1, 1, 6, 6]"),
        ("/v1/models/tiny:predict", {"instances": []}, 400, "instances"),
        ("/v1/models/tiny:predict", {"wrong": 1}, 400, "instances: Field required"),
    ],
)  # fmt: skip
def test_error_statuses(client, path, body, status, fragment):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    assert fragment in response.json()["error"]


def test_nan_and_infinity_are_rejected_with_the_instance_named(client):
    x = images(3)
    body = json.dumps({"inputs": [v2_input(x)]}).replace("16.0", "NaN", 1)
    response = client.post("/v2/models/tiny/infer", content=body)
    assert response.status_code == 400
    assert "contains NaN or infinity" in response.json()["error"]
    x[2, 0, 0, 0] = np.inf
    response = client.post("/v2/models/tiny/infer", content=json.dumps({"inputs": [v2_input(x)]}))
    assert response.json() == {"error": "input 'input': instance 2 contains NaN or infinity"}
    raw = json.dumps(
        {"inputs": [{"name": "input", "shape": [3, 1, 6, 6], "datatype": "FP32",
                     "parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()  # fmt: skip
    response = client.post(
        "/v2/models/tiny/infer",
        content=raw + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(raw))},
    )
    assert response.json() == {"error": "input 'input': instance 2 contains NaN or infinity"}


def test_invalid_model_name_is_400_not_a_path(client):
    response = client.post("/v2/models/..%2Fetc/infer", json={"inputs": [v2_input(images(1))]})
    assert response.status_code == 404  # the decoded '/' never matches a model name
    response = client.get("/v2/models/.hidden")
    assert response.status_code == 400
    assert "invalid model name" in response.json()["error"]


def test_unknown_route_and_method_use_the_error_body(client):
    assert client.get("/v3/whatever").json() == {"error": "Not Found"}
    response = client.get("/v2/models/tiny/infer")
    assert response.status_code == 405
    assert list(response.json()) == ["error"]


def test_request_id_is_echoed_or_generated(client):
    response = client.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = client.get("/v2/health/live").headers["x-request-id"]
    assert len(generated) == 32
    hostile = client.get("/v2/health/live", headers={"X-Request-ID": "a b\tc" * 50})
    assert hostile.headers["x-request-id"] != "a b\tc" * 50


def test_metrics_count_requests_by_model_version_and_status(client):
    client.post("/v2/models/tiny/infer", json={"inputs": [v2_input(images(2))]})
    client.post("/v2/models/tiny/infer", json={"inputs": [v2_input(np.zeros((1, 5)))]})
    client.post("/v1/models/tiny:predict", json={"instances": images(1).tolist()})
    text = client.get("/metrics").text
    assert (
        'bnn_inference_requests_total{model="tiny",protocol="v2",status="200",version="1"} 1.0'
        in text
    )
    assert (
        'bnn_inference_requests_total{model="tiny",protocol="v2",status="400",version="1"} 1.0'
        in text
    )
    assert (
        'bnn_inference_requests_total{model="tiny",protocol="v1",status="200",version="1"} 1.0'
        in text
    )
    assert "bnn_models_loaded 1.0" in text
    assert 'bnn_model_ready{model="tiny",version="1"} 1.0' in text
    assert 'bnn_batch_size_rows_count{model="tiny",version="1"}' in text
    assert 'bnn_batch_queue_seconds_count{model="tiny",version="1"}' in text
    assert 'route="/v2/models/{name}/infer"' in text
    assert 'route="/v1/models/{name}:predict"' in text


def test_openapi_documents_bodies_and_error_responses(client):
    schema = client.get("/openapi.json").json()
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
    assert set(infer["responses"]) >= {"200", "400", "401", "404", "413", "503", "504"}
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceRequest"
    }
    assert "RequestInput" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_draining_turns_readiness_off_but_still_serves_accepted_requests(client):
    client.app.state.dataplane.draining = True
    response = client.get("/v2/health/ready")
    assert response.status_code == 400  # the protocol's "false" is a 4xx
    assert response.json() == {"error": "the server is shutting down"}
    assert (
        client.post("/v2/models/tiny/infer", json={"inputs": [v2_input(images(1))]}).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("method", "path", "broken"),
    [
        ("post", "/v2/models/tiny/infer", "infer"),  # served by the inference dispatch
        ("get", "/v1/models", "list_models"),  # served by FastAPI's router
    ],
)
def test_a_bug_is_one_logged_500_naming_the_request_id(
    client, monkeypatch, caplog, method, path, broken
):
    def bug(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client.app.state.dataplane, broken, bug)
    body = {"json": {"inputs": [v2_input(images(1))]}} if method == "post" else {}
    with caplog.at_level("ERROR", logger="service"):
        response = getattr(client, method)(path, headers={"X-Request-ID": "bug-1"}, **body)
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error (request id bug-1)"}
    assert response.headers["x-request-id"] == "bug-1"
    tracebacks = [
        r for r in caplog.records if r.exc_info and "secret internals" in str(r.exc_info[1])
    ]
    assert len(tracebacks) == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/tiny/infer", {"inputs": [v2_input(images(2))]}),
        ("/v2/models/tiny/versions/1/infer", {"inputs": [v2_input(images(2))]}),
        ("/v1/models/tiny:predict", {"instances": images(2).tolist()}),
        ("/v1/models/tiny/versions/1:predict", {"instances": images(2).tolist()}),
    ],
)
def test_middleware_added_the_ordinary_way_sees_inference_requests(repo, path, body):
    """A user's own middleware and Starlette's CORS middleware, added with ``add_middleware``,
    apply to the inference endpoints like to any other route, and see the route matched."""
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.conftest import make_settings, wait_ready
    from tests.service.numpy_model import LinearModel

    seen: list[tuple[str, str, int]] = []

    class RecordingMiddleware:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            async def record(message):
                if message["type"] == "http.response.start":
                    route = getattr(scope.get("route"), "path", None)
                    seen.append((scope["path"], route, message["status"]))
                await send(message)

            await self.app(scope, receive, record if scope["type"] == "http" else send)

    app = create_app(make_settings(repo), loader=LinearModel)
    app.add_middleware(RecordingMiddleware)
    app.add_middleware(CORSMiddleware, allow_origins=["https://playground.example"])
    with TestClient(app) as client:
        wait_ready(client)
        seen.clear()
        response = client.post(path, json=body, headers={"Origin": "https://playground.example"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://playground.example"
        assert response.headers["x-request-id"]  # the service's own layers still wrap it
        bad = client.post(path, json={"inputs": []} if "/v2/" in path else {"instances": []})
        assert bad.status_code == 400
    route = path.replace("tiny", "{name}").replace("/1", "/{version}")
    assert seen == [(path, route, 200), (path, route, 400)]


def test_inference_routes_are_documented_from_their_definitions(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v1/models/{name}:predict",
        "/v1/models/{name}/versions/{version}:predict",
    ):
        operation = paths[path]["post"]
        assert "application/json" in operation["requestBody"]["content"], path
        assert {"400", "404", "503"} <= set(operation["responses"]), path


def test_a_client_that_leaves_mid_body_gets_no_answer_and_is_counted_499(client, caplog):
    """The body never arrives whole: nothing is sent, nothing is logged as an error, and the
    request is counted with nginx's 499 (client closed request)."""
    app = client.app
    messages = iter(
        [
            {"type": "http.request", "body": b'{"inputs": [', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict] = []

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    async def call() -> None:
        scope = {"type": "http", "method": "POST", "path": "/v2/models/tiny/infer",
                 "raw_path": b"/v2/models/tiny/infer", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}  # fmt: skip
        await app(scope, receive, send)

    with caplog.at_level("INFO", logger="service"):
        client.portal.call(call)
    assert sent == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    text = client.get("/metrics").text
    assert (
        'bnn_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="499"} 1.0'
        in text
    )


def test_playground_is_served_at_the_root_from_package_files(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<canvas id="pad"' in page.text
    script = client.get("/static/playground.js")
    assert script.status_code == 200
    assert "v2/repository/index" in script.text
    assert "http://" not in script.text and "https://" not in page.text  # no CDN
    assert client.get("/static/missing.js").json() == {"error": "Not Found"}
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_inference_reports_its_server_time(client):
    response = client.post("/v2/models/tiny/infer", json={"inputs": [v2_input(images(1))]})
    name, _, duration = response.headers["server-timing"].partition(";dur=")
    assert name == "infer" and float(duration) > 0


def test_metadata_says_whether_inputs_are_integer_valued(client):
    parameters = client.get("/v2/models/tiny").json()["parameters"]
    assert parameters["integer_valued"] is True
    assert parameters["value_range"] == [0.0, 16.0]
