"""End to end: a real ``python -m service`` whose load of one model is stuck in a blocking
``open`` of a FIFO. Other models still serve and get new versions, an unload returns, and
SIGTERM ends the process within BNN_GRACEFUL_SHUTDOWN_S although the load's thread never
returns."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from tests.service.live import ServiceProcess
from tests.service.numpy_model import publish_tiny

pytestmark = pytest.mark.slow  # starts a real server

GRACEFUL_S = 3.0
INFER = {"inputs": [{"name": "input", "shape": [1, 36], "datatype": "FP32", "data": [0.0] * 36}]}


def wait_for(predicate, timeout_s: float, what: str, service: ServiceProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise AssertionError(f"service exited {service.process.returncode}:\n{service.logs()}")
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s} s:\n{service.logs()}")


def serving_version(service: ServiceProcess) -> str | None:
    response = httpx.post(f"{service.url}/v2/models/tiny/infer", json=INFER, timeout=5)
    return response.json().get("model_version") if response.status_code == 200 else None


def state_of(service: ServiceProcess, name: str) -> str:
    rows = httpx.post(f"{service.url}/v2/repository/index", timeout=5).json()
    return next(row["state"] for row in rows if row["name"] == name)


@pytest.mark.timeout(120)
def test_sigterm_exits_within_the_graceful_window_while_a_load_is_stuck(tmp_path):
    repo = tmp_path / "repo"
    publish_tiny(repo, "tiny", seed=0)
    publish_tiny(repo, "stuck-a", seed=1)
    publish_tiny(repo, "stuck-b", seed=2)
    fifo = tmp_path / "hung-storage.fifo"
    os.mkfifo(fifo)
    os.environ["STUCK_LOAD_FIFO"] = str(fifo)  # inherited by the service
    service = ServiceProcess(
        repo,
        tmp_path / "service.log",
        module="tests.service.stuck_load_service",
        poll_interval_s=0.1,
        load_timeout_s=600,  # the loads stay in progress
        graceful_shutdown_s=GRACEFUL_S,
        log_json=False,
    )
    try:
        wait_for(lambda: serving_version(service) == "1", 60, "tiny serving", service)
        wait_for(lambda: state_of(service, "stuck-a") == "LOADING", 10, "stuck load", service)
        publish_tiny(repo, "tiny", seed=3)
        wait_for(lambda: serving_version(service) == "2", 20, "tiny version 2", service)
        unload = httpx.post(f"{service.url}/v2/repository/models/stuck-a/unload", timeout=10)
        assert unload.json() == {"name": "stuck-a", "state": "UNAVAILABLE"}
        # An explicit load that waits behind stuck-b's load is in flight at SIGTERM.
        outcome: list[object] = []

        def load_stuck_b() -> None:
            try:
                url = f"{service.url}/v2/repository/models/stuck-b/load"
                outcome.append(httpx.post(url, timeout=60).status_code)
            except httpx.TransportError as exc:
                outcome.append(exc)

        loader = threading.Thread(target=load_stuck_b)
        loader.start()
        time.sleep(0.3)  # no event to wait for: give the request time to reach the server
        service.process.terminate()
        # The in-flight request may take the whole window; the rest (lifespan shutdown,
        # interpreter exit) must not wait for the stuck threads. TimeoutExpired if it hangs.
        code = service.process.wait(GRACEFUL_S + 5)
        loader.join(10)
        assert code == 0, service.logs()
        assert outcome, "the in-flight load request never finished"
    finally:
        service.stop()
        os.environ.pop("STUCK_LOAD_FIFO", None)
