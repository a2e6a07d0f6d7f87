"""HTTP routes, one router per resource; each only decodes, calls the data plane, encodes.

The inference endpoints (V2 ``infer`` and REST ``predict``) are written as
:data:`InferenceHandler` functions: from the data plane, the path parameters, the body and the
``Inference-Header-Content-Length`` header to the response's content, extra headers and media
type. :class:`InferenceDispatch`, which :class:`service.app.ServingApp` places just inside the
request context and the body limit, serves their POSTs itself, straight on the ASGI messages:
FastAPI's stack (its error, telemetry, body-size and exception middleware, router, route and
exception-handling wrappers) and Starlette's request and response objects cost about 70 µs per
request, a third of a small model's whole request. The same handlers are registered in the
routers through :func:`request_endpoint`, which is what FastAPI documents at ``/docs``; every
other request goes through FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from fastapi import APIRouter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from model.errors import BnnError
from model.repository import parse_version
from service.auth import check_api_key
from service.dataplane import DataPlane
from service.dependencies import dataplane_of
from service.errors import error_response, error_responses
from service.middleware import scope_header
from service.openapi import path_parameters
from service.protocol.codec import HEADER_LENGTH

Reply = tuple[bytes, dict[str, str], str]  # content, extra headers, media type
InferenceHandler = Callable[[DataPlane, dict[str, str], bytes, str | None], Awaitable[Reply]]


INFERENCE_ERRORS = error_responses(400, 401, 404, 408, 413, 503, 504)


def optional_version(version: str | None) -> int | None:
    """A path's ``{version}`` as a number (None: the newest)."""
    return None if version is None else parse_version(version)


def document_inference(
    router: APIRouter,
    handler: InferenceHandler,
    summaries: Sequence[tuple[str, str]],
    *,
    response_model: type,
    body: dict,
    operation: str,
) -> None:
    """Register ``handler`` in ``router`` for the OpenAPI docs, once per (path, summary); the
    path parameters (name, and version where the path has one) are read off the path."""
    for path, summary in summaries:
        versioned = "{version}" in path
        router.add_api_route(
            path.removeprefix(router.prefix),
            request_endpoint(handler),
            methods=["POST"],
            response_class=Response,
            responses={200: {"model": response_model}, **INFERENCE_ERRORS},
            openapi_extra={**body, **path_parameters("name", *(["version"] if versioned else []))},
            summary=summary,
            operation_id=f"{operation}_version" if versioned else operation,
        )


def request_endpoint(handler: InferenceHandler) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` as a FastAPI/Starlette endpoint taking the request (the routers' twins)."""

    async def endpoint(request: Request) -> Response:
        content, headers, media_type = await handler(
            dataplane_of(request),
            request.path_params,
            await request.body(),
            request.headers.get(HEADER_LENGTH),
        )
        return Response(content, headers=headers, media_type=media_type)

    endpoint.__name__ = f"{handler.__name__}_endpoint"
    endpoint.__doc__ = handler.__doc__
    return endpoint


class InferenceDispatch:
    """ASGI middleware: a POST whose path matches one of ``handlers`` (``(path template,
    handler)`` pairs) is served by that handler, with the API key checked when one is set and
    domain errors turned into responses through the one status table; anything else goes on
    to ``app``. Unexpected exceptions propagate to the request context (a logged 500).

    ``scope["route"]`` is set to the matched route, as Starlette's router does, so that metrics
    label requests by route template."""

    def __init__(
        self,
        app: ASGIApp,
        handlers: Sequence[tuple[str, InferenceHandler]],
        dataplane: DataPlane,
        api_key: bytes | None,
    ) -> None:
        self.app = app
        self.routes = [
            (Route(path, request_endpoint(handler), methods=["POST"]), handler)
            for path, handler in handlers
        ]
        self.dataplane = dataplane
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = _route_path(scope)
            for route, handler in self.routes:
                match = route.path_regex.match(path)
                if match is not None:
                    scope["route"] = route
                    scope["path_params"] = match.groupdict()
                    await self._serve(handler, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, handler: InferenceHandler, scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            if self.api_key is not None:
                check_api_key(self.api_key, scope_header(scope, b"authorization"))
            body = await _read_body(receive)
            content, extra, media_type = await handler(
                self.dataplane,
                scope["path_params"],
                body,
                scope_header(scope, HEADER_LENGTH.encode()),
            )
        except BnnError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except ClientDisconnect:
            return  # the client left before sending its whole body: no one to answer
        response_headers = [
            (b"content-type", media_type.encode()),
            (b"content-length", str(len(content)).encode()),
            *((name.lower().encode(), value.encode("latin-1")) for name, value in extra.items()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": content})


async def _read_body(receive: Receive) -> bytes:
    """The whole request body (``ClientDisconnect`` if the client goes away first)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _route_path(scope: Scope) -> str:
    """The path below the app's root path (as Starlette's router matches it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
