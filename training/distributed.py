"""Data-parallel training across processes: ``torchrun --nproc_per_node=N -m training train``.

torchrun starts N copies of the command and tells each its place in the environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`from_environment` joins
them into one process group — NCCL with one GPU per process where CUDA is present, gloo on
CPUs — and :class:`DistributedContext` holds what the loop needs:

* the model wrapped in ``DistributedDataParallel``: after each backward the gradients are
  averaged over the N processes, so every replica takes the same step and the latent weights
  stay identical (their clipping to [−1, 1] too);
* the data split by ``DistributedSampler``: each epoch one seeded permutation of the training
  set, shared by all, of which process r takes every N-th index from r. With a per-process
  batch of ``batch_size / N`` a step sees ``batch_size`` samples in all, as one process would;
* BatchNorm: on GPUs ``SyncBatchNorm`` normalises with the statistics of the whole global batch
  (what a single process computes); torch implements it only on GPUs, so on CPUs each process
  normalises with its own ``batch_size / N`` rows and DDP copies rank 0's running statistics to
  the others before every forward. Keep ``batch_size / N`` ≥ 16 on CPUs for statistics close to
  single-process training.

Only rank 0 evaluates, prints and publishes; the others train and exit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from training.config import ConfigError

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedContext:
    """One process's place in a training run; ``world_size == 1`` and no backend when alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, reports and publishes."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return (
            torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        )

    def local_batch_size(self, batch_size: int) -> int:
        """The per-process share of the global ``batch_size``: batch_size / world_size."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"batch_size {batch_size} must be a multiple of the {self.world_size} processes "
                "(it is the global batch, split evenly between them)"
            )
        return batch_size // self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` on this process's device, wrapped for gradient averaging when distributed
        (its BatchNorm layers synced on GPUs); ``model`` itself when alone. The wrapped module
        shares ``model``'s parameters."""
        if self.backend is None:  # alone: the caller placed the model on its device
            return model
        model.to(self.device)
        if self.backend == "nccl":
            synced = nn.SyncBatchNorm.convert_sync_batchnorm(_shallow_copy(model))
            return DistributedDataParallel(synced, device_ids=[self.local_rank])
        return DistributedDataParallel(model)

    def epoch_order(self, size: int, seed: int, epoch: int) -> torch.Tensor | None:
        """This process's training indices for ``epoch`` (DistributedSampler's shard of one
        seeded permutation, padded so every process takes as many steps); None when alone."""
        if self.backend is None:
            return None
        sampler = DistributedSampler(
            range(size), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler))

    def shard_size(self, size: int) -> int:
        return math.ceil(size / self.world_size)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes (every process gets the sums)."""
        if self.backend is None:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return totals.tolist()

    def metrics(self) -> dict[str, object]:
        return {"world_size": self.world_size, "backend": self.backend or "none"}


SINGLE_PROCESS = DistributedContext()


def _shallow_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer, so converting its
    BatchNorm layers leaves ``model`` (the one exported) as it is."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def from_environment(environ: Mapping[str, str] = os.environ) -> DistributedContext:
    """Join the process group torchrun described in ``environ``; the single-process context
    when not started by torchrun."""
    if not all(name in environ for name in ENVIRONMENT):
        return SINGLE_PROCESS
    rank, world_size, local_rank = (int(environ[name]) for name in ENVIRONMENT)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistributedContext(rank, world_size, local_rank, backend)


def shut_down(context: DistributedContext) -> None:
    if context.backend is not None and dist.is_initialized():
        dist.destroy_process_group()
