"""Bop against a hand computation, the optimizer split, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from training.architectures import MLPConfig, build_model
from training.config import TrainConfig
from training.layers import binary_parameters
from training.optim import Bop, build_optimizers, build_scheduler, lr_factor


def test_bop_matches_a_hand_computation_over_two_steps():
    # γ = 0.5, τ = 0.1; w starts latent, so step 1 also snaps it to its sign (sign(0) = +1).
    w = torch.nn.Parameter(torch.tensor([0.5, -0.3, 0.0, -1.0, 0.2]))
    bop = Bop([w], gamma=0.5, threshold=0.1)

    w.grad = torch.tensor([0.4, 0.4, -0.1, -0.3, 0.1])
    bop.step()
    # m1 = 0 + 0.5·(g1 − 0) = [0.2, 0.2, −0.05, −0.15, 0.05]
    # sign(w)·m1 = [0.2, −0.2, −0.05, 0.15, 0.05] > 0.1 → flip entries 0 and 3
    assert torch.allclose(bop.state[w]["momentum"], torch.tensor([0.2, 0.2, -0.05, -0.15, 0.05]))
    assert w.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]

    w.grad = torch.tensor([0.0, -0.6, -0.5, 0.0, 0.3])
    bop.step()
    # m2 = m1 + 0.5·(g2 − m1) = [0.1, −0.2, −0.275, −0.075, 0.175]
    # w1·m2 = [−0.1, 0.2, −0.275, −0.075, 0.175] > 0.1 → flip entries 1 and 4
    assert torch.allclose(
        bop.state[w]["momentum"], torch.tensor([0.1, -0.2, -0.275, -0.075, 0.175])
    )
    assert w.tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0]


def test_bop_flips_only_strictly_above_the_threshold():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, -1.0]))
    bop = Bop([w], gamma=1.0, threshold=0.5)  # γ = 1: m = g
    w.grad = torch.tensor([0.5, 0.75, -0.75])  # w·m = 0.5 (equal: kept), 0.75, 0.75
    bop.step()
    assert w.tolist() == [1.0, -1.0, 1.0]


def test_bop_skips_parameters_without_gradient():
    w = torch.nn.Parameter(torch.tensor([0.3, -0.2]))
    Bop([w]).step()
    assert w.tolist() == pytest.approx([0.3, -0.2])


def test_bop_rejects_bad_hyperparameters():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="gamma must lie in"):
        Bop([w], gamma=0.0)
    with pytest.raises(ValueError, match="threshold must be"):
        Bop([w], threshold=-1.0)


def small_model():
    return build_model(MLPConfig(hidden=(16, 8)), (1, 4, 4), 3)


def test_bop_optimizer_split_covers_every_parameter_once():
    model = small_model()
    adam, bop = build_optimizers(model, TrainConfig(optimizer="bop"))
    assert isinstance(adam, torch.optim.Adam) and isinstance(bop, Bop)
    adam_ids = {id(p) for g in adam.param_groups for p in g["params"]}
    bop_ids = {id(p) for g in bop.param_groups for p in g["params"]}
    assert bop_ids == {id(p) for p in binary_parameters(model)} and len(bop_ids) == 2
    assert adam_ids.isdisjoint(bop_ids)
    assert adam_ids | bop_ids == {id(p) for p in model.parameters()}
    assert bop.defaults == {"gamma": 1e-4, "threshold": 1e-8}


def test_adam_optimizer_takes_every_parameter():
    model = small_model()
    (adam,) = build_optimizers(model, TrainConfig(lr=0.003))
    assert sum(len(g["params"]) for g in adam.param_groups) == len(list(model.parameters()))
    assert adam.param_groups[0]["lr"] == 0.003


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("cosine", 0, 1.0),
        ("cosine", 10, 0.5 * (1 + math.cos(math.pi / 4))),
        ("cosine", 20, 0.5),
        ("cosine", 40, 0.0),
        ("step", 19, 1.0),
        ("step", 20, 0.5),
        ("step", 45, 0.25),
        ("constant", 39, 1.0),
    ],
)
def test_lr_factor(schedule, step, expected):
    # 4 epochs of 10 steps; step schedule halves every 2 epochs.
    config = TrainConfig(epochs=4, lr_schedule=schedule, lr_step_epochs=2, lr_gamma=0.5)
    assert lr_factor(step, 10, config) == pytest.approx(expected, abs=1e-12)


def test_scheduler_drives_the_optimizer_learning_rate():
    config = TrainConfig(epochs=2, lr=0.01, lr_schedule="cosine")
    (adam,) = build_optimizers(small_model(), config)
    scheduler = build_scheduler(adam, 5, config)
    for _ in range(5):
        adam.step()
        scheduler.step()
    assert adam.param_groups[0]["lr"] == pytest.approx(0.005)  # halfway through 10 steps


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),  # (step + 1) / W with W = 10 warm-up steps
        (4, 0.5),
        (9, 1.0),
        (10, 1.0),  # cosine starts at the end of the warm-up ...
        (25, 0.5),  # ... and reaches ½ halfway through the remaining 30 steps
        (40, 0.0),
    ],
)
def test_lr_factor_warms_up_linearly_then_anneals_over_the_rest(step, expected):
    config = TrainConfig(epochs=4, warmup_epochs=1, lr_schedule="cosine")
    assert lr_factor(step, 10, config) == pytest.approx(expected, abs=1e-12)
