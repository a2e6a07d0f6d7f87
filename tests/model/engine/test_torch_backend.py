"""The torch backend runs the same compiled program: on the CPU here (CI), on CUDA where a GPU
is present (tests marked ``gpu``, skipped with a reason otherwise)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model import load_model, read_artifact  # noqa: E402
from tests.model.engine.reference import eager_logits, write_model  # noqa: E402
from tests.model.engine.test_equivalence import (  # noqa: E402
    CNNS,
    DIGITS,
    MLPS,
    assert_same,
    config_id,
    random_pixels,
)
from tests.model.engine.test_graphs import GRAPHS, pixels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("config", [MLPS[0], MLPS[5], CNNS[1], CNNS[4]], ids=config_id)
def test_torch_cpu_backend_matches_eager_and_numba(compiled, config):
    model, eager = compiled(config, DIGITS, backend="torch")
    numba_model, _ = compiled(config, DIGITS, backend="numba")
    assert (model.backend, model.device) == ("torch", "cpu")
    for batch in (1, 7, 64):
        x = random_pixels(DIGITS, batch, seed=batch)
        got = model.predict(x)
        with torch.no_grad():
            assert_same(got, eager(torch.from_numpy(x)).numpy())
        np.testing.assert_allclose(got, numba_model.predict(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_torch_cpu_backend_on_every_graph(tmp_path, name):
    path = write_model(tmp_path / "m.safetensors", GRAPHS[name], np.random.default_rng(5))
    model, artifact = load_model(path, backend="torch"), read_artifact(path)
    x = pixels(model.input_spec, 40)
    want = eager_logits(artifact.spec, artifact.tensors, x)
    assert_same(model.predict(x), want)


def test_torch_backend_memory_counts_packed_weights(compiled):
    model, _ = compiled(MLPS[0], DIGITS, backend="torch")
    numba_model, _ = compiled(MLPS[0], DIGITS, backend="numba")
    # the same arrays, moved to the device (uint64 words as int64)
    assert model.memory_bytes == numba_model.memory_bytes


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; torch sees none here")
@pytest.mark.parametrize("config", [MLPS[0], MLPS[5], CNNS[1], CNNS[4]], ids=config_id)
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "auto"])
def test_cuda_backend_matches_eager(compiled, config, device):
    model, eager = compiled(config, DIGITS, backend="auto", device=device)
    assert model.device == "cuda:0" and model.backend == "torch"
    for batch in (1, 7, 64, 1000):
        x = random_pixels(DIGITS, batch, seed=batch)
        with torch.no_grad():
            assert_same(model.predict(x), eager(torch.from_numpy(x)).numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; torch sees none here")
def test_cuda_backend_is_thread_safe(compiled):
    import threading

    model, _ = compiled(CNNS[1], DIGITS, backend="torch", device="cuda")
    inputs = [random_pixels(DIGITS, b, seed=b) for b in (1, 7, 64)]
    expected = [model.predict(x) for x in inputs]
    failures = []

    def work():
        for i in range(30):
            if not np.array_equal(model.predict(inputs[i % 3]), expected[i % 3]):
                failures.append(i)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
