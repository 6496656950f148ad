"""Pipeline runner: chaining, skip-if-unchanged, re-run of a changed stage, gates, bad YAML."""

import json

import pytest
import yaml

from posttrain.cli import main
from posttrain.pipeline import load_pipeline, run_pipeline


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def recipe(tmp_path):
    """A tiny SFT recipe: 2 steps, one 4-row generation task, no eval before."""
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                      {"role": "assistant", "content": f"{i + 1}"}]} for i in range(12)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}
                                                  for i in range(30, 34)])
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"dtype": "fp32"},
        "adapter": {"method": "full"},
        "data": {"train": train},
        "train": {"max_steps": 2, "lr": 1e-3, "max_tokens": 256, "progress": False},
        "eval": {"tasks": [{"name": "plus1", "path": test, "type": "generation", "metric": "accuracy",
                            "max_new_tokens": 4}]}}))
    return path


def write_pipeline(tmp_path, tiny_dir, recipe, second=None, gate=None, name="pipe.yaml"):
    stages = [{"name": "a", "verb": "sft", "config": str(recipe), **({"gate": gate} if gate else {})},
              {"name": "b", "verb": "sft", "config": str(recipe), "overrides": second or {}}]
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"), "model": str(tiny_dir),
                                    "stages": stages}))
    return path


def test_chain_skip_and_rerun_of_a_changed_stage(tmp_path, tiny_dir, recipe, capsys):
    path = write_pipeline(tmp_path, tiny_dir, recipe)
    state = run_pipeline(load_pipeline(path))
    assert [s["status"] for s in state["stages"].values()] == ["done", "done"]
    out = tmp_path / "out"
    config_b = yaml.safe_load((out / "b" / "config.yaml").read_text())
    assert config_b["model"]["name"] == str(out / "a")  # the second stage reads the first's run dir
    assert json.loads((out / "b" / "manifest.json").read_text())["inputs"]["model"]["resolved"] == str(out / "a" / "final")
    assert "plus1" in state["stages"]["a"]["metrics"]
    mtime_a = (out / "a" / "manifest.json").stat().st_mtime_ns

    assert main(["run", str(path)]) == 0
    assert capsys.readouterr().out.count("skipped (unchanged)") == 2
    saved = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in saved["stages"].values()] == ["skipped", "skipped"]

    path = write_pipeline(tmp_path, tiny_dir, recipe, second={"train.lr": 5e-4})
    state = run_pipeline(load_pipeline(path))
    assert [s["status"] for s in state["stages"].values()] == ["skipped", "done"]
    assert (out / "a" / "manifest.json").stat().st_mtime_ns == mtime_a
    assert yaml.safe_load((out / "b" / "config.yaml").read_text())["train"]["lr"] == 5e-4

    train = yaml.safe_load(recipe.read_text())["data"]["train"]  # same path, new content: both re-run
    with open(train, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "What is 99 plus 1?"},
                                         {"role": "assistant", "content": "100"}]}) + "\n")
    state = run_pipeline(load_pipeline(path))
    assert [s["status"] for s in state["stages"].values()] == ["done", "done"]


def test_a_failed_gate_stops_the_run(tmp_path, tiny_dir, recipe, capsys):
    path = write_pipeline(tmp_path, tiny_dir, recipe, gate=[{"metric": "plus1", "min": 2.0}])
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "gate failed after stage a: metric plus1 = " in err and "< min 2.0" in err
    saved = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert saved["stages"]["a"]["status"] == "failed_gate" and "b" not in saved["stages"]
    assert not (tmp_path / "out" / "b").exists()
    # the gates are re-checked on the recorded metrics without re-training; a missing metric is named
    mtime = (tmp_path / "out" / "a" / "manifest.json").stat().st_mtime_ns
    path = write_pipeline(tmp_path, tiny_dir, recipe, gate=[{"metric": "nope", "max": 1}])
    with pytest.raises(ValueError, match="metric 'nope' not found; available: \\['plus1'\\]"):
        run_pipeline(load_pipeline(path))
    # relative: the change from the input model (its eval_before here, the first stage)
    before = saved["stages"]["a"]["metrics_before"]["plus1"]
    path = write_pipeline(tmp_path, tiny_dir, recipe, gate=[{"metric": "plus1", "max": -1,
                                                              "relative_to_previous": True}])
    with pytest.raises(ValueError, match=f"metric plus1 - previous \\({before:.4g}\\) = .* > max -1"):
        run_pipeline(load_pipeline(path))
    # a dotted path into the manifest outputs
    path = write_pipeline(tmp_path, tiny_dir, recipe, gate=[{"metric": "train.steps", "min": 3}])
    with pytest.raises(ValueError, match="gate failed after stage a: metric train.steps = 2 < min 3"):
        run_pipeline(load_pipeline(path))
    assert (tmp_path / "out" / "a" / "manifest.json").stat().st_mtime_ns == mtime


def test_an_unfinished_stage_resumes(tmp_path, tiny_dir, recipe, monkeypatch):
    from posttrain.train import sft

    path = write_pipeline(tmp_path, tiny_dir, recipe, second={"train.save_every": 1})  # b leaves checkpoints
    calls = []
    real = sft.run_sft

    def crash(cfg, resume=False, overwrite=False):
        calls.append((cfg.output_dir.rsplit("/", 1)[-1], resume, overwrite))
        if len(calls) == 2:
            real(cfg, resume=resume, overwrite=overwrite)
            raise RuntimeError("killed")
        return real(cfg, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(sft, "run_sft", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(load_pipeline(path))
    assert json.loads((tmp_path / "out" / "b" / "pipeline_stage.json").read_text())["status"] == "error"
    run_pipeline(load_pipeline(path))
    assert calls == [("a", False, True), ("b", False, True), ("b", True, False)]


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"name": "a", "verb": "sftt"}]}, "stages.0.verb: must be one of"),
    ({"stages": [{"name": "a", "verb": "sft"}, {"name": "a", "verb": "dpo"}]}, "'a' is used twice"),
    ({"stagse": []}, "stagse: unknown key"),
    ({"stages": [{"name": "a", "verb": "sft", "gate": [{"metric": "x"}]}]}, "needs min or max"),
    ({"stages": [{"name": "a", "verb": "sft", "overrides": {"output_dir": "x"}}]}, "output_dir is set by the pipeline"),
])
def test_bad_pipeline_yaml_is_refused(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"),
                                    "stages": [{"name": "a", "verb": "sft"}], **change}))
    with pytest.raises(ValueError, match=message) as exc:
        load_pipeline(path)
    assert str(path) in str(exc.value)


def test_a_bad_stage_override_names_the_stage(tmp_path, tiny_dir, recipe):
    path = write_pipeline(tmp_path, tiny_dir, recipe, second={"train.lrr": 1})
    with pytest.raises(ValueError, match="(?s)stage 'b' \\(sft\\).*train.lrr: unknown key"):
        run_pipeline(load_pipeline(path))
    assert not (tmp_path / "out").exists()  # refused before stage a ran


def test_the_demo_pipeline_validates(monkeypatch):
    from pathlib import Path

    from posttrain.pipeline import stage_config

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # recipe paths are relative to the repo root
    pipe = load_pipeline("recipes/pipeline_demo.yaml")
    configs = [stage_config(pipe, i)[0] for i in range(len(pipe.stages))]
    assert [c.stage for c in configs] == ["sft", "dpo", "quantize", "export"]
    assert configs[1].model.name == "runs/pipeline_demo/sft"


def test_a_lora_stage_feeds_the_next_through_a_merged_copy(tmp_path, tiny_dir, recipe):
    lora = {"adapter.method": "lora", "adapter.r": 4}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"), "model": str(tiny_dir),
                                    "stages": [{"name": "a", "verb": "sft", "config": str(recipe), "overrides": lora},
                                               {"name": "b", "verb": "sft", "config": str(recipe), "overrides": lora}]}))
    state = run_pipeline(load_pipeline(path))
    assert [s["status"] for s in state["stages"].values()] == ["done", "done"]
    merged = tmp_path / "out" / "b" / "input_merged"
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    assert yaml.safe_load((tmp_path / "out" / "b" / "config.yaml").read_text())["model"]["name"] == str(merged)
    assert [s["status"] for s in run_pipeline(load_pipeline(path))["stages"].values()] == ["skipped", "skipped"]
