"""``inference.GRPCInferenceService`` on the data plane that HTTP uses (same registry, batchers,
API key, limits and metrics): each RPC only decodes, calls the data plane, encodes.

Errors: a domain error's HTTP status comes from the one table (:func:`service.errors.status_for`)
and :data:`GRPC_CODE_BY_STATUS` turns it into the gRPC status code Triton answers with for that
kind of error; the message is the same as over HTTP. The API key travels as the metadata
``authorization: Bearer <key>``; liveness, readiness and server metadata never need it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from model.errors import ModelNotFoundError
from service.auth import check_api_key
from service.dataplane import DataPlane
from service.errors import ModelNotReadyError, status_for
from service.logs import request_id_from, request_id_var
from service.metrics import ServiceMetrics
from service.protocol.grpc import codec
from service.protocol.grpc import grpc_service_pb2 as pb
from service.protocol.grpc import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("service.errors")

# HTTP status of a domain error (service.errors) -> gRPC status code, as Triton maps them.
GRPC_CODE_BY_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    500: grpc.StatusCode.INTERNAL,
}

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def grpc_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of ``exc`` (INTERNAL for anything unexpected)."""
    return GRPC_CODE_BY_STATUS.get(status_for(exc), grpc.StatusCode.INTERNAL)


def rpc(*, protected: bool) -> Callable[[Handler], Handler]:
    """Wrap an RPC: request id from the ``x-request-id`` metadata (or a new one), a server span
    when tracing is on, the API key checked when ``protected``, errors aborted with their code,
    each call counted by method and code in ``bnn_grpc_requests_total``."""

    def decorate(handler: Handler) -> Handler:
        method = handler.__name__

        @functools.wraps(handler)
        async def wrapped(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext):
            metadata = dict(context.invocation_metadata() or ())
            token = request_id_var.set(request_id_from(metadata.get("x-request-id")))
            try:
                tracing = self.dataplane.tracing
                if not tracing.enabled:
                    return await self.call(handler, method, protected, request, context, metadata)
                attributes = {"rpc.system": "grpc", "rpc.method": method}
                with tracing.server_span(f"grpc {method}", metadata.items(), **attributes):
                    return await self.call(handler, method, protected, request, context, metadata)
            finally:
                request_id_var.reset(token)

        return wrapped

    return decorate


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, metrics: ServiceMetrics, api_key: bytes | None):
        self.dataplane = dataplane
        self.metrics = metrics
        self.api_key = api_key

    async def call(
        self,
        handler: Handler,
        method: str,
        protected: bool,
        request: Any,
        context: grpc.aio.ServicerContext,
        metadata: dict[str, str],
    ) -> Any:
        """``handler``'s answer, or an abort with the error's code and message."""
        code = grpc.StatusCode.OK
        try:
            if protected and self.api_key is not None:
                check_api_key(self.api_key, metadata.get("authorization"))
            return await handler(self, request, context)
        except Exception as exc:
            code = grpc_code_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in gRPC %s", method)
                message = f"internal server error (request id {request_id_var.get()})"
            else:
                message = str(exc) or type(exc).__name__
            await context.abort(code, message)
        finally:
            self.metrics.grpc_requests.labels(method, code.name).inc()

    # --- health and metadata -------------------------------------------------------------
    @rpc(protected=False)
    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc(protected=False)
    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.is_ready())

    @rpc(protected=False)
    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.dataplane.server_metadata())

    @rpc(protected=True)
    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        """Ready or not, as Triton answers: an unknown or unloaded model is not ready (no
        error); a malformed name or version is still INVALID_ARGUMENT."""
        try:
            await self.dataplane.model(request.name, codec.model_version(request.version))
        except (ModelNotFoundError, ModelNotReadyError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc(protected=True)
    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        served = await self.dataplane.model(request.name, codec.model_version(request.version))
        metadata = self.dataplane.model_metadata(served)
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["outputs"]],
        )

    # --- inference -----------------------------------------------------------------------
    @rpc(protected=True)
    async def ModelInfer(self, request, context) -> pb.ModelInferResponse:
        result = await self.dataplane.infer(
            request.model_name,
            codec.model_version(request.model_version),
            codec.EncodedGrpcInferRequest(request),
            protocol="grpc",
        )
        return self.dataplane.tracing.run(
            "encode",
            codec.encode_response,
            result.model_name,
            result.model_version,
            request.id,
            result.outputs,
        )

    # --- repository ----------------------------------------------------------------------
    @rpc(protected=True)
    async def RepositoryIndex(self, request, context) -> pb.RepositoryIndexResponse:
        rows = self.dataplane.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    @rpc(protected=True)
    async def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        await self.dataplane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc(protected=True)
    async def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


async def start_grpc_server(
    dataplane: DataPlane, metrics: ServiceMetrics, api_key: bytes | None
) -> grpc.aio.Server:
    """Serve the servicer on ``BNN_HOST:BNN_GRPC_PORT`` in the running event loop; messages
    over ``BNN_MAX_BODY_BYTES`` are refused (RESOURCE_EXHAUSTED) as HTTP refuses such bodies."""
    settings = dataplane.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared listener
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(dataplane, metrics, api_key), server
    )
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address} (BNN_GRPC_PORT): {exc}") from None
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address} (BNN_GRPC_PORT)")
    await server.start()
    logging.getLogger("service").info("serving gRPC", extra={"address": address})
    return server
