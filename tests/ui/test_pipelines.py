"""The pipeline editor's helpers: YAML <-> form, what the form cannot show, and where problems go."""

from pathlib import Path

import pytest
import yaml

from posttrain.config import load_yaml
from posttrain.pipeline import DeploySpec, Gate, ModelInit, PipelineConfig, StageSpec
from posttrain.ui import pipelines
from posttrain.ui.pipelines import FormError, from_form, to_form, value_text

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "pipeline_demo.yaml"


def test_the_form_has_a_field_for_every_schema_field():
    """A new field in the pipeline schema must get a place in the editor (or this fails)."""
    assert set(PipelineConfig.model_fields) == {*pipelines.TOP_TEXT, "model", *pipelines.YAML_SECTIONS, "stages"}
    assert set(ModelInit.model_fields) == set(pipelines.MODEL_FIELDS)
    assert set(StageSpec.model_fields) == set(pipelines.STAGE_FIELDS)
    assert set(Gate.model_fields) == set(pipelines.GATE_FIELDS)
    assert "gate" in DeploySpec.model_fields  # deploy (gates included) is edited as YAML text


def test_the_demo_pipeline_round_trips_through_the_form():
    data = load_yaml(DEMO)
    form, unshown = to_form(data)
    assert unshown == []
    assert [s["name"] for s in form["stages"]] == ["sft", "dpo", "quantize", "eval"]
    assert form["stages"][0]["overrides"][0] == ["data.train", "${data.arithmetic}"]
    assert form["stages"][1]["gate"][2] == {"metric": "arithmetic_em", "min": "-0.25", "max": "",
                                            "relative_to_previous": True}
    assert form["stages"][2]["eval"] is False and ["eval.forgetting", "null"] in form["stages"][2]["overrides"]
    assert form["model"]["adapter"].startswith("method: lora")
    back, problems = from_form(form)
    assert problems == [] and back == data
    assert yaml.safe_load(pipelines.dump(back)) == data
    PipelineConfig.model_validate(back)


def test_a_short_model_spec_and_defaults_stay_short():
    data = {"name": "p", "output_dir": "runs/p", "model": "models/tiny",
            "stages": [{"name": "a", "verb": "sft", "eval": True, "overrides": {}, "gate": []}]}
    back, problems = from_form(to_form(data)[0])
    assert problems == [] and back == {"name": "p", "output_dir": "runs/p", "model": "models/tiny",
                                       "stages": [{"name": "a", "verb": "sft"}]}


@pytest.mark.parametrize("value", [1e-05, 2e-3, 1e20, 3, True, None, "true", "1e-3", "", " x", "a: b", "${data.x}",
                                   "null", [1, "b"], {"a": 1}])
def test_override_values_read_back_as_themselves(value):
    assert yaml.safe_load(value_text(value)) == value


def test_keys_the_form_cannot_show_are_listed():
    data = {"name": "p", "output_dir": "runs/p", "extra": 1, "model": {"name": "m", "bogus": 2},
            "stages": [{"name": "a", "verb": "sft", "typo": 1, "overrides": ["x"],
                        "gate": [{"metric": "m", "min": 1, "mx": 2}, "junk"]}, 7]}
    assert to_form(data)[1] == ["extra", "model.bogus", "stages.0.typo", "stages.0.overrides", "stages.0.gate.0.mx",
                                "stages.0.gate.1", "stages.1"]


def blank_form(**stage):
    return {"name": "p", "output_dir": "runs/p", "model": {"name": "", "dtype": "", "adapter": ""}, "data": "",
            "eval": "", "deploy": "", "stages": [{"name": "a", "verb": "sft", "config": "", "eval": True,
                                                  "overrides": [], "gate": [], **stage}]}


def test_form_text_problems_name_their_field():
    form = blank_form(overrides=[["train.lr", "[unclosed"], ["", "orphan"], ["", ""], ["x", "1"], ["x", "2"]],
                      gate=[{"metric": " acc ", "min": "{bad", "max": "", "relative_to_previous": False}])
    form["model"]["adapter"] = "method: [lora"
    form["deploy"] = "source: a"
    data, problems = from_form(form)
    assert [k for k, _ in problems] == ["model.adapter", "stages.0.overrides.train.lr", "stages.0.overrides",
                                        "stages.0.overrides.x", "stages.0.gate.0.min"]
    assert problems[0][1].startswith("not valid YAML") and "no key" in problems[2][1] and "twice" in problems[3][1]
    assert data["stages"][0]["overrides"] == {"train.lr": None, "x": 1}
    assert data["stages"][0]["gate"] == [{"metric": "acc", "min": None}] and data["deploy"] == {"source": "a"}


@pytest.mark.parametrize("form, message", [
    ([], "form: expected an object"),
    ({**blank_form(), "stages": {}}, "stages: expected a list"),
    ({**blank_form(), "name": 3}, "name: expected form text"),
    (blank_form(overrides=[["k"]]), "stages.0.overrides: expected"),
    (blank_form(eval="no"), "stages.0.eval: expected true or false"),
    (blank_form(gate=["x"]), "stages.0.gate.0: expected an object"),
])
def test_a_form_of_another_shape_is_refused(form, message):
    with pytest.raises(FormError, match=message):
        from_form(form)


def test_gate_problems_are_keyed_by_their_field():
    data = {"name": "p", "output_dir": "o", "stages": [{"name": "a", "verb": "sft", "gate": [
        {"metric": "ok", "min": 1}, {"metric": " ", "min": 0.5, "max": 0.1}, {"metric": "m"}]}]}
    from pydantic import ValidationError

    from posttrain.config import validation_problems

    with pytest.raises(ValidationError) as exc:
        PipelineConfig.model_validate(data)
    problems = dict(validation_problems(exc.value))
    assert problems["stages.0.gate.1.metric"].startswith("give the metric's name")
    assert problems["stages.0.gate.1.max"] == "max 0.1 is below min 0.5: no value passes this gate"
    assert problems["stages.0.gate.2"] == "gate on 'm' needs min or max"
    Gate(metric="m", min=0, max=0)  # a point is a bound, not a contradiction


def test_pipeline_wide_problems_move_onto_the_stage_they_name():
    data = {"stages": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}
    placed = pipelines.place([("(top level)", "stage name 'a' is used twice; names must be unique"),
                              ("(top level)", "stage 'b': output_dir is set by the pipeline (<output_dir>/<name>)"),
                              ("(top level)", "stage 'b': something else"),
                              ("(top level)", "deploy.source 'x' is not a stage that makes a model"),
                              ("(top level)", "stage 'zz': unknown"), ("stages.0.verb", "bad")], data)
    assert [k for k, _ in placed] == ["stages.2.name", "stages.1.overrides", "stages.1", "deploy", "(top level)",
                                      "stages.0.verb"]


def test_stage_config_problems_land_on_the_override_or_recipe_at_fault(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({"stage": "sft", "output_dir": "x", "train": {"epochs": "lots"},
                                                       "data": {"train": "t.jsonl"}}))
    pipe = PipelineConfig.model_validate({
        "name": "p", "output_dir": "runs/p", "model": {"name": "default", "adapter": {"method": "lorax"}},
        "stages": [{"name": "a", "verb": "sft", "config": "sft.yaml", "overrides": {"train.lr": "fast", "data": {"train": 5}}},
                   {"name": "b", "verb": "sft"},
                   {"name": "c", "verb": "sft", "config": "missing.yaml"},
                   {"name": "d", "verb": "eval"}]})
    problems = pipelines.stage_problems(pipe)
    keys = [k for k, _ in problems]
    assert "stages.0.overrides.train.lr" in keys and "stages.0.config" in keys and "model.adapter" in keys
    assert dict(problems)["stages.0.overrides.train.lr"].startswith("Input should be a valid number")
    assert dict(problems)["stages.0.overrides.data"] == "data.train: Input should be a valid string"
    assert any(k == "model.adapter" and m.startswith("stage 'a': adapter.method: must be one of") for k, m in problems)
    assert any(k == "stages.0.config" and m.startswith("train.epochs:") for k, m in problems)
    assert any(k == "stages.1" and "data: Field required (give the stage a recipe" in m for k, m in problems)
    assert any(k == "stages.2.config" and "missing.yaml" in m for k, m in problems)
    assert any(k == "stages.3" and "nothing to evaluate" in m for k, m in problems)


def test_metric_suggestions_come_from_finished_runs(tmp_path):
    from tests.ui.helpers import stage_run

    stage_run(tmp_path / "runs" / "a")
    stage_run(tmp_path / "runs" / "b", stage="pretrain")
    stage_run(tmp_path / "runs" / "half", done=False)
    assert pipelines.run_metrics(tmp_path) == {"pretrain": ["acc", "train.steps", "train.train_loss"],
                                               "sft": ["acc", "train.steps", "train.train_loss"]}
    assert pipelines.eval_metrics({"eval": {"tasks": [{"name": "em"}, {"path": "x"}], "forgetting": "g.jsonl"}}) == \
        ["em", "general_ppl"]
