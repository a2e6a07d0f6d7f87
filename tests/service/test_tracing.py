"""OpenTelemetry spans of a request's stages, captured with the SDK's in-memory exporter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.__main__ import main
from service.app import create_app
from service.tracing import NO_TRACING, Tracing, tracing_from_environment
from tests.service.conftest import make_settings, wait_ready
from tests.service.numpy_model import LinearModel

pytest.importorskip("opentelemetry.sdk", reason="needs the 'otel' extra")
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
STAGES = ["decode", "queue wait", "engine", "encode"]


@pytest.fixture
def traced(repo):
    """(client, exporter) of an app whose spans land in memory."""
    clients = []

    def build(**overrides):
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracing = Tracing(provider.get_tracer("test"), provider)
        app = create_app(make_settings(repo, **overrides), loader=LinearModel, tracing=tracing)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        exporter.clear()
        return client, exporter

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def images(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 17, (n, 1, 6, 6)).astype(np.float32)


REQUESTS = {
    "v2": ("/v2/models/tiny/infer", "POST /v2/models/{name}/infer",
           {"inputs": [{"name": "input", "shape": [2, 1, 6, 6], "datatype": "FP32",
                        "data": images(2).ravel().tolist()}]}),
    "rest": ("/v1/models/tiny:predict", "POST /v1/models/{name}:predict",
             {"instances": images(2).tolist()}),
}  # fmt: skip


@pytest.mark.parametrize("protocol", list(REQUESTS))
@pytest.mark.parametrize("inline_compute_ms", [0.0, 1000.0], ids=["queued", "inline"])
def test_an_inference_request_is_one_trace_of_its_stages(traced, protocol, inline_compute_ms):
    client, exporter = traced(inline_compute_ms=inline_compute_ms)
    path, route, body = REQUESTS[protocol]
    response = client.post(
        path,
        content=json.dumps(body),
        headers={"X-Request-ID": "trace-me-1", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )
    assert response.status_code == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {route, *STAGES}
    request = spans[route]
    assert request.kind is SpanKind.SERVER
    assert request.parent.span_id == int(PARENT_ID, 16)  # continues the caller's trace
    assert request.attributes["http.route"] == route.split(" ", 1)[1]
    assert request.attributes["http.response.status_code"] == 200
    for span in spans.values():
        assert span.context.trace_id == int(TRACE_ID, 16), span.name
        assert span.attributes["bnn.request_id"] == "trace-me-1", span.name
    for name in STAGES:
        assert spans[name].parent.span_id == request.context.span_id, name
    decode, queue, engine, encode = (spans[name] for name in STAGES)
    assert decode.end_time <= queue.start_time <= queue.end_time == engine.start_time
    assert engine.end_time <= encode.start_time <= encode.end_time <= request.end_time
    assert engine.attributes["bnn.batch_rows"] == 2
    assert engine.attributes["bnn.model"] == "tiny"


def test_a_refused_request_has_its_status_and_no_engine_span(traced):
    client, exporter = traced()
    response = client.post("/v2/models/tiny/infer", json={"inputs": []})
    assert response.status_code == 400
    names = [span.name for span in exporter.get_finished_spans()]
    assert "engine" not in names and "queue wait" not in names
    request = next(s for s in exporter.get_finished_spans() if s.name.startswith("POST"))
    assert request.attributes["http.response.status_code"] == 400


def test_tracing_is_off_unless_an_exporter_is_named(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing_from_environment() is NO_TRACING
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing_from_environment() is NO_TRACING
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing_from_environment() is NO_TRACING
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "digits-prod")
    tracing = tracing_from_environment()
    try:
        assert tracing.enabled
        assert tracing.provider.resource.attributes["service.name"] == "digits-prod"
    finally:
        tracing.shutdown()


def test_an_unknown_exporter_exits_2_naming_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    assert main(["--model-repository", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "bnn-serve: OTEL_TRACES_EXPORTER='zipkin': expected one of otlp, console or none"
    )


def test_no_tracing_makes_no_spans():
    assert not NO_TRACING.enabled
    assert NO_TRACING.run("decode", sorted, [3, 1, 2]) == [1, 2, 3]
    assert NO_TRACING.span("decode") is NO_TRACING.server_span("GET", [])  # one shared no-op
