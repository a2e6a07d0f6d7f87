"""The command line: help, one-line errors with status 2, train → publish → evaluate → summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.cpus import usable_cores
from training.cli import build_parser, main
from training.config import TrainConfig
from training.runtime import resolve_device

pytestmark = pytest.mark.slow  # trains models (left out of `make test-fast`)

ROOT = Path(__file__).resolve().parents[2]


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of ``main(argv)``."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_module_entry_point_prints_help():
    done = subprocess.run(
        [sys.executable, "-m", "training", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    for command in ("train", "evaluate", "summary"):
        assert command in done.stdout


def test_train_help_lists_every_option(capsys):
    status, out, _ = run_main(["train", "--help"], capsys)
    assert status == 0
    for option in (
        "--arch", "--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--optimizer",
        "--seed", "--hidden", "--channels", "--kernel-quantizer", "--input-quantizer",
        "--scale", "--pad-value", "--repo", "--name", "--out", "--no-progress",
    ):  # fmt: skip
        assert option in out, option


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["train", "--arch", "rnn"], "argument --arch: invalid choice: 'rnn'"),
        (["train", "--hidden", "64,x"], "expected comma-separated positive integers"),
        (["train", "--channels", "8,16"], "--channels does not apply to --arch mlp"),
        (["train", "--lr", "-1", "--no-progress"], "lr must be a positive number"),
        (["train", "--name", "../escape"], "invalid model name '../escape'"),
        (["train", "--dataset", "mnist"], "data set 'mnist' needs --data-dir"),
        (["train", "--arch", "cnn", "--pad-value", "0"], "pad_value=0.0 is not a value of"),
        (["evaluate"], "give --artifact PATH or --name NAME"),
        (["summary", "--arch", "cnn", "--pool", "maybe"], "expected comma-separated 0/1 flags"),
        (["summary", "--arch", "cnn", "--blocks", "2"], "--blocks does not apply to --arch cnn"),
        (["summary", "--arch", "reactnet", "--stem-kernel", "2"], "stem_kernel must be odd"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(argv, message, capsys, tmp_path):
    if argv and argv[0] == "train":  # publish, if it ever got that far, into tmp_path
        argv = [argv[0], "--repo", str(tmp_path), *argv[1:]]
    status, _, err = run_main(argv, capsys)
    assert status == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("bnn-train")
    assert not list(tmp_path.iterdir())  # nothing published


def test_missing_published_model_is_a_usage_error(capsys, tmp_path):
    status, _, err = run_main(["evaluate", "--repo", str(tmp_path), "--name", "nope"], capsys)
    assert status == 2 and "model 'nope' has no published versions" in err


def test_corrupt_artifact_is_one_line_and_status_1(capsys, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    status, _, err = run_main(["summary", "--artifact", str(path)], capsys)
    assert status == 1 and "not a safetensors file" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Train and publish a tiny model through the CLI once: (repo, stdout)."""
    repo = tmp_path_factory.mktemp("repo")
    out_dir = tmp_path_factory.mktemp("out")
    argv = [
        "train", "--arch", "mlp", "--hidden", "32", "--epochs", "2", "--repo", str(repo),
        "--name", "digits-mlp", "--out", str(out_dir), "--no-progress",
    ]  # fmt: skip
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return repo, out_dir, stdout.getvalue()


def test_train_prints_summary_then_the_published_path_last(published):
    repo, out_dir, stdout = published
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("training mlp on digits, recipe full: 2 epochs, batch 64, adam")
    threads = f"{usable_cores()} thread" + "s" * (usable_cores() > 1)
    assert lines[0].endswith(f"device {resolve_device('auto')}, {threads}")
    assert Path(lines[-1]) == repo / "digits-mlp" / "1"
    assert (Path(lines[-1]) / "model.safetensors").is_file()
    assert "Compression ratio vs float32" in stdout and "test accuracy" in stdout
    assert (out_dir / "metrics.json").is_file() and (out_dir / "curves.png").is_file()


def test_evaluate_published_model_matches_training_metrics(published, capsys):
    repo, out_dir, _ = published
    status, out, _ = run_main(
        ["evaluate", "--repo", str(repo), "--name", "digits-mlp", "--json"], capsys
    )
    assert status == 0
    report = json.loads(out)
    metrics = json.loads((out_dir / "metrics.json").read_text())["metrics"]
    assert report["split"] == "test" and report["count"] == 360
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_summary_of_artifact_and_of_architecture(published, capsys):
    repo, _, _ = published
    status, out, _ = run_main(
        ["summary", "--artifact", str(repo / "digits-mlp" / "1" / "model.safetensors"), "--json"],
        capsys,
    )
    assert status == 0 and json.loads(out)["totals"]["binary_params"] == 64 * 32
    status, out, _ = run_main(["summary", "--arch", "cnn", "--channels", "8,16"], capsys)
    assert status == 0
    assert "conv2 (conv2d)" in out and "pool2 (maxpool2d)" in out and "Compression ratio" in out


def test_summary_of_residual_architectures(capsys):
    status, out, _ = run_main(["summary", "--arch", "reactnet"], capsys)  # digits defaults
    assert status == 0
    assert "s1b1_rsign (shift)" in out and "s1b0_pool (avgpool2d)" in out
    assert "s1b1_rp (prelu)" in out and "pool (global_avgpool2d)" in out
    status, out, _ = run_main(
        ["summary", "--arch", "birealnet", "--channels", "8,16,32", "--blocks", "1", "--json"],
        capsys,
    )
    names = [layer["name"] for layer in json.loads(out)["layers"]]
    assert status == 0 and "s2b0_down" in names and "s1b1_conv" not in names


def test_cli_choices_match_the_registries():
    from training.architectures import ARCHITECTURES
    from training.config import ARCHITECTURE_NAMES
    from training.quantizers import QUANTIZERS

    assert set(ARCHITECTURE_NAMES) == set(ARCHITECTURES)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: a.choices for a in train._actions if a.choices}
    assert set(choices["input_quantizer"]) == set(QUANTIZERS)
    assert set(choices["kernel_quantizer"]) == set(QUANTIZERS) - {"stochastic_binary"}


def test_parser_defaults_match_the_make_target():
    args = build_parser().parse_args(["train"])
    assert (args.arch, args.dataset, args.recipe) == ("mlp", "digits", "full")
    assert args.optimizer is None  # left to the recipe, which says adam
    assert TrainConfig(arch=args.arch, dataset=args.dataset).optimizer == "adam"


def test_fashion_without_package_or_data_dir_says_how_to_install(capsys, tmp_path, monkeypatch):
    from training.data import PACKAGED_DATASETS, PackagedDataset

    absent = PackagedDataset(tmp_path / "absent", "dataset-fashion-mnist")
    monkeypatch.setitem(PACKAGED_DATASETS, "fashion", absent)
    status, _, err = run_main(["train", "--dataset", "fashion", "--no-publish"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir DIR" in err


def test_compile_flag_reaches_the_config():
    train = build_parser().parse_args(["train", "--compile"])
    assert train.compile is True
    assert build_parser().parse_args(["train", "--no-compile"]).compile is False
    assert build_parser().parse_args(["train"]).compile is None  # the recipe's
