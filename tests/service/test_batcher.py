"""The batcher with plain Python functions as the model: real callables, observable calls."""

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import BatchStats, DynamicBatcher
from service.errors import ModelNotReadyError, OverloadedError, RequestTimeoutError


class RecordingModel:
    """Doubles its input; records the rows of every call; optionally slow."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None):
        self.calls: list[int] = []
        self.delay_s = delay_s
        self.gate = gate

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay_s)
        return x * 2


def make(model, **options) -> DynamicBatcher:
    defaults = dict(max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=100, timeout_s=5.0)
    return DynamicBatcher(model, **(defaults | options))


def rows(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 3), value, np.float32)


def run(coroutine):
    return asyncio.run(coroutine)


def test_each_request_gets_its_own_rows_back():
    async def scenario():
        batcher = make(RecordingModel(delay_s=0.01))
        results = await asyncio.gather(*(batcher.submit(rows(i, n=1 + i % 3)) for i in range(20)))
        await batcher.close()
        return results

    for i, result in enumerate(run(scenario())):
        np.testing.assert_array_equal(result, rows(2 * i, n=1 + i % 3))


def test_requests_arriving_while_the_engine_runs_coalesce():
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    async def scenario():
        batcher = make(model, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(rows(0)))
        await asyncio.sleep(0.05)  # the first call is now blocked in the engine
        rest = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *rest)
        await batcher.close()

    run(scenario())
    # 1 alone, then the 10 waiting ones in batches of at most 8 rows.
    assert model.calls == [1, 8, 2]


def test_queue_delay_waits_for_company_when_idle():
    model = RecordingModel()

    async def scenario():
        batcher = make(model, max_batch_size=4, max_queue_delay_s=0.2)
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher.submit(rows(2, n=3)))  # fills the batch: no wait
        await asyncio.gather(first, second)
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    elapsed = run(scenario())
    assert model.calls == [4]
    assert elapsed < 0.15  # dispatched when full, not after the 0.2 s delay


def test_queue_delay_is_an_upper_bound():
    model = RecordingModel()

    async def scenario():
        batcher = make(model, max_batch_size=64, max_queue_delay_s=0.05)
        started = time.monotonic()
        await batcher.submit(rows(1))
        return time.monotonic() - started

    elapsed = run(scenario())
    assert model.calls == [1]
    assert 0.04 <= elapsed < 0.5


def test_a_request_larger_than_the_batch_runs_alone():
    model = RecordingModel()

    async def scenario():
        batcher = make(model, max_batch_size=4)
        result = await batcher.submit(rows(1, n=10))
        await batcher.close()
        return result

    assert run(scenario()).shape == (10, 3)
    assert model.calls == [10]


def test_full_queue_rejects_at_once():
    gate = threading.Event()

    async def scenario():
        batcher = make(RecordingModel(gate=gate), max_queue_size=2, max_batch_size=1)
        running = asyncio.ensure_future(batcher.submit(rows(0)))
        await asyncio.sleep(0.05)  # in the engine; the queue is empty again
        queued = [asyncio.ensure_future(batcher.submit(rows(i))) for i in (1, 2)]
        await asyncio.sleep(0)
        started = time.monotonic()
        with pytest.raises(OverloadedError, match="BNN_MAX_QUEUE_SIZE=2"):
            await batcher.submit(rows(3))
        rejected_after = time.monotonic() - started
        gate.set()
        await asyncio.gather(running, *queued)
        await batcher.close()
        return rejected_after

    assert run(scenario()) < 0.05


def test_timeout_drops_a_request_that_has_not_started():
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    async def scenario():
        batcher = make(model, max_batch_size=1, timeout_s=0.1)
        running = asyncio.ensure_future(batcher.submit(rows(0)))
        await asyncio.sleep(0.02)
        with pytest.raises(RequestTimeoutError, match="no result within 0.1 s"):
            await batcher.submit(rows(1))
        gate.set()
        with pytest.raises(RequestTimeoutError):
            await running  # it too passed its deadline while the engine was blocked
        await batcher.close()

    run(scenario())
    assert model.calls == [1]  # the timed-out queued request never reached the engine


def test_engine_errors_reach_every_request_of_the_batch():
    def failing(x):
        raise ValueError("engine exploded")

    async def scenario():
        batcher = make(failing)
        results = await asyncio.gather(
            *(batcher.submit(rows(i)) for i in range(3)), return_exceptions=True
        )
        await batcher.close()
        return results

    results = run(scenario())
    assert all(isinstance(r, ValueError) and str(r) == "engine exploded" for r in results)


def test_close_finishes_queued_requests_then_refuses_new_ones():
    model = RecordingModel(delay_s=0.02)

    async def scenario():
        batcher = make(model, max_batch_size=2)
        pending = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.close()
        assert sum(model.calls) == 5  # every queued request ran before close returned
        results = await asyncio.gather(*pending)
        assert [float(r[0, 0]) for r in results] == [0, 2, 4, 6, 8]
        with pytest.raises(ModelNotReadyError):
            await batcher.submit(rows(9))

    run(scenario())


def test_batch_statistics_are_reported():
    stats: list[BatchStats] = []
    gate = threading.Event()

    async def scenario():
        batcher = make(RecordingModel(gate=gate), on_batch=stats.append)
        first = asyncio.ensure_future(batcher.submit(rows(0)))
        await asyncio.sleep(0.05)
        more = [asyncio.ensure_future(batcher.submit(rows(i, n=2))) for i in range(3)]
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(first, *more)
        await batcher.close()

    run(scenario())
    assert [(s.rows, s.requests) for s in stats] == [(1, 1), (6, 3)]
    assert all(q >= 0.01 for q in stats[1].queue_seconds)  # they waited for the first call


def test_cheap_engine_runs_inline_on_the_event_loop_and_costly_one_in_a_thread():
    threads: list[int] = []

    def model(x):
        threads.append(threading.get_ident())
        return x * 2

    async def scenario(inline_below_s):
        threads.clear()
        batcher = make(model, inline_below_s=inline_below_s)
        loop_thread = threading.get_ident()
        for i in range(3):
            np.testing.assert_array_equal(await batcher.submit(rows(i)), rows(2 * i))
        await batcher.close()
        return loop_thread

    loop_thread = run(scenario(inline_below_s=10.0))
    # The first call measures the engine in a thread; once known to be cheap, calls run inline.
    assert threads[0] != loop_thread and threads[1:] == [loop_thread, loop_thread]
    loop_thread = run(scenario(inline_below_s=0.0))
    assert loop_thread not in threads


def test_one_slow_call_does_not_send_a_cheap_engine_off_the_event_loop():
    """A call the operating system preempted (here: one that sleeps 10x the threshold) counts
    at most twice the threshold in the moving average: the next call still runs inline."""
    threads: list[int] = []
    slow = {2}  # the third call

    def model(x):
        threads.append(threading.get_ident())
        if len(threads) - 1 in slow:
            time.sleep(0.1)
        return x * 2

    async def scenario():
        batcher = make(model, inline_below_s=0.01)
        for i in range(4):
            await batcher.submit(rows(i))
        await batcher.close()
        return threading.get_ident()

    loop_thread = run(scenario())
    assert threads[1:] == [loop_thread] * 3


def test_inline_mode_still_batches_requests_that_queue_behind_a_running_call():
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    async def scenario():
        batcher = make(model, max_batch_size=8, inline_below_s=0.0)
        first = asyncio.ensure_future(batcher.submit(rows(0)))
        await asyncio.sleep(0.05)
        batcher.inline_below_s = 10.0  # cheap from now on, but the engine is busy
        rest = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(1, 5)]
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(first, *rest)
        await batcher.close()

    run(scenario())
    assert model.calls == [1, 4]
