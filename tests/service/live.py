"""Helpers for tests over real HTTP: a ``python -m service`` subprocess on a free port, and
models trained (or built with random weights) by the training package and published."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from model.artifact import encode_artifact
from model.repository import ModelVersion, publish

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``python -m service`` with ``BNN_*`` settings; stderr (JSON logs) goes to ``log_path``."""

    def __init__(
        self, repo: Path, log_path: Path, *, module: str = "service", **settings: object
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
        env |= {"BNN_MODEL_REPO": str(repo), "BNN_HOST": "127.0.0.1", "BNN_PORT": str(self.port)}
        # the CPU engine unless a test names a device: on a GPU host BNN_DEVICE=auto could
        # choose the GPU, and the tests compare against the CPU engine's exact outputs
        env |= {"BNN_DEVICE": "cpu"}
        env["BNN_GRPC_PORT"] = "0"  # off unless a test asks for it (grpc_port=free_port())
        env |= {f"BNN_{key.upper()}": str(value) for key, value in settings.items()}
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=env, stdout=self._log, stderr=self._log
        )

    def wait_ready(self, timeout_s: float = 60.0, path: str = "/v2/health/ready") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"service not ready after {timeout_s} s:\n{self.logs()}")

    def wait_live(self, timeout_s: float = 60.0) -> None:
        """Until ``/v2/health/live`` answers (no model need be ready)."""
        self.wait_ready(timeout_s, path="/v2/health/live")

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]


@contextmanager
def uvicorn_in_thread(app) -> Iterator[str]:
    """A real uvicorn server (TCP, the app's lifespan) for ``app`` in a thread of this process;
    yields its URL. For fuzzing the HTTP layer with a model that loads at once."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def train_and_publish(repo: Path, name: str, arch: str, seed: int = 0):
    """Train a small digits model for two epochs and publish it; (version, eval-mode model)."""
    from training.architectures import CNNConfig, MLPConfig
    from training.config import TrainConfig
    from training.loop import train

    config = (
        MLPConfig(hidden=(64, 64))
        if arch == "mlp"
        else CNNConfig(stem_channels=8, channels=(16, 32), pool=(True, True))
    )
    result = train(
        TrainConfig(
            arch=arch, dataset="digits", epochs=2, seed=seed, progress=False, model=config,
            num_threads=1,
        )
    )  # fmt: skip
    return publish_module(repo, name, result.model, result.data.input_spec, result.data.labels)


def random_mlp(repo: Path, name: str, hidden: tuple[int, ...], seed: int = 0):
    """An untrained mlp on digits-shaped input (random latent weights), published."""
    import torch

    from model.spec import InputSpec
    from training.architectures import MLPConfig, build_model

    torch.manual_seed(seed)
    model = build_model(MLPConfig(hidden=hidden), (1, 8, 8), 10).eval()
    spec = InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True)
    return publish_module(repo, name, model, spec, tuple(str(i) for i in range(10)))


def publish_module(repo: Path, name: str, model, input_spec, labels) -> tuple[ModelVersion, object]:
    from training.export import to_artifact_parts

    spec, tensors = to_artifact_parts(model, name=name, input_spec=input_spec, labels=labels)
    version = publish(repo, name, {"model.safetensors": encode_artifact(spec, tensors)})
    return version, model.eval()


def eager_logits(model, x: np.ndarray) -> np.ndarray:
    """The eager torch model's logits in eval mode, float32 (batch, classes)."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x, np.float32))).numpy()
