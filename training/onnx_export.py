"""Export a bnnserve model to ONNX, and check the export against the bnnserve engine.

Two entry points share one path:

* :func:`export_onnx` turns any training module (:class:`BinaryNet`) into an ONNX model;
* :func:`export_artifact_to_onnx` does the same from a published artifact alone: it rebuilds the
  eager module with :func:`training.export.module_from_artifact` (±1 weights unpacked from the
  packed signs, α and BatchNorm statistics as stored) and exports that.

The exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False,
autograd_inlining=False)``), which emits each autograd Function's ``symbolic`` (:mod:`training.quantizers`,
:mod:`training.functional`) instead of tracing its forward. Before tracing, a copy of the module
is *frozen*: every binary weight is replaced by q_k(W) ∈ {−1, +1} and its kernel quantizer by the
identity, α is fixed to mean|W_latent|, so the graph holds ±1 weight initializers and binarizes
activations only. The result, in standard ONNX ops (opset ≥ 17, batch axis dynamic)::

    sign(x), sign(0) = +1    Where(GreaterOrEqual(x, 0), 1, −1)
    step 1{x > 0}            Cast(Greater(x, 0), FLOAT)          (stochastic_binary, eval form)
    dense                    Gemm(x, W±1, b, transB=1) [· α + b when scaled]
    conv2d                   Pad(x, pad_value) → Conv(W±1) [· α + b]
    batchnorm                BatchNormalization (or folded into the preceding Conv)
    maxpool2d, flatten       MaxPool, Flatten
    avgpool2d                AveragePool
    global_avgpool2d         ReduceMean(axes=[2, 3])
    shift                    Add(x, shift reshaped to (1, C, 1, 1))
    prelu                    PRelu (slope reshaped to (C, 1, 1))
    add, concat              Add (left to right), Concat(axis=1)

The graph is float32 throughout: other runtimes run it as a float network, not 1-bit. A v2
graph's named inputs become the ONNX graph's edges (tracing follows the module's forward).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.artifact import Artifact, read_artifact
from model.errors import BnnError
from model.spec import Layer, ModelSpec
from training.architectures import BinaryNet
from training.export import module_from_artifact
from training.layers import quantized_layers

OPSET = 18
MIN_OPSET = 17
BATCH_AXIS = "batch"
# Spec layer kinds whose modules export to standard ONNX ops (each covered by tests/training).
EXPORTABLE_KINDS = frozenset(
    {"dense", "conv2d", "batchnorm", "maxpool2d", "flatten"}
    | {"avgpool2d", "global_avgpool2d", "shift", "prelu", "add", "concat"}  # format v2
)
METADATA_PREFIX = "bnnserve."
INSTALL_HINT = "pip install bnnserve[onnx]"
TRITON_VERSION_DIR = "1"
TRITON_LABELS_FILENAME = "labels.txt"


class OnnxExportError(BnnError):
    """A model cannot be exported to ONNX, or the export cannot be written; the subclass says why."""


class OnnxDependencyError(OnnxExportError):
    """``onnx`` (or ``onnxruntime``, for the check) is not installed."""


class UnsupportedLayerError(OnnxExportError):
    """A layer's kind has no ONNX export."""


class OutputPathError(OnnxExportError):
    """The ONNX file or the Triton entry cannot be written where asked."""


# --- export --------------------------------------------------------------------------------------
def check_exportable(layers: Iterable[Layer]) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first layer whose kind has no export."""
    for layer in layers:
        if layer.kind not in EXPORTABLE_KINDS:
            raise UnsupportedLayerError(
                f"layer {layer.name!r}: the ONNX exporter does not know layer kind "
                f"{layer.kind!r}; expected one of: {', '.join(sorted(EXPORTABLE_KINDS))}"
            )


def frozen_for_inference(model: BinaryNet) -> BinaryNet:
    """A copy of ``model`` in eval mode whose binary weights are the constants q_k(W) = ±1.

    α is fixed first (mean|W_latent|, or the artifact's stored value), since recomputing it from
    ±1 weights would give 1; then q_k becomes the identity, which is exact on ±1 values.
    """
    frozen = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer in quantized_layers(frozen):
            if not layer.is_binary:
                continue
            if layer.scale:
                layer.frozen_scale = layer.channel_scale().detach().clone()
            layer.weight.copy_(layer.quantized_weight())
            layer.kernel_quantizer = nn.Identity()
    return frozen


def export_onnx(
    model: BinaryNet,
    *,
    input_name: str = "input",
    output_name: str = "logits",
    opset: int = OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (see the module doc for the ops), its batch axis
    dynamic, input and output named as the service names them, ``metadata`` in its
    ``metadata_props``."""
    onnx = import_onnx()
    if opset < MIN_OPSET:
        raise OnnxExportError(f"opset {opset} is too old; expected {MIN_OPSET} or later")
    try:
        check_exportable(model.spec_layers())
    except TypeError as exc:  # a module with no spec layer kind at all
        raise UnsupportedLayerError(f"{exc}; the ONNX exporter cannot export it") from None
    frozen = frozen_for_inference(model)
    example = torch.zeros((2, *model.input_shape))  # batch 2: nothing specializes on batch 1
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation on every call; see docs/onnx.md.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # Shape checks in Python read as constants while tracing: the traced graph is fixed, so
        # that is intended. Pad's reversed pads list (a Slice with step −1) is not folded at
        # export; ONNX Runtime folds it when it loads the model.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        try:
            torch.onnx.export(
                frozen,
                (example,),
                buffer,
                dynamo=False,
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                dynamic_axes={input_name: {0: BATCH_AXIS}, output_name: {0: BATCH_AXIS}},
                do_constant_folding=True,
                # Emit each autograd Function's symbolic, never a trace of its forward: a
                # Function without one fails here rather than exporting unreviewed ops.
                autograd_inlining=False,
            )
        except RuntimeError as exc:  # e.g. "Couldn't export Python operator <Function>"
            message = str(exc).strip().splitlines()[0]
            raise OnnxExportError(f"torch.onnx.export failed: {message}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def onnx_metadata(spec: ModelSpec, artifact_sha256: str, version: int | None) -> dict[str, str]:
    """``metadata_props`` of an export: labels, input spec (shape, value range), the source
    artifact's sha256, the bnnserve version; every value a string (JSON where structured)."""
    entries = {
        "model": spec.name,
        "model_version": "" if version is None else str(version),
        "architecture": spec.architecture,
        "labels": json.dumps(list(spec.labels)),
        "input": json.dumps(asdict(spec.input)),
        "output": json.dumps({"name": spec.output_name, "shape": [len(spec.labels)]}),
        "source_artifact_sha256": artifact_sha256,
        "bnnserve_version": bnnserve_version(),
    }
    return {METADATA_PREFIX + key: value for key, value in entries.items()}


def export_artifact_to_onnx(
    artifact_path: str | os.PathLike[str], *, version: int | None = None, opset: int = OPSET
) -> tuple[Artifact, Any]:
    """(artifact, ``onnx.ModelProto``) for the artifact file at ``artifact_path``: no training
    state needed, only the file."""
    import_onnx()
    artifact = read_artifact(artifact_path)  # named errors for a missing or malformed file
    data = Path(artifact_path).read_bytes()
    spec = artifact.spec
    check_exportable(spec.layers)
    proto = export_onnx(
        module_from_artifact(artifact),
        input_name=spec.input.name,
        output_name=spec.output_name,
        opset=opset,
        metadata=onnx_metadata(spec, hashlib.sha256(data).hexdigest(), version),
    )
    return artifact, proto


def check_onnx(proto: Any) -> None:
    """``onnx.checker.check_model`` with full shape inference; OnnxExportError if it fails."""
    onnx = import_onnx()
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(f"the exported graph fails onnx.checker: {exc}") from None


# --- files ---------------------------------------------------------------------------------------
def write_bytes(path: str | os.PathLike[str], data: bytes) -> int:
    """Write ``data`` to ``path`` through a temporary file and a rename; OutputPathError naming
    the path and the reason when that is not possible."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"output {path} is a directory; expected a file path like model.onnx")
    staging = path.with_name(f".{path.name}.partial")
    try:
        staging.write_bytes(data)
        os.replace(staging, path)
    except OSError as exc:
        if staging.parent.is_dir():
            staging.unlink(missing_ok=True)
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from None
    return len(data)


def triton_config(spec: ModelSpec, *, max_batch_size: int) -> str:
    """Triton's ``config.pbtxt`` (protobuf text of ``inference.ModelConfig``) for the
    onnxruntime backend: dims without the batch axis (Triton adds it up to ``max_batch_size``),
    labels for Triton's classification extension in ``labels.txt``."""
    dims = ", ".join(str(d) for d in spec.input.shape)
    return (
        f"name: {json.dumps(spec.name)}\n"
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        f"  {{ name: {json.dumps(spec.input.name)}, data_type: TYPE_FP32, dims: [ {dims} ] }}\n"
        "]\n"
        "output [\n"
        f"  {{ name: {json.dumps(spec.output_name)}, data_type: TYPE_FP32, "
        f"dims: [ {len(spec.labels)} ], label_filename: {json.dumps(TRITON_LABELS_FILENAME)} }}\n"
        "]\n"
        "dynamic_batching { }\n"
    )


def write_triton_entry(
    repo: str | os.PathLike[str], spec: ModelSpec, onnx_bytes: bytes, *, max_batch_size: int
) -> Path:
    """``REPO/NAME/1/model.onnx``, ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/labels.txt``;
    returns the model's directory."""
    model_dir = Path(repo) / spec.name
    try:
        (model_dir / TRITON_VERSION_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create {model_dir}: {exc.strerror or exc}") from None
    write_bytes(model_dir / TRITON_VERSION_DIR / "model.onnx", onnx_bytes)
    write_bytes(
        model_dir / "config.pbtxt", triton_config(spec, max_batch_size=max_batch_size).encode()
    )
    write_bytes(
        model_dir / TRITON_LABELS_FILENAME, "".join(f"{label}\n" for label in spec.labels).encode()
    )
    return model_dir


# --- verification --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Agreement:
    """ONNX Runtime against the bnnserve engine on the same inputs."""

    samples: int
    same_class: int
    max_relative_error: float  # max |onnx − engine| / max|engine| per row

    @property
    def passed(self) -> bool:
        return self.same_class == self.samples and self.max_relative_error <= 1e-4


def onnx_runtime_session(onnx_bytes: bytes) -> Any:
    """An ONNX Runtime CPU session on the serialized model."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxDependencyError(
            f"running the exported model needs onnxruntime; install it with: {INSTALL_HINT}"
        ) from None
    return onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def compare_with_engine(
    onnx_bytes: bytes, artifact_path: str | os.PathLike[str], x: np.ndarray
) -> Agreement:
    """Run ``x`` through ONNX Runtime and through :func:`model.engine.load_model` on the same
    artifact; count equal argmax classes and the largest logit error relative to each row's
    largest |logit|."""
    from model.engine import load_model

    x = np.ascontiguousarray(x, dtype=np.float32)
    session = onnx_runtime_session(onnx_bytes)
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x})
    engine_logits = load_model(artifact_path).predict(x)
    scale = np.maximum(np.abs(engine_logits).max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    return Agreement(
        samples=len(x),
        same_class=int((onnx_logits.argmax(1) == engine_logits.argmax(1)).sum()),
        max_relative_error=float((np.abs(onnx_logits - engine_logits) / scale).max()),
    )


def random_inputs(spec: ModelSpec, count: int, seed: int = 0) -> np.ndarray:
    """``count`` inputs drawn uniformly from the spec's value range (integers where the model was
    trained on integers; [0, 1] when no range is recorded)."""
    low, high = spec.input.value_range or (0.0, 1.0)
    rng = np.random.default_rng(seed)
    shape = (count, *spec.input.shape)
    if spec.input.integer_valued:
        return rng.integers(int(low), int(high) + 1, size=shape).astype(np.float32)
    return rng.uniform(low, high, size=shape).astype(np.float32)


# --- the command ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportReport:
    """What ``bnn-train export-onnx`` did: the summary it prints."""

    source: Path
    out: Path | None
    triton_dir: Path | None
    opset: int
    nodes: int
    onnx_bytes: int
    artifact_bytes: int
    agreement: Agreement | None

    def to_text(self) -> str:
        lines = [f"exported {self.source}"]
        lines += [f"  wrote {path}" for path in (self.out, self.triton_dir) if path is not None]
        lines.append(
            f"  opset {self.opset}, {self.nodes} nodes, {self.onnx_bytes:,} bytes "
            f"(artifact {self.artifact_bytes:,} bytes, {self.onnx_bytes / self.artifact_bytes:.1f}x)"
        )
        lines.append("  onnx.checker: passed")
        a = self.agreement
        if a is None:
            lines.append("  ONNX Runtime vs bnnserve engine: not run (--verify 0)")
        else:
            lines.append(
                f"  ONNX Runtime vs bnnserve engine on {a.samples} random inputs: passed "
                f"(same class {a.same_class}/{a.samples}, largest relative logit error "
                f"{a.max_relative_error:.2e}, limit 1e-04)"
            )
        return "\n".join(lines)


def export_published(
    artifact_path: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None,
    triton_repo: str | os.PathLike[str] | None = None,
    version: int | None = None,
    opset: int = OPSET,
    max_batch_size: int = 64,
    verify_samples: int = 256,
) -> ExportReport:
    """Export the artifact at ``artifact_path`` to ``out`` and/or a Triton entry under
    ``triton_repo``, check it with onnx.checker and, unless ``verify_samples`` is 0, compare
    ONNX Runtime with the bnnserve engine on that many random inputs (nothing is written when
    they disagree)."""
    if out is None and triton_repo is None:
        raise OutputPathError("nothing to write: give an output file, a Triton repository or both")
    artifact, proto = export_artifact_to_onnx(artifact_path, version=version, opset=opset)
    check_onnx(proto)
    data = proto.SerializeToString()
    agreement = None
    if verify_samples:
        x = random_inputs(artifact.spec, verify_samples)
        agreement = compare_with_engine(data, artifact_path, x)
        if not agreement.passed:  # write nothing that disagrees with the engine
            raise OnnxExportError(
                f"ONNX Runtime disagrees with the bnnserve engine: same class on "
                f"{agreement.same_class}/{agreement.samples} random inputs, largest relative "
                f"logit error {agreement.max_relative_error:.2e}; expected all and ≤ 1e-4"
            )
    if out is not None:
        write_bytes(out, data)
    triton_dir = None
    if triton_repo is not None:
        triton_dir = write_triton_entry(
            triton_repo, artifact.spec, data, max_batch_size=max_batch_size
        )
    return ExportReport(
        source=Path(artifact_path),
        out=None if out is None else Path(out),
        triton_dir=triton_dir,
        opset=opset,
        nodes=len(proto.graph.node),
        onnx_bytes=len(data),
        artifact_bytes=artifact.size_bytes,
        agreement=agreement,
    )


# --- helpers -------------------------------------------------------------------------------------
def import_onnx() -> Any:
    """The ``onnx`` package, or OnnxDependencyError saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise OnnxDependencyError(
            f"ONNX export needs the onnx package; install it with: {INSTALL_HINT}"
        ) from None
    return onnx


def bnnserve_version() -> str:
    """The installed bnnserve distribution's version, or "unknown" when running from a tree."""
    try:
        return package_metadata.version("bnnserve")
    except package_metadata.PackageNotFoundError:
        return "unknown"
