"""ONNX export benchmark: ONNX Runtime on the exported float graph vs the bnnserve engine.

For the digits ``mlp`` and ``cnn`` (default configs) and BinaryNet's 784 → 3×4096 ``mlp``, built
with random weights and calibrated BatchNorm (:func:`bench.engine.build_artifact`), in one run on
this machine:

* latency per batch (1 and 64) of ``load_model(...).predict`` and of an ONNX Runtime CPU
  session (default options: all graph optimizations, its default thread count) on the graph
  ``bnn-train export-onnx`` writes, measured in alternating turns (:func:`timed_together`);
* agreement of the two (same class, largest logit error relative to each row's largest);
* file size of the ONNX model against the 1-bit artifact, and resident weight memory.

``python -m bench onnx [--write-docs] [--quick]`` prints a Markdown report, writes JSON to
``bench/results/onnx.json`` and, with ``--write-docs``, the "## ONNX Runtime" section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine import (
    ROOT,
    build_artifact,
    machine,
    pixels,
    report,
    timed_together,
    timing_arguments,
)

RESULTS = ROOT / "bench" / "results" / "onnx.json"
SECTION = "ONNX Runtime"
BATCHES = (1, 64)


def bench_export(path: Path, budget_s: float) -> dict[str, Any]:
    """Export the artifact at ``path``, then time engine and ONNX Runtime side by side."""
    import onnxruntime

    from model import load_model
    from training.onnx_export import export_artifact_to_onnx

    start = time.perf_counter()
    artifact, proto = export_artifact_to_onnx(path)
    export_s = time.perf_counter() - start
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    engine = load_model(path)
    engine.warmup(batch_sizes=BATCHES)
    rows = []
    for batch in BATCHES:
        x = pixels(artifact.spec.input, batch, seed=batch)
        feed = {session.get_inputs()[0].name: x}
        measured = timed_together(
            {
                "engine": lambda x=x: engine.predict(x),
                "onnxruntime": lambda f=feed: session.run(None, f),
            },
            budget_s=budget_s,
        )
        got, want = session.run(None, feed)[0], engine.predict(x)
        scale = abs(want).max(axis=1, keepdims=True)
        rows.append(
            {
                "batch": batch,
                "engine": measured["engine"],
                "onnxruntime": measured["onnxruntime"],
                "ratio": measured["onnxruntime"]["median_s"] / measured["engine"]["median_s"],
                "same_class": int((got.argmax(1) == want.argmax(1)).sum()),
                "max_rel_logit_error": float((abs(got - want) / scale).max()),
            }
        )
    return {
        "artifact_bytes": path.stat().st_size,
        "onnx_bytes": len(data),
        "onnx_nodes": len(proto.graph.node),
        "engine_memory_bytes": engine.memory_bytes,
        "export_seconds": export_s,
        "batches": rows,
    }


def run(quick: bool = False) -> dict[str, Any]:
    from model import InputSpec
    from training.architectures import MLPConfig, default_config

    budget = 0.3 if quick else 2.0
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "machine": machine(),
    }
    import onnxruntime

    results["machine"]["onnxruntime"] = onnxruntime.__version__
    digits = InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True)
    mnist = InputSpec(shape=(1, 28, 28), value_range=(0.0, 255.0), integer_valued=True)
    models = {
        "digits mlp": (default_config("mlp", "digits"), digits),
        "digits cnn": (default_config("cnn", "digits"), digits),
        "784→3×4096 mlp": (MLPConfig(hidden=(4096, 4096, 4096)), mnist),
    }
    results["models"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (config, spec)) in enumerate(models.items()):
            print(f"{name}…", file=sys.stderr, flush=True)
            path = build_artifact(config, spec, Path(tmp) / f"model{i}.safetensors")
            results["models"][name] = bench_export(path, budget)
    results["load_average_end"] = os.getloadavg()
    return results


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"## {SECTION}",
        "",
        "`python -m bench onnx` (bench/onnx_runtime.py): the graph `bnn-train export-onnx` "
        "writes, run by ONNX Runtime's CPU execution provider (default session options), against "
        "the bnnserve engine on the same artifact, both given float32 pixels, timed in "
        "alternating turns in one run. Random weights, calibrated BatchNorm (same shapes and "
        "cost as trained models).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, numba threads {m['numba_threads']}; "
        f"{r['date']}; load average at start "
        f"{', '.join(f'{v:.2f}' for v in r['load_average_start'])}, at the end "
        f"{', '.join(f'{v:.2f}' for v in r['load_average_end'])} (a machine shared with other "
        "work: ratios from one run are what to compare, not absolute times).",
        "",
        "| model | batch | bnnserve engine | ONNX Runtime (float graph) | ONNX Runtime / engine "
        "| same class | max rel. logit error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, model in r["models"].items():
        for row in model["batches"]:
            lines.append(
                f"| {name} | {row['batch']} | {_time(row['engine']['median_s'])} | "
                f"{_time(row['onnxruntime']['median_s'])} | {row['ratio']:.1f}× | "
                f"{row['same_class']}/{row['batch']} | {row['max_rel_logit_error']:.1e} |"
            )
    lines += [
        "",
        "Times are medians per call; a ratio above 1× is how many times longer ONNX Runtime "
        "takes than the engine on the same batch. ONNX Runtime runs the binary layers as float "
        "GEMMs and convolutions on ±1 float32 weights; the engine runs XNOR-popcount on packed "
        "bits with BatchNorm and sign folded into integer thresholds. Size on disk and in memory:",
        "",
        "| model | artifact (1-bit) | ONNX (float32) | ONNX / artifact | engine weights in memory "
        "| ONNX nodes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, model in r["models"].items():
        lines.append(
            f"| {name} | {_bytes(model['artifact_bytes'])} | {_bytes(model['onnx_bytes'])} | "
            f"{model['onnx_bytes'] / model['artifact_bytes']:.1f}× | "
            f"{_bytes(model['engine_memory_bytes'])} | {model['onnx_nodes']} |"
        )
    return "\n".join(lines) + "\n"


def _time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _bytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    args = timing_arguments("python -m bench onnx", __doc__, argv)
    results = run(quick=args.quick)
    markdown = render_markdown(results)
    report(results, RESULTS, markdown, title=SECTION, write_docs=args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
