"""The prepared GPU check: correctness and speed of the torch backend on a GPU, in one run.

Run it once whenever a GPU is lent (under 5 minutes on one)::

    python -m bench gpu --write-docs            # cuda:0; the "## GPU path" section of the docs
    python -m bench gpu --device cpu --small    # the same script on the CPU (the test suite)

1. Correctness of the torch path on ``--device`` against the CPU engine, on random models
   through training's export: every quantizer family (sign: ste_sign, clipped_ste, approx_sign,
   swish_sign; step: stochastic_binary), ±1 padding, max-pooling and α scales (residual graphs
   are not in the artifact format yet), at batches 1, 7, 64 and 300 — decisions must match
   (argmax identical and logits within 1e-4 relative; on the CPU bit for bit). The
   full-precision layers' weights sit on a 2⁻⁸ grid (``build_artifact(exact_float_sums=True)``)
   so that their sums are exact in any order: the stem's rounding ties, which depend on the
   order the convolution library picks, are measured by ``bench graph`` instead.
2. ``auto`` (which device it chose, and the figures) and each ``cuda:N``.
3. Eight threads sharing one model: every call's output equals the single-threaded one.
4. Latency and throughput of bnnserve's torch path against eager torch fp32 and fp16 (the
   model rebuilt from the same artifact, ±1 weights) and the CPU engine, for BinaryNet's
   784→3×4096 mlp and the bench cnn (:mod:`bench.engine`), at batches 1–1024, with peak device
   memory, and a torch.profiler count of kernels (or CPU ops) against wall time at batch 64.

Writes JSON to ``bench/results/gpu.json`` and, with ``--write-docs``, the "## GPU path" section
of ``docs/benchmarks.md`` naming the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.engine import ROOT, build_artifact, pixels, write_docs_section

RESULTS = ROOT / "bench" / "results" / "gpu.json"
SECTION = "GPU path"
CHECK_BATCHES = (1, 7, 64, 300)
SPEED_BATCHES = (1, 4, 16, 64, 256, 1024)
SMALL_BATCHES = (1, 4)
CPU_ENGINE_MAX_BATCH = 256  # the CPU engine's larger calls would take most of the 5 minutes
CALL_BUDGET_S = 0.25  # timed calls per (contender, batch): at least 3, then until this is spent
THREADS = 8
SIGN_FAMILY = ("ste_sign", "clipped_ste", "approx_sign", "swish_sign")


# --- models ---------------------------------------------------------------------------------------
def check_models(small: bool) -> list[tuple[str, Any, Any]]:
    """(name, config, input spec): every quantizer family as activations and as kernels, the
    cnn with +1 and −1 padding, pooling and α."""
    from model import InputSpec
    from training.architectures import CNNConfig, MLPConfig

    digits = InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True)
    rgb = InputSpec(shape=(3, 12, 12), value_range=(0.0, 255.0), integer_valued=True)
    width = 96 if small else 2300  # past 2048 terms: float16 sums split in chunks
    models = []
    for i, activation in enumerate((*SIGN_FAMILY, "stochastic_binary")):
        kernel = SIGN_FAMILY[(i + 1) % len(SIGN_FAMILY)]
        config = MLPConfig(
            hidden=(width, 70),
            activation_quantizer=activation,
            kernel_quantizer=kernel,
            scale=i % 2 == 1,
        )
        models.append((f"mlp {activation}/{kernel}", config, digits))
    for activation, pad in (("ste_sign", 1.0), ("approx_sign", -1.0), ("stochastic_binary", 1.0)):
        config = CNNConfig(
            stem_channels=20,
            channels=(70, 40 if small else 240),  # 240·9 = 2160 terms in the second conv
            pool=(True, False),
            hidden=(40,),
            activation_quantizer=activation,
            pad_value=pad,
            scale=pad < 0,
        )
        models.append((f"cnn {activation} pad {pad:+g}", config, rgb))
    return models


def speed_models() -> list[tuple[str, Any, Any]]:
    from model import InputSpec
    from training.architectures import CNNConfig, MLPConfig

    mnist = InputSpec(shape=(1, 28, 28), value_range=(0.0, 255.0), integer_valued=True)
    cifar = InputSpec(shape=(3, 32, 32), value_range=(0.0, 255.0), integer_valued=True)
    cnn = CNNConfig(
        stem_channels=128, channels=(128, 256, 256, 256), pool=(True, False, True, True),
        hidden=(1024,),
    )  # fmt: skip
    return [("mlp 784→3×4096", MLPConfig(hidden=(4096, 4096, 4096)), mnist), ("cnn", cnn, cifar)]


# --- 1–3: correctness -----------------------------------------------------------------------------
def agreement(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """Bit-identical?, argmax agreement, largest logit error relative to the row's largest."""
    scale = np.maximum(np.abs(want).max(axis=1, keepdims=True), 1e-30)
    rel = float((np.abs(got - want) / scale).max()) if got.size else 0.0
    same_class = float((got.argmax(1) == want.argmax(1)).mean())
    return {"identical": bool(np.array_equal(got, want)), "argmax": same_class, "rel_error": rel}


def check_correctness(device: str, small: bool, tmp: Path) -> list[dict[str, Any]]:
    from model import load_model

    rows = []
    for i, (name, config, spec) in enumerate(check_models(small)):
        path = build_artifact(
            config, spec, tmp / f"check{i}.safetensors", seed=i, exact_float_sums=True
        )
        engine = load_model(path, device="cpu", backend="numba")
        torch_model = load_model(path, device=device, backend="torch")
        for batch in CHECK_BATCHES:
            x = pixels(spec, batch, seed=batch)
            row = {
                "model": name,
                "batch": batch,
                **agreement(torch_model.predict(x), engine.predict(x)),
            }
            row["ok"] = row["argmax"] == 1.0 and row["rel_error"] <= 1e-4
            if device == "cpu":
                row["ok"] = row["ok"] and row["identical"]
            rows.append(row)
    return rows


def check_devices(device: str, tmp: Path) -> list[dict[str, Any]]:
    """``auto`` and each named device: where the model landed, and auto's reasons."""
    import torch

    from model import load_model

    _, config, spec = check_models(small=True)[5]
    path = build_artifact(config, spec, tmp / "devices.safetensors")
    requested = ["auto"] + (
        [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device != "cpu" else ["cpu"]
    )
    want = load_model(path, device="cpu").predict(pixels(spec, 7, seed=0))
    rows = []
    for requested_device in requested:
        model = load_model(path, device=requested_device, batch_sizes=(1, 64))
        got = model.predict(pixels(spec, 7, seed=0))
        choice = model.device_choice.as_metadata() if model.device_choice else None
        rows.append(
            {
                "requested": requested_device,
                "device": model.device,
                "backend": model.backend,
                "choice": choice,
                **agreement(got, want),
            }
        )
    return rows


def check_threads(device: str, tmp: Path) -> dict[str, Any]:
    """THREADS threads call one model with mixed batch sizes; every output must equal the
    single-threaded one."""
    from model import load_model

    _, config, spec = check_models(small=True)[-1]
    path = build_artifact(config, spec, tmp / "threads.safetensors")
    model = load_model(path, device=device, backend="torch")
    inputs = [pixels(spec, b, seed=b) for b in (1, 7, 64)]
    expected = [model.predict(x) for x in inputs]
    failures: list[int] = []
    start = threading.Barrier(THREADS)

    def work(offset: int) -> None:
        start.wait()
        for i in range(offset, offset + 24):
            if not np.array_equal(model.predict(inputs[i % 3]), expected[i % 3]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"threads": THREADS, "calls": THREADS * 24, "mismatches": len(failures)}


# --- 4: speed -------------------------------------------------------------------------------------
def time_call(fn: Callable[[], object], budget_s: float = CALL_BUDGET_S) -> float:
    """Median seconds of ``fn()`` after two untimed calls: at least 3 timed, until budget_s."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def eager_call(module, device: str, dtype) -> Callable[[np.ndarray], np.ndarray]:
    """Eager torch on ``device`` in ``dtype``, host → device → host like a served call."""
    import torch

    def call(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(x).to(device, dtype))
            return out.float().cpu().numpy()

    return call


def peak_bytes(device: str, fn: Callable[[], object]) -> int | None:
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def kernel_count(device: str, fn: Callable[[], object]) -> dict[str, Any]:
    """One call under torch.profiler: kernels launched (CUDA) or ops run (CPU), their summed
    time, and the call's wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6
    else:
        kernels = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
        busy = sum(e.cpu_time_total for e in kernels) / 1e6
    return {"kernels": len(kernels), "kernel_s": busy, "wall_s": wall}


def bench_speed(device: str, small: bool, tmp: Path) -> list[dict[str, Any]]:
    import torch

    from model import load_model
    from training.export import module_from_artifact

    batches = SMALL_BATCHES if small else SPEED_BATCHES
    results = []
    for name, config, spec in speed_models() if not small else check_models(True)[:1]:
        path = build_artifact(config, spec, tmp / f"speed-{len(results)}.safetensors")
        bnn = load_model(path, device=device, backend="torch", batch_sizes=(1, max(batches)))
        engine = load_model(path, device="cpu", backend="numba")
        fp32 = module_from_artifact(path).to(device)
        contenders = {
            "bnnserve": bnn.predict,
            "eager fp32": eager_call(fp32, device, torch.float32),
        }
        if device.startswith("cuda"):
            fp16 = module_from_artifact(path).to(device).half()
            contenders["eager fp16"] = eager_call(fp16, device, torch.float16)
        contenders["cpu engine"] = engine.predict
        rows = []
        for batch in batches:
            x = pixels(spec, batch, seed=batch)
            row: dict[str, Any] = {"batch": batch}
            for contender, call in contenders.items():
                if contender == "cpu engine" and batch > CPU_ENGINE_MAX_BATCH:
                    continue
                row[contender] = time_call(lambda call=call, x=x: call(x))
                row[f"{contender} peak bytes"] = peak_bytes(device, lambda call=call, x=x: call(x))
            rows.append(row)
        x64 = pixels(spec, 64 if not small else 4, seed=0)
        profiled = {
            contender: kernel_count(device, lambda call=call, x=x64: call(x))
            for contender, call in contenders.items()
            if contender != "cpu engine"
        }
        results.append(
            {
                "model": name,
                "rows": rows,
                "profile_batch": int(x64.shape[0]),
                "profile": profiled,
                "memory_bytes": bnn.memory_bytes,
            }
        )
    return results


# --- the torch backend on the CPU, against an earlier revision of it -----------------------------
LEGACY_SECTION = "Torch backend on the CPU"
LEGACY_BATCHES = (1, 64)


def legacy_executor_class(rev: str) -> type:
    """``TorchExecutor`` of ``model/engine/torch_backend.py`` as of git revision ``rev``."""
    import importlib.util
    import subprocess

    source = subprocess.run(
        ["git", "show", f"{rev}:model/engine/torch_backend.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    spec = importlib.util.spec_from_loader(f"legacy_torch_backend_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:model/engine/torch_backend.py", "exec"), module.__dict__)
    return module.TorchExecutor


def compare_legacy(rev: str, budget_s: float = 1.0) -> dict[str, Any]:
    """The torch backend now vs at ``rev``, both on the CPU, timed in alternating rounds
    (:func:`bench.engine.timed_together`), on the bench mlp and cnn at LEGACY_BATCHES."""
    from bench.engine import machine, timed_together
    from model import load_model

    legacy_class = legacy_executor_class(rev)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for i, (name, config, spec) in enumerate(speed_models()):
            path = build_artifact(config, spec, Path(tmp_name) / f"legacy{i}.safetensors")
            new = load_model(path, device="cpu", backend="torch", batch_sizes=LEGACY_BATCHES)
            old = legacy_class(new.program, "cpu")
            for batch in LEGACY_BATCHES:
                x = new.check_input(pixels(spec, batch, seed=batch))
                same = bool(np.array_equal(new.predict(x), old.run(x)))
                timed = timed_together(
                    {
                        "new": lambda x=x, m=new: m.predict(x),
                        "old": lambda x=x, m=old: m.run(x),
                    },
                    min_rounds=3,
                    budget_s=budget_s,
                )
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "new_s": timed["new"]["median_s"],
                        "old_s": timed["old"]["median_s"],
                        "identical": same,
                    }
                )
    return {
        "rev": rev,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "rows": rows,
    }


def render_legacy(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"## {LEGACY_SECTION}",
        "",
        f'The torch backend (`backend="torch", device="cpu"`) against its version at '
        f"`{r['rev']}`, side by side in one run ({r['date']}; {m['cpu']}, {m['cores']} cores "
        f"shared with other work, load {m['load_average'][0]:.1f}; torch {m['torch']}, "
        f"{m['torch_threads']} threads): `python -m bench gpu --legacy {r['rev']}`. Median ms "
        "per call, alternating rounds.",
        "",
        "| model | batch | before | now | speed-up | same logits |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['old_s'] * 1e3:.2f} | "
            f"{row['new_s'] * 1e3:.2f} | {row['old_s'] / row['new_s']:.1f}× | "
            f"{'yes' if row['identical'] else 'no'} |"
        )
    lines += [
        "",
        "What changed: the weights are unpacked once at load instead of on every call (for the "
        "mlp about 1 GB of temporaries a call before), activations stay unpacked between layers "
        "instead of being re-packed to bits, and binary convolutions run as one `F.conv2d` "
        "instead of `F.unfold` + matmul. On the CPU the full-precision layers still accumulate "
        "in float64, which keeps the logits bit-identical to the CPU engine. The CPU engine "
        "itself remains far faster on the CPU (see above): this backend is for GPUs.",
    ]
    return "\n".join(lines) + "\n"


# --- report ---------------------------------------------------------------------------------------
def summary(speed: list[dict[str, Any]]) -> dict[str, Any]:
    """Against the issue's acceptance: bnnserve ≥ 2× eager fp16 at batch 256, and the smallest
    batch from which it is ahead of the CPU engine."""
    out = {}
    for result in speed:
        rows = result["rows"]
        at256 = next((r for r in rows if r["batch"] == 256), None)
        vs_fp16 = (
            at256["eager fp16"] / at256["bnnserve"] if at256 and "eager fp16" in at256 else None
        )
        ahead = [r["batch"] for r in rows if "cpu engine" in r and r["bnnserve"] < r["cpu engine"]]
        out[result["model"]] = {
            "vs_fp16_at_256": vs_fp16,
            "ahead_of_cpu_from": min(ahead or [0]) or None,
        }
    return out


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3f}"


def _mb(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.1f}"


def render_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"## {SECTION}",
        "",
        f"Device: **{r['device_name']}** (`{r['device']}`), torch {r['torch']}, "
        f"{r['date']}; `python -m bench gpu{' --small' if r['small'] else ''}` "
        f"({r['seconds']:.0f} s).",
        "",
        "### Correctness against the CPU engine",
        "",
        "| model | batch | bit-identical | argmax agreement | max rel. logit error | ok |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in r["correctness"]:
        lines.append(
            f"| {row['model']} | {row['batch']} | {'yes' if row['identical'] else 'no'} | "
            f"{row['argmax']:.4f} | {row['rel_error']:.2e} | {'✓' if row['ok'] else '✗'} |"
        )
    lines += ["", "| requested | device | backend | auto's reason |", "|---|---|---|---|"]
    for row in r["devices"]:
        reason = row["choice"]["reason"] if row["choice"] else ""
        lines.append(f"| {row['requested']} | {row['device']} | {row['backend']} | {reason} |")
    t = r["threads"]
    lines += [
        "",
        f"{t['threads']} threads sharing one model, {t['calls']} calls: "
        f"{t['mismatches']} outputs differed from the single-threaded ones.",
    ]
    for result in r["speed"]:
        names = [k for k in result["rows"][0] if k != "batch" and not k.endswith("peak bytes")]
        lines += [
            "",
            f"### {result['model']}: ms per call (median), peak device MiB",
            "",
            "| batch | " + " | ".join(names) + " | " + " | ".join(f"{n} MiB" for n in names) + " |",
            "|---:|" + "---:|" * (2 * len(names)),
        ]
        for row in result["rows"]:
            times = " | ".join(_ms(row.get(n)) for n in names)
            memory = " | ".join(_mb(row.get(f"{n} peak bytes")) for n in names)
            lines.append(f"| {row['batch']} | {times} | {memory} |")
        lines += ["", f"Profiled call at batch {result['profile_batch']}:", ""]
        for contender, p in result["profile"].items():
            lines.append(
                f"- {contender}: {p['kernels']} kernels/ops, {p['kernel_s'] * 1e3:.3f} ms in "
                f"them, {p['wall_s'] * 1e3:.3f} ms wall"
            )
        s = r["summary"][result["model"]]
        vs = s["vs_fp16_at_256"]
        lines += [
            "",
            f"bnnserve vs eager fp16 at batch 256: {'–' if vs is None else f'{vs:.2f}×'} "
            "(target ≥ 2×); ahead of the CPU engine from batch "
            f"{s['ahead_of_cpu_from'] or 'never (in the batches run)'}.",
        ]
    return "\n".join(lines) + "\n"


def run(device: str, small: bool) -> dict[str, Any]:
    import torch

    from model.engine.torch_backend import device_name

    started = time.perf_counter()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "small": small,
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print("correctness…", file=sys.stderr, flush=True)
        results["correctness"] = check_correctness(device, small, tmp)
        results["devices"] = check_devices(device, tmp)
        results["threads"] = check_threads(device, tmp)
        print("speed…", file=sys.stderr, flush=True)
        results["speed"] = bench_speed(device, small, tmp)
    results["summary"] = summary(results["speed"])
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0", help="cuda, cuda:N or cpu (default cuda:0)")
    parser.add_argument("--small", action="store_true", help="small models and batches (tests)")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument(
        "--legacy",
        metavar="REV",
        help="instead: time the torch backend on the CPU against its version at git REV",
    )
    args = parser.parse_args(argv)
    if args.legacy:
        legacy = compare_legacy(args.legacy)
        markdown = render_legacy(legacy)
        print(markdown)
        if args.write_docs:
            write_docs_section(markdown, title=LEGACY_SECTION)
        return 0
    results = run(args.device, args.small)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2))
    markdown = render_markdown(results)
    print(markdown)
    if args.write_docs:
        write_docs_section(markdown, title=SECTION)
    failed = [r for r in results["correctness"] if not r["ok"]]
    wrong_devices = [r for r in results["devices"] if r["argmax"] < 1.0]
    return 1 if failed or wrong_devices or results["threads"]["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
