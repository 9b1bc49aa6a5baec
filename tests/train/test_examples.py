"""Every shipped recipe is a valid config (paths relative to the recipe, keys and types checked)."""

from pathlib import Path

import pytest

from mlc.commands.train.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "examples" / "train").glob("*.toml"))


def test_there_is_a_recipe_per_mode():
    modes = {load_config(p)[0].data.mode for p in RECIPES}
    assert modes == {"pretrain", "sft"} and any(load_config(p)[0].lora.enabled for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    config, _ = load_config(recipe)
    assert Path(config.data.train).is_file()
