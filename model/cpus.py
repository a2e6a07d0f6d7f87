"""How many cores this process may use: its CPU affinity and, in a container, its CPU quota.

``usable_cores() = max(1, min(|affinity mask|, ⌊quota / period⌋))``: the cores this process
may run on (as ``taskset`` or a cpuset sets them) and no more than its cgroup CPU quota allows
(cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``). A pod limited to 2 CPUs on a 64-core node
gets 2, not 64. Shared by the service (server workers, engine threads) and training (the default
``--threads``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """The CPU quota in cores (quota / period), or None where no quota is set. ``root``: the
    cgroup filesystem, default :data:`CGROUP_ROOT` (read at each call, so tests can point it
    at a fake one)."""
    root = CGROUP_ROOT if root is None else root
    v2 = root / "cpu.max"  # "max 100000" or "200000 100000"
    if v2.is_file():
        quota, _, period = v2.read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    if v1_quota.is_file() and v1_period.is_file():
        quota_us = int(v1_quota.read_text())  # -1: no quota
        return None if quota_us <= 0 else quota_us / int(v1_period.read_text())
    return None


def usable_cores(root: Path | None = None) -> int:
    """min(cores in this process's affinity mask, ⌊cgroup CPU quota⌋), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores or 1, math.floor(limit))
    return max(1, cores or 1)
