"""HTTP routes, one router per resource; each only decodes, calls the data plane, encodes.

The inference endpoints (V2 ``infer`` and REST ``predict``) take only the request and read their
path parameters themselves. They are documented as FastAPI routes, and served by
:class:`InferenceDispatch`, which :class:`service.app.ServingApp` places just inside the request
context and the body limit, ahead of FastAPI's own stack: its error, telemetry, body-size and
exception middleware, router, route and exception-handling wrappers cost about 50 µs per
request, a quarter of a small model's whole request. Every other request goes through it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from model.errors import BnnError
from service.auth import check_api_key
from service.errors import error_response

Endpoint = Callable[[Request], Awaitable[Response]]


class InferenceDispatch:
    """ASGI middleware: a POST whose path matches one of ``endpoints`` (``(path template,
    endpoint)`` pairs) runs that endpoint directly, with the API key checked when one is set and
    its domain errors turned into responses through the one status table; anything else goes
    on to ``app``. Unexpected exceptions propagate to the request context (a logged 500).

    ``scope["route"]`` is set to the matched route, as Starlette's router does, so that metrics
    label requests by route template."""

    def __init__(
        self, app: ASGIApp, endpoints: Sequence[tuple[str, Endpoint]], api_key: bytes | None
    ) -> None:
        self.app = app
        self.routes = [
            (Route(path, endpoint, methods=["POST"]), endpoint) for path, endpoint in endpoints
        ]
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = _route_path(scope)
            for route, endpoint in self.routes:
                match = route.path_regex.match(path)
                if match is not None:
                    scope["route"] = route
                    scope["path_params"] = match.groupdict()
                    await self._serve(endpoint, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            if self.api_key is not None:
                check_api_key(self.api_key, request.headers.get("authorization"))
            response = await endpoint(request)
        except BnnError as exc:
            response = error_response(exc)
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path below the app's root path (as Starlette's router matches it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
