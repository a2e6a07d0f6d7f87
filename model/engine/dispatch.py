"""Dispatch policy of the CPU engine: which kernels a call runs, by its work.

Threads, by the call's work (:func:`row_work` × batch):

* below :data:`SERIAL_WORK_LIMIT`, the fused path (:mod:`model.engine.fused`) when the model
  has one and the input is integers in range, else the serial twins of the kernels
  (:data:`~model.engine.kernels.SERIAL`) on the calling thread alone, which also saves starting
  a parallel region in each kernel and switching numba's thread count. Small calls gain little
  from a second core, but a parallel kernel waits for every worker to be scheduled, so with
  another core busy its latency tail grows to milliseconds;
* above, whichever of the parallel (OpenMP) kernels, on the executor's threads
  (:class:`~model.engine.options.EngineOptions`; by default the usable cores), and the serial
  ones has been faster lately for calls of about that batch (:mod:`model.engine.measured`: a
  running mean of the time per row of each, per power-of-two batch bucket; the other set is
  re-measured on the next call when one is 3× slower than the other's mean, else one call in
  max(32, 8 × slower ÷ faster)). A parallel region waits for every worker to be scheduled, so with a core taken by a
  neighbour the serial kernels can be many times faster; on an idle machine the parallel ones
  are. Always the serial ones in a child forked after OpenMP started
  (:func:`~model.engine.runtime.parallel_kernels_usable`).

The figures behind these limits are in docs/benchmarks.md, "Engine design figures".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numba

from model.engine import runtime
from model.engine.kernels import PARALLEL, SERIAL, KernelSet
from model.engine.measured import PARALLEL_KERNELS, MeasuredChoice
from model.engine.ops import (
    BinaryConv,
    BinaryDense,
    FloatConv,
    FloatDense,
    Op,
    PlanesDense,
    Program,
    SignedDense,
)

# Work (see row_work) of one predict call below which its kernels run single-threaded: the digits
# mlp (64 → 1024 → 256 → 10, 12,288 per row) up to batch 5, a 4096-wide binary mlp never.
SERIAL_WORK_LIMIT = 1 << 16
# Bit-planes assumed for the integer input layer (pixels 0..255) when estimating work.
PLANES_ESTIMATE = 8

T = TypeVar("T")


@dataclass(frozen=True)
class Dispatch:
    """The path choice for one program: calls of fewer than ``serial_rows`` rows run fused or
    serial, the rest the kernel set that ``measured`` finds faster."""

    serial_rows: int
    measured: MeasuredChoice = field(default_factory=MeasuredChoice, compare=False)

    @classmethod
    def for_program(
        cls, program: Program, clock: Callable[[], float] = time.perf_counter
    ) -> Dispatch:
        return cls(serial_rows(program), MeasuredChoice(clock))

    def fused(self, batch: int) -> bool:
        """Whether a call of ``batch`` rows tries the fused path first."""
        return batch < self.serial_rows

    def run(self, batch: int, compute: Callable[[KernelSet], T]) -> T:
        """``compute(kernels)`` for a call of ``batch`` rows, with the kernels of the module
        docstring; a large call's wall time goes to ``measured``."""
        if batch < self.serial_rows or not runtime.parallel_kernels_usable():
            return compute(SERIAL)
        choice = self.measured
        kind = choice.choose(batch)
        started = choice.clock()
        result = compute(PARALLEL if kind == PARALLEL_KERNELS else SERIAL)
        choice.record(batch, kind, choice.clock() - started)
        return result


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
        return op.outputs * op.features
    if isinstance(op, SignedDense):
        return op.weight_t.size // 2  # about half the input bits are set
    if isinstance(op, FloatConv):
        (kh, kw), channels = op.kernel, op.in_shape[0]
        outputs = op.out_hw[0] * op.out_hw[1] * op.epilogue.out.shape[0]
        return outputs * kh * kw * channels
    return 0


def ranges(kset: KernelSet) -> int:
    """Contiguous ranges a kernel splits its work into: one per numba thread for the parallel
    kernels, else one."""
    return numba.get_num_threads() if kset is PARALLEL else 1


def serial_rows(program: Program) -> int:
    """The smallest batch whose work reaches SERIAL_WORK_LIMIT: smaller batches run the fused
    path or the serial kernels, this one and larger the measured choice."""
    return rows_below(program, SERIAL_WORK_LIMIT)


def rows_below(program: Program, limit: int) -> int:
    """The smallest batch whose work (:func:`row_work` × batch) reaches ``limit``."""
    per_row = sum(row_work(op) for op in program.ops)
    return -(-limit // per_row) if per_row else sys.maxsize
