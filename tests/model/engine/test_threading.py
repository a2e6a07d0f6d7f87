"""Threads under adverse conditions: pinned to one core, a cgroup CPU quota below the cores,
a forked child, passive OpenMP workers. Each gives exactly the results of a plain run; the
parallel kernels use no more threads than the process may run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from model import cpus, load_model
from model.engine import runtime
from tests.model.engine.reference import mlp_spec, write_model

REPO = Path(__file__).resolve().parents[3]
BATCHES = (1, 7, 64, 2048)  # the mlp in one call, serial kernels, and parallel kernels

# Loads the model, predicts every batch (the parallel kernels start OpenMP's threads) and, with
# "fork", predicts them again in a forked child; writes the results to argv[2] and prints the
# engine's threads and whether the parallel kernels were usable where the results were made.
PREDICT = """
import json, os, sys
import numpy as np
from model import load_model
from model.engine import runtime

model = load_model(sys.argv[1])
inputs = np.load(sys.argv[3])
def predict_all():
    return {name: model.predict(inputs[name]) for name in inputs.files}
results = predict_all()
report = {"threads": model._executor.threads, "parallel": runtime.parallel_kernels_usable()}
if sys.argv[4] == "fork":
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        np.savez(sys.argv[2], **predict_all())
        os.write(write, json.dumps({"parallel": runtime.parallel_kernels_usable()}).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    report |= json.loads(os.read(read, 1000) or b"{}") | {"child status": status}
else:
    np.savez(sys.argv[2], **results)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory):
    """(artifact path, inputs file, the results of this process's engine for each batch)."""
    folder = tmp_path_factory.mktemp("threading")
    path = write_model(
        folder / "model.safetensors",
        mlp_spec(input_shape=(1, 8, 8), features=64),
        np.random.default_rng(0),
    )
    rng = np.random.default_rng(1)
    inputs = {f"b{b}": rng.integers(0, 17, size=(b, 64)).astype(np.float32) for b in BATCHES}
    np.savez(folder / "inputs.npz", **inputs)
    model = load_model(path)
    expected = {name: model.predict(x) for name, x in inputs.items()}
    return path, folder / "inputs.npz", expected


def run_predict(tmp_path, mlp_case, mode="plain", prefix=(), env=None) -> dict:
    path, inputs, expected = mlp_case
    out = tmp_path / "out.npz"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
    result = subprocess.run(
        [*prefix, sys.executable, "-c", PREDICT, str(path), str(out), str(inputs), mode],
        cwd=REPO,
        env=environment | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here
    )
    assert result.returncode == 0, result.stderr
    with np.load(out) as got:  # our own file, no pickles
        for name, want in expected.items():
            np.testing.assert_array_equal(got[name], want, err_msg=name)
    return json.loads(result.stdout)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_pinned_to_one_core_runs_one_thread(tmp_path, mlp_case):
    report = run_predict(tmp_path, mlp_case, prefix=("taskset", "-c", "0"))
    assert report == {"threads": 1, "parallel": True}


def test_a_cpu_quota_below_the_cores_limits_the_threads(mlp_case, tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # cgroup v2: one CPU
    monkeypatch.setattr(cpus, "CGROUP_ROOT", tmp_path)
    assert runtime.engine_threads() == 1
    path, inputs, expected = mlp_case
    model = load_model(path)
    assert model._executor.threads == 1
    before = numba.get_num_threads()
    try:
        with np.load(inputs) as data:
            for name, want in expected.items():
                np.testing.assert_array_equal(model.predict(data[name]), want, err_msg=name)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_predicts_on_the_serial_kernels(tmp_path, mlp_case):
    """GNU OpenMP terminates a child forked after its parent ran a parallel region; the
    engine's child runs the serial kernels instead, and gets the same results."""
    report = run_predict(tmp_path, mlp_case, mode="fork")
    assert report["child status"] == 0
    layer_forbids_fork = runtime.threading_layer() == "omp"
    assert report["parallel"] is not layer_forbids_fork


def test_passive_openmp_workers_give_the_same_results(tmp_path, mlp_case):
    report = run_predict(tmp_path, mlp_case, env={"OMP_WAIT_POLICY": "PASSIVE"})
    assert report["threads"] == runtime.engine_threads()
