"""bench/training.py: the variants it offers and its report (no training here)."""

from __future__ import annotations

from bench import training as bench_training


def test_recipe_variants_are_the_residual_recipes_settings_plus_one_option_each():
    options = bench_training.VARIANT_OPTIONS
    recipe = options["recipe"]
    assert (recipe.batch, recipe.threads, recipe.compile, recipe.bf16) == (128, 2, True, False)
    assert options["recipe_bf16"].bf16 and not options["recipe_bf16"].channels_last
    both = options["recipe_bf16_channels_last"]
    assert both.bf16 and both.channels_last and both.batch == 128


def test_ratios_are_against_the_chosen_baseline_on_cpu_and_wall_time():
    rows = [
        {"arch": "reactnet", "variant": "recipe", "works": True,
         "images_per_s": 500.0, "images_per_cpu_s": 250.0},
        {"arch": "reactnet", "variant": "recipe_bf16", "works": True,
         "images_per_s": 900.0, "images_per_cpu_s": 450.0},
        {"arch": "reactnet", "variant": "recipe_channels_last", "works": False},
    ]  # fmt: skip
    table = bench_training.to_markdown(rows, "recipe").splitlines()
    assert "vs recipe (wall)" in table[0]
    assert table[3] == "| reactnet | recipe_bf16 | 900 | 450 | 1.80x | 1.80x |"
    assert table[4] == "| reactnet | recipe_channels_last | fails | | | |"


def test_a_baseline_outside_the_measured_variants_is_refused(capsys):
    code = bench_training.main(["--variants", "bf16", "--baseline", "recipe"])
    assert code == 2
    assert "--baseline recipe is not among the measured --variants bf16" in capsys.readouterr().err
