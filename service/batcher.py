"""Dynamic batching: concurrent requests for one model coalesce into one engine call.

A :class:`DynamicBatcher` owns a bounded queue of pending requests and one worker task. The
worker takes the oldest request and every request after it that still fits in
``max_batch_size`` rows; when the engine is idle and the batch is not full it may wait up to
``max_queue_delay_s`` (measured from the oldest request's arrival) for more. It then runs the
model once, in a worker thread so the event loop keeps serving, and hands each request its rows
of the result. Requests that arrive while a batch runs form the next batch, so under load the
batch size grows with the arrival rate even with no delay at all.

A batch whose recent engine calls took less than ``inline_below_s`` runs on the event loop
itself: for a small model the hop to a worker thread and back costs more than the model. Such a
request that finds the queue empty and the engine idle (and no queue delay configured) runs at
once, without a trip through the queue.

A full queue rejects at once (:class:`OverloadedError`, 503 with Retry-After) instead of letting
latency grow without bound; each request has a deadline (:class:`RequestTimeoutError`), after
which it is dropped from the queue if it has not started.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.errors import ModelNotReadyError, OverloadedError, RequestTimeoutError
from service.tracing import StageTimes

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(slots=True)  # plain, not frozen: made per engine call
class BatchStats:
    """What one engine call did: its rows, each request's wait in the queue, the compute time."""

    rows: int
    requests: int
    queue_seconds: tuple[float, ...]
    compute_seconds: float


@dataclass
class _Pending:
    rows: np.ndarray  # (n, *input shape)
    future: asyncio.Future[np.ndarray]
    enqueued_at: float = field(default_factory=time.monotonic)
    times: StageTimes | None = None  # filled for tracing


class DynamicBatcher:
    """Coalesces ``submit`` calls into calls of ``predict(rows) -> outputs`` (row i ↔ row i)."""

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        timeout_s: float,
        executor: Executor | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "model",
        inline_below_s: float = 0.0,
    ) -> None:
        assert max_batch_size >= 1, f"max_batch_size must be >= 1, got {max_batch_size}"
        assert max_queue_size >= 1, f"max_queue_size must be >= 1, got {max_queue_size}"
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.timeout_s = timeout_s
        self._executor = executor
        self._on_batch = on_batch
        self.name = name
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self.inline_below_s = inline_below_s
        self._recent_compute_s = float("inf")  # moving average; unknown until the first call
        self._busy = False  # an engine call is running in a worker thread

    async def submit(self, rows: np.ndarray, times: StageTimes | None = None) -> np.ndarray:
        """Queue ``rows`` (n, ...) and wait for their outputs (n, ...); ``times``, when given,
        receives when they were queued and when their engine call started and finished.

        Everything up to the first ``await`` runs synchronously, so a caller that looked this
        batcher up in the same step is queued before any switch to a newer model can close it.
        """
        if self._closing:
            raise ModelNotReadyError(f"model {self.name!r} is being unloaded")
        if len(self._queue) >= self.max_queue_size:
            raise OverloadedError(
                f"model {self.name!r} is overloaded: {len(self._queue)} requests already "
                f"queued (BNN_MAX_QUEUE_SIZE={self.max_queue_size}); retry later"
            )
        if (
            not self._queue
            and not self._busy
            and self.max_queue_delay_s == 0
            and self._recent_compute_s < self.inline_below_s
        ):
            if times is not None:
                times.queued_ns = times.started_ns = time.time_ns()
            outputs, compute_s = self._timed_predict(rows)
            if times is not None:
                times.finished_ns, times.batch_rows = time.time_ns(), len(rows)
            self._record(compute_s, len(rows), (0.0,))
            return outputs
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        if times is not None:
            times.queued_ns = time.time_ns()
        self._queue.append(_Pending(rows, future, times=times))
        self._queued_rows += len(rows)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            # wait_for cancelled the future: the worker skips it if it has not started.
            raise RequestTimeoutError(
                f"model {self.name!r}: no result within {self.timeout_s:g} s "
                "(BNN_REQUEST_TIMEOUT_S)"
            ) from None

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker

    # --- worker ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_more_rows()
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    async def _wait_for_more_rows(self) -> None:
        deadline = self._queue[0].enqueued_at + self.max_queue_delay_s
        while self._queued_rows < self.max_batch_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        """The oldest live request plus every following one that fits in max_batch_size rows;
        a single request larger than that runs alone."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # timed out or its client went away
                self._queue.popleft()
                self._queued_rows -= len(item.rows)
                continue
            if batch and rows + len(item.rows) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= len(item.rows)
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        started_ns = time.time_ns()
        inputs = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        try:
            if self._recent_compute_s < self.inline_below_s:
                outputs, compute_s = self._timed_predict(inputs)
            else:
                self._busy = True
                loop = asyncio.get_running_loop()
                outputs, compute_s = await loop.run_in_executor(
                    self._executor, self._timed_predict, inputs
                )
        except BaseException as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation of the worker itself
            return
        finally:
            self._busy = False
        offset = 0
        for item in batch:
            count = len(item.rows)
            if item.times is not None:
                item.times.started_ns, item.times.batch_rows = started_ns, len(inputs)
                item.times.finished_ns = time.time_ns()
            if not item.future.done():
                item.future.set_result(outputs[offset : offset + count])
            offset += count
        self._record(compute_s, len(inputs), tuple(started - p.enqueued_at for p in batch))

    def _timed_predict(self, inputs: np.ndarray) -> tuple[np.ndarray, float]:
        """(outputs, seconds in the engine alone): a thread hop must not count as compute, or a
        cheap model once sent to a thread would look too slow to come back inline."""
        started = time.monotonic()
        outputs = self._predict(inputs)
        elapsed = time.monotonic() - started
        if len(outputs) != len(inputs):
            raise RuntimeError(f"predict returned {len(outputs)} rows for {len(inputs)}")
        return outputs, elapsed

    def _record(self, compute_s: float, rows: int, queue_seconds: tuple[float, ...]) -> None:
        """Update the moving average of engine time and report the batch.

        The average takes each call at most twice ``inline_below_s``: one call that the
        operating system preempted (a busy machine) cannot push a cheap model's average past
        the threshold and send its next several calls through a thread; that takes several
        slow calls in a row (four, from an average near zero)."""
        sample = min(compute_s, 2 * self.inline_below_s)
        previous = self._recent_compute_s
        self._recent_compute_s = (
            sample if previous == float("inf") else 0.8 * previous + 0.2 * sample
        )
        if self._on_batch is not None:
            self._on_batch(
                BatchStats(
                    rows=rows,
                    requests=len(queue_seconds),
                    queue_seconds=queue_seconds,
                    compute_seconds=compute_s,
                )
            )
