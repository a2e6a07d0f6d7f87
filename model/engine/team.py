"""Helper threads that stay awake between kernel calls: the other cores for binary layers.

A 4096×4096 binary layer at batch 1 streams 2 MiB of packed weights in about 12 µs on two
cores. Running it as a numba ``prange`` kernel adds the start and join of an OpenMP parallel
region, about 1.5 µs empty on these machines (libgomp makes two futex calls per region), and
more when its worker has to be woken. A :class:`Team` keeps ``helpers`` threads spinning on a
control block for a while after each task instead, so that a call only publishes its task and
waits for the helpers' ``done`` flags: about 15% less time per call for that layer, measured
side by side with the OpenMP kernel (``python -m bench engine`` reports both). On a 128×512
layer, whose work is negligible, a call takes 0.9 µs on the team, 0.8 µs on one thread and
2.1 µs as an OpenMP kernel (medians of 20,000 calls, 2-core AMD EPYC VM).

Protocol, per helper h, on row h of the int64 control block ``ctl`` (each field on its own
cache line; every load and store of a flag is atomic, with acquire/release ordering):

* A caller claims every helper by compare-and-swap of ``state`` IDLE → BUSY. A PARKED helper
  it wakes first (PARKED → WAKING, futex wake) and waits for; if one is BUSY with another call,
  it releases those it claimed and runs the serial kernel instead.
* It writes the task into the row (kind, part index, sweep direction, array addresses and
  shapes) and stores ``gen + 1``, runs part 0 itself, then waits for ``done == gen``.
* The helper, spinning on ``gen``, runs its part, sets ``state`` to IDLE and stores ``done``.
* After ``spin`` pause instructions without a task (about :data:`DEFAULT_SPIN_S`) it parks:
  compare-and-swap IDLE → PARKED (which fails if a caller claimed it just then), then sleeps in
  futex wait on its state word, without the GIL, until a caller wakes it.

Work is split exactly as the OpenMP kernels split it (:func:`~model.engine.kernels.dense_part`,
:func:`~model.engine.kernels.gemm_part`, :func:`~model.engine.kernels.planes_part`), so the
results are identical, and each thread walks the same weight rows on every call: they stay in
its core's L2. Linux only (futexes); elsewhere :func:`shared_team` is None and the executor
uses the OpenMP kernels.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import threading
import time
import weakref

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from model.engine.kernels import (
    SERIAL,
    KernelSet,
    dense_part,
    dense_parts,
    gemm_part,
    gemm_parts,
    next_sweep,
    planes_part,
)

# How long a helper spins for the next task before it parks (seconds). Environment override in
# microseconds: BNN_SPIN_US; 0 turns the team off (every call runs the OpenMP kernels).
DEFAULT_SPIN_S = 200e-6
SPIN_ENV = "BNN_SPIN_US"

# control block: one row per helper; fields 8 words (one cache line) apart
GEN, DONE, STATE, TASK = 0, 8, 16, 24
ROW_WORDS = 48
PARKED, IDLE, BUSY, WAKING, STOPPED = 0, 1, 2, 3, 4
# TASK + i: kind, part, parts, reverse, row_chunk; from OPERANDS on each operand's address then
# its extents, in the order of the kind's kernel arguments (PLANES, the longest, ends at 45)
OPERANDS = TASK + 5
DENSE, GEMM, PLANES = 1, 2, 3
_JIT = {"nogil": True, "cache": True}


# --- atomics and pointers as LLVM instructions ---------------------------------------------------
def _slot(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


@intrinsic
def load_acquire(typingctx, ctl, index):
    """ctl[index] of an int64 array, read with acquire ordering."""
    sig = types.int64(ctl, types.intp)

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig.args[0], *args), "acquire", 8)

    return sig, codegen


@intrinsic
def store_release(typingctx, ctl, index, value):
    """ctl[index] = value on an int64 array, with release ordering."""
    sig = types.void(ctl, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def compare_exchange(typingctx, ctl, index, expected, desired):
    """Atomically ctl[index] = desired if it equals expected (sequentially consistent); True if
    it did."""
    sig = types.boolean(ctl, types.intp, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1])
        pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return sig, codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@intrinsic
def cpu_pause(typingctx):
    """The spin-wait hint (x86 ``pause``): lets the other hyperthread run and saves power."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        if _X86:
            fn_type = ir.FunctionType(ir.VoidType(), [])
            pause = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def pointer_to(typingctx, address, dtype):
    """The integer ``address`` as a pointer to ``dtype`` values (for :func:`numba.carray`)."""
    target = getattr(dtype, "instance_type", None)
    if not isinstance(address, types.Integer) or not isinstance(target, types.Number):
        return None
    sig = types.CPointer(target)(address, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return sig, codegen


# Linux futex(2) through libc's syscall(): the helper sleeps in the kernel on its state word
# without holding the GIL, and a caller wakes it in about a microsecond.
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(
    platform.machine().lower()
)
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129
SUPPORTED = sys.platform.startswith("linux") and _SYS_FUTEX is not None


@intrinsic
def futex(typingctx, ctl, index, op, value):
    """futex(&ctl[index], op, value) on the low 32 bits of an int64 array element (little-endian):
    FUTEX_WAIT_PRIVATE sleeps while it equals ``value``, FUTEX_WAKE_PRIVATE wakes ``value``
    sleepers."""
    sig = types.int64(ctl, types.intp, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn_type = ir.FunctionType(i64, [i64], var_arg=True)
        syscall = cgutils.get_or_insert_function(builder.module, fn_type, "syscall")
        address = builder.ptrtoint(_slot(context, builder, sig.args[0], args[0], args[1]), i64)
        zero = ir.Constant(i64, 0)
        number = ir.Constant(i64, _SYS_FUTEX or -1)
        return builder.call(syscall, [number, address, args[2], args[3], zero, zero, zero])

    return sig, codegen


# --- the helper's loop and the caller's side ------------------------------------------------------
@njit(**_JIT)
def _vector(row, at, dtype):
    """The 1-D array a task row describes at ``at`` (address, length), and where the next
    operand starts."""
    return carray(pointer_to(row[at], dtype), (row[at + 1],)), at + 2


@njit(**_JIT)
def _matrix(row, at, dtype):
    """The C-contiguous 2-D array a task row describes at ``at`` (address, extents), and where
    the next operand starts."""
    return carray(pointer_to(row[at], dtype), (row[at + 1], row[at + 2])), at + 3


@njit(**_JIT)
def _cube(row, at, dtype):
    """The C-contiguous 3-D array a task row describes at ``at``, and where the next operand
    starts."""
    return carray(pointer_to(row[at], dtype), (row[at + 1], row[at + 2], row[at + 3])), at + 4


@njit(**_JIT)
def _put(row, at, array):
    """Describe ``array`` (C-contiguous) at ``at``; returns where the next operand goes."""
    row[at] = array.ctypes.data
    for d in range(array.ndim):
        row[at + 1 + d] = array.shape[d]
    return at + 1 + array.ndim


@njit(**_JIT)
def _run_task(row):
    """Run the part of the task on ``row`` that is this helper's."""
    kind, part, parts, reverse = row[TASK], row[TASK + 1], row[TASK + 2], row[TASK + 3] != 0
    if kind == PLANES:
        planes, at = _cube(row, OPERANDS, np.uint64)
        w, at = _matrix(row, at, np.uint64)
        pcw, at = _vector(row, at, np.int64)
        cut, at = _vector(row, at, np.float64)
        invert, at = _vector(row, at, np.uint8)
        out, at = _matrix(row, at, np.uint64)
        planes_part(planes, w, pcw, cut, invert, out, parts, part)
        return
    a, at = _matrix(row, OPERANDS, np.uint64)
    w, at = _matrix(row, at, np.uint64)
    if kind == DENSE:
        cut, at = _vector(row, at, np.int64)
        invert, at = _vector(row, at, np.uint8)
        out, at = _matrix(row, at, np.uint64)
        dense_part(a, w, cut, invert, out, row[TASK + 4], parts, part, reverse)
    else:
        counts, at = _matrix(row, at, np.int32)
        gemm_part(a, w, counts, parts, part, reverse)


@njit(**_JIT)
def serve(ctl, h, spin):
    """Helper h's loop: run each task published on row h; after ``spin`` idle pauses park
    (state PARKED, asleep in futex wait) until a caller's claim wakes it. Returns, with the
    number of tasks it ran, once the state is STOPPED. Starts parked."""
    row = ctl[h]
    seen = load_acquire(row, GEN)
    tasks, idle = 0, 0
    awake = _sleep(row)
    while awake:
        gen = load_acquire(row, GEN)
        if gen != seen:
            seen = gen
            _run_task(row)
            tasks += 1
            idle = 0
            store_release(row, STATE, IDLE)
            store_release(row, DONE, gen)
        elif idle < spin:
            idle += 1
            cpu_pause()
        elif compare_exchange(row, STATE, IDLE, PARKED):
            awake = _sleep(row)
            idle = 0
        elif load_acquire(row, STATE) == STOPPED:
            awake = False
        # else a caller claimed this helper just now: its task is on the way
    return tasks


@njit(**_JIT)
def _sleep(row):
    """Sleep while the state is PARKED; True once woken (WAKING → IDLE), False if STOPPED."""
    while load_acquire(row, STATE) == PARKED:
        futex(row, STATE, FUTEX_WAIT_PRIVATE, PARKED)
    return compare_exchange(row, STATE, WAKING, IDLE)


@njit(**_JIT)
def stop(ctl, h):
    """Ask helper h to stop: True once it is STOPPED or will stop (it was IDLE or PARKED); False
    while a call is using it (BUSY) or it is waking (try again)."""
    row = ctl[h]
    if compare_exchange(row, STATE, PARKED, STOPPED):
        futex(row, STATE, FUTEX_WAKE_PRIVATE, 1)
        return True
    return compare_exchange(row, STATE, IDLE, STOPPED) or load_acquire(row, STATE) == STOPPED


@njit(**_JIT)
def _claim(ctl):
    """Claim every helper (IDLE → BUSY), waking parked ones and waiting for them to come up;
    False, with none claimed, if one is in use by another call or stopped."""
    for h in range(ctl.shape[0]):
        row = ctl[h]
        while not compare_exchange(row, STATE, IDLE, BUSY):
            state = load_acquire(row, STATE)
            if state == PARKED:
                if compare_exchange(row, STATE, PARKED, WAKING):
                    futex(row, STATE, FUTEX_WAKE_PRIVATE, 1)
            elif state in (BUSY, STOPPED):  # in use by another call, or closed
                for g in range(h):
                    store_release(ctl[g], STATE, IDLE)
                return False
            else:  # WAKING, or IDLE again since the compare-and-swap: try again
                cpu_pause()
    return True


@njit(**_JIT)
def _publish(ctl, parts, reverse):
    """Hand part h + 1 of ``parts`` to helper h (the task's operands written first); returns the
    task's generation (every row's counts the same: a call claims all helpers or none)."""
    gen = ctl[0, GEN] + 1
    for h in range(ctl.shape[0]):
        row = ctl[h]
        row[TASK + 1], row[TASK + 2], row[TASK + 3] = h + 1, parts, reverse
        store_release(row, GEN, gen)
    return gen


@njit(**_JIT)
def _join(ctl, gen):
    """Wait until every helper has finished task ``gen`` (a helper is IDLE, so claimable by the
    next call, a moment before it stores ``done``: hence ≥)."""
    for h in range(ctl.shape[0]):
        while load_acquire(ctl[h], DONE) < gen:
            cpu_pause()


@njit(**_JIT)
def team_dense(ctl, a, w, cut, invert, out, row_chunk, sweep):
    """:func:`~model.engine.kernels.dense_threshold_pack` on the caller and the team's helpers
    (one range each); False, with nothing computed, if the team was not free."""
    parts = dense_parts(a, out, row_chunk, ctl.shape[0] + 1)
    if parts != ctl.shape[0] + 1 or not _claim(ctl):
        return False
    for h in range(ctl.shape[0]):
        row = ctl[h]
        row[TASK], row[TASK + 4] = DENSE, row_chunk
        at = _put(row, _put(row, OPERANDS, a), w)
        _put(row, _put(row, _put(row, at, cut), invert), out)
    reverse = next_sweep(sweep)
    gen = _publish(ctl, parts, reverse)
    dense_part(a, w, cut, invert, out, row_chunk, parts, 0, reverse)
    _join(ctl, gen)
    return True


@njit(**_JIT)
def team_gemm(ctl, a, w, counts, sweep):
    """:func:`~model.engine.kernels.xor_popcount_gemm` on the caller and the team's helpers;
    False, with nothing computed, if the team was not free."""
    parts = gemm_parts(a, w, ctl.shape[0] + 1)
    if parts != ctl.shape[0] + 1 or not _claim(ctl):
        return False
    for h in range(ctl.shape[0]):
        row = ctl[h]
        row[TASK] = GEMM
        _put(row, _put(row, _put(row, OPERANDS, a), w), counts)
    reverse = next_sweep(sweep)
    gen = _publish(ctl, parts, reverse)
    gemm_part(a, w, counts, parts, 0, reverse)
    _join(ctl, gen)
    return True


@njit(**_JIT)
def team_planes(ctl, planes, w, pcw, cut, invert, out):
    """:func:`~model.engine.kernels.planes_dense_threshold_pack` on the caller and the team's
    helpers; False, with nothing computed, if the team was not free."""
    parts = ctl.shape[0] + 1
    if out.shape[1] * planes.shape[1] < parts or not _claim(ctl):
        return False
    for h in range(ctl.shape[0]):
        row = ctl[h]
        row[TASK] = PLANES
        at = _put(row, _put(row, _put(row, OPERANDS, planes), w), pcw)
        _put(row, _put(row, _put(row, at, cut), invert), out)
    gen = _publish(ctl, parts, False)  # planes_part walks its range forwards only
    planes_part(planes, w, pcw, cut, invert, out, parts, 0)
    _join(ctl, gen)
    return True


@njit(**_JIT)
def _pauses(n):
    for _ in range(n):
        cpu_pause()


def pauses_per_second() -> float:
    """How many ``pause`` instructions this core runs per second (from 2 × 10⁵ of them)."""
    _pauses(1)
    n, best = 200_000, float("inf")
    for _ in range(3):
        start = time.perf_counter()
        _pauses(n)
        best = min(best, time.perf_counter() - start)
    return n / max(best, 1e-9)


# --- threads --------------------------------------------------------------------------------------
_TEAMS: weakref.WeakSet[Team] = weakref.WeakSet()


class Team:
    """``helpers`` threads that run the other ranges of binary layer kernels, spinning for
    ``spin_s`` seconds after each task before they park (see the module docstring). The threads
    start parked with the team; a forked child starts its own."""

    def __init__(self, helpers: int, spin_s: float = DEFAULT_SPIN_S) -> None:
        if not SUPPORTED:
            raise RuntimeError(f"helper threads need Linux futexes; this is {sys.platform}")
        if helpers < 1:
            raise ValueError(f"a team needs at least one helper thread, got {helpers}")
        if not spin_s > 0:
            raise ValueError(f"spin time must be positive seconds, got {spin_s}")
        self.helpers = helpers
        self.spin_s = spin_s
        self._spin = max(1, int(spin_s * pauses_per_second()))
        # 64-byte aligned rows, zero: every helper PARKED with gen = done = 0
        raw = np.zeros(helpers * ROW_WORDS + 8, np.int64)
        skip = (-raw.ctypes.data % 64) // 8
        self.ctl = raw[skip : skip + helpers * ROW_WORDS].reshape(helpers, ROW_WORDS)
        self.tasks = np.zeros(helpers, np.int64)  # tasks each helper ran, counted when it stops
        self._threads: list[threading.Thread] = []
        self._start()
        _TEAMS.add(self)

    # The executor's kernels (same arguments as kernels.PARALLEL's): run on the team, waking
    # parked helpers first, or on the calling thread alone (the serial twin) when another call
    # is using the team. ``ranges`` is ignored: the team splits the work into helpers + 1.
    def dense_threshold_pack(self, a, w, cut, invert, out, row_chunk, ranges, sweep) -> None:
        if not team_dense(self.ctl, a, w, cut, invert, out, row_chunk, sweep):
            SERIAL.dense_threshold_pack(a, w, cut, invert, out, row_chunk, 1, sweep)

    def xor_popcount_gemm(self, a, w, counts, ranges, sweep) -> None:
        if not team_gemm(self.ctl, a, w, counts, sweep):
            SERIAL.xor_popcount_gemm(a, w, counts, 1, sweep)

    def planes_dense_threshold_pack(self, planes, w, pcw, cut, invert, out) -> None:
        if not team_planes(self.ctl, planes, w, pcw, cut, invert, out):
            SERIAL.planes_dense_threshold_pack(planes, w, pcw, cut, invert, out)

    def kernel_set(self) -> KernelSet:
        """:data:`~model.engine.kernels.SERIAL` with the binary dense kernels run by the team:
        what the executor runs for calls of a few rows (see ``model.engine.cpu``)."""
        return dataclasses.replace(
            SERIAL,
            dense_threshold_pack=self.dense_threshold_pack,
            xor_popcount_gemm=self.xor_popcount_gemm,
            planes_dense_threshold_pack=self.planes_dense_threshold_pack,
        )

    def _start(self) -> None:
        """One thread per helper, parked until a call claims it."""
        self._threads = [
            threading.Thread(target=self._serve, args=(h,), daemon=True, name=f"bnn-team-{h}")
            for h in range(self.helpers)
        ]
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the helpers and wait for their threads (a call still running finishes first)."""
        deadline = time.monotonic() + timeout
        for h in range(self.helpers):
            while not stop(self.ctl, h):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"helper {h} still in use after {timeout} s")
                time.sleep(1e-4)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _serve(self, h: int) -> None:
        self.tasks[h] += serve(self.ctl, h, self._spin)

    def _restart(self) -> None:
        """In a forked child: the helper threads stayed in the parent. Start new ones, parked
        (a task the parent had in flight is not the child's)."""
        if all(self.ctl[:, STATE] == STOPPED):
            return
        self.ctl[:] = 0
        self._start()


def _after_fork_in_child() -> None:
    for team in list(_TEAMS):
        team._restart()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def spin_seconds() -> float:
    """The helpers' spin time: BNN_SPIN_US microseconds if set, else DEFAULT_SPIN_S."""
    raw = os.environ.get(SPIN_ENV, "").strip()
    if not raw:
        return DEFAULT_SPIN_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SPIN_ENV} must be a number of microseconds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{SPIN_ENV} must be ≥ 0 microseconds (0 turns the team off), got {raw}")
    return value * 1e-6


_shared: dict[int, Team] = {}  # by number of helpers
_shared_lock = threading.Lock()


def shared_team(threads: int) -> Team | None:
    """The process's team for ``threads`` cores (threads − 1 helpers), created on first use and
    kept for the process (models loaded under another numba thread count keep theirs); None
    with fewer than 2 threads or BNN_SPIN_US=0."""
    if threads < 2 or not SUPPORTED:
        return None
    with _shared_lock:
        if threads - 1 not in _shared:
            spin = spin_seconds()
            if spin == 0:
                return None
            _shared[threads - 1] = Team(threads - 1, spin)
        return _shared[threads - 1]
