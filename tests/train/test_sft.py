"""The SFT/pretrain stage end to end on a tiny model saved to disk."""

import json

import pytest
import yaml

from posttrain.config import build_config
from posttrain.models import load_model, save_model, tiny_model
from posttrain.train.sft import SFTConfig, run_sft


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    save_model(tiny_model(tokenizer), tokenizer, path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n):
    return [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(n)]


def make_cfg(tmp_path, tiny_dir, **sections) -> SFTConfig:
    return SFTConfig.model_validate(cfg_dict(tmp_path, tiny_dir, **sections))


def cfg_dict(tmp_path, tiny_dir, **sections) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}
                                                  for i in range(30, 34)])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The river runs to the sea. " * 3}] * 4)
    data = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": str(tiny_dir), "dtype": "fp32"},
        "data": {"train": train, "eval_fraction": 0.25},
        "train": {"max_steps": 4, "lr": 1e-3, "max_tokens": 256, "eval_every": 2, "save_every": 2,
                  "progress": False},
        "eval": {"tasks": [{"name": "plus1", "path": test, "type": "generation", "metric": "accuracy",
                            "max_new_tokens": 4}], "forgetting": text},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def test_lora_sft_writes_a_complete_run_dir(tmp_path, tiny_dir):
    cfg = make_cfg(tmp_path, tiny_dir)
    manifest = run_sft(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "manifest.json", "final/adapter_config.json",
                 "plots/loss.png", "plots/eval.png"):
        assert (run / name).exists(), name
    assert manifest["stage"] == "sft"
    assert manifest["inputs"]["data"]["train"]["sha256"]
    assert set(manifest["outputs"]["eval_after"]) == {"plus1", "general_ppl"}
    assert manifest["outputs"]["eval_before"]["general_ppl"] > 1
    assert manifest["outputs"]["train"]["steps"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["adapter"]["method"] == "lora"
    model, _ = load_model(run, dtype="fp32")  # run dir -> final/ adapter over its base
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_existing_run_needs_resume_or_overwrite(tmp_path, tiny_dir):
    cfg = make_cfg(tmp_path, tiny_dir)
    run_sft(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        run_sft(cfg)
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 5e-4})})
    with pytest.raises(ValueError, match="config differs"):
        run_sft(changed, resume=True)
    assert run_sft(cfg, overwrite=True)["outputs"]["train"]["steps"] == 4


def test_pretrain_stage_on_text(tmp_path, tiny_dir):
    raw = cfg_dict(tmp_path, tiny_dir, stage="pretrain", adapter={"method": "full"},
                   train={"eval_every": None})
    raw["data"] = {"train": raw["eval"]["forgetting"]}
    manifest = run_sft(SFTConfig.model_validate(raw))
    assert manifest["stage"] == "pretrain"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_ewc_stage_runs_with_a_penalty(tmp_path, tiny_dir):
    raw = cfg_dict(tmp_path, tiny_dir, train={"ewc_weight": 100.0})
    raw["ewc"] = {"reference": raw["eval"]["forgetting"]}
    run_sft(SFTConfig.model_validate(raw))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["ewc_penalty"] > 0
    assert (tmp_path / "run" / "ewc.safetensors").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train=x.jsonl", "adapter.method=lorax"], "adapter.method: must be one of"),
        (["data.train=x.jsonl", "train.lrr=1"], "train.lrr: unknown key"),
        (["data.train=x.jsonl", "train.ewc_weight=1"], "needs ewc.reference"),
        (["data.train=x.jsonl", "adapter.method=prompt"], "set train.packing=false"),
        (["train.lr=1"], "data: Field required"),
        (["data.train=x.jsonl", "train.early_stopping_patience=2"], "needs train.eval_every"),
    ],
)
def test_bad_configs_are_refused_before_any_model_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(SFTConfig, None, overrides)


def test_yaml_bare_no_means_no_mixed_precision(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {train: x.jsonl}\ntrain: {mixed_precision: no}\n")  # YAML reads `no` as false
    assert build_config(SFTConfig, path).train.mixed_precision == "no"
    path.write_text("data: {train: x.jsonl}\ntrain: {mixed_precision: true}\n")
    with pytest.raises(ValueError, match="train.mixed_precision"):
        build_config(SFTConfig, path)


@pytest.mark.parametrize(
    "adapter, train",
    [
        ({"method": "full"}, {}),
        ({"method": "freeze", "freeze_layers": 1}, {}),
        ({"method": "dora", "r": 4}, {}),
        ({"method": "ia3"}, {}),
        ({"method": "prompt", "num_virtual_tokens": 4}, {"packing": False, "batch_size": 4}),
    ],
    ids=lambda v: v.get("method", ""),
)
def test_every_method_trains_and_reloads(tmp_path, tiny_dir, adapter, train):
    raw = cfg_dict(tmp_path, tiny_dir, adapter=adapter, train={"eval_every": None, "save_every": None, **train})
    raw["eval"] = {"before": False}
    raw["data"] = {"train": raw["data"]["train"]}
    manifest = run_sft(SFTConfig.model_validate(raw))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows)
    assert manifest["outputs"]["trainable"]["trainable"] > 0
    model, _ = load_model(tmp_path / "run", dtype="fp32")
    assert model is not None


def test_multitask_bottleneck_routes_rows_by_task(tmp_path, tiny_dir):
    rows = [{"task": "add", **r} for r in chat_rows(8)] + [
        {"task": "echo", "messages": [{"role": "user", "content": f"echo {w}"},
                                      {"role": "assistant", "content": w}]} for w in "abcdefgh"]
    train = write_jsonl(tmp_path / "multi.jsonl", rows)
    raw = cfg_dict(tmp_path, tiny_dir, adapter={"method": "bottleneck", "tasks": ["add", "echo"],
                                                 "bottleneck_size": 8},
                   train={"eval_every": None, "save_every": None})
    raw["eval"] = {"before": False}
    raw["data"] = {"train": train}
    run_sft(SFTConfig.model_validate(raw))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "final" / "bottleneck_adapters.safetensors"))
    # both tasks' up-projections moved away from their zero init: each got its own rows
    for task in ("add", "echo"):
        ups = [v for k, v in saved.items() if f"adapters.{task}.up" in k]
        assert ups and any(v.abs().sum() > 0 for v in ups), task
