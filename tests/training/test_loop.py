"""The training loop on tiny models: outputs, reproducibility, kept epoch, clipping, Bop."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from training.architectures import CNNConfig, MLPConfig
from training.config import ConfigError, TrainConfig
from training.layers import binary_parameters
from training.loop import evaluate, train

pytestmark = pytest.mark.slow  # trains models (left out of `make test-fast`)

TINY_MLP = MLPConfig(hidden=(32,))


def tiny(**overrides) -> TrainConfig:
    options = {"arch": "mlp", "model": TINY_MLP, "epochs": 2, "progress": False, "num_threads": 1}
    options |= overrides
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return train(tiny(epochs=3, keep_epoch="best", out_dir=tmp_path_factory.mktemp("run")))


def test_result_model_metrics_and_files(result):
    assert not result.model.training
    assert [e.epoch for e in result.history] == [1, 2, 3]
    metrics = result.metrics
    assert metrics["test_size"] == 360 and metrics["dataset"] == "digits"
    assert metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert metrics["train_seconds"] > 0 and 1 <= metrics["best_epoch"] <= 3
    # The reported test accuracy is the returned model's.
    test = evaluate(result.model, result.data.test.x, result.data.test.y)
    assert test.accuracy == metrics["test_accuracy"]
    doc = json.loads(result.files["metrics.json"].read_text())
    assert doc["metrics"] == pytest.approx(metrics)
    assert len(doc["history"]) == 3 and doc["config"]["model"]["hidden"] == [32]
    assert result.files["curves.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thread_count_is_the_configs_during_the_run_and_restored_after():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train(tiny(epochs=1, num_threads=1))
        assert result.metrics["num_threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_best_validation_epoch_is_restored(result):
    best = result.metrics["best_epoch"]
    accuracies = [e.val_accuracy for e in result.history]
    assert accuracies[best - 1] == max(accuracies)
    val = evaluate(result.model, result.data.val.x, result.data.val.y)
    assert val.accuracy == result.history[best - 1].val_accuracy
    assert val.loss == pytest.approx(result.history[best - 1].val_loss, rel=1e-5)


def test_best_validation_epoch_is_recorded_with_the_kept_one(result):
    metrics = result.metrics
    assert (metrics["keep_epoch"], metrics["kept_epoch"]) == ("best", metrics["best_epoch"])
    assert metrics["kept_val_accuracy"] == metrics["best_val_accuracy"]


def test_last_epoch_is_kept_when_asked_whatever_the_best_epoch():
    # lr 0.5, constant: the latent weights jump about, so the epochs' accuracies differ.
    config = tiny(epochs=4, keep_epoch="last", lr=0.5, lr_schedule="constant")
    last = train(config)
    assert (last.metrics["keep_epoch"], last.metrics["kept_epoch"]) == ("last", 4)
    val = evaluate(last.model, last.data.val.x, last.data.val.y)
    assert val.accuracy == last.history[-1].val_accuracy == last.metrics["kept_val_accuracy"]
    best = last.metrics["best_epoch"]
    assert last.history[best - 1].val_accuracy == max(e.val_accuracy for e in last.history)
    # The same run keeping its best epoch ends on that epoch's weights instead.
    kept_best = train(replace(config, keep_epoch="best"))
    assert kept_best.metrics["kept_epoch"] == best
    assert [e.val_accuracy for e in kept_best.history] == [e.val_accuracy for e in last.history]
    assert best != 4  # epoch 3 here: so the two runs must end on different weights
    state_best, state_last = kept_best.model.state_dict(), last.model.state_dict()
    assert any(not torch.equal(state_best[k], state_last[k]) for k in state_best)


def test_keep_epoch_must_be_best_or_last():
    with pytest.raises(ConfigError, match="keep_epoch must be one of best, last; got 'worst'"):
        tiny(keep_epoch="worst")


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = train(tiny(seed=7)), train(tiny(seed=7)), train(tiny(seed=8))
    state_a, state_b, state_c = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert [e.train_loss for e in a.history] == [e.train_loss for e in b.history]
    assert not torch.equal(state_a["layers.dense1.weight"], state_c["layers.dense1.weight"])


def test_latent_weights_stay_clipped_even_with_a_huge_learning_rate():
    # Adam moves each weight by ~lr per step: without clipping they would leave [−1, 1] at once.
    model = train(tiny(epochs=1, lr=0.5, lr_schedule="constant")).model
    weights = torch.cat([w.detach().flatten() for w in binary_parameters(model)])
    assert weights.abs().max() <= 1.0
    assert (weights.abs() == 1.0).float().mean() > 0.3  # many would have left


def test_bop_run_keeps_binary_weights_exactly_plus_minus_one():
    result = train(tiny(epochs=1, optimizer="bop", bop_gamma=1e-3))
    for weight in binary_parameters(result.model):
        assert set(weight.detach().unique().tolist()) <= {-1.0, 1.0}
    assert result.metrics["test_accuracy"] > 0.2


def test_tiny_cnn_trains():
    config = TrainConfig(
        arch="cnn",
        model=CNNConfig(stem_channels=4, channels=(8,), pool=(True,)),
        epochs=1,
        progress=False,
    )
    result = train(config)
    assert result.metrics["arch"] == "cnn" and result.metrics["test_accuracy"] > 0.2


def test_evaluate_counts_and_restores_the_mode():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    model.train()
    x = np.array([[1, 0], [0, 1], [1, 0], [3, 2]], dtype=np.float32)
    result = evaluate(model, x, np.array([0, 1, 1, 1]))
    assert result.accuracy == 0.5 and result.count == 4
    assert model.training


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"optimizer": "sgd"}, "optimizer must be one of adam, bop; got 'sgd'"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must be < 1"),
        ({"arch": "cnn"}, "arch='cnn' needs a CNNConfig as model, got MLPConfig"),
        ({"dataset": "imagenet"}, "dataset must be one of"),
        ({"compile": "yes"}, "compile must be true or false, got 'yes'"),
    ],
)
def test_config_errors_name_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_architecture_that_cannot_take_the_data_is_a_config_error(tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.random.rand(40, 7), y=np.arange(40) % 2)
    config = TrainConfig(arch="cnn", dataset="npz", data_dir=tmp_path / "flat.npz", epochs=1)
    with pytest.raises(ConfigError, match=r"cannot build cnn for flat: input \[7\]"):
        train(config)


def test_package_reexports_the_training_api():
    import training
    from training import loop, publish

    assert training.train is train and training.TrainConfig is TrainConfig
    assert training.publish_result is publish.publish_result and training.evaluate is loop.evaluate
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = training.nope


@pytest.mark.slow  # torch.compile: a minute or more of inductor compilation
def test_compiled_training_steps_train_the_eager_model():
    config = TrainConfig(arch="mlp", model=MLPConfig(hidden=(32,)), epochs=2, compile=True,
                         progress=False)  # fmt: skip
    result = train(config)
    assert result.metrics["test_accuracy"] > 0.5
    assert not hasattr(result.model, "_orig_mod")  # the published model is the eager one
