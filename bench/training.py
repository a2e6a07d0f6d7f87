"""Training throughput on CPU: images per second of one training step, per architecture and
per option, measured side by side.

A step is what :mod:`training.loop` does per batch: forward, cross-entropy, backward, Adam,
clipping of the latent weights; on random Fashion-MNIST-shaped batches (1×28×28, 10 classes,
pixels 0..255) already in memory, so data loading is not measured. Each variant changes one
thing against the baseline (eager, NCHW, float32, batch 64, one thread):

* ``batch256`` — a larger batch (fewer, larger GEMMs);
* ``channels_last`` — model and batches in NHWC memory format (oneDNN's preferred layout);
* ``bf16`` — ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss;
* ``compile`` — ``torch.compile(model)`` (inductor, compiled once before timing);
* ``threads2`` — two torch threads;
* ``recipe`` — what the residual nets' Fashion-MNIST recipes run: batch 128, two threads,
  compiled; ``recipe_bf16``, ``recipe_channels_last`` and ``recipe_bf16_channels_last`` add
  those options to it (compare them with ``--baseline recipe``, on wall time: two threads).

Variants run in alternating turns (``rounds`` rounds of ``steps`` steps each) so that load
from other processes falls on all of them alike; the report gives the median over rounds of
images per wall second and images per CPU second of this process (CPU time counts every thread,
so it is the fairer measure on a shared machine, except for ``threads2``, which needs wall time).

``python -m bench training [--archs mlp,cnn,birealnet,reactnet] [--variants ...] [--rounds N]
[--steps N]`` prints a Markdown table and writes JSON to ``bench/results/training.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "training.json"
SHAPE = (1, 28, 28)
CLASSES = 10
VARIANTS = ("baseline", "batch256", "channels_last", "bf16", "compile", "threads2")
RECIPE_VARIANTS = ("recipe", "recipe_bf16", "recipe_channels_last", "recipe_bf16_channels_last")
ARCHS = ("mlp", "cnn", "birealnet", "reactnet")


@dataclass
class Variant:
    name: str
    batch: int = 64
    threads: int = 1
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False


VARIANT_OPTIONS = {
    "baseline": Variant("baseline"),
    "batch256": Variant("batch256", batch=256),
    "channels_last": Variant("channels_last", channels_last=True),
    "bf16": Variant("bf16", bf16=True),
    "compile": Variant("compile", compile=True),
    "threads2": Variant("threads2", threads=2),
    **{
        name: Variant(
            name,
            batch=128,
            threads=2,
            compile=True,
            bf16="bf16" in name,
            channels_last="channels_last" in name,
        )
        for name in RECIPE_VARIANTS
    },
}


def make_step(arch: str, variant: Variant, seed: int = 0) -> Callable[[], None]:
    """One training step of ``arch`` (the Fashion-MNIST default config) under ``variant``."""
    import torch
    import torch.nn.functional as F

    from training.architectures import build_model, default_config
    from training.layers import clip_latent_weights

    torch.manual_seed(seed)
    model = build_model(default_config(arch, "fashion"), SHAPE, CLASSES).train()
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if variant.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (variant.batch, *SHAPE), generator=generator).float()
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES, (variant.batch,), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if variant.bf16
            else contextlib.nullcontext()
        )
        with autocast:
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)

    return step


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(archs: list[str], variants: list[str], rounds: int, steps: int) -> list[dict]:
    """Median images/s (wall and CPU) per (arch, variant), variants alternating per round."""
    rows = []
    for arch in archs:
        chosen = [VARIANT_OPTIONS[v] for v in variants]
        steps_of: dict[str, Callable[[], None]] = {}
        setup: dict[str, float] = {}
        for variant in chosen:
            with torch_threads(variant.threads):
                start = time.perf_counter()
                try:
                    steps_of[variant.name] = make_step(arch, variant)
                    steps_of[variant.name]()  # warm-up (compiles under torch.compile)
                except Exception as exc:  # an option that does not work here is reported
                    print(f"{arch} {variant.name}: fails: {type(exc).__name__}: {exc}"[:300])
                    continue
                setup[variant.name] = time.perf_counter() - start
        wall: dict[str, list[float]] = {v: [] for v in steps_of}
        cpu: dict[str, list[float]] = {v: [] for v in steps_of}
        for _ in range(rounds):
            for variant in chosen:
                if variant.name not in steps_of:
                    continue
                with torch_threads(variant.threads):
                    w0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(steps):
                        steps_of[variant.name]()
                    w, c = time.perf_counter() - w0, time.process_time() - c0
                images = steps * variant.batch
                wall[variant.name].append(images / w)
                cpu[variant.name].append(images / c)
        for variant in chosen:
            if variant.name not in steps_of:
                rows.append({"arch": arch, "variant": variant.name, "works": False})
                continue
            row = {
                "arch": arch,
                "variant": variant.name,
                "works": True,
                "images_per_s": statistics.median(wall[variant.name]),
                "images_per_cpu_s": statistics.median(cpu[variant.name]),
                "setup_s": setup[variant.name],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg(),
    }


def to_markdown(rows: list[dict], baseline_variant: str = "baseline") -> str:
    baseline = {r["arch"]: r for r in rows if r["variant"] == baseline_variant and r["works"]}
    lines = [
        f"| arch | option | images/s (wall) | images/CPU-s | vs {baseline_variant} (CPU-s) "
        f"| vs {baseline_variant} (wall) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["works"]:
            lines.append(f"| {r['arch']} | {r['variant']} | fails | | | |")
            continue
        base = baseline.get(r["arch"])
        cpu = f"{r['images_per_cpu_s'] / base['images_per_cpu_s']:.2f}x" if base else ""
        wall = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else ""
        lines.append(
            f"| {r['arch']} | {r['variant']} | {r['images_per_s']:.0f} | "
            f"{r['images_per_cpu_s']:.0f} | {cpu} | {wall} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench training", description=__doc__)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--baseline", default="baseline", help="the variant ratios are against")
    args = parser.parse_args(argv)
    archs, variants = args.archs.split(","), args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANT_OPTIONS)) + sorted(set(archs) - set(ARCHS))
    if unknown:
        print(f"python -m bench training: unknown {unknown}", file=sys.stderr)
        return 2
    if args.baseline not in variants:
        print(
            f"python -m bench training: --baseline {args.baseline} is not among the measured "
            f"--variants {args.variants}",
            file=sys.stderr,
        )
        return 2
    before = machine()
    rows = measure(archs, variants, args.rounds, args.steps)
    report = {"machine": before, "load_average_after": os.getloadavg(), "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(to_markdown(rows, args.baseline))
    print(f"load average before {before['load_average']}, after {report['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
