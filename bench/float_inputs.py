"""Real-valued inputs in the engine: speed against integer pixels, the stem before and after
float32, and how often a decision ties at a threshold. Part of ``python -m bench engine``.

* the 784 → 3×4096 → 10 mlp with uint8 pixels and with standard-normal float input, at batch 1
  and 64, and the float input through the previous path (weights unpacked to float64 tiles on
  every call, :func:`unpacked_float64_first_layer`), called in alternating rounds;
* the cnn's full-precision stem conv (3×32×32 → 128 channels, folded thresholds) in float32
  against the float64 kernel it replaces (:func:`stem_conv_float64`, as of commit 884fda1), and
  the whole cnn with either stem;
* ties (:func:`first_layer_ties`): first-layer decisions that differ from eager float32 torch's,
  on random float inputs and on the digits test set fed as floats (pixels / 16).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit, prange

from model.engine.kernels import aligned_words
from model.engine.layout import WORD
from model.packing import unpack_signs, words_for

BATCHES = (1, 64)
STEM_BATCHES = (1, 16)
UNPACK_TILE_ROWS = 512  # as the previous float path unpacked


# --- the paths replaced, kept here for the comparison ----------------------------------------------
def unpacked_float64_first_layer(model) -> Callable[[np.ndarray], np.ndarray]:
    """predict through the previous float path: the first layer's packed weights unpacked to
    float64 in tiles of 512 rows on every call and multiplied by BLAS in float64, then the rest
    of the program as the engine runs it."""
    from model.engine.kernels import PARALLEL

    executor = model._executor
    ops = executor.program.ops
    at = next(i for i, op in enumerate(ops) if hasattr(op, "weight"))
    first = ops[at]

    def predict(x: np.ndarray) -> np.ndarray:
        value = model.check_input(x)
        for op in ops[:at]:
            value = executor._handlers[type(op)](op, value, PARALLEL)
        value = value.reshape(value.shape[0], -1).astype(np.float64)
        raw = np.empty((value.shape[0], first.weight.shape[0]), np.float64)
        words = words_for(first.features)
        for r in range(0, first.weight.shape[0], UNPACK_TILE_ROWS):
            tile = unpack_signs(
                first.weight[r : r + UNPACK_TILE_ROWS, :words], first.features, dtype=np.float64
            )
            raw[:, r : r + tile.shape[0]] = value @ tile.T
        raw32 = np.ascontiguousarray(raw, dtype=np.float32)
        out = aligned_words((raw32.shape[0], words_for(raw32.shape[1])))
        PARALLEL.threshold_pack_rows(raw32, first.epilogue.cut, first.epilogue.invert, out)
        value = out
        for op in ops[at + 1 :]:
            value = executor._handlers[type(op)](op, value, PARALLEL)
        return value

    return predict


@njit(nogil=True, cache=True, parallel=True)
def stem_conv_float64(x, w, bias, kh, kw, sh, sw, cut, invert, out):
    """The stem kernel as of 884fda1: float64 sums, an accumulator array per output row."""
    n, _, _, c = x.shape
    oh, ow, words = out.shape[1], out.shape[2], out.shape[3]
    o_rows = w.shape[1]
    for r in prange(n * oh):
        i, oy = r // oh, r % oh
        acc = np.empty(o_rows, np.float64)
        for ox in range(ow):
            for o in range(o_rows):
                acc[o] = bias[o]
            for dy in range(kh):
                for dx in range(kw):
                    row = (dy * kw + dx) * c
                    for ch in range(c):
                        v = np.float64(x[i, oy * sh + dy, ox * sw + dx, ch])
                        for o in range(o_rows):
                            acc[o] += v * np.float64(w[row + ch, o])
            for j in range(words):
                word = np.uint64(0)
                for o in range(j * WORD, min(o_rows, (j + 1) * WORD)):
                    raw = np.float64(np.float32(acc[o]))
                    fires = (raw >= cut[o]) ^ np.bool_(invert[o])
                    word |= np.uint64(fires) << np.uint64(o - j * WORD)
                out[i, oy, ox, j] = word


def stem_runs(model) -> tuple[Callable, Callable, Callable, Callable]:
    """(stem now, stem before, cnn now, cnn with the stem before) as functions of the input."""
    from model.engine.cpu import pad_nhwc
    from model.engine.kernels import PARALLEL

    executor = model._executor
    stem, rest = executor.program.ops[0], executor.program.ops[1:]
    ep = stem.epilogue
    bias = np.zeros(stem.weight.shape[1], np.float64)
    if stem.bias_in_raw is not None:
        bias[:] = stem.bias_in_raw
    (kh, kw), (sh, sw) = stem.kernel, stem.stride

    def now(x):
        return executor._handlers[type(stem)](stem, x, PARALLEL)

    def before(x):
        out = aligned_words((x.shape[0], *stem.out_hw, words_for(stem.weight.shape[1])))
        padded = pad_nhwc(x, stem.padding, stem.pad_value)
        stem_conv_float64(padded, stem.weight, bias, kh, kw, sh, sw, ep.cut, ep.invert, out)
        return executor._pools(ep, out, PARALLEL)

    def whole(first):
        def run(x):
            value = first(x)
            for op in rest:
                value = executor._handlers[type(op)](op, value, PARALLEL)
            return value

        return run

    return now, before, whole(now), whole(before)


# --- ties --------------------------------------------------------------------------------------------
def first_decisions(model, eager, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first layer's binary decisions, (rows, values), from the engine's program and from
    the eager module (its layers up to the next quantized layer's input quantizer)."""
    import torch

    from model.engine.cpu import unpack_bits
    from model.engine.kernels import PARALLEL
    from model.engine.ops import Decide

    executor = model._executor
    value = model.check_input(x)
    for op in executor.program.ops:
        value = executor._handlers[type(op)](op, value, PARALLEL)
        if isinstance(getattr(op, "epilogue", None), Decide):
            break
    engine = unpack_bits(value, op.epilogue.out).reshape(len(x), -1)
    h = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    with torch.inference_mode():
        for module, following in itertools.pairwise(eager.layers.children()):
            h = module(h)
            if getattr(following, "input_quantizer_name", None) is not None:
                h = following.input_quantizer(h)
                break
    return engine, h.reshape(len(x), -1).numpy()


def first_layer_ties(path: Path, x: np.ndarray) -> dict[str, Any]:
    """First-layer decisions of the engine and of eager float32 torch (the layers up to the next
    quantized layer's input quantizer) on rows ``x``: how many differ, and in how many rows."""
    import torch

    from model import load_model
    from training.export import module_from_artifact

    model = load_model(path, device="cpu")
    eager = module_from_artifact(path)
    engine, reference = first_decisions(model, eager, x)
    with torch.inference_mode():
        classes = eager(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy().argmax(1)
    differ = engine != reference
    return {
        "rows": len(x),
        "decisions": int(differ.size),
        "tied_decisions": int(differ.sum()),
        "decision_rate": float(differ.mean()),
        "tied_rows": int(differ.any(axis=1).sum()),
        "class_disagreement": float((model.predict(x).argmax(1) != classes).mean()),
        "firing_fraction": float((engine > 0).mean()),  # +1 (sign) or 1 (step)
    }


# --- measurements -----------------------------------------------------------------------------------
def bench_float_mlp(path: Path, timed_together, budget_s: float) -> list[dict[str, Any]]:
    from model import load_model

    model = load_model(path, device="cpu")
    before = unpacked_float64_first_layer(model)
    rows = []
    for batch in BATCHES:
        rng = np.random.default_rng(batch)
        pixels = rng.integers(0, 256, (batch, *model.input_spec.shape)).astype(np.uint8)
        floats = rng.standard_normal((batch, *model.input_spec.shape)).astype(np.float32)
        measured = timed_together(
            {
                "uint8": lambda x=pixels: model.predict(x),
                "float": lambda x=floats: model.predict(x),
                "float_before": lambda x=floats: before(x),
            },
            budget_s=budget_s,
        )
        rows.append({"batch": batch, **measured})
    return rows


def bench_stem(path: Path, timed_together, budget_s: float) -> list[dict[str, Any]]:
    from model import load_model

    model = load_model(path, device="cpu")
    stem, stem_before, cnn, cnn_before = stem_runs(model)
    rows = []
    for batch in STEM_BATCHES:
        x = model.check_input(
            np.random.default_rng(batch).integers(0, 256, (batch, 3, 32, 32)).astype(np.float32)
        )
        measured = timed_together(
            {
                "stem": lambda x=x: stem(x),
                "stem_before": lambda x=x: stem_before(x),
                "cnn": lambda x=x: cnn(x),
                "cnn_before": lambda x=x: cnn_before(x),
            },
            budget_s=budget_s,
        )
        differ = float((stem(x) != stem_before(x)).mean())
        rows.append({"batch": batch, **measured, "stem_words_differing": differ})
    return rows


def bench_ties(float_mlp: Path, digits_mlp: Path, cnn: Path, samples: int) -> dict[str, Any]:
    from training.data import load_digits

    rng = np.random.default_rng(12345)
    digits = load_digits().test.x
    return {
        "mlp_standard_normal": first_layer_ties(
            float_mlp, rng.standard_normal((samples, 1, 28, 28)).astype(np.float32)
        ),
        "cnn_standard_normal": first_layer_ties(
            cnn, rng.standard_normal((samples, 3, 32, 32)).astype(np.float32)
        ),
        "cnn_pixels": first_layer_ties(
            cnn, rng.integers(0, 256, (samples, 3, 32, 32)).astype(np.float32)
        ),
        "digits_mlp_digits_as_floats": first_layer_ties(
            digits_mlp, (digits / np.float32(16.0)).astype(np.float32)
        ),
    }
