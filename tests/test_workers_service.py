"""End to end: ``python -m service`` with ``BNN_WORKERS=2`` — two server processes on one port.

Both load the models and see each new version; ``/metrics`` reports the totals of both, whichever
of them answers the scrape; SIGTERM to the parent drains both.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.live import ServiceProcess, random_mlp

pytestmark = pytest.mark.slow
MODEL = "digits"
REQUESTS = 40


def samples(url: str) -> list:
    """Every sample of one scrape, on a connection of its own."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(all_samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value for s in all_samples if s.name == name and labels.items() <= s.labels.items()
    )


def pids_serving(all_samples: list, version: int | None = None, model: str = MODEL) -> set[str]:
    """The worker pids whose ``bnn_model_ready`` gauge is 1 for ``model`` (``version``)."""
    return {
        s.labels["pid"]
        for s in all_samples
        if s.name == "bnn_model_ready"
        and s.labels["model"] == model
        and (version is None or s.labels["version"] == str(version))
        and s.value == 1
    }


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def infer(url: str, x: np.ndarray) -> httpx.Response:
    """One V2 request on a fresh connection (so the kernel may hand it to either worker)."""
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    return httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[tuple[ServiceProcess, Path, set[str]]]:
    """A 2-worker server on a small random mlp, both workers serving version 1; their pids."""
    repo = tmp_path_factory.mktemp("repo")
    random_mlp(repo, MODEL, hidden=(64, 64), seed=0)
    service = ServiceProcess(
        repo, tmp_path_factory.mktemp("logs") / "server.log", workers=2, poll_interval_s=0.2
    )
    try:
        service.wait_ready(timeout_s=300)  # the first run compiles the kernels
        wait_until(lambda: len(pids_serving(samples(service.url), 1)) == 2, 60, "both on v1")
        pids = pids_serving(samples(service.url), 1)
        yield service, repo, pids
    finally:
        service.stop()


def test_metrics_report_the_totals_of_both_workers_on_every_scrape(two_workers):
    service, _, pids = two_workers
    x = np.random.default_rng(0).integers(0, 17, (1, 1, 8, 8)).astype(np.float32)
    before = samples(service.url)
    answered_by = set()
    for _ in range(REQUESTS):
        response = infer(service.url, x)
        assert response.status_code == 200, response.text
        answered_by.add(response.headers["x-request-id"][:16])  # a random prefix per process
    for _ in range(10):  # each on a new connection: either worker may answer
        scrape = samples(service.url)
        for name, labels in [
            ("bnn_inference_requests_total", {"status": "200", "protocol": "v2"}),
            ("bnn_inference_request_duration_seconds_count", {}),
        ]:
            added = value(scrape, name, model=MODEL, **labels)
            added -= value(before, name, model=MODEL, **labels)
            assert added == REQUESTS, (name, added, answered_by)
        rows = value(scrape, "bnn_batch_size_rows_sum", model=MODEL)
        assert rows - value(before, "bnn_batch_size_rows_sum", model=MODEL) == REQUESTS
        assert {s.labels["pid"] for s in scrape if s.name == "bnn_models_loaded"} == pids


def test_a_published_version_is_served_by_both_workers(two_workers):
    service, repo, pids = two_workers
    random_mlp(repo, MODEL, hidden=(64, 64), seed=1)
    wait_until(lambda: pids_serving(samples(service.url), 2) == pids, 60, "both on version 2")
    scrape = samples(service.url)
    assert pids_serving(scrape, 1) == set()  # the old version retired in each worker
    x = np.zeros((1, 1, 8, 8), np.float32)
    versions = {infer(service.url, x).json()["model_version"] for _ in range(20)}
    assert versions == {"2"}


def test_sigterm_drains_every_worker_and_exits_0(tmp_path):
    repo = tmp_path / "repo"
    random_mlp(repo, "heavy", hidden=(2048, 2048, 2048))
    service = ServiceProcess(repo, tmp_path / "log", workers=2, max_batch_size=1024)
    try:
        service.wait_ready(timeout_s=300)  # the first run compiles the wide kernels
        wait_until(
            lambda: len(pids_serving(samples(service.url), model="heavy")) == 2, 60, "both ready"
        )
        x = np.random.default_rng(1).integers(0, 17, (512, 1, 8, 8)).astype(np.float32)
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        first_done = threading.Event()
        completed: list[float] = []

        async def in_flight():
            limits = httpx.Limits(max_connections=16)  # many connections: both workers busy
            async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits) as c:

                async def one():
                    response = await c.post("/v2/models/heavy/infer", json=body)
                    completed.append(time.monotonic())
                    first_done.set()
                    return response.status_code

                return await asyncio.gather(*(one() for _ in range(16)))

        statuses: list[int] = []
        sender = threading.Thread(target=lambda: statuses.extend(asyncio.run(in_flight())))
        sender.start()
        assert first_done.wait(60)
        signalled_at = time.monotonic()
        code = service.terminate(timeout_s=60)
        sender.join(60)
        assert statuses == [200] * 16
        assert sum(t > signalled_at for t in completed) >= 4  # these were still in flight
        assert code == 0, service.logs()
        assert service.logs().count("Finished server process") == 2, service.logs()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{service.url}/v2/health/live", timeout=2)
    finally:
        service.stop()


def test_a_killed_supervisor_leaves_no_worker_behind(tmp_path):
    """SIGKILL gives the parent no chance to stop its workers: each asked the kernel for a
    parent-death signal, so each gets SIGTERM and exits instead of serving on as an orphan."""
    import os

    random_mlp(tmp_path / "repo", MODEL, hidden=(64, 64), seed=0)
    service = ServiceProcess(tmp_path / "repo", tmp_path / "server.log", workers=2)
    try:
        service.wait_ready(timeout_s=300)
        workers = wait_until(
            lambda: len(pids := pids_serving(samples(service.url))) == 2 and pids,
            60,
            "both workers serving",
        )
        service.process.kill()
        service.process.wait(10)

        def all_gone() -> bool:
            for pid in workers:
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    continue
                return False
            return True

        wait_until(all_gone, 30, "the orphaned workers to exit")
    finally:
        service.stop()
