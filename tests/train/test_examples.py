"""Every shipped recipe is a valid config (paths relative to the recipe, keys and types checked)."""

from pathlib import Path

import pytest

from mlc.commands.train.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "examples" / "train").glob("*.toml"))
TINY = Path(__file__).resolve().parents[2] / "mlc" / "data" / "tiny"


def load(recipe: Path):
    """The recipe as validated; one that starts from a previous run (latest:<command>) starts from the tiny model here,
    as no such run exists in a test's runs directory."""
    overrides = [f'model.init="{TINY}"'] if 'init = "latest:' in recipe.read_text() else []
    return load_config(recipe, overrides)[0]


def test_there_is_a_recipe_per_mode():
    modes = {load(p).data.mode for p in RECIPES}
    assert {"pretrain", "sft", "dpo"} <= modes and any(load(p).lora.enabled for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    config = load(recipe)
    assert Path(config.data.train).is_file()
