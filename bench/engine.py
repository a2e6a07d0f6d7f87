"""Inference engine benchmark: packed XNOR-popcount kernels and models vs eager torch.

Measures in one run, side by side on this machine:

* binary GEMM, 4096×4096 ±1 weights at batch 1 and 64: the engine's fused layer kernel
  (XOR + popcount + folded threshold + pack) and its plain popcount GEMM, in binary
  multiply-accumulates per second, against ``torch.matmul`` in float32 on the same ±1 matrices;
* BinaryNet's MNIST ``mlp`` (784 → 3×4096 → 10) and a CIFAR-shaped ``cnn`` (3×32×32,
  full-precision stem conv, four binary 3×3 convs of 128–256 channels with max-pooling), built
  with random weights through training's ``build_model`` + ``export_artifact``: engine vs the
  eager torch model rebuilt from the same artifact, latency per batch;
* memory of the loaded 4096-wide mlp against its float32 parameters;
* how often the full-precision first conv's binary decisions differ from eager's (float64
  accumulation here vs float32 in torch: near-ties can round either way).

``python -m bench engine [--write-docs] [--quick]`` prints a Markdown report, writes JSON to
``bench/results/engine.json``, the plot to ``docs/img/engine-latency.png`` and, with
``--write-docs``, the "## Inference engine" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import float_inputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "engine.json"
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "engine-latency.png"
SECTION = "Inference engine"
FLOAT_SECTION = "Inference engine: real-valued inputs"

GEMM_SIZE = 4096
PAUSE_S = 0.3  # between turns of different contenders, see timed_together
WARM_S = 0.02  # untimed calls at the start of each turn (caches, clock frequency, thread wake-up)
TURN_S = 0.005  # timed calls per turn (at least one)
MLP_BATCHES = (1, 4, 16, 64, 256)
CNN_BATCHES = (1, 2, 4, 8, 16, 32)
TARGETS = {
    "gemm_macs": 1.0e12,
    "gemm_vs_torch_b1": 50.0,
    "gemm_vs_torch_b64": 15.0,
    "mlp_b1": 30.0,
    "mlp_b64": 10.0,
    "cnn_b1": 3.0,
    "cnn_b16": 3.0,
    "memory_fraction": 1 / 20,
}


# --- timing ---------------------------------------------------------------------------------------
def timed_together(
    fns: dict[str, Callable[[], object]], *, min_rounds: int = 5, budget_s: float = 2.0
) -> dict[str, dict]:
    """Median and best wall time of each function, measured in alternating rounds for at least
    ``min_rounds`` rounds and until ``budget_s`` is spent, so that load from other work on the
    machine hits every contender alike. Each turn starts after a pause: torch's worker threads
    keep spinning for up to ~200 ms after its last operation and would otherwise steal both
    cores from the engine (a server runs one or the other, not both). Then calls for WARM_S
    (at least one) are not counted — they pay for waking thread pools, refilling caches and
    raising the clock after the pause, as a busy server would not — and calls for TURN_S (at
    least one) are timed one by one."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < budget_s:
        for name, fn in fns.items():
            time.sleep(PAUSE_S)
            warm_until = time.perf_counter() + WARM_S
            fn()
            while time.perf_counter() < warm_until:
                fn()
            calls, spent = 0, 0.0
            while calls < 1 or spent < TURN_S:
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
                times[name].append(elapsed)
                calls, spent = calls + 1, spent + elapsed
        rounds += 1
    return {
        name: {"median_s": statistics.median(t), "best_s": min(t), "runs": len(t)}
        for name, t in times.items()
    }


# --- models ---------------------------------------------------------------------------------------
# Grid of full-precision weights and biases with ``exact_float_sums``: with integer pixels up to
# 255 and the layers' initial weights (|w| < 1), every partial sum of a 3×3 stem over 3 channels
# is a multiple of 2⁻⁸ below 2¹⁶, exact in float32 whatever order a library sums in.
FLOAT_GRID = 2.0**-8


def build_artifact(
    config,
    input_spec,
    path: Path,
    seed: int = 0,
    calibration: np.ndarray | None = None,
    exact_float_sums: bool = False,
) -> Path:
    """Random weights through training's export path; BatchNorm statistics calibrated on
    ``calibration`` (default: random pixels of the input's range) then perturbed (both signs),
    so thresholds are realistic. ``exact_float_sums``: the full-precision layers' weights and
    biases rounded to multiples of FLOAT_GRID, so that a backend's float sums are exact in any
    order (PyTorch's CPU convolution picks oneDNN or im2col + GEMM by shape, batch size and
    thread count, each summing in its own order; cuDNN has its own): a comparison of backends
    then tests what they compute, not how a library rounds."""
    import torch

    from training.architectures import build_model
    from training.export import export_artifact
    from training.layers import QuantizedLayer

    torch.manual_seed(seed)
    model = build_model(config, tuple(input_spec.shape), 10)
    if exact_float_sums:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, QuantizedLayer) and not layer.is_binary:
                    for tensor in (layer.weight, getattr(layer, "bias", None)):
                        if tensor is not None:
                            tensor.copy_(torch.round(tensor / FLOAT_GRID) * FLOAT_GRID)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0
    low, high = input_spec.value_range
    x = calibration
    if x is None:
        x = np.random.default_rng(seed).integers(int(low), int(high) + 1, (32, *input_spec.shape))
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(x.astype(np.float32)))
        g = torch.Generator().manual_seed(seed)
        for bn in bns:
            c = bn.num_features
            bn.running_mean.add_(0.3 * bn.running_var.sqrt() * torch.randn(c, generator=g))
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(0.3 * torch.randn(c, generator=g))
    model.eval()
    export_artifact(model, path, name=path.stem, input_spec=input_spec, labels=list("0123456789"))
    return path


def pixels(input_spec, batch: int, seed: int) -> np.ndarray:
    low, high = input_spec.value_range
    rng = np.random.default_rng(seed)
    return rng.integers(int(low), int(high) + 1, (batch, *input_spec.shape)).astype(np.float32)


def bench_model(path: Path, batches: tuple[int, ...], budget_s: float) -> dict[str, Any]:
    """Engine vs eager torch latency per batch size, plus load/warm-up cost and agreement."""
    import torch

    from model import load_model
    from training.export import module_from_artifact
    from training.layers import quantized_layers

    model = load_model(path, device="cpu")
    warmup_s = model.warmup(batch_sizes=batches)
    eager = module_from_artifact(path)
    prebinarized = module_from_artifact(path)
    for layer in quantized_layers(prebinarized):
        # float32 ±1 weights computed once: no per-call sign() of the latent weights
        binarized = layer.quantized_weight().detach()
        layer.quantized_weight = lambda w=binarized: w
    rows = []
    agree, total = 0, 0
    for batch in batches:
        x = pixels(model.input_spec, batch, seed=batch)
        xt = torch.from_numpy(x)

        def run_eager(xt=xt):
            with torch.inference_mode():
                return eager(xt)

        def run_prebinarized(xt=xt):
            with torch.inference_mode():
                return prebinarized(xt)

        measured = timed_together(
            {
                "engine": lambda x=x: model.predict(x),
                "eager": run_eager,
                "eager_prebinarized": run_prebinarized,
            },
            budget_s=budget_s,
        )
        engine_t, eager_t, pre_t = (measured[k] for k in ("engine", "eager", "eager_prebinarized"))
        got, want = model.predict(x), run_eager().numpy()
        agree += int((got.argmax(1) == want.argmax(1)).sum())
        total += batch
        rows.append(
            {
                "batch": batch,
                "engine": engine_t,
                "eager": eager_t,
                "eager_prebinarized": pre_t,
                "speedup": eager_t["median_s"] / engine_t["median_s"],
                "speedup_vs_prebinarized": pre_t["median_s"] / engine_t["median_s"],
                "max_rel_logit_error": float(
                    (np.abs(got - want) / np.abs(want).max(axis=1, keepdims=True)).max()
                ),
            }
        )
    return {
        "load_seconds": model.load_seconds,
        "warmup_seconds": warmup_s,
        "memory_bytes": model.memory_bytes,
        "float32_bytes": 4 * sum(p.numel() for p in eager.state_dict().values()),
        "class_agreement": agree / total,
        "batches": rows,
        "ops": [type(op).__name__ for op in model.program.ops],
    }


def first_conv_disagreement(path: Path, samples: int) -> dict[str, Any]:
    """Fraction of the fp stem conv's binary decisions (after BN + sign) that differ from
    eager torch's, and of predicted classes, on random pixels."""
    import torch

    from model import load_model
    from model.engine.cpu import NumbaExecutor, unpack_bits
    from training.export import module_from_artifact

    model = load_model(path, device="cpu")
    eager = module_from_artifact(path)
    x = pixels(model.input_spec, samples, seed=12345)
    first = model.program.ops[0]
    bits = NumbaExecutor(model.program)._handlers[type(first)](first, x)
    engine_signs = unpack_bits(bits, first.epilogue.out)  # (N, C, H, W) ±1
    with torch.inference_mode():
        h = eager.layers.bn0(eager.layers.conv0(torch.from_numpy(x)))
        eager_signs = torch.where(h >= 0, 1.0, -1.0).numpy()
        eager_classes = eager(torch.from_numpy(x)).numpy().argmax(1)
    differ = engine_signs != eager_signs
    return {
        "samples": samples,
        "decisions": int(differ.size),
        "differing_decisions": int(differ.sum()),
        "decision_rate": float(differ.mean()),
        "samples_with_any_difference": int(differ.reshape(samples, -1).any(axis=1).sum()),
        "class_disagreement": float((model.predict(x).argmax(1) != eager_classes).mean()),
    }


# --- kernels --------------------------------------------------------------------------------------
def bench_gemm(budget_s: float) -> list[dict[str, Any]]:
    """The 4096² binary layer kernels against torch.matmul on the same ±1 matrices, at batch 1
    and 64, as the engine runs them: the OpenMP kernels."""
    import numba
    import torch

    from model.engine import kernels
    from model.engine.kernels import ROW_CHUNK
    from model.engine.layout import aligned_empty, pad_rows
    from model.packing import pack_signs

    rng = np.random.default_rng(0)
    n = GEMM_SIZE
    w_signs = np.where(rng.random((n, n)) < 0.5, -1.0, 1.0).astype(np.float32)
    # (4096, 64) uint64 in the engine's compiled layout (cache-line aligned), as are activations
    w = pad_rows(pack_signs(w_signs))
    w_t = torch.from_numpy(w_signs.T.copy())  # (in, out) float32 ±1
    cut = rng.integers(n // 2 - 64, n // 2 + 64, n).astype(np.int64)
    invert = rng.integers(0, 2, n).astype(np.uint8)
    threads = numba.get_num_threads()
    rows = []
    for batch in (1, 64):
        a_signs = np.where(rng.random((batch, n)) < 0.5, -1.0, 1.0).astype(np.float32)
        a = pad_rows(pack_signs(a_signs))
        a_t = torch.from_numpy(a_signs)
        counts = np.empty((batch, n), np.int32)
        engine = kernels.PARALLEL
        # each kernel flips its own direction flag on every call, as the engine's layers do
        sweeps = {name: np.zeros(1, np.uint8) for name in ("fused", "gemm")}
        out = aligned_empty((batch, n // 64))
        contenders = {
            "fused": lambda a=a, out=out, k=engine, s=sweeps["fused"]: k.dense_threshold_pack(
                a, w, cut, invert, out, ROW_CHUNK, threads, s
            ),
            "popcount_gemm": lambda a=a, counts=counts, k=engine, s=sweeps["gemm"]: (
                k.xor_popcount_gemm(a, w, counts, threads, s)
            ),
            "torch_matmul_f32": lambda a_t=a_t: torch.matmul(a_t, w_t),
        }
        measured = timed_together(contenders, budget_s=budget_s)
        exact = np.array_equal(n - 2 * counts, (a_t @ w_t).numpy().astype(np.int64))
        macs = batch * n * n
        rows.append(
            {
                "batch": batch,
                "path": "OpenMP",
                **measured,
                "fused_macs_per_s": macs / measured["fused"]["median_s"],
                "gemm_macs_per_s": macs / measured["popcount_gemm"]["median_s"],
                "torch_macs_per_s": macs / measured["torch_matmul_f32"]["median_s"],
                "fused_vs_torch": measured["torch_matmul_f32"]["median_s"]
                / measured["fused"]["median_s"],
                "exact": bool(exact),
            }
        )
    return rows


def bench_gemm_bound(repeats: int = 200) -> dict[str, Any]:
    """What bounds the batch-1 GEMM: the fused kernel's streaming rate on one thread over weight
    rows that fit L2 (256 KiB), exactly one core's half of the 4096² matrix (1 MiB) and all of
    it (2 MiB, from L3), and the cost of starting and joining an empty parallel region. Best
    of ``repeats`` timings each: the machine's own limits, without interference."""
    import numba
    from numba import njit, prange

    from model.engine import kernels
    from model.engine.kernels import ROW_CHUNK
    from model.engine.layout import aligned_empty, pad_rows
    from model.packing import pack_signs

    rng = np.random.default_rng(1)
    n = GEMM_SIZE
    w = pad_rows(pack_signs(np.where(rng.random((n, n)) < 0.5, -1.0, 1.0).astype(np.float32)))
    a = pad_rows(pack_signs(np.where(rng.random((1, n)) < 0.5, -1.0, 1.0).astype(np.float32)))
    cut = rng.integers(n // 2 - 64, n // 2 + 64, n).astype(np.int64)
    invert = rng.integers(0, 2, n).astype(np.uint8)
    sweep = np.zeros(1, np.uint8)
    kernel = kernels.SERIAL.dense_threshold_pack

    @njit(nogil=True)
    def stream(a, part, cut, invert, out, sweep, calls):  # back to back, no Python in between
        for _ in range(calls):
            kernel(a, part, cut, invert, out, ROW_CHUNK, 1, sweep)

    rates = {}
    for label, rows in (("256 KiB", 512), ("1 MiB", 2048), ("2 MiB", 4096)):
        part = w[:rows]
        out = aligned_empty((1, rows // 64))
        calls = max(1, (1 << 22) // part.nbytes)  # ~4 MiB streamed per timing
        stream(a, part, cut, invert, out, sweep, 1)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            stream(a, part, cut, invert, out, sweep, calls)
            best = min(best, (time.perf_counter() - start) / calls)
        rates[label] = part.nbytes / best

    @njit(nogil=True, parallel=True)
    def empty_region(out):
        for t in prange(out.shape[0]):
            out[t] = t

    marks = np.zeros(numba.get_num_threads(), np.int64)
    empty_region(marks)
    region = min(
        timeit.repeat(lambda: empty_region(marks), number=1000, repeat=max(10, repeats // 10))
    )
    return {"bytes_per_second": rates, "parallel_region_s": region / 1000}


# --- report ---------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import numba
    import torch

    from model.engine.runtime import threading_layer

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = "avx512_vpopcntdq" in Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = False
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_vpopcntdq": flags,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "threading_layer": threading_layer(),
        "load_average": os.getloadavg(),
        "niceness": os.nice(0),
    }


def plot(results: dict[str, Any], path: Path = PLOT) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "mlp", "mlp 784→3×4096→10"),
        (axes[1], "cnn", "cnn 3×32×32, 4 binary convs"),
    ):
        rows = results[key]["batches"]
        batch = [r["batch"] for r in rows]
        for which, style, label in (
            ("engine", "o-", "bnnserve engine (numba)"),
            ("eager", "s--", "eager torch (float32)"),
            ("eager_prebinarized", "^:", "eager torch, weights pre-binarized"),
        ):
            ms = [r[which]["median_s"] * 1e3 for r in rows]
            ax.plot(batch, ms, style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batch)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch (ms, median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results['machine']['cpu']}, {results['machine']['cores']} cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(rows: list[dict], batch: int) -> dict:
    return next(r for r in rows if r["batch"] == batch)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render_markdown(r: dict[str, Any]) -> str:
    m, gemm, mlp, cnn = r["machine"], r["gemm"], r["mlp"], r["cnn"]
    g1, g64 = _row(gemm, 1), _row(gemm, 64)
    m1, m64 = _row(mlp["batches"], 1), _row(mlp["batches"], 64)
    c1, c16 = _row(cnn["batches"], 1), _row(cnn["batches"], 16)
    mem = mlp["memory_bytes"] / mlp["float32_bytes"]
    t = TARGETS
    lines = [
        f"## {SECTION}",
        "",
        f"`python -m bench engine --write-docs`, one run, {r['date']}. Machine: {m['cpu']}, "
        f"{m['cores']} cores (AVX-512 VPOPCNTDQ: {'yes' if m['avx512_vpopcntdq'] else 'no'}); "
        f"Python {m['python']}, numpy {m['numpy']}, numba {m['numba']} (threading layer "
        f"`{m['threading_layer']}`, {m['numba_threads']} threads), torch {m['torch']} "
        f"({m['torch_threads']} threads). Load average at start "
        f"{', '.join(f'{v:.2f}' for v in r['load_average_start'])}, at end "
        f"{', '.join(f'{v:.2f}' for v in r['load_average_end'])} (other work shares these cores"
        + (
            f"; this run had scheduling priority nice {m['niceness']} over it). "
            if m.get("niceness")
            else "). "
        )
        + "Each time is the median of repeated calls, with the best call in parentheses; engine "
        "and reference are called in alternating rounds, so load from other work hits both "
        "alike; each turn starts after a 0.3 s pause (torch's idle threads spin for ~200 ms "
        "after its last operation and would steal the cores from the engine), and its first "
        "20 ms of calls (at least one) are not counted, as steady serving would not pay for "
        "waking threads and caches. Each ratio is reference over engine from this one "
        "run, of medians and of best calls. On a machine shared with other work the medians carry scheduling delays "
        "(a parallel kernel waits for both cores), the best calls show the uncontended cost.",
        "",
        "| measurement | engine | eager torch / reference | ratio: medians (best) | target | |",
        "|---|---|---|---|---|---|",
    ]

    def both(row_engine: dict, row_reference: dict) -> tuple[float, float]:
        return (
            row_reference["median_s"] / row_engine["median_s"],
            row_reference["best_s"] / row_engine["best_s"],
        )

    def timing(entry: dict) -> str:
        return f"{_ms(entry['median_s'])} ({_ms(entry['best_s'])})"

    def verdict(values: tuple[float, float], target: float) -> str:
        return f"{_check(values[0] >= target)} ({'met' if values[1] >= target else 'not met'})"

    for g, target_ratio in ((g1, t["gemm_vs_torch_b1"]), (g64, t["gemm_vs_torch_b64"])):
        ratio = both(g["fused"], g["torch_matmul_f32"])
        macs = g["batch"] * GEMM_SIZE * GEMM_SIZE
        rate = (macs / g["fused"]["median_s"], macs / g["fused"]["best_s"])
        lines.append(
            f"| binary GEMM 4096×4096, batch {g['batch']} (fused layer kernel, {g['path']}) | "
            f"{timing(g['fused'])} = {rate[0]:.3e} ({rate[1]:.3e}) MAC/s | "
            f"torch.matmul f32: {timing(g['torch_matmul_f32'])} | "
            f"{ratio[0]:.1f}× ({ratio[1]:.1f}×) | ≥ {target_ratio:g}×; ≥ 1.0e12 MAC/s | "
            f"{verdict(ratio, target_ratio)}; {verdict(rate, t['gemm_macs'])} |"
        )
    for g in (g1, g64):
        macs = g["batch"] * GEMM_SIZE * GEMM_SIZE
        rate = (macs / g["popcount_gemm"]["median_s"], macs / g["popcount_gemm"]["best_s"])
        lines.append(
            f"| popcount GEMM only (int32 counts), batch {g['batch']}, {g['path']} | "
            f"{timing(g['popcount_gemm'])} = {rate[0]:.3e} ({rate[1]:.3e}) MAC/s | | | "
            f"≥ 1.0e12 MAC/s | {verdict(rate, t['gemm_macs'])} |"
        )
    for label, row, target in (
        ("mlp 784→3×4096→10, batch 1", m1, t["mlp_b1"]),
        ("mlp 784→3×4096→10, batch 64", m64, t["mlp_b64"]),
        ("cnn 3×32×32, batch 1", c1, t["cnn_b1"]),
        ("cnn 3×32×32, batch 16", c16, t["cnn_b16"]),
    ):
        ratio = both(row["engine"], row["eager"])
        lines.append(
            f"| {label} | {timing(row['engine'])} | {timing(row['eager'])} | "
            f"{ratio[0]:.1f}× ({ratio[1]:.1f}×) | ≥ {target:g}× | {verdict(ratio, target)} |"
        )
    lines += [
        f"| memory of the loaded 4096-wide mlp | {mlp['memory_bytes']:,} B | float32 parameters "
        f"{mlp['float32_bytes']:,} B | {mem:.4f} (1/{1 / mem:.1f}) | ≤ 1/20 | "
        f"{_check(mem <= t['memory_fraction'])} |",
        "",
        *gemm_bound_lines(r["gemm_bound"], g1),
        f"The GEMM results are exact (engine counts equal the float32 ±1 product: "
        f"{all(g['exact'] for g in gemm)}). Engine and eager predicted the same class on "
        f"{mlp['class_agreement']:.2%} (mlp) and {cnn['class_agreement']:.2%} (cnn) of the "
        f"benchmark inputs; largest logit difference relative to the row's largest logit: "
        f"{max(b['max_rel_logit_error'] for b in mlp['batches']):.2e} (mlp), "
        f"{max(b['max_rel_logit_error'] for b in cnn['batches']):.2e} (cnn).",
        "",
        "Start-up (kernels already in the on-disk cache): load + compile "
        f"{mlp['load_seconds']:.3f} s / warm-up of every batch size {mlp['warmup_seconds']:.3f} s "
        f"(mlp), {cnn['load_seconds']:.3f} s / {cnn['warmup_seconds']:.3f} s (cnn).",
        "",
        "Latency by batch size, median (best) per call:",
        "",
        "| model | batch | engine | eager torch | speedup | eager, weights pre-binarized | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("mlp", "cnn"):
        for row in r[name]["batches"]:
            eager = both(row["engine"], row["eager"])
            pre = both(row["engine"], row["eager_prebinarized"])
            lines.append(
                f"| {name} | {row['batch']} | {timing(row['engine'])} | {timing(row['eager'])} | "
                f"{eager[0]:.1f}× ({eager[1]:.1f}×) | {timing(row['eager_prebinarized'])} | "
                f"{pre[0]:.1f}× ({pre[1]:.1f}×) |"
            )
    lines += [
        "",
        "*Eager torch* is the module training rebuilds from the artifact "
        "(`training.export.module_from_artifact`), as a user would run it: each forward "
        "binarizes the latent weights again (sign of a 4096×4096 float tensor per layer). The "
        "*pre-binarized* column caches those ±1 float32 weights once, leaving float32 "
        "matmuls/convolutions plus BatchNorm and sign: the fairest float baseline.",
    ]
    d = r["first_conv"]
    lines += [
        "",
        f"![latency vs batch size]({PLOT.relative_to(DOCS.parent).as_posix()})",
        "",
        "**Full-precision first convolution.** The cnn's stem conv has float weights, so its "
        "output is a float sum that eager torch accumulates in float32 (oneDNN's order) and the "
        "engine in float32 in its own fixed order; where BatchNorm puts the threshold within "
        "rounding error of a sum, the two can binarize differently (a tie). Measured on "
        f"{d['samples']} random 3×32×32 inputs: {d['differing_decisions']} of "
        f"{d['decisions']:,} stem decisions differ (rate {d['decision_rate']:.2e}), in "
        f"{d['samples_with_any_difference']} of the {d['samples']} samples; the predicted class "
        f"differs on {d['class_disagreement']:.2%} of samples. Every binary layer after it is "
        "exact (integer popcounts, thresholds folded from torch's own float32 BatchNorm formula).",
    ]
    return "\n".join(lines)


def render_float_markdown(r: dict[str, Any]) -> str:
    """The "## Inference engine: real-valued inputs" section, with this run's machine and load
    and its integer-input figures beside, for a reader comparing runs."""
    m, mlp, cnn = r["machine"], r["mlp"], r["cnn"]
    m1, m64 = _row(mlp["batches"], 1), _row(mlp["batches"], 64)
    c1 = _row(cnn["batches"], 1)
    lines = [
        f"## {FLOAT_SECTION}",
        "",
        f"`python -m bench engine --write-docs`, one run, {r['date']}. Machine: {m['cpu']}, "
        f"{m['cores']} cores (AVX-512 VPOPCNTDQ: "
        f"{'yes' if m['avx512_vpopcntdq'] else 'no'}), numba {m['numba']} (threading layer "
        f"`{m['threading_layer']}`, {m['numba_threads']} threads). Load average at start "
        f"{', '.join(f'{v:.2f}' for v in r['load_average_start'])}, at end "
        f"{', '.join(f'{v:.2f}' for v in r['load_average_end'])} (other work shares these "
        "cores). Median (best) per call, contenders in alternating rounds. Integer-input "
        f"figures of the same run, for scale: mlp batch 1 {_ms(m1['engine']['median_s'])} "
        f"({_ms(m1['engine']['best_s'])}), batch 64 {_ms(m64['engine']['median_s'])} "
        f"({_ms(m64['engine']['best_s'])}); cnn batch 1 {_ms(c1['engine']['median_s'])} "
        f"({_ms(c1['engine']['best_s'])}).",
        "",
        *float_input_lines(r),
    ]
    return "\n".join(lines)


def float_input_lines(r: dict[str, Any]) -> list[str]:
    """The section on real-valued inputs: speed against pixels, the stem, ties."""

    def timing(entry: dict) -> str:
        return f"{_ms(entry['median_s'])} ({_ms(entry['best_s'])})"

    def ratio(slow: dict, fast: dict) -> str:
        return (
            f"{slow['median_s'] / fast['median_s']:.2f}× ({slow['best_s'] / fast['best_s']:.2f}×)"
        )

    lines = [
        "**Real-valued inputs.** A float input (normalized images, features) cannot use the "
        "bit-planes of integer pixels. The first layer then sums ±x over its packed weight bits "
        "in float32 (`kernels.real_packed_dense`; before: its weights unpacked to float64 tiles "
        "on every call and multiplied by BLAS in float64). Same run, alternating rounds, mlp "
        "784→3×4096→10 (target: float within 1.5× of uint8):",
        "",
        "| batch | uint8 pixels | standard-normal float | float / uint8 | float, before | "
        "before / now | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["float_mlp"]:
        slower = row["float"]["median_s"] / row["uint8"]["median_s"]
        lines.append(
            f"| {row['batch']} | {timing(row['uint8'])} | {timing(row['float'])} | "
            f"{ratio(row['float'], row['uint8'])} | {timing(row['float_before'])} | "
            f"{ratio(row['float_before'], row['float'])} | ≤ 1.5×: {_check(slower <= 1.5)} |"
        )
    lines += [
        "",
        "The cnn's full-precision stem (3×32×32 → 128 channels, 3×3, folded thresholds) in "
        "float32 with its 8-lane accumulators held in registers and one fused multiply-add per "
        "term (`intrinsics.conv_block_sums`: 3 windows × 32 channels), "
        "against the float64 kernel it replaces (as of 884fda1, kept in `bench/float_inputs.py`), "
        "alone and inside the whole cnn (target: stem ≥ 2× faster):",
        "",
        "| batch | stem float32 | stem float64 (before) | speedup | cnn | cnn with the float64 "
        "stem | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["stem"]:
        gain = row["stem_before"]["median_s"] / row["stem"]["median_s"]
        lines.append(
            f"| {row['batch']} | {timing(row['stem'])} | {timing(row['stem_before'])} | "
            f"{ratio(row['stem_before'], row['stem'])} {_check(gain >= 2)} | {timing(row['cnn'])}"
            f" | {timing(row['cnn_before'])} | {ratio(row['cnn_before'], row['cnn'])} |"
        )
    labels = {
        "mlp_standard_normal": "mlp 784→3×4096 for real input, standard-normal rows",
        "cnn_standard_normal": "cnn stem, standard-normal images",
        "cnn_pixels": "cnn stem, random pixels (integers, float weights)",
        "digits_mlp_digits_as_floats": "digits mlp 64→1024→256, digits test set / 16",
    }
    lines += [
        "",
        "**Ties.** A tie is a first-layer decision that differs between the engine and eager "
        "float32 torch: the threshold lies between two float32 roundings of the same sum. "
        "Every later layer is exact, so a row without a tie has eager's class and logits within "
        "1e-5 (`tests/model/engine/test_float_inputs.py`); integer inputs to binary weights "
        "never tie. Measured here (models' BatchNorm calibrated on inputs like these, so "
        "thresholds sit where the sums fall):",
        "",
        "| model, inputs | rows | decisions | tied decisions (rate) | rows with a tie | "
        "class differs | decisions +1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in labels.items():
        t = r["ties"][key]
        lines.append(
            f"| {label} | {t['rows']:,} | {t['decisions']:,} | {t['tied_decisions']} "
            f"({t['decision_rate']:.1e}) | {t['tied_rows']} | {t['class_disagreement']:.2%} | "
            f"{t['firing_fraction']:.2f} |"
        )
    return lines


def gemm_bound_lines(bound: dict[str, Any], g1: dict[str, Any]) -> list[str]:
    """The paragraph on what bounds the batch-1 GEMM, from this run's measurements."""
    rates = {k: v / 1e9 for k, v in bound["bytes_per_second"].items()}
    half = GEMM_SIZE * GEMM_SIZE // 16  # one core's half of the packed matrix, bytes
    stream_s = half / bound["bytes_per_second"]["1 MiB"]
    region_s = bound["parallel_region_s"]
    macs = GEMM_SIZE * GEMM_SIZE
    return [
        "**What bounds the batch-1 GEMM.** One call streams the 2 MiB of packed weights once. "
        "The fused kernel on one thread, best of many calls: "
        + ", ".join(f"{v:.0f} GB/s over {k}" for k, v in rates.items())
        + " of weight rows (from L2, and from L3 past what L2 holds). With each core "
        f"streaming its 1 MiB half at the 1 MiB rate, that is "
        f"{stream_s * 1e6:.1f} µs ({macs / stream_s:.2e} MAC/s). The OpenMP kernel adds "
        f"{region_s * 1e6:.1f} µs to start and join an empty parallel region (numba's launch "
        "and libgomp's two barriers, each a futex call): "
        f"{(stream_s + region_s) * 1e6:.1f} µs. This run's best OpenMP call took "
        f"{g1['fused']['best_s'] * 1e6:.1f} µs and its median {g1['fused']['median_s'] * 1e6:.1f} µs"
        + ". The streaming rates are measured at another moment than the calls, and this VM's "
        "speed drifts by tens of percent over minutes, so a best call can beat them; the median "
        "call carries the two cores' contention for L3 and the VM's scheduling. Each thread "
        "walks its rows forwards and backwards on alternate calls, so a call starts on the rows "
        "the previous one left in L2.",
        "",
    ]


def write_docs_section(markdown: str, path: Path = DOCS, title: str = SECTION) -> None:
    """Replace the ``## {title}`` section of docs/benchmarks.md (or add it), leaving others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = markdown.rstrip() + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def float_artifacts(folder: Path) -> tuple[Path, Path]:
    """The 4096-wide mlp for real-valued input, BatchNorm calibrated on standard-normal inputs,
    and the digits mlp (64 → 1024 → 256 → 10) calibrated on the digits training set / 16: models
    whose thresholds sit where their float inputs put the sums, for counting ties."""
    from model import InputSpec
    from training.architectures import MLPConfig
    from training.data import load_digits

    real = InputSpec(shape=(1, 28, 28), value_range=(-4.0, 4.0), integer_valued=False)
    normal = np.random.default_rng(7).standard_normal((32, 1, 28, 28))
    digits = InputSpec(shape=(1, 8, 8), value_range=(0.0, 1.0), integer_valued=False)
    train = load_digits().train.x[:256] / 16.0
    return (
        build_artifact(MLPConfig(hidden=(4096,) * 3), real, folder / "real.st", calibration=normal),
        build_artifact(MLPConfig(hidden=(1024, 256)), digits, folder / "dg.st", calibration=train),
    )


def run(quick: bool = False) -> dict[str, Any]:
    from model import InputSpec
    from training.architectures import CNNConfig, MLPConfig

    budget = 0.3 if quick else 2.0
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
    }
    results["machine"] = machine()
    with tempfile.TemporaryDirectory() as tmp:
        mnist = InputSpec(shape=(1, 28, 28), value_range=(0.0, 255.0), integer_valued=True)
        cifar = InputSpec(shape=(3, 32, 32), value_range=(0.0, 255.0), integer_valued=True)
        mlp = build_artifact(MLPConfig(hidden=(4096, 4096, 4096)), mnist, Path(tmp) / "mlp.st")
        cnn_config = CNNConfig(
            stem_channels=128,
            channels=(128, 256, 256, 256),
            pool=(True, False, True, True),
            hidden=(1024,),
        )
        cnn = build_artifact(cnn_config, cifar, Path(tmp) / "cnn.st")
        print("gemm…", file=sys.stderr, flush=True)
        results["gemm"] = bench_gemm(budget)
        results["gemm_bound"] = bench_gemm_bound(40 if quick else 200)
        print("mlp…", file=sys.stderr, flush=True)
        results["mlp"] = bench_model(mlp, (1, 4, 64) if quick else MLP_BATCHES, budget)
        print("cnn…", file=sys.stderr, flush=True)
        results["cnn"] = bench_model(cnn, (1, 16) if quick else CNN_BATCHES, budget)
        print("first conv…", file=sys.stderr, flush=True)
        results["first_conv"] = first_conv_disagreement(cnn, 64 if quick else 1000)
        print("float inputs…", file=sys.stderr, flush=True)
        results["float_mlp"] = float_inputs.bench_float_mlp(mlp, timed_together, budget)
        results["stem"] = float_inputs.bench_stem(cnn, timed_together, budget)
        results["ties"] = float_inputs.bench_ties(
            *float_artifacts(Path(tmp)), cnn, 200 if quick else 2000
        )
    results["machine"]["threading_layer"] = machine()["threading_layer"]
    results["load_average_end"] = os.getloadavg()
    return results


def timing_arguments(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line shared by the in-process timing benchmarks: --write-docs, --quick."""
    parser = argparse.ArgumentParser(prog=prog, description=description.split("\n")[0])
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="short timings (a smoke run)")
    return parser.parse_args(argv)


def report(
    results: dict, results_path: Path, markdown: str, *, title: str, write_docs: bool
) -> None:
    """Save a timing benchmark's results as JSON, print its markdown and, with --write-docs,
    put it in its section of docs/benchmarks.md."""
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2))
    print(markdown)
    if write_docs:
        write_docs_section(markdown, title=title)


def main(argv: list[str] | None = None) -> int:
    args = timing_arguments("python -m bench engine", __doc__, argv)
    results = run(quick=args.quick)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    plot(results)
    markdown = render_markdown(results)
    float_markdown = render_float_markdown(results)
    print(markdown + "\n\n" + float_markdown)
    if args.write_docs:
        write_docs_section(markdown)
        write_docs_section(float_markdown, title=FLOAT_SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
