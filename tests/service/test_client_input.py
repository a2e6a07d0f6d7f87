"""Client input never earns a 5xx: each class of hostile request gets a 4xx naming what was wrong
(issue 10 §5), and the shape, datatype and batch limit are checked before tensor data is decoded
(§6). Through TestClient, so the app's whole stack runs; tests/test_schemathesis.py fuzzes a
real server."""

import json
import multiprocessing
import os
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from model.errors import InvalidInputError
from service.protocol import codec
from service.tensors import InputExpectation
from tests.service.numpy_model import expected_logits
from tests.service.test_app import SPEC, images, v2_input

EXPECTED = InputExpectation("input", (1, 6, 6), "FP32", max_rows=8)


def binary_request(header: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(header).encode()
    return raw + blob, {"Inference-Header-Content-Length": str(len(raw))}


def empty_bytes_elements(count: int) -> bytes:
    """``count`` BYTES elements of length 0: a 4-byte zero length each."""
    return bytes(4 * count)


# --- §5: every class a 400 with a named reason -----------------------------------------------------
@pytest.mark.parametrize(
    ("header_length", "fragment"),
    [
        ("²".encode(), "Inference-Header-Content-Length must be an integer"),  # a non-ASCII digit
        (b"9" * 5000, "Inference-Header-Content-Length must be an integer"),
        (b"-3", "Inference-Header-Content-Length must be an integer"),
    ],
)
def test_bad_header_length_is_400(client, header_length, fragment):
    body = json.dumps({"inputs": [v2_input(images(1))]}).encode()
    response = client.post(
        "/v2/models/tiny/infer",
        content=body,
        headers=[(b"Inference-Header-Content-Length", header_length)],
    )
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ([0, 10**30], "inputs.0.shape.1: Input should be less than or equal to 4294967296"),
        ([2**20, 2**20, 0], "has more than 4294967296 elements"),
        ([1] * 100, "inputs.0.shape: List should have at most 8 items"),
        ([1.0, 36], "inputs.0.shape.0: Input should be a valid integer"),
        (["1", 36], "inputs.0.shape.0: Input should be a valid integer"),
        ([True, 36], "inputs.0.shape.0: Input should be a valid integer"),
    ],
)
@pytest.mark.parametrize("binary", [False, True])
def test_unrepresentable_shapes_are_400(client, shape, fragment, binary):
    tensor = {"name": "input", "shape": shape, "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": 0}
        body, headers = binary_request({"inputs": [tensor]}, b"")
    else:
        body, headers = json.dumps({"inputs": [tensor | {"data": []}]}).encode(), {}
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    ("parameters", "outputs", "fragment"),
    [
        ({"binary_data_output": "false"}, None, "parameters.binary_data_output: Input should be"),
        ({"binary_data_output": 0}, None, "parameters.binary_data_output: Input should be"),
        ({}, [{"name": "label", "parameters": {"binary_data": "true"}}],
         "outputs.0.parameters.binary_data: Input should be a valid boolean"),
        ({"other": {"nested": 1}}, None, "parameters.other"),
        ({"other": None}, None, "parameters.other"),
    ],
)  # fmt: skip
def test_protocol_parameters_are_strictly_typed(client, parameters, outputs, fragment):
    body = {"inputs": [v2_input(images(1))], "parameters": parameters}
    if outputs is not None:
        body["outputs"] = outputs
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def test_binary_data_size_must_be_an_integer(client):
    x = images(1)
    tensor = v2_input(x) | {"parameters": {"binary_data_size": str(x.nbytes)}}
    del tensor["data"]
    body, headers = binary_request({"inputs": [tensor]}, x.tobytes())
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert (
        "inputs.0.parameters.binary_data_size: Input should be a valid integer"
        in (response.json()["error"])
    )


def test_an_empty_outputs_list_returns_every_output(client):
    x = images(2)
    body = client.post("/v2/models/tiny/infer", json={"inputs": [v2_input(x)], "outputs": []})
    assert body.status_code == 200, body.text
    outputs = {out["name"]: out for out in body.json()["outputs"]}
    assert list(outputs) == ["logits", "probabilities", "predicted_class", "label"]
    np.testing.assert_allclose(
        np.reshape(outputs["logits"]["data"], (2, -1)), expected_logits(SPEC, x), rtol=1e-5
    )


@pytest.mark.parametrize("body", [{"ready": 0}, {"ready": "true"}, {"ready": None}, []])
def test_repository_index_fields_are_strictly_typed(client, body):
    response = client.post("/v2/repository/index", json=body)
    assert response.status_code == 400, response.text
    assert list(response.json()) == ["error"]


def test_repository_index_takes_a_real_boolean(client):
    rows = client.post("/v2/repository/index", json={"ready": True}).json()
    assert [(row["name"], row["state"]) for row in rows] == [("tiny", "READY")]


# --- health answers "false" with a 4xx, as the Open Inference Protocol says -----------------------
def test_model_readiness_false_is_400_and_never_loads(client):
    assert client.get("/v2/models/tiny/ready").status_code == 200
    assert client.post("/v2/repository/models/tiny/unload").status_code == 200
    response = client.get("/v2/models/tiny/ready")
    assert response.status_code == 400
    assert response.json() == {"error": "model 'tiny' was unloaded"}
    assert client.get("/v2/models/nope/ready").status_code == 404
    assert client.get("/v2/models/tiny/versions/7/ready").status_code == 404
    assert client.get("/v2/health/ready").status_code == 400
    assert client.get("/v2/health/live").status_code == 200


# --- §6: shape, datatype and batch are checked before any data is decoded -------------------------
def test_bytes_flood_is_refused_on_its_datatype_before_the_blob_is_read():
    # 4M empty BYTES elements (16 MB): decoding them is a Python loop of 4M steps; the declared
    # datatype alone refuses the request. A blob that does not even parse proves it is never read.
    count = 4 * 1024 * 1024
    header = {"inputs": [{"name": "input", "shape": [count], "datatype": "BYTES",
                          "parameters": {"binary_data_size": 4 * count}}]}  # fmt: skip
    body, headers = binary_request(header, b"\xff" * (4 * count))
    with pytest.raises(InvalidInputError, match="got BYTES"):
        codec.decode_infer_request(body, headers["Inference-Header-Content-Length"], EXPECTED)
    with pytest.raises(Exception, match="BYTES element runs past the data"):
        codec.decode_infer_request(body, headers["Inference-Header-Content-Length"])


@pytest.mark.parametrize(
    ("shape", "datatype", "fragment"),
    [
        ([4 * 1024 * 1024], "FP32", "expected shape [-1, 1, 6, 6] (or [-1, 36]), got [4194304]"),
        ([9, 36], "FP32", "batch of 9 instances exceeds the limit of 8"),
        ([1, 36], "BOOL", "got BOOL"),
    ],
)
def test_json_data_is_not_converted_when_the_declaration_is_refused(shape, datatype, fragment):
    # The data is not numbers at all; a refusal that names the declaration never looked at it.
    tensor = {"name": "input", "shape": shape, "datatype": datatype, "data": [["x"]]}
    with pytest.raises(InvalidInputError) as info:
        codec.decode_infer_request(json.dumps({"inputs": [tensor]}).encode(), None, EXPECTED)
    assert fragment in str(info.value)


def test_flat_json_data_of_the_wrong_length_is_refused_before_conversion():
    tensor = {"name": "x", "shape": [2, 36], "datatype": "FP32", "data": ["x"] * 71}
    with pytest.raises(Exception, match=r"shape \[2, 36\] needs 72 elements, data has 71"):
        codec.decode_infer_request(json.dumps({"inputs": [tensor]}).encode(), None)


def test_large_bodies_are_decoded_in_the_worker_process(make_client):
    client = make_client(decode_offload_bytes=0)  # every body goes to the worker
    x = images(3)
    response = client.post("/v2/models/tiny/infer", json={"inputs": [v2_input(x)]})
    assert response.status_code == 200, response.text
    logits = {o["name"]: o for o in response.json()["outputs"]}["logits"]["data"]
    np.testing.assert_allclose(np.reshape(logits, (3, -1)), expected_logits(SPEC, x), rtol=1e-5)
    # the worker's named errors come back as themselves
    refused = client.post("/v2/models/tiny/infer", json={"inputs": [v2_input(x, "BYTES")]})
    assert refused.status_code == 400 and "got BYTES" in refused.json()["error"]
    blob = struct.pack("<I", 1)
    body, headers = binary_request({"inputs": [{"name": "input", "shape": [1, 36],
                                                "datatype": "FP32",
                                                "parameters": {"binary_data_size": 4}}]}, blob)  # fmt: skip
    short = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert short.status_code == 400 and "needs 144" in short.json()["error"]
    predict = client.post("/v1/models/tiny:predict", json={"instances": x.tolist()})
    assert predict.status_code == 200 and len(predict.json()["predictions"]) == 3


def test_a_dead_decoding_worker_is_a_503_and_a_new_one_serves_the_next_body(make_client):
    client = make_client(decode_offload_bytes=0)
    body = {"inputs": [v2_input(images(1))]}
    before = {child.pid for child in multiprocessing.active_children()}
    assert client.post("/v2/models/tiny/infer", json=body).status_code == 200
    (worker,) = [c for c in multiprocessing.active_children() if c.pid not in before]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(30)
    refused = client.post("/v2/models/tiny/infer", json=body)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "worker decoding large request bodies stopped" in refused.json()["error"]
    assert client.post("/v2/models/tiny/infer", json=body).status_code == 200


DECODER_PARENT = """
import asyncio, sys
from service.decoding import RequestDecoder
from service.protocol.codec import EncodedInferRequest
from service.tensors import InputExpectation

decoder = RequestDecoder(offload_bytes=0)
body = b'{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'
asyncio.run(decoder.decode(EncodedInferRequest(body, None), InputExpectation("input", (2,), "FP32", 8)))
import multiprocessing
print(multiprocessing.active_children()[0].pid, flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.slow  # a subprocess server and its worker
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_decoding_worker_dies_with_a_killed_server():
    """SIGKILL leaves the server no chance to stop its worker: the kernel's parent-death signal
    must, or every killed server leaves an orphan process behind."""
    import subprocess
    import time

    parent = subprocess.Popen(
        [sys.executable, "-c", DECODER_PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive while its parent is
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError(f"decoding worker {worker} outlived its killed parent")
