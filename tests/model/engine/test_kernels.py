"""Each numba kernel against a plain numpy reference (property-based), and the vectorized
popcount in the generated machine code."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.engine import intrinsics, kernels
from model.engine.cpu import integer_bit_planes, unpack_bits
from model.engine.floatmath import affine_f32, fma_f32
from model.engine.layout import aligned_empty, pad_rows, row_words
from model.engine.ops import Bits
from model.packing import pack_signs, unpack_signs, words_for
from model.quantizers import SIGN, STEP

SETTINGS = settings(max_examples=25, deadline=None)


def random_words(rng, shape, bits):
    """Packed words of ``bits`` logical bits along the last axis (padding bits zero)."""
    signs = np.where(rng.random((*shape, bits)) < 0.5, -1.0, 1.0)
    return pack_signs(signs), signs


def ref_popcount(a, w):
    return np.bitwise_count(a[:, None, :] ^ w[None, :, :]).sum(axis=-1).astype(np.int64)


def ref_pack(decisions):
    """(M, O) bool → (M, ⌈O/64⌉) words, bit o = decisions[:, o]."""
    return pack_signs(np.where(decisions, -1.0, 1.0))


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 9),
    o=st.integers(1, 150),
    k=st.integers(1, 300),
    ranges=st.integers(1, 5),
)
def test_xor_popcount_gemm(seed, m, o, k, ranges):
    rng = np.random.default_rng(seed)
    (a, sa), (w, sw) = random_words(rng, (m,), k), random_words(rng, (o,), k)
    sweep = np.zeros(1, np.uint8)
    for direction in (0, 1):  # forwards, then backwards (the flag flips on every call)
        assert sweep[0] == direction
        out = np.empty((m, o), np.int32)
        kernels.xor_popcount_gemm(a, w, out, ranges, sweep)
        np.testing.assert_array_equal(out, ref_popcount(a, w))
        np.testing.assert_array_equal(k - 2 * out, sa @ sw.T)  # a·w = K − 2·popcount(a XOR w)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 13),
    o=st.one_of(st.integers(1, 100), st.sampled_from([32, 64, 96])),
    k=st.integers(1, 700),
    ranges=st.integers(1, 5),
)
def test_xor_popcount_columns(seed, m, o, k, ranges):
    """The column kernel on transposed weights gives the row kernel's counts, for whole blocks
    (4 rows × 32 channels) and every kind of edge: rows past a block, 8-channel and single
    channels, any row length (rows laid out already: a 1×1 convolution's patches)."""
    rng = np.random.default_rng(seed)
    (a, _), (w, _) = random_words(rng, (m,), k), random_words(rng, (o,), k)
    wt = np.ascontiguousarray(w.T)
    rows = a.reshape(1, m, 1, a.shape[1])
    for kernel in (kernels.xor_popcount_columns, kernels.SERIAL.xor_popcount_columns):
        out = np.full((m, o), -1, np.int32)
        kernel(rows, 1, 1, 1, 1, wt, out, ranges)
        np.testing.assert_array_equal(out, ref_popcount(a, w))


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 2),
    c=st.sampled_from([3, 64, 100, 130]),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.sampled_from([(1, 1), (3, 3), (2, 3)]),
    stride=st.sampled_from([(1, 1), (2, 2), (1, 2)]),
    padding=st.sampled_from([(0, 0), (1, 1), (2, 1)]),
    o=st.sampled_from([5, 32, 64, 75]),
    ranges=st.integers(1, 3),
)
def test_xor_popcount_columns_reads_conv_patches_in_place(
    seed, n, c, hw, kernel, stride, padding, o, ranges
):
    """On the padded input bits of a convolution (padded_bits), the column kernel counts the
    same as on im2col's patch rows: every stride, kernel shape, padding and row split."""
    h, w = hw
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    rng = np.random.default_rng(seed)
    x, _ = random_words(rng, (n, h, w), c)
    pad = pack_signs(np.where(rng.random(c) < 0.5, -1.0, 1.0))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    width = kh * kw * words_for(c)
    patches = np.zeros((n * oh * ow, row_words(width)), np.uint64)
    kernels.im2col_bits(x, kh, kw, sh, sw, ph, pw, pad, patches)
    weights, _ = random_words(rng, (o,), 64 * width)
    padded = np.empty((n, h + 2 * ph, w + 2 * pw, words_for(c)), np.uint64)
    kernels.padded_bits(x, ph, pw, pad, padded)
    want = np.broadcast_to(pad, padded.shape).copy()
    want[:, ph : ph + h, pw : pw + w] = x
    np.testing.assert_array_equal(padded, want)
    for kernel_set in (kernels.PARALLEL, kernels.SERIAL):
        out = np.full((n * oh * ow, o), -1, np.int32)
        kernel_set.xor_popcount_columns(
            padded, kh, kw, sh, sw, np.ascontiguousarray(weights.T), out, ranges
        )
        np.testing.assert_array_equal(out, ref_popcount(patches[:, :width], weights))


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 70),
    o=st.integers(1, 200),
    k=st.one_of(st.integers(1, 1100), st.sampled_from([512, 1536])),
    chunk=st.sampled_from([1, 3, 64]),
    ranges=st.integers(1, 5),
)
def test_dense_threshold_pack(seed, m, o, k, chunk, ranges):
    rng = np.random.default_rng(seed)
    (a, _), (w, _) = random_words(rng, (m,), k), random_words(rng, (o,), k)
    cut = rng.integers(-1, k + 2, size=o).astype(np.int64)
    invert = rng.integers(0, 2, size=o).astype(np.uint8)
    want = ref_pack((ref_popcount(a, w) >= cut) ^ invert.astype(bool))
    sweep = np.zeros(1, np.uint8)
    for direction in (0, 1):  # forwards, then backwards (the flag flips on every call)
        assert sweep[0] == direction
        out = np.empty((m, words_for(o)), np.uint64)
        kernels.dense_threshold_pack(a, w, cut, invert, out, chunk, ranges, sweep)
        np.testing.assert_array_equal(out, want)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 6),
    o=st.integers(1, 130),
    f=st.one_of(st.integers(1, 200), st.integers(1, 64)),
    high=st.sampled_from([1, 16, 255, 65535]),
)
def test_planes_dense(seed, m, o, f, high):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, high + 1, size=(m, f)).astype(np.float32)
    w, signs = random_words(rng, (o,), f)
    w = pad_rows(w)  # the kernels' row layout: zero words up to a multiple of 8 (when ≥ 8)
    planes = integer_bit_planes(x, w.shape[1])
    assert planes.shape == (max(1, int(x.max()).bit_length()), m, row_words(words_for(f)))
    pcw = np.bitwise_count(w).sum(axis=1).astype(np.int64)
    acc = np.empty((m, o), np.int64)
    kernels.planes_dense_acc(planes, w, pcw, acc)
    exact = x.astype(np.int64) @ signs.T.astype(np.int64)
    np.testing.assert_array_equal(acc, exact)
    cut = (exact[0] + rng.integers(-2, 3, size=o)).astype(np.float64)
    invert = rng.integers(0, 2, size=o).astype(np.uint8)
    want = ref_pack((exact >= cut) ^ invert.astype(bool))
    out = np.empty((m, words_for(o)), np.uint64)
    kernels.planes_dense_threshold_pack(planes, w, pcw, cut, invert, out)
    np.testing.assert_array_equal(out, want)
    if w.shape[1] == 1:  # up to 64 features: the kernel vectorized across outputs agrees
        out = np.empty((m, words_for(o)), np.uint64)
        kernels.planes_word_threshold_pack(planes, w, pcw, cut, invert, out)
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize(
    ("cpu_name", "features", "wide"),
    [
        ("skylake-avx512", "+avx512f,+avx512vpopcntdq", True),
        ("haswell", "+avx2,+popcnt", False),
        ("generic", None, False),
        ("icelake-server", "+avx512f,-avx512vpopcntdq", False),
    ],
)
def test_wide_popcount_follows_the_cpu_numba_compiles_for(monkeypatch, cpu_name, features, wide):
    """The 8-row 512-bit path (and 8-word row padding) only for a VPOPCNTDQ target: the one
    NUMBA_CPU_NAME/NUMBA_CPU_FEATURES name, else this machine."""
    from llvmlite import binding
    from numba.core import config

    from model.engine import layout

    monkeypatch.setattr(config, "CPU_NAME", cpu_name, raising=False)
    monkeypatch.setattr(config, "CPU_FEATURES", features, raising=False)
    assert layout._compiles_for("avx512vpopcntdq") is wide
    monkeypatch.setattr(config, "CPU_NAME", None, raising=False)
    host = "+avx512vpopcntdq" in binding.get_host_cpu_features().flatten().split(",")
    assert layout._compiles_for("avx512vpopcntdq") is host
    assert row_words(9) == 9  # 9 → 16 would add more than half: never padded
    assert row_words(18) == (24 if layout.WIDE_POPCOUNT else 18)


@SETTINGS
@given(
    rows=st.integers(1, 9),
    words=st.integers(1, 40),
    dtype=st.sampled_from([np.uint64, np.int32, np.uint8]),
)
def test_kernel_arrays_start_on_a_cache_line(rows, words, dtype):
    empty = aligned_empty((rows, words), dtype)
    assert (empty.shape, empty.dtype, empty.flags.c_contiguous) == ((rows, words), dtype, True)
    per_call = kernels.aligned_words((rows, 3, words))  # the engine's per-call packed buffers
    assert (per_call.shape, per_call.dtype) == ((rows, 3, words), np.uint64)
    assert per_call.flags.c_contiguous and per_call.flags.writeable
    w = np.arange(rows * words, dtype=np.uint64).reshape(rows, words)
    padded = pad_rows(w)
    for array in (empty, per_call, padded):
        assert array.ctypes.data % 64 == 0
    assert padded.shape == (rows, row_words(words))
    np.testing.assert_array_equal(padded[:, :words], w)
    assert not padded[:, words:].any()


def test_integer_bit_planes_refuses_non_integers_and_out_of_range():
    assert integer_bit_planes(np.array([[0.5, 1.0]], np.float32)) is None
    assert integer_bit_planes(np.array([[-1.0, 1.0]], np.float32)) is None
    assert integer_bit_planes(np.array([[70000.0]], np.float32)) is None
    assert integer_bit_planes(np.array([[1.0, np.nan]], np.float32)) is None
    assert integer_bit_planes(np.zeros((2, 3), np.float32)).shape == (1, 2, 1)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 6),
    f=st.integers(1, 200),
    high=st.sampled_from([0, 1, 16, 255, 65535]),
)
def test_integer_bit_planes_match_numpy(seed, m, f, high):
    x = np.random.default_rng(seed).integers(0, high + 1, size=(m, f)).astype(np.float32)
    planes = integer_bit_planes(x, words_for(f) + 1)  # one extra zero word per row
    n_planes = max(1, int(x.max()).bit_length())
    bits = np.zeros((n_planes, m, (words_for(f) + 1) * 64), np.uint8)
    for b in range(n_planes):
        bits[b, :, :f] = (x.astype(np.int64) >> b) & 1
    expected = np.packbits(bits, axis=-1, bitorder="little").view(np.uint64)
    np.testing.assert_array_equal(planes, expected.reshape(n_planes, m, -1))
    assert planes.ctypes.data % 64 == 0


@SETTINGS
@given(seed=st.integers(0, 2**31), m=st.integers(1, 40), o=st.integers(1, 150))
def test_threshold_pack_rows(seed, m, o):
    """Bit o = (y ≥ cut) XOR invert, compared as float64 (cut need not be a float32: the
    kernel rounds it up to one), False where either side is NaN."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(m, o)).astype(np.float32)
    y[rng.random((m, o)) < 0.1] = 0.0
    y[rng.random((m, o)) < 0.02] = np.nan
    y[rng.random((m, o)) < 0.02] = np.inf
    y[rng.random((m, o)) < 0.02] = -np.inf
    cut = rng.normal(size=o)  # float64, between float32 values
    on_value = rng.random(o) < 0.3  # exactly some float32 y's value, or a hair above or below it
    cut[on_value] = (
        y[0, on_value].astype(np.float64) + rng.choice([-1e-12, 0.0, 1e-12], size=o)[on_value]
    )
    cut[rng.random(o) < 0.05] = np.nan
    cut[rng.random(o) < 0.05] = np.inf
    cut[rng.random(o) < 0.05] = -np.inf
    invert = rng.integers(0, 2, size=o).astype(np.uint8)
    out = np.empty((m, words_for(o)), np.uint64)
    kernels.threshold_pack_rows(y, cut, invert, out)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(
            out, ref_pack((y.astype(np.float64) >= cut) ^ invert.astype(bool))
        )


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 3),
    c=st.integers(1, 140),
    hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    kernel=st.sampled_from([(1, 1), (3, 3), (2, 3)]),
    stride=st.sampled_from([(1, 1), (2, 2), (1, 2)]),
    padding=st.sampled_from([(0, 0), (1, 1), (2, 1)]),
    pad_negative=st.booleans(),
)
def test_im2col_bits(seed, n, c, hw, kernel, stride, padding, pad_negative):
    h, w = hw
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    rng = np.random.default_rng(seed)
    x, signs = random_words(rng, (n, h, w), c)  # (N, H, W, Wc), signs (N, H, W, C)
    pad = pack_signs(np.full(c, -1.0 if pad_negative else 1.0))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    width = kh * kw * words_for(c)
    out = np.full((n * oh * ow, row_words(width)), 12345, np.uint64)
    kernels.im2col_bits(x, kh, kw, sh, sw, ph, pw, pad, out)
    assert not out[:, width:].any()  # the row padding is zeros
    out = out[:, :width]
    padded = np.full((n, h + 2 * ph, w + 2 * pw, c), -1.0 if pad_negative else 1.0)
    padded[:, ph : ph + h, pw : pw + w] = signs
    want = np.stack(
        [
            padded[:, oy * sh : oy * sh + kh, ox * sw : ox * sw + kw]
            for oy in range(oh)
            for ox in range(ow)
        ],
        axis=1,
    )  # (N, OH·OW, kh, kw, C)
    np.testing.assert_array_equal(out, pack_signs(want).reshape(n * oh * ow, -1))


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    c=st.integers(1, 140),
    hw=st.tuples(st.integers(2, 9), st.integers(2, 9)),
    window=st.sampled_from([((2, 2), (2, 2)), ((3, 3), (2, 2)), ((2, 2), (1, 1))]),
)
def test_pool_bits(seed, c, hw, window):
    (kh, kw), (sh, sw) = window
    h, w = hw
    if h < kh or w < kw:
        return
    rng = np.random.default_rng(seed)
    x, signs = random_words(rng, (2, h, w), c)
    use_and = rng.random(c) < 0.5
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.empty((2, oh, ow, words_for(c)), np.uint64)
    kernels.pool_bits(x, kh, kw, sh, sw, pack_signs(np.where(use_and, -1.0, 1.0)), out)
    bits = signs < 0
    want = np.zeros((2, oh, ow, c), bool)
    for oy in range(oh):
        for ox in range(ow):
            win = bits[:, oy * sh : oy * sh + kh, ox * sw : ox * sw + kw]
            want[:, oy, ox] = np.where(use_and, win.all(axis=(1, 2)), win.any(axis=(1, 2)))
    np.testing.assert_array_equal(out, pack_signs(np.where(want, -1.0, 1.0)))


@SETTINGS
@given(seed=st.integers(0, 2**31), c=st.integers(1, 140), h=st.integers(1, 4), w=st.integers(1, 4))
def test_unpack_bits_layouts(seed, c, h, w):
    rng = np.random.default_rng(seed)
    words, signs = random_words(rng, (3, h, w), c)  # NHWC
    nchw = signs.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(unpack_bits(words, Bits(SIGN, (c, h, w), "nhwc")), nchw)
    flat = unpack_bits(words.reshape(3, -1), Bits(SIGN, (c, h, w), "hwc"))
    np.testing.assert_array_equal(flat, nchw.reshape(3, -1))
    step = unpack_bits(words.reshape(3, -1), Bits(STEP, (c, h, w), "hwc"))
    np.testing.assert_array_equal(step, (nchw < 0).reshape(3, -1))
    flat_words = pack_signs(signs.reshape(3, -1))
    np.testing.assert_array_equal(
        unpack_bits(flat_words, Bits(SIGN, (c * h * w,), "flat")),
        unpack_signs(flat_words, c * h * w),
    )


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has("avx512_vpopcntdq"), reason="CPU lacks AVX-512 VPOPCNTDQ")
def test_popcount_loops_vectorize_to_vpopcntq():
    """LLVM turns the word loops into VPOPCNTQ, and the hand-written vector paths into VPOPCNTQ
    on 512-bit zmm registers (checked on fresh, uncached compiles). The plain loop's width is
    LLVM's choice: on Intel's server cores it prefers 256-bit vectors."""
    from numba import njit, prange

    @njit(parallel=True, nogil=True, fastmath=True)
    def gemm(a, w, out):  # the body of kernels.xor_popcount_gemm, compiled without the cache
        for o in prange(w.shape[0]):
            out[0, o] = kernels._xor_popcount(a, w, 0, o)

    @njit(nogil=True)
    def gemm8(a, w, out):  # the hand-written vector path
        s = intrinsics.xor_popcount8(a, w, 0, 0)
        for i in range(8):
            out[0, i] = s[i]

    @njit(nogil=True)
    def columns(a, w, out):  # the column kernel's block, on rows laid out already
        starts = (0, a.shape[1], 2 * a.shape[1], 3 * a.shape[1])
        intrinsics.column_block_counts(a, starts, (1, a.shape[1], 0), w, 0, out, 0, 0)

    a, w, wt = (
        np.zeros((4, 64), np.uint64),
        np.zeros((32, 64), np.uint64),
        np.zeros((64, 32), np.uint64),
    )
    for fn, weights, register in ((gemm, w, "[yz]mm"), (gemm8, w, "zmm"), (columns, wt, "zmm")):
        fn(a, weights, np.empty((4, 32), np.int32))
        asm = "\n".join(fn.inspect_asm().values())
        assert re.search(rf"vpopcntq\s+%{register}", asm), f"{fn.__name__}: no vpopcntq %{register}"


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 9),
    f=st.integers(1, 300),
    o=st.integers(1, 12),
    step=st.booleans(),
)
def test_signed_dense(seed, m, f, o, step):
    rng = np.random.default_rng(seed)
    words, signs = random_words(rng, (m,), f)
    w = rng.normal(size=(o, f)).astype(np.float32)
    w_t = np.zeros((words.shape[1] * 64, o), np.float32)
    w_t[:f] = w.T
    values = (signs < 0).astype(np.float64) if step else signs.astype(np.float64)
    base = np.zeros(o) if step else w.astype(np.float64).sum(axis=1)
    out = np.empty((m, o), np.float64)
    kernels.signed_dense(words, w_t, base, 1.0 if step else -2.0, out)
    np.testing.assert_allclose(out, values @ w.T.astype(np.float64), rtol=1e-12, atol=1e-9)


def ref_conv_sums(windows: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """raw ← fma(windows[..., r], w[r], raw) from raw = bias in float32, term by term in r
    order (correctly rounded fma, floatmath.fma_f32): what real_conv_threshold_pack computes
    per channel, on every CPU."""
    raw = np.broadcast_to(bias, (*windows.shape[:-1], w.shape[1])).astype(np.float32)
    for r in range(w.shape[0]):
        raw = fma_f32(windows[..., r : r + 1], w[r], raw)
    return raw


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    c=st.integers(1, 4),
    o=st.integers(1, 140),
    hw=st.integers(3, 7),
    stride=st.sampled_from([(1, 1), (2, 2)]),
)
def test_real_conv_threshold_pack(seed, c, o, hw, stride):
    """Bit for bit the float32 sums of ref_conv_sums, through blocks of 3 windows × 32
    channels, single windows, and the 8- and 1-channel paths."""
    rng = np.random.default_rng(seed)
    (kh, kw), (sh, sw) = (3, 3), stride
    x = rng.normal(0, 50, size=(2, hw + 2, hw + 2, c)).astype(np.float32)  # padded NHWC
    w = rng.normal(size=(kh * kw * c, o)).astype(np.float32)
    bias = rng.normal(size=o).astype(np.float32)
    oh = (hw + 2 - kh) // sh + 1
    windows = np.stack(
        [
            x[:, oy * sh : oy * sh + kh, ox * sw : ox * sw + kw].reshape(2, -1)
            for oy in range(oh)
            for ox in range(oh)
        ],
        axis=1,
    )  # (N, OH·OW, kh·kw·C) in (dy, dx, c) order
    raw = ref_conv_sums(windows, w, bias)
    cut = np.median(raw.reshape(-1, o), axis=0).astype(np.float64)  # some raws sit on the cut
    invert = rng.integers(0, 2, size=o).astype(np.uint8)
    out = np.empty((2, oh, oh, words_for(o)), np.uint64)
    kernels.real_conv_threshold_pack(x, w, bias, kh, kw, sh, sw, cut, invert, out)
    want = ref_pack(((raw >= cut) ^ invert.astype(bool)).reshape(-1, o)).reshape(out.shape)
    np.testing.assert_array_equal(out, want)


def ref_signed_sums(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """x (M, 64·W) · signs (O, 64·W)ᵀ in float32 as real_packed_dense sums: lane l of 8 adds
    the terms i ≡ l (mod 8) in order, then lanes ((0+4)+(2+6)) + ((1+5)+(3+7))."""
    terms = (x[:, None, :] * signs[None, :, :]).astype(np.float32)  # exact: ±x
    lanes = np.zeros((*terms.shape[:2], 8), np.float32)
    for k in range(terms.shape[2] // 8):
        lanes = (lanes + terms[..., 8 * k : 8 * k + 8]).astype(np.float32)
    half = (lanes[..., :4] + lanes[..., 4:]).astype(np.float32)
    quarter = (half[..., :2] + half[..., 2:]).astype(np.float32)
    return (quarter[..., 0] + quarter[..., 1]).astype(np.float32)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 5),
    o=st.integers(1, 80),
    f=st.integers(1, 300),
    padded=st.booleans(),
)
def test_real_packed_dense(seed, m, o, f, padded):
    """Bit for bit ref_signed_sums, through the 8-row and 1-row paths, with weight rows padded
    to whole cache lines (words the kernel must not read) or not."""
    rng = np.random.default_rng(seed)
    w, signs = random_words(rng, (o,), f)
    w = pad_rows(w) if padded else w
    x = np.zeros((m, 64 * words_for(f)), np.float32)
    x[:, :f] = rng.standard_normal((m, f)) * 10
    full_signs = np.zeros((o, x.shape[1]), np.float32)
    full_signs[:, :f] = signs
    out = np.empty((m, o), np.float32)
    kernels.real_packed_dense(x, w, out)
    np.testing.assert_array_equal(out, ref_signed_sums(x, full_signs))
    serial = np.empty_like(out)
    kernels.SERIAL.real_packed_dense(x, w, serial)
    np.testing.assert_array_equal(serial, out)


@pytest.mark.parametrize("parts", ["both", "scale", "bias", "neither"])
def test_affine_rows_rounds_as_numpy_float32(parts):
    """The kernel equals the numpy reference bit for bit, overflow to infinity included."""
    rng = np.random.default_rng(7)
    raw = (rng.standard_normal((5, 37)) * 1e3).astype(np.float32)
    raw[0, 0] = np.float32(3e38)  # × scale ≥ 2 overflows to inf, as in float32 eager
    scale = rng.uniform(-3, 3, 37).astype(np.float32) if parts in ("both", "scale") else None
    bias = rng.standard_normal(37).astype(np.float32) if parts in ("both", "bias") else None
    if scale is not None:
        scale[0] = 2.5
    out = np.empty_like(raw)
    kernels.affine_rows(raw, scale, bias, out)
    np.testing.assert_array_equal(out, affine_f32(raw, scale, bias))
