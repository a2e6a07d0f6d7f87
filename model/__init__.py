"""bnnserve's model package: the artifact format and the inference engine.

Importing this package (the CPU path) never imports torch or fastapi. The engine, which pulls in
numba, is imported on first use of :func:`load_model`; the torch backend only when a torch
device is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model.artifact import (
    ARTIFACT_FILENAME,
    Artifact,
    decode_artifact,
    encode_artifact,
    read_artifact,
    write_artifact,
)
from model.packing import pack_signs, unpack_signs, words_for
from model.spec import BatchNorm, Conv2d, Dense, Flatten, InputSpec, MaxPool2d, ModelSpec

if TYPE_CHECKING:
    from model.engine import CompiledModel

__all__ = [
    "ARTIFACT_FILENAME",
    "Artifact",
    "BatchNorm",
    "Conv2d",
    "Dense",
    "Flatten",
    "InputSpec",
    "MaxPool2d",
    "ModelSpec",
    "decode_artifact",
    "encode_artifact",
    "load_model",
    "pack_signs",
    "read_artifact",
    "unpack_signs",
    "words_for",
    "write_artifact",
]


def load_model(path: Any, device: str = "cpu", **options: Any) -> CompiledModel:
    """Load an artifact and compile it for ``device`` ("cpu", "cuda", "cuda:N" or "auto")."""
    from model.engine import load_model as _load_model

    return _load_model(path, device=device, **options)
