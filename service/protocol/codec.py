"""Tensor encoding of the Open Inference Protocol: JSON ``data`` and the binary tensor extension.

One table, :data:`DATATYPES`, maps each protocol datatype to its numpy dtype; the reverse map is
derived from it. Binary tensor data is little-endian, row-major, without padding; a BOOL is one
byte (0 or 1); a BYTES element is a 4-byte little-endian length followed by that many bytes.

A binary request body is ``[JSON header: Inference-Header-Content-Length bytes][tensor bytes]``,
the tensors' bytes in the order of the inputs that carry ``parameters.binary_data_size``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydantic_core
from pydantic import ValidationError

from service.errors import BadRequestError, NonFiniteResponseError, describe_request_errors
from service.protocol.v2 import InferenceRequest, RequestInput
from service.tensors import Tensor

HEADER_LENGTH = "inference-header-content-length"
BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_LENGTH = struct.Struct("<I")


def dtype_of(datatype: str, tensor: str) -> np.dtype:
    """The numpy dtype of a protocol datatype; BadRequestError naming the tensor otherwise."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        known = ", ".join(DATATYPES)
        raise BadRequestError(
            f"tensor {tensor!r}: unknown datatype {datatype!r}; expected one of {known}"
        ) from None


# --- JSON data -----------------------------------------------------------------------------------
def array_from_json(data: Any, datatype: str, tensor: str) -> np.ndarray:
    """JSON tensor data (nested or flat lists) as an array of ``datatype``; its shape is the
    nesting's. Rejects ragged lists, strings where numbers belong, and out-of-range integers."""
    dtype = dtype_of(datatype, tensor)
    if not isinstance(data, list):
        raise BadRequestError(f"tensor {tensor!r}: 'data' must be a list, got {_kind(data)}")
    if datatype == "BYTES":
        return _bytes_from_json(data, tensor)
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise BadRequestError(f"tensor {tensor!r}: data is not a regular array ({exc})") from None
    if raw.size == 0:
        return raw.astype(dtype)
    _check_json_kind(raw, datatype, dtype, tensor)
    return raw.astype(dtype, copy=False)


def _check_json_kind(raw: np.ndarray, datatype: str, dtype: np.dtype, tensor: str) -> None:
    # Integer datatypes take integral JSON numbers (some encoders write 3 as 3.0).
    allowed = {"b": "b", "i": "iuf", "u": "iuf", "f": "iuf"}[dtype.kind]
    if raw.dtype.kind not in allowed or (dtype.kind in "iu" and not _integral(raw)):
        expected = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
        example = raw.ravel()[0]
        raise BadRequestError(
            f"tensor {tensor!r}: {datatype} data must be {expected}, got values like "
            f"{example.item() if hasattr(example, 'item') else example!r}"
        )
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = raw.min().item(), raw.max().item()
        if low < info.min or high > info.max:
            raise BadRequestError(
                f"tensor {tensor!r}: {datatype} values must lie in [{info.min}, {info.max}], "
                f"got {low:g}..{high:g}"
            )


def _integral(raw: np.ndarray) -> bool:
    """Whether every value is a whole number (JSON floats like 3.0 count)."""
    return raw.dtype.kind != "f" or bool(np.all(np.isfinite(raw) & (raw == np.floor(raw))))


def _bytes_from_json(data: list, tensor: str) -> np.ndarray:
    flat = _flatten(data)
    if not all(isinstance(item, str) for item in flat):
        raise BadRequestError(f"tensor {tensor!r}: BYTES data must be strings")
    return np.array([item.encode() for item in flat], dtype=object)


def _flatten(data: list) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def json_data(tensor: Tensor) -> list:
    """A tensor's values as the flat row-major list that JSON ``data`` carries."""
    flat = tensor.array.ravel()
    if tensor.datatype == "BYTES":
        return [item.decode("utf-8", errors="replace") for item in flat]
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():  # JSON has no NaN or Infinity
        raise NonFiniteResponseError(f"output {tensor.name!r}: the model produced NaN or infinity")
    return flat.tolist()


# --- binary data ---------------------------------------------------------------------------------
def array_from_binary(blob: memoryview | bytes, datatype: str, shape: Sequence[int], tensor: str):
    """Binary tensor data (little-endian, row-major) as an array of ``shape``."""
    dtype = dtype_of(datatype, tensor)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(bytes(blob), count, tensor).reshape(shape)
    expected = count * dtype.itemsize
    if len(blob) != expected:
        raise BadRequestError(
            f"tensor {tensor!r}: binary_data_size is {len(blob)} bytes but shape "
            f"{list(shape)} of {datatype} needs {expected}"
        )
    if datatype == "BOOL":
        raw = np.frombuffer(blob, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise BadRequestError(f"tensor {tensor!r}: BOOL bytes must be 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def _bytes_from_binary(blob: bytes, count: int, tensor: str) -> np.ndarray:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(blob):
            raise BadRequestError(f"tensor {tensor!r}: BYTES data ends inside a length prefix")
        (length,) = _LENGTH.unpack_from(blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise BadRequestError(f"tensor {tensor!r}: BYTES element runs past the data")
        items.append(blob[offset : offset + length])
        offset += length
    if offset != len(blob):
        raise BadRequestError(
            f"tensor {tensor!r}: {len(blob) - offset} bytes left after {count} BYTES elements"
        )
    return np.array(items, dtype=object)


def binary_data(tensor: Tensor) -> bytes:
    """A tensor's bytes in the binary extension's layout."""
    if tensor.datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(item)) + item for item in tensor.array.ravel())
    dtype = DATATYPES[tensor.datatype]
    return np.ascontiguousarray(tensor.array, dtype=dtype).tobytes()


# --- inference request / response ----------------------------------------------------------------
def decode_infer_request(
    body: bytes, header_length: str | None
) -> tuple[InferenceRequest, list[Tensor]]:
    """Parse a V2 inference request, JSON or JSON header + binary tensors, into tensors."""
    header, tail = split_body(body, header_length)
    try:
        document = pydantic_core.from_json(header)
    except ValueError as exc:
        raise BadRequestError(f"malformed inference request: body is not JSON ({exc})") from None
    try:
        # from_json + model_validate: a third faster than model_validate_json for this model.
        request = InferenceRequest.model_validate(document)
    except ValidationError as exc:
        raise BadRequestError(
            f"malformed inference request: {describe_request_errors(exc.errors())}"
        ) from None
    tensors, offset = [], 0
    for item in request.inputs:
        size = item.parameters.get("binary_data_size")
        if size is None:
            tensors.append(_json_tensor(item))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequestError(
                f"tensor {item.name!r}: binary_data_size must be a non-negative integer"
            )
        if offset + size > len(tail):
            raise BadRequestError(
                f"tensor {item.name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(tail) - offset} bytes left)"
            )
        _check_shape(item)
        array = array_from_binary(
            tail[offset : offset + size], item.datatype, item.shape, item.name
        )
        tensors.append(Tensor(item.name, item.datatype, array))
        offset += size
    if offset != len(tail):
        raise BadRequestError(
            f"the body has {len(tail) - offset} bytes of binary data that no input claims"
        )
    return request, tensors


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tail) of a request body per Inference-Header-Content-Length."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise BadRequestError(
            f"Inference-Header-Content-Length must be an integer in [0, {len(body)}], "
            f"got {header_length!r}"
        )
    length = int(header_length)
    return body[:length], memoryview(body)[length:]


def _json_tensor(item: RequestInput) -> Tensor:
    _check_shape(item)
    if item.data is None:
        raise BadRequestError(
            f"tensor {item.name!r}: has neither 'data' nor parameters.binary_data_size"
        )
    array = array_from_json(item.data, item.datatype, item.name)
    count = math.prod(item.shape)
    if array.size != count:
        raise BadRequestError(
            f"tensor {item.name!r}: shape {item.shape} needs {count} elements, "
            f"data has {array.size}"
        )
    return Tensor(item.name, item.datatype, array.reshape(item.shape))


def _check_shape(item: RequestInput) -> None:
    if any(dim < 0 for dim in item.shape):
        raise BadRequestError(f"tensor {item.name!r}: shape {item.shape} has a negative dimension")


def requested_outputs(request: InferenceRequest) -> tuple[list[str] | None, set[str]]:
    """(names asked for or None for all, names to send as binary data)."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    if request.outputs is None:
        return None, {"*"} if binary_default else set()
    names = [output.name for output in request.outputs]
    binary = {
        output.name
        for output in request.outputs
        if bool(output.parameters.get("binary_data", binary_default))
    }
    return names, binary


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[Tensor],
    binary: set[str],
) -> tuple[bytes, dict[str, str], str]:
    """(body, extra headers, media type) of a V2 inference response."""
    entries, blobs = [], []
    for tensor in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.array.shape),
        }
        if "*" in binary or tensor.name in binary:
            blob = binary_data(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(tensor)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = entries
    header = to_json(response)
    if not blobs:
        return header, {}, JSON_MEDIA_TYPE
    return (
        b"".join([header, *blobs]),
        {"Inference-Header-Content-Length": str(len(header))},
        (BINARY_MEDIA_TYPE),
    )


def to_json(document: Any) -> bytes:
    """Compact JSON of a response document. pydantic-core's serializer writes the same text as
    ``json.dumps(document, separators=(",", ":"))`` (shortest round-trip floats) in a tenth of
    the time: 1 µs instead of 10 for a small model's response."""
    return pydantic_core.to_json(document)


def _kind(value: Any) -> str:
    return type(value).__name__
