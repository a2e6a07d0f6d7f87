"""Data-parallel training: the context's arithmetic, and a real 2-process torchrun on digits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.repository import list_versions
from training.config import ConfigError
from training.distributed import SINGLE_PROCESS, DistributedContext, from_environment

ROOT = Path(__file__).resolve().parents[2]


def test_alone_without_torchrun_variables():
    assert from_environment({}) is SINGLE_PROCESS
    assert from_environment({"RANK": "0"}) is SINGLE_PROCESS  # WORLD_SIZE, LOCAL_RANK missing
    assert SINGLE_PROCESS.is_main and SINGLE_PROCESS.device == torch.device("cpu")
    assert SINGLE_PROCESS.metrics() == {"world_size": 1, "backend": "none"}


def test_global_batch_is_split_evenly_between_processes():
    context = DistributedContext(rank=1, world_size=4, backend="gloo")
    assert context.local_batch_size(64) == 16
    with pytest.raises(ConfigError, match="batch_size 30 must be a multiple of the 4 processes"):
        context.local_batch_size(30)


@pytest.mark.parametrize("size", [1167, 1168])
def test_epoch_shards_cover_one_shared_permutation(size):
    shards = [
        DistributedContext(rank=r, world_size=2, backend="gloo").epoch_order(size, seed=3, epoch=5)
        for r in range(2)
    ]
    assert [len(s) for s in shards] == [(size + 1) // 2] * 2  # padded to equal steps
    assert set(torch.cat(shards).tolist()) == set(range(size))
    assert not set(shards[0].tolist()) & set(shards[1][: size // 2].tolist())
    again = DistributedContext(rank=0, world_size=2, backend="gloo").epoch_order(size, 3, 5)
    assert torch.equal(shards[0], again)  # every process derives the same permutation
    other_epoch = DistributedContext(rank=0, world_size=2, backend="gloo").epoch_order(size, 3, 6)
    assert not torch.equal(shards[0], other_epoch)
    assert SINGLE_PROCESS.epoch_order(size, 3, 5) is None


@pytest.mark.slow
def test_torchrun_two_cpu_processes_publish_one_version(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None, "torchrun comes with torch"
    repo = tmp_path / "repo"
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "training", "train",
         "--arch", "mlp", "--dataset", "digits", "--epochs", "3", "--batch-size", "64",
         "--repo", str(repo), "--name", "ddp", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert list_versions(repo, "ddp") == [1]  # rank 0 alone published
    assert done.stdout.count("published ddp version") == 1
    assert done.stdout.strip().splitlines()[-1] == str(repo / "ddp" / "1")
    metrics = json.loads((repo / "ddp" / "1" / "metrics.json").read_text())["metrics"]
    assert (metrics["world_size"], metrics["backend"]) == (2, "gloo")
    assert metrics["test_accuracy"] > 0.7  # one process reaches ~0.88 in 3 epochs
    assert len(json.loads((repo / "ddp" / "1" / "metrics.json").read_text())["history"]) == 3
