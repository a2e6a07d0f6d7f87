"""The event-loop metrics export exactly what prometheus-client's own metrics would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service.metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def _samples(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without comments and prometheus-client's ``_created`` timestamps."""
    text = generate_latest(registry).decode()
    return sorted(
        line
        for line in text.splitlines()
        if line and not line.startswith("#") and "_created" not in line
    )


def test_histogram_matches_prometheus_client():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("h_seconds", "doc", ["model"], BUCKETS)
    ours.register(loop)
    reference = Histogram("h_seconds", "doc", ["model"], buckets=BUCKETS, registry=theirs)
    values = [0.0, 0.001, 0.0010001, 0.05, 1.0, 7.5, 0.1]  # on, just above and past the bounds
    for model in ("a", "b"):
        for value in values:
            loop.labels(model).observe(value)
            reference.labels(model).observe(value)
    assert _samples(ours) == _samples(theirs)


def test_counter_matches_prometheus_client():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopCounter("requests", "doc", ["status"])
    ours.register(loop)
    reference = Counter("requests", "doc", ["status"], registry=theirs)
    for status, times in (("200", 3), ("400", 1)):
        for _ in range(times):
            loop.labels(status).inc()
            reference.labels(status).inc()
    assert _samples(ours) == _samples(theirs)


def test_wrong_number_of_labels_is_refused():
    with pytest.raises(ValueError, match="expected labels"):
        LoopCounter("requests", "doc", ["model", "status"]).labels("only-one")
