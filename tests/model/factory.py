"""Small artifacts built with numpy only, for the format, repository and engine tests."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from model.artifact import METADATA_KEY
from model.packing import pack_signs
from model.spec import BatchNorm, Conv2d, Dense, Flatten, InputSpec, MaxPool2d, ModelSpec


def tiny_spec() -> ModelSpec:
    """conv (full precision) → BN → binary conv (pad −1) → pool → BN → flatten → dense (fp out)."""
    return ModelSpec(
        name="tiny",
        architecture="cnn",
        input=InputSpec(shape=(1, 6, 6), value_range=(0.0, 16.0), integer_valued=True),
        labels=("a", "b", "c"),
        layers=(
            Conv2d("conv0", 1, 5, padding=(1, 1), pad_value=0.0),
            BatchNorm("bn0", 5),
            Conv2d(
                "conv1",
                5,
                70,
                pad_value=-1.0,
                input_quantizer="ste_sign",
                kernel_quantizer="ste_sign",
                bias=False,
                scale=True,
            ),
            MaxPool2d("pool1"),
            BatchNorm("bn1", 70),
            Flatten("flatten"),
            Dense("fc", 70 * 3 * 3, 3, input_quantizer="ste_sign"),
        ),
        training={"test_accuracy": 0.5},
        provenance={"dataset": "none", "seed": 0},
    )


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def floats(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {
        "conv0.weight": floats(5, 1, 3, 3),
        "conv0.bias": floats(5),
        "conv1.weight": pack_signs(floats(70, 5, 3, 3), axis=1),
        "conv1.scale": np.abs(floats(70)),
        "fc.weight": floats(3, 630),
        "fc.bias": floats(3),
    }
    for bn, size in (("bn0", 5), ("bn1", 70)):
        tensors |= {
            f"{bn}.weight": floats(size),
            f"{bn}.bias": floats(size),
            f"{bn}.running_mean": floats(size),
            f"{bn}.running_var": np.abs(floats(size)) + 0.1,
        }
    return tensors


def split_header(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def rewrite_metadata(data: bytes, edit) -> bytes:
    """Apply ``edit(doc)`` to the bnnserve metadata document and re-encode the file."""
    header, body = split_header(data)
    doc = json.loads(header["__metadata__"][METADATA_KEY])
    edit(doc)
    header["__metadata__"][METADATA_KEY] = json.dumps(doc)
    return join_header(header, body)


def replace_tensor(data: bytes, name: str, array: np.ndarray) -> bytes:
    """Overwrite tensor ``name``'s bytes with ``array`` (same shape and dtype) and record its new
    sha256, as a hostile publisher would: the file stays well-formed, its checksums valid."""
    header, body = split_header(data)
    begin, end = header[name]["data_offsets"]
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    assert len(raw) == end - begin, f"{name}: {len(raw)} bytes, the file holds {end - begin}"
    body = body[:begin] + raw + body[end:]
    doc = json.loads(header["__metadata__"][METADATA_KEY])
    doc["tensors"][name]["sha256"] = hashlib.sha256(raw).hexdigest()
    header["__metadata__"][METADATA_KEY] = json.dumps(doc)
    return join_header(header, body)
