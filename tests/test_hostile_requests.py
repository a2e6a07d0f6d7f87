"""A battery of hostile requests against a real uvicorn server (issue 10, acceptance: the request
half). Each gets a 4xx with a JSON ``{"error": ...}`` body, and afterwards the server is alive
and answers a good request correctly. The model is the numpy reference (it loads at once); the
HTTP stack, codec and data plane are the real ones."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from tests.service.conftest import make_settings
from tests.service.live import uvicorn_in_thread
from tests.service.numpy_model import LinearModel, expected_logits, publish_tiny
from tests.service.test_app import SPEC, images, v2_input

pytestmark = pytest.mark.slow
GOOD = images(2)
INFER = "/v2/models/tiny/infer"


def binary(header: dict, blob: bytes = b"", length: str | None = None) -> tuple[bytes, dict]:
    raw = json.dumps(header).encode()
    return raw + blob, {"Inference-Header-Content-Length": (length or str(len(raw))).encode()}


def tensor(shape, datatype="FP32", **extra) -> dict:
    return {"name": "input", "shape": shape, "datatype": datatype, **extra}


def bytes_flood(count: int) -> tuple[bytes, dict]:
    blob = bytes(4 * count)
    return binary(
        {"inputs": [tensor([count], "BYTES", parameters={"binary_data_size": len(blob)})]}, blob
    )


# (id, method, path, body: dict | (bytes, headers) | bytes, expected status)
CASES = [
    ("header length non-ASCII digit", "POST", INFER, binary({"inputs": [v2_input(GOOD)]}, length="²"), 400),
    ("header length 5000 digits", "POST", INFER, binary({"inputs": [v2_input(GOOD)]}, length="9" * 5000), 400),
    ("header length negative", "POST", INFER, binary({"inputs": [v2_input(GOOD)]}, length="-1"), 400),
    ("header length past the body", "POST", INFER, binary({"inputs": [v2_input(GOOD)]}, length="999999"), 400),
    ("shape [0, 10**30] JSON", "POST", INFER, {"inputs": [tensor([0, 10**30], data=[])]}, 400),
    ("shape [0, 10**30] binary", "POST", INFER,
     binary({"inputs": [tensor([0, 10**30], parameters={"binary_data_size": 0})]}), 400),
    ("shape of 100 dimensions", "POST", INFER, {"inputs": [tensor([1] * 100, data=[0])]}, 400),
    ("shape extent 2**40 with a zero", "POST", INFER, {"inputs": [tensor([0, 2**20, 2**20], data=[])]}, 400),
    ("shape negative", "POST", INFER, {"inputs": [tensor([-1, 36], data=[])]}, 400),
    ("shape of floats", "POST", INFER, {"inputs": [tensor([1.0, 36.0], data=[0] * 36)]}, 400),
    ("shape of strings", "POST", INFER, {"inputs": [tensor(["1", "36"], data=[0] * 36)]}, 400),
    ("shape not a list", "POST", INFER, {"inputs": [tensor(36, data=[0] * 36)]}, 400),
    ("binary_data_output a string", "POST", INFER,
     {"inputs": [v2_input(GOOD)], "parameters": {"binary_data_output": "false"}}, 400),
    ("binary_data a number", "POST", INFER,
     {"inputs": [v2_input(GOOD)], "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}, 400),
    ("binary_data_size a string", "POST", INFER,
     binary({"inputs": [tensor([1, 36], parameters={"binary_data_size": "144"})]}, bytes(144)), 400),
    ("binary_data_size negative", "POST", INFER,
     binary({"inputs": [tensor([1, 36], parameters={"binary_data_size": -4})]}), 400),
    ("binary_data_size past the body", "POST", INFER,
     binary({"inputs": [tensor([1, 36], parameters={"binary_data_size": 10**12})]}, bytes(144)), 400),
    ("parameter value an object", "POST", INFER, {"inputs": [v2_input(GOOD)], "parameters": {"x": {}}}, 400),
    ("id a number", "POST", INFER, {"id": 7, "inputs": [v2_input(GOOD)]}, 400),
    ("4M empty BYTES elements (16 MB)", "POST", INFER, bytes_flood(4_000_000), 400),
    ("BYTES JSON with a lone surrogate", "POST", INFER,
     b'{"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}', 400),
    ("wrong shape with data that is not numbers", "POST", INFER,
     {"inputs": [tensor([4 * 1024 * 1024], data=[["x"]])]}, 400),
    ("batch over the limit", "POST", INFER, {"inputs": [tensor([2000, 36], data=[0] * 72000)]}, 400),
    ("flat data of the wrong length", "POST", INFER, {"inputs": [tensor([2, 36], data=[0] * 71)]}, 400),
    ("ragged data", "POST", INFER, {"inputs": [tensor([2, 36], data=[[0] * 36, [0] * 35])]}, 400),
    ("integers out of range", "POST", INFER, {"inputs": [tensor([1, 36], "UINT8", data=[256] * 36)]}, 400),
    ("huge integers", "POST", INFER, {"inputs": [tensor([1, 36], "INT64", data=[10**30] * 36)]}, 400),
    ("NaN literal", "POST", INFER,
     b'{"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}', 400),
    ("deeply nested data", "POST", INFER,
     b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 5000
     + b"]" * 5000 + b"}]}", 400),
    ("unknown datatype", "POST", INFER, {"inputs": [tensor([1, 36], "BF17", data=[0] * 36)]}, 400),
    ("two inputs", "POST", INFER, {"inputs": [v2_input(GOOD), v2_input(GOOD)]}, 400),
    ("unknown output", "POST", INFER, {"inputs": [v2_input(GOOD)], "outputs": [{"name": "z"}]}, 400),
    ("body not JSON", "POST", INFER, b"\xff\xfe{", 400),
    ("body JSON but not an object", "POST", INFER, b"[1, 2, 3]", 400),
    ("binary bytes no input claims", "POST", INFER, binary({"inputs": [v2_input(GOOD)]}, b"\0" * 8), 400),
    ("predict instances a string", "POST", "/v1/models/tiny:predict", {"instances": "[[1]]"}, 400),
    ("predict batch over the limit", "POST", "/v1/models/tiny:predict", {"instances": [[0] * 36] * 2000}, 400),
    ("predict deep nesting", "POST", "/v1/models/tiny:predict",
     b'{"instances": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400),
    ("repository index ready 0", "POST", "/v2/repository/index", {"ready": 0}, 400),
    ("repository index ready 'true'", "POST", "/v2/repository/index", {"ready": "true"}, 400),
    ("unknown model", "POST", "/v2/models/nope/infer", {"inputs": [v2_input(GOOD)]}, 404),
    ("version not a number", "POST", "/v2/models/tiny/versions/x1/infer", {"inputs": [v2_input(GOOD)]}, 404),
    ("version 10**30", "POST", f"/v2/models/tiny/versions/{10**30}/infer", {"inputs": [v2_input(GOOD)]}, 404),
    ("model name with a NUL", "GET", "/v2/models/a%00b", None, 400),
    ("ready of a version 10**30", "GET", f"/v2/models/tiny/versions/{10**30}/ready", None, 404),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    repo: Path = tmp_path_factory.mktemp("hostile") / "repo"
    publish_tiny(repo, "tiny", seed=0)
    settings = make_settings(repo, max_request_batch=1024, body_timeout_s=10)
    with uvicorn_in_thread(create_app(settings, loader=LinearModel)) as url:
        for _ in range(500):
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                break
        yield url


def send(url: str, method: str, path: str, body) -> httpx.Response:
    if body is None:
        return httpx.request(method, url + path, timeout=60)
    if isinstance(body, dict):
        return httpx.request(method, url + path, json=body, timeout=60)
    content, headers = body if isinstance(body, tuple) else (body, {})
    return httpx.request(method, url + path, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_request_gets_a_named_4xx_and_the_server_still_answers(
    server, method, path, body, status
):
    response = send(server, method, path, body)
    assert response.status_code == status, response.text[:500]
    assert list(response.json()) == ["error"] and response.json()["error"]
    good = httpx.post(f"{server}{INFER}", json={"inputs": [v2_input(GOOD)]}, timeout=60)
    assert good.status_code == 200
    logits = {o["name"]: o for o in good.json()["outputs"]}["logits"]["data"]
    np.testing.assert_allclose(np.reshape(logits, (2, -1)), expected_logits(SPEC, GOOD), rtol=1e-5)


def test_battery_has_at_least_40_request_cases():
    assert len(CASES) >= 40


def test_a_request_with_a_stalled_body_is_dropped(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{"
        )
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 408 ")
