"""The typed configuration of one training run, validated when it is built.

``TrainConfig(arch="mlp", dataset="fashion")`` is a complete run: the fields a recipe governs
(epochs, batch size, optimizer, schedule, augmentation; :data:`training.recipes.RECIPE_FIELDS`)
default to None and are filled in from ``recipe`` (``full`` by default) for that architecture and
data set, so the defaults meet the accuracy targets of docs/training.md; any of them given
explicitly overrides the recipe. ``model=None`` means the data set's default architecture config
(:func:`training.architectures.default_config`) with the recipe's model overrides;
:meth:`TrainConfig.model_config` resolves it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.data import DATASETS
from training.recipes import (
    BF16_MODES,
    DEFAULT_RECIPE,
    KEEP_EPOCHS,
    RECIPE_NAMES,
    Recipe,
    recipe_for,
)

if TYPE_CHECKING:
    from training.architectures import ArchitectureConfig

# training.architectures.ARCHITECTURES, named here so that the CLI parses without importing torch.
ARCHITECTURE_NAMES = ("mlp", "cnn", "birealnet", "reactnet")
OPTIMIZERS = ("adam", "bop")
LR_SCHEDULES = ("cosine", "step", "constant")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class ConfigError(ValueError):
    """A training option is out of range or inconsistent; the message names it."""


class DeviceError(ConfigError):
    """The requested device is malformed or not on this machine (no CUDA, no such index)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    ``recipe`` (``full`` or ``fast``) supplies every recipe field left at None
    (:mod:`training.recipes`); after construction they all hold values.

    Optimizer: ``adam`` updates every parameter (the binary layers' latent weights included) with
    Adam at ``lr``; ``bop`` flips binary weights with Bop (``bop_gamma``, ``bop_threshold``;
    Helwegen et al. 2019) and uses Adam at ``lr`` for the rest. The schedule scales Adam's ``lr``
    per step: ``cosine`` anneals to 0 over the run, ``step`` multiplies by ``lr_gamma`` every
    ``lr_step_epochs`` epochs, ``constant`` keeps it; the first ``warmup_epochs`` epochs ramp it
    up linearly from 0 first (:func:`training.optim.lr_factor`).

    ``augment_shift`` (pixels) shifts each training image by a random offset in
    [−shift, shift]² per epoch, filling with 0 (the background) — a random crop of the image
    zero-padded by ``augment_shift``; 0 turns it off. ``augment_flip`` mirrors each training
    image left-right with probability ½ (for data sets whose classes are mirror-symmetric, like
    Fashion-MNIST's clothes; not digits). Both are ignored for flat (non-image) inputs.
    ``label_smoothing`` is cross-entropy's (0 = none).

    ``device``: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; resolved when training starts (:func:`training.runtime.resolve_device`); under
    torchrun the process group decides. ``num_threads`` sets ``torch.set_num_threads`` for the
    run; None (the default) means every usable core (:func:`model.cpus.usable_cores`: the
    affinity mask and the cgroup CPU quota), shared out among the processes of a distributed run.

    ``keep_epoch``: the run's model is the weights of the epoch with the best validation
    accuracy (``best``; ties: lower validation loss) or of the last epoch (``last``).

    ``bf16`` (``auto``, ``on``, ``off``): the training steps' forward pass and loss under bf16
    autocast; ``auto`` where the device computes bf16 natively
    (:func:`training.runtime.native_bf16`). Evaluation and the export stay float32.

    ``compile`` runs the training steps through ``torch.compile`` (inductor): 1.3–1.6× more
    images per CPU-second after a compile of minutes (docs/training.md, "Training throughput").
    """

    arch: str = "mlp"
    dataset: str = "digits"
    data_dir: Path | None = None
    model: ArchitectureConfig | None = None
    recipe: str = DEFAULT_RECIPE
    # Recipe fields: None takes the recipe's value (training.recipes.Recipe).
    epochs: int = None  # type: ignore[assignment]
    batch_size: int = None  # type: ignore[assignment]
    lr: float = None  # type: ignore[assignment]
    lr_schedule: str = None  # type: ignore[assignment]
    warmup_epochs: int = None  # type: ignore[assignment]
    lr_step_epochs: int = None  # type: ignore[assignment]
    lr_gamma: float = None  # type: ignore[assignment]
    optimizer: str = None  # type: ignore[assignment]
    bop_gamma: float = None  # type: ignore[assignment]
    bop_threshold: float = None  # type: ignore[assignment]
    weight_decay: float = None  # type: ignore[assignment]
    label_smoothing: float = None  # type: ignore[assignment]
    augment_shift: int = None  # type: ignore[assignment]
    augment_flip: bool = None  # type: ignore[assignment]
    compile: bool = None  # type: ignore[assignment]
    keep_epoch: str = None  # type: ignore[assignment]
    bf16: str = None  # type: ignore[assignment]
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    out_dir: Path | None = None
    progress: bool = True
    device: str = "auto"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        _one_of("arch", self.arch, ARCHITECTURE_NAMES)
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("recipe", self.recipe, RECIPE_NAMES)
        for name, value in self.recipe_defaults().training_options().items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise DeviceError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _one_of("keep_epoch", self.keep_epoch, KEEP_EPOCHS)
        _one_of("bf16", self.bf16, BF16_MODES)
        for name in ("epochs", "batch_size", "lr_step_epochs"):
            _positive_int(name, getattr(self, name))
        if not _is_int(self.warmup_epochs) or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(
                f"warmup_epochs must be an integer in [0, epochs = {self.epochs}), "
                f"got {self.warmup_epochs!r}"
            )
        for name in ("lr", "bop_gamma", "bop_threshold"):
            _positive_float(name, getattr(self, name))
        _in_range("lr_gamma", self.lr_gamma, 0.0, 1.0, low_open=True)
        _in_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _in_range("bop_gamma", self.bop_gamma, 0.0, 1.0, low_open=True)
        _in_range("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _in_range("test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"val_fraction + test_fraction must be < 1, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be ≥ 0, got {self.weight_decay!r}")
        if not _is_int(self.augment_shift) or self.augment_shift < 0:
            raise ConfigError(f"augment_shift must be an integer ≥ 0, got {self.augment_shift!r}")
        if not isinstance(self.augment_flip, bool):
            raise ConfigError(f"augment_flip must be True or False, got {self.augment_flip!r}")
        if not _is_int(self.seed) or not _is_int(self.split_seed):
            raise ConfigError(f"seeds must be integers, got {self.seed!r}, {self.split_seed!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        if self.num_threads is not None:
            _positive_int("num_threads", self.num_threads)
        if self.model is not None:
            from training.architectures import ARCHITECTURES

            expected = ARCHITECTURES[self.arch]
            if not isinstance(self.model, expected):
                raise ConfigError(
                    f"arch={self.arch!r} needs a {expected.__name__} as model, "
                    f"got {type(self.model).__name__}"
                )

    def recipe_defaults(self) -> Recipe:
        """The recipe this config takes its unset fields from."""
        return recipe_for(self.arch, self.dataset, self.recipe)

    def model_config(self) -> ArchitectureConfig:
        """``model``, or the data set's default config of ``arch`` with the recipe's model
        overrides when it is None."""
        if self.model is not None:
            return self.model
        return model_config_from_options(self.arch, self.dataset, recipe=self.recipe)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, the resolved model config under ``model``."""
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        for key in ("data_dir", "out_dir"):
            doc[key] = None if doc[key] is None else str(doc[key])
        from training.architectures import config_to_dict

        doc["model"] = config_to_dict(self.model_config())
        return doc


def model_config_from_options(
    arch: str, dataset: str, recipe: str = DEFAULT_RECIPE, **overrides: Any
) -> ArchitectureConfig:
    """The default config of ``arch`` for ``dataset``, with the recipe's model overrides, then
    ``overrides`` (None = keep); an unknown field or invalid value is a :class:`ConfigError`
    naming it."""
    from training.architectures import default_config

    base = default_config(arch, dataset)
    known = {f.name for f in fields(base)}
    given = dict(recipe_for(arch, dataset, recipe).model)
    given |= {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"arch {arch!r} has no option(s) {unknown}; it has {sorted(known)}")
    try:
        return type(base)(**(asdict(base) | given))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {arch} config: {exc}") from None


# --- checks --------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _in_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (_is_number(value) and above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must lie in {interval}, got {value!r}")
