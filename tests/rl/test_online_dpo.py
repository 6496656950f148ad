"""Online DPO on a tiny model: pairs from its own samples, a reward it can learn."""

import json

import pytest
import torch

from posttrain.models import save_model, tiny_model
from posttrain.rl.online_dpo import OnlineDPOConfig, preference_pairs, run_online_dpo


def test_best_worst_pairs_skip_prompts_without_a_preference():
    scores = torch.tensor([0.0, 1.0, 0.5, 2.0, 2.0, 2.0])
    pairs = preference_pairs(["p", "q"], [{"answer": "1"}, {}], [["a", "b", "c"], ["d", "e", "f"]], scores)
    assert pairs == [{"prompt": "p", "chosen": "b", "rejected": "a", "chosen_reward": 1.0, "rejected_reward": 0.0,
                      "answer": "1"}]


def test_all_pairs_best_separated_first_capped_and_without_repeated_texts():
    scores = torch.tensor([0.0, 1.0, 0.5, 1.0])
    texts = [["a", "b", "c", "b"]]
    pairs = preference_pairs(["p"], [{}], texts, scores, mode="all", max_per_prompt=10)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a"), ("b", "c"), ("c", "a")]
    capped = preference_pairs(["p"], [{}], texts, scores, mode="all", max_per_prompt=1)
    assert [(p["chosen"], p["rejected"]) for p in capped] == [("b", "a")]


def _config(tmp_path, tokenizer, name="run", dropout=0.0, **train):
    if not (tmp_path / "tiny").exists():
        save_model(tiny_model(tokenizer, seed=2), tokenizer, tmp_path / "tiny")
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(16)))
    return OnlineDPOConfig.model_validate({
        "output_dir": str(tmp_path / name), "model": {"name": str(tmp_path / "tiny"), "dtype": "fp32"},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": dropout},
        "data": {"prompts": str(tmp_path / "prompts.jsonl")},
        # replies that start with a space win; with top-k 8 the random model's first token is
        # a space-led one about 65% of the time, so there is a preference to learn
        "reward": {"type": "format", "pattern": "^\\s"},
        "sampling": {"samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 2, "top_k": 8},
        "dpo": {"beta": 0.5},
        "train": {"max_steps": 24, "lr": 2e-2, "progress": False, **train},
    })


def test_online_dpo_raises_the_reward_of_fresh_samples(tmp_path, tokenizer):
    cfg = _config(tmp_path, tokenizer)
    manifest = run_online_dpo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert sum(r["pairs"] for r in rows) > 0
    first, last = manifest["outputs"]["reward_first5"], manifest["outputs"]["reward_last5"]
    assert last > first + 0.2, (first, last)  # measured: 0.65 -> 1.00
    assert (tmp_path / "run" / "plots" / "online_dpo.png").exists()
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()


@pytest.mark.parametrize("extra,message", [
    ({"reward": {"type": "lenght"}}, r"invalid reward:\n\s*type: must be one of"),
    ({"dpo": {"reference": "precompute"}}, "online pairs are new every step"),
    ({"sampling": {"samples_per_prompt": 1}}, "samples_per_prompt"),
    ({"dpo": {"loss": "kto"}}, "kto reads unpaired examples; online DPO trains on the pairs it samples"),
])
def test_bad_online_configs_name_the_field(extra, message):
    raw = {"data": {"prompts": "p.jsonl"}, "reward": {"type": "verifier"}, **extra}
    with pytest.raises(ValueError, match=message):
        OnlineDPOConfig.model_validate(raw)


def test_sigkill_mid_online_dpo_then_resume_matches_the_uninterrupted_run(tmp_path, tokenizer):
    from tests.rl.rl_worker import straight_and_killed

    extra = {"max_steps": 10, "save_every": 3, "warmup_ratio": 0.2, "schedule": "cosine"}
    a, b = straight_and_killed(_config(tmp_path, tokenizer, "straight", dropout=0.1, **extra),
                               _config(tmp_path, tokenizer, "killed", dropout=0.1, **extra), 10)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
