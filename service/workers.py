"""How many server processes to run, and how many engine threads each gets.

``BNN_WORKERS=auto`` means one process per *usable* core (:func:`model.cpus.usable_cores`):
the cores this process may run on (its CPU affinity, as ``taskset`` or a cpuset sets it) and,
in a container, no more than its CPU quota allows (cgroup v2 ``cpu.max`` or v1
``cpu.cfs_quota_us``, rounded down, at least 1): a pod limited to 2 CPUs on a 64-core node runs 2 workers, not 64.

Each worker's engine gets ``usable_cores // workers`` threads (at least 1), so N workers
together start no more compute threads than there are cores.
"""

from __future__ import annotations

import ctypes
import signal
import sys

# numba sizes its thread pool from this when it is imported (the engine's threads per call are
# at most that, see model.engine.options), and passes its count to each OpenMP region itself; an
# explicit value in the environment wins. OMP_NUM_THREADS is
# left to the user (it would also resize numpy's BLAS in the full-precision layers).
ENGINE_THREAD_VARIABLES = ("NUMBA_NUM_THREADS",)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_count(workers: int | str, cores: int) -> int:
    """``BNN_WORKERS`` resolved: the number itself, or ``cores`` for auto."""
    return cores if workers == "auto" else int(workers)


def engine_threads(workers: int, cores: int) -> int:
    """Engine threads per worker: the usable cores shared out, ⌊cores / workers⌋ ≥ 1."""
    return max(1, cores // workers)


def divide_engine_threads(workers: int, cores: int, environ: dict[str, str]) -> int:
    """Set each engine thread-pool variable not already in ``environ`` to the per-worker
    share (inherited by the worker processes); returns the share."""
    threads = engine_threads(workers, cores)
    for name in ENGINE_THREAD_VARIABLES:
        environ.setdefault(name, str(threads))
    return threads


def die_with_parent() -> None:
    """In a child process (a server worker, the body-decoding worker): ask Linux to send it
    SIGTERM when its parent dies, however the parent dies (SIGKILL, the OOM killer), so that no
    orphan outlives it; a server worker then drains as on any SIGTERM. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
