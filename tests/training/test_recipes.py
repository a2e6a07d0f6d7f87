"""Recipes: the table per (arch, dataset, recipe), explicit options over the recipe, the CLI."""

from __future__ import annotations

from dataclasses import fields

import pytest

from training.architectures import ARCHITECTURES, MLPConfig
from training.cli import build_parser
from training.config import ConfigError, TrainConfig, model_config_from_options
from training.data import DATASETS
from training.recipes import (
    GENERIC_RECIPES,
    RECIPE_FIELDS,
    RECIPE_NAMES,
    RECIPES,
    Recipe,
    UnknownRecipeError,
    recipe_for,
)


def test_recipe_fields_are_train_config_fields():
    config_fields = {f.name for f in fields(TrainConfig)}
    assert set(RECIPE_FIELDS) <= config_fields


@pytest.mark.parametrize("key", sorted(RECIPES), ids="-".join)
def test_every_table_entry_builds_a_valid_config_and_model_config(key):
    arch, dataset, name = key
    assert arch in ARCHITECTURES and dataset in DATASETS and name in RECIPE_NAMES
    config = TrainConfig(arch=arch, dataset=dataset, recipe=name)
    for field, value in RECIPES[key].training_options().items():
        assert getattr(config, field) == value, field
    model = config.model_config()
    for field, value in RECIPES[key].model.items():
        assert getattr(model, field) == value, field


def test_a_pair_without_its_own_entry_gets_the_generic_recipe():
    assert ("mlp", "mnist", "fast") not in RECIPES
    assert recipe_for("mlp", "mnist", "fast") == GENERIC_RECIPES["fast"]
    assert TrainConfig(dataset="mnist", recipe="fast").epochs == GENERIC_RECIPES["fast"].epochs


def test_full_is_the_default_and_fast_takes_fewer_epochs():
    for arch, dataset in {(a, d) for a, d, _ in RECIPES}:
        full = TrainConfig(arch=arch, dataset=dataset)
        assert full.recipe == "full"
        assert full.epochs == recipe_for(arch, dataset, "full").epochs
        assert TrainConfig(arch=arch, dataset=dataset, recipe="fast").epochs < full.epochs


def test_digits_full_recipe_keeps_the_published_defaults():
    """make default-model regenerates deploy/models from these: they must not drift."""
    config = TrainConfig(arch="mlp", dataset="digits")
    assert (config.epochs, config.batch_size, config.lr, config.lr_schedule) == (
        60, 64, 1e-2, "cosine"
    )  # fmt: skip
    assert (config.warmup_epochs, config.label_smoothing, config.augment_shift) == (0, 0.1, 1)
    assert not config.augment_flip  # a mirrored digit is another symbol or none


def test_digits_runs_keep_the_last_epoch_and_the_large_validation_sets_the_best():
    # digits' 270 validation images are too few to pick one epoch of 60 (docs/training.md).
    for arch in ("mlp", "cnn", "birealnet", "reactnet"):
        for name in RECIPE_NAMES:
            assert TrainConfig(arch=arch, dataset="digits", recipe=name).keep_epoch == "last"
    assert TrainConfig(arch="reactnet", dataset="fashion").keep_epoch == "best"
    assert TrainConfig(arch="mlp", dataset="mnist").keep_epoch == "best"  # generic recipe
    assert TrainConfig(arch="cnn", dataset="digits", keep_epoch="best").keep_epoch == "best"


def test_only_the_fast_residual_fashion_recipes_train_in_bf16_where_it_is_native():
    for arch in ("birealnet", "reactnet"):
        assert TrainConfig(arch=arch, dataset="fashion", recipe="fast").bf16 == "auto"
        assert TrainConfig(arch=arch, dataset="fashion", recipe="full").bf16 == "off"
    assert TrainConfig(arch="mlp", dataset="fashion", recipe="fast").bf16 == "off"


def test_explicit_options_override_the_recipe_and_the_rest_still_applies():
    recipe = recipe_for("mlp", "fashion", "full")
    config = TrainConfig(arch="mlp", dataset="fashion", epochs=3, augment_flip=False)
    assert config.epochs == 3 and config.augment_flip is False
    assert config.batch_size == recipe.batch_size and config.lr == recipe.lr
    assert config.to_dict()["recipe"] == "full" and config.to_dict()["epochs"] == 3


def test_the_recipes_model_overrides_apply_unless_a_model_is_given(monkeypatch):
    widened = Recipe(epochs=5, batch_size=64, lr=1e-2, model={"hidden": (24,)})
    monkeypatch.setitem(RECIPES, ("mlp", "digits", "fast"), widened)
    assert TrainConfig(recipe="fast").model_config().hidden == (24,)
    assert TrainConfig(recipe="full").model_config().hidden == (1024, 256)  # the data set's
    given = MLPConfig(hidden=(8,))
    assert TrainConfig(recipe="fast", model=given).model_config() is given
    # The CLI's model options go on top of the recipe's overrides.
    merged = model_config_from_options("mlp", "digits", recipe="fast", scale=True)
    assert merged.hidden == (24,) and merged.scale


def test_unknown_recipe_names_are_refused():
    with pytest.raises(ConfigError, match="recipe must be one of fast, full; got 'slow'"):
        TrainConfig(recipe="slow")
    with pytest.raises(UnknownRecipeError, match="got 'slow'"):
        recipe_for("mlp", "digits", "slow")


def test_a_recipe_with_an_invalid_value_fails_when_used(monkeypatch):
    monkeypatch.setitem(RECIPES, ("mlp", "digits", "fast"), Recipe(epochs=5, batch_size=0, lr=1))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        TrainConfig(recipe="fast")


def test_warmup_must_leave_epochs_to_schedule():
    with pytest.raises(ConfigError, match=r"warmup_epochs must be an integer in \[0, epochs = 4\)"):
        TrainConfig(epochs=4, warmup_epochs=4)


def test_cli_flags_left_unset_take_the_recipe_and_given_ones_win():
    parser = build_parser()
    args = parser.parse_args(["train", "--dataset", "fashion", "--recipe", "fast", "--lr", "0.5"])
    assert args.recipe == "fast" and args.lr == 0.5
    assert all(getattr(args, field) is None for field in RECIPE_FIELDS if field != "lr")
    assert args.num_threads is None and args.device == "auto"
    args = parser.parse_args(["train", "--no-augment-flip", "--threads", "2", "--device", "cpu"])
    assert args.augment_flip is False and args.num_threads == 2 and args.device == "cpu"


def test_compile_is_a_recipe_field(monkeypatch):
    compiled = Recipe(epochs=2, batch_size=64, lr=1e-2, compile=True)
    monkeypatch.setitem(RECIPES, ("mlp", "digits", "fast"), compiled)
    assert TrainConfig(arch="mlp", recipe="fast").compile is True
    assert TrainConfig(arch="mlp", recipe="fast", compile=False).compile is False
    assert TrainConfig(arch="mlp").compile is False  # the full recipe's default
