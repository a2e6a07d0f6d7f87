"""The V2 gRPC API of a real ``python -m service`` process, spoken to by the stock
``tritonclient.grpc`` client (and its generated stubs for a request with typed ``contents``).

The server runs in its own process: tritonclient's generated messages and the service's share
the protobuf names of ``inference.*``, which one process cannot register twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.live import ServiceProcess, free_port
from tests.service.numpy_model import publish_tiny

grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (dev)")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow  # starts a server
KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


class Server:
    def __init__(self, process: ServiceProcess, grpc_port: int) -> None:
        self.process = process
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.client = grpcclient.InferenceServerClient(self.grpc_url)

    def http_infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        response = httpx.post(
            f"{self.process.url}/v2/models/tiny/infer", json=body, headers=AUTH, timeout=30
        )
        assert response.status_code == 200, response.text
        return {out["name"]: np.array(out["data"]) for out in response.json()["outputs"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("grpc")
    repo = tmp / "repo"
    publish_tiny(repo, "tiny", seed=0)
    port = free_port()
    process = ServiceProcess(
        repo, tmp / "server.log", grpc_port=port, api_key=KEY, models="tiny", log_json="false"
    )
    try:
        process.wait_ready()
        yield Server(process, port)
    finally:
        process.stop()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 1, 6, 6)).astype(np.float32)


def status_of(info: pytest.ExceptionInfo) -> str:
    return str(info.value.status())


def test_health_and_server_metadata_need_no_key(server):
    client = server.client
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "bnnserve"
    assert list(metadata.extensions) == ["binary_tensor_data", "model_repository"]


def test_model_readiness_and_metadata(server):
    client = server.client
    assert client.is_model_ready("tiny", headers=AUTH)
    assert client.is_model_ready("tiny", "1", headers=AUTH)
    assert not client.is_model_ready("no-such-model", headers=AUTH)
    metadata = client.get_model_metadata("tiny", headers=AUTH)
    assert metadata.name == "tiny" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, 1, 6, 6])
    ]
    assert [t.name for t in metadata.outputs] == [
        "logits", "probabilities", "predicted_class", "label",
    ]  # fmt: skip


def test_infer_with_raw_inputs_matches_http(server):
    x = images(3, seed=1)
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # raw_input_contents
    outputs = [grpcclient.InferRequestedOutput(name) for name in ("logits", "label")]
    result = server.client.infer("tiny", [tensor], outputs=outputs, request_id="r-1", headers=AUTH)
    expected = server.http_infer(x)
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"].reshape(3, 3))
    assert [v.decode() for v in result.as_numpy("label")] == list(expected["label"])
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "r-1")
    assert [o.name for o in response.outputs] == ["logits", "label"]


@pytest.mark.parametrize("datatype", ["FP32", "INT64", "UINT8"])
def test_infer_with_typed_contents_matches_http(server, datatype):
    """``contents`` instead of raw bytes, sent with tritonclient's generated stubs; every
    output comes back in ``raw_output_contents`` (as Triton answers)."""
    import grpc

    x = images(2, seed=2)
    request = service_pb2.ModelInferRequest(model_name="tiny", model_version="1")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    field = {"FP32": "fp32_contents", "INT64": "int64_contents", "UINT8": "uint_contents"}
    getattr(tensor.contents, field[datatype]).extend(x.ravel().astype(int).tolist())
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=30)
    names = [o.name for o in response.outputs]
    assert names == ["logits", "probabilities", "predicted_class", "label"]
    assert len(response.raw_output_contents) == 4
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 3)
    classes = np.frombuffer(response.raw_output_contents[2], "<i8")
    expected = server.http_infer(x)
    np.testing.assert_allclose(logits, expected["logits"].reshape(2, 3))
    np.testing.assert_array_equal(classes, expected["predicted_class"])


@pytest.mark.parametrize(
    ("call", "code", "fragment"),
    [
        (lambda c: c.get_model_metadata("tiny"), "UNAUTHENTICATED", "missing API key"),
        (lambda c: c.is_model_ready("tiny", headers={"authorization": "Bearer no"}),
         "UNAUTHENTICATED", "invalid API key"),
        (lambda c: c.get_model_metadata("no-such-model", headers=AUTH), "NOT_FOUND",
         "model 'no-such-model' not found"),
        (lambda c: c.get_model_metadata("../etc", headers=AUTH), "INVALID_ARGUMENT",
         "invalid model name"),
    ],
)  # fmt: skip
def test_errors_map_to_grpc_codes(server, call, code, fragment):
    with pytest.raises(InferenceServerException) as info:
        call(server.client)
    assert status_of(info) == f"StatusCode.{code}"
    assert fragment in info.value.message()


@pytest.mark.parametrize(
    ("shape", "datatype", "raw", "fragment"),
    [
        ([2, 1, 6, 5], "FP32", None, "expected shape [-1, 1, 6, 6]"),
        ([1, 36], "FP16", None, "FP16 has no contents field"),
        ([1, 36], "FP32", b"\x00" * 8, "needs 144"),
        ([1, 36], "STRING", None, "expected datatype FP32 (or another numeric type"),
    ],
)
def test_bad_inputs_are_invalid_argument_naming_the_problem(server, shape, datatype, raw, fragment):
    import grpc

    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    elif datatype == "FP32":
        tensor.contents.fp32_contents.extend([0.0] * int(np.prod(shape)))
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_repository_index_unload_and_load(server):
    client = server.client
    index = client.get_model_repository_index(headers=AUTH)
    assert [(m.name, m.version, m.state) for m in index.models] == [("tiny", "1", "READY")]
    client.unload_model("tiny", headers=AUTH)
    assert not client.is_model_ready("tiny", headers=AUTH)
    index = client.get_model_repository_index(headers=AUTH)
    assert [(m.state, m.reason) for m in index.models] == [("UNAVAILABLE", "unloaded")]
    with pytest.raises(InferenceServerException) as info:
        x = images(1)
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.infer("tiny", [tensor], headers=AUTH)
    assert status_of(info) == "StatusCode.UNAVAILABLE"
    client.load_model("tiny", headers=AUTH)
    assert client.is_model_ready("tiny", headers=AUTH)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("no-such-model", headers=AUTH)
    assert status_of(info) == "StatusCode.NOT_FOUND"


def test_grpc_calls_share_the_http_metrics(server):
    server.client.is_server_live()
    text = httpx.get(f"{server.process.url}/metrics", timeout=10).text
    assert 'bnn_grpc_requests_total{code="OK",method="ServerLive"}' in text
    assert 'protocol="grpc"' in text  # inference counted with HTTP's series


def test_an_oversized_message_is_resource_exhausted(tmp_path: Path):
    """BNN_MAX_BODY_BYTES bounds gRPC messages as it bounds HTTP bodies."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "tiny", seed=0)
    port = free_port()
    process = ServiceProcess(repo, tmp_path / "log", grpc_port=port, max_body_bytes=4096)
    try:
        process.wait_ready()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = np.zeros((64, 1, 6, 6), np.float32)  # 9216 bytes of tensor data
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tensor])
        assert status_of(info) == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        process.stop()


def test_grpc_calls_are_traced_with_the_request_id(tmp_path: Path, monkeypatch):
    """OTEL_TRACES_EXPORTER=console in a real server: one ModelInfer call is a server span with
    decode, queue wait, engine and encode children, all carrying the x-request-id metadata."""
    import json
    import re

    pytest.importorskip("opentelemetry.sdk", reason="needs the 'otel' extra")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    repo = tmp_path / "repo"
    publish_tiny(repo, "tiny", seed=0)
    port = free_port()
    log_path = tmp_path / "server.log"
    process = ServiceProcess(repo, log_path, grpc_port=port, log_json="false")
    try:
        process.wait_ready()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = images(1)
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.infer("tiny", [tensor], headers={"x-request-id": "grpc-trace-1"})
        assert process.terminate() == 0  # shutting down flushes the spans
    finally:
        process.stop()
    text = log_path.read_text()
    decoder = json.JSONDecoder()
    spans = [decoder.raw_decode(text, m.start())[0] for m in re.finditer(r"(?m)^\{$", text)]
    traced = [s for s in spans if s["attributes"].get("bnn.request_id") == "grpc-trace-1"]
    names = sorted(s["name"] for s in traced)
    assert names == sorted(["grpc ModelInfer", "decode", "queue wait", "engine", "encode"])
    server = next(s for s in traced if s["name"] == "grpc ModelInfer")
    assert server["kind"] == "SpanKind.SERVER"
    for span in traced:
        assert span["context"]["trace_id"] == server["context"]["trace_id"], span["name"]
        if span is not server:
            assert span["parent_id"] == server["context"]["span_id"], span["name"]
