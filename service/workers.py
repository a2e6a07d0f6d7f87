"""How many server processes to run, and how many engine threads each gets.

``BNN_WORKERS=auto`` means one process per *usable* core: the cores this process may run on
(its CPU affinity, as ``taskset`` or a cpuset sets it) and, in a container, no more than its
CPU quota allows (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``, rounded down, at least 1):
a pod limited to 2 CPUs on a 64-core node runs 2 workers, not 64.

Each worker's engine gets ``usable_cores // workers`` threads (at least 1), so N workers
together start no more compute threads than there are cores.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# numba sizes the engine's parallel kernels and its helper team from this, and passes its count
# to each OpenMP region itself; an explicit value in the environment wins. OMP_NUM_THREADS is
# left to the user (it would also resize numpy's BLAS in the full-precision layers).
ENGINE_THREAD_VARIABLES = ("NUMBA_NUM_THREADS",)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores (quota / period), or None where no quota is set."""
    v2 = root / "cpu.max"  # "max 100000" or "200000 100000"
    if v2.is_file():
        quota, _, period = v2.read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    if v1_quota.is_file() and v1_period.is_file():
        quota = int(v1_quota.read_text())
        return None if quota <= 0 else quota / int(v1_period.read_text())
    return None


def usable_cores(root: Path = CGROUP_ROOT) -> int:
    """min(cores in this process's affinity mask, ⌊cgroup CPU quota⌋), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores or 1, math.floor(limit))
    return max(1, cores or 1)


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
