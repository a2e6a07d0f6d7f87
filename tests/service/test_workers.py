"""BNN_WORKERS: how many processes, how many engine threads each, and shared metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from model.cpus import cgroup_cpu_limit, usable_cores
from service.__main__ import share_metrics
from service.metrics import MultiprocessMetricsError, ServiceMetrics
from service.settings import Settings, describe_validation_error
from service.workers import divide_engine_threads, engine_threads, worker_count

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_v2(tmp_path: Path, cpu_max: str) -> Path:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def cgroup_v1(tmp_path: Path, quota: int, period: int) -> Path:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("cpu_max", "cores"), [("max 100000", None), ("200000 100000", 2.0), ("150000 100000", 1.5)]
)
def test_cgroup_v2_quota_in_cores(tmp_path, cpu_max, cores):
    assert cgroup_cpu_limit(cgroup_v2(tmp_path, cpu_max)) == cores


@pytest.mark.parametrize(("quota", "cores"), [(-1, None), (50_000, 0.5), (300_000, 3.0)])
def test_cgroup_v1_quota_in_cores(tmp_path, quota, cores):
    assert cgroup_cpu_limit(cgroup_v1(tmp_path, quota, 100_000)) == cores


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cores(tmp_path) == AFFINITY


def test_usable_cores_is_the_smaller_of_affinity_and_quota_rounded_down(tmp_path):
    assert usable_cores(cgroup_v2(tmp_path, "150000 100000")) == 1
    assert usable_cores(cgroup_v2(tmp_path, f"{(AFFINITY + 8) * 100_000} 100000")) == AFFINITY


def test_a_quota_under_one_core_still_runs_one_worker(tmp_path):
    assert usable_cores(cgroup_v1(tmp_path, 20_000, 100_000)) == 1


def test_worker_count_and_engine_threads_share_the_cores():
    assert worker_count("auto", 6) == 6
    assert worker_count(2, 6) == 2
    assert [engine_threads(w, 8) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_engine_thread_variables_are_set_unless_given():
    environ: dict[str, str] = {}
    assert divide_engine_threads(2, 8, environ) == 4
    assert environ == {"NUMBA_NUM_THREADS": "4"}
    given = {"NUMBA_NUM_THREADS": "7"}
    assert divide_engine_threads(2, 8, given) == 4
    assert given == {"NUMBA_NUM_THREADS": "7"}


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), (" AUTO ", "auto"), ("3", 3)])
def test_workers_setting(monkeypatch, value, parsed):
    monkeypatch.setenv("BNN_WORKERS", value)
    assert Settings(_env_file=None).workers == parsed


def test_workers_default_to_one(monkeypatch):
    monkeypatch.delenv("BNN_WORKERS", raising=False)
    assert Settings(_env_file=None).workers == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_workers_setting_is_named(monkeypatch, value):
    monkeypatch.setenv("BNN_WORKERS", value)
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)
    message = describe_validation_error(info.value)
    assert message.startswith(f"invalid setting --workers/BNN_WORKERS='{value}'")
    assert "expected a positive number of processes or auto" in message


def test_shared_metrics_need_prometheus_multiproc_dir_at_import(tmp_path):
    # This test process imported prometheus-client without PROMETHEUS_MULTIPROC_DIR.
    with pytest.raises(MultiprocessMetricsError, match="PROMETHEUS_MULTIPROC_DIR"):
        ServiceMetrics(shared_dir=tmp_path)


def clear_environment(monkeypatch, *names: str) -> None:
    """Remove ``names`` from the environment, restored after the test even if absent now."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_one_worker_shares_no_metrics(monkeypatch):
    clear_environment(monkeypatch, "PROMETHEUS_MULTIPROC_DIR")
    assert share_metrics(Settings(_env_file=None, metrics_dir=None), workers=1) is None
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_workers_share_a_fresh_metrics_dir_or_the_configured_one_emptied(monkeypatch, tmp_path):
    clear_environment(monkeypatch, "PROMETHEUS_MULTIPROC_DIR", "BNN_METRICS_DIR")
    made = share_metrics(Settings(_env_file=None, metrics_dir=None), workers=2)
    try:
        assert made.is_dir() and not any(made.iterdir())
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == os.environ["BNN_METRICS_DIR"] == str(made)
    finally:
        made.rmdir()
    configured = tmp_path / "metrics"
    configured.mkdir()
    (configured / "counter_123.db").write_bytes(b"stale")  # a previous run's worker
    (configured / "keep.txt").write_text("not ours")
    assert share_metrics(Settings(_env_file=None, metrics_dir=configured), workers=2) == configured
    assert sorted(p.name for p in configured.iterdir()) == ["keep.txt"]
