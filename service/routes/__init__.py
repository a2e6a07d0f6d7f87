"""HTTP routes, one router per resource; each only decodes, calls the data plane, encodes.

The inference endpoints (V2 ``infer`` and REST ``predict``) are written as
:data:`InferenceHandler` functions: from the data plane, the path parameters, the body and the
``Inference-Header-Content-Length`` header to the response's content, extra headers and media
type. :func:`add_inference_routes` registers each as an :class:`InferenceRoute` in a router:
an ordinary FastAPI route, so the router matches it, every middleware (the service's and any a
user adds with ``app.add_middleware``) sees it, and ``/docs`` documents it from the same
definition. Only the route's own handling is lean: it reads the body and writes the response on the
ASGI messages, without FastAPI's dependency solving or Starlette's request and response objects,
a fair share of a small model's whole request (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from model.errors import BnnError
from model.repository import parse_version
from service.auth import check_api_key
from service.dataplane import DataPlane
from service.errors import error_response, error_responses
from service.middleware import scope_header
from service.openapi import path_parameters
from service.protocol.codec import HEADER_LENGTH

_HEADER_LENGTH = HEADER_LENGTH.encode()
Reply = tuple[bytes, dict[str, str], str]  # content, extra headers, media type
InferenceHandler = Callable[[DataPlane, dict[str, str], bytes, str | None], Awaitable[Reply]]


INFERENCE_ERRORS = error_responses(400, 401, 404, 408, 413, 503, 504)


def optional_version(version: str | None) -> int | None:
    """A path's ``{version}`` as a number (None: the newest)."""
    return None if version is None else parse_version(version)


@dataclass(frozen=True)
class InferenceEndpoint:
    """An inference handler and what documents it: (path, summary) pairs, the response model,
    the ``openapi_extra`` of its raw body, the operation id and the OpenAPI tag."""

    handler: InferenceHandler
    summaries: Sequence[tuple[str, str]]
    response_model: type
    body: dict
    operation: str
    tag: str


def add_inference_routes(router: APIRouter, endpoint: InferenceEndpoint) -> None:
    """Register ``endpoint`` in ``router`` as an :class:`InferenceRoute` per (path, summary);
    the path parameters (name, and version where the path has one) are read off the path.

    :func:`service.app.create_app` adds them to the app's own router, ahead of the included
    routers: FastAPI matches a route there directly, without walking an included router."""
    for path, summary in endpoint.summaries:
        versioned = "{version}" in path
        router.add_api_route(
            path.removeprefix(router.prefix),
            documented_endpoint(endpoint.handler),
            methods=["POST"],
            response_class=Response,
            responses={200: {"model": endpoint.response_model}, **INFERENCE_ERRORS},
            openapi_extra={
                **endpoint.body,
                **path_parameters("name", *(["version"] if versioned else [])),
            },
            summary=summary,
            operation_id=f"{endpoint.operation}_version" if versioned else endpoint.operation,
            tags=[endpoint.tag],
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
    """A FastAPI route served by its :data:`InferenceHandler` straight on the ASGI messages:
    routing, middleware, exception handling and OpenAPI are FastAPI's; the dependency solving,
    request and response objects between the route and the handler are skipped (the handler
    decodes the body itself; the API key is checked here). Unexpected exceptions propagate
    through the app's exception handling to the request context (a logged 500)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.handler: InferenceHandler = endpoint.handler  # type: ignore[attr-defined]
        self.app = self.serve  # what Route.handle calls for a matched request

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        # The request-object form, for a router that includes this route in another.
        handler: InferenceHandler = self.endpoint.handler  # type: ignore[attr-defined]

        async def serve(request: Request) -> Response:
            return await serve_inference(handler, request)

        return serve

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        try:
            api_key = state.api_key
            if api_key is not None:
                check_api_key(api_key, scope_header(scope, b"authorization"))
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body = message.get("body", b"")  # the common case: the body in one message
            else:
                body = await _read_body(receive, message)
            started = time.perf_counter()
            content, headers, media_type = await self.handler(
                state.dataplane, scope["path_params"], body, scope_header(scope, _HEADER_LENGTH)
            )
        except BnnError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except ClientDisconnect:
            return  # the client left before sending its whole body: no one to answer
        raw_headers = [
            (b"content-type", media_type.encode()),
            (b"content-length", str(len(content)).encode()),
            (b"server-timing", server_timing(started)),
        ]
        for key, value in headers.items():
            raw_headers.append((key.lower().encode(), value.encode("latin-1")))
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content})


def server_timing(started: float) -> bytes:
    """``Server-Timing`` of a reply: the server's own time from the read body to the encoded
    response (the playground shows it), as the standard header."""
    return b"infer;dur=%.3f" % ((time.perf_counter() - started) * 1000)


async def _read_body(receive: Receive, message: Message) -> bytes:
    """The whole request body from its first ``message`` on (``ClientDisconnect`` if the
    client goes away first)."""
    chunks = []
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


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
    headers["Server-Timing"] = server_timing(started).decode()
    return Response(content, headers=headers, media_type=media_type)


class _NoAnswer(Response):
    """Sends nothing: the request context counts the request as 499 (client closed request)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


NO_ANSWER = _NoAnswer()
