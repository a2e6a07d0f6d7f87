"""Export a trained :class:`BinaryNet` to an artifact, and rebuild an eager module from one.

Tensors follow :mod:`model.spec`: a binary weight is ``pack_signs(sign(latent), axis=1)``
(sign(0) = +1), float tensors are float32, α is the ``scale`` tensor exactly as the eager layer
computes it (mean|W_latent| per output channel), and BatchNorm statistics are stored raw with
their eps. Reading goes through :func:`model.artifact.read_artifact`: no pickle, no torch.load.

The rebuilt module (:func:`module_from_artifact`) has ±1.0 weights in its binary layers and α
frozen to the stored value, and is in eval mode; its outputs equal the exported model's in eval
mode (binary activations exactly, logits to float rounding).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.artifact import Artifact, encode_artifact, read_artifact, write_artifact
from model.spec import InputSpec, ModelSpec
from training.architectures import BinaryNet, module_for_spec
from training.blocks import Shift
from training.layers import QuantizedLayer

_BATCHNORM_STATS = ("weight", "bias", "running_mean", "running_var")


def to_artifact_parts(
    model: BinaryNet,
    *,
    name: str,
    input_spec: InputSpec,
    labels: Sequence[str],
    training: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The validated :class:`ModelSpec` and the tensors of ``model`` (numpy, packed where binary)."""
    if tuple(input_spec.shape) != model.input_shape:
        raise ValueError(
            f"input_spec.shape {list(input_spec.shape)} differs from the model's input shape "
            f"{list(model.input_shape)}"
        )
    spec = ModelSpec(
        name=name,
        architecture=model.architecture,
        input=input_spec,
        labels=tuple(str(label) for label in labels),
        layers=model.spec_layers(),
        training=dict(training or {}),
        provenance=dict(provenance or {}),
    )
    spec.validate()
    tensors: dict[str, np.ndarray] = {}
    for layer_name, module in model.layers.named_children():
        tensors |= module_tensors(layer_name, module)
    return spec, tensors


def export_artifact(model: BinaryNet, path: str | os.PathLike[str], **parts: Any) -> int:
    """Write ``model`` as an artifact file at ``path``; returns its size in bytes.

    Keyword arguments are those of :func:`to_artifact_parts` (name, input_spec, labels,
    training, provenance).
    """
    spec, tensors = to_artifact_parts(model, **parts)
    return write_artifact(path, spec, tensors)


def encode_model(model: BinaryNet, **parts: Any) -> bytes:
    """Artifact bytes of ``model`` without touching the disk (for tests and size estimates)."""
    spec, tensors = to_artifact_parts(model, **parts)
    return encode_artifact(spec, tensors)


def module_from_artifact(source: str | os.PathLike[str] | Artifact) -> BinaryNet:
    """Rebuild the eager module an artifact describes, in eval mode.

    Binary latent weights become ±1.0 and α is frozen to its stored value (recomputing mean|W|
    from ±1 weights would give 1).
    """
    artifact = source if isinstance(source, Artifact) else read_artifact(source)
    spec = artifact.spec
    layers = []
    for layer, (shape, _) in zip(spec.layers, spec.layer_shapes(), strict=True):
        module = module_for_spec(layer, shape)
        load_module_tensors(layer.name, module, artifact.tensors)
        layers.append((layer.name, module))
    model = BinaryNet(
        layers,
        architecture=spec.architecture,
        input_shape=tuple(spec.input.shape),
        num_classes=len(spec.labels),
        inputs={layer.name: layer.inputs for layer in spec.layers if layer.inputs},
    )
    return model.eval()


def module_tensors(name: str, module: nn.Module) -> dict[str, np.ndarray]:
    """The artifact tensors of one layer module, keyed ``<name>.<suffix>``."""
    if isinstance(module, QuantizedLayer):
        return module.export_tensors(name)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return {f"{name}.{stat}": _float32(getattr(module, stat)) for stat in _BATCHNORM_STATS}
    if isinstance(module, Shift):
        return {f"{name}.shift": _float32(module.shift)}
    if isinstance(module, nn.PReLU):
        return {f"{name}.weight": _float32(module.weight)}
    return {}


def load_module_tensors(name: str, module: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Inverse of :func:`module_tensors`: copy stored tensors into ``module``."""
    if isinstance(module, QuantizedLayer):
        module.load_exported_tensors(name, tensors)
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        for stat in _BATCHNORM_STATS:
            _copy_into(getattr(module, stat), tensors[f"{name}.{stat}"])
    elif isinstance(module, Shift):
        _copy_into(module.shift, tensors[f"{name}.shift"])
    elif isinstance(module, nn.PReLU):
        _copy_into(module.weight, tensors[f"{name}.weight"])


def _float32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy().copy()


def _copy_into(target: torch.Tensor, stored: np.ndarray) -> None:
    with torch.no_grad():
        target.copy_(torch.from_numpy(np.array(stored, dtype=np.float32)))


def collect_provenance(**extra: Any) -> dict[str, Any]:
    """Where a model came from: code revision (``git rev-parse HEAD`` when available), torch and
    Python versions, plus ``extra`` (e.g. dataset, seed)."""
    return {
        "code_revision": code_revision(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        **extra,
    }


def code_revision(directory: str | os.PathLike[str] | None = None) -> str | None:
    """The git commit of ``directory`` (default: this package's checkout), or None outside git."""
    cwd = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None
