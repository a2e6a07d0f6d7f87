"""Folding BatchNorm (+ α, bias) and the binarizer into integer thresholds is exact.

The reference is torch itself: the eager model's float32 ops evaluated on every accumulator value
a layer can produce, compared with the engine's ``(v ≥ cut) XOR flip``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.engine.floatmath import all_finite, batchnorm_coefficients, fma_f32
from model.engine.folding import (
    AffineStep,
    BatchNormStep,
    float_to_key,
    fold_batchnorm_into_thresholds,
    pool_and_mask,
)
from model.quantizers import SIGN, STEP

torch = pytest.importorskip("torch")


def random_chain(rng: np.random.Generator, channels: int, k: int, *, scale: bool):
    """Layer affine + BatchNorm with both signs, exact zeros, and thresholds inside [−K, K]."""
    spread = np.sqrt(k)
    alpha = rng.uniform(0.2, 1.5, channels).astype(np.float32) if scale else None
    if alpha is not None:
        alpha[rng.random(channels) < 0.15] *= -1
        alpha[rng.random(channels) < 0.05] = 0.0
    bias = rng.normal(0, 2, channels).astype(np.float32)
    weight = rng.normal(0, 1, channels).astype(np.float32)
    weight[rng.random(channels) < 0.15] = 0.0
    bn_bias = rng.normal(0, 0.5, channels).astype(np.float32)
    bn_bias[rng.random(channels) < 0.2] = 0.0  # sign(0)/step(0) ties at BN output exactly 0
    mean = rng.normal(0, spread, channels).astype(np.float32)
    var = (rng.uniform(0.2, 2.0, channels) * k).astype(np.float32)
    return alpha, bias, (weight, bn_bias, mean, var)


def torch_decisions(v: np.ndarray, alpha, bias, bn_stats, eps: float, strict: bool) -> np.ndarray:
    """(values,) → (values, C) decisions of the eager float32 model."""
    x = torch.from_numpy(np.repeat(v.astype(np.float32)[:, None], len(bias), axis=1))
    if alpha is not None:
        x = x * torch.from_numpy(alpha)
    x = x + torch.from_numpy(bias)
    bn = torch.nn.BatchNorm1d(len(bias), eps=eps).eval()
    with torch.no_grad():
        for name, value in zip(
            ("weight", "bias", "running_mean", "running_var"), bn_stats, strict=True
        ):
            getattr(bn, name).copy_(torch.from_numpy(value))
        y = bn(x)
    return (y > 0 if strict else y >= 0).numpy()


@pytest.mark.parametrize("binarizer", [SIGN, STEP], ids=["sign", "step"])
@pytest.mark.parametrize("scale", [False, True], ids=["no-alpha", "alpha"])
def test_integer_thresholds_match_eager_on_every_accumulator(binarizer, scale):
    rng = np.random.default_rng(7)
    k, channels = 300, 97
    alpha, bias, bn_stats = random_chain(rng, channels, k, scale=scale)
    steps = [AffineStep(alpha, bias), BatchNormStep.from_stats(*bn_stats, eps=1e-5)]
    th = fold_batchnorm_into_thresholds(steps, binarizer, channels, integer=True)
    acc = np.arange(-k, k + 1)
    want = torch_decisions(acc, alpha, bias, bn_stats, 1e-5, binarizer.strict)
    got = (acc[:, None] >= th.cut[None, :]) ^ th.flip[None, :]
    np.testing.assert_array_equal(got, want)
    # Folding is really exercised: thresholds inside the range, flipped and constant channels.
    inside = (th.cut > -k) & (th.cut <= k)
    assert inside.sum() > channels // 2
    assert th.flip[inside].any() and (~th.flip[inside]).any()
    constant = (want == want[:1]).all(axis=0)
    assert constant.any()


def test_float_thresholds_match_eager_near_the_cut():
    """Real-valued producers (the fp first conv) get float32 cuts: every float32 within 64 ulps
    of each cut decides as eager does."""
    rng = np.random.default_rng(11)
    channels = 50
    alpha, bias, bn_stats = random_chain(rng, channels, 50, scale=True)
    steps = [AffineStep(alpha, bias), BatchNormStep.from_stats(*bn_stats, eps=1e-3)]
    th = fold_batchnorm_into_thresholds(steps, SIGN, channels, integer=False)
    for c in range(channels):
        key = float_to_key(th.cut[c : c + 1])[0]
        keys = np.arange(key - 64, key + 64)
        keys = keys[np.abs(keys) < 0x7F800000]
        values = (
            (np.where(keys < 0, (-keys) | np.int64(-(2**31)), keys))
            .astype(np.int32)
            .view(np.float32)
        )
        want = torch_decisions(values, alpha, bias, bn_stats, 1e-3, False)[:, c]
        got = (values >= th.cut[c]) ^ th.flip[c]
        np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 2000),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    strict=st.booleans(),
)
def test_thresholds_property(seed, k, eps, strict):
    rng = np.random.default_rng(seed)
    channels = 8
    alpha, bias, bn_stats = random_chain(rng, channels, k, scale=bool(seed % 2))
    steps = [AffineStep(alpha, bias), BatchNormStep.from_stats(*bn_stats, eps=eps)]
    binarizer = STEP if strict else SIGN
    th = fold_batchnorm_into_thresholds(steps, binarizer, channels, integer=True)
    acc = np.arange(-k, k + 1)
    want = torch_decisions(acc, alpha, bias, bn_stats, eps, strict)
    np.testing.assert_array_equal((acc[:, None] >= th.cut) ^ th.flip, want)


def test_batchnorm_formula_is_torchs():
    """torch's CPU eval BatchNorm is fma(x, α, fma(−mean, α, b)) with α = (1/√(var+eps))·w; the
    unfused x·α + β differs from it (so this pins the formula the thresholds rely on)."""
    rng = np.random.default_rng(0)
    c = 37
    stats = (
        rng.normal(size=c).astype(np.float32),
        rng.normal(size=c).astype(np.float32),
        (rng.normal(size=c) * 30).astype(np.float32),
        (rng.exponential(size=c) * 50).astype(np.float32),
    )
    x = (rng.integers(-300, 300, (512, c)) + rng.random((512, c))).astype(np.float32)
    bn = torch.nn.BatchNorm1d(c).eval()
    with torch.no_grad():
        for name, value in zip(
            ("weight", "bias", "running_mean", "running_var"), stats, strict=True
        ):
            getattr(bn, name).copy_(torch.from_numpy(value))
        want = bn(torch.from_numpy(x)).numpy()
    alpha, beta = batchnorm_coefficients(*stats, eps=1e-5)
    np.testing.assert_array_equal(fma_f32(x, alpha, beta), want)
    assert ((x * alpha + beta).astype(np.float32) != want).mean() > 0.01


def test_fma_is_correctly_rounded_at_float32_midpoints():
    """Cases where fl64(a·b + c) lands exactly halfway between two float32: a plain cast would
    round the double-rounded value; the exact result is on err's side."""
    a = np.float32(1 + 2**-12)
    b = np.float32(1 + 2**-12)  # a·b = 1 + 2^-11 + 2^-24 exactly
    for c, want in [
        (np.float32(2**-60), np.float32(1 + 2**-11 + 2**-23)),  # just above the midpoint: up
        (np.float32(0.0), np.float32(1 + 2**-11)),  # exactly the midpoint: ties to even
        (np.float32(-(2**-60)), np.float32(1 + 2**-11)),  # just below: down
    ]:
        got = fma_f32(np.array([a]), np.array([b]), np.array([c]))[0]
        assert got == want, (c, got, want)
    naive = np.float32(np.float64(a) * np.float64(b) + np.float64(np.float32(2**-60)))
    assert naive != np.float32(1 + 2**-11 + 2**-23)  # the double rounding the fix avoids


def test_pool_and_mask_follows_direction_after_the_pool():
    inc = BatchNormStep(np.array([2.0, -1.0, 0.0], np.float32), np.zeros(3, np.float32))
    # sign bits encode −1: max over ±1 = AND of "is −1" where increasing, OR where decreasing
    np.testing.assert_array_equal(pool_and_mask([inc], 3, SIGN), [True, False, True])
    np.testing.assert_array_equal(pool_and_mask([inc], 3, STEP), [False, True, False])
    np.testing.assert_array_equal(pool_and_mask([], 3, SIGN), [True, True, True])


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ([1.0, -2.5], np.float32),
        ([3.4e38] * 256, np.float32),  # the float64 sum of large finite values stays finite
        ([np.inf, -np.inf], np.float32),  # ∞ − ∞ sums to NaN
        ([1.0, np.nan], np.float16),
        ([-np.inf], np.float32),
        ([1e308, 1e308], np.float64),  # a float64 sum would overflow: numpy decides
        ([3.4e38] * 257, np.float32),  # past the small-array path
        ([np.nan] + [0.0] * 300, np.float32),
        ([], np.float32),
    ],
)
def test_all_finite_agrees_with_numpy_on_both_paths(values, dtype):
    x = np.array(values, dtype)
    assert all_finite(x) == bool(np.isfinite(x).all())
    assert all_finite(x.reshape(1, -1, 1)) == all_finite(x)
