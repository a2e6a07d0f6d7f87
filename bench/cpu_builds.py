"""Kernels compiled for other CPUs: the engine's speed when built for ``haswell`` and
``generic`` x86-64 against the host build, side by side in one run.

numba compiles for the CPU it runs on unless ``NUMBA_CPU_NAME`` (and ``NUMBA_CPU_FEATURES``)
name another, so each build runs in its own worker process with its own kernel cache; the
parent asks the workers in turn (host, haswell, generic, host, …) to time the same calls, so
that this shared machine's slow and fast spells fall on every build alike; idle OpenMP workers
sleep (``OMP_WAIT_POLICY=PASSIVE``, as in the server). The models are the
engine benchmark's 784 → 3×4096 mlp (pixel and standard-normal float input) and CIFAR-shaped
cnn, at batch 1 and 64; every build's logits must equal the host's.

    python -m bench cpu_builds [--rounds 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.engine.warm import CPU_BUILDS as BUILDS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cpu_builds.json"
DOCS = ROOT / "docs" / "benchmarks.md"
TITLE = "Inference engine: kernels built for other CPUs"
CASES = (("mlp", "pixels"), ("mlp", "float"), ("cnn", "pixels"))
BATCHES = (1, 64)
TURN_S = 0.3  # timed calls per case and turn (at least one)


# --- worker: one build, in its own process --------------------------------------------------------
def worker_main(artifacts: dict[str, str]) -> None:
    """Answer each request line ``{"model", "input", "batch"}`` with the call times of one turn
    and the logits' checksum; "quit" ends."""
    from bench.engine import pixels
    from model import load_model

    models = {name: load_model(path) for name, path in artifacts.items()}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        case = json.loads(line)
        model = models[case["model"]]
        x = case_input(model.input_spec, case["input"], case["batch"], pixels)
        logits = model.predict(x)  # untimed: wakes the threads, fills the caches
        times = []
        until = time.perf_counter() + TURN_S
        while not times or time.perf_counter() < until:
            t0 = time.perf_counter()
            model.predict(x)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times, "logits": logits.tobytes().hex()}), flush=True)


def case_input(input_spec, kind: str, batch: int, pixels) -> np.ndarray:
    if kind == "pixels":
        return pixels(input_spec, batch, seed=batch)
    rng = np.random.default_rng(batch)
    return rng.standard_normal((batch, *input_spec.shape)).astype(np.float32)


class Build:
    """A worker process running the engine compiled for one CPU."""

    def __init__(self, name: str, artifacts: dict[str, Path], cache: Path) -> None:
        self.name = name
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CPU", "BNN_"))}
        env |= BUILDS.get(name, {}) | {"NUMBA_CACHE_DIR": str(cache)}
        # idle OpenMP workers sleep (as in the server), or the builds not being timed would spin
        # on the cores of the one that is
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        arguments = json.dumps({k: str(v) for k, v in artifacts.items()})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.cpu_builds", "--worker", arguments],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        if request:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"build {self.name}: worker exited ({self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(60)


def run(rounds: int) -> dict[str, Any]:
    from bench.engine import build_artifact, machine
    from model.spec import InputSpec
    from training.architectures import CNNConfig, MLPConfig

    results: dict[str, Any] = {"machine": machine(), "rounds": rounds, "rows": []}
    results["machine"]["load_average_at_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        mnist = InputSpec(shape=(1, 28, 28), value_range=(0.0, 255.0), integer_valued=True)
        cifar = InputSpec(shape=(3, 32, 32), value_range=(0.0, 255.0), integer_valued=True)
        cnn_config = CNNConfig(
            stem_channels=128,
            channels=(128, 256, 256, 256),
            pool=(True, False, True, True),
            hidden=(1024,),
        )  # fmt: skip (the engine benchmark's models)
        artifacts = {
            "mlp": build_artifact(MLPConfig(hidden=(4096, 4096, 4096)), mnist, Path(tmp) / "m.st"),
            "cnn": build_artifact(cnn_config, cifar, Path(tmp) / "c.st"),
        }
        builds = []
        try:
            for name in ("host", *BUILDS):  # one at a time: each compiles every kernel
                builds.append(Build(name, artifacts, Path(tmp) / f"cache-{name}"))
                builds[-1].ask({})
                print(f"{name} build ready", file=sys.stderr, flush=True)
            times: dict[tuple, list[float]] = {}
            logits: dict[tuple, str] = {}
            for _ in range(rounds):
                for model, kind in CASES:
                    for batch in BATCHES:
                        for build in builds:
                            request = {"model": model, "input": kind, "batch": batch}
                            answer = build.ask(request)
                            key = (build.name, model, kind, batch)
                            times.setdefault(key, []).extend(answer["times"])
                            logits[key] = answer["logits"]
        finally:
            for build in builds:
                build.close()
    for model, kind in CASES:
        for batch in BATCHES:
            row = {"model": model, "input": kind, "batch": batch}
            for build in builds:
                t = times[(build.name, model, kind, batch)]
                row[build.name] = {"median_s": statistics.median(t), "best_s": min(t)}
                row[f"{build.name}_identical"] = (
                    logits[(build.name, model, kind, batch)] == logits[("host", model, kind, batch)]
                )
            results["rows"].append(row)
    results["load_average_end"] = os.getloadavg()
    return results


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    names = ["host", *BUILDS]
    lines = [
        f"## {TITLE}",
        "",
        "`python -m bench cpu_builds` (bench/cpu_builds.py): each build in its own worker process "
        "and kernel cache (`NUMBA_CPU_NAME=haswell` with haswell's features, "
        "`NUMBA_CPU_NAME=generic`), asked in turn for "
        f"{results['rounds']} rounds of {TURN_S:g} s of calls per case; median (best) per call. "
        f"Machine: {m.get('cpu', 'unknown')}, {m.get('cores', os.cpu_count())} cores; load "
        "average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, at the end "
        f"{', '.join(f'{x:.2f}' for x in results['load_average_end'])}. Same logits as the "
        "host build: " + ("yes, in every row." if _all_identical(results) else "**no** (see JSON)."),
        "",
        "| model | input | batch | " + " | ".join(f"{n} build" for n in names)
        + " | haswell ÷ host | generic ÷ host |",
        "|---|---|---:|" + "---:|" * (len(names) + 2),
    ]  # fmt: skip
    for row in results["rows"]:
        cells = [f"{_ms(row[n]['median_s'])} ({_ms(row[n]['best_s'])})" for n in names]
        host = row["host"]["median_s"]
        ratios = [f"{row[n]['median_s'] / host:.2f}×" for n in BUILDS]
        lines.append(
            f"| {row['model']} | {row['input']} | {row['batch']} | " + " | ".join(cells + ratios)
            + " |"
        )  # fmt: skip
    return "\n".join([*lines, ""])


def _all_identical(results: dict[str, Any]) -> bool:
    return all(row[f"{n}_identical"] for row in results["rows"] for n in BUILDS)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cpu_builds", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="turns per build and case")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # (internal) artifacts as JSON
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    results = run(args.rounds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    markdown = render_markdown(results)
    print(markdown)
    if args.write_docs:
        from bench.engine import write_docs_section

        write_docs_section(markdown, DOCS, title=TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
