"""The training loop: one call, :func:`train`, from a :class:`TrainConfig` to a trained model.

Per step: (optionally) augment the batch's images (random crops of the zero-padded images, flips;
:mod:`training.augment`), forward and cross-entropy (under bf16 autocast when the run's
``bf16`` resolves to on, :mod:`training.runtime`; evaluation always runs in float32), backward,
optimizer step(s), schedule step, then clip the binary layers' latent weights to
[−1, 1] (:func:`training.layers.clip_latent_weights`). After each epoch the model is evaluated
on the validation split. ``config.keep_epoch`` says which epoch's weights the run keeps: the
one with the best validation accuracy (``best``; ties: lower validation loss), restored at the
end, or the last (``last``); the test split is evaluated once, on that state.

Under torchrun the same loop runs data-parallel (:mod:`training.distributed`): each process
trains on its shard of every epoch with ``batch_size / N`` rows per step, gradients averaged
over the processes; only rank 0 evaluates and returns a result.

Reproducibility: ``config.seed`` seeds the weight initialisation, the shuffling, the augmentation
and any stochastic quantizer; the same config on the same machine and thread count gives the same
weights bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.architectures import ArchitectureConfig, BinaryNet, build_model
from training.augment import Augmentation
from training.config import ConfigError, TrainConfig
from training.data import DataBundle, load_dataset
from training.distributed import SINGLE_PROCESS, DistributedContext
from training.layers import clip_latent_weights
from training.optim import build_optimizers, build_scheduler
from training.plots import render_curves
from training.runtime import Runtime, resolve_runtime
from training.summary import ModelSummary, summarize_model

METRICS_FILENAME = "metrics.json"
CURVES_FILENAME = "curves.png"
EVAL_BATCH = 1024


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    count: int


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    lr: float  # Adam's learning rate at the start of the epoch
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    """A finished run: the model (eval mode, the kept epoch's weights) and everything about it."""

    model: BinaryNet
    config: TrainConfig
    model_config: ArchitectureConfig
    data: DataBundle
    history: list[EpochStats]
    metrics: dict[str, Any]
    summary: ModelSummary
    files: dict[str, Path] = field(default_factory=dict)

    def metrics_document(self) -> dict[str, Any]:
        """What ``metrics.json`` holds: the metrics, the per-epoch history and the config."""
        return {
            "metrics": self.metrics,
            "history": [asdict(epoch) for epoch in self.history],
            "config": self.config.to_dict(),
        }

    def metrics_json(self) -> bytes:
        return json.dumps(self.metrics_document(), indent=2).encode()

    @cached_property
    def curves_png(self) -> bytes:
        return render_curves([asdict(e) for e in self.history], self.metrics["kept_epoch"])


def train(
    config: TrainConfig, distributed: DistributedContext = SINGLE_PROCESS
) -> TrainResult | None:
    """Train, keep the best validation epoch or the last, evaluate on test, write the output
    files.

    Runs on the config's device and torch thread count (:func:`training.runtime.resolve_runtime`)
    and restores the caller's thread count afterwards. The returned model is on the CPU whatever
    the device, so its export is the same. In a distributed run every process calls this; rank 0
    gets the result, the others None.
    """
    runtime = resolve_runtime(config, distributed)
    threads = torch.get_num_threads()
    torch.set_num_threads(runtime.threads)
    try:
        return _train(config, distributed, runtime)
    finally:
        torch.set_num_threads(threads)


def _train(
    config: TrainConfig, distributed: DistributedContext, runtime: Runtime
) -> TrainResult | None:
    data = load_dataset(
        config.dataset,
        config.data_dir,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.split_seed,
    )
    torch.manual_seed(config.seed)  # the same initial weights in every process
    # Alone: shuffling and augmentation from one generator. Distributed: the sampler shuffles
    # (seeded by config.seed), and each process augments its own shard from its own stream.
    generator = torch.Generator().manual_seed(config.seed + distributed.rank)
    model_config = config.model_config()
    try:
        model = build_model(model_config, data.input_shape, data.num_classes)
    except ValueError as exc:  # e.g. a cnn on flat npz features
        raise ConfigError(
            f"cannot build {model_config.arch} for {data.describe()}: {exc}"
        ) from None
    device, main = runtime.device, distributed.is_main
    model.to(device)
    trained = distributed.wrap(model)  # model itself, or DDP around it (shared parameters)
    if config.compile:  # training steps only; evaluation and export use the eager module
        trained = torch.compile(trained)
    batch_size = distributed.local_batch_size(config.batch_size)
    # The training split moves to the device once (Fashion-MNIST: 160 MB); batches are gathered
    # and augmented there, so the model never waits for a loader.
    x_train = torch.from_numpy(data.train.x).to(device)  # (N, *input_shape) float32
    y_train = torch.from_numpy(data.train.y).to(device)  # (N,) int64
    steps_per_epoch = math.ceil(distributed.shard_size(len(y_train)) / batch_size)
    optimizers = build_optimizers(model, config)
    scheduler = build_scheduler(optimizers[0], steps_per_epoch, config)
    augment = _augmentation(config, data)

    history: list[EpochStats] = []
    best: tuple[float, float] = (-1.0, math.inf)  # (val accuracy, −) and val loss
    best_state: dict[str, Tensor] = {}
    best_epoch = 0
    keep_best = config.keep_epoch == "best"  # else the last epoch: no copies needed
    progress = _progress_bar(config, steps_per_epoch, enabled=main)
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        lr = optimizers[0].param_groups[0]["lr"]
        model.train()
        order = distributed.epoch_order(len(y_train), config.seed, epoch)
        if order is None:
            order = torch.randperm(len(y_train), generator=generator)
        order = order.to(device)
        loss_sum, correct, seen = 0.0, 0, 0
        progress.set_description(f"epoch {epoch}/{config.epochs}")
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            x, y = augment(x_train[index], generator), y_train[index]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=runtime.bf16):
                logits = trained(x)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            scheduler.step()
            clip_latent_weights(model)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        loss_sum, correct, seen = distributed.sum(loss_sum, correct, seen)
        if not main:
            continue
        val = evaluate(model, data.val.x, data.val.y, device=device)
        history.append(
            EpochStats(
                epoch=epoch,
                lr=lr,
                train_loss=loss_sum / seen,
                train_accuracy=correct / seen,
                val_loss=val.loss,
                val_accuracy=val.accuracy,
                seconds=time.perf_counter() - epoch_started,
            )
        )
        if (val.accuracy, -val.loss) > (best[0], -best[1]):
            best, best_epoch = (val.accuracy, val.loss), epoch
            if keep_best:
                best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                }
        progress.set_postfix(
            loss=f"{loss_sum / seen:.4f}",
            acc=f"{correct / seen:.4f}",
            val_acc=f"{val.accuracy:.4f}",
        )
    progress.close()
    train_seconds = time.perf_counter() - started
    if not main:
        return None

    model.to("cpu")
    kept_epoch = best_epoch if keep_best else config.epochs
    if keep_best:
        model.load_state_dict(best_state)
    model.eval()
    test = evaluate(model, data.test.x, data.test.y)
    summary = summarize_model(model)
    metrics = {
        "arch": model_config.arch,
        "dataset": data.name,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "best_epoch": best_epoch,
        "best_val_accuracy": best[0],
        "best_val_loss": best[1],
        "keep_epoch": config.keep_epoch,
        "kept_epoch": kept_epoch,
        "kept_val_accuracy": history[kept_epoch - 1].val_accuracy,
        "epochs": config.epochs,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / config.epochs,
        "train_size": len(data.train),
        "val_size": len(data.val),
        "test_size": len(data.test),
        "binary_params": summary.binary_params,
        "float_params": summary.float_params,
        "compression_ratio": summary.compression_ratio,
        "num_threads": torch.get_num_threads(),
        "device": str(device),
        "bf16": runtime.bf16,
        "images_per_second": len(y_train) * config.epochs / train_seconds,
        **distributed.metrics(),
    }
    result = TrainResult(
        model=model,
        config=config,
        model_config=model_config,
        data=data,
        history=history,
        metrics=metrics,
        summary=summary,
    )
    if config.out_dir is not None:
        result.files = write_outputs(result, config.out_dir)
    return result


def evaluate(
    model: nn.Module,
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    batch_size: int = EVAL_BATCH,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Mean cross-entropy and accuracy of ``model`` (on ``device``) in eval mode on (x, y);
    restores the mode."""
    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    y = torch.as_tensor(y, dtype=torch.int64, device=device)
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"evaluate: expected equal, non-zero numbers of inputs and labels, "
                         f"got {len(x)} and {len(y)}")  # fmt: skip
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(y), batch_size):
            logits = model(x[begin : begin + batch_size])
            target = y[begin : begin + batch_size]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return Evaluation(loss=loss_sum / len(y), accuracy=correct / len(y), count=len(y))


def write_outputs(result: TrainResult, out_dir: Path) -> dict[str, Path]:
    """Write ``metrics.json`` and ``curves.png`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        METRICS_FILENAME: (out_dir / METRICS_FILENAME, result.metrics_json()),
        CURVES_FILENAME: (out_dir / CURVES_FILENAME, result.curves_png),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {name: path for name, (path, _) in files.items()}


def _augmentation(config: TrainConfig, data: DataBundle) -> Augmentation:
    """The config's augmentation for image inputs (C, H, W); none for flat features."""
    if len(data.input_shape) != 3:
        return Augmentation()
    return Augmentation(crop_padding=config.augment_shift, flip=config.augment_flip)


def _progress_bar(config: TrainConfig, steps_per_epoch: int, enabled: bool = True) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=config.epochs * steps_per_epoch,
        unit="batch",
        disable=not (config.progress and enabled),
        dynamic_ncols=True,
        leave=True,
    )
