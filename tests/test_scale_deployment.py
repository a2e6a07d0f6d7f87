"""End to end through Docker: `docker compose --profile scale` — two replicas behind HAProxy.

Runs wherever a Docker engine answers and is skipped with the reason otherwise. Under a steady
load through the balancer it checks that stopping a replica (SIGTERM) loses no request, that
killing one (SIGKILL) loses at most the requests in flight on it and that the balancer marks it
down within 5 s, and that a version published to the shared volume is served by both replicas.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest

from tests.test_deployment import (
    BUILD_TIMEOUT_S,
    MODEL,
    ROOT,
    ComposeProject,
    docker_unavailable_reason,
    wait_for,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]
REPLICAS = ("replica-1", "replica-2")
CONCURRENCY = 4
DOWN_WITHIN_S = 5.0
IMAGE = np.random.default_rng(0).integers(0, 17, 64).astype(float).tolist()
BODY = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": IMAGE}]}


@dataclass
class SteadyLoad:
    """``CONCURRENCY`` clients sending requests back to back through the balancer; every
    outcome is kept as (monotonic time, status code or the exception's name)."""

    url: str
    outcomes: list[tuple[float, int | str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SteadyLoad:
        self._threads = [threading.Thread(target=self._client) for _ in range(CONCURRENCY)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    outcome: int | str = client.post(
                        f"/v2/models/{MODEL}/infer", json=BODY
                    ).status_code
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.outcomes.append((time.monotonic(), outcome))

    def failures(self, since: float = 0.0) -> list[tuple[float, int | str]]:
        return [(t, o) for t, o in self.outcomes if t >= since and o != 200]

    def wait_for_more(self, count: int) -> None:
        target = len(self.outcomes) + count
        wait_for(lambda: len(self.outcomes) >= target, 60, f"{count} more requests")


def replica_python(project: ComposeProject, replica: str, code: str) -> str:
    """Run ``code`` with the replica's Python inside its container; its stdout."""
    return project("exec", "-T", replica, "python", "-c", code, timeout=120).stdout


def replica_infer_version(project: ComposeProject, replica: str) -> str:
    """The model version that ``replica`` itself (not the balancer) answers with."""
    code = (
        "import json, urllib.request; r = urllib.request.urlopen(urllib.request.Request("
        f"'http://127.0.0.1:8000/v2/models/{MODEL}/infer', data=json.dumps({BODY!r}).encode(), "
        "headers={'Content-Type': 'application/json'}), timeout=10); "
        "print(json.load(r)['model_version'])"
    )
    return replica_python(project, replica, code).strip()


def balancer_servers(project: ComposeProject) -> tuple[dict[str, dict[str, str]], float]:
    """HAProxy's stats row of each replica (``status`` UP/DOWN/..., ``lastchg``: seconds since
    its status last changed), and the wall-clock time by which they had been read."""
    code = (
        "import urllib.request; "
        "print(urllib.request.urlopen('http://127.0.0.1:8404/stats;csv', timeout=5).read().decode())"
    )
    rows = replica_python(project, "balancer", code).splitlines()
    read_by = time.time()
    header = rows[0].lstrip("# ").split(",")
    servers = {}
    for row in rows[1:]:
        record = dict(zip(header, row.split(","), strict=False))
        if record.get("pxname") == "replicas" and record.get("svname") in REPLICAS:
            servers[record["svname"]] = record
    return servers, read_by


def balancer_states(project: ComposeProject) -> dict[str, str]:
    """HAProxy's view of each replica: {'replica-1': 'UP', 'replica-2': 'DOWN', ...}."""
    servers, _ = balancer_servers(project)
    return {name: record["status"].split(" ")[0] for name, record in servers.items()}


def all_up(project: ComposeProject) -> bool:
    return balancer_states(project) == dict.fromkeys(REPLICAS, "UP")


def container_stopped_at(project: ComposeProject, service: str) -> float:
    """When the service's container last exited, by Docker's clock (Unix seconds)."""
    container = project("ps", "-q", service).stdout.strip()
    finished = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.FinishedAt}}", container],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    seconds, _, fraction = finished.removesuffix("Z").partition(".")
    stamp = datetime.fromisoformat(seconds).replace(tzinfo=UTC).timestamp()
    return stamp + float(f"0.{fraction or 0}")


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeProject]:
    reason = docker_unavailable_reason()
    if reason:
        pytest.skip(reason)
    project = ComposeProject()
    project("--profile", "scale", "build", "model-init", "balancer", timeout=BUILD_TIMEOUT_S)
    try:
        project("--profile", "scale", "up", "--detach", "balancer", timeout=600)
        wait_for(
            lambda: httpx.get(f"{project.url}/v2/health/ready", timeout=2).status_code == 200,
            timeout=180,
            what="a ready replica behind the balancer",
        )
        wait_for(lambda: all_up(project), timeout=120, what="both replicas up in HAProxy")
        yield project
    finally:
        logs = subprocess.run(
            ["docker", "compose", "-p", project.name, "--profile", "scale", "logs",
             "--no-color", "--tail", "40"],
            cwd=ROOT, env=project.env, capture_output=True, text=True,
        )  # fmt: skip
        print(logs.stdout[-6000:])
        project("--profile", "scale", "down", "--volumes", "--remove-orphans", timeout=300)


def test_sigterm_on_a_replica_loses_no_request(stack):
    with SteadyLoad(stack.url) as load:
        load.wait_for_more(50)
        stack("--profile", "scale", "stop", "replica-1", timeout=120)  # SIGTERM, then waits
        load.wait_for_more(100)  # served by replica-2 alone
        stack("--profile", "scale", "start", "replica-1", timeout=120)
        wait_for(lambda: all_up(stack), timeout=120, what="replica-1 back up")
        load.wait_for_more(50)
    print(f"SIGTERM: {len(load.failures())} of {len(load.outcomes)} requests failed")
    assert len(load.outcomes) >= 200
    assert load.failures() == []


def test_sigkill_loses_at_most_the_in_flight_requests_and_the_replica_leaves_within_5s(stack):
    with SteadyLoad(stack.url) as load:
        load.wait_for_more(50)
        killed_at = time.monotonic()
        stack("--profile", "scale", "kill", "-s", "SIGKILL", "replica-2", timeout=60)
        # Each look at HAProxy's stats costs a `docker compose exec` of seconds here, so the
        # moment it marked the replica down is read from its own clock (lastchg), not ours.
        seen: list[tuple[dict[str, str], float]] = []

        def marked_down() -> bool:
            servers, read_by = balancer_servers(stack)
            seen.append((servers["replica-2"], read_by))
            return not servers["replica-2"]["status"].startswith("UP")

        wait_for(marked_down, timeout=60, what="HAProxy to mark replica-2 down")
        record, read_by = seen[-1]
        marked_down_by = read_by - int(record["lastchg"])
        down_after = marked_down_by - container_stopped_at(stack, "replica-2")
        load.wait_for_more(100)
    failures = load.failures()
    print(f"SIGKILL: {len(failures)} of {len(load.outcomes)} requests failed; HAProxy marked "
          f"the replica down {down_after:.1f} s after it died")  # fmt: skip
    assert len(failures) <= CONCURRENCY, failures  # at most one in flight per client
    assert all(t - killed_at < DOWN_WITHIN_S for t, _ in failures), (failures, killed_at)
    assert down_after < DOWN_WITHIN_S, f"marked down after {down_after:.1f} s"
    stack("--profile", "scale", "up", "--detach", "replica-2", timeout=300)
    wait_for(lambda: all_up(stack), timeout=180, what="replica-2 back up")


def test_a_version_published_to_the_shared_volume_is_served_by_every_replica(stack):
    before = {replica: replica_infer_version(stack, replica) for replica in REPLICAS}
    assert len(set(before.values())) == 1, before
    current = int(before[REPLICAS[0]])
    # Publish the served artifact again as the next version, through the repository's atomic
    # publish (what the trainer does), from inside one replica onto the shared volume.
    publish = (
        "from pathlib import Path; from model.repository import publish; "
        f"src = Path('/models/{MODEL}/{current}'); "
        f"v = publish('/models', '{MODEL}', {{'model.safetensors': "
        "(src / 'model.safetensors').read_bytes()}); print(v.version)"
    )
    new_version = replica_python(stack, REPLICAS[0], publish).strip()
    assert int(new_version) == current + 1
    for replica in REPLICAS:
        wait_for(
            lambda replica=replica: replica_infer_version(stack, replica) == new_version,
            timeout=60,
            what=f"{replica} to serve version {new_version}",
        )
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        versions = {
            client.post(f"/v2/models/{MODEL}/infer", json=BODY).json()["model_version"]
            for _ in range(20)
        }
    assert versions == {new_version}
