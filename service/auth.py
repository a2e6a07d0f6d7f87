"""Optional API key: ``Authorization: Bearer <key>`` on inference and repository endpoints.

When ``BNN_API_KEY`` is unset every request passes. The comparison is constant-time
(:func:`hmac.compare_digest`) so the response time does not leak how much of a guess matched.
Health, metrics and the docs never depend on this.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from service.errors import UnauthorizedError


def check_api_key(expected: bytes | None, authorization: str | None) -> None:
    """UnauthorizedError unless ``authorization`` is ``Bearer <expected>`` (or no key is set)."""
    if expected is None:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(presented.strip().encode(), expected):
        raise UnauthorizedError("invalid API key")


async def require_api_key(request: Request) -> None:
    """FastAPI dependency enforcing the app's API key (async: no thread-pool hop)."""
    check_api_key(request.app.state.api_key, request.headers.get("authorization"))


def protected_by_key(api_key: bytes | None) -> list:
    """Router dependencies for endpoints behind the key: none at all when no key is set, so
    that requests pay nothing for a check that cannot fail."""
    return [Depends(require_api_key)] if api_key is not None else []
