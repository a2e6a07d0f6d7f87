"""Fold the per-channel float steps before a binarizer into one threshold per channel.

Between a layer's raw output ``v`` (an exact integer accumulator for binary layers, a float32 for
full-precision ones) and the binarizer of the next layer's input sit per-channel steps: the
layer's own ``scale``/``bias``, BatchNorm, and max-pooling. Each step is monotone in ``v``
(non-decreasing where its slope is positive, non-increasing where negative, constant where it
is zero), and so is the binarizer, so whether the eager model's float32 computation *fires*
(``sign``: y ≥ 0, ``step``: y > 0) is a step function of ``v``::

    fires(v) = (v ≥ cut) XOR flip        per channel

``cut`` is found by a vectorized binary search over every representable ``v``, evaluating the
eager float32 formulas of :mod:`model.engine.floatmath` (so decisions match eager bit for bit):
the smallest ``v`` at which the output changes from its value at the bottom of the range.
``flip`` is set where the chain is decreasing (BatchNorm weight or α negative) — the compare
is flipped — and for constant channels (a zero weight) ``cut`` is the bottom of the range and
``flip`` gives the constant.

Max-pooling commutes with monotone steps: ``max_i f(v_i) = f(max_i v_i)`` for non-decreasing
``f`` and ``f(min_i v_i)`` for non-increasing ones. So the engine decides every pre-pool
position with the whole chain and then pools the *decisions*: a channel whose steps after the
pool are increasing fires if any position in the window fires (OR), a decreasing one only if
all do (AND). :func:`pool_and_mask` gives that choice per channel in the packed-bit encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.engine.floatmath import F32, affine_f32, batchnorm_coefficients, fma_f32
from model.quantizers import SIGN, Binarizer

# Integer accumulators are exact in float32 (as eager computes them) up to 2**24.
INT_LIMIT = 2**24
_MAX_FLOAT_KEY = int(np.array(np.finfo(F32).max, dtype=F32).view(np.int32))


@dataclass(frozen=True)
class AffineStep:
    """A layer's ``y = fl(fl(v·scale) + bias)``; either may be None."""

    scale: np.ndarray | None
    bias: np.ndarray | None

    def __call__(self, v: np.ndarray) -> np.ndarray:
        return affine_f32(v, self.scale, self.bias)

    def direction(self, channels: int) -> np.ndarray:
        return (
            np.ones(channels, np.int8)
            if self.scale is None
            else np.sign(self.scale).astype(np.int8)
        )


@dataclass(frozen=True)
class BatchNormStep:
    """torch eval BatchNorm: ``y = fma(v, alpha, beta)``."""

    alpha: np.ndarray
    beta: np.ndarray

    @classmethod
    def from_stats(cls, weight, bias, mean, var, eps: float) -> BatchNormStep:
        return cls(*batchnorm_coefficients(weight, bias, mean, var, eps))

    def __call__(self, v: np.ndarray) -> np.ndarray:
        return fma_f32(v, self.alpha, self.beta)

    def direction(self, channels: int) -> np.ndarray:
        return np.sign(self.alpha).astype(np.int8)


Step = AffineStep | BatchNormStep


@dataclass(frozen=True)
class Thresholds:
    """``fires(v) = (v ≥ cut) XOR flip`` per channel; ``cut`` is int64 (integer domain) or
    float32 (float domain)."""

    cut: np.ndarray
    flip: np.ndarray  # (C,) bool


def apply_steps(steps: Sequence[Step], v: np.ndarray) -> np.ndarray:
    """Evaluate the chain in float32 as eager does (``v`` broadcasts against (C,) vectors)."""
    y = np.asarray(v, dtype=F32)
    for step in steps:
        y = step(y)
    return y


def chain_direction(steps: Sequence[Step], channels: int) -> np.ndarray:
    """+1 non-decreasing, −1 non-increasing, 0 constant, per channel."""
    direction = np.ones(channels, np.int8)
    for step in steps:
        direction = direction * step.direction(channels)
    return direction


def fires(binarizer: Binarizer, y: np.ndarray) -> np.ndarray:
    """The binarizer's decision on float32 ``y``: y ≥ 0 (sign) or y > 0 (step)."""
    return y > 0 if binarizer.strict else y >= 0


def fold_batchnorm_into_thresholds(
    steps: Sequence[Step], binarizer: Binarizer, channels: int, *, integer: bool
) -> Thresholds:
    """Thresholds on the raw value ``v`` that reproduce ``binarizer(chain(v))`` exactly.

    ``integer=True``: ``v`` is an integer accumulator in [−2²⁴, 2²⁴] (cut: int64).
    ``integer=False``: ``v`` is any finite float32 (cut: float32, searched over the ordered
    bit patterns of float32).
    """
    if integer:
        lo, hi = -INT_LIMIT, INT_LIMIT
        to_value = _int_values
    else:
        lo, hi = -_MAX_FLOAT_KEY, _MAX_FLOAT_KEY
        to_value = _key_to_float

    def decision(keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return fires(binarizer, apply_steps(steps, to_value(keys)))

    direction = chain_direction(steps, channels)
    # A constant channel's value is decided at 0: at the ends of the float range a zero
    # BatchNorm weight meets an overflowed infinity (inf·0 = NaN), which eager never sees.
    at_zero = decision(np.zeros(channels, np.int64))
    at_bottom = decision(np.full(channels, lo, np.int64))
    # Find, per channel, the smallest key whose decision differs from the one at the bottom.
    low = np.full(channels, lo, np.int64)
    high = np.full(channels, hi + 1, np.int64)  # hi + 1 = "never changes"
    while np.any(low < high):
        mid = (low + high) // 2
        changed = decision(mid) != at_bottom
        active = low < high
        high = np.where(active & changed, mid, high)
        low = np.where(active & ~changed, mid + 1, low)
    cut_key = low
    # decision(v) = at_bottom for v < cut, else not at_bottom  ⇒  (v ≥ cut) XOR at_bottom.
    # A constant channel never changes: cut = hi + 1 and decision = at_bottom everywhere.
    never_changes = cut_key > hi
    constant = (direction == 0) | never_changes
    cut_key = np.where(constant, lo, cut_key)
    flip = np.where(direction == 0, ~at_zero, np.where(never_changes, ~at_bottom, at_bottom))
    cut = cut_key if integer else _key_to_float(cut_key)
    return Thresholds(cut=cut, flip=flip.astype(bool))


def pool_and_mask(
    steps_after_pool: Sequence[Step], channels: int, binarizer: Binarizer
) -> np.ndarray:
    """Per channel, whether max-pooling the packed decision bits is a bitwise AND (else OR).

    Bits encode ``−1`` (sign: bit = not fires) or ``1`` (step: bit = fires). Max-pool fires if
    any position fires when the steps after the pool are non-decreasing, if all fire when they
    are non-increasing.
    """
    increasing = chain_direction(steps_after_pool, channels) >= 0
    return increasing == (binarizer is SIGN)


def bit_invert(thresholds: Thresholds, binarizer: Binarizer) -> np.ndarray:
    """Packed bit = (v ≥ cut) XOR invert: bit 1 means −1 for sign, 1 for step."""
    return thresholds.flip ^ (binarizer is SIGN)


def _int_values(keys: np.ndarray) -> np.ndarray:
    return keys.astype(F32)  # exact for |key| ≤ 2**24


def _key_to_float(keys: np.ndarray) -> np.ndarray:
    """Ordered int key → float32 (0 ↔ +0.0; negative keys ↔ negative floats)."""
    keys = np.asarray(keys, dtype=np.int64)
    magnitude = np.abs(keys).astype(np.int32)
    bits = np.where(keys < 0, magnitude | np.int32(-(2**31)), magnitude).astype(np.int32)
    return bits.view(F32)


def float_to_key(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_key_to_float` (both zeros map to 0)."""
    bits = np.asarray(values, dtype=F32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
