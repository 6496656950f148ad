"""The reward model: Bradley-Terry training, multi-head, LoRA, save/load, and scoring with it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from posttrain.adapters import AdapterConfig, apply_adapter
from posttrain.config import TrainConfig
from posttrain.data.collate import collate_pairs
from posttrain.data.templates import IGNORE, encode_chat, encode_preference
from posttrain.models import load_model, save_model, tiny_model
from posttrain.train.loop import train
from posttrain.train.reward_model import (
    RewardModelScorer,
    bradley_terry_loss,
    encode_for_reward,
    load_reward_model,
    pairwise_accuracy,
    reward_model_from_lm,
    save_reward_model,
)

X = 1000  # the token every chosen completion of the toy set contains
PAD = 2


def toy_pairs(n: int, seed: int, aspect: int | None = None) -> list[dict]:
    """Separable pairs in the shared format: same prompt, chosen completion contains X."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(2000, 3000) for _ in range(4)]
        chosen = [rng.randrange(2000, 3000) for _ in range(rng.randrange(3, 7))]
        rejected = [rng.randrange(2000, 3000) for _ in range(rng.randrange(3, 7))]
        chosen[rng.randrange(len(chosen))] = X
        ex = {"chosen_input_ids": prompt + chosen, "chosen_labels": [IGNORE] * 4 + chosen,
              "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE] * 4 + rejected}
        if aspect is not None:
            ex["aspect"] = aspect
        out.append(ex)
    return out


def collate(examples: list[dict]) -> dict:
    return collate_pairs(examples, PAD)


def train_bt(rm, pairs: list[dict], steps: int, lr: float = 1e-3, batch_size: int = 8) -> list[dict]:
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        start = (step * batch_size) % len(pairs)
        loss, metrics = bradley_terry_loss(rm, collate(pairs[start : start + batch_size]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    return history


def held_out(n: int = 64) -> list[dict]:
    pairs = toy_pairs(n, seed=1)
    return [collate(pairs[i : i + 16]) for i in range(0, n, 16)]


# ----------------------------------------------------------------------------- reward model


def test_bradley_terry_training_learns_toy_preference(tiny):
    rm = reward_model_from_lm(tiny)
    batches = held_out()
    before = pairwise_accuracy(rm, batches)
    history = train_bt(rm, toy_pairs(256, seed=0), steps=40)
    after = pairwise_accuracy(rm, batches)
    assert before < 0.7
    assert after >= 0.95, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert rm.training  # pairwise_accuracy restores the mode it found


def test_bradley_terry_through_the_training_loop(tiny, tmp_path):
    rm = reward_model_from_lm(tiny)
    cfg = TrainConfig(packing=False, batch_size=8, max_steps=40, lr=1e-3, schedule="constant", warmup_ratio=0.0,
                      progress=False)
    _, summary = train(rm, bradley_terry_loss, toy_pairs(256, seed=0), cfg, tmp_path / "run", pad_token_id=PAD)
    assert summary["steps"] == 40
    assert pairwise_accuracy(rm, held_out()) >= 0.95


def test_bt_loss_and_metrics_by_hand(tiny):
    rm = reward_model_from_lm(tiny, aspects=["helpful", "safe"])
    pairs = toy_pairs(4, seed=3)
    for i, e in enumerate(pairs):
        e["aspect"], e["margin"] = i % 2, 0.5 * i
    batch = collate(pairs)
    loss, m = bradley_terry_loss(rm, batch)
    with torch.no_grad():
        s = rm(batch["input_ids"], batch["attention_mask"])
    aspect = torch.tensor([0, 1, 0, 1])
    rc, rr = s[:4][torch.arange(4), aspect], s[4:][torch.arange(4), aspect]
    margin = torch.tensor([0.0, 0.5, 1.0, 1.5])
    assert torch.allclose(loss, -F.logsigmoid(rc - rr - margin).mean(), atol=1e-6)
    assert m["loss_tokens"] == 4
    assert m["accuracy"] == pytest.approx((rc > rr).float().mean().item())
    assert m["reward/chosen"] == pytest.approx(rc.mean().item(), abs=1e-6)
    assert m["reward/rejected"] == pytest.approx(rr.mean().item(), abs=1e-6)
    assert m["reward/margin"] == pytest.approx((rc - rr).mean().item(), abs=1e-6)


def test_score_read_at_last_real_token_whatever_the_padding(tiny):
    rm = reward_model_from_lm(tiny).eval()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    with torch.no_grad():
        alone = rm(torch.tensor([short]), torch.ones(1, 3, dtype=torch.long))
        padded = rm(torch.tensor([short + [PAD] * 3, long]), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]))
    assert torch.allclose(padded[0], alone[0], atol=1e-5)


def test_multi_head_gradient_reaches_only_the_pairs_aspect(tiny):
    rm = reward_model_from_lm(tiny, aspects=["helpful", "safe", "concise"])
    loss, _ = bradley_terry_loss(rm, collate(toy_pairs(4, seed=2, aspect=1)))
    loss.backward()
    grad_w, grad_b = rm.head.weight.grad, rm.head.bias.grad
    assert grad_w[1].abs().sum() > 0
    assert torch.equal(grad_w[[0, 2]], torch.zeros_like(grad_w[[0, 2]]))
    assert torch.equal(grad_b[[0, 2]], torch.zeros(2))
    with pytest.raises(ValueError, match="heads 0..2"):
        bradley_terry_loss(rm, collate(toy_pairs(2, seed=2, aspect=3)))


def test_lora_backbone_trains_head_and_adapter_only(tiny):
    lm = apply_adapter(tiny, AdapterConfig(method="lora", r=8, target_modules=["q_proj", "v_proj"]))
    rm = reward_model_from_lm(lm)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in rm.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in rm.named_parameters() if "lora_B" in n}
    train_bt(rm, toy_pairs(256, seed=0), steps=40, lr=3e-3)
    assert pairwise_accuracy(rm, held_out()) >= 0.9
    assert all(torch.equal(p, frozen_before[n]) for n, p in rm.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, lora_before[n]) for n, p in rm.named_parameters() if "lora_B" in n)


def _scores(rm, batch):
    with torch.no_grad():
        return rm.eval()(batch["input_ids"], batch["attention_mask"])


def test_save_load_round_trip_full(tiny, tokenizer, tmp_path):
    rm = reward_model_from_lm(tiny, aspects=["helpful", "safe"])
    train_bt(rm, toy_pairs(16, seed=0), steps=2)
    out = save_reward_model(rm, tokenizer, tmp_path / "rm")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    loaded, tok = load_reward_model(out, dtype="fp32")
    assert loaded.aspects == ["helpful", "safe"]
    batch = collate(toy_pairs(4, seed=5))
    assert torch.equal(_scores(loaded, batch), _scores(rm, batch))
    assert tok.chat_template == tokenizer.chat_template
    lm, _ = load_model(out, dtype="fp32")  # the directory is still a plain causal LM
    assert type(lm).__name__ == "LlamaForCausalLM"


def test_save_load_round_trip_lora(tokenizer, tmp_path):
    save_model(tiny_model(tokenizer), tokenizer, tmp_path / "base")  # the adapter's base must be on disk
    base, _ = load_model(tmp_path / "base", dtype="fp32")
    rm = reward_model_from_lm(apply_adapter(base, AdapterConfig(method="lora", r=4, target_modules=["q_proj"])))
    train_bt(rm, toy_pairs(16, seed=0), steps=2, lr=1e-2)  # lora_B leaves zero
    save_reward_model(rm, tokenizer, tmp_path / "rm")
    assert (tmp_path / "rm" / "adapter_config.json").is_file()
    loaded, _ = load_reward_model(tmp_path / "rm", dtype="fp32")
    batch = collate(toy_pairs(4, seed=5))
    assert torch.allclose(_scores(loaded, batch), _scores(rm, batch), atol=1e-6)


def test_load_reward_model_refuses_a_plain_model(tiny, tokenizer, tmp_path):
    save_model(tiny, tokenizer, tmp_path / "lm")
    with pytest.raises(ValueError, match="reward_model.json"):
        load_reward_model(tmp_path / "lm")


def test_reward_model_scorer_scores_what_training_encodes(tiny, tokenizer):
    rm = reward_model_from_lm(tiny, aspects=["helpful", "safe"])
    prompts, completions = ["hi", "what is 2+2?", "name a colour"], ["hello", "4", "a rather longer answer: blue"]
    ids = [encode_chat(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": c}])["input_ids"]
           for p, c in zip(prompts, completions)]
    assert [encode_for_reward(tokenizer, p, c) for p, c in zip(prompts, completions)] == ids
    pair = encode_preference(tokenizer, {"prompt": prompts[1], "chosen": completions[1], "rejected": "5"})
    assert pair["chosen_input_ids"] == ids[1]  # the scorer sees what reward-model training saw
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    pair = encode_preference(tokenizer, {"prompt": history, "chosen": "4", "rejected": "5"})
    assert encode_for_reward(tokenizer, history, "5") == pair["rejected_input_ids"]
    with torch.no_grad():
        expected = torch.cat([rm(torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long)) for i in ids])
    out = RewardModelScorer(rm, tokenizer, batch_size=2)(prompts, completions)
    assert torch.allclose(out.scores, expected[:, 0], atol=1e-5)
    assert set(out.parts) == {"reward_model"}
    safe = RewardModelScorer(rm, tokenizer, aspect="safe")(prompts, completions)
    assert torch.allclose(safe.scores, expected[:, 1], atol=1e-5)
    mixed = RewardModelScorer(rm, tokenizer, weights={"helpful": 0.25, "safe": 2.0})(prompts, completions)
    assert torch.allclose(mixed.scores, 0.25 * expected[:, 0] + 2.0 * expected[:, 1], atol=1e-5)
    assert torch.allclose(mixed.parts["reward_model/safe"], expected[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match="unknown aspect 'kind'"):
        RewardModelScorer(rm, tokenizer, aspect="kind")


def test_filter_scorer_builds_only_what_a_score_rule_asks_for(tiny, tokenizer, tmp_path):
    from posttrain.train.reward_model import filter_scorer

    assert filter_scorer({}) is None and filter_scorer({"score": {"reward_model": "unused"}}) is None
    with pytest.raises(ValueError, match="score.min is set but score.reward_model is not"):
        filter_scorer({"score": {"min": 0.0}})
    rm = reward_model_from_lm(tiny, aspects=["helpful", "safe"])
    save_reward_model(rm, tokenizer, tmp_path / "rm")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]} for a in ("x", "yz")]
    got = filter_scorer({"score": {"reward_model": str(tmp_path / "rm"), "aspect": "safe", "min": 0.0}})(rows)
    loaded, loaded_tok = load_reward_model(tmp_path / "rm")  # the dtype filter_scorer loads it in
    want = RewardModelScorer(loaded, loaded_tok, aspect="safe")(["q", "q"], ["x", "yz"]).scores.tolist()
    assert got == pytest.approx(want, abs=1e-6) and got[0] != got[1]
