"""The artifact file: a safetensors container holding a bit-packed BNN and its layer graph.

Layout (see docs/artifact-format.md for the full specification):

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [tensor bytes, little-endian]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` and holds one
metadata entry, ``__metadata__["bnnserve"]``: the canonical JSON of the :class:`ModelSpec`
plus a sha256 per tensor. Writing goes through the ``safetensors`` library (deterministic
byte order); reading parses and validates the header here, with numpy only, so that every
malformed case raises its own named error, and nothing in the file is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from model.content import check_model_content
from model.errors import (
    ArtifactError,
    ChecksumMismatchError,
    HeaderTooDeepError,
    HeaderTooLargeError,
    InvalidSpecError,
    MissingTensorError,
    NotSafetensorsError,
    TensorDtypeError,
    TensorShapeError,
    TruncatedArtifactError,
    UnsupportedFormatVersionError,
)
from model.safe_files import read_regular_file
from model.spec import FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, ModelSpec, TensorExpectation

METADATA_KEY = "bnnserve"
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Deepest nesting of arrays/objects in the header or the metadata document. A valid artifact
# nests 5 deep; a deeper one is hostile (Python's JSON parser recurses).
MAX_JSON_DEPTH = 32
ARTIFACT_FILENAME = "model.safetensors"

# safetensors dtype tag <-> numpy dtype, one table for both directions.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DTYPE_TAGS: dict[np.dtype, str] = {dtype: tag for tag, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Artifact:
    """A validated artifact: its layer graph and its tensors (read-only numpy arrays)."""

    spec: ModelSpec
    tensors: Mapping[str, np.ndarray]
    size_bytes: int


def encode_artifact(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialize ``spec`` and ``tensors`` to artifact bytes (deterministic for equal inputs).

    The tensors must be exactly those the graph needs (:meth:`ModelSpec.expected_tensors`),
    binary weights already packed with :func:`model.packing.pack_signs`.
    """
    spec.validate()
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    expected = spec.expected_tensors()
    _check_tensor_set(expected, {n: (a.shape, _tag_of(n, a)) for n, a in arrays.items()})
    check_model_content(spec, arrays)
    doc = spec.to_json()
    doc["tensors"] = {name: _tensor_record(expected[name], arrays[name]) for name in sorted(arrays)}
    metadata = {METADATA_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"))}
    return safetensors.numpy.save(arrays, metadata=metadata)


def write_artifact(
    path: str | os.PathLike[str], spec: ModelSpec, tensors: Mapping[str, np.ndarray]
) -> int:
    """Write an artifact file (via a temporary file and rename); returns its size in bytes."""
    data = encode_artifact(spec, tensors)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return len(data)


def read_artifact(path: str | os.PathLike[str], *, verify_checksums: bool = True) -> Artifact:
    """Read and validate an artifact file; each malformed case raises its own ArtifactError."""
    data = read_regular_file(path)  # a FIFO or device planted as the artifact is refused
    try:
        return decode_artifact(data, verify_checksums=verify_checksums)
    except ArtifactError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def decode_artifact(data: bytes, *, verify_checksums: bool = True) -> Artifact:
    """Validate artifact bytes and return the spec and zero-copy tensor views."""
    header, data_start = _parse_header(data)
    entries = _tensor_entries(header, len(data) - data_start)
    doc = _metadata_doc(header)
    spec = ModelSpec.from_json(doc)
    expected = spec.expected_tensors()
    _check_tensor_set(expected, {n: (e["shape"], e["dtype"]) for n, e in entries.items()})
    records = doc.get("tensors")
    if not isinstance(records, dict):
        raise InvalidSpecError("metadata has no 'tensors' table of checksums")
    tensors = {}
    for name, entry in entries.items():
        begin, end = (data_start + offset for offset in entry["data_offsets"])
        raw = memoryview(data)[begin:end]
        if verify_checksums:
            _verify_checksum(name, raw, records.get(name))
        array = np.frombuffer(raw, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
        tensors[name] = array
    check_model_content(spec, tensors)
    return Artifact(spec=spec, tensors=tensors, size_bytes=len(data))


# --- header parsing ------------------------------------------------------------------------------
def _parse_header(data: bytes) -> tuple[dict[str, Any], int]:
    if len(data) < 8:
        raise TruncatedArtifactError(
            f"file is {len(data)} bytes; a safetensors file starts with an 8-byte header length"
        )
    if len(data) > 8 and data[8:9] != b"{":
        raise NotSafetensorsError(
            "not a safetensors file: expected a JSON header ('{') after the 8-byte length prefix"
        )
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES:
        raise HeaderTooLargeError(
            f"header declares {length} bytes; the limit is {MAX_HEADER_BYTES} bytes"
        )
    if 8 + length > len(data):
        raise TruncatedArtifactError(
            f"header declares {length} bytes but the file ends after {len(data) - 8}"
        )
    header = _json_loads(data[8 : 8 + length], "header")
    if not isinstance(header, dict):
        raise NotSafetensorsError("not a safetensors file: header is not a JSON object")
    return header, 8 + length


def _json_loads(text: bytes | str, what: str) -> Any:
    """Parse ``text``; NotSafetensorsError if it is not JSON, HeaderTooDeepError if it nests
    deeper than MAX_JSON_DEPTH (the parser's RecursionError included)."""
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotSafetensorsError(
            f"not a safetensors file: {what} is not valid JSON ({exc})"
        ) from None
    except RecursionError:
        value = None
    else:
        if _json_depth(value) <= MAX_JSON_DEPTH:
            return value
    raise HeaderTooDeepError(
        f"{what} nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; a bnnserve "
        "artifact needs 5"
    )


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (0 for a scalar, 1 for ``[]``), level by level without
    recursion; stops counting past MAX_JSON_DEPTH."""
    depth, level = 0, [value]
    while depth <= MAX_JSON_DEPTH:
        containers = [node for node in level if isinstance(node, dict | list)]
        if not containers:
            break
        depth += 1
        level = [
            child
            for node in containers
            for child in (node.values() if isinstance(node, dict) else node)
        ]
    return depth


def _tensor_entries(header: dict[str, Any], data_size: int) -> dict[str, dict[str, Any]]:
    """Check each tensor entry's dtype, shape and offsets; offsets must tile the data section."""
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    spans = []
    for name, entry in entries.items():
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
            raise NotSafetensorsError(f"tensor {name!r}: entry needs dtype, shape and data_offsets")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES:
            raise TensorDtypeError(f"tensor {name!r}: unsupported dtype {entry['dtype']!r:.40}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not _is_int_list(shape, 0) or not _is_int_list(offsets, 2):
            raise NotSafetensorsError(f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offsets
        expected_size = math.prod(shape) * DTYPES[entry["dtype"]].itemsize  # exact, any size
        if end - begin != expected_size or begin > end:
            raise NotSafetensorsError(
                f"tensor {name!r}: data_offsets span {end - begin} bytes, "
                f"shape {shape} of {entry['dtype']} needs {expected_size}"
            )
        if end > data_size:
            raise TruncatedArtifactError(
                f"tensor {name!r} ends at byte {end} of the data section, "
                f"but the file holds only {data_size} data bytes"
            )
        entry["shape"] = tuple(shape)
        spans.append((begin, end, name))
    _check_spans_tile(sorted(spans), data_size)
    return entries


def _check_spans_tile(spans: list[tuple[int, int, str]], data_size: int) -> None:
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise NotSafetensorsError(
                f"tensor {name!r} starts at byte {begin}; expected {cursor} (no gaps or overlaps)"
            )
        cursor = end
    if cursor != data_size:
        raise NotSafetensorsError(
            f"tensors cover {cursor} data bytes but the file has {data_size}: trailing bytes"
        )


def _metadata_doc(header: dict[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise UnsupportedFormatVersionError(
            f"not a bnnserve artifact: no __metadata__[{METADATA_KEY!r}] entry in the header"
        )
    if not isinstance(metadata[METADATA_KEY], str):
        raise InvalidSpecError(f"metadata {METADATA_KEY!r} must be a JSON string")
    try:
        doc = _json_loads(metadata[METADATA_KEY], f"metadata {METADATA_KEY!r}")
    except NotSafetensorsError as exc:
        if isinstance(exc, HeaderTooDeepError):
            raise
        raise InvalidSpecError(f"metadata {METADATA_KEY!r} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidSpecError(f"metadata {METADATA_KEY!r} must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormatVersionError(
            f"format is {doc.get('format')!r}; expected {FORMAT_NAME!r}"
        )
    version = doc.get("format_version")
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        raise UnsupportedFormatVersionError(
            f"format_version {version!r} is not supported; this reader supports "
            f"{sorted(SUPPORTED_FORMAT_VERSIONS)}"
        )
    return doc


# --- checks shared by reader and writer ----------------------------------------------------------
def _check_tensor_set(
    expected: dict[str, TensorExpectation], actual: dict[str, tuple[tuple[int, ...], str]]
) -> None:
    for name, want in expected.items():
        if name not in actual:
            raise MissingTensorError(
                f"tensor {name!r} is missing; expected {want.dtype} of shape {list(want.shape)}"
            )
        shape, dtype = actual[name]
        if dtype != want.dtype:
            raise TensorDtypeError(f"tensor {name!r}: expected dtype {want.dtype}, got {dtype}")
        if tuple(shape) != want.shape:
            raise TensorShapeError(
                f"tensor {name!r}: expected shape {list(want.shape)}, got {list(shape)}"
            )
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise InvalidSpecError(f"unexpected tensors not used by the layer graph: {extra}")


def _tensor_record(want: TensorExpectation, array: np.ndarray) -> dict[str, Any]:
    record: dict[str, Any] = {"sha256": hashlib.sha256(_le_bytes(array)).hexdigest()}
    if want.logical_shape is not None:
        record["logical_shape"] = list(want.logical_shape)
        record["packed_axis"] = want.packed_axis
    return record


def _verify_checksum(name: str, raw: memoryview, record: Any) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise InvalidSpecError(f"tensor {name!r} has no sha256 in the metadata")
    actual = hashlib.sha256(raw).hexdigest()
    if actual != record["sha256"]:
        raise ChecksumMismatchError(
            f"tensor {name!r}: sha256 {actual[:16]}… does not match the recorded "
            f"{record['sha256'][:16]}…; the file is corrupt"
        )


def _tag_of(name: str, array: np.ndarray) -> str:
    tag = DTYPE_TAGS.get(
        array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    )
    if tag is None:
        raise TensorDtypeError(f"tensor {name!r}: dtype {array.dtype} cannot be stored")
    return tag


def _le_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _is_int_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and (length == 0 or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )
