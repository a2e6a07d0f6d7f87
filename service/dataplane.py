"""The protocol-agnostic data plane: find the model, check it is ready, validate the input
against its spec, run it through the batcher, and derive the requested outputs.

Routes of both protocols call into here with decoded :class:`~service.tensors.Tensor` objects
and encode what comes back; nothing here knows about HTTP or JSON.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.engine import check_finite_logits
from model.engine.floatmath import all_finite
from model.errors import BnnError, InvalidInputError
from model.spec import ModelSpec
from service.decoding import RequestDecoder
from service.errors import status_for
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry, ServedModel
from service.settings import Settings
from service.tensors import (
    ACCEPTED_INPUT_DATATYPES,
    DecodedRequest,
    EncodedRequest,
    InputExpectation,
    Tensor,
    check_output_names,
    derive_outputs,
    output_signatures,
)
from service.tracing import NO_TRACING, StageTimes, Tracing

SERVER_NAME = "bnnserve"
SERVER_VERSION = "0.1.0"
PLATFORM = "bnnserve_packed"
EXTENSIONS = ("binary_tensor_data", "model_repository")


def graph_metadata(spec: ModelSpec) -> list[dict[str, Any]]:
    """The layer graph as model metadata (a bnnserve extension of ``$metadata_model_response``):
    per layer, in the artifact's topological order, its name, kind, the names of its inputs
    resolved (``"@input"`` is the model input; a v1 chain's layers each name the previous) and
    its output shape with -1 for the batch axis. The last layer's output is the model's."""
    shapes = spec.graph_shapes()
    return [
        {"name": layer.name, "kind": layer.kind, "inputs": list(sources), "shape": [-1, *out]}
        for layer, sources, (_, out) in zip(spec.layers, spec.layer_inputs(), shapes, strict=True)
    ]


@dataclass(slots=True)  # plain, not frozen: made per request
class InferenceResult:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    labels: tuple[str, ...]
    request: DecodedRequest  # what was asked for (the protocol's own fields included)


class DataPlane:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        metrics: ServiceMetrics,
        tracing: Tracing = NO_TRACING,
    ):
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.decoder = RequestDecoder(settings.decode_offload_bytes)
        # id(input spec) → (the spec, its expectation), built once per served spec
        self._expectations: dict[int, tuple[Any, InputExpectation]] = {}
        self.tracing = tracing  # the protocols' decode/encode spans come from here too
        # Set on SIGTERM: readiness turns false so that balancers stop sending. Requests already
        # accepted are still served: uvicorn stops accepting connections by itself.
        self.draining = False

    # --- health and metadata -------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    def is_ready(self) -> bool:
        return not self.draining and self.registry.is_ready()

    async def model(self, name: str, version: int | None = None) -> ServedModel:
        return await self.registry.get_or_load(name, version)

    def model_metadata(self, served: ServedModel) -> dict[str, Any]:
        spec = served.input_spec
        classes = len(served.labels)
        return {
            "name": served.name,
            "versions": [str(v) for v in self.registry.versions(served.name)],
            "platform": PLATFORM,
            "inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.shape]}],
            "outputs": [
                {"name": name, "datatype": datatype, "shape": shape}
                for name, datatype, shape in output_signatures(served.logits_name, classes)
            ],
            "parameters": {
                "version": str(served.version),
                "labels": list(served.labels),
                "device": str(getattr(served.engine, "device", "")),
                "backend": str(getattr(served.engine, "backend", "")),
                "device_choice": device_choice(served.engine),
                "value_range": list(spec.value_range) if spec.value_range else None,
                "integer_valued": bool(getattr(spec, "integer_valued", False)),
                "accepted_input_datatypes": list(ACCEPTED_INPUT_DATATYPES),
                "format_version": served.engine.spec.effective_format_version,
                "architecture": served.engine.spec.architecture,
            },
            "graph": graph_metadata(served.engine.spec),
        }

    def model_config(self, served: ServedModel) -> dict[str, Any]:
        """Triton-style model configuration: limits and batching policy."""
        settings = self.settings
        metadata = self.model_metadata(served)
        return {
            "name": served.name,
            "version": str(served.version),
            "platform": PLATFORM,
            "backend": metadata["parameters"]["backend"],
            "max_batch_size": settings.max_batch_size,
            "input": [
                {"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"][1:]}
                for t in metadata["inputs"]
            ],
            "output": [
                {"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"][1:]}
                for t in metadata["outputs"]
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": round(settings.max_queue_delay_ms * 1000),
                "default_queue_policy": {
                    "max_queue_size": settings.max_queue_size,
                    "default_timeout_microseconds": round(settings.request_timeout_s * 1e6),
                },
            },
            "parameters": {
                "device": metadata["parameters"]["device"],
                "labels": metadata["parameters"]["labels"],
                "max_request_batch": settings.max_request_batch,
            },
        }

    # --- repository ----------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.registry.index(ready_only)

    async def load(self, name: str, version: int | None = None) -> ServedModel:
        return await self.registry.load(name, version)

    async def unload(self, name: str) -> None:
        await self.registry.unload(name)

    def list_models(self) -> list[dict[str, Any]]:
        """Each model with its published versions, the one serving by default, and states."""
        by_name: dict[str, dict[str, Any]] = {}
        for row in self.registry.index():
            model = by_name.setdefault(
                row["name"], {"name": row["name"], "versions": [], "serving_version": None}
            )
            model["versions"].append({k: row[k] for k in ("version", "state", "reason")})
        for name, model in by_name.items():
            with contextlib.suppress(BnnError):
                model["serving_version"] = str(self.registry.get(name).version)
        return list(by_name.values())

    def close(self) -> None:
        self.decoder.close()

    # --- inference -----------------------------------------------------------------------
    async def infer(
        self, name: str, version: int | None, encoded: EncodedRequest, protocol: str
    ) -> InferenceResult:
        """Decode ``encoded`` against the model's input (declared names, datatypes, shapes and
        the batch limit are checked before any data is decoded; large bodies are decoded off
        the event loop), batch it, and derive the outputs it asks for."""
        started = time.perf_counter()
        model_label, version_label, status = name, "", 500
        try:
            served = await self.registry.get_or_load(name, version)
            version_label = str(served.version)
            spec = served.input_spec
            expected = self._expectation(spec)
            if self.tracing.enabled:
                with self.tracing.span("decode"):
                    request = await self.decoder.decode(encoded, expected)
            elif encoded.json_bytes <= self.decoder.offload_bytes:  # on the loop: no hop at all
                request = encoded.decode(expected)
            else:
                request = await self.decoder.decode(encoded, expected)
            # A hot swap may have happened while the body was decoded off the loop; from here
            # there is no suspension until the request is queued on the batcher, so it can
            # never be handed a retired batcher.
            served = self.registry.get(name, version)
            if served.input_spec is not spec:
                spec, expected = served.input_spec, self._expectation(served.input_spec)
            version_label = str(served.version)
            rows = conform_input(request.inputs, spec, expected, request.checked_against)
            names = check_output_names(request.outputs, served.logits_name)  # before the engine
            if self.tracing.enabled:
                times = StageTimes()
                logits = await served.batcher.submit(rows, times)  # (n, classes) float32
                self.tracing.record_batch(times, served.name, version_label)
            else:
                logits = await served.batcher.submit(rows)
            check_finite_logits(logits, spec)  # per request, not per batch
            tensors = derive_outputs(names, logits, served.labels, served.logits_name)
            status = 200
            self.metrics.inference_latency.labels(name, version_label).observe(
                time.perf_counter() - started
            )
            return InferenceResult(served.name, version_label, tensors, served.labels, request)
        except Exception as exc:
            status = status_for(exc)
            if not self.registry.knows(name):
                model_label = "<unknown>"  # arbitrary names must not create metric series
            raise
        finally:
            self.metrics.inference_requests.labels(
                model_label, version_label, protocol, str(status)
            ).inc()

    def _expectation(self, spec: Any) -> InputExpectation:
        """:func:`expectation` of input ``spec``, kept for the next request (one per spec)."""
        known = self._expectations.get(id(spec))
        if known is None or known[0] is not spec:
            if len(self._expectations) >= 64:  # specs of unloaded versions: start afresh
                self._expectations.clear()
            known = self._expectations[id(spec)] = (
                spec,
                expectation(spec, self.settings.max_request_batch),
            )
        return known[1]


def expectation(spec: Any, max_rows: int) -> InputExpectation:
    """What a model with input ``spec`` takes, for checking a request before decoding it."""
    return InputExpectation(spec.name, tuple(spec.shape), spec.datatype, max_rows)


def conform_input(
    inputs: Sequence[Tensor],
    spec: Any,
    expected: InputExpectation,
    checked: InputExpectation | None = None,
) -> np.ndarray:
    """The one input tensor as C-contiguous float32 (batch, *spec.shape) — what the engine's
    ``predict_rows`` takes — or InvalidInputError naming what is wrong: the name, the shape
    (per instance, or flattened), the datatype, the batch size
    (``expected``: :func:`expectation` of ``spec``; not checked again when the decoder
    ``checked`` the inputs against that same one), or NaN/infinity in an instance."""
    if checked is not expected:
        expected.check([(t.name, t.datatype, t.array.shape) for t in inputs])
    tensor = inputs[0]
    batch = tensor.array.shape[0]
    rows = np.ascontiguousarray(tensor.array.reshape(batch, *spec.shape), dtype=np.float32)
    if not all_finite(rows):  # one check in the common case; per row on failure
        row = int(np.argmin(np.isfinite(rows.reshape(batch, -1)).all(axis=1)))
        raise InvalidInputError(f"input {spec.name!r}: instance {row} contains NaN or infinity")
    return rows


def device_choice(engine: Any) -> dict[str, Any] | None:
    """How BNN_DEVICE=auto chose the engine's device, with the timings (None when named)."""
    choice = getattr(engine, "device_choice", None)
    return None if choice is None else choice.as_metadata()
