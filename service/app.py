"""The application factory: ``create_app(settings)`` builds one self-contained app (its own
registry, metrics and data plane), so tests can build as many as they like."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from service.auth import protected_by_key
from service.dataplane import SERVER_VERSION, DataPlane
from service.errors import install_error_handlers
from service.metrics import ServiceMetrics
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from service.openapi import install_openapi
from service.protocol.rest import PredictRequest
from service.protocol.v2 import InferenceRequest, RepositoryIndexRequest
from service.registry import Loader, ModelRegistry
from service.routes import InferenceDispatch, health, repository, rest, v2
from service.routes import metrics as metrics_routes
from service.settings import Settings

DESCRIPTION = """Serves bit-packed binarized neural networks from a model repository.

* **Open Inference Protocol (V2)** with the binary tensor data and model repository extensions.
* **Simple REST**: `POST /v1/models/{name}:predict` with `{"instances": [...]}`.

Every error body is `{"error": "..."}`. When `BNN_API_KEY` is set, send
`Authorization: Bearer <key>` to every endpoint except health, metrics and these docs.
"""


class ServingApp(FastAPI):
    """FastAPI with the service's own layers outermost: the request context (request id, access
    log, HTTP metrics, last-resort 500), the body limit, and :class:`InferenceDispatch`, which
    serves the inference POSTs itself. Every other request goes on into FastAPI's stack (error,
    telemetry, body-size and exception middleware, router); the inference requests skip it
    (see service.routes)."""

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        handlers = [*v2.INFERENCE_HANDLERS, *rest.INFERENCE_HANDLERS]
        app = InferenceDispatch(
            super().build_middleware_stack(), handlers, self.state.dataplane, self.state.api_key
        )
        app = BodySizeLimitMiddleware(app, max_body_bytes=settings.max_body_bytes)
        return RequestContextMiddleware(
            app, metrics=self.state.metrics, access_log_enabled=settings.access_log
        )


def _default_loader() -> Loader:
    from model import load_model

    return load_model


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start loading models and polling the repository; on shutdown (after uvicorn has let
    in-flight requests finish) stop polling and drain every batcher."""
    registry: ModelRegistry = app.state.registry
    await registry.start()
    try:
        yield
    finally:
        app.state.dataplane.draining = True
        await registry.close()
        app.state.metrics.close()


def create_app(settings: Settings, *, loader: Loader | None = None) -> ServingApp:
    """Build the service for ``settings``; ``loader`` (default :func:`model.load_model`) turns an
    artifact path and device into an object with ``predict``, ``warmup``, ``input_spec``,
    ``labels`` and ``spec``."""
    metrics = ServiceMetrics(shared_dir=settings.metrics_dir)
    registry = ModelRegistry(settings, loader or _default_loader(), metrics)
    app = ServingApp(
        title="bnnserve",
        version=SERVER_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.dataplane = DataPlane(settings, registry, metrics)
    app.state.api_key = (
        settings.api_key.get_secret_value().encode() if settings.api_key is not None else None
    )
    protected = protected_by_key(app.state.api_key)
    for router in (v2.router, rest.router, repository.router):
        app.include_router(router, dependencies=protected)
    for router in (health.router, metrics_routes.router):
        app.include_router(router)
    install_error_handlers(app)
    install_openapi(app, [InferenceRequest, RepositoryIndexRequest, PredictRequest])
    return app
