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

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from model.errors import BnnError
from service.auth import check_api_key
from service.dataplane import DataPlane
from service.dependencies import dataplane_of
from service.errors import error_response
from service.protocol.codec import HEADER_LENGTH

Reply = tuple[bytes, dict[str, str], str]  # content, extra headers, media type
InferenceHandler = Callable[[DataPlane, dict[str, str], bytes, str | None], Awaitable[Reply]]


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
            (Route(path, handler, methods=["POST"]), handler) for path, handler in handlers
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
        headers = scope["headers"]
        try:
            if self.api_key is not None:
                check_api_key(self.api_key, _header(headers, b"authorization"))
            body = await _read_body(receive)
            content, extra, media_type = await handler(
                self.dataplane,
                scope["path_params"],
                body,
                _header(headers, HEADER_LENGTH.encode()),
            )
        except BnnError as exc:
            await error_response(exc)(scope, receive, send)
            return
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


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case, as ASGI servers give them)."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _route_path(scope: Scope) -> str:
    """The path below the app's root path (as Starlette's router matches it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
