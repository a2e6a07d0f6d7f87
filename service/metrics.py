"""Prometheus metrics, in a ``CollectorRegistry`` of each app's own (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.batcher import BatchStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _CachedLabels:
    """A metric whose labelled children are looked up in a dict: ``Metric.labels`` takes a lock
    and builds keys on every call, several microseconds per request on the hot path."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class ServiceMetrics:
    """Every metric the service exports; names are prefixed ``bnn_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._ready: set[tuple[str, str]] = set()
        registry = self.registry
        self.inference_requests = _CachedLabels(
            Counter(
                "bnn_inference_requests",
                "Inference requests by model, version, protocol and HTTP status",
                ["model", "version", "protocol", "status"],
                registry=registry,
            )
        )
        self.inference_latency = _CachedLabels(
            Histogram(
                "bnn_inference_request_duration_seconds",
                "Time from decoded request to model outputs (queue + engine), by model",
                ["model", "version"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            )
        )
        self.queue_time = _CachedLabels(
            Histogram(
                "bnn_batch_queue_seconds",
                "Time a request waited in the batcher's queue before its engine call",
                ["model", "version"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            )
        )
        self.batch_size = _CachedLabels(
            Histogram(
                "bnn_batch_size_rows",
                "Rows per engine call after dynamic batching",
                ["model", "version"],
                buckets=_BATCH_BUCKETS,
                registry=registry,
            )
        )
        self.engine_time = _CachedLabels(
            Histogram(
                "bnn_engine_seconds",
                "Duration of one engine call (one batch)",
                ["model", "version"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            )
        )
        self.models_loaded = Gauge(
            "bnn_models_loaded", "Model versions loaded and serving", registry=registry
        )
        self.model_ready = Gauge(
            "bnn_model_ready",
            "1 while a model version is loaded and ready",
            ["model", "version"],
            registry=registry,
        )
        self.model_load_failures = Counter(
            "bnn_model_load_failures",
            "Versions refused at load (corrupt, invalid, device unavailable)",
            ["model"],
            registry=registry,
        )
        self.http_requests = _CachedLabels(
            Counter(
                "bnn_http_requests",
                "HTTP requests by method, route template and status",
                ["method", "route", "status"],
                registry=registry,
            )
        )

    def observe_batch(self, model: str, version: str, stats: BatchStats) -> None:
        self.batch_size.labels(model, version).observe(stats.rows)
        self.engine_time.labels(model, version).observe(stats.compute_seconds)
        queue_time = self.queue_time.labels(model, version)
        for seconds in stats.queue_seconds:
            queue_time.observe(seconds)

    def set_model_ready(self, model: str, version: str, ready: bool) -> None:
        key = (model, version)
        if ready:
            self.model_ready.labels(model, version).set(1)
            self._ready.add(key)
        elif key in self._ready:
            self.model_ready.remove(model, version)
            self._ready.discard(key)
        self.models_loaded.set(len(self._ready))

    def render(self) -> bytes:
        return generate_latest(self.registry)
