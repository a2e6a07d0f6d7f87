"""HTTP routes, one router per resource; each only decodes, calls the data plane, encodes.

The inference endpoints (V2 ``infer`` and REST ``predict``) are written as
:data:`InferenceHandler` functions: from the data plane, the path parameters, the body and the
``Inference-Header-Content-Length`` header to the response's content, extra headers and media
type. :func:`add_inference_routes` registers each as an :class:`InferenceRoute` in its router:
an ordinary FastAPI route, so the router matches it, every middleware (the service's and any a
user adds with ``app.add_middleware``) sees it, and ``/docs`` documents it from the same
definition. Only the route's own handling is lean: it hands the body straight to the handler,
without FastAPI's dependency solving and response validation, a fair share of a small model's
whole request (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from model.errors import BnnError
from model.repository import parse_version
from service.auth import check_api_key
from service.dataplane import DataPlane
from service.errors import error_response, error_responses
from service.openapi import path_parameters
from service.protocol.codec import HEADER_LENGTH

Reply = tuple[bytes, dict[str, str], str]  # content, extra headers, media type
InferenceHandler = Callable[[DataPlane, dict[str, str], bytes, str | None], Awaitable[Reply]]


INFERENCE_ERRORS = error_responses(400, 401, 404, 413, 503, 504)


def optional_version(version: str | None) -> int | None:
    """A path's ``{version}`` as a number (None: the newest)."""
    return None if version is None else parse_version(version)


def add_inference_routes(
    router: APIRouter,
    handler: InferenceHandler,
    summaries: Sequence[tuple[str, str]],
    *,
    response_model: type,
    body: dict,
    operation: str,
) -> None:
    """Register ``handler`` in ``router`` as an :class:`InferenceRoute` per (path, summary); the
    path parameters (name, and version where the path has one) are read off the path."""
    for path, summary in summaries:
        versioned = "{version}" in path
        router.add_api_route(
            path.removeprefix(router.prefix),
            documented_endpoint(handler),
            methods=["POST"],
            response_class=Response,
            responses={200: {"model": response_model}, **INFERENCE_ERRORS},
            openapi_extra={**body, **path_parameters("name", *(["version"] if versioned else []))},
            summary=summary,
            operation_id=f"{operation}_version" if versioned else operation,
            route_class_override=InferenceRoute,
        )


def documented_endpoint(handler: InferenceHandler) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint FastAPI documents for ``handler`` (a request, no parameters: the body and
    path parameters are documented through ``openapi_extra``); :class:`InferenceRoute` serves
    the route with ``handler`` itself, found here."""

    async def endpoint(request: Request) -> Response:
        return await serve_inference(handler, request)

    endpoint.__name__ = f"{handler.__name__}_endpoint"
    endpoint.__doc__ = handler.__doc__
    endpoint.handler = handler  # type: ignore[attr-defined]
    return endpoint


class InferenceRoute(APIRoute):
    """A FastAPI route whose request handler calls its :data:`InferenceHandler` directly:
    routing, middleware, exception handling and OpenAPI are FastAPI's, the dependency solving
    and response-model validation between the request and the handler are skipped (the handler
    decodes the body itself, and checks the API key here)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler: InferenceHandler = self.endpoint.handler  # type: ignore[attr-defined]

        async def serve(request: Request) -> Response:
            return await serve_inference(handler, request)

        return serve


async def serve_inference(handler: InferenceHandler, request: Request) -> Response:
    """``handler``'s reply to ``request``, the API key checked when one is set and domain errors
    turned into responses through the one status table. Unexpected exceptions propagate
    through the app's exception handling to the request context (a logged 500)."""
    state = request.app.state
    try:
        if state.api_key is not None:
            check_api_key(state.api_key, request.headers.get("authorization"))
        body = await request.body()
        started = time.perf_counter()
        content, headers, media_type = await handler(
            state.dataplane, request.path_params, body, request.headers.get(HEADER_LENGTH)
        )
    except BnnError as exc:
        return error_response(exc)
    except ClientDisconnect:
        return NO_ANSWER  # the client left before sending its whole body
    # The server's own time, decode to encode (the playground shows it), as the standard header.
    headers["Server-Timing"] = f"infer;dur={(time.perf_counter() - started) * 1000:.3f}"
    return Response(content, headers=headers, media_type=media_type)


class _NoAnswer(Response):
    """Sends nothing: the request context counts the request as 499 (client closed request)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


NO_ANSWER = _NoAnswer()
