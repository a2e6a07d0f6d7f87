"""OpenTelemetry traces of a request's stages: request → decode → queue wait → engine → encode.

Every span carries the request id (``bnn.request_id``, the same id as the logs and the
``X-Request-ID`` header). The request span is the server span: it continues the caller's trace
from a W3C ``traceparent`` header (or gRPC metadata) and is named after the route template
(``POST /v2/models/{name}/infer``, ``grpc ModelInfer``). Queue wait and engine are recorded
after the batch ran, with the times the batcher noted (:class:`StageTimes`), because the batch
runs in the batcher's own task, outside the request's context.

Off by default, and then free: the hot paths ask :attr:`Tracing.enabled` once, or call a stage
through :meth:`Tracing.run` (one plain call when off); nothing calls OpenTelemetry. :func:`tracing_from_environment` turns it on when
the ``otel`` extra is installed and ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or
``console``); the SDK itself reads the other standard variables (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_BSP_*`` ...). These are the OpenTelemetry standard's variables, read once at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from service.logs import request_id_var

log = logging.getLogger("service.tracing")
_NOTHING = contextlib.nullcontext()
T = TypeVar("T")
EXPORTERS = ("otlp", "console")


@dataclass(slots=True)
class StageTimes:
    """When a request's rows were queued, their engine call started and finished (ns since the
    epoch, as OpenTelemetry takes them), and the rows of that call; filled by the batcher."""

    queued_ns: int = 0
    started_ns: int = 0
    finished_ns: int = 0
    batch_rows: int = 0


class Tracing:
    """Spans from ``tracer`` (an OpenTelemetry tracer), or none at all when it is None."""

    def __init__(self, tracer: Any | None = None, provider: Any | None = None) -> None:
        self.tracer = tracer
        self.provider = provider  # flushed and shut down with the app
        self.enabled = tracer is not None

    def shutdown(self) -> None:
        """Export what is buffered and stop (the app's shutdown)."""
        if self.provider is not None:
            self.provider.shutdown()

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """A child span of the current one, with the request id; a no-op when off."""
        if self.tracer is None:
            return _NOTHING
        return self.tracer.start_as_current_span(name, attributes=self._attributes(attributes))

    def run(self, name: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)``, inside span ``name`` when on: the stages' form, one
        plain call when off."""
        if self.tracer is None:
            return function(*args, **kwargs)
        with self.span(name):
            return function(*args, **kwargs)

    def server_span(
        self, name: str, headers: Iterable[tuple[Any, Any]], **attributes: Any
    ) -> AbstractContextManager[Any]:
        """The request's span (None inside when off), continuing the trace of the
        ``traceparent`` among ``headers`` (ASGI byte pairs or gRPC metadata)."""
        if self.tracer is None:
            return _NOTHING
        return self._server_span(name, headers, attributes)

    @contextlib.contextmanager
    def _server_span(
        self, name: str, headers: Iterable[tuple[Any, Any]], attributes: dict[str, Any]
    ) -> Iterator[Any]:
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        carrier = {_text(key).lower(): _text(value) for key, value in headers}
        with self.tracer.start_as_current_span(
            name,
            context=extract(carrier),
            kind=SpanKind.SERVER,
            attributes=self._attributes(attributes),
        ) as span:
            yield span

    def record_batch(self, times: StageTimes | None, model: str, version: str) -> None:
        """The queue-wait and engine spans of one request, from the batcher's times."""
        if self.tracer is None or times is None or not times.finished_ns:
            return
        attributes = self._attributes({"bnn.model": model, "bnn.model_version": version})
        queue = self.tracer.start_span(
            "queue wait", start_time=times.queued_ns, attributes=attributes
        )
        queue.end(end_time=times.started_ns)
        engine = self.tracer.start_span(
            "engine",
            start_time=times.started_ns,
            attributes=attributes | {"bnn.batch_rows": times.batch_rows},
        )
        engine.end(end_time=times.finished_ns)

    @staticmethod
    def _attributes(attributes: dict[str, Any]) -> dict[str, Any]:
        request_id = request_id_var.get()
        if request_id is not None:
            attributes["bnn.request_id"] = request_id
        return attributes


NO_TRACING = Tracing()


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def tracing_from_environment() -> Tracing:
    """Tracing as the standard ``OTEL_*`` variables configure it (see the module docstring);
    :data:`NO_TRACING` when they ask for none or the ``otel`` extra is not installed."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    disabled = os.environ.get("OTEL_SDK_DISABLED", "false").strip().lower() == "true"
    if disabled or exporter_name in ("", "none"):
        return NO_TRACING
    if exporter_name not in EXPORTERS:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r}: expected one of {', '.join(EXPORTERS)} "
            "or none"
        )
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER is set but the 'otel' extra is not installed")
        return NO_TRACING
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    resource = Resource.create()
    if resource.attributes.get("service.name", "").startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "bnnserve"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider.get_tracer("bnnserve"), provider)
