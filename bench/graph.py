"""``python -m bench graph``: v2 layer graphs in the engine — a Bi-Real-Net-18 at 3×224×224.

Measures in one run, side by side on this machine (issue 11's acceptance):

* latency of the engine and of eager PyTorch with the weights binarized once (float32 ±1
  convolutions, ``torch.set_num_threads`` = the engine's thread count), batches 1 and 8, on a
  Bi-Real-Net-18-shaped graph with random weights (ResNet-18's topology: a 7×7/2 full-precision
  stem, 1-bit 3×3 convs, average-pool + full-precision 1×1 downsampling shortcuts);
* its agreement with eager (same class, logits within 1e-4 relative) and the loaded model's
  memory against the float32 parameters;
* the tie rate of smaller Bi-Real / ReActNet graphs at digits, Fashion-MNIST and CIFAR shapes
  (rows whose logits differ from eager's by more than 1e-4: a full-precision sum rounded in
  another order flipped a sign somewhere).

Results: ``bench/results/graph.json`` and, with ``--write-docs``, the "Inference engine: layer
graphs" section of docs/benchmarks.md.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.engine import ROOT, machine, report, timed_together, timing_arguments

RESULTS = ROOT / "bench" / "results" / "graph.json"
SECTION = "Inference engine: layer graphs"
BATCHES = (1, 8)
THREADS = (1, 2)  # this machine's cores: each count for both contenders
TARGET_SPEEDUP_B1 = 8.0
TARGET_MEMORY_FRACTION = 1 / 8
LOGIT_TOLERANCE = 1e-4
RESNET18 = {
    "input_shape": (3, 224, 224),
    "widths": (64, 128, 256, 512),
    "blocks": 4,  # one binary 3×3 conv per block: ResNet-18's two basic blocks per stage
    "stem_kernel": 7,
    "stem_stride": 2,
    "stem_pool": True,
    "value_range": (0.0, 255.0),
}
TIE_SHAPES = {
    "digits 1×8×8": ((1, 8, 8), (0.0, 16.0), (16, 32)),
    "Fashion 1×28×28": ((1, 28, 28), (0.0, 255.0), (32, 64, 128)),
    "CIFAR 3×32×32": ((3, 32, 32), (0.0, 255.0), (32, 64, 128)),
}


class PreparedEager:
    """The eager reference (``tests/model/engine/reference.eager_logits``: the training layers'
    torch ops) with every tensor converted once: binary weights unpacked to float32 ±1,
    BatchNorms as eval-mode modules. Only the activations' sign runs per call."""

    def __init__(self, spec, tensors: dict) -> None:
        import torch

        from model.packing import unpack_signs
        from model.spec import BatchNorm, Conv2d, Dense

        self.spec = spec
        self.sources = spec.layer_inputs()
        self.prepared: dict[str, Any] = {}
        for layer in spec.layers:
            if isinstance(layer, Dense | Conv2d):
                stored = tensors[f"{layer.name}.weight"]
                if layer.kernel_quantizer is None:
                    w = np.array(stored, np.float32)
                else:
                    length = layer.in_features if isinstance(layer, Dense) else layer.in_channels
                    w = unpack_signs(stored, length, axis=1)
                vectors = {s: tensors.get(f"{layer.name}.{s}") for s in ("bias", "scale")}
                self.prepared[layer.name] = (
                    torch.from_numpy(np.ascontiguousarray(w, np.float32)),
                    *(
                        None if v is None else torch.from_numpy(np.array(v))
                        for v in vectors.values()
                    ),
                )
            elif isinstance(layer, BatchNorm):
                bn = torch.nn.BatchNorm2d(layer.num_features, eps=layer.eps).eval()
                with torch.no_grad():
                    for s in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, s).copy_(
                            torch.from_numpy(np.array(tensors[f"{layer.name}.{s}"]))
                        )
                self.prepared[layer.name] = bn
            else:
                for suffix in ("shift", "weight"):
                    if f"{layer.name}.{suffix}" in tensors:
                        vec = np.array(tensors[f"{layer.name}.{suffix}"], np.float32)
                        self.prepared[layer.name] = torch.from_numpy(vec)

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        from model.spec import (
            MODEL_INPUT,
            Add,
            AvgPool2d,
            BatchNorm,
            Concat,
            Conv2d,
            Dense,
            GlobalAvgPool2d,
            MaxPool2d,
            PReLU,
            Shift,
        )

        values = {MODEL_INPUT: x}
        with torch.inference_mode():
            for layer, sources in zip(self.spec.layers, self.sources, strict=True):
                v, p = values[sources[0]], self.prepared.get(layer.name)
                if isinstance(layer, Add):
                    for source in sources[1:]:
                        v = v + values[source]
                elif isinstance(layer, Concat):
                    v = torch.cat([values[s] for s in sources], dim=1)
                elif isinstance(layer, Shift):
                    v = v + p.view(1, -1, *([1] * (v.dim() - 2)))
                elif isinstance(layer, PReLU):
                    v = F.prelu(v, p)
                elif isinstance(layer, AvgPool2d):
                    v = F.avg_pool2d(v, layer.kernel_size, layer.stride)
                elif isinstance(layer, GlobalAvgPool2d):
                    v = v.mean((2, 3))
                elif isinstance(layer, MaxPool2d):
                    v = F.max_pool2d(v, layer.kernel_size, layer.stride)
                elif isinstance(layer, BatchNorm):
                    v = p(v)
                elif isinstance(layer, Dense | Conv2d):
                    v = self._linear(layer, p, v)
                values[layer.name] = v
        return v

    @staticmethod
    def _linear(layer, prepared, v):
        import torch
        import torch.nn.functional as F

        from model.spec import Dense

        w, bias, scale = prepared
        if layer.input_quantizer is not None:  # every graph here quantizes with a sign
            v = torch.where(v >= 0, 1.0, -1.0)
        if isinstance(layer, Dense):
            y = v.mm(w.t())
            y = y if scale is None else y * scale
            return y if bias is None else y + bias
        ph, pw = layer.padding
        if ph or pw:
            v = F.pad(v, (pw, pw, ph, ph), value=layer.pad_value)
        if scale is None:
            return F.conv2d(v, w, bias, stride=layer.stride)
        y = F.conv2d(v, w, None, stride=layer.stride) * scale.view(1, -1, 1, 1)
        return y if bias is None else y + bias.view(1, -1, 1, 1)


def cpu_seconds(fn, calls: int = 5) -> float:
    """Median CPU time of the process (every thread) per call: on a machine shared with other
    work, wall time measures the scheduler as much as the code; CPU time does not."""
    fn()
    spent = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        spent.append(time.process_time() - start)
    return sorted(spent)[len(spent) // 2]


def agreement(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    error = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    return {
        "same_class": float((got.argmax(1) == want.argmax(1)).mean()),
        "close_logits": float((error <= LOGIT_TOLERANCE).mean()),
        "max_rel_logit_error": float(error.max()),
    }


def bench_resnet18(folder: Path, budget_s: float, rows: int) -> dict[str, Any]:
    """The Bi-Real-Net-18 at 224²: engine vs eager (binarized once), batches 1 and 8, at each
    thread count in THREADS (both contenders at the same count)."""
    import numba
    import torch

    from model import load_model
    from model.artifact import write_artifact
    from model.engine.layout import WIDE_POPCOUNT
    from model.engine.memory import MemoryLimit
    from model.engine.options import EngineOptions
    from tests.model.engine.reference import bireal_spec, random_tensors

    spec = bireal_spec(**RESNET18, classes=1000)
    tensors = random_tensors(spec, np.random.default_rng(0))
    path = folder / "bireal18.safetensors"
    write_artifact(path, spec, tensors)

    def loaded(threads: int | None = None):
        # the default bound counts 1024-row calls (20 GiB of activations at 224²); serve up to 8
        limit = MemoryLimit(max_batch=max(BATCHES))
        options = EngineOptions(threads=threads)
        return load_model(path, device="cpu", memory_limit=limit, options=options)

    start = time.perf_counter()
    model = loaded()
    load_s = time.perf_counter() - start
    eager = PreparedEager(spec, tensors)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(max(rows, max(BATCHES)), *spec.input.shape)).astype(np.float32)
    got = np.concatenate([model.predict(x[i : i + 8]) for i in range(0, rows, 8)])
    want = np.concatenate(
        [eager(torch.from_numpy(x[i : i + 8])).numpy() for i in range(0, rows, 8)]
    )
    timings = []
    for threads in [t for t in THREADS if t <= numba.config.NUMBA_NUM_THREADS]:
        # the engine's parallel calls use the threads it was loaded with (EngineOptions)
        model = loaded(threads)
        numba.set_num_threads(threads)
        torch.set_num_threads(threads)
        for batch in BATCHES:
            xb = x[:batch]
            xt = torch.from_numpy(xb)
            measured = timed_together(
                {
                    "engine": lambda xb=xb, model=model: model.predict(xb),
                    "eager": lambda xt=xt: eager(xt),
                },
                budget_s=budget_s,
                min_rounds=3,
            )
            speedup = measured["eager"]["median_s"] / measured["engine"]["median_s"]
            cpu = {
                "engine": cpu_seconds(lambda xb=xb, model=model: model.predict(xb)),
                "eager": cpu_seconds(lambda xt=xt: eager(xt)),
            }
            timings.append(
                {"threads": threads, "batch": batch, **measured, "speedup": speedup, "cpu_s": cpu}
            )
    breakdown = engine_breakdown(spec, tensors, x[:1])
    breakdown["popcount_macs_per_s"] = popcount_rate()
    breakdown["wide_popcount"] = WIDE_POPCOUNT
    float32_bytes = 4 * sum(
        math.prod(want_t.logical_shape or want_t.shape)
        for want_t in spec.expected_tensors().values()
    )
    return {
        "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in RESNET18.items()},
        "load_seconds": load_s,
        "memory_bytes": model.memory_bytes,
        "float32_bytes": float32_bytes,
        "agreement": {"rows": rows, **agreement(got[:rows], want[:rows])},
        "batches": timings,
        "breakdown": breakdown,
    }


def engine_breakdown(spec, tensors, x: np.ndarray, calls: int = 10) -> dict[str, Any]:
    """Where one call of the engine's program goes, on one thread (serial kernels): the median
    over ``calls`` of each kind of operation's summed time, and the binary convolutions'
    multiply-accumulates (K·O per output position)."""
    import numba

    from model.engine.compiler import compile_program
    from model.engine.cpu import NumbaExecutor
    from model.engine.graph import run_wired
    from model.engine.kernels import SERIAL
    from model.engine.ops import BinaryConv, FloatConv

    numba.set_num_threads(1)
    executor = NumbaExecutor(compile_program(spec, tensors), threads=1)

    def kind(op) -> str:
        if isinstance(op, BinaryConv):  # with the residual adds they took in (fused)
            return (
                "binary 3×3 convolutions (and their adds)"
                if op.residual
                else "binary 3×3 convolutions"
            )
        if isinstance(op, FloatConv):
            return "full-precision stem" if op.kernel[0] > 1 else "1×1 shortcut convolutions"
        return type(op).__name__

    runs: list[dict[str, float]] = []
    for _ in range(calls + 1):  # the first call compiles and warms the caches
        spent: dict[str, float] = {}

        def timed(op, value, spent=spent):
            start = time.perf_counter()
            out = executor.execute(op, value, SERIAL)
            spent[kind(op)] = spent.get(kind(op), 0.0) + time.perf_counter() - start
            return out

        run_wired(executor.program, x, timed)
        runs.append(spent)
    median = {k: float(np.median([r[k] for r in runs[1:]])) for k in runs[0]}
    binary = [op for op in executor.program.ops if isinstance(op, BinaryConv)]
    macs = sum(op.out_hw[0] * op.out_hw[1] * op.weight.shape[0] * op.features for op in binary)
    return {"seconds": median, "binary_macs": macs}


def popcount_rate(seconds: float = 1.0) -> float:
    """Binary multiply-accumulates per second of one core on the engine's own XOR-popcount
    loop over words already in L1: the pace the binary convolutions could reach if they did
    nothing else. Where the CPU has AVX-512 VPOPCNTDQ that is the column kernel the convs run
    (``kernels.xor_popcount_columns``, 32 rows of 2,304 bits against 64 weight columns,
    29 KiB), elsewhere a 4,608-bit row against 32 weight rows (18 KiB) on scalar POPCNT."""
    import numba
    from numba import njit

    from model.engine import kernels
    from model.engine.intrinsics import popcount
    from model.engine.layout import WIDE_POPCOUNT

    @njit(nogil=True, fastmath=True)
    def loop(a, w, repeats):
        total = 0
        for _ in range(repeats):
            for o in range(w.shape[0]):
                s = 0
                for k in range(a.shape[0]):
                    s += popcount(a[k] ^ w[o, k])
                total += s
        return total

    def columns(a, wt, repeats):
        out = np.empty((a.shape[0], wt.shape[1]), np.int32)
        rows = a.reshape(1, a.shape[0], 1, a.shape[1])  # the patch rows of a 1×1 convolution
        for _ in range(repeats):
            kernels.SERIAL.xor_popcount_columns(rows, 1, 1, 1, 1, wt, out, 1)

    numba.set_num_threads(1)
    rng = np.random.default_rng(3)
    if WIDE_POPCOUNT:
        a = rng.integers(0, 2**63, size=(32, 36), dtype=np.uint64)
        w = rng.integers(0, 2**63, size=(36, 64), dtype=np.uint64)
        run, macs = columns, a.size * w.shape[1] * 64
    else:
        a = rng.integers(0, 2**63, size=72, dtype=np.uint64)
        w = rng.integers(0, 2**63, size=(32, 72), dtype=np.uint64)
        run, macs = loop, w.size * 64
    run(a, w, 1)
    repeats, best = 1000, 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        run(a, w, repeats)
        best = max(best, repeats * macs / (time.perf_counter() - start))
    return best


def bench_ties(rows: int) -> list[dict[str, Any]]:
    """Tie rates of Bi-Real / ReActNet graphs with random weights, engine (numba) vs eager."""
    import torch

    from model.engine.compiler import compile_program
    from model.engine.cpu import NumbaExecutor
    from tests.model.engine.reference import bireal_spec, random_tensors

    out = []
    for shape_name, (shape, value_range, widths) in TIE_SHAPES.items():
        for variant, options in (("birealnet", {}), ("reactnet", {"reactnet": True})):
            spec = bireal_spec(shape, widths, blocks=2, value_range=value_range, **options)
            rng = np.random.default_rng(2)
            tensors = random_tensors(spec, rng)
            executor = NumbaExecutor(compile_program(spec, tensors))
            eager = PreparedEager(spec, tensors)
            x = rng.integers(0, int(value_range[1]) + 1, size=(rows, *shape)).astype(np.float32)
            got = np.concatenate([executor.run(x[i : i + 256]) for i in range(0, rows, 256)])
            want = np.concatenate(
                [eager(torch.from_numpy(x[i : i + 256])).numpy() for i in range(0, rows, 256)]
            )
            out.append(
                {"shape": shape_name, "variant": variant, "rows": rows, **agreement(got, want)}
            )
    return out


def render_markdown(r: dict[str, Any]) -> str:
    net = r["resnet18"]
    b1 = [b for b in net["batches"] if b["batch"] == 1]
    fraction = net["memory_bytes"] / net["float32_bytes"]
    lines = [
        f"## {SECTION}",
        "",
        f"`python -m bench graph --write-docs` ({r['date']}; {r['machine']['cpu']}; load average "
        f"{r['load_average_start'][0]:.1f} at the start, {r['load_average_end'][0]:.1f} at the "
        "end). A Bi-Real-Net-18-shaped graph at 3×224×224 with random weights "
        "(`bireal_spec(input_shape=(3, 224, 224), widths=(64, 128, 256, 512), blocks=4, "
        "stem_kernel=7, stem_stride=2, stem_pool=True)`, 1000 classes: ResNet-18's topology with "
        "a full-precision 7×7/2 stem, 16 1-bit 3×3 convolutions each with its own shortcut, "
        "average-pool + full-precision 1×1 downsampling shortcuts), in the engine and in eager "
        "PyTorch with the weights binarized once (float32 ±1 convolutions), both at the same "
        "thread count (the engine loaded with `EngineOptions(threads=t)`, `torch.set_num_threads(t)`), "
        "timed in alternating turns in one run (median of each contender's calls).",
        "",
        "| threads | batch | engine | eager (±1 weights) | speed-up | CPU time: engine | eager "
        "| CPU ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in net["batches"]:
        cpu = b["cpu_s"]
        lines.append(
            f"| {b['threads']} | {b['batch']} | {b['engine']['median_s'] * 1e3:.1f} ms | "
            f"{b['eager']['median_s'] * 1e3:.1f} ms | {b['speedup']:.1f}× | "
            f"{cpu['engine'] * 1e3:.0f} ms | {cpu['eager'] * 1e3:.0f} ms | "
            f"{cpu['eager'] / cpu['engine']:.1f}× |"
        )
    a = net["agreement"]
    lines += [
        "",
        f"- **Target ≥ {TARGET_SPEEDUP_B1:.0f}× at batch 1**: "
        + ", ".join(
            f"{b['speedup']:.1f}× on {b['threads']} thread(s) "
            f"({'met' if b['speedup'] >= TARGET_SPEEDUP_B1 else 'not met'})"
            for b in b1
        )
        + ".",
        f"- **Memory**: the loaded model holds {net['memory_bytes'] / 2**20:.2f} MiB, "
        f"{fraction:.3f} of its {net['float32_bytes'] / 2**20:.1f} MiB of float32 parameters "
        f"(target ≤ 1/8: {'met' if fraction <= TARGET_MEMORY_FRACTION else 'not met'}).",
        f"- **Exactness** on {a['rows']} random-pixel images: {a['same_class']:.1%} same class, "
        f"{a['close_logits']:.1%} with logits within 1e-4 relative (largest difference "
        f"{a['max_rel_logit_error']:.2g}).",
        f"- Load (read, compile, first-call kernels cached on disk): {net['load_seconds']:.1f} s.",
        "",
        *render_breakdown(net),
        "",
        "Tie rates of smaller random-weight graphs (two blocks per stage, numba engine against "
        "eager float32 on random integer pixels): a row counts as tied when its logits differ "
        "from eager's by more than 1e-4 relative — the full-precision stem or a float residual "
        "sum was rounded on the other side of a sign's threshold somewhere in the network.",
        "",
        "| input | graph | rows | same class | logits within 1e-4 | tie rate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for t in r["ties"]:
        lines.append(
            f"| {t['shape']} | {t['variant']} | {t['rows']} | {t['same_class']:.2%} | "
            f"{t['close_logits']:.2%} | {1 - t['close_logits']:.2%} |"
        )
    return "\n".join(lines)


def render_breakdown(net: dict[str, Any]) -> list[str]:
    """Where a batch-1 call goes on one thread, and how the 8× budget compares with what this
    CPU's popcount allows."""
    split = net["breakdown"]
    seconds, rate = split["seconds"], split["popcount_macs_per_s"]
    total = sum(seconds.values())
    eager = next(b for b in net["batches"] if b["threads"] == 1 and b["batch"] == 1)
    budget = eager["eager"]["median_s"] / TARGET_SPEEDUP_B1
    floor = split["binary_macs"] / rate
    binary_s = sum(v for k, v in seconds.items() if k.startswith("binary 3×3 convolutions"))
    stem_s = seconds.get("full-precision stem", 0.0)
    kernel = (
        "the column kernel on 512-bit VPOPCNTQ"
        if split.get("wide_popcount")
        else "a scalar POPCNT loop, this CPU has no AVX-512 VPOPCNTDQ"
    )
    channels, height, width = RESNET18["input_shape"]
    stem_macs = (
        (height // RESNET18["stem_stride"]) * (width // RESNET18["stem_stride"])
        * RESNET18["widths"][0] * RESNET18["stem_kernel"] ** 2 * channels
    )  # fmt: skip
    lines = [
        f"Where a batch-1 call goes (one thread, serial kernels, median of 10 calls; "
        f"{total * 1e3:.1f} ms in all):",
        "",
        "| operations | time | share |",
        "|---|---:|---:|",
    ]
    for name, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        lines.append(f"| {name} | {spent * 1e3:.2f} ms | {spent / total:.0%} |")
    lines += [
        "",
        f"**The 8× budget on this CPU.** 8× eager's {eager['eager']['median_s'] * 1e3:.0f} ms "
        f"on one thread leaves {budget * 1e3:.1f} ms for the whole call. The 16 binary "
        f"convolutions are {split['binary_macs'] / 1e9:.2f} G binary multiply-accumulates; the "
        f"engine's popcount loop over words already in L1 does {rate / 1e9:.0f} G per second on "
        f"one core here (`popcount_rate`: {kernel}; no im2col, no epilogue, no cache misses), "
        f"so they need at least {floor * 1e3:.1f} ms, {floor / budget:.0%} of the budget, and "
        f"took {binary_s * 1e3:.1f} ms. The rest of the call (the float stem and shortcuts, "
        f"pools and quantizers, work eager does too) took {(total - binary_s) * 1e3:.1f} ms, the "
        f"7×7 stem's {stem_macs / 1e6:.0f} M float multiply-adds alone {stem_s * 1e3:.1f} ms "
        f"({stem_s / budget:.0%} of the budget).",
    ]
    return lines


def run(quick: bool = False) -> dict[str, Any]:
    import tempfile

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        print("bi-real-net-18…", file=sys.stderr, flush=True)
        results["resnet18"] = bench_resnet18(Path(tmp), 1.0 if quick else 6.0, 16 if quick else 64)
    print("ties…", file=sys.stderr, flush=True)
    results["ties"] = bench_ties(200 if quick else 2000)
    results["load_average_end"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> int:
    args = timing_arguments("python -m bench graph", __doc__, argv)
    results = run(quick=args.quick)
    markdown = render_markdown(results)
    report(results, RESULTS, markdown, title=SECTION, write_docs=args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
