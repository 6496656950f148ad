"""Every shipped recipe validates and points at files that exist."""

from pathlib import Path

import pytest

from posttrain.config import build_config, load_yaml
from posttrain.eval.tasks import EvalSpec
from posttrain.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
STAGE_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name != "eval.yaml")


def test_there_is_a_quickstart_and_one_recipe_per_method():
    names = {p.stem for p in STAGE_RECIPES}
    assert {"quickstart", "sft_full", "sft_freeze", "sft_lora", "sft_dora", "sft_ia3", "sft_prompt",
            "sft_bottleneck_multitask", "sft_ewc", "pretrain_domain"} <= names


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_its_files_exist(recipe):
    cfg = build_config(SFTConfig, recipe)
    paths = [cfg.data.train, cfg.data.eval, cfg.ewc.reference, cfg.eval.forgetting]
    paths += [t.path for t in cfg.eval.tasks]
    for path in filter(None, paths):
        assert (ROOT / path).is_file(), f"{recipe.name}: {path} missing"


def test_eval_recipe_validates():
    specs = [EvalSpec.model_validate(t) for t in load_yaml(ROOT / "recipes" / "eval.yaml")["tasks"]]
    assert all((ROOT / s.path).is_file() for s in specs)
