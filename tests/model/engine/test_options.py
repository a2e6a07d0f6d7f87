"""EngineOptions: validation, the one bridge from the environment, threads and kernel cache
applied at load, and the same engine whatever the import order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from model import load_model
from model.engine import EngineOptions, runtime
from tests.model.engine.reference import mlp_spec, write_model

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("options") / "model.safetensors"
    return write_model(path, mlp_spec(input_shape=(1, 8, 8), features=64), np.random.default_rng(0))


@pytest.fixture
def restore_thread_count():
    """numba's thread count is per calling thread: give this one back what it had."""
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2"])
def test_threads_must_be_a_whole_number_of_at_least_one(threads):
    with pytest.raises(ValueError, match="threads: expected a whole number ≥ 1"):
        EngineOptions(threads=threads)


def test_from_env_reads_the_two_documented_variables(tmp_path):
    environ = {"BNN_ENGINE_THREADS": "3", "BNN_KERNEL_CACHE_DIR": str(tmp_path)}
    assert EngineOptions.from_env(environ) == EngineOptions(threads=3, kernel_cache_dir=tmp_path)
    assert EngineOptions.from_env({"BNN_ENGINE_THREADS": " ", "BNN_SPIN_US": "0"}) == (
        EngineOptions()
    )


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_from_env_names_a_malformed_variable(value):
    with pytest.raises(ValueError, match=f"BNN_ENGINE_THREADS: .*{value!r}"):
        EngineOptions.from_env({"BNN_ENGINE_THREADS": value})


def test_threads_option_sets_the_threads_of_a_parallel_call(mlp_path, restore_thread_count):
    x = np.random.default_rng(1).integers(0, 17, size=(2048, 64)).astype(np.float32)
    default = load_model(mlp_path)
    want = default.predict(x)
    assert default._executor.threads == runtime.engine_threads()
    one = load_model(mlp_path, options=EngineOptions(threads=1))
    assert one._executor.threads == 1
    np.testing.assert_array_equal(one.predict(x), want)
    assert numba.get_num_threads() == 1  # set on the calling thread for the parallel kernels
    many = load_model(mlp_path, options=EngineOptions(threads=10_000))
    assert many._executor.threads == numba.config.NUMBA_NUM_THREADS  # at most numba's pool


# Reports the engine's configuration after applying options, with numba and the kernels
# imported before (first) or after (second) the options are applied.
IMPORT_ORDER = {
    "numba first": (
        "import numba\n"
        "from model.engine import kernels, runtime\n"
        "from model.engine.options import EngineOptions\n"
        "threads = runtime.apply(EngineOptions(kernel_cache_dir=sys.argv[1]))\n"
    ),
    "options first": (
        "from model.engine.options import EngineOptions\n"
        "from model.engine import runtime\n"
        "threads = runtime.apply(EngineOptions(kernel_cache_dir=sys.argv[1]))\n"
        "from model.engine import kernels\n"
        "import numba\n"
    ),
}
REPORT = """
import json, pathlib
import numpy as np
out = np.empty((1, 1, 1, 1), np.uint64)
kernels.SERIAL.pool_bits(np.ones((1, 2, 2, 1), np.uint64), 2, 2, 2, 2, np.zeros(1, np.uint64), out)
root = pathlib.Path(sys.argv[1])
print(json.dumps({
    "threads": threads,
    "layer": runtime.REQUESTED_THREADING_LAYER,
    "kernels under the cache dir": all(
        pathlib.Path(k._cache.cache_path).is_relative_to(root) for k in runtime.engine_kernels()
    ),
    "kernels": len(list(runtime.engine_kernels())),
    "cached": sorted(p.name.split("-")[0] for p in root.rglob("*.nb*")),
    "result": int(out[0, 0, 0, 0]),
}))
"""


def test_import_order_changes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BNN_", "NUMBA_CACHE"))}
    reports = {}
    for name, imports in IMPORT_ORDER.items():
        cache = tmp_path / name.replace(" ", "-")
        result = subprocess.run(
            [sys.executable, "-c", "import sys\n" + imports + REPORT, str(cache)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads(result.stdout)
    first, second = reports.values()
    assert first == second
    assert first["kernels under the cache dir"] and first["kernels"] > 20
    assert first["cached"] == ["kernels.pool_bits_serial", "kernels.pool_bits_serial"]
    assert first["result"] == 1
