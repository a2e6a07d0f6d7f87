"""The service's own errors, and the one table that maps every domain error to an HTTP status.

Routes and the data plane raise domain errors (these, or those of :mod:`model.errors`); the
handlers installed by :func:`install_error_handlers` turn them into ``{"error": "..."}`` with the
status from :data:`STATUS_BY_ERROR`. Anything not in the table is a bug: 500, logged with its
traceback, and the body names only the request id.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import (
    ArtifactError,
    BnnError,
    DeviceUnavailableError,
    InvalidInputError,
    InvalidModelNameError,
    ManifestError,
    ModelMemoryError,
    ModelNotFoundError,
    UnsafeRepositoryEntryError,
)


class ServiceError(BnnError):
    """Base class of the errors the serving layer raises itself."""


class BadRequestError(ServiceError):
    """The request body or its framing is malformed (bad JSON, missing field, bad header)."""


class UnauthorizedError(ServiceError):
    """The API key is missing or wrong."""


class PayloadTooLargeError(ServiceError):
    """The request body exceeds BNN_MAX_BODY_BYTES."""


class ModelNotReadyError(ServiceError):
    """The model exists but is loading, unloaded or failed to load."""

    retry_after_s = 1


class ModelLoadError(ServiceError):
    """An explicit load was refused: the version is corrupt or invalid (the old one keeps serving)."""


class LoadTimeoutError(ServiceError):
    """A version did not verify, compile and warm up within BNN_LOAD_TIMEOUT_S."""


class LoadAbandonedError(ServiceError):
    """A load in progress was abandoned: its model was unloaded or the server is stopping."""


class OverloadedError(ServiceError):
    """The model's queue is full; the client should retry after ``retry_after_s``."""

    retry_after_s = 1


class NonFiniteResponseError(ServiceError):
    """A response would carry NaN or infinity, which JSON cannot. Unreachable by design (model
    content and warm-up logits are checked at load; logits an input drives out of range are a
    400), so it is not in the table: a bug, answered 500 and logged with its traceback."""


class RequestTimeoutError(ServiceError):
    """The request did not finish within BNN_REQUEST_TIMEOUT_S."""


class BodyTimeoutError(ServiceError):
    """The client did not send its whole request body within BNN_BODY_TIMEOUT_S."""


class DecodeWorkerError(ServiceError):
    """The worker process decoding large bodies stopped; a new one serves the next body."""

    retry_after_s = 1


class ReadinessFalse(ServiceError):
    """A health endpoint's answer "false". The Open Inference Protocol: "The HTTP response
    status code indicates a boolean result for the health request. A 200 status code indicates
    true and a 4xx status code indicates false." Triton answers false with 400; so do we."""


# The one table. Lookup walks the exception's MRO, so subclasses inherit their parent's status.
STATUS_BY_ERROR: dict[type[BaseException], int] = {
    BadRequestError: 400,
    InvalidInputError: 400,
    InvalidModelNameError: 400,
    ModelLoadError: 400,
    ReadinessFalse: 400,
    UnauthorizedError: 401,
    ModelNotFoundError: 404,
    BodyTimeoutError: 408,
    PayloadTooLargeError: 413,
    ModelNotReadyError: 503,
    DecodeWorkerError: 503,
    OverloadedError: 503,
    # A version that cannot be loaded makes its model unavailable, not the request wrong.
    ArtifactError: 503,
    ManifestError: 503,
    UnsafeRepositoryEntryError: 503,
    LoadTimeoutError: 503,
    LoadAbandonedError: 503,
    DeviceUnavailableError: 503,
    ModelMemoryError: 503,  # the model does not fit its device-memory limit
    RequestTimeoutError: 504,
}


def status_for(exc: BaseException) -> int:
    """The HTTP status of ``exc`` from the table; 500 for anything unexpected."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_headers(exc: BaseException) -> dict[str, str]:
    """Extra response headers an error calls for (Retry-After, WWW-Authenticate)."""
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, BodyTimeoutError):
        headers["Connection"] = "close"  # the rest of the body may still come: drop it
    return headers


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """``{"error": "..."}`` with the table's status; a bug's message is not leaked."""
    status = status_for(exc)
    if status == 500:
        message = (
            f"internal server error (request id {request_id})"
            if request_id
            else ("internal server error")
        )
    else:
        message = str(exc) or type(exc).__name__
    return JSONResponse({"error": message}, status_code=status, headers=error_headers(exc))


# Statuses of the documented error bodies, for the OpenAPI schema of each route.
ERROR_DESCRIPTIONS = {
    400: "Bad input: malformed body, wrong tensor name, shape, datatype, NaN or infinity",
    401: "Missing or wrong API key (only when BNN_API_KEY is set)",
    404: "Unknown model or version",
    408: "The request body did not arrive within BNN_BODY_TIMEOUT_S",
    413: "Request body larger than BNN_MAX_BODY_BYTES",
    503: "Model not ready or queue full (with Retry-After)",
    504: "Request exceeded BNN_REQUEST_TIMEOUT_S",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` entries documenting the ``{"error": "..."}`` body."""
    schema = {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    }
    return {
        status: {
            "description": ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": schema}},
        }
        for status in statuses
    }


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the table so that each body is ``{"error": "..."}``."""

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug (500) is logged once, with its traceback, by the request context around the app.
        return error_response(exc, getattr(request.state, "request_id", None))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": describe_request_errors(exc.errors())}, status_code=400)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    app.add_exception_handler(Exception, domain_error)
    app.add_exception_handler(BnnError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def describe_request_errors(errors: list[dict]) -> str:
    """pydantic's error list as one line: ``inputs.0.shape: Field required; ...``."""
    parts = []
    for error in errors[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{location}: {error.get('msg')}" if location else str(error.get("msg")))
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return "; ".join(parts)
