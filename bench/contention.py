"""Per-call latency of a large call under a busy neighbour: OpenMP only vs serial only vs the
engine's measured dispatch (:mod:`model.engine.measured`), side by side in one run.

The model is the 784 → 3×4096 binary mlp (uint8-range pixels), at batch 1 and 64, on one
executor. Per call it times ``executor.run(x, PARALLEL)`` (OpenMP kernels, as the engine ran
every large call before), ``executor.run(x, SERIAL)`` and ``executor.run(x)`` (the measured
choice), alternating the three in blocks of ``--block`` calls, and reports the median, p90 and
p99 of each. It does this twice: with a *neighbour* (a child process this benchmark starts,
doing 2-thread float64 matmuls through numpy's BLAS on every core for as long as the section
runs) and without one::

    python -m bench contention [--calls 400] [--batches 1 64] [--block 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

NEIGHBOUR = """
import numpy as np
a = np.random.default_rng(0).standard_normal((768, 768))
while True:
    a = np.tanh(a @ a.T * 1e-3)
"""
MODES = ("openmp", "serial", "measured")


def start_neighbour(threads: int) -> subprocess.Popen:
    """A child doing ``threads``-thread BLAS matmuls until it is terminated."""
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    child = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)
    time.sleep(1.0)  # let it start its threads
    return child


def stop(child: subprocess.Popen) -> None:
    child.terminate()
    child.wait(timeout=30)


def time_modes(calls: Mapping[str, Callable[[], object]], count: int, block: int) -> dict:
    """Seconds per call of each mode: ``count`` calls each, in alternating blocks."""
    times: dict[str, list[float]] = {mode: [] for mode in calls}
    while min(len(t) for t in times.values()) < count:
        for mode, call in calls.items():
            for _ in range(block):
                started = time.perf_counter()
                call()
                times[mode].append(time.perf_counter() - started)
    return times


def summary(seconds: list[float]) -> tuple[float, float, float]:
    """(median, p90, p99) in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    return tuple(float(np.percentile(ms, q)) for q in (50, 90, 99))  # type: ignore[return-value]


def run(calls: int, batches: list[int], block: int) -> list[dict]:
    from bench.engine import build_artifact
    from model import load_model
    from model.engine.cpu import NumbaExecutor
    from model.engine.kernels import PARALLEL, SERIAL
    from model.spec import InputSpec
    from training.architectures import MLPConfig

    mnist = InputSpec(shape=(1, 28, 28), value_range=(0.0, 255.0), integer_valued=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_artifact(MLPConfig(hidden=(4096, 4096, 4096)), mnist, Path(tmp) / "mlp.st")
        model = load_model(path, device="cpu")
    executor = model._executor
    assert isinstance(executor, NumbaExecutor)
    choice = executor._dispatch.measured
    ran: dict[str, int] = {}
    record = choice.record

    def counting_record(batch: int, kind: str, seconds: float) -> None:
        ran[kind] = ran.get(kind, 0) + 1
        record(batch, kind, seconds)

    choice.record = counting_record  # type: ignore[method-assign]
    rows = []
    for neighbour in (True, False):
        child = start_neighbour(2) if neighbour else None
        try:
            for batch in batches:
                rng = np.random.default_rng(batch)
                x = model.check_input(rng.integers(0, 256, (batch, 1, 28, 28)).astype(np.uint8))
                modes = {
                    "openmp": lambda x=x: executor.run(x, PARALLEL),
                    "serial": lambda x=x: executor.run(x, SERIAL),
                    "measured": lambda x=x: executor.run(x),
                }
                for call in modes.values():  # warm up
                    for _ in range(3):
                        call()
                ran.clear()
                count = calls if batch < 16 else max(calls // 8, 40)
                times = time_modes(modes, count, block if batch < 16 else max(block // 4, 5))
                load = os.getloadavg()[0]
                estimates = executor._dispatch.measured.estimates(batch)
                for mode in MODES:
                    median, p90, p99 = summary(times[mode])
                    rows.append(
                        dict(
                            neighbour=neighbour, batch=batch, mode=mode, calls=len(times[mode]),
                            median=median, p90=p90, p99=p99, load=load,
                        )
                    )  # fmt: skip
                print(
                    f"neighbour={neighbour} batch={batch} load={load:.1f} "
                    f"measured estimates (ms/row): "
                    + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in estimates.items() if v)
                    + f"; measured calls ran {ran}",
                    flush=True,
                )
        finally:
            if child is not None:
                stop(child)
    return rows


def render_markdown(rows: list[dict]) -> str:
    lines = [
        "| neighbour | batch | kernels | calls | median ms | p90 ms | p99 ms | load (1 min) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'busy' if r['neighbour'] else 'none'} | {r['batch']} | {r['mode']} | "
            f"{r['calls']} | {r['median']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} | "
            f"{r['load']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench contention", description=__doc__)
    parser.add_argument("--calls", type=int, default=400, help="calls per mode at batch < 16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--block", type=int, default=20, help="calls per mode in a row")
    args = parser.parse_args(argv)
    from bench.engine import machine

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, numba threads "
          f"{info['numba_threads']} ({info['threading_layer']}), load {info['load_average']}")  # fmt: skip
    rows = run(args.calls, args.batches, args.block)
    print(render_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
