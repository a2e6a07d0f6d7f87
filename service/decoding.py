"""Decoding request bodies without stalling the event loop.

Parsing JSON is one C call that holds the GIL from start to end (pydantic-core's parser takes
about 15 ms per MB on the reference machine; numpy converting the numbers as long again), so a
thread would not free the loop: it waits for the GIL all the same. A body whose JSON part is
larger than ``BNN_DECODE_OFFLOAD_BYTES`` is therefore decoded in a worker process, and the
event loop only copies bytes to it and arrays back. Smaller bodies are decoded on the loop,
where a process hop would cost more than the parse. One worker: big bodies queue for it rather
than take the cores that the event loop and the engine need.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from service.errors import DecodeWorkerError
from service.tensors import DecodedRequest, EncodedRequest, InputExpectation
from service.workers import die_with_parent

log = logging.getLogger("service.decoding")


class RequestDecoder:
    """Decodes :class:`EncodedRequest` bodies: on the event loop when their JSON is at most
    ``offload_bytes`` long, else in a worker process (started on first use)."""

    def __init__(self, offload_bytes: int) -> None:
        self.offload_bytes = offload_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def decode(self, request: EncodedRequest, expected: InputExpectation) -> DecodedRequest:
        if request.json_bytes <= self.offload_bytes:
            return request.decode(expected)
        pool = self._worker()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, request.decode, expected)
        except BrokenProcessPool:
            # The worker died (killed, out of memory): start a fresh one for the next body.
            log.warning("the decoding worker process stopped; starting a new one")
            if self._pool is pool:
                self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise DecodeWorkerError(
                "the worker decoding large request bodies stopped while decoding this one"
            ) from None

    def _worker(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fork would copy the engine's threads' locks in whatever state they are.
            self._pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent
            )
        return self._pool

    def close(self) -> None:
        """Stop the worker (bodies still queued for it fail)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
