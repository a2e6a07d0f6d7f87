"""The service's one pure ASGI layer: request context (id, access log, HTTP metrics,
last-resort 500) and the request body's limits (size and deadline). Pure ASGI rather than
``BaseHTTPMiddleware``: no extra task per request, and the body is never buffered here."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTimeoutError, PayloadTooLargeError, error_response
from service.logs import request_id_from, request_id_var
from service.metrics import ServiceMetrics
from service.tracing import NO_TRACING, Tracing

access_log = logging.getLogger("service.access")
# Status recorded (metrics, access log) for a request whose client left before it was answered,
# as nginx logs it; never sent.
CLIENT_CLOSED_REQUEST = 499
log = logging.getLogger("service.errors")


class BodyLimits:
    """The request body's two limits:

    * size: 413 for bodies over ``max_body_bytes``, at once from Content-Length, or as soon as
      a chunked body's running total passes the limit — never reading more than that;
    * time: 408 (and the connection closed) for a client that has not sent its whole body
      within ``body_timeout_s`` of the request's start: a client stalled mid-body holds a
      connection and a buffered body for at most that long, however slowly it trickles.
      Waiting after the body (for a disconnect) is not bounded.

    Not a layer of its own: :class:`RequestContextMiddleware` applies them, so a request
    passes one service layer, not two. The deadline is one timer
    per request that reads a body (:class:`_BodyReader`), armed at its first ``receive`` and
    cancelled when the body is complete, rather than a timeout scope around each ``receive``:
    a request whose body came whole costs one timer, a GET none."""

    def __init__(self, max_body_bytes: int, body_timeout_s: float) -> None:
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    def refusal(self, scope: Scope) -> Response | None:
        """The 413 for a request whose Content-Length is over the limit (None otherwise); the
        connection is closed rather than the body read."""
        declared = scope_header(scope, b"content-length")
        if declared is None or not declared.isdigit() or int(declared) <= self.max_body_bytes:
            return None
        response = error_response(PayloadTooLargeError(self.too_large(declared)))
        response.headers["Connection"] = "close"
        return response

    def reader(self, receive: Receive) -> _BodyReader:
        """``receive`` within the limits (``reader(receive).receive``); close it when the
        request is over."""
        return _BodyReader(self, receive)

    def too_large(self, size: str) -> str:
        return (
            f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes "
            "(BNN_MAX_BODY_BYTES)"
        )

    def too_slow(self) -> str:
        return (
            f"the request body did not arrive within {self.body_timeout_s:g} s (BNN_BODY_TIMEOUT_S)"
        )


class RequestContextMiddleware:
    """Gives each request an id (``X-Request-ID`` in, echoed out), applies the body's
    :class:`BodyLimits`, counts the request by route template and status, logs one access line
    (always for errors, for successes when enabled), and turns an unexpected exception into a
    logged 500. A request left unanswered because its client went away counts as 499."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        access_log_enabled: bool,
        limits: BodyLimits,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log_enabled = access_log_enabled
        self.limits = limits
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope_header(scope, b"x-request-id"))
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        try:
            if not self.tracing.enabled:
                await self._serve(scope, receive, send, request_id, None)
                return
            method = scope["method"]
            attributes = {"http.request.method": method, "url.path": scope["path"]}
            with self.tracing.server_span(method, scope["headers"], **attributes) as span:
                await self._serve(scope, receive, send, request_id, span)
        finally:
            request_id_var.reset(token)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, span: Any
    ) -> None:
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self._within_limits(scope, receive, send_with_id)
            if not response_started:
                status = CLIENT_CLOSED_REQUEST  # the app had no one left to answer
        except Exception as exc:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not response_started:
                await error_response(exc, request_id)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "<unmatched>")
            self.metrics.http_requests.labels(scope["method"], route, str(status)).inc()
            if span is not None:  # named after the route template, as OpenTelemetry asks
                span.update_name(f"{scope['method']} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
            if self.access_log_enabled or status >= 400:
                access_log.log(
                    logging.WARNING if status >= 500 else logging.INFO,
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"status": status, "duration_ms": round(elapsed * 1000, 3)},
                )

    async def _within_limits(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, its ``receive`` held to the :class:`BodyLimits` (413 at once for a
        declared Content-Length over the limit)."""
        refusal = self.limits.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        reader = self.limits.reader(receive)
        try:
            await self.app(scope, reader.receive, send)
        finally:
            reader.close()


class _BodyReader:
    """A request's ``receive`` within its :class:`BodyLimits`. When the
    deadline (``body_timeout_s`` after the request's start) passes while a ``receive`` waits for
    more of the body, the waiting task is cancelled and that ``receive`` raises
    :class:`BodyTimeoutError`, as ``asyncio.timeout`` does (the cancellation is taken back with
    ``Task.uncancel``, so a cancellation from elsewhere still propagates)."""

    __slots__ = (
        "_deadline",
        "_expired",
        "_limits",
        "_receive",
        "_timer",
        "_waiting",
        "done",
        "size",
    )

    def __init__(self, limits: BodyLimits, receive: Receive) -> None:
        self._limits = limits
        self._receive = receive
        self._deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: asyncio.Task[Any] | None = None  # the task inside ``receive``, if any
        self._expired = False
        self.done = False  # the whole body has arrived (or the client left)
        self.size = 0  # bytes of body so far

    async def receive(self) -> Message:
        if self.done:
            message = await self._receive()
        elif self._expired:  # past the deadline: as asyncio.timeout would, for this call
            message = await self._receive_past_deadline()
        else:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_at(self._deadline, self._expire)
            self._waiting = task = asyncio.current_task()
            try:
                message = await self._receive()
            except asyncio.CancelledError:
                if self._expired and task is not None and task.uncancel() == 0:
                    raise BodyTimeoutError(self._limits.too_slow()) from None
                raise
            finally:
                self._waiting = None
            if message["type"] != "http.request" or not message.get("more_body", False):
                self.done = True
                self._timer.cancel()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            limit = self._limits.max_body_bytes
            if self.size > limit:
                raise PayloadTooLargeError(self._limits.too_large(f"more than {limit}"))
        return message

    async def _receive_past_deadline(self) -> Message:
        """The deadline passed between two ``receive`` calls: what has arrived is still read,
        waiting for more is not."""
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeoutError(self._limits.too_slow()) from None
        self.done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    def close(self) -> None:
        """The request is over: its deadline no longer matters (nor holds it in memory)."""
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        if self.done:
            return
        self._expired = True
        if self._waiting is not None:
            self._waiting.cancel()


def scope_header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case, as ASGI servers give them)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
