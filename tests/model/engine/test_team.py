"""The helper team (model.engine.team): its kernels against plain numpy references, its
hand-over when helpers are parked, busy or stopped, concurrent callers, a forked child, and its
configuration errors."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from model.engine import team as team_module
from model.engine.cpu import integer_bit_planes
from model.engine.layout import pad_rows
from model.engine.team import BUSY, DONE, GEN, IDLE, PARKED, STATE, STOPPED, Team
from model.packing import words_for
from tests.model.engine.test_kernels import random_words, ref_pack, ref_popcount

pytestmark = pytest.mark.skipif(not team_module.SUPPORTED, reason="helper teams need Linux")
SETTINGS = settings(max_examples=25, deadline=None)
SPIN_S = 50e-6


@pytest.fixture(scope="module", params=[1, 3], ids=["1 helper", "3 helpers"])
def team(request):
    t = Team(request.param, SPIN_S)
    yield t
    t.close()


def dense_case(seed, m, o, k):
    rng = np.random.default_rng(seed)
    (a, _), (w, _) = random_words(rng, (m,), k), random_words(rng, (o,), k)
    cut = rng.integers(-1, k + 2, size=o).astype(np.int64)
    invert = rng.integers(0, 2, size=o).astype(np.uint8)
    want = ref_pack((ref_popcount(a, w) >= cut) ^ invert.astype(bool))
    return a, w, cut, invert, want


@njit
def claim(ctl, h):
    """Take helper h as another call would (IDLE → BUSY)."""
    return team_module.compare_exchange(ctl[h], STATE, IDLE, BUSY)


def wait_for(condition, team, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        states = team.ctl[:, [STATE, GEN, DONE]].tolist()
        alive = [thread.is_alive() for thread in team._threads]
        assert time.monotonic() < deadline, f"timed out: (state, gen, done) {states}, alive {alive}"
        time.sleep(1e-4)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 70),
    o=st.integers(1, 300),
    k=st.one_of(st.integers(1, 1100), st.sampled_from([512, 4096])),
    chunk=st.sampled_from([1, 3, 64]),
)
def test_dense_threshold_pack_on_the_team(team, seed, m, o, k, chunk):
    a, w, cut, invert, want = dense_case(seed, m, o, k)
    sweep = np.zeros(1, np.uint8)
    for direction in (0, 1):  # the sweep flag flips on every call, as the OpenMP kernel's does
        assert sweep[0] == direction
        out = np.zeros((m, words_for(o)), np.uint64)
        team.dense_threshold_pack(a, w, cut, invert, out, chunk, 99, sweep)
        np.testing.assert_array_equal(out, want)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 9),
    o=st.integers(1, 300),
    k=st.integers(1, 700),
)
def test_xor_popcount_gemm_on_the_team(team, seed, m, o, k):
    rng = np.random.default_rng(seed)
    (a, _), (w, _) = random_words(rng, (m,), k), random_words(rng, (o,), k)
    sweep = np.zeros(1, np.uint8)
    for _ in range(2):
        counts = np.full((m, o), -1, np.int32)
        team.xor_popcount_gemm(a, w, counts, 99, sweep)
        np.testing.assert_array_equal(counts, ref_popcount(a, w))


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 6),
    o=st.integers(1, 200),
    f=st.integers(65, 800),
    high=st.sampled_from([1, 255]),
)
def test_planes_dense_threshold_pack_on_the_team(team, seed, m, o, f, high):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, high + 1, size=(m, f)).astype(np.float32)
    w, signs = random_words(rng, (o,), f)
    w = pad_rows(w)
    planes = integer_bit_planes(x, w.shape[1])
    pcw = np.bitwise_count(w).sum(axis=1).astype(np.int64)
    exact = x.astype(np.int64) @ signs.T.astype(np.int64)
    cut = (exact[0] + rng.integers(-2, 3, size=o)).astype(np.float64)
    invert = rng.integers(0, 2, size=o).astype(np.uint8)
    out = np.zeros((m, words_for(o)), np.uint64)
    team.planes_dense_threshold_pack(planes, w, pcw, cut, invert, out)
    np.testing.assert_array_equal(out, ref_pack((exact >= cut) ^ invert.astype(bool)))


def test_helpers_park_when_idle_and_a_call_wakes_them(team):
    a, w, cut, invert, want = dense_case(1, 1, 4096, 4096)
    out = np.zeros((1, 64), np.uint64)
    sweep = np.zeros(1, np.uint8)
    wait_for(lambda: (team.ctl[:, STATE] == PARKED).all(), team)  # after SPIN_S without a task
    gens = team.ctl[:, GEN].copy()
    team.dense_threshold_pack(a, w, cut, invert, out, 64, 2, sweep)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(team.ctl[:, GEN], gens + 1)  # every helper ran its part
    np.testing.assert_array_equal(team.ctl[:, DONE], gens + 1)


def test_a_busy_team_leaves_the_call_to_the_calling_thread():
    """Another call holding a helper: this one runs the serial kernel, with the same result,
    and the helpers it had claimed are released."""
    team = Team(2, spin_s=1.0)  # helpers stay IDLE for a second after a call
    a, w, cut, invert, want = dense_case(2, 3, 500, 300)
    try:
        out = np.zeros((3, words_for(500)), np.uint64)
        team.dense_threshold_pack(a, w, cut, invert, out, 64, 2, np.zeros(1, np.uint8))
        assert claim(team.ctl, 1)  # helper 1 taken by "another call"
        gens = team.ctl[:, GEN].copy()
        out[:] = 0
        team.dense_threshold_pack(a, w, cut, invert, out, 64, 2, np.zeros(1, np.uint8))
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(team.ctl[:, GEN], gens)  # no task was handed out
        assert team.ctl[0, STATE] == IDLE  # claimed, then released
        team.ctl[1, STATE] = IDLE
    finally:
        team.close()


def test_concurrent_callers_get_right_results(team):
    cases = [dense_case(seed, 2, 1000, 2000) for seed in range(4)]
    errors: list[str] = []

    def call(case):
        a, w, cut, invert, want = case
        sweep = np.zeros(1, np.uint8)
        for _ in range(200):
            out = np.zeros((2, words_for(1000)), np.uint64)
            team.dense_threshold_pack(a, w, cut, invert, out, 64, 2, sweep)
            if not np.array_equal(out, want):
                errors.append("wrong result")

    threads = [threading.Thread(target=call, args=(case,)) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_helpers_of_its_own(team):
    a, w, cut, invert, want = dense_case(3, 1, 4096, 4096)
    out = np.zeros((1, 64), np.uint64)
    team.dense_threshold_pack(a, w, cut, invert, out, 64, 2, np.zeros(1, np.uint8))
    pid = os.fork()
    if pid == 0:  # child: the parent's helper threads are not here
        try:
            gens = team.ctl[:, GEN].copy()
            child_out = np.zeros((1, 64), np.uint64)
            team.dense_threshold_pack(a, w, cut, invert, child_out, 64, 2, np.zeros(1, np.uint8))
            ran = bool((team.ctl[:, DONE] == gens + 1).all())
            os._exit(0 if np.array_equal(child_out, want) and ran else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_new_teams_first_call_waits_for_its_helpers():
    """A call that finds helpers just started (parked, or coming up) wakes them and waits:
    the first call of a new team runs on it, every time (a helper that turns IDLE between the
    caller's compare-and-swap and its next look once made the call give up)."""
    a, w, cut, invert, want = dense_case(6, 1, 256, 256)
    for _ in range(100):  # the race showed in ~1 of 40 new teams
        t = Team(2, SPIN_S)
        try:
            out = np.zeros((1, 4), np.uint64)
            t.dense_threshold_pack(a, w, cut, invert, out, 64, 2, np.zeros(1, np.uint8))
            np.testing.assert_array_equal(out, want)
            np.testing.assert_array_equal(t.ctl[:, DONE], [1, 1])
        finally:
            t.close()


def test_close_stops_every_helper():
    t = Team(2, SPIN_S)
    a, w, cut, invert, want = dense_case(4, 1, 256, 256)
    out = np.zeros((1, 4), np.uint64)
    t.dense_threshold_pack(a, w, cut, invert, out, 64, 2, np.zeros(1, np.uint8))
    t.close()
    assert not any(thread.is_alive() for thread in t._threads)
    assert (t.ctl[:, STATE] == STOPPED).all()
    assert t.tasks.sum() >= 2  # each helper ran the task above
    out[:] = 0  # a closed team still computes, on the calling thread
    t.dense_threshold_pack(a, w, cut, invert, out, 64, 2, np.zeros(1, np.uint8))
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize(
    ("helpers", "spin_s", "message"),
    [(0, SPIN_S, "at least one helper"), (1, 0.0, "spin time must be positive")],
)
def test_team_arguments_are_checked(helpers, spin_s, message):
    with pytest.raises(ValueError, match=message):
        Team(helpers, spin_s)


@pytest.mark.parametrize(
    ("value", "message"),
    [("fast", "must be a number of microseconds, got 'fast'"), ("-5", "must be ≥ 0")],
)
def test_spin_setting_errors_name_the_variable(monkeypatch, value, message):
    monkeypatch.setenv(team_module.SPIN_ENV, value)
    monkeypatch.setattr(team_module, "_shared", {})
    with pytest.raises(ValueError, match=f"{team_module.SPIN_ENV} {message}"):
        team_module.shared_team(2)  # as the executor asks for it when a model loads


def test_spin_setting(monkeypatch):
    monkeypatch.setenv(team_module.SPIN_ENV, "125")
    assert team_module.spin_seconds() == pytest.approx(125e-6)
    monkeypatch.delenv(team_module.SPIN_ENV)
    assert team_module.spin_seconds() == team_module.DEFAULT_SPIN_S
    monkeypatch.setattr(team_module, "_shared", {})
    monkeypatch.setenv(team_module.SPIN_ENV, "0")
    assert team_module.shared_team(2) is None  # 0 turns the team off
    assert team_module.shared_team(1) is None  # nothing to share with one thread


def test_shared_teams_by_thread_count(monkeypatch):
    """A team per thread count, kept: a model loaded under another count keeps working."""
    monkeypatch.setattr(team_module, "_shared", {})
    monkeypatch.setenv(team_module.SPIN_ENV, "50")
    two, three = team_module.shared_team(2), team_module.shared_team(3)
    try:
        assert (two.helpers, three.helpers) == (1, 2)
        assert team_module.shared_team(2) is two
        a, w, cut, invert, want = dense_case(7, 1, 256, 256)
        out = np.zeros((1, 4), np.uint64)
        two.dense_threshold_pack(a, w, cut, invert, out, 64, 2, np.zeros(1, np.uint8))
        np.testing.assert_array_equal(out, want)
        assert two.ctl[0, DONE] == 1  # ran on the first team's helper, not stopped by the second
    finally:
        two.close()
        three.close()
