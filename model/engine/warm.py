"""Compile and cache every CPU kernel ahead of time: ``python -m model.engine.warm [PATH ...]``.

numba compiles a kernel the first time it runs with a given type signature and, with
``cache=True``, stores the machine code in the kernel cache (``BNN_KERNEL_CACHE_DIR``). The
serving image runs this at build time so that a container's first request does not pay for
compilation. The signatures do not depend on layer sizes, so two small synthetic graphs — an
mlp (integer and real inputs, ±1 and {0,1} activations, α scales) and a cnn (full-precision
first convolution, binary convolutions padded with +1 and −1, max-pooling) — reach every
kernel, each run at batches small enough for the serial kernels, at the smallest batch past them
(:func:`model.engine.dispatch.serial_rows`: the helper team's kernels for the mlps, the parallel ones
for the cnn) and at the smallest one past the team's (the parallel ones). Artifacts or version
directories named on the command line are warmed too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from model.artifact import ARTIFACT_FILENAME, write_artifact
from model.packing import pack_signs
from model.spec import BatchNorm, Conv2d, Dense, Flatten, InputSpec, Layer, MaxPool2d, ModelSpec

LABELS = ("a", "b", "c")


def synthetic_specs() -> list[ModelSpec]:
    """Small graphs that together use every layer kind, quantizer family and input path."""
    mlp = (
        Flatten("flatten"),
        Dense("fc1", 48, 70, kernel_quantizer="ste_sign", bias=False, scale=True),
        BatchNorm("bn1", 70),
        Dense("fc2", 70, 40, "stochastic_binary", "ste_sign", bias=False),
        BatchNorm("bn2", 40),
        Dense("out", 40, 3, "ste_sign"),
    )
    cnn = (
        Conv2d("conv0", 3, 8, pad_value=0.0),
        BatchNorm("bn0", 8),
        Conv2d("conv1", 8, 70, input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
        MaxPool2d("pool1"),
        BatchNorm("bn1", 70),
        Conv2d(
            "conv2",
            70,
            16,
            pad_value=-1.0,
            input_quantizer="ste_sign",
            kernel_quantizer="ste_sign",
            bias=False,
            scale=True,
        ),
        BatchNorm("bn2", 16),
        Flatten("flatten"),
        Dense("fc", 16 * 3 * 3, 3, "ste_sign"),
    )
    return [
        _spec("warm-mlp-int", (3, 4, 4), mlp, integer_valued=True),
        _spec("warm-mlp-real", (3, 4, 4), mlp, integer_valued=False),
        _spec("warm-cnn", (3, 6, 6), cnn, integer_valued=True),
    ]


def random_tensors(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights and BatchNorm statistics of the right shapes (binary weights packed)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, want in spec.expected_tensors().items():
        if want.logical_shape is not None:
            tensors[name] = pack_signs(rng.standard_normal(want.logical_shape), axis=1)
        elif name.endswith("running_var"):
            tensors[name] = (rng.random(want.shape) + 0.5).astype(np.float32)
        else:
            tensors[name] = rng.standard_normal(want.shape).astype(np.float32)
    return tensors


def warm(paths: list[Path], scratch: Path) -> list[tuple[str, float]]:
    """Load and warm the synthetic graphs and every artifact in ``paths``; (name, seconds) each."""
    from model.engine import load_model
    from model.engine.dispatch import TEAM_WORK_LIMIT, rows_below, serial_rows

    scratch.mkdir(parents=True, exist_ok=True)
    targets = []
    for spec in synthetic_specs():
        path = scratch / f"{spec.name}.safetensors"
        write_artifact(path, spec, random_tensors(spec))
        targets.append(path)
    targets += [artifact for path in paths for artifact in _artifacts_under(path)]
    timings = []
    for path in targets:
        # a few rows per call here; the server checks its own memory limit when it loads
        model = load_model(path, device="cpu", memory_limit=None)
        # small batches run the serial kernels, serial_rows and more the helper team's (dense
        # models) or the parallel ones, and a dense model's calls past TEAM_WORK_LIMIT the
        # parallel ones
        program = model.program
        batch_sizes = (1, 3, serial_rows(program), rows_below(program, TEAM_WORK_LIMIT))
        timings.append((str(path), model.warmup(batch_sizes=batch_sizes)))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.engine.warm", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "paths", nargs="*", type=Path, help="artifacts, version directories or repositories"
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path("/tmp/bnnserve-warm"),
        help="where the synthetic artifacts are written (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for name, seconds in warm(args.paths, args.scratch):
        print(f"warmed {name} in {seconds:.2f}s")
    print(f"kernel cache ready in {time.perf_counter() - start:.1f}s")
    return 0


def _spec(
    name: str, shape: tuple[int, ...], layers: tuple[Layer, ...], *, integer_valued: bool
) -> ModelSpec:
    value_range = (0.0, 255.0) if integer_valued else (-1.0, 1.0)
    return ModelSpec(
        name=name,
        architecture="synthetic",
        input=InputSpec(shape=shape, value_range=value_range, integer_valued=integer_valued),
        labels=LABELS,
        layers=layers,
    )


def _artifacts_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.rglob(ARTIFACT_FILENAME))


if __name__ == "__main__":
    sys.exit(main())
