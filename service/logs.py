"""Structured logs: one JSON object per line, each carrying the id of the request it belongs to.

The request id comes from the client's ``X-Request-ID`` header when it is a sane token, else a
fresh one: 32 hex digits, a random per-process prefix and a counter (unique without a system
call per request); :class:`service.middleware.RequestContextMiddleware` sets it in a context variable
that the :class:`RequestIdFilter` copies onto every record logged while the request runs.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged.
_STANDARD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


_ID_PREFIX = secrets.token_hex(8)  # 16 hex digits, random per process
_ID_COUNTER = itertools.count()


def request_id_from(header: str | None) -> str:
    """The client's request id if it is a short printable token, else a new one."""
    if header and _SANE_REQUEST_ID.match(header):
        return header
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", ...extra fields, "exc_info"}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", json_lines: bool = True) -> None:
    """Send every logger (ours, uvicorn's) to stderr through one handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The service writes its own access lines (service.middleware); uvicorn's would double them.
    logging.getLogger("uvicorn.access").propagate = False
