"""Stage configs as form fields and back: every shipped recipe round-trips, errors match the CLI's."""

from pathlib import Path

import pytest
import yaml

from posttrain.config import build_config, dump_config
from posttrain.stages import STAGES, stage_of_recipe
from posttrain.ui.forms import config_from_form, describe_fields, recipe_values

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml")
                 if "stage" in (yaml.safe_load(p.read_text()) or {}))


def test_fields_have_the_widget_of_their_type():
    cls, _ = STAGES.get("sft").load()
    fields = {f["key"]: f for f in describe_fields(cls)}
    assert fields["train.lr"]["kind"] == "number" and fields["train.lr"]["default"] == "0.0002"
    assert fields["train.packing"]["kind"] == "bool"
    assert fields["train.schedule"]["kind"] == "choice" and fields["train.schedule"]["choices"] == ["cosine", "linear", "constant"]
    assert fields["train.max_steps"]["nullable"] and fields["train.max_steps"]["help"].startswith("stop after")
    assert fields["data.train"]["required"] and fields["data.train"]["kind"] == "text"
    assert fields["train.betas"]["kind"] == "yaml" and fields["train.betas"]["default"] == "[0.9, 0.999]"
    assert fields["data.kind"]["kind"] == "choice" and fields["data.kind"]["nullable"]
    assert "train" not in fields and "model.name" in fields  # sections are not fields, their leaves are


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_round_trips_through_the_form(recipe, monkeypatch):
    """The form of a recipe, submitted unchanged, is the config `posttrain VERB --config RECIPE` runs."""
    monkeypatch.chdir(recipe.parents[1])
    stage = stage_of_recipe(yaml.safe_load(recipe.read_text()))
    cls, _ = stage.load()
    values, problems = recipe_values(stage, cls, recipe)
    assert problems == []
    cfg, problems = config_from_form(stage, cls, values)
    assert problems == []
    expected = build_config(cls, recipe, [f"{k}={v}" for k, v in stage.presets.items()])
    assert dump_config(cfg) == dump_config(expected)


def test_bad_fields_get_the_cli_messages_under_their_keys():
    stage = STAGES.get("sft")
    cls, _ = stage.load()
    values, _ = recipe_values(stage, cls, None)
    values.update({"train.lr": "abc", "adapter.r": "0", "train.schedule": "wavy", "train.betas": "[1, 2",
                   "train.mixed_precision": "no"})
    cfg, problems = config_from_form(stage, cls, values)
    assert cfg is None
    problems = dict(problems)
    assert problems["train.betas"].startswith("not valid YAML")  # checked before pydantic sees the rest
    del values["train.betas"]
    problems = dict(config_from_form(stage, cls, values)[1])
    with pytest.raises(ValueError) as cli:  # what `posttrain sft train.lr=abc ...` prints
        build_config(cls, None, ["data.train=x.jsonl", "train.lr=abc", "adapter.r=0", "train.schedule=wavy"])
    for key in ("train.lr", "adapter.r", "train.schedule"):
        assert f"  {key}: {problems[key]}" in str(cli.value)
    assert set(problems) == {"train.lr", "adapter.r", "train.schedule"}  # `no` stayed the string "no"


def test_empty_nullable_fields_are_none_and_empty_required_ones_are_named():
    stage = STAGES.get("sft")
    cls, _ = stage.load()
    values, _ = recipe_values(stage, cls, None)
    assert values["data.train"] == "TRAIN.jsonl"  # the verb's placeholder, as --print-config shows it
    cfg, _ = config_from_form(stage, cls, {**values, "train.max_steps": "", "data.eval": ""})
    assert cfg.train.max_steps is None and cfg.data.eval is None
    assert config_from_form(stage, cls, {**values, "data.train": ""})[0].data.train == ""  # as `data.train=`
    assert dict(config_from_form(stage, cls, {**values, "train.lr": ""})[1]) == {
        "train.lr": "Input should be a valid number, unable to parse string as a number"}
    assert config_from_form(stage, cls, {**values, "nope.key": "1"})[1] == [("nope.key", "unknown key")]


def test_the_verbs_presets_win_over_the_form():
    stage = STAGES.get("grpo")
    cls, _ = stage.load()
    values, _ = recipe_values(stage, cls, None)
    cfg, problems = config_from_form(stage, cls, {**values, "stage": "ppo"})
    assert problems == [] and cfg.stage == "grpo"
