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
    gate = saved["stages"]["a"]["gates"][0]  # the outcome is recorded, and the report shows where the run stopped
    assert gate == {"metric": "plus1", "min": 2.0, "max": None, "relative_to_previous": False, "label": "plus1",
                    "value": saved["stages"]["a"]["metrics"]["plus1"], "passed": False}
    report = (tmp_path / "out" / "report" / "report.html").read_text()
    assert "stopped by a gate after stage a" in report and "not reached" in report and "&lt; min 2.0" in report
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
    gate = json.loads((tmp_path / "out" / "pipeline.json").read_text())["stages"]["a"]["gates"][0]
    assert gate["label"] == f"plus1 - previous ({before:.4g})" and not gate["passed"]
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
    ({"stages": [{"name": "a", "verb": "sft", "gate": [{"metric": " ", "min": 0}]}]}, "gate.0.metric: give the metric"),
    ({"stages": [{"name": "a", "verb": "sft", "gate": [{"metric": "x", "min": 1, "max": 0.5}]}]},
     "gate.0.max: max 0.5 is below min 1: no value passes"),
    ({"stages": [{"name": "a", "verb": "sft", "overrides": {"output_dir": "x"}}]}, "output_dir is set by the pipeline"),
])
def test_bad_pipeline_yaml_is_refused(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"),
                                    "stages": [{"name": "a", "verb": "sft"}], **change}))
    with pytest.raises(ValueError, match=message) as exc:
        load_pipeline(path)
    assert str(path) in str(exc.value)


def test_an_eval_stage_with_nothing_to_evaluate_is_refused_before_anything_runs(tmp_path, tiny_dir, recipe):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"), "model": str(tiny_dir),
                                    "stages": [{"name": "a", "verb": "sft", "config": str(recipe)},
                                               {"name": "b", "verb": "eval"}]}))
    with pytest.raises(ValueError, match="(?s)stage 'b' \\(eval\\).*nothing to evaluate"):
        run_pipeline(load_pipeline(path))
    assert not (tmp_path / "out").exists()


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
    configs = [stage_config(pipe, i)[0] for i in range(len(pipe.all_stages()))]
    assert [c.stage for c in configs] == ["sft", "dpo", "quantize", "eval", "export"]
    assert [c.model.name for c in configs[1:]] == ["runs/pipeline_demo/sft", "runs/pipeline_demo/dpo",
                                                    "runs/pipeline_demo/quantize", "runs/pipeline_demo/quantize"]
    assert configs[1].data.train == "runs/pipeline_demo/data/preference.jsonl"
    assert [c.eval.before for c in configs[:4]] == [True, False, True, False]  # quantize: its recipe's own
    assert configs[1].eval.tasks == configs[3].eval.tasks and configs[1].eval.win_rate is None
    assert configs[0].adapter.method == configs[1].adapter.method == "lora"
    for entry in pipe.data.values():
        assert all(Path(src).is_file() for src in entry.source)


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


def test_data_entries_are_prepared_filtered_and_feed_the_stages(tmp_path, tiny_dir, recipe):
    train = yaml.safe_load(recipe.read_text())["data"]["train"]
    rows = [json.loads(line) for line in open(train)]
    dupes = write_jsonl(tmp_path / "more.jsonl", rows[:3] + [{"messages": [
        {"role": "user", "content": "Mail me at a.b@example.com"}, {"role": "assistant", "content": "ok"}]}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}", "answer": str(i)} for i in range(3)])
    spec = {"name": "t", "output_dir": str(tmp_path / "out"), "model": str(tiny_dir),
            "data": {"sft": {"source": [train, dupes], "filters": {"exact_dedup": True, "near_dedup": {"enabled": False},
                                                                  "min_chars": 1, "pii": {"action": "redact"}}},
                     "syn": {"synth": None, "source": prompts}},
            "stages": [{"name": "a", "verb": "sft", "config": str(recipe), "overrides": {"data.train": "${data.sft}"}}]}
    del spec["data"]["syn"]["synth"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    state = run_pipeline(load_pipeline(path))
    out = tmp_path / "out"
    assert state["data"]["sft"]["rows"] == 16 and state["data"]["sft"]["kept"] == 13  # 3 exact duplicates
    kept = (out / "data" / "sft.jsonl").read_text()
    assert kept.count("\n") == 13 and "[EMAIL]" in kept and "a.b@example.com" not in kept
    assert state["data"]["syn"]["kept"] == 3 and (out / "data" / "syn.jsonl").is_file()
    assert yaml.safe_load((out / "a" / "config.yaml").read_text())["data"]["train"] == str(out / "data" / "sft.jsonl")

    state = run_pipeline(load_pipeline(path))  # nothing changed: every step skipped
    assert [r["status"] for r in [*state["data"].values(), *state["stages"].values()]] == ["skipped"] * 3
    with open(dupes, "a") as f:  # a source changed: its entry and the stage that reads it run again
        f.write(json.dumps({"messages": [{"role": "user", "content": "What is 77 plus 1?"},
                                         {"role": "assistant", "content": "78"}]}) + "\n")
    state = run_pipeline(load_pipeline(path))
    assert [r["status"] for r in [*state["data"].values(), *state["stages"].values()]] == ["done", "skipped", "done"]
    assert state["data"]["sft"]["kept"] == 14


def test_a_synth_entry_appends_generated_rows(tmp_path, tiny_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}", "answer": str(i)} for i in range(3)])
    spec = {"name": "t", "output_dir": str(tmp_path / "out"),
            "data": {"mix": {"source": prompts, "kind": "prompt", "synth_overrides": {
                "mode": "rejection", "teacher.name": str(tiny_dir), "rejection.prompts": prompts, "rejection.k": 2,
                "rejection.verify": False, "rejection.sampling.max_new_tokens": 4}}},
            "stages": [{"name": "a", "verb": "sft"}]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="synth_overrides needs synth"):
        load_pipeline(path)
    recipe = tmp_path / "synth.yaml"
    recipe.write_text(yaml.safe_dump({"mode": "rejection", "output": "ignored.jsonl"}))
    spec["data"]["mix"]["synth"] = str(recipe)
    spec["data"]["mix"]["kind"] = None
    path.write_text(yaml.safe_dump(spec))
    from posttrain.pipeline import prepare_data

    with pytest.raises(ValueError, match="synth writes chat rows, the sources hold prompt rows"):
        prepare_data(load_pipeline(path), "mix")
    spec["data"]["mix"]["source"] = []
    path.write_text(yaml.safe_dump(spec))
    record = prepare_data(load_pipeline(path), "mix")
    rows = [json.loads(line) for line in (tmp_path / "out" / "data" / "mix.jsonl").read_text().splitlines()]
    assert record["counts"]["synth"] == len(rows) == record["kept"] > 0
    assert all(r["provenance"]["teacher"] == str(tiny_dir) for r in rows)


def test_model_init_shared_eval_eval_stage_deploy_and_serve(tmp_path, tiny_dir, recipe, monkeypatch, capsys):
    from posttrain import cli
    from posttrain.models import load_model
    from posttrain.eval.report import metric_table

    task = yaml.safe_load(recipe.read_text())["eval"]["tasks"][0]
    spec = {"name": "t", "output_dir": str(tmp_path / "out"),
            "model": {"name": str(tiny_dir), "adapter": {"method": "lora", "r": 4}},
            "eval": {"tasks": [task]},
            "stages": [{"name": "a", "verb": "sft", "config": str(recipe)},
                       {"name": "b", "verb": "eval", "gate": [{"metric": "plus1", "min": 0, "max": 0,
                                                                "relative_to_previous": True}]}],
            "deploy": {"formats": ["hf"], "overrides": {"check": False}, "serve": {"port": 8123, "args": ["--queue", "3"]}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    served = []
    monkeypatch.setitem(cli.COMMANDS, "serve", lambda args: served.append((args.model, args.port, args.queue)) or 0)
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    config_a = yaml.safe_load((out / "a" / "config.yaml").read_text())
    assert config_a["adapter"]["method"] == "lora" and config_a["adapter"]["r"] == 4  # the pipeline's init
    assert (out / "a" / "final" / "adapter_config.json").is_file()
    assert yaml.safe_load((out / "b" / "config.yaml").read_text())["model"]["name"] == str(out / "a")
    state = json.loads((out / "pipeline.json").read_text())
    table = metric_table(state)
    assert list(table) == ["input", "a", "b"] and table["b"] == table["a"]  # same model, same greedy eval
    assert yaml.safe_load((out / "deploy" / "config.yaml").read_text())["model"]["name"] == str(out / "a")
    assert (out / "deploy" / "final" / "config.json").is_file()
    assert not (out / "deploy" / "final" / "adapter_config.json").exists()  # the adapter is merged
    load_model(str(out / "deploy"), dtype="fp32")
    assert served == [(str(out / "deploy"), 8123, 3)]
    printed = capsys.readouterr().out
    assert "plus1" in printed and "input" in printed and "deploy done" in printed

    assert main(["run", str(path), "--no-serve"]) == 0 and len(served) == 1
    assert capsys.readouterr().out.count("skipped (unchanged)") == 3


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"name": "a", "verb": "sft", "overrides": {"data.train": "${data.nope}"}}]},
     "\\$\\{data.nope\\} names no entry of data"),
    ({"deploy": {"source": "nope"}}, "deploy.source 'nope' is not a stage that makes a model"),
    ({"data": {"x": {}}}, "needs source \\(files\\) or synth"),
    ({"data": {"x": {"synth": "s.yaml", "synth_overrides": {"output": "o"}}}}, "output is set by the pipeline"),
    ({"stages": [{"name": "deploy", "verb": "sft"}], "deploy": {}}, "'deploy' is taken"),
    ({"eval": {"taskz": []}}, "taskz"),
    ({"deploy": {"swap_into": "http://127.0.0.1:8000", "serve": {}}}, "choose one"),
    ({"deploy": {"swap_into": "127.0.0.1:8000"}}, "not a server address like http://"),
    ({"deploy": {"swap_name": "x"}}, "swap_name needs swap_into"),
    ({"deploy": {"formats": []}}, "exports at least one format"),
    ({"deploy": {"swap_into": "http://h:1", "formats": [], "gate": [{"metric": "m", "min": 0}]}},
     "no export stage to gate"),
    ({"stages": [{"name": "a", "verb": "sft"}, {"name": "b", "verb": "dpo"}], "deploy": {"swap_into": "http://h:1"}},
     "stage 'b' trains over .*/a, not over the pipeline's model"),
    ({"stages": [{"name": "q", "verb": "quantize"}], "deploy": {"swap_into": "http://h:1"}},
     "stage 'q' \\(quantize\\) does not train an adapter"),
    ({"stages": [{"name": "r", "verb": "rm"}], "deploy": {"swap_into": "http://h:1"}}, "does not train an adapter"),
])
def test_bad_sections_are_refused(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"),
                                    "stages": [{"name": "a", "verb": "sft"}], **change}))
    with pytest.raises(ValueError, match=message):
        load_pipeline(path)


def test_weights_changed_outside_the_pipeline_rerun_the_stages_after(tmp_path, tiny_dir, recipe):
    path = write_pipeline(tmp_path, tiny_dir, recipe)
    run_pipeline(load_pipeline(path))
    weights = next((tmp_path / "out" / "a" / "final").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same bytes: still unchanged
    assert [s["status"] for s in run_pipeline(load_pipeline(path))["stages"].values()] == ["skipped", "skipped"]
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})  # stage a's output edited by hand
    assert [s["status"] for s in run_pipeline(load_pipeline(path))["stages"].values()] == ["skipped", "done"]


def test_feedback_sources_feed_dpo_and_kto_stages(tmp_path, tiny_dir):
    """`feedback:DB` entries: choices -> pairs for a DPO stage, ratings -> KTO examples for a
    KTO stage; unchanged feedback skips, new feedback re-runs."""
    from posttrain.data.feedback import open_store
    from tests.data.test_feedback import populate

    db = tmp_path / "serve" / "feedback.db"
    populate(db)
    train = {"train.max_steps": 1, "train.batch_size": 2, "train.progress": False, "data.max_length": 64,
             "adapter.method": "lora", "adapter.r": 2}
    spec = {"name": "t", "output_dir": str(tmp_path / "out"), "model": str(tiny_dir),
            "data": {"pairs": {"source": f"feedback:{db}", "filters": {"near_dedup": {"enabled": False}}},
                     "kto": {"source": [f"feedback:{db}"], "kind": "unpaired"}},
            "stages": [{"name": "dpo", "verb": "dpo", "overrides": {**train, "data.train": "${data.pairs}"}},
                       {"name": "kto", "verb": "dpo", "overrides": {**train, "data.train": "${data.kto}",
                                                                   "dpo.loss": "kto"}}]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    state = run_pipeline(load_pipeline(path))
    assert state["data"]["pairs"]["kind"] == "preference" and state["data"]["pairs"]["kept"] == 3
    assert state["data"]["kto"]["kind"] == "unpaired" and state["data"]["kto"]["kept"] == 3
    assert (tmp_path / "out" / "data" / "kto.filter.json").is_file()  # default filters on raw traffic
    out = tmp_path / "out"
    assert (out / "dpo" / "final" / "adapter_config.json").is_file()
    assert (out / "kto" / "final" / "adapter_config.json").is_file()
    assert json.loads((out / "dpo" / "manifest.json").read_text())["outputs"]["data"]["pairs"] == 3

    state = run_pipeline(load_pipeline(path))
    assert [r["status"] for r in state["data"].values()] == ["skipped", "skipped"]
    store = open_store(db)
    store.add_rating("c3-0", "up")  # new feedback: the KTO data changes, the pairs do not
    store.close()
    state = run_pipeline(load_pipeline(path))
    assert {k: r["status"] for k, r in state["data"].items()} == {"pairs": "skipped", "kto": "done"}
    assert state["data"]["kto"]["kept"] == 4 and state["stages"]["kto"]["status"] == "done"
    assert state["stages"]["dpo"]["status"] == "skipped"


@pytest.mark.parametrize("entry, message", [
    ({"source": "feedback:"}, "give the database"),
    ({"source": "feedback:x.db", "kind": "chat"}, "a feedback source gives preference pairs"),
])
def test_bad_feedback_sources_are_refused(tmp_path, entry, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"), "data": {"x": entry},
                                    "stages": [{"name": "a", "verb": "sft"}]}))
    with pytest.raises(ValueError, match=message):
        load_pipeline(path)


def test_a_missing_feedback_database_names_the_entry(tmp_path):
    from posttrain.pipeline import prepare_data

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "out"),
                                    "data": {"fb": {"source": f"feedback:{tmp_path}/none.db"}},
                                    "stages": [{"name": "a", "verb": "sft"}]}))
    with pytest.raises(ValueError, match="data 'fb': source feedback:.*none.db: .*no such file"):
        prepare_data(load_pipeline(path), "fb")


def test_deploy_serve_passes_its_feedback_database(tmp_path):
    from posttrain.cli import serve_argv

    spec = {"name": "t", "output_dir": str(tmp_path / "out"), "stages": [{"name": "a", "verb": "sft"}],
            "deploy": {"serve": {"port": 8124, "feedback_db": "postgresql://me@db/fb", "args": ["--queue", "3"]}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert serve_argv(load_pipeline(path)) == ["serve", str(tmp_path / "out" / "deploy"), "--host", "127.0.0.1",
                                               "--port", "8124", "--feedback-db", "postgresql://me@db/fb",
                                               "--queue", "3"]
    del spec["deploy"]["serve"]["feedback_db"]  # default: the server's own, <output_dir>/deploy/serve/feedback.db
    path.write_text(yaml.safe_dump(spec))
    assert "--feedback-db" not in serve_argv(load_pipeline(path))


def test_the_plan_predicts_what_the_run_does(tmp_path, tiny_dir, recipe):
    """plan_pipeline (shown by the web studio before a run) says run, skip or resume as run_pipeline then does."""
    from posttrain.pipeline import plan_pipeline

    path = write_pipeline(tmp_path, tiny_dir, recipe, gate=[{"metric": "plus1", "min": 0}])
    plan = plan_pipeline(load_pipeline(path))
    assert [(s["name"], s["verb"], s["action"]) for s in plan["stages"]] == [("a", "sft", "run"), ("b", "sft", "run")]
    out = tmp_path / "out"
    assert plan["stages"][0]["input_model"] == str(tiny_dir) and plan["stages"][1]["input_model"] == str(out / "a")
    assert plan["stages"][0]["gates"][0]["metric"] == "plus1" and plan["stages"][1]["run_dir"] == str(out / "b")
    run_pipeline(load_pipeline(path))
    assert [s["action"] for s in plan_pipeline(load_pipeline(path))["stages"]] == ["skip", "skip"]
    changed = write_pipeline(tmp_path, tiny_dir, recipe, second={"train.lr": 5e-4}, gate=[{"metric": "plus1", "min": 0}],
                             name="changed.yaml")
    assert [s["action"] for s in plan_pipeline(load_pipeline(changed))["stages"]] == ["skip", "run"]
    record = json.loads((out / "b" / "pipeline_stage.json").read_text())  # b interrupted after a checkpoint
    (out / "b" / "pipeline_stage.json").write_text(json.dumps({**record, "status": "running"}))
    (out / "b" / "checkpoints").mkdir(exist_ok=True)
    assert [s["action"] for s in plan_pipeline(load_pipeline(path))["stages"]] == ["skip", "resume"]
    with pytest.raises(ValueError, match="stage 'b'"):
        plan_pipeline(load_pipeline(write_pipeline(tmp_path, tiny_dir, recipe, second={"train.lr": -1}, name="bad.yaml")))
