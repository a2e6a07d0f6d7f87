from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.numpy_model import LinearModel, publish_tiny


def make_settings(repo: Path, **overrides) -> Settings:
    """Settings for a test app, ignoring any .env and BNN_* variables of the environment; the
    CPU engine unless a test names a device (BNN_DEVICE=auto could choose a GPU host's GPU)."""
    values = {"model_repo": repo, "poll_interval_s": 0, "log_json": False, "access_log": False}
    values["device"] = "cpu"
    values["grpc_port"] = 0  # tests that want gRPC pick a free port
    return Settings(_env_file=None, **(values | overrides))


def wait_ready(client: TestClient, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/v2/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(
        f"not ready after {timeout_s} s: {client.post('/v2/repository/index').text}"
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    publish_tiny(path, "tiny", seed=0)
    return path


@pytest.fixture
def make_client(repo: Path) -> Iterator[Callable[..., TestClient]]:
    """Build a started TestClient (lifespan run, models ready) with settings overrides."""
    clients: list[TestClient] = []

    def build(loader=LinearModel, wait: bool = True, **overrides) -> TestClient:
        settings = make_settings(overrides.pop("model_repo", repo), **overrides)
        client = TestClient(create_app(settings, loader=loader))
        client.__enter__()
        clients.append(client)
        if wait:
            wait_ready(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()
