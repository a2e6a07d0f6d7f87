"""The body's limits in process: the deadline timer (one per request) against a stalled
``receive``, a cancellation that is not its own, and the size limit on a chunked body."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import BodyTimeoutError, PayloadTooLargeError
from service.middleware import BodyLimits


async def read_all(limits: BodyLimits, receive) -> None:
    """Read the whole body through ``limits``, as an app inside the request context does."""
    reader = limits.reader(receive)
    try:
        while (await reader.receive()).get("more_body", False):
            pass
    finally:
        reader.close()


def test_a_stalled_body_raises_the_body_timeout():
    async def stalled():
        await asyncio.Event().wait()  # never set: the client sends nothing more

    limits = BodyLimits(max_body_bytes=1024, body_timeout_s=0.05)
    with pytest.raises(BodyTimeoutError, match="within 0.05 s"):
        asyncio.run(read_all(limits, stalled))


def test_a_cancellation_from_elsewhere_is_not_a_body_timeout():
    async def scenario():
        started = asyncio.Event()

        async def stalled():
            started.set()
            await asyncio.Event().wait()

        limits = BodyLimits(max_body_bytes=1024, body_timeout_s=30)
        task = asyncio.ensure_future(read_all(limits, stalled))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_chunked_body_over_the_limit_is_refused_once_past_it():
    chunks = iter([b"x" * 600, b"x" * 600, b"never read"])
    read = []

    async def receive():
        body = next(chunks)
        read.append(body)
        return {"type": "http.request", "body": body, "more_body": True}

    limits = BodyLimits(max_body_bytes=1024, body_timeout_s=30)
    with pytest.raises(PayloadTooLargeError, match="more than 1024"):
        asyncio.run(read_all(limits, receive))
    assert len(read) == 2
