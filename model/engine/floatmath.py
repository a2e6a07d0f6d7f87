"""Float32 arithmetic exactly as the eager torch model does it, in numpy.

The engine decides every binary activation on integers, but the decision it reproduces is made
by the eager model in float32: ``sign(BN(scale·acc + bias))``. To match it bit for bit, the
per-channel steps between a layer's raw output and the binarizer are evaluated here with the
same roundings:

* a layer's affine part ``y = scale ⊙ raw + bias`` is two torch ops, each rounded to float32:
  ``fl(fl(raw·scale) + bias)`` (:class:`training.layers.QuantizedLayer.forward`);
* torch's CPU BatchNorm in eval mode (``batch_norm_cpu_collect_linear_and_constant_terms`` and
  the vectorized transform, compiled with FMA contraction) computes, per channel c::

      invstd = fl(1 / fl(sqrt(fl(var + eps))))      # float32
      alpha  = fl(invstd · weight)
      beta   = fma(−mean, alpha, bias)              # one rounding
      y      = fma(x, alpha, beta)                  # one rounding

  This was measured against torch 2.13 (CPU, AVX-512 build) on BatchNorm1d and BatchNorm2d with
  channel counts that are not multiples of the vector width: 0 mismatches in 94,720 values,
  while the unfused ``x·alpha + beta`` differs in ~4% of them (tests pin this). A torch build
  without FMA contraction, or cuDNN on a GPU, rounds differently in rare near-ties.

:func:`fma_f32` computes a correctly rounded float32 fused multiply-add: the product of two
float32 values is exact in float64, the sum is rounded once to float64 and then to float32; that
double rounding can only go wrong when the float64 sum lands exactly on a float32 midpoint, which
is detected and resolved with the exact error term of the float64 addition (TwoSum).
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
F64 = np.float64


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 ``a·b + c`` (IEEE fma), elementwise with broadcasting."""
    a64, b64, c64 = (np.asarray(v, dtype=F32).astype(F64) for v in (a, b, c))
    with np.errstate(over="ignore", invalid="ignore"):
        p = a64 * b64  # exact: 24 + 24 significant bits fit in 53
        s = p + c64
        # TwoSum: err is the exact rounding error of s = fl64(p + c).
        bp = s - c64
        err = (p - bp) + (c64 - (s - bp))
        r = s.astype(F32)
    # Double rounding is wrong only if s is exactly halfway between two float32 values.
    with np.errstate(over="ignore", invalid="ignore"):
        r64 = r.astype(F64)
        above = s > r64
        up = np.nextafter(r, np.inf).astype(F32)
        down = np.nextafter(r, -np.inf).astype(F32)
        # The float32 neighbour on s's side, and the midpoint between it and r.
        other = np.where(above, up, down)
        tie = (err != 0) & np.isfinite(s) & (s == (r64 + other.astype(F64)) / 2)
    if np.any(tie):
        # The true value p + c lies on err's side of the midpoint s: round to that side.
        toward_other = (err > 0) == above
        r = np.where(tie & toward_other, other, r).astype(F32)
    return r


def batchnorm_coefficients(
    weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (alpha, beta) of torch's eval BatchNorm: y = fma(x, alpha, beta)."""
    var32 = np.asarray(var, dtype=F32)
    invstd = (F32(1.0) / np.sqrt(var32 + F32(eps))).astype(F32)
    alpha = (invstd * np.asarray(weight, dtype=F32)).astype(F32)
    beta = fma_f32(-np.asarray(mean, dtype=F32), alpha, np.asarray(bias, dtype=F32))
    return alpha, beta


def affine_f32(x: np.ndarray, scale: np.ndarray | None, bias: np.ndarray | None) -> np.ndarray:
    """``fl(fl(x·scale) + bias)`` as the eager layer computes it (either part may be absent)."""
    y = np.asarray(x, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        if scale is not None:
            y = (y * scale).astype(F32)
        if bias is not None:
            y = (y + bias).astype(F32)
    return y


# Up to this many values, all_finite sums Python floats rather than running numpy ufuncs.
SMALL_FINITE_CHECK = 256


def all_finite(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is finite (True for an empty array).

    A served request checks its input and its logits, small arrays both, where two numpy
    ufunc calls (``isfinite``, then an ``and`` reduction) cost a digits-sized request 13–18 µs
    in the server (docs/benchmarks.md) though 2 µs alone. So an array of at most
    :data:`SMALL_FINITE_CHECK` float16/float32 values is checked as ``isfinite(Σ values)``,
    summed in float64 Python floats: exact, since a NaN or an infinity makes the sum NaN or
    infinite (∞ − ∞ is NaN) and finite values cannot overflow it (each is below 2¹²⁸, so fewer
    than 2⁸⁹⁵ of them sum below 2¹⁰²⁴). Larger or float64 arrays take the numpy reduction
    ``np.logical_and.reduce(np.isfinite(x), axis=None)`` (``ndarray.all`` without its Python
    wrapper)."""
    if x.size <= SMALL_FINITE_CHECK and x.dtype.itemsize <= 4 and x.dtype.kind == "f":
        return math.isfinite(sum(x.ravel().tolist()))
    return bool(np.logical_and.reduce(np.isfinite(x), axis=None))
