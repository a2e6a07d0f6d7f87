"""Dispatch policy of the CPU engine: which kernels a call runs, by its work.

Threads, by the call's work (:func:`row_work` × batch):

* below :data:`SERIAL_WORK_LIMIT`, the fused path (:mod:`model.engine.fused`) when the model
  has one and the input is integers in range, else the serial twins of the kernels
  (:data:`~model.engine.kernels.SERIAL`) on the calling thread alone, which also saves starting
  a parallel region in each kernel and switching numba's thread count. Small calls gain little
  from a second core, but a parallel kernel waits for every worker to be scheduled, so with
  another core busy its latency tail grows to milliseconds;
* below :data:`TEAM_WORK_LIMIT`, for a model of dense layers only, the binary dense kernels on
  a :class:`~model.engine.team.Team` of helper threads that stay awake between calls (cheaper
  than starting an OpenMP region on a wide binary layer at batch 1), and the other layers
  serial, so that no OpenMP worker competes with the helpers for a core;
* above, the parallel (OpenMP) kernels.

The figures behind these limits are in docs/benchmarks.md, "Engine design figures".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numba

from model.engine.kernels import PARALLEL, SERIAL, KernelSet
from model.engine.ops import (
    BinaryConv,
    BinaryDense,
    FloatConv,
    FloatDense,
    Op,
    PlanesDense,
    Program,
    RealFlatten,
    SignedDense,
)
from model.engine.team import shared_team

# Work (see row_work) of one predict call below which its kernels run single-threaded: the digits
# mlp (64 → 1024 → 256 → 10, 12,288 per row) up to batch 5, a 4096-wide binary mlp never.
SERIAL_WORK_LIMIT = 1 << 16
# Work below which a dense-only model's calls run on the helper team (see the module docstring):
# the 784 → 3×4096 mlp (~1.07e6 per row) at batch 1 to 3. Larger batches gain nothing from it
# and lose on the layers that run serially in a team call.
TEAM_WORK_LIMIT = 1 << 22
# Operations a call on the team may contain: the binary ones run on the team, the others are
# small and run serially.
TEAM_OPS = (RealFlatten, PlanesDense, BinaryDense, SignedDense)
# Bit-planes assumed for the integer input layer (pixels 0..255) when estimating work.
PLANES_ESTIMATE = 8


@dataclass(frozen=True)
class Dispatch:
    """The path choice for one program: calls of fewer than ``serial_rows`` rows run fused or
    serial, fewer than ``team_rows`` on ``team`` (the team's kernel set, None without a team),
    the rest on the parallel kernels."""

    serial_rows: int
    team_rows: int
    team: KernelSet | None

    @classmethod
    def for_program(cls, program: Program) -> Dispatch:
        rows = serial_rows(program)
        if all(isinstance(op, TEAM_OPS) for op in program.ops):
            team = shared_team(numba.get_num_threads())
            if team is not None:
                return cls(rows, rows_below(program, TEAM_WORK_LIMIT), team.kernel_set())
        return cls(rows, rows, None)

    def fused(self, batch: int) -> bool:
        """Whether a call of ``batch`` rows tries the fused path first."""
        return batch < self.serial_rows

    def kernel_set(self, batch: int) -> KernelSet:
        """The kernels a call of ``batch`` rows runs (see the module docstring)."""
        if batch < self.serial_rows:
            return SERIAL
        if batch < self.team_rows and self.team is not None:
            return self.team
        return PARALLEL


def row_work(op: Op) -> int:
    """Cost of ``op`` per input row, in inner-loop steps: packed words × output channels (× bit
    planes, × output positions) for binary layers, multiply-adds for float ones."""
    if isinstance(op, BinaryDense):
        return op.weight.size
    if isinstance(op, BinaryConv):
        return op.out_hw[0] * op.out_hw[1] * op.weight.size
    if isinstance(op, PlanesDense):
        return PLANES_ESTIMATE * op.weight.size
    if isinstance(op, FloatDense):
        return op.weight.shape[0] * op.features
    if isinstance(op, SignedDense):
        return op.weight_t.size // 2  # about half the input bits are set
    if isinstance(op, FloatConv):
        (kh, kw), channels = op.kernel, op.in_shape[0]
        outputs = op.out_hw[0] * op.out_hw[1] * op.epilogue.out.shape[0]
        return outputs * kh * kw * channels
    return 0


def ranges(kset: KernelSet) -> int:
    """Contiguous ranges a kernel splits its work into: one per numba thread for the parallel
    kernels, else one (the team's kernels ignore it: they split the work their own way)."""
    return numba.get_num_threads() if kset is PARALLEL else 1


def serial_rows(program: Program) -> int:
    """The smallest batch whose work reaches SERIAL_WORK_LIMIT: smaller batches run the fused
    path or the serial kernels, this one and larger the team's or the parallel ones."""
    return rows_below(program, SERIAL_WORK_LIMIT)


def rows_below(program: Program, limit: int) -> int:
    """The smallest batch whose work (:func:`row_work` × batch) reaches ``limit``."""
    per_row = sum(row_work(op) for op in program.ops)
    return -(-limit // per_row) if per_row else sys.maxsize
