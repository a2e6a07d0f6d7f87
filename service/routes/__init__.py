"""HTTP routes, one router per resource; each only decodes, calls the data plane, encodes.

The inference endpoints (V2 ``infer`` and REST ``predict``) take only the request and read their
path parameters themselves. They are documented as FastAPI routes, and served by plain Starlette
routes placed ahead of those: FastAPI's per-request machinery (dependency solving, exit stacks,
response-model handling) costs about 50 µs, a third of a small model's whole request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.auth import check_api_key

Endpoint = Callable[[Request], Awaitable[Response]]


class ServingRoute(Route):
    """A plain route that records itself in the scope, as Starlette's router does and FastAPI's
    does not for non-FastAPI routes, so that metrics label requests by route template."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().handle(scope, receive, send)


def serving_routes(
    endpoints: Sequence[tuple[str, Endpoint]], api_key: bytes | None
) -> list[ServingRoute]:
    """Plain POST routes for ``(path, endpoint)`` pairs, checking the API key when one is set."""
    return [
        ServingRoute(path, _keyed(endpoint, api_key), methods=["POST"])
        for path, endpoint in endpoints
    ]


def _keyed(endpoint: Endpoint, api_key: bytes | None) -> Endpoint:
    if api_key is None:
        return endpoint

    async def checked(request: Request) -> Response:
        check_api_key(api_key, request.headers.get("authorization"))
        return await endpoint(request)

    return checked
