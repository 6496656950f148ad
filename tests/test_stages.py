"""The stage registry is the one list of stages: the CLI, the pipeline and the recipes read it."""

from pathlib import Path

import pytest

from posttrain.cli import COMMANDS, build_parser, main
from posttrain.pipeline import VERBS
from posttrain.stages import STAGES, verbs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("verb", STAGES.names())
def test_each_stage_loads_and_its_help_names_real_sections_and_recipe(verb):
    stage = STAGES.get(verb)
    config_cls, run = stage.load()
    assert callable(run)
    assert set(stage.sections) <= set(config_cls.model_fields), f"{verb}: sections not in {config_cls.__name__}"
    if stage.recipe is not None:
        assert (ROOT / "recipes" / f"{stage.recipe}.yaml").is_file(), f"{verb}: recipes/{stage.recipe}.yaml missing"
    for key in (*stage.presets, *(p.split("=")[0] for p in stage.placeholders)):
        assert key.split(".")[0] in config_cls.model_fields, f"{verb}: {key} is not a config key"


def test_cli_and_pipeline_verbs_come_from_the_registry():
    sub = next(a for a in build_parser()._actions if a.dest == "verb").choices
    stage_verbs = set(verbs()) - set(verbs("eval"))  # `posttrain eval` is the flag-style evaluation command
    assert stage_verbs <= set(sub) and all(COMMANDS[v].__name__ == "cmd_stage" for v in stage_verbs)
    assert set(VERBS) == set(verbs()) - set(verbs("analysis"))
    assert "eval" in VERBS and "scaling-fit" not in VERBS


def test_presets_and_placeholders_reach_print_config(capsys):
    assert main(["pretrain", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "stage: pretrain" in out and "train: TRAIN.jsonl" in out
    assert main(["grpo", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "stage: grpo" in out and "prompts: PROMPTS.jsonl" in out


def test_an_unknown_stage_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown stage 'kto-pro'; choose one of sft, pretrain"):
        STAGES.get("kto-pro")
