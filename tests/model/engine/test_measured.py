"""Measured dispatch: a large call runs whichever kernel set has been faster lately, probes the
other now and then, and switches back when that one recovers. Times are injected (a fake clock
or recorded seconds), so nothing here depends on how busy the machine is."""

from __future__ import annotations

import numpy as np
import pytest

from model import load_model
from model.engine.dispatch import Dispatch
from model.engine.kernels import PARALLEL, SERIAL
from model.engine.measured import (
    MAX_PROBE_COST,
    PARALLEL_KERNELS,
    SERIAL_KERNELS,
    MeasuredChoice,
)
from tests.model.engine.reference import mlp_spec, write_model


def run_calls(choice: MeasuredChoice, batch: int, seconds: dict[str, float], calls: int) -> list:
    """``calls`` calls of ``batch`` rows, each set taking its fixed ``seconds``; the sets run."""
    ran = []
    for _ in range(calls):
        kind = choice.choose(batch)
        choice.record(batch, kind, seconds[kind])
        ran.append(kind)
    return ran


def test_tries_both_sets_then_runs_the_faster():
    choice = MeasuredChoice(probe_every=32)
    ran = run_calls(choice, 1, {SERIAL_KERNELS: 2e-3, PARALLEL_KERNELS: 1e-3}, 30)
    assert ran[:4] == [PARALLEL_KERNELS, PARALLEL_KERNELS, SERIAL_KERNELS, SERIAL_KERNELS]
    assert set(ran[4:]) == {PARALLEL_KERNELS}
    choice = MeasuredChoice(probe_every=32)
    ran = run_calls(choice, 1, {SERIAL_KERNELS: 2e-3, PARALLEL_KERNELS: 70e-3}, 30)
    assert set(ran[4:]) == {SERIAL_KERNELS}


def test_a_sets_first_call_is_not_a_sample():
    """A first call pays for compiling the kernels: 0.8 s against 0.4 ms steady must not keep
    the bucket on the other set (a 2000× ratio would probe only every 16,000 calls)."""
    choice = MeasuredChoice(probe_every=32)
    for kind, seconds in [(PARALLEL_KERNELS, 0.8), (PARALLEL_KERNELS, 4e-4)]:
        assert choice.choose(1) == kind
        choice.record(1, kind, seconds)
    for kind, seconds in [(SERIAL_KERNELS, 0.5), (SERIAL_KERNELS, 6e-4)]:
        assert choice.choose(1) == kind
        choice.record(1, kind, seconds)
    assert choice.estimates(1) == {SERIAL_KERNELS: 6e-4, PARALLEL_KERNELS: 4e-4}
    assert run_calls(choice, 1, {SERIAL_KERNELS: 6e-4, PARALLEL_KERNELS: 4e-4}, 20) == (
        [PARALLEL_KERNELS] * 20
    )


def test_probes_the_slower_set_once_every_probe_every_calls():
    choice = MeasuredChoice(probe_every=32)
    ran = run_calls(choice, 1, {SERIAL_KERNELS: 2e-3, PARALLEL_KERNELS: 5e-3}, 3 * 32 + 2)
    probes = [i + 1 for i, kind in enumerate(ran) if kind == PARALLEL_KERNELS]
    assert probes == [1, 2, 32, 64, 96]  # the first two calls: a warm-up and a sample


def test_probes_cost_at_most_an_eighth_of_the_faster_sets_time():
    """40× apart: the slower set is probed once every 40 / MAX_PROBE_COST = 320 calls."""
    assert MAX_PROBE_COST == 0.125
    choice = MeasuredChoice(probe_every=32)
    ran = run_calls(choice, 1, {SERIAL_KERNELS: 2e-3, PARALLEL_KERNELS: 80e-3}, 2 + 3 * 320)
    probes = [i + 1 for i, kind in enumerate(ran) if kind == PARALLEL_KERNELS]
    assert probes == [1, 2, 320, 640, 960]


def test_a_probe_replaces_the_probed_sets_time():
    choice = MeasuredChoice(probe_every=32)
    run_calls(choice, 1, {SERIAL_KERNELS: 2e-3, PARALLEL_KERNELS: 6e-3}, 31)
    ran = run_calls(choice, 1, {SERIAL_KERNELS: 2e-3, PARALLEL_KERNELS: 1e-3}, 2)
    assert ran == [PARALLEL_KERNELS, PARALLEL_KERNELS]  # the probe at call 32, then the winner
    assert choice.estimates(1)[PARALLEL_KERNELS] == 1e-3


def test_a_neighbour_arriving_switches_on_the_next_call_and_leaving_switches_back():
    choice = MeasuredChoice(probe_every=32)
    quiet = {SERIAL_KERNELS: 2e-3, PARALLEL_KERNELS: 1e-3}
    busy = {SERIAL_KERNELS: 2.2e-3, PARALLEL_KERNELS: 73e-3}
    run_calls(choice, 1, quiet, 40)
    assert choice.faster(1) == PARALLEL_KERNELS
    # the first slow parallel call makes the next one probe serial, which then wins
    ran = run_calls(choice, 1, busy, 3)
    assert ran == [PARALLEL_KERNELS, SERIAL_KERNELS, SERIAL_KERNELS]
    ran = run_calls(choice, 1, busy, 200)
    assert ran.count(PARALLEL_KERNELS) <= 200 // 32 + 1
    # the neighbour leaves: the periodic probes find parallel fast again
    ran = run_calls(choice, 1, quiet, 32 * 20)
    assert ran[-40:].count(PARALLEL_KERNELS) >= 38
    assert choice.faster(1) == PARALLEL_KERNELS


def test_batches_are_measured_per_power_of_two_bucket_per_row():
    choice = MeasuredChoice()
    run_calls(choice, 1, {SERIAL_KERNELS: 2e-3, PARALLEL_KERNELS: 9e-3}, 4)
    run_calls(choice, 64, {SERIAL_KERNELS: 64e-3, PARALLEL_KERNELS: 32e-3}, 4)
    assert choice.faster(1) == SERIAL_KERNELS
    assert choice.faster(64) == PARALLEL_KERNELS == choice.faster(100)  # 64..127: one bucket
    assert choice.estimates(64) == {SERIAL_KERNELS: 1e-3, PARALLEL_KERNELS: 0.5e-3}
    assert choice.estimates(2) == {SERIAL_KERNELS: None, PARALLEL_KERNELS: None}


def test_dispatch_times_each_large_call_with_its_clock():
    """Dispatch.run hands the chosen kernels to the computation and charges it the clock's
    time; a fake clock that the computation advances decides the choice."""
    now = [0.0]
    cost = {id(SERIAL): 1.0, id(PARALLEL): 5.0}

    def compute(kset):
        now[0] += cost[id(kset)]
        return kset

    policy = Dispatch(serial_rows=4, measured=MeasuredChoice(lambda: now[0], probe_every=100))
    ran = [policy.run(4, compute) for _ in range(7)]
    assert ran == [PARALLEL, PARALLEL, SERIAL, SERIAL, SERIAL, SERIAL, SERIAL]
    assert policy.measured.estimates(4) == {SERIAL_KERNELS: 0.25, PARALLEL_KERNELS: 1.25}
    assert policy.run(3, compute) is SERIAL  # small: serial, not measured
    assert policy.measured.estimates(3) == {SERIAL_KERNELS: None, PARALLEL_KERNELS: None}


def test_a_forked_child_runs_serial_kernels_unmeasured(monkeypatch):
    """Where the parallel kernels cannot run (a child forked after OpenMP started), every call
    runs the serial ones and nothing is measured."""
    from model.engine import runtime

    monkeypatch.setattr(runtime, "parallel_kernels_usable", lambda: False)
    policy = Dispatch(serial_rows=4, measured=MeasuredChoice(lambda: 0.0))
    assert [policy.run(8, lambda kset: kset) for _ in range(3)] == [SERIAL] * 3
    assert policy.measured.estimates(8) == {SERIAL_KERNELS: None, PARALLEL_KERNELS: None}


@pytest.fixture(scope="module")
def wide_mlp(tmp_path_factory):
    path = tmp_path_factory.mktemp("measured") / "model.safetensors"
    spec = mlp_spec(input_shape=(1, 8, 8), features=64)
    return load_model(write_model(path, spec, np.random.default_rng(3)))


def test_measured_calls_give_the_same_bits_whichever_set_runs(wide_mlp, monkeypatch):
    """Large calls through the measured choice (probing every other call, so both sets run)
    equal the serial kernels' results bit for bit."""
    executor = wide_mlp._executor
    rows = executor._dispatch.serial_rows
    ticks = iter(range(10**6))
    policy = Dispatch(rows, MeasuredChoice(lambda: float(next(ticks)), probe_every=2))
    monkeypatch.setattr(executor, "_dispatch", policy)
    x = wide_mlp.check_input(np.random.default_rng(0).integers(0, 17, (rows, 1, 8, 8)))
    expected = executor.run(x, SERIAL)
    for _ in range(6):
        np.testing.assert_array_equal(executor.run(x), expected)
    estimates = policy.measured.estimates(rows)
    assert None not in estimates.values(), estimates  # both sets ran
