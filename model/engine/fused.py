"""Fused paths: a whole model in one kernel call, for the calls too small to pay per layer.

A binary mlp ([flatten,] bit-plane dense, binary dense layers, full-precision dense) on a few
rows of integer input runs as :func:`mlp_rows`: the serial kernels of its layers back to back in
one numba call, so the per-call costs (dispatch, argument checks, buffers) are paid once instead
of once per layer. :class:`MlpPlan` holds its arrays; :func:`mlp_plan` builds it when a program
has that shape. :mod:`model.engine.dispatch` decides which calls take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
from numba import njit

from model.engine import runtime
from model.engine.floatmath import F32
from model.engine.kernels import (
    ROW_CHUNK,
    SERIAL,
    affine_rows,
    aligned_words,
    integer_bit_planes,
)
from model.engine.layout import WORD
from model.engine.ops import (
    MAX_PLANE_VALUE,
    BinaryDense,
    Decide,
    PlanesDense,
    Program,
    RealFlatten,
    SignedDense,
    ToReal,
)

_planes_word_serial = SERIAL.planes_word_threshold_pack
_planes_dense_serial = SERIAL.planes_dense_threshold_pack
_dense_serial = SERIAL.dense_threshold_pack
_signed_dense_serial = SERIAL.signed_dense


@njit(nogil=True, cache=True, fastmath=True)
def mlp_rows(x, max_value, first, hidden_w, hidden_cut, hidden_invert, sweeps, last, logits):
    """A binary mlp on a few rows in one call, on the calling thread: the serial kernels of its
    layers run back to back, so the per-call costs (dispatch, argument checks, buffers) are paid
    once instead of once per layer — most of a small model's time at batch 1.

    x (M, F) float32 integer-valued input; first = (w, pcw, cut, invert) of the bit-plane input
    layer (:func:`planes_dense_threshold_pack`); hidden_* the binary layers' weights, cuts and
    inverts (:func:`dense_threshold_pack`) and their direction flags, as non-empty tuples; last = (weight_t, base,
    coef, scale, bias) of the full-precision output layer (:func:`signed_dense`, then
    :func:`affine_rows`; scale and bias may be None); logits (M, O) float32 receives the result.
    Returns False, with logits untouched, unless every input is an integer in [0, max_value]
    (the caller then runs the layers one by one, through the float path).
    """
    w, pcw, cut, invert = first
    planes = integer_bit_planes(x, max_value, w.shape[1])
    if planes.shape[0] == 0:
        return False
    m_rows = x.shape[0]
    a = aligned_words((m_rows, (w.shape[0] + WORD - 1) // WORD))
    if w.shape[1] == 1:
        _planes_word_serial(planes, w, pcw, cut, invert, a)
    else:
        _planes_dense_serial(planes, w, pcw, cut, invert, a)
    for i in range(len(hidden_w)):
        hw = hidden_w[i]
        out = aligned_words((m_rows, (hw.shape[0] + WORD - 1) // WORD))
        _dense_serial(a, hw, hidden_cut[i], hidden_invert[i], out, ROW_CHUNK, 1, sweeps[i])
        a = out
    weight_t, base, coef, scale, bias = last
    raw = np.empty((m_rows, weight_t.shape[1]), np.float64)
    _signed_dense_serial(a, weight_t, base, coef, raw)
    affine_rows(raw.astype(np.float32), scale, bias, logits)
    return True


_Arrays = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class MlpPlan:
    """A binary mlp's arrays, laid out for :func:`mlp_rows`, which runs
    the whole model in one call for batches below
    :attr:`~model.engine.dispatch.Dispatch.serial_rows` (single-threaded anyway, and at batch 1
    dominated by per-layer call costs; figures in docs/benchmarks.md, "Engine design figures")."""

    features: int
    classes: int
    first: tuple  # (weight, pcw, cut, invert) of the bit-plane input layer
    # (weights, cuts, inverts, direction flags) of the binary layers, each a tuple
    hidden: tuple[_Arrays, _Arrays, _Arrays, _Arrays]
    last: tuple  # (weight_t, base, coef, scale, bias) of the full-precision output layer

    def run(self, x: np.ndarray) -> np.ndarray | None:
        """Logits of x (batch, …) float32, or None when x is not integers in range (the
        layer-by-layer path then takes its float route)."""
        rows = np.ascontiguousarray(x.reshape(x.shape[0], self.features), dtype=F32)
        logits = np.empty((x.shape[0], self.classes), F32)
        # serial kernels only: no parallel region, so no kernel_guard whatever the layer
        done = mlp_rows(rows, MAX_PLANE_VALUE, self.first, *self.hidden, self.last, logits)
        return logits if done else None


def mlp_plan(program: Program, sweeps: dict[int, np.ndarray]) -> MlpPlan | None:
    """The :class:`MlpPlan` of ``program`` if it is [flatten,] bit-plane dense, binary dense (one
    or more), full-precision dense — every binary layer deciding without pooling, the output's
    affine step in float32 — else None."""
    flattens = [i for i, op in enumerate(program.ops) if isinstance(op, RealFlatten)]
    ops = program.ops[len(flattens) :]
    if flattens not in ([], [0]) or len(ops) < 2:  # a flatten may only come first
        return None
    first, *hidden, last = ops
    if not hidden:  # the kernel indexes the hidden layers' tuples, which must not be empty
        return None
    if not (isinstance(first, PlanesDense) and _plain_decide(first.epilogue)):
        return None
    decided = [
        (op, op.epilogue)
        for op in hidden
        if isinstance(op, BinaryDense) and _plain_decide(op.epilogue)
    ]
    if len(decided) != len(hidden):  # each hidden layer: binary dense, deciding, no pooling
        return None
    if not (isinstance(last, SignedDense) and isinstance(last.epilogue, ToReal)):
        return None
    affine = last.epilogue.affine
    scale, bias = (None, None) if affine is None else (affine.scale, affine.bias)
    if any(v is not None and v.dtype != F32 for v in (scale, bias)):
        return None
    # Tuples, not typed lists: numba checks a tuple's items in C, a typed list in Python
    # (measured: docs/benchmarks.md, "Engine design figures").
    hidden_arrays = (
        tuple(op.weight for op, _ in decided),
        tuple(ep.cut for _, ep in decided),
        tuple(ep.invert for _, ep in decided),
        tuple(sweeps[id(op)] for op, _ in decided),
    )
    # the kernel indexes each tuple by a loop variable: its items must have one numba type
    for arrays, dtype in zip(hidden_arrays, (np.uint64, np.int64, np.uint8, np.uint8), strict=True):
        if not all(a.dtype == dtype and a.flags.c_contiguous for a in arrays):
            return None
    ep = first.epilogue
    return MlpPlan(
        features=first.features,
        classes=last.weight_t.shape[1],
        first=(first.weight, first.pcw, ep.cut, ep.invert),
        hidden=hidden_arrays,
        last=(last.weight_t, last.base, float(last.coef), scale, bias),
    )


def _plain_decide(ep: Decide | ToReal) -> TypeGuard[Decide]:
    return isinstance(ep, Decide) and not ep.pools


# numba stamps a cached kernel with this file only; add the digest of all the engine sources
runtime.stamp_kernel_caches()
