"""``python -m training`` / ``bnn-train``: train and publish, evaluate, summarize.

    bnn-train train --arch mlp --dataset digits --repo models --name digits-mlp
    bnn-train evaluate --repo models --name digits-mlp            # newest version, its test split
    bnn-train summary --arch cnn --channels 32,64 --pool 0,1
    bnn-train export-onnx --repo models --name digits-mlp --out digits-mlp.onnx

``torchrun --nproc_per_node=N -m training train ...`` trains data-parallel in N processes
(:mod:`training.distributed`); rank 0 prints and publishes.

``train`` prints the model summary and the metrics, and the published version's directory as the
last line of stdout (the progress bar goes to stderr). Every usage or validation error is one line
on stderr and exit status 2; a failure of the artifact or repository is one line and status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from model.errors import BnnError, InvalidModelNameError, InvalidSpecError, ModelNotFoundError
from model.quantizers import INFERENCE_BINARIZERS, SIGN
from training.config import (
    ARCHITECTURE_NAMES,
    LR_SCHEDULES,
    OPTIMIZERS,
    ConfigError,
    TrainConfig,
)
from training.data import DATASETS, DataError
from training.recipes import BF16_MODES, DEFAULT_RECIPE, KEEP_EPOCHS, RECIPE_FIELDS, RECIPE_NAMES

# Parsing and --help import neither torch nor scikit-learn; the commands import what they use.
USAGE_ERRORS = (ConfigError, DataError, InvalidSpecError, InvalidModelNameError, ModelNotFoundError)
QUANTIZER_NAMES = tuple(INFERENCE_BINARIZERS)
KERNEL_QUANTIZER_NAMES = tuple(n for n, b in INFERENCE_BINARIZERS.items() if b is SIGN)
DEFAULTS = TrainConfig()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except USAGE_ERRORS as exc:
        args.parser.error(_one_line(exc))
    except BnnError as exc:
        print(f"{args.parser.prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="bnn-train",
        description="Train binarized neural networks, publish them as 1-bit packed artifacts, "
        "evaluate and summarize them. Nothing is downloaded: data sets are read from local disk.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train, evaluate on the test split and publish a new model version",
        description="Train a model, keep its best validation epoch or its last (--keep-epoch), "
        "evaluate it on the test split and publish it into a model repository "
        "(REPO/NAME/VERSION/). The published directory is the last line of stdout.",
    )
    _add_data_options(train)
    _add_model_options(train)
    _add_training_options(train)
    out = train.add_argument_group("output")
    out.add_argument(
        "--repo",
        type=Path,
        default=Path(os.environ.get("BNN_MODEL_REPO", "models")),
        help="model repository to publish into (default: $BNN_MODEL_REPO or ./models)",
    )
    out.add_argument("--name", help="model name to publish as (default: DATASET-ARCH)")
    out.add_argument("--no-publish", action="store_true", help="train and evaluate only")
    out.add_argument("--out", type=Path, help="also write metrics.json and curves.png here")
    out.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr (default: shown)"
    )
    train.set_defaults(handler=run_train, parser=train)

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy of a published artifact on a data set split",
        description="Rebuild the eager module from an artifact and report its accuracy. The "
        "data set and split options default to those recorded in the artifact's provenance, so "
        "'test' is the same test split the model was trained without.",
    )
    _add_artifact_options(evaluate)
    data = evaluate.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help="default: the artifact's data set")
    data.add_argument("--data-dir", type=Path, help="IDX directory or .npz file")
    data.add_argument("--split", choices=("test", "val", "train"), default="test")
    data.add_argument("--split-seed", type=int, help="default: the artifact's split seed")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.add_argument(
        "--threads", type=_positive_int, help="torch threads (default: every usable core)"
    )
    evaluate.set_defaults(handler=run_evaluate, parser=evaluate)

    summary = commands.add_parser(
        "summary",
        help="per-layer parameters, memory and MACs of an architecture or an artifact",
        description="A Larq-style summary: per layer the output shape, binary and "
        "full-precision parameters, memory and MACs; totals and the compression ratio against "
        "float32. Give an artifact (--artifact or --repo/--name) or an architecture (--arch and "
        "model options; the data set gives the input shape and the number of classes).",
    )
    _add_artifact_options(summary)
    _add_data_options(summary)
    _add_model_options(summary)
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    summary.set_defaults(handler=run_summary, parser=summary)

    export = commands.add_parser(
        "export-onnx",
        help="export a published artifact to ONNX (and a Triton model-repository entry)",
        description="Rebuild the float graph of an artifact (no training state needed) and "
        "write it as ONNX: opset >= 17, dynamic batch axis, input and output named as the "
        "service names them, labels and input spec in metadata_props. The graph is checked "
        "with onnx.checker and ONNX Runtime is compared with the bnnserve engine on random "
        "inputs before anything is written. Needs: pip install bnnserve[onnx].",
    )
    _add_artifact_options(export)
    out = export.add_argument_group("output")
    out.add_argument("--out", type=Path, help="ONNX file to write, e.g. model.onnx")
    out.add_argument(
        "--triton-repo",
        type=Path,
        help="also write a Triton entry: DIR/NAME/1/model.onnx, config.pbtxt and labels.txt",
    )
    out.add_argument(
        "--triton-max-batch", type=_positive_int, default=64,
        help="max_batch_size of the Triton config (default: %(default)s)",
    )  # fmt: skip
    out.add_argument(
        "--opset", type=int, default=18, help="ONNX opset, 17 or later (default: %(default)s)"
    )
    out.add_argument(
        "--verify", type=_natural_int, default=256, metavar="N",
        help="random inputs on which ONNX Runtime must match the engine; 0 skips "
        "(default: %(default)s)",
    )  # fmt: skip
    export.set_defaults(handler=run_export_onnx, parser=export)
    return parser


# --- commands ------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    from training.loop import train

    config = TrainConfig(
        arch=args.arch,
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=_model_config(args),
        out_dir=args.out,
        progress=not args.no_progress,
        recipe=args.recipe,
        device=args.device,
        **{field: getattr(args, field) for field, _, _ in TRAINING_OPTIONS},
    )
    name = args.name or f"{args.dataset}-{args.arch}"
    if not args.no_publish:
        from model.repository import validate_model_name

        validate_model_name(name)  # fail before training, not after
    from training.distributed import from_environment, shut_down

    distributed = from_environment()  # under torchrun: join the other processes
    try:
        if distributed.is_main:
            print(_describe_run(config, distributed), flush=True)
        result = train(config, distributed)
    finally:
        shut_down(distributed)
    if result is None:  # not rank 0: rank 0 reports and publishes
        return 0
    print(result.summary.to_text())
    print()
    print(result.data.describe())
    m = result.metrics
    print(
        f"kept epoch {m['kept_epoch']}/{m['epochs']} ({m['keep_epoch']}): "
        f"val accuracy {m['kept_val_accuracy']:.4f} (best: {m['best_val_accuracy']:.4f}, "
        f"epoch {m['best_epoch']}); "
        f"test accuracy {m['test_accuracy']:.4f} (loss {m['test_loss']:.4f}); "
        f"trained in {m['train_seconds']:.1f} s on {m['num_threads']} thread(s)"
        + (f" × {m['world_size']} processes ({m['backend']})" if m["world_size"] > 1 else "")
    )
    for path in result.files.values():
        print(f"wrote {path}")
    if args.no_publish:
        return 0
    from training.publish import publish_result

    version = publish_result(result, args.repo, name)
    print(f"published {version.name} version {version.version}")
    print(version.path)
    return 0


def _describe_run(config: TrainConfig, distributed: Any) -> str:
    """One line: what trains, with which recipe and settings, on which device and threads."""
    from training.runtime import resolve_runtime

    runtime = resolve_runtime(config, distributed)
    augment = [f"crop pad {config.augment_shift}"] if config.augment_shift else []
    augment += ["flip"] if config.augment_flip else []
    return (
        f"training {config.arch} on {config.dataset}, recipe {config.recipe}: "
        f"{config.epochs} epochs, batch {config.batch_size}, {config.optimizer} lr {config.lr:g} "
        f"{config.lr_schedule}"
        + (f" after {config.warmup_epochs} warm-up epoch(s)" if config.warmup_epochs else "")
        + f", augmentation {' + '.join(augment) or 'off'}"
        + (", compiled" if config.compile else "")
        + f"; {runtime.describe()}"
    )


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from model.artifact import read_artifact
    from model.cpus import usable_cores
    from training.data import load_dataset
    from training.export import module_from_artifact
    from training.loop import evaluate

    torch.set_num_threads(args.threads or usable_cores())
    path = _artifact_path(args)
    artifact = read_artifact(path)
    recorded = artifact.spec.provenance.get("config", {})
    dataset = args.dataset or artifact.spec.provenance.get("dataset") or "digits"
    if dataset not in DATASETS:  # e.g. an npz file's stem; its config names the loader
        dataset = recorded.get("dataset", "digits")
    data_dir = args.data_dir or recorded.get("data_dir")
    data = load_dataset(
        dataset,
        data_dir,
        val_fraction=recorded.get("val_fraction", DEFAULTS.val_fraction),
        test_fraction=recorded.get("test_fraction", DEFAULTS.test_fraction),
        seed=args.split_seed if args.split_seed is not None else recorded.get("split_seed", 0),
    )
    if data.input_shape != tuple(artifact.spec.input.shape):
        raise DataError(
            f"{data.name} inputs are {list(data.input_shape)} but the artifact expects "
            f"{list(artifact.spec.input.shape)}"
        )
    split = getattr(data, args.split)
    model = module_from_artifact(artifact)
    result = evaluate(model, split.x, split.y)
    if args.json:
        doc = {"artifact": str(path), "dataset": data.name, "split": args.split}
        print(
            json.dumps(
                doc | {"accuracy": result.accuracy, "loss": result.loss, "count": result.count}
            )
        )
    else:
        print(
            f"{path}: accuracy {result.accuracy:.4f} (loss {result.loss:.4f}) on "
            f"{result.count} {args.split} instances of {data.name}"
        )
    return 0


def run_summary(args: argparse.Namespace) -> int:
    from training.summary import summarize_model, summarize_spec

    if args.artifact or args.name:
        from model.artifact import read_artifact

        summary = summarize_spec(read_artifact(_artifact_path(args)).spec)
    else:
        from training.architectures import build_model, default_config
        from training.data import load_dataset

        data = load_dataset(args.dataset, args.data_dir)
        config = _model_config(args) or default_config(args.arch, args.dataset)
        model = build_model(config, data.input_shape, data.num_classes)
        summary = summarize_model(model, name=f"{args.dataset}-{args.arch}")
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.to_text())
    return 0


def run_export_onnx(args: argparse.Namespace) -> int:
    if args.out is None and args.triton_repo is None:
        raise ConfigError("give --out FILE.onnx, --triton-repo DIR or both")
    if args.opset < 17:
        raise ConfigError(f"--opset must be 17 or later, got {args.opset}")
    path = _artifact_path(args)
    from training.onnx_export import export_published

    report = export_published(
        path,
        out=args.out,
        triton_repo=args.triton_repo,
        version=_version_of(path),
        opset=args.opset,
        max_batch_size=args.triton_max_batch,
        verify_samples=args.verify,
    )
    print(report.to_text())
    return 0


# --- options -------------------------------------------------------------------------------------
def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        default=DEFAULTS.dataset,
        help="digits: scikit-learn's bundled 8x8 scans; mnist/fashion: IDX files in --data-dir; "
        "npz: a .npz file with x and y (default: %(default)s)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        help="directory with the IDX files, or the .npz file (fashion without it: "
        "/usr/share/datasets/fashion-mnist, from `apt-get install dataset-fashion-mnist`)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model", "architecture options; unset ones take the data set's defaults"
    )
    group.add_argument("--arch", choices=ARCHITECTURE_NAMES, default=DEFAULTS.arch)
    group.add_argument("--hidden", type=_widths, metavar="W[,W...]", help="hidden dense widths")
    group.add_argument(
        "--channels", type=_widths, metavar="C[,C...]",
        help="cnn: block widths; birealnet, reactnet: stage widths",
    )  # fmt: skip
    group.add_argument(
        "--stem-channels", type=_positive_int, help="cnn, birealnet, reactnet: first conv's width"
    )
    group.add_argument(
        "--blocks", type=_positive_int, help="birealnet, reactnet: residual blocks per stage"
    )
    group.add_argument(
        "--stem-kernel", type=_positive_int, help="birealnet, reactnet: stem conv's kernel size"
    )
    group.add_argument(
        "--stem-stride", type=_positive_int, help="birealnet, reactnet: stem conv's stride"
    )
    group.add_argument(
        "--pool",
        type=_flags,
        metavar="0|1[,...]",
        help="cnn: whether each block max-pools 2x2 (default with --channels: the last two do)",
    )
    group.add_argument(
        "--kernel-quantizer", choices=KERNEL_QUANTIZER_NAMES, help="binarizer of the weights"
    )
    group.add_argument(
        "--input-quantizer",
        choices=QUANTIZER_NAMES,
        help="binarizer of the hidden activations (input of every binary layer)",
    )
    group.add_argument(
        "--scale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="XNOR-Net per-channel scale alpha = mean|W| in binary layers",
    )
    group.add_argument(
        "--pad-value",
        type=float,
        choices=(1.0, -1.0, 0.0),
        help="cnn, birealnet, reactnet: value that binary convolutions pad with (+1 or -1; "
        "0 only for {0,1} inputs)",
    )


# (TrainConfig field, type, help) of each training option; the flag is --field-with-dashes.
# Recipe fields (training.recipes.RECIPE_FIELDS) default to the --recipe's values.
TRAINING_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("epochs", "positive", "passes over the training split"),
    ("batch_size", "positive", "training batch size"),
    ("lr", float, "Adam learning rate"),
    ("lr_schedule", LR_SCHEDULES, "per-step learning-rate schedule"),
    ("warmup_epochs", int, "epochs of linear learning-rate warm-up before the schedule"),
    ("lr_step_epochs", "positive", "step schedule: epochs between decays"),
    ("lr_gamma", float, "step schedule: decay factor"),
    ("weight_decay", float, "Adam weight decay"),
    ("optimizer", OPTIMIZERS, "adam: Adam on latent weights; bop: Bop flips binary weights, "
     "Adam for the rest"),
    ("bop_gamma", float, "Bop adaptivity rate"),
    ("bop_threshold", float, "Bop flip threshold tau"),
    ("label_smoothing", float, "cross-entropy label smoothing"),
    ("augment_shift", int, "random crop of the image zero-padded by N pixels (a shift by up to "
     "N) per training sample, 0 = off"),
    ("augment_flip", "flag", "mirror each training image left-right with probability 1/2"),
    ("keep_epoch", KEEP_EPOCHS, "the model is the epoch with the best validation accuracy, or "
     "the last epoch"),
    ("seed", int, "training seed: initialisation, shuffling, augmentation"),
    ("split_seed", int, "data split seed"),
    ("val_fraction", float, "validation share of the data"),
    ("test_fraction", float, "test share, where the data set has no test split of its own"),
    ("num_threads", "positive", "torch threads; default: every usable core (CPU affinity and "
     "cgroup quota)"),
    ("compile", "flag", "torch.compile the training steps (minutes to compile, then faster)"),
    ("bf16", BF16_MODES, "bf16 autocast of the training steps; auto: where the device computes "
     "bf16 natively (AVX-512 BF16, AMX, a bf16 GPU)"),
)  # fmt: skip


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "training", "unset options take the values of --recipe for the arch and data set"
    )
    group.add_argument(
        "--recipe",
        choices=RECIPE_NAMES,
        default=DEFAULT_RECIPE,
        help="full: the headline accuracy; fast: fewer epochs (docs/training.md, Recipes) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--device",
        default=DEFAULTS.device,
        help="auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N (default: %(default)s)",
    )
    for field, kind, help_text in TRAINING_OPTIONS:
        flag = "--threads" if field == "num_threads" else "--" + field.replace("_", "-")
        default = None if field in RECIPE_FIELDS else getattr(DEFAULTS, field)
        options: dict[str, Any] = {"dest": field, "default": default}
        if isinstance(kind, tuple):
            options["choices"] = kind
        elif kind == "flag":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _positive_int if kind == "positive" else kind
            options["metavar"] = "X" if kind is float else "N"
        shown = "from the recipe" if field in RECIPE_FIELDS else "%(default)s"
        if field == "num_threads":
            group.add_argument(flag, help=help_text, **options)
        else:
            group.add_argument(flag, help=f"{help_text} (default: {shown})", **options)


def _add_artifact_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "artifact", "an artifact file, or a published version: --repo and --name [--version]"
    )
    group.add_argument("--artifact", type=Path, help="path to a model.safetensors file")
    group.add_argument(
        "--repo", type=Path, default=Path(os.environ.get("BNN_MODEL_REPO", "models")),
        help="model repository (default: $BNN_MODEL_REPO or ./models)",
    )  # fmt: skip
    group.add_argument("--name", help="published model name")
    group.add_argument("--version", type=_positive_int, help="version (default: the newest)")


def _model_config(args: argparse.Namespace) -> Any:
    from training.config import model_config_from_options

    options = {
        "hidden": args.hidden,
        "channels": args.channels,
        "stem_channels": args.stem_channels,
        "blocks": args.blocks,
        "stem_kernel": args.stem_kernel,
        "stem_stride": args.stem_stride,
        "pool": args.pool,
        "kernel_quantizer": args.kernel_quantizer,
        "activation_quantizer": args.input_quantizer,
        "scale": args.scale,
        "pad_value": args.pad_value,
    }
    given = {key: value for key, value in options.items() if value is not None}
    if not given:
        return None
    fields = _fields_of(args.arch)
    unknown = [_flag(key) for key in given if key not in fields]
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} does not apply to --arch {args.arch}")
    if args.arch == "cnn" and "channels" in given and "pool" not in given:  # the last two pool
        n = len(given["channels"])
        given["pool"] = (False,) * max(0, n - 2) + (True,) * min(2, n)
    recipe = getattr(args, "recipe", DEFAULT_RECIPE)  # summary has no --recipe
    return model_config_from_options(args.arch, args.dataset, recipe=recipe, **given)


def _flag(field: str) -> str:
    return (
        "--input-quantizer" if field == "activation_quantizer" else "--" + field.replace("_", "-")
    )


def _fields_of(arch: str) -> set[str]:
    from dataclasses import fields

    from training.architectures import ARCHITECTURES

    return {f.name for f in fields(ARCHITECTURES[arch])}


def _artifact_path(args: argparse.Namespace) -> Path:
    if args.artifact is not None:
        if args.name is not None:
            raise ConfigError("give either --artifact or --name, not both")
        if not args.artifact.is_file():
            raise ModelNotFoundError(f"no artifact file at {args.artifact}")
        return args.artifact
    if args.name is None:
        raise ConfigError("give --artifact PATH or --name NAME (with --repo, --version)")
    from model.repository import resolve

    return resolve(args.repo, args.name, args.version).artifact_path


def _version_of(artifact_path: Path) -> int | None:
    """The version of a published artifact (REPO/NAME/VERSION/model.safetensors), else None."""
    from model.repository import parse_version

    try:
        return parse_version(artifact_path.parent.name)
    except BnnError:
        return None


# --- argument types ------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _natural_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 512,512, got {text!r}"
        ) from None


def _flags(text: str) -> tuple[bool, ...]:
    table = {"1": True, "0": False, "true": True, "false": False, "yes": True, "no": False}
    try:
        return tuple(table[part.strip().lower()] for part in text.split(","))
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated 0/1 flags like 0,1,1, got {text!r}"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
