"""Measured kernel choice: serial or parallel kernels for a large call, by their recent times.

A parallel (OpenMP) region waits for every worker to be scheduled, so when a neighbour holds a
core each barrier can cost a scheduler time slice: the 784 → 3×4096 binary mlp at batch 1 took
1.1 ms a call on two threads on a quiet machine and 73 ms with the other core busy, against
2 ms for the serial kernels either way. Which set is faster depends on the machine's load, which
changes while the process runs, so :class:`MeasuredChoice` measures it.

Per batch bucket ``b = batch.bit_length()`` (batches 2^(b-1) … 2^b − 1) it keeps, for each
kernel set k, an exponentially weighted mean of the wall time per row of the calls that ran it:

    t̂ₖ ← t̂ₖ + α · (t / batch − t̂ₖ),   α = :data:`SMOOTHING` (the first sample sets t̂ₖ).

A set's first call in a bucket is not a sample: it pays for compiling or loading its kernels
and for cold caches (a first parallel call of the 4096-wide mlp took 0.8 s against 0.4 ms
steady, and one such sample kept the bucket on the serial kernels for ten thousand calls). A
call runs the set with the smaller t̂ (parallel until both have a sample: a bucket's first two
calls run parallel, the next two serial). The other set is *probed* (run once) on the next call
after one that took more than :data:`SPIKE` × the other's t̂, so a neighbour that arrives is
noticed at once, and otherwise after every

    n = max(PROBE_EVERY, (t̂_slower / t̂_faster) / MAX_PROBE_COST)

calls of the bucket, so probes cost at most MAX_PROBE_COST of the faster set's time once the
two differ by more than PROBE_EVERY × MAX_PROBE_COST (4×). A probe's time replaces the probed
set's t̂ instead of entering its mean (its state may have changed since it last ran), so one
fast probe after a neighbour leaves switches back; if it was luck, the next slow call switches
again.

The statistics are shared by the threads that call ``predict`` and updated without a lock: a
race may lose an update or a count, which only changes which call probes next. Results do not
depend on the choice: the serial and parallel kernels give the same bits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Weight of a new sample in a kernel set's running time per row.
SMOOTHING = 0.25
# A bucket's other kernel set runs at least once every PROBE_EVERY calls while the two sets'
# times are within PROBE_EVERY × MAX_PROBE_COST of each other; less often beyond, so that
# probing costs at most MAX_PROBE_COST of the faster set's time.
PROBE_EVERY = 32
MAX_PROBE_COST = 0.125
# A call slower than SPIKE × the other set's running time makes the next call probe that set.
SPIKE = 3.0

# The two choices; the executor maps them to its kernel sets.
SERIAL_KERNELS = "serial"
PARALLEL_KERNELS = "parallel"


@dataclass
class _Bucket:
    """Running times per row (seconds; None before the first sample) and the calls since the
    last probe."""

    serial: float | None = None
    parallel: float | None = None
    calls: int = 0
    probe: str | None = None  # a set the next call runs, after a slow call of the other
    warmed: set[str] = field(default_factory=set)  # sets whose first call has run


@dataclass
class MeasuredChoice:
    """Chooses ``"serial"`` or ``"parallel"`` kernels per call (see the module docstring).

    ``clock``: seconds, monotonic (``time.perf_counter``; a test passes its own).
    Use: ``kind = choice.choose(batch); started = choice.clock(); …run…;
    choice.record(batch, kind, choice.clock() - started)``."""

    clock: Callable[[], float] = time.perf_counter
    probe_every: int = PROBE_EVERY
    smoothing: float = SMOOTHING
    spike: float = SPIKE
    _buckets: dict[int, _Bucket] = field(default_factory=dict, repr=False)

    def choose(self, batch: int) -> str:
        """The kernel set the next call of ``batch`` rows runs."""
        bucket = self._bucket(batch)
        bucket.calls += 1
        if bucket.parallel is None:
            return PARALLEL_KERNELS
        if bucket.serial is None:
            return SERIAL_KERNELS
        probe, bucket.probe = bucket.probe, None
        if probe is not None:
            return probe
        faster = self.faster(batch)
        if bucket.calls >= self._probe_interval(bucket):
            bucket.calls = 0
            return _other(faster)
        return faster

    def record(self, batch: int, kind: str, seconds: float) -> None:
        """Account a call of ``batch`` rows that ran ``kind`` kernels in ``seconds``."""
        bucket = self._bucket(batch)
        if kind not in bucket.warmed:  # compilation and cold caches: not a sample
            bucket.warmed.add(kind)
            return
        per_row = seconds / max(batch, 1)
        mean = getattr(bucket, kind)
        if mean is not None and kind == self.faster(batch):
            per_row = mean + self.smoothing * (per_row - mean)
        setattr(bucket, kind, per_row)  # a first sample or a probe: the time itself
        other = getattr(bucket, _other(kind))
        if other is not None and per_row > self.spike * other:
            bucket.probe = _other(kind)

    def faster(self, batch: int) -> str:
        """The set with the smaller running time for ``batch`` rows (parallel until both
        have run)."""
        bucket = self._bucket(batch)
        if bucket.serial is None or bucket.parallel is None:
            return PARALLEL_KERNELS
        return SERIAL_KERNELS if bucket.serial < bucket.parallel else PARALLEL_KERNELS

    def _probe_interval(self, bucket: _Bucket) -> float:
        times = (bucket.serial or 0.0, bucket.parallel or 0.0)
        ratio = max(times) / min(times) if min(times) > 0 else 1.0
        return max(self.probe_every, ratio / MAX_PROBE_COST)

    def estimates(self, batch: int) -> dict[str, float | None]:
        """The running seconds per row of each set for ``batch`` rows' bucket (for reports)."""
        bucket = self._bucket(batch)
        return {SERIAL_KERNELS: bucket.serial, PARALLEL_KERNELS: bucket.parallel}

    def _bucket(self, batch: int) -> _Bucket:
        key = batch.bit_length()
        bucket = self._buckets.get(key)
        if bucket is None:  # two threads may both create one: one of them wins, no harm
            bucket = self._buckets.setdefault(key, _Bucket())
        return bucket


def _other(kind: str) -> str:
    return SERIAL_KERNELS if kind == PARALLEL_KERNELS else PARALLEL_KERNELS
