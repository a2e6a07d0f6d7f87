import json
import struct

import numpy as np
import pytest

from service.errors import BadRequestError, NonFiniteResponseError
from service.protocol import codec
from service.tensors import Tensor


def infer_body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, str]:
    raw = json.dumps(header).encode()
    return raw + b"".join(blobs), str(len(raw))


def test_datatype_table_sizes():
    assert codec.DATATYPES["FP16"].itemsize == 2 and codec.DATATYPES["UINT64"].itemsize == 8


def test_nested_and_flat_json_data_decode_to_the_same_tensor():
    nested = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    flat = list(range(1, 9))
    for data in (nested, flat):
        (tensor,) = codec.decode_infer_request(
            infer_body({"name": "x", "shape": [2, 2, 2], "datatype": "FP32", "data": data}), None
        ).inputs
        assert tensor.array.dtype == np.float32
        np.testing.assert_array_equal(tensor.array, np.arange(1, 9).reshape(2, 2, 2))


@pytest.mark.parametrize(
    ("datatype", "data", "dtype"),
    [
        ("INT8", [-128, 127], np.int8),
        ("UINT8", [0, 255], np.uint8),
        ("INT64", [-(2**40), 2**40], np.int64),
        ("FP64", [0.1, 1e300], np.float64),
        ("FP16", [0.5, 2], np.float16),
        ("BOOL", [True, False], np.bool_),
    ],
)
def test_json_datatypes(datatype, data, dtype):
    array = codec.array_from_json(data, datatype, "x")
    assert array.dtype == dtype
    np.testing.assert_array_equal(array, np.asarray(data, dtype))


@pytest.mark.parametrize(
    ("datatype", "data", "fragment"),
    [
        ("UINT8", [256], "UINT8 values must lie in [0, 255], got 256..256"),
        ("UINT8", [-1], "UINT8 values must lie in [0, 255], got -1..-1"),
        ("INT8", [1.5], "INT8 data must be integers, got values like 1.5"),
        ("INT8", [2.0, 1e9], "INT8 values must lie in [-128, 127], got 2..1e+09"),
        ("FP32", ["1.0"], "FP32 data must be numbers, got values like '1.0'"),
        ("FP32", [[1, 2], [3]], "not a regular array"),
        ("FP32", 3.0, "'data' must be a list, got float"),
        ("BOOL", [1, 0], "BOOL data must be booleans"),
        ("BF17", [1], "unknown datatype 'BF17'"),
    ],
)
def test_bad_json_data_names_the_tensor(datatype, data, fragment):
    with pytest.raises(BadRequestError) as info:
        codec.array_from_json(data, datatype, "pixels")
    assert "tensor 'pixels'" in str(info.value)
    assert fragment in str(info.value)


def test_element_count_must_match_the_shape():
    body = infer_body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5]})
    with pytest.raises(BadRequestError, match=r"shape \[2, 3\] needs 6 elements, data has 5"):
        codec.decode_infer_request(body, None)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "malformed inference request"),
        (b'{"inputs": []}', "inputs: List should have at least 1 item"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}', "inputs.0.shape"),
        (infer_body({"name": "x", "shape": [1], "datatype": "FP32"}), "neither 'data' nor"),
        (
            infer_body({"name": "x", "shape": [-1], "datatype": "FP32", "data": []}),
            "inputs.0.shape.0: Input should be greater than or equal to 0",
        ),
    ],
)
def test_malformed_requests(body, fragment):
    with pytest.raises(BadRequestError, match=fragment):
        codec.decode_infer_request(body, None)


ALL_FIXED = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64"]  # fmt: skip


@pytest.mark.parametrize("datatype", ALL_FIXED)
def test_binary_round_trip_for_every_fixed_size_datatype(datatype):
    rng = np.random.default_rng(0)
    dtype = codec.DATATYPES[datatype]
    array = rng.integers(0, 2, (3, 4)) if datatype == "BOOL" else rng.integers(0, 100, (3, 4))
    array = array.astype(dtype)
    blob = codec.binary_data(Tensor("x", datatype, array))
    assert blob == array.astype(dtype.newbyteorder("<")).tobytes()  # little-endian, row-major
    decoded = codec.array_from_binary(blob, datatype, [3, 4], "x")
    np.testing.assert_array_equal(decoded, array)


def test_bool_and_bytes_binary_layouts():
    bools = Tensor("b", "BOOL", np.array([True, False, True]))
    assert codec.binary_data(bools) == b"\x01\x00\x01"
    strings = Tensor("s", "BYTES", np.array([b"ab", b"", b"xyz"], dtype=object))
    blob = codec.binary_data(strings)
    assert (
        blob == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 3) + b"xyz"
    )
    assert list(codec.array_from_binary(blob, "BYTES", [3], "s")) == [b"ab", b"", b"xyz"]
    with pytest.raises(BadRequestError, match="BOOL bytes must be 0 or 1"):
        codec.array_from_binary(b"\x02", "BOOL", [1], "b")
    with pytest.raises(BadRequestError, match="ends inside a length prefix"):
        codec.array_from_binary(b"\x05\x00", "BYTES", [1], "s")
    with pytest.raises(BadRequestError, match="runs past the data"):
        codec.array_from_binary(struct.pack("<I", 9) + b"abc", "BYTES", [1], "s")


def test_binary_request_mixes_binary_and_json_inputs():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, 8], dtype=np.int16)
    header = {
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32",
             "parameters": {"binary_data_size": a.nbytes}},
            {"name": "j", "shape": [1], "datatype": "INT32", "data": [5]},
            {"name": "b", "shape": [2], "datatype": "INT16",
             "parameters": {"binary_data_size": b.nbytes}},
        ]
    }  # fmt: skip
    body, length = binary_body(header, a.tobytes(), b.tobytes())
    tensors = codec.decode_infer_request(body, length).inputs
    assert [t.name for t in tensors] == ["a", "j", "b"]
    np.testing.assert_array_equal(tensors[0].array, a)
    np.testing.assert_array_equal(tensors[1].array, [5])
    np.testing.assert_array_equal(tensors[2].array, b)


@pytest.mark.parametrize(
    ("size", "tail", "length", "fragment"),
    [
        (24, b"\0" * 20, None, "runs past the end of the body"),
        (20, b"\0" * 20, None, "binary_data_size is 20 bytes but shape [2, 3] of FP32 needs 24"),
        (24, b"\0" * 28, None, "4 bytes of binary data that no input claims"),
        (24, b"\0" * 24, "abc", "Inference-Header-Content-Length must be an integer"),
        (24, b"\0" * 24, "99999", "Inference-Header-Content-Length must be an integer"),
        (24, b"\0" * 24, "²", "Inference-Header-Content-Length must be an integer"),
        (24, b"\0" * 24, "9" * 5000, "Inference-Header-Content-Length must be an integer"),
        (24, b"\0" * 24, "-1", "Inference-Header-Content-Length must be an integer"),
        (-1, b"", None, "binary_data_size: Input should be greater than or equal to 0"),
    ],
)
def test_bad_binary_framing(size, tail, length, fragment):
    header = {"inputs": [{"name": "a", "shape": [2, 3], "datatype": "FP32",
                          "parameters": {"binary_data_size": size}}]}  # fmt: skip
    body, real_length = binary_body(header, tail)
    with pytest.raises(BadRequestError) as info:
        codec.decode_infer_request(body, length or real_length)
    assert fragment in str(info.value)


def _outputs():
    logits = np.array([[0.5, -1.25], [2.0, 0.0]], np.float32)
    return [
        Tensor("logits", "FP32", logits),
        Tensor("predicted_class", "INT64", np.array([0, 0], np.int64)),
        Tensor("label", "BYTES", np.array([b"cat", b"cat"], dtype=object)),
    ]


def test_json_response_is_flat_row_major_and_echoes_the_id():
    body, headers, media = codec.encode_infer_response(
        model_name="m", model_version="3", request_id="req-1", outputs=_outputs(), binary=set()
    )
    assert (headers, media) == ({}, "application/json")
    doc = json.loads(body)
    assert doc["id"] == "req-1" and doc["model_version"] == "3"
    assert doc["outputs"][0] == {
        "name": "logits", "datatype": "FP32", "shape": [2, 2], "data": [0.5, -1.25, 2.0, 0.0]
    }  # fmt: skip
    assert doc["outputs"][2]["data"] == ["cat", "cat"]


def test_binary_response_puts_requested_outputs_after_the_header():
    body, headers, media = codec.encode_infer_response(
        model_name="m", model_version="1", request_id=None, outputs=_outputs(),
        binary={"logits", "label"},
    )  # fmt: skip
    assert media == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    logits_out, class_out, label_out = header["outputs"]
    assert "data" not in logits_out and logits_out["parameters"]["binary_data_size"] == 16
    assert class_out["data"] == [0, 0]
    tail = body[length:]
    np.testing.assert_array_equal(
        np.frombuffer(tail[:16], "<f4").reshape(2, 2), _outputs()[0].array
    )
    assert list(codec.array_from_binary(tail[16:], "BYTES", [2], "label")) == [b"cat", b"cat"]
    assert label_out["parameters"]["binary_data_size"] == len(tail) - 16


def test_requested_outputs_and_binary_flags():
    request = codec.decode_infer_request(
        infer_body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                   parameters={"binary_data_output": True}),
        None,
    )  # fmt: skip
    assert (request.outputs, request.binary_outputs) == (None, {"*"})
    request = codec.decode_infer_request(
        infer_body(
            {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
            outputs=[
                {"name": "label"},
                {"name": "logits", "parameters": {"binary_data": True}},
                {"name": "probabilities", "parameters": {"binary_data": False}},
            ],
            parameters={"binary_data_output": True},
        ),
        None,
    )
    assert request.outputs == ["label", "logits", "probabilities"]
    assert request.binary_outputs == {"label", "logits"}  # an output's own flag wins


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([1.0, -2.5], np.float32, True),
        ([3.4e38] * 1000, np.float32, True),  # a large finite sum stays finite in float64
        ([np.inf, -np.inf], np.float32, False),  # ∞ − ∞: NaN
        ([1.0, np.nan], np.float16, False),
        ([1e308, 1e308], np.float64, True),  # would overflow a float64 sum: numpy decides
        ([1.0, -np.inf], np.float64, False),
    ],
)
def test_json_outputs_refuse_exactly_the_non_finite(values, dtype, finite):
    tensor = Tensor("logits", "FP32", np.array(values, dtype))
    if finite:
        assert codec.json_data(tensor) == np.array(values, dtype).tolist()
    else:
        with pytest.raises(NonFiniteResponseError, match="NaN or infinity"):
            codec.json_data(tensor)
