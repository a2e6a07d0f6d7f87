"""Shared fixtures: artifacts built through training's export path, compiled once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model import InputSpec, load_model  # noqa: E402
from model.engine import CompiledModel  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here compiles kernels: marked so that `make test-fast` leaves them out."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.kernels)


def calibrate_batchnorm(model, x: np.ndarray, seed: int) -> None:
    """Give every BatchNorm statistics near its input's real distribution, then perturb them:
    weights of both signs with ~10% exact zeros, shifted means, scaled variances. Thresholds then
    fall inside the reachable accumulator range and folding is exercised in every direction."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        torch.manual_seed(seed)
        model(torch.from_numpy(x))
    model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.5 * std * torch.randn(c, generator=g))
            bn.running_var.mul_(torch.empty(c).uniform_(0.5, 2.0, generator=g))
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.weight[torch.rand(c, generator=g) < 0.1] = 0.0
            bn.bias.copy_(0.3 * torch.randn(c, generator=g))


def export_random_model(
    config,
    path: Path,
    input_spec: InputSpec,
    seed: int = 0,
    num_classes: int = 10,
) -> Path:
    """build_model → calibrated BatchNorm → export_artifact, as training publishes a model."""
    from training.architectures import build_model
    from training.export import export_artifact

    torch.manual_seed(seed)
    model = build_model(config, tuple(input_spec.shape), num_classes)
    rng = np.random.default_rng(seed)
    low, high = input_spec.value_range
    x = rng.integers(int(low), int(high) + 1, size=(256, *input_spec.shape)).astype(np.float32)
    calibrate_batchnorm(model, x, seed)
    export_artifact(
        model,
        path,
        name=path.stem,
        input_spec=input_spec,
        labels=[f"class{i}" for i in range(num_classes)],
        training={"seed": seed},
        provenance={"test": True},
    )
    return path


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-artifacts")


@pytest.fixture(scope="session")
def compiled(artifact_dir) -> Callable[..., tuple[CompiledModel, object]]:
    """(config, input_spec, backend, device) → (compiled model, eager module), cached."""
    from training.export import module_from_artifact

    cache: dict = {}

    def get(config, input_spec: InputSpec, backend="numba", device="cpu", seed=0):
        key = (config, input_spec, seed)
        if key not in cache:
            path = artifact_dir / f"model{len(cache)}.safetensors"
            export_random_model(config, path, input_spec, seed)
            cache[key] = (path, module_from_artifact(path), {})
        path, eager, models = cache[key]
        if (backend, device) not in models:
            models[backend, device] = load_model(path, device=device, backend=backend)
        return models[backend, device], eager

    return get


@pytest.fixture(scope="session")
def digits_test():
    from training.data import load_digits

    return load_digits().test
