"""Optimizers and the learning-rate schedule of the training loop.

:class:`Bop` (Helwegen et al. 2019, "Latent Weights Do Not Exist: Rethinking Binarized Neural
Network Optimization"; Larq's ``lq.optimizers.Bop``) trains binary weights without latent
magnitudes: it keeps an exponential moving average ``m`` of each weight's gradient and flips the
weight when ``m`` has persistently pointed the same way as the weight::

    m ← m + γ(g − m)                  (γ: adaptivity rate, default 1e−4)
    w ← −w   where  w·m > τ           (τ: threshold, default 1e−8)

A positive ``w·m`` means the loss grows with ``w``'s current sign, so the flip descends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from training.config import TrainConfig
from training.layers import binary_parameters, is_binary_parameter

BOP_GAMMA = 1e-4
BOP_THRESHOLD = 1e-8


class Bop(Optimizer):
    """Bop for binary weights (see the module docstring for the update).

    Weights are kept exactly ±1: the first step replaces each by its sign (sign(0) = +1), so a
    latent initialisation only chooses the starting signs, and ``w·m > τ`` is the test above. The
    gradient EMA ``m`` lives in ``state[p]["momentum"]`` (zeros at the start).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        gamma: float = BOP_GAMMA,
        threshold: float = BOP_THRESHOLD,
    ) -> None:
        if not 0 < gamma <= 1:
            raise ValueError(f"Bop: gamma must lie in (0, 1], got {gamma}")
        if threshold < 0:
            raise ValueError(f"Bop: threshold must be ≥ 0, got {threshold}")
        super().__init__(params, {"gamma": gamma, "threshold": threshold})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            gamma, threshold = group["gamma"], group["threshold"]
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                state = self.state[weight]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(weight)
                momentum = state["momentum"]
                momentum.lerp_(weight.grad, gamma)  # m + γ(g − m)
                signs = torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)
                weight.copy_(torch.where(signs * momentum > threshold, -signs, signs))
        return loss


def build_optimizers(model: nn.Module, config: TrainConfig) -> list[Optimizer]:
    """The optimizers of a run; the first Adam in the list is the one the schedule drives.

    ``adam``: one Adam over every parameter. ``bop``: Adam over the full-precision parameters,
    then Bop over the binary layers' weights.
    """
    if config.optimizer == "adam":
        return [Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)]
    binary = binary_parameters(model)
    if not binary:
        raise ValueError("optimizer 'bop' needs a model with binary weights; found none")
    real = [p for p in model.parameters() if not is_binary_parameter(p)]
    return [
        Adam(real, lr=config.lr, weight_decay=config.weight_decay),
        Bop(binary, gamma=config.bop_gamma, threshold=config.bop_threshold),
    ]


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based) of the run.

    Warm-up over W = warmup_epochs · steps_per_epoch steps: (step + 1) / W. After it, with
    s = step − W of S = epochs · steps_per_epoch − W: cosine: ½(1 + cos(π·s/S));
    step: lr_gamma^⌊epoch / lr_step_epochs⌋ (epochs counted from the end of the warm-up);
    constant: 1.
    """
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    step -= warmup
    if config.lr_schedule == "cosine":
        progress = step / (steps_per_epoch * config.epochs - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if config.lr_schedule == "step":
        return config.lr_gamma ** ((step // steps_per_epoch) // config.lr_step_epochs)
    return 1.0


def build_scheduler(optimizer: Optimizer, steps_per_epoch: int, config: TrainConfig) -> LambdaLR:
    """A per-step scheduler applying :func:`lr_factor` to ``optimizer`` (call after each step)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, config))
