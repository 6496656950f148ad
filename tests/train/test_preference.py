"""The reward-model and DPO stages end to end on a tiny model saved to disk."""

import json

import pytest

from posttrain.cli import main
from posttrain.models import save_model, tiny_model
from posttrain.data.examples import load_pairs
from posttrain.train.preference import DPOConfig, RMConfig, run_dpo, run_rm
from posttrain.train.reward_model import load_reward_model


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    save_model(tiny_model(tokenizer, seed=3), tokenizer, path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pair_rows(n, start=0):
    """Separable pairs: chosen answers are digits, rejected ones shout; two aspects."""
    return [{"prompt": f"What is {i} plus 1?", "chosen": f"{i + 1}", "rejected": "NO NO NO NO!",
             "aspect": "correctness" if i % 2 else "format"} for i in range(start, start + n)]


def test_aspects_map_to_heads_and_unknown_ones_are_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", pair_rows(4))
    pairs, report = load_pairs(tokenizer, path, 64, False, aspects=["format", "correctness"])
    assert [p["aspect"] for p in pairs] == [0, 1, 0, 1] and report["pairs"] == 4
    dpo_pairs, _ = load_pairs(tokenizer, path, 64, False)
    assert "aspect" not in dpo_pairs[0]
    with pytest.raises(ValueError, match=r"record 1: field 'aspect' must be one of \['overall'\]"):
        load_pairs(tokenizer, path, 64, False, aspects=["overall"])


def test_rm_stage_learns_separable_pairs_and_reloads(tmp_path, tiny_dir):
    cfg = RMConfig.model_validate({
        "output_dir": str(tmp_path / "rm"), "model": {"name": str(tiny_dir), "dtype": "fp32"},
        "adapter": {"method": "full"}, "aspects": ["format", "correctness"],
        "data": {"train": write_jsonl(tmp_path / "train.jsonl", pair_rows(32)),
                 "eval": write_jsonl(tmp_path / "test.jsonl", pair_rows(8, start=100))},
        "train": {"epochs": 3, "lr": 1e-3, "batch_size": 8, "progress": False},
    })
    manifest = run_rm(cfg)
    after = manifest["outputs"]["eval_after"]
    assert after["pair_accuracy"] == 1.0
    assert set(after) == {"pair_accuracy", "pair_accuracy/format", "pair_accuracy/correctness"}
    rm, tok = load_reward_model(tmp_path / "rm" / "final")
    assert rm.aspects == ["format", "correctness"]
    eval_json = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert eval_json["after"] == after


def dpo_cfg(tmp_path, tiny_dir, sections=None, **dpo):
    return DPOConfig.model_validate({
        "output_dir": str(tmp_path / "dpo"), "model": {"name": str(tiny_dir), "dtype": "fp32"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train": write_jsonl(tmp_path / "train.jsonl", pair_rows(16)), "eval_fraction": 0.25},
        "dpo": dpo,
        "train": {"max_steps": 4, "lr": 5e-3, "batch_size": 4, "progress": False, "eval_every": 2},
        **(sections or {}),
    })


@pytest.mark.parametrize("dpo", [{"loss": "sigmoid"}, {"loss": "ipo", "reference": "copy"}, {"loss": "simpo"}])
def test_dpo_stage_lowers_the_held_out_loss(tmp_path, tiny_dir, dpo):
    manifest = run_dpo(dpo_cfg(tmp_path, tiny_dir, **dpo))
    history = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert manifest["outputs"]["reference"] == {"sigmoid": "adapters_off", "ipo": "copy", "simpo": "none"}[dpo["loss"]]
    assert (tmp_path / "dpo" / "final" / "adapter_config.json").exists()


def test_dpo_continues_a_previous_rounds_adapter(tmp_path, tiny_dir):
    """adapter.init_from: round 2 starts from round 1's weights (its first held-out loss is round 1's
    last), the reference stays the base, and the manifest records the adapter it continued."""
    for part in ("r1", "r2"):
        (tmp_path / part).mkdir()
    first = run_dpo(dpo_cfg(tmp_path / "r1", tiny_dir))
    start = str(tmp_path / "r1" / "dpo")
    second = run_dpo(dpo_cfg(tmp_path / "r2", tiny_dir, {"adapter": {"method": "lora", "r": 4, "alpha": 8,
                                                                     "init_from": start}}))

    def evals(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]

    one, two = evals(tmp_path / "r1" / "dpo"), evals(tmp_path / "r2" / "dpo")
    assert two[0]["eval_loss"] < one[0]["eval_loss"]  # it does not start over
    assert second["outputs"]["reference"] == "adapters_off"
    assert second["inputs"]["data"]["adapter_init"]["path"] == str(tmp_path / "r1" / "dpo" / "final")
    assert second["inputs"]["data"]["adapter_init"]["sha256"]
    assert "adapter_init" not in first["inputs"]["data"]


def test_full_dpo_precomputes_the_reference(tmp_path, tiny_dir, capsys):
    manifest = run_dpo(dpo_cfg(tmp_path, tiny_dir, {"adapter": {"method": "full"}}))
    assert manifest["outputs"]["reference"] == "precompute"
    assert "reference log-probs precomputed for 16 pairs" in capsys.readouterr().out


def test_dpo_win_rate_judged_by_a_reward_model(tmp_path, tiny_dir, tokenizer):
    from posttrain.train.reward_model import RewardModel, save_reward_model

    save_reward_model(RewardModel(tiny_model(tokenizer, seed=5)), tokenizer, tmp_path / "judge")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {i}."} for i in range(4)])
    cfg = dpo_cfg(tmp_path, tiny_dir, {"eval": {"win_rate": {
        "prompts": prompts, "reward_model": str(tmp_path / "judge"), "max_new_tokens": 6}}})
    manifest = run_dpo(cfg)
    result = json.loads((tmp_path / "dpo" / "win_rate.json").read_text())
    assert len(result["per_prompt"]) == 4 and len(result["after_texts"]) == 4
    wins = sum((p["ours"] > p["theirs"]) + 0.5 * (p["ours"] == p["theirs"]) for p in result["per_prompt"]) / 4
    assert manifest["outputs"]["eval_after"]["win_rate_vs_start"] == pytest.approx(wins)


@pytest.mark.parametrize("overrides,message", [
    (["adapter.method=full", "dpo.reference=adapters_off"], "adapters_off needs an adapter method"),
    (["dpo.loss=simpo", "dpo.reference=copy"], "simpo is reference-free"),
    (["dpo.loss=dpo2"], "unknown preference loss 'dpo2'; choose one of sigmoid, ipo, hinge, simpo"),
])
def test_bad_dpo_configs_are_refused(overrides, message, capsys):
    assert main(["dpo", "data.train=x.jsonl", *overrides]) != 0
    assert message in capsys.readouterr().err


def test_reward_models_refuse_packed_pairs(capsys):
    assert main(["rm", "data.train=x.jsonl", "train.packing=true"]) != 0
    assert "reads each sequence's last token from padded rows" in capsys.readouterr().err


def test_cli_rm_print_config_shows_the_sections(capsys):
    assert main(["rm", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "aspects:\n- overall" in out and "packing: false" in out


RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "recipes"


def unpaired_rows(n, start=0):
    """TRL's unpaired format: digits are desirable answers, shouting is not."""
    return [{"prompt": f"What is {i} plus 1?", "completion": f"{i + 1}" if i % 2 else "NO NO NO NO!",
             "label": bool(i % 2)} for i in range(start, start + n)]


@pytest.mark.parametrize("recipe,rows,extra,reference", [
    ("kto", pair_rows, [], "adapters_off"),  # a pair file feeds KTO: chosen desirable, rejected not
    ("kto", unpaired_rows, ["adapter.method=full", "data.eval=null"], "precompute"),  # no held-out set
    ("orpo", pair_rows, [], "none"),
])
def test_kto_and_orpo_recipes_run_through_the_dpo_verb(tmp_path, tiny_dir, recipe, rows, extra, reference, capsys):
    out = tmp_path / recipe
    code = main(["dpo", "--config", str(RECIPES / f"{recipe}.yaml"), f"model.name={tiny_dir}", "model.dtype=fp32",
                 f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows(16))}",
                 f"data.eval={write_jsonl(tmp_path / 'test.jsonl', rows(8, start=100))}",
                 "train.max_steps=4", "train.lr=5e-3", "train.batch_size=4", "train.eval_every=2",
                 "train.save_every=100", "train.progress=false", "eval.tasks=[]", f"output_dir={out}", *extra])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["reference"] == reference
    report = manifest["outputs"]["data"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if "data.eval=null" in extra:
        assert evals == [] and len(history) == 4
    else:
        assert len(evals) == 2 and evals[-1] < evals[0]
    if recipe == "kto":
        assert report["examples"] == (32 if rows is pair_rows else 16) and "kl" in history[0]
        assert report["desirable"] == (16 if rows is pair_rows else 8)
    else:
        assert report["pairs"] == 16 and "rewards/margin" in history[0]
    if reference == "precompute":
        assert "reference log-probs precomputed" in capsys.readouterr().out


def test_unpaired_losses_refuse_other_record_kinds(tmp_path, tokenizer):
    from posttrain.data.examples import load_unpaired

    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(ValueError, match="c.jsonl: an unpaired loss reads unpaired records .* holds chat records"):
        load_unpaired(tokenizer, chat, 64, False)
