"""The application factory: ``create_app(settings)`` builds one self-contained app (its own
registry, metrics and data plane), so tests can build as many as they like."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from starlette.types import ASGIApp

from service.auth import protected_by_key
from service.dataplane import SERVER_VERSION, DataPlane
from service.errors import install_error_handlers
from service.metrics import ServiceMetrics
from service.middleware import BodyLimits, RequestContextMiddleware
from service.openapi import install_openapi
from service.protocol.rest import PredictRequest
from service.protocol.v2 import InferenceRequest, RepositoryIndexRequest, RepositoryLoadRequest
from service.registry import Loader, ModelRegistry
from service.routes import InferenceRoute, add_inference_routes, health, repository, rest, v2
from service.routes import metrics as metrics_routes
from service.routes.playground import install_playground
from service.settings import Settings
from service.tracing import NO_TRACING, Tracing

DESCRIPTION = """Serves bit-packed binarized neural networks from a model repository.

* **Open Inference Protocol (V2)** with the binary tensor data and model repository extensions.
* **Simple REST**: `POST /v1/models/{name}:predict` with `{"instances": [...]}`.
* **Playground**: `GET /` in a browser: draw or drop an image and see the prediction.

Every error body is `{"error": "..."}`. When `BNN_API_KEY` is set, send
`Authorization: Bearer <key>` to every endpoint except health, metrics and these docs.
"""


class ServingApp(FastAPI):
    """FastAPI with the service's own layer outermost: the request context (request id, access
    log, HTTP metrics, last-resort 500) and the body's limits (size and deadline). Inside it
    every request, inference included, takes FastAPI's one path: its error middleware, the middleware users add with
    ``add_middleware`` (CORS, tracing...), exception handling, and the router."""

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        return RequestContextMiddleware(
            super().build_middleware_stack(),
            metrics=self.state.metrics,
            access_log_enabled=settings.access_log,
            limits=BodyLimits(settings.max_body_bytes, settings.body_timeout_s),
            tracing=self.state.tracing,
        )


def _default_loader(settings: Settings) -> Loader:
    from model import load_model

    # BNN_DEVICE=auto times the model at the batch sizes it will serve; a GPU model's memory
    # is counted at the largest call the batcher makes
    return partial(
        load_model,
        batch_sizes=settings.served_batch_sizes,
        max_batch=settings.max_batch_size,
        options=settings.engine_options(),
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start loading models and polling the repository, and the gRPC server when
    ``BNN_GRPC_PORT`` is set; on shutdown (after uvicorn has let in-flight requests finish) let
    in-flight RPCs finish, stop polling and drain every batcher."""
    registry: ModelRegistry = app.state.registry
    dataplane: DataPlane = app.state.dataplane
    await registry.start()
    grpc_server = None
    try:
        if dataplane.settings.grpc_port:
            from service.protocol.grpc.servicer import start_grpc_server  # grpc only when on

            grpc_server = await start_grpc_server(dataplane, app.state.metrics, app.state.api_key)
        yield
    finally:
        dataplane.draining = True
        if grpc_server is not None:
            await grpc_server.stop(dataplane.settings.graceful_shutdown_s)
        await registry.close()
        dataplane.close()
        dataplane.tracing.shutdown()
        app.state.metrics.close()


def create_app(
    settings: Settings, *, loader: Loader | None = None, tracing: Tracing = NO_TRACING
) -> ServingApp:
    """Build the service for ``settings``; ``loader`` (default :func:`model.load_model`) turns an
    artifact path and device into an object with ``predict``, ``warmup``, ``input_spec``,
    ``labels`` and ``spec``; ``tracing`` makes OpenTelemetry spans (default: none)."""
    metrics = ServiceMetrics(shared_dir=settings.metrics_dir)
    registry = ModelRegistry(settings, loader or _default_loader(settings), metrics)
    app = ServingApp(
        title="bnnserve",
        version=SERVER_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry layer off: the service makes its spans itself (with the
        # request id and the batcher's stages, service.tracing), and the layer's per-request
        # provider look-ups cost a small model's request several percent even unconfigured.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.tracing = tracing
    app.state.dataplane = DataPlane(settings, registry, metrics, tracing)
    app.state.api_key = (
        settings.api_key.get_secret_value().encode() if settings.api_key is not None else None
    )
    for endpoint in (v2.INFERENCE, rest.INFERENCE):  # matched without nesting
        add_inference_routes(app.router, endpoint)
    protected = protected_by_key(app.state.api_key)
    for router in (v2.router, rest.router, repository.router):
        app.include_router(router, dependencies=protected)
    for router in (health.router, metrics_routes.router):
        app.include_router(router)
    install_playground(app)
    install_error_handlers(app)
    install_openapi(
        app, [InferenceRequest, RepositoryIndexRequest, RepositoryLoadRequest, PredictRequest]
    )
    inference_routes_first(app)
    return app


def inference_routes_first(app: FastAPI) -> None:
    """Move the inference routes ahead of FastAPI's own (``/openapi.json``, ``/docs``...): the
    router tries routes in order, so an inference request is matched by its first try. Their
    paths overlap no other route's, so the order changes what matches nothing else."""
    routes = app.router.routes
    routes.sort(key=lambda route: not isinstance(route, InferenceRoute))  # stable
