"""A hostile battery against a real ``python -m service``: model versions and requests an attacker
could hand in, each of which must be refused by name while the server goes on serving.

For every hostile model version: it is published over a good one, an explicit load answers 4xx,
``POST /v2/repository/index`` shows it refused with a reason, and the good version keeps giving
the right answer. For every hostile request: a 4xx with a JSON ``{"error": ...}`` body (no
``NaN``, no traceback). After the whole battery the server is alive and still correct.
"""

from __future__ import annotations

import json
import os
import socket
import struct

import httpx
import numpy as np
import pytest

from model.artifact import METADATA_KEY, encode_artifact
from model.engine import load_model
from model.repository import MANIFEST_FILENAME, publish
from tests.model.factory import (
    join_header,
    replace_tensor,
    rewrite_metadata,
    split_header,
    tiny_spec,
    tiny_tensors,
)
from tests.service.live import ServiceProcess

pytestmark = pytest.mark.slow
NAME = "victim"
BYSTANDER = "bystander"
X = np.random.default_rng(7).integers(0, 17, size=(5, 1, 6, 6)).astype(np.float32)


# --- hostile model versions ----------------------------------------------------------------------
def _layer(doc: dict, name: str) -> dict:
    return next(layer for layer in doc["layers"] if layer["name"] == name)


def _set(path: tuple, value):
    """An edit of the metadata document: ``doc[path[0]]...[path[-1]] = value``, where a key
    after ``"layers"`` names a layer."""

    def edit(doc: dict) -> None:
        target, keys = doc, list(path[:-1])
        while keys:
            key = keys.pop(0)
            target = _layer(doc, keys.pop(0)) if key == "layers" else target[key]
        target[path[-1]] = value

    return edit


def _memory_bomb(padding: int, window: int):
    def edit(doc: dict) -> None:
        _layer(doc, "conv0")["padding"] = [padding, padding]
        _layer(doc, "pool1")["kernel_size"] = [window, window]

    return edit


def _nested_metadata(data: bytes, depth: int) -> bytes:
    """The bnnserve metadata with ``depth`` nested JSON arrays in its provenance."""
    header, body = split_header(data)
    doc = json.loads(header["__metadata__"][METADATA_KEY])
    doc["provenance"] = "@deep@"
    text = json.dumps(doc).replace('"@deep@"', "[" * depth + "]" * depth)
    header["__metadata__"][METADATA_KEY] = text
    return join_header(header, body)


def _nested_header(data: bytes, depth: int) -> bytes:
    """The safetensors header itself nested ``depth`` arrays deep in an extra entry."""
    length = struct.unpack("<Q", data[:8])[0]
    raw = data[8 : 8 + length].rstrip(b"}") + b',"deep":' + b"[" * depth + b"]" * depth + b"}"
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


POISONED_TENSORS = {
    "nan output bias": ("fc.bias", lambda a: np.where(np.arange(a.size) == 0, np.nan, a)),
    "infinite float weight": ("conv0.weight", lambda a: np.where(a > 0, np.inf, a)),
    "negative BatchNorm variance": ("bn0.running_var", lambda a: -a),
    "nan BatchNorm weight": ("bn1.weight", lambda a: np.full_like(a, np.nan)),
    "nan BatchNorm mean": ("bn0.running_mean", lambda a: np.full_like(a, np.nan)),
    "infinite BatchNorm bias": ("bn1.bias", lambda a: np.full_like(a, -np.inf)),
    "nan XNOR scale": ("conv1.scale", lambda a: np.full_like(a, np.nan)),
    "infinite output weight": ("fc.weight", lambda a: np.full_like(a, np.inf)),
}

POISONED_SPECS = {
    "eps nan": _set(("layers", "bn0", "eps"), float("nan")),
    "eps negative": _set(("layers", "bn0", "eps"), -1.0),
    "eps zero": _set(("layers", "bn1", "eps"), 0.0),
    "value_range reversed": _set(("input", "value_range"), [16.0, 0.0]),
    "value_range nan": _set(("input", "value_range"), [0.0, float("nan")]),
    "value_range of one number": _set(("input", "value_range"), [16.0]),
    "value_range of strings": _set(("input", "value_range"), ["0", "16"]),
    "labels not strings": _set(("labels",), [1, 2, 3]),
    "duplicate labels": _set(("labels",), ["a", "a", "b"]),
    "input shape 2**70": _set(("input", "shape"), [1, 2**70, 6]),
    "input shape negative": _set(("input", "shape"), [1, -6, 6]),
    "input shape of 40 dimensions": _set(("input", "shape"), [1] * 40),
    "unknown layer kind": _set(("layers", "pool1", "kind"), "avgpool9d"),
    "unknown quantizer": _set(("layers", "conv1", "input_quantizer"), "magic_sign"),
    "padding 2000 with a 4000x4000 pool": _memory_bomb(2000, 4000),
    "padding 300 with a 600x600 pool": _memory_bomb(300, 600),
    "negative padding": _set(("layers", "conv1", "padding"), [-1, -1]),
    "stride zero": _set(("layers", "pool1", "stride"), [0, 0]),
}


def _as_v2(inputs: dict[str, list[str]], extra_layers: list[dict] | None = None):
    """The tiny model declared as format v2, with ``inputs`` set on the named layers and
    ``extra_layers`` inserted before the last layer."""

    def edit(doc: dict) -> None:
        doc["format_version"] = 2
        for name, sources in inputs.items():
            _layer(doc, name)["inputs"] = sources
        doc["layers"][-1:-1] = extra_layers or []

    return edit


def _shifts(count: int) -> list[dict]:
    return [{"kind": "shift", "name": f"s{i}", "num_features": 630} for i in range(count)]


# Hostile format v2 graphs, refused on load with their named error (the index reason starts
# with it); the tensors still fit the graph, so only the graph is wrong.
HOSTILE_GRAPHS = {
    "v2 graph with a cycle": (_as_v2({"conv1": ["bn1"]}), "GraphCycleError"),
    "v2 graph with a dangling input": (_as_v2({"fc": ["nowhere"]}), "DanglingInputError"),
    "v2 graph of 20,001 layers": (_as_v2({}, _shifts(20_001 - 7)), "GraphTooLargeError"),
    "v2 add of 100,000 inputs": (
        _as_v2({}, [{"kind": "add", "name": "sum", "inputs": ["flatten"] * 100_000}]),
        "GraphTooLargeError",
    ),
    "v1 document using inputs": (
        _set(("layers", "bn1", "inputs"), ["pool1"]),
        "FormatVersionError",
    ),
}


def good_artifact() -> bytes:
    return encode_artifact(tiny_spec(), tiny_tensors())


def hostile_artifacts() -> dict[str, bytes]:
    data, good = good_artifact(), tiny_tensors()
    cases = {
        name: replace_tensor(data, tensor, edit(good[tensor].copy()))
        for name, (tensor, edit) in POISONED_TENSORS.items()
    }
    cases |= {name: rewrite_metadata(data, edit) for name, edit in POISONED_SPECS.items()}
    cases |= {name: rewrite_metadata(data, edit) for name, (edit, _) in HOSTILE_GRAPHS.items()}
    cases["deeply nested metadata"] = _nested_metadata(data, 100_000)
    cases["deeply nested safetensors header"] = _nested_header(data, 100_000)
    cases["header length 2**63"] = struct.pack("<Q", 2**63) + data[8:]
    cases["truncated file"] = data[: len(data) // 2]
    cases["not safetensors"] = b"\x00" * 64
    return cases


# --- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for name in (NAME, BYSTANDER):
        publish(repo, name, {"model.safetensors": good_artifact()})
    expected = load_model(repo / NAME / "1" / "model.safetensors").predict(X)
    service = ServiceProcess(
        repo,
        tmp_path_factory.mktemp("logs") / "server.log",
        poll_interval_s=0.2,
        load_timeout_s=5,
        body_timeout_s=2,
        max_body_bytes=1 << 20,
    )
    try:
        service.wait_ready()
        yield service, repo, expected
    finally:
        service.stop()


@pytest.fixture(scope="module")
def http(served):
    service, _, _ = served
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


def strict_json(response: httpx.Response) -> dict:
    """The body as JSON, refusing the NaN/Infinity tokens that are not JSON."""

    def refuse(token: str):
        raise AssertionError(f"non-JSON token {token} in {response.text[:200]}")

    return json.loads(response.content, parse_constant=refuse)


def assert_refused_with_json(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = strict_json(response)
    assert isinstance(body.get("error"), str) and body["error"], body
    assert "Traceback" not in body["error"]


def infer_logits(http: httpx.Client, name: str = NAME) -> np.ndarray:
    response = http.post(
        f"/v2/models/{name}/infer",
        json={
            "inputs": [
                {"name": "input", "shape": list(X.shape), "datatype": "UINT8",
                 "data": X.astype(int).ravel().tolist()}
            ],
            "outputs": [{"name": "logits"}],
        },
    )  # fmt: skip
    assert response.status_code == 200, response.text[:300]
    output = strict_json(response)["outputs"][0]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def assert_still_correct(http: httpx.Client, expected: np.ndarray) -> None:
    assert http.get("/v2/health/live").status_code == 200
    np.testing.assert_allclose(infer_logits(http), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(infer_logits(http, BYSTANDER), expected, rtol=1e-5, atol=1e-5)


def index_row(http: httpx.Client, name: str, version: int) -> dict:
    rows = strict_json(http.post("/v2/repository/index", json={}))
    return next(r for r in rows if r["name"] == name and r["version"] == str(version))


# --- model versions ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(hostile_artifacts()))
def test_hostile_version_is_refused_and_the_good_one_keeps_serving(served, http, case):
    _, repo, expected = served
    version = publish(repo, NAME, {"model.safetensors": hostile_artifacts()[case]}).version
    response = http.post(f"/v2/repository/models/{NAME}/load", json={})
    assert_refused_with_json(response)
    row = index_row(http, NAME, version)
    assert row["state"] == "UNAVAILABLE" and row["reason"], row
    if case in HOSTILE_GRAPHS:
        error = HOSTILE_GRAPHS[case][1]
        assert row["reason"].startswith(f"{error}: "), row
        assert error in strict_json(response)["error"]
    assert_still_correct(http, expected)


def _version_dir(repo, files: dict[str, bytes]) -> int:
    """A version directory written by hand (not through publish), with a manifest of ``files``."""
    import hashlib

    from model.repository import list_versions

    version = max(list_versions(repo, NAME)) + 1
    path = repo / NAME / str(version)
    path.mkdir()
    manifest = {"files": {}}
    for file_name, content in files.items():
        (path / file_name).write_bytes(content)
        manifest["files"][file_name] = {
            "sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)
        }  # fmt: skip
    return version, path, manifest


def _write_manifest(path, manifest) -> None:
    (path / MANIFEST_FILENAME).write_text(json.dumps(manifest))


def test_fifo_artifact_never_blocks_the_server(served, http):
    _, repo, expected = served
    version, path, manifest = _version_dir(repo, {})
    os.mkfifo(path / "model.safetensors")
    _write_manifest(path, manifest)
    assert_refused_with_json(http.post(f"/v2/repository/models/{NAME}/load", json={}))
    assert index_row(http, NAME, version)["state"] == "UNAVAILABLE"
    # Another model's new version is still picked up, and an unrelated unload/load returns.
    publish(repo, BYSTANDER, {"model.safetensors": good_artifact()})
    assert http.post(f"/v2/repository/models/{BYSTANDER}/load", json={}).status_code == 200
    assert_still_correct(http, expected)


def test_artifact_missing_from_the_manifest_is_never_served(served, http):
    _, repo, expected = served
    reversed_labels = rewrite_metadata(good_artifact(), _set(("labels",), ["c", "b", "a"]))
    version, path, manifest = _version_dir(repo, {"metrics.json": b"{}"})
    (path / "model.safetensors").write_bytes(reversed_labels)
    _write_manifest(path, manifest)
    assert_refused_with_json(http.post(f"/v2/repository/models/{NAME}/load", json={}))
    assert index_row(http, NAME, version)["state"] == "UNAVAILABLE"
    assert_still_correct(http, expected)


def test_artifact_linking_outside_the_repository_is_refused(served, http, tmp_path):
    _, repo, expected = served
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(good_artifact())
    version, path, manifest = _version_dir(repo, {})
    (path / "model.safetensors").symlink_to(outside)
    manifest["files"]["model.safetensors"] = {
        "sha256": __import__("hashlib").sha256(outside.read_bytes()).hexdigest(),
        "bytes": outside.stat().st_size,
    }
    _write_manifest(path, manifest)
    assert_refused_with_json(http.post(f"/v2/repository/models/{NAME}/load", json={}))
    assert index_row(http, NAME, version)["state"] == "UNAVAILABLE"
    assert_still_correct(http, expected)


# --- requests ------------------------------------------------------------------------------------
def _v2(shape, data=None, datatype="UINT8", **extra) -> dict:
    tensor = {"name": "input", "shape": shape, "datatype": datatype}
    tensor["data"] = data if data is not None else [0] * int(np.prod(shape))
    return {"inputs": [tensor], **extra}


def _binary(shape, datatype="UINT8", blob=b"", header_length=None, **extra):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": shape,
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            **extra,
        }
    ).encode()
    length = str(len(header)) if header_length is None else header_length
    # Non-ASCII digits go out as their UTF-8 bytes, as a hostile client would send them.
    return {
        "content": header + blob,
        "headers": {"Inference-Header-Content-Length": length.encode()},
    }


INFER = f"/v2/models/{NAME}/infer"
ROW = [1, 1, 6, 6]
HOSTILE_REQUESTS = {
    "body is not JSON": (INFER, {"content": b"{not json"}),
    "body is a JSON array": (INFER, {"json": [1, 2, 3]}),
    "NaN token in data": (
        INFER,
        {
            "content": b'{"inputs":[{"name":"input","shape":[1,1,6,6],'
            b'"datatype":"FP32","data":[' + b"NaN," * 35 + b"NaN]}]}"
        },
    ),
    "deeply nested data": (
        INFER,
        {
            "content": b'{"inputs":[{"name":"input","shape":[1],'
            b'"datatype":"FP32","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
        },
    ),
    "integer beyond 64 bits": (INFER, {"json": _v2(ROW, [10**400] * 36)}),
    "header length '²'": (INFER, _binary(ROW, blob=bytes(36), header_length="²")),
    "header length of 5000 digits": (INFER, _binary(ROW, blob=bytes(36), header_length="9" * 5000)),
    "header length negative": (INFER, _binary(ROW, blob=bytes(36), header_length="-5")),
    "header length beyond the body": (INFER, _binary(ROW, blob=bytes(36), header_length="100000")),
    "shape [0, 10**30] in JSON": (INFER, {"json": _v2([0, 10**30], [])}),
    "shape [0, 10**30] in binary": (INFER, _binary([0, 10**30])),
    "shape of 100 dimensions": (INFER, {"json": _v2([1] * 100, [0])}),
    "negative dimension": (INFER, {"json": _v2([-1, 1, 6, 6], [0] * 36)}),
    "dimension as a string": (INFER, {"json": _v2(["1", 1, 6, 6], [0] * 36)}),
    "unknown datatype": (INFER, {"json": _v2(ROW, datatype="FP128")}),
    "data shorter than the shape": (INFER, {"json": _v2(ROW, [0] * 35)}),
    "binary blob shorter than the shape": (INFER, _binary(ROW, blob=bytes(35))),
    "binary_data_output as a string": (
        INFER,
        {"json": _v2(ROW, parameters={"binary_data_output": "false"})},
    ),
    "binary_data as a string": (
        INFER,
        {"json": _v2(ROW, outputs=[{"name": "logits", "parameters": {"binary_data": "yes"}}])},
    ),
    "unknown output": (INFER, {"json": _v2(ROW, outputs=[{"name": "secrets"}])}),
    "wrong input name": (
        INFER,
        {"json": {"inputs": [{"name": "x", "shape": ROW, "datatype": "UINT8", "data": [0] * 36}]}},
    ),
    "Infinity token in data": (
        INFER,
        {
            "content": b'{"inputs":[{"name":"input","shape":[1,1,6,6],"datatype":"FP32","data":['
            + b"Infinity," * 35
            + b"-Infinity]}]}"
        },
    ),
    "data as strings": (INFER, {"json": _v2(ROW, ["0"] * 36, datatype="FP32")}),
    "parameters as a list": (INFER, {"json": _v2(ROW, parameters=[1, 2])}),
    "batch over the request limit": (INFER, {"json": _v2([1025, 1, 6, 6])}),
    "250k empty BYTES elements": (
        INFER,
        _binary([250_000], datatype="BYTES", blob=bytes(4) * 250_000),
    ),
    "body over the size limit": (INFER, {"content": b" " * (2 << 20)}),
    "unknown model": ("/v2/models/nobody/infer", {"json": _v2(ROW)}),
    "model name with a newline": ("/v2/models/m%0A/infer", {"json": _v2(ROW)}),
    "path traversal in the name": ("/v2/models/..%2F..%2Fetc/infer", {"json": _v2(ROW)}),
    "version that is not a number": (f"/v2/models/{NAME}/versions/9%0A/infer", {"json": _v2(ROW)}),
    "index with ready as a number": ("/v2/repository/index", {"json": {"ready": 0}}),
    "index with ready as a string": ("/v2/repository/index", {"json": {"ready": "true"}}),
    "load of a model that does not exist": ("/v2/repository/models/nobody/load", {"json": {}}),
    "predict with instances not a list": (f"/v1/models/{NAME}:predict", {"json": {"instances": 5}}),
    "predict with ragged instances": (
        f"/v1/models/{NAME}:predict",
        {"json": {"instances": [[0] * 36, [0] * 35]}},
    ),
    "predict with strings": (f"/v1/models/{NAME}:predict", {"json": {"instances": [["a"] * 36]}}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REQUESTS))
def test_hostile_request_gets_a_named_4xx(served, http, case):
    _, _, expected = served
    path, kwargs = HOSTILE_REQUESTS[case]
    assert_refused_with_json(http.post(path, **kwargs))
    assert_still_correct(http, expected)


def test_stalled_body_is_dropped_and_the_server_keeps_serving(served, http):
    """A client that sends headers and half a body, then nothing, is cut off after
    BNN_BODY_TIMEOUT_S (2 s here) rather than held."""
    service, _, expected = served
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            'Content-Length: 1000\r\n\r\n{"inputs": ['.encode()
        )
        answer = sock.recv(65536)  # the server answers or closes; recv returns either way
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    assert_still_correct(http, expected)


def test_server_is_alive_and_correct_after_the_battery(served, http):
    _, _, expected = served
    assert http.get("/v2/health/ready").status_code == 200
    assert_still_correct(http, expected)
