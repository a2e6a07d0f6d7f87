"""Prometheus metrics, in a ``CollectorRegistry`` of each app's own (tests build many apps).

The per-request series (request counts, latency, queue time, batch size, engine time) are
updated on the event loop, several times per request. They are kept by :class:`LoopCounter`
and :class:`LoopHistogram`: plain numbers per label set, found in a dict, with the bucket found
by bisection — no lock per update, which is what prometheus-client's own metrics take (~1 µs
per observation; together ~8 % of a small model's request). The registry exports them in the
standard text format through their ``collect``; the other metrics are prometheus-client's.

With several server processes (``BNN_WORKERS`` > 1) a scrape reaches one of them, yet must
report the totals of all. Then every metric is prometheus-client's own in its multiprocess
mode: each process writes its values to memory-mapped files in ``BNN_METRICS_DIR`` (which
``PROMETHEUS_MULTIPROC_DIR`` names to prometheus-client, set before it is imported), and a
scrape sums the counters and histograms of every process, live or gone, and shows the gauges
of each live process with a ``pid`` label (``bnn_model_ready{..., pid}``: which worker serves
which version; a worker's gauges go as it stops, and a retired version's read 0).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from service.batcher import BatchStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _CounterSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramSeries:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value ≤ le
        self.sum += value


class _LoopMetric:
    """Series by label values, for one thread's updates (the event loop's)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._series: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            series = self._series[values] = self._new_series()
        return series

    def _new_series(self) -> object:
        raise NotImplementedError

    def _items(self) -> list[tuple[tuple[str, ...], object]]:
        return list(self._series.items())  # a snapshot: a scrape may overlap new label sets


class LoopCounter(_LoopMetric):
    """A labelled counter (exported as ``<name>_total``) updated from the event loop only."""

    def _new_series(self) -> _CounterSeries:
        return _CounterSeries()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self._items():
            family.add_metric(values, series.value)
        yield family


class LoopHistogram(_LoopMetric):
    """A labelled histogram (``_bucket``, ``_count``, ``_sum``) updated from the event loop
    only; ``buckets`` are the upper bounds, +Inf added."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = [float(b) for b in buckets]

    def _new_series(self) -> _HistogramSeries:
        return _HistogramSeries(self.bounds)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for values, series in self._items():
            cumulative, buckets = 0, []
            for le, count in zip(les, list(series.counts), strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, sum_value=series.sum)
        yield family


class MultiprocessMetricsError(RuntimeError):
    """Shared metrics were asked for, but prometheus-client was imported without
    ``PROMETHEUS_MULTIPROC_DIR`` (its values would stay in this process)."""


class ServiceMetrics:
    """Every metric the service exports; names are prefixed ``bnn_``. With ``shared_dir`` the
    metrics are shared between processes through files there (see the module docstring)."""

    def __init__(self, shared_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared_dir = shared_dir
        self._ready: set[tuple[str, str]] = set()
        if shared_dir is not None and prometheus_values.ValueClass is prometheus_values.MutexValue:
            raise MultiprocessMetricsError(
                f"metrics shared in {shared_dir} need PROMETHEUS_MULTIPROC_DIR set before "
                "prometheus_client is imported"
            )
        # Shared metrics are collected from the files, not from a registry of this process.
        registry = self.registry if shared_dir is None else None
        counter, histogram = self._per_request_types()
        self.inference_requests = counter(
            "bnn_inference_requests",
            "Inference requests by model, version, protocol and HTTP status",
            ["model", "version", "protocol", "status"],
        )
        self.inference_latency = histogram(
            "bnn_inference_request_duration_seconds",
            "Time from decoded request to model outputs (queue + engine), by model",
            ["model", "version"],
            _LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "bnn_batch_queue_seconds",
            "Time a request waited in the batcher's queue before its engine call",
            ["model", "version"],
            _LATENCY_BUCKETS,
        )
        self.batch_size = histogram(
            "bnn_batch_size_rows",
            "Rows per engine call after dynamic batching",
            ["model", "version"],
            _BATCH_BUCKETS,
        )
        self.engine_time = histogram(
            "bnn_engine_seconds",
            "Duration of one engine call (one batch)",
            ["model", "version"],
            _LATENCY_BUCKETS,
        )
        self.models_loaded = Gauge(
            "bnn_models_loaded",
            "Model versions loaded and serving",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.model_ready = Gauge(
            "bnn_model_ready",
            "1 while a model version is loaded and ready",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.model_load_failures = Counter(
            "bnn_model_load_failures",
            "Versions refused at load (corrupt, invalid, device unavailable)",
            ["model"],
            registry=registry,
        )
        self.http_requests = counter(
            "bnn_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
        )
        self.grpc_requests = counter(
            "bnn_grpc_requests",
            "gRPC calls by method and status code",
            ["method", "code"],
        )
        if shared_dir is None:
            for metric in (
                self.grpc_requests,
                self.inference_requests,
                self.inference_latency,
                self.queue_time,
                self.batch_size,
                self.engine_time,
                self.http_requests,
            ):
                self.registry.register(metric)

    def _per_request_types(self) -> tuple[type, type]:
        """The event-loop series in one process; prometheus-client's (file-backed) when shared."""
        if self.shared_dir is None:
            return LoopCounter, LoopHistogram
        return _shared_counter, _shared_histogram

    def observe_batch(self, model: str, version: str, stats: BatchStats) -> None:
        self.batch_observer(model, version)(stats)

    def batch_observer(self, model: str, version: str) -> Callable[[BatchStats], None]:
        """What records each batch of ``model`` ``version``: its series found once, for the
        batcher's every call."""
        batch_size = self.batch_size.labels(model, version)
        engine_time = self.engine_time.labels(model, version)
        queue_time = self.queue_time.labels(model, version)

        def observe(stats: BatchStats) -> None:
            batch_size.observe(stats.rows)
            engine_time.observe(stats.compute_seconds)
            for seconds in stats.queue_seconds:
                queue_time.observe(seconds)

        return observe

    def set_model_ready(self, model: str, version: str, ready: bool) -> None:
        key = (model, version)
        if ready:
            self.model_ready.labels(model, version).set(1)
            self._ready.add(key)
        elif key in self._ready and self.shared_dir is not None:
            self.model_ready.labels(model, version).set(0)  # a shared file keeps its series
            self._ready.discard(key)
        elif key in self._ready:
            self.model_ready.remove(model, version)
            self._ready.discard(key)
        self.models_loaded.set(len(self._ready))

    def render(self) -> bytes:
        if self.shared_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.shared_dir))
        return generate_latest(registry)

    def close(self) -> None:
        """A stopping worker: its gauges no longer count (its counters still do)."""
        if self.shared_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), str(self.shared_dir))


def _shared_counter(name: str, documentation: str, labelnames: Sequence[str]) -> Counter:
    return Counter(name, documentation, labelnames, registry=None)


def _shared_histogram(
    name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
) -> Histogram:
    return Histogram(name, documentation, labelnames, registry=None, buckets=buckets)
