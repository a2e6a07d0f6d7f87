"""The float32 kernels of graph values against torch and numpy references, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model.engine.cpu import pad_nhwc, real_avgpool, real_maxpool  # noqa: E402
from model.engine.floatmath import affine_f32, fma_f32  # noqa: E402
from model.engine.folding import BatchNormStep  # noqa: E402
from model.engine.kernels import BIAS_AFTER_SUM  # noqa: E402
from model.engine.real_kernels import (  # noqa: E402
    accumulator_rows,
    batchnorm_rows,
    binary_columns_real,
    real_conv_rows,
    real_dense_rows,
)


def batchnorm(rng: np.random.Generator, c: int) -> tuple[torch.nn.BatchNorm2d, BatchNormStep]:
    w, b, m = (rng.normal(size=c).astype(np.float32) for _ in range(3))
    v = rng.uniform(0.1, 3.0, size=c).astype(np.float32)
    bn = torch.nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        for name, value in zip(
            ("weight", "bias", "running_mean", "running_var"), (w, b, m, v), strict=True
        ):
            getattr(bn, name).copy_(torch.from_numpy(value))
    return bn, BatchNormStep.from_stats(w, b, m, v, bn.eps)


def test_batchnorm_rows_is_torch_batchnorm_bit_for_bit():
    rng = np.random.default_rng(0)
    c = 77  # not a multiple of any vector width
    x = (rng.normal(size=(3, c, 9, 11)) * 40).astype(np.float32)
    bn, step = batchnorm(rng, c)
    with torch.no_grad():
        want = bn(torch.from_numpy(x)).numpy()
    rows = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(-1, c)
    out = np.empty_like(rows)
    batchnorm_rows(rows, step.alpha, step.beta, out)
    np.testing.assert_array_equal(out.reshape(3, 9, 11, c).transpose(0, 3, 1, 2), want)


@pytest.mark.parametrize("sign_input", [True, False])
@pytest.mark.parametrize("with_affine", [True, False])
def test_accumulator_rows_is_the_eager_layer_then_its_batchnorm(sign_input, with_affine):
    rng = np.random.default_rng(1)
    k, o = 576, 70
    p = rng.integers(0, k + 1, size=(50, o)).astype(np.int32)
    pcw = rng.integers(0, k + 1, size=o).astype(np.int64)
    scale = rng.uniform(0.2, 1.5, size=o).astype(np.float32) if with_affine else None
    bias = rng.normal(0, 3, size=o).astype(np.float32) if with_affine else None
    _, step = batchnorm(rng, o)
    out = np.empty((50, o), np.float32)
    accumulator_rows(p, k, pcw, sign_input, scale, bias, step.alpha, step.beta, out)
    acc = (k - 2 * p.astype(np.int64)) if sign_input else p - pcw
    want = fma_f32(affine_f32(acc.astype(np.float32), scale, bias), step.alpha, step.beta)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("sign_input", [True, False])
@pytest.mark.parametrize("with_affine", [True, False])
@pytest.mark.parametrize(("m", "o", "words"), [(16, 64, 9), (13, 75, 3), (8, 32, 18), (3, 5, 1)])
def test_binary_columns_real_is_accumulator_rows_of_the_counts(
    sign_input, with_affine, m, o, words
):
    """The column kernel's fused epilogue (whole blocks from registers, edges through a tile)
    gives accumulator_rows' bits for every channel and row; any thread split."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2**63, size=(m, words), dtype=np.uint64)
    w = rng.integers(0, 2**63, size=(o, words), dtype=np.uint64)
    p = np.bitwise_count(a[:, None, :] ^ w[None, :, :]).sum(axis=-1).astype(np.int32)
    k = 64 * words
    pcw = np.bitwise_count(w).sum(axis=-1).astype(np.int64)
    scale = rng.uniform(0.2, 1.5, size=o).astype(np.float32) if with_affine else None
    bias = rng.normal(0, 3, size=o).astype(np.float32) if with_affine else None
    _, step = batchnorm(rng, o)
    want = np.empty((m, o), np.float32)
    accumulator_rows(p, k, pcw, sign_input, scale, bias, step.alpha, step.beta, want)
    rows = a.reshape(1, m, 1, words)  # the patch rows of a 1×1 convolution
    for ranges in (1, 3):
        out = np.full((m, o), np.nan, np.float32)
        binary_columns_real(
            rows, 1, 1, 1, 1, np.ascontiguousarray(w.T), k, pcw, sign_input, scale, bias,
            step.alpha, step.beta, None, out, ranges,
        )  # fmt: skip
        np.testing.assert_array_equal(out, want)
        with_shortcut = np.empty_like(out)
        shortcut = (50 * rng.normal(size=(m, o))).astype(np.float32)
        binary_columns_real(
            rows, 1, 1, 1, 1, np.ascontiguousarray(w.T), k, pcw, sign_input, scale, bias,
            step.alpha, step.beta, shortcut, with_shortcut, ranges,
        )  # fmt: skip
        np.testing.assert_array_equal(with_shortcut, want + shortcut)  # RealAdd's rounding


@pytest.mark.parametrize(("channels", "o", "stride"), [(3, 64, 2), (5, 24, 1)])
def test_real_conv_rows_is_this_cpus_torch_conv2d_with_bias(channels, o, stride):
    """Bit for bit F.conv2d with a bias on this machine's torch for 7×7 stems (PyTorch always
    runs kernels larger than 3×3 through oneDNN, which starts each sum at the bias on AVX2 and
    adds it last on AVX-512: BIAS_AFTER_SUM must pick the same). Smaller convolutions may take
    im2col + GEMM instead, which sums in another order: their ties are the measured tie rate."""
    k = 7
    rng = np.random.default_rng(5)
    n = 2
    x = rng.integers(0, 256, size=(n, channels, 15, 15)).astype(np.float32)
    weight = rng.normal(size=(o, channels, k, k)).astype(np.float32)
    bias = (10 * rng.normal(size=o)).astype(np.float32)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(
            torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), stride=stride
        ).numpy()
    rows = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, o))
    oh = want.shape[2]
    out = np.empty((n * oh * oh, o), np.float32)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    real_conv_rows(nhwc, rows, bias, k, k, stride, stride, None, None, out)
    np.testing.assert_array_equal(out.reshape(n, oh, oh, o).transpose(0, 3, 1, 2), want)


@pytest.mark.parametrize(("channels", "o", "w"), [(3, 75, 8), (70, 75, 12), (3, 128, 10)])
def test_real_conv_rows_sums_in_the_documented_order(channels, o, w):
    """bias (or 0, the bias added last: BIAS_AFTER_SUM), then one float32 fma per term in
    (dy, dx, c) order; then the BatchNorm's fma."""
    rng = np.random.default_rng(2)
    # 75 and 128 outputs: whole channel blocks (32 on AVX2, 64 on AVX-512), then 8 and 1 at a
    # time; output widths 3, 5 and 4: blocks of 3 or 4 windows, then single windows
    n, h, kh, kw, stride = 2, 9, 3, 3, 2
    x = rng.normal(size=(n, h, w, channels)).astype(np.float32)
    weight = rng.normal(size=(kh * kw * channels, o)).astype(np.float32)
    bias = rng.normal(size=o).astype(np.float32)
    _, step = batchnorm(rng, o)
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.empty((n * oh * ow, o), np.float32)
    real_conv_rows(x, weight, bias, kh, kw, stride, stride, step.alpha, step.beta, out)
    acc = np.broadcast_to(np.float32(0) if BIAS_AFTER_SUM else bias, (n, oh, ow, o)).copy()
    for dy in range(kh):
        for dx in range(kw):
            window = x[
                :,
                dy : dy + stride * (oh - 1) + 1 : stride,
                dx : dx + stride * (ow - 1) + 1 : stride,
            ]
            for ch in range(channels):
                term = window[..., ch : ch + 1]
                acc = fma_f32(term, weight[(dy * kw + dx) * channels + ch], acc)
    if BIAS_AFTER_SUM:
        acc = acc + bias
    want = fma_f32(acc, step.alpha, step.beta).reshape(-1, o)
    np.testing.assert_array_equal(out, want)
    plain = np.empty_like(out)
    real_conv_rows(x, weight, bias, kh, kw, stride, stride, None, None, plain)
    np.testing.assert_array_equal(plain, acc.reshape(-1, o))


@pytest.mark.parametrize("m", [1, 3, 4, 49, 50])
@pytest.mark.parametrize("with_batchnorm", [True, False])
def test_real_dense_rows_are_real_conv_rows_of_a_1x1_convolution(m, with_batchnorm):
    """The rows kernel (blocks of windows across image rows, rows split between threads)
    gives the 1×1 convolution's bits for every row count and split: whole blocks, a short
    last block, single windows."""
    rng = np.random.default_rng(4)
    c, o = 70, 75
    x = rng.normal(size=(m, c)).astype(np.float32)
    weight = rng.normal(size=(c, o)).astype(np.float32)
    bias = rng.normal(size=o).astype(np.float32)
    _, step = batchnorm(rng, o)
    alpha, beta = (step.alpha, step.beta) if with_batchnorm else (None, None)
    want = np.empty((m, o), np.float32)
    real_conv_rows(x.reshape(m, 1, 1, c), weight, bias, 1, 1, 1, 1, alpha, beta, want)
    for ranges in (1, 2, 3):
        out = np.full((m, o), np.nan, np.float32)
        real_dense_rows(x, weight, bias, alpha, beta, out, ranges)
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize(
    ("shape", "kernel", "stride"),
    [
        ((2, 5, 9, 7), (2, 2), (2, 2)),
        ((1, 64, 12, 12), (3, 3), (2, 2)),
        ((3, 1, 4, 6), (1, 3), (1, 1)),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_real_maxpool_is_the_window_max(shape, kernel, stride, channels_last):
    """The max of each window, as F.max_pool2d; the input may be either memory layout."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape).astype(np.float32)
    if channels_last:  # how a conv's or an add's output arrives: NHWC strides
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))
    want = windows[:, :, :: stride[0], :: stride[1]].max(axis=(-2, -1))
    np.testing.assert_array_equal(real_maxpool(x, kernel, stride), want)


@pytest.mark.parametrize(
    ("shape", "kernel", "stride"),
    [
        ((2, 5, 9, 7), (2, 2), (2, 2)),
        ((1, 64, 12, 12), (3, 3), (2, 2)),
        ((3, 2, 4, 6), (1, 3), (1, 1)),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_real_avgpool_is_torch_avg_pool2d_bit_for_bit(shape, kernel, stride, channels_last):
    """Each window summed in (dy, dx) order and divided, as F.avg_pool2d rounds it, from
    either memory layout (channels-last float32 takes the numba pass)."""
    x = (np.random.default_rng(9).normal(size=shape) * 1e3).astype(np.float32)
    want = torch.nn.functional.avg_pool2d(torch.from_numpy(x), kernel, stride).numpy()
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(real_avgpool(x, kernel, stride), want)


@pytest.mark.parametrize("channels_last", [False, True])
def test_real_maxpool_propagates_nan_as_torch(channels_last):
    """A NaN in a window makes that window's max NaN, as ``F.max_pool2d`` does, whether it
    comes first in its window or after a larger value."""
    x = np.random.default_rng(6).normal(size=(1, 2, 4, 4)).astype(np.float32)
    x[0, 1, 2, 3] = np.nan  # last in its window
    x[0, 0, 0, 0] = np.nan  # first in its window
    x[0, 0, 0, 1] = 1e30
    want = torch.nn.functional.max_pool2d(torch.from_numpy(x), 2, 2).numpy()
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    got = real_maxpool(x, (2, 2), (2, 2))
    assert np.isnan(got[0, 1, 1, 1]) and np.isnan(got[0, 0, 0, 0]) and np.isnan(want[0, 0, 0, 0])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 64, 6, 4), (3, 1, 1, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pad_nhwc_surrounds_the_channels_last_image(shape, channels_last):
    """The image moved to channels-last with a border of the pad value, whichever memory
    layout it arrives in (a model's input channels-first, a conv's output channels-last)."""
    x = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    got = pad_nhwc(x, (2, 1), -0.5)
    want = np.pad(x.transpose(0, 2, 3, 1), ((0, 0), (2, 2), (1, 1), (0, 0)), constant_values=-0.5)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    unpadded = pad_nhwc(x, (0, 0), -0.5)  # a 1×1 conv's input: channels-last is a view
    view = x.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last (or one channel)
    assert unpadded.flags.c_contiguous and np.shares_memory(unpadded, x) == view
    np.testing.assert_array_equal(unpadded, x.transpose(0, 2, 3, 1))
