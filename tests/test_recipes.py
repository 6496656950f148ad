"""Every shipped recipe validates and points at files that exist."""

from pathlib import Path

import pytest

from posttrain.config import build_config, load_yaml
from posttrain.eval.tasks import EvalSpec
from posttrain.stages import stage_of_recipe

ROOT = Path(__file__).resolve().parents[1]
# synth_*.yaml configure `posttrain synth` (tests/data/test_synth.py validates them),
# pipeline_*.yaml `posttrain run` (tests/test_pipeline.py validates them)
STAGE_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml")
                       if p.name != "eval.yaml" and not p.name.startswith(("synth_", "pipeline_")))


def test_there_is_a_quickstart_and_one_recipe_per_method():
    names = {p.stem for p in STAGE_RECIPES}
    assert {"quickstart", "sft_full", "sft_freeze", "sft_lora", "sft_dora", "sft_ia3", "sft_prompt",
            "sft_bottleneck_multitask", "sft_ewc", "pretrain_domain", "rm", "dpo", "kto", "orpo", "online_dpo"} <= names


def _data_files(value) -> list[str]:
    """Every .jsonl path anywhere in a dumped config (models and run dirs are made by other stages)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _data_files(v)]
    if isinstance(value, list):
        return [p for v in value for p in _data_files(v)]
    return [value] if isinstance(value, str) and value.endswith(".jsonl") else []


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_its_files_exist(recipe):
    stage = stage_of_recipe(load_yaml(recipe))
    config_cls, _ = stage.load()
    cfg = build_config(config_cls, recipe)
    paths = _data_files(cfg.model_dump())
    assert paths or stage.role == "analysis", f"{recipe.name}: no data file"  # scaling-fit reads run dirs
    for path in paths:
        assert (ROOT / path).is_file(), f"{recipe.name}: {path} missing"


def test_eval_recipe_validates():
    specs = [EvalSpec.model_validate(t) for t in load_yaml(ROOT / "recipes" / "eval.yaml")["tasks"]]
    assert all((ROOT / s.path).is_file() for s in specs)


def test_invalid_utf8_in_a_recipe_names_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"train:\n  lr: 1e-4\n# caf\xe9\n")
    with pytest.raises(ValueError, match=r"recipe\.yaml:3: not valid UTF-8 \(byte 0xe9 at column 6\)"):
        load_yaml(path)
