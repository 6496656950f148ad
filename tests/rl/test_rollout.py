"""The rollout copy samples the policy's current weights, and never changes the policy's base."""

import torch

from posttrain.adapters import AdapterConfig, apply_adapter
from posttrain.models import base_model, tiny_model
from posttrain.rl.rollout import RolloutModel


def _lora_policy(tokenizer, method="lora"):
    model = tiny_model(tokenizer, seed=3)
    policy = apply_adapter(model, AdapterConfig(method=method, r=4, alpha=8), tokenizer)
    with torch.no_grad():  # a non-zero B, as after some training
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_copy_matches_the_lora_policy_and_follows_updates(tokenizer):
    policy = _lora_policy(tokenizer)
    base_before = {n: p.clone() for n, p in policy.named_parameters() if "base_layer" in n}
    rollout = RolloutModel(policy)
    assert rollout.is_copy and not any("lora" in n for n, _ in rollout.model.named_parameters())
    ids = torch.randint(0, 200, (2, 9))
    torch.testing.assert_close(_logits(rollout.model, ids), _logits(policy, ids), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a training step moves the adapters; the copy is stale until sync
        for name, p in policy.named_parameters():
            if "lora_A" in name:
                p.add_(0.1)
    assert (_logits(rollout.model, ids) - _logits(policy, ids)).abs().max() > 1e-3
    rollout.sync(policy)
    torch.testing.assert_close(_logits(rollout.model, ids), _logits(policy, ids), atol=1e-5, rtol=1e-5)
    for n, p in policy.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, base_before[n]), n


def test_plain_and_unfoldable_policies_sample_from_themselves(tokenizer):
    plain = tiny_model(tokenizer, seed=3)
    assert RolloutModel(plain).model is plain
    dora = _lora_policy(tokenizer, "dora")
    rollout = RolloutModel(dora)
    assert not rollout.is_copy and rollout.model is base_model(dora)


def test_sync_skips_when_nothing_changed(tokenizer):
    policy = _lora_policy(tokenizer)
    rollout = RolloutModel(policy)
    version = rollout.model.model.layers[0].self_attn.q_proj.weight._version
    rollout.sync(policy)  # nothing trained since: the copy (and the native decoder's packing) stays
    assert rollout.model.model.layers[0].self_attn.q_proj.weight._version == version
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_A" in n).add_(0.1)
    rollout.sync(policy)
    assert rollout.model.model.layers[0].self_attn.q_proj.weight._version > version


def test_prompt_batches_cover_every_record_once_per_pass_then_reshuffle():
    from posttrain.rl.rollout import prompt_batches

    records = [{"prompt": str(i)} for i in range(6)]
    rounds = prompt_batches(records, 3, seed=0)
    first_pass = next(rounds) + next(rounds)
    assert sorted(r["prompt"] for r in first_pass) == [str(i) for i in range(6)]
    again = prompt_batches(records, 3, seed=0)
    assert next(again) + next(again) == first_pass  # seeded
    assert len(next(rounds)) == 3  # continues into a reshuffled second pass


def test_staleness_check_refuses_rows_beyond_the_bound_and_unsent_weights():
    import pytest

    from posttrain.rl.rollout import StaleRolloutError, check_staleness, weights_fingerprint

    v = torch.tensor([3, 3, 4, 4])
    assert check_staleness(v, None, 4, 1, {}) == {"async/staleness_max": 1.0, "async/staleness_mean": 0.5}
    assert check_staleness(torch.tensor([4]), None, 4, 0, {})["async/staleness_max"] == 0.0
    with pytest.raises(StaleRolloutError, match="version 3, 2 updates behind the trainer's version 5; .* allows 1"):
        check_staleness(v, None, 5, 1, {})
    with pytest.raises(StaleRolloutError, match="never received weights"):
        check_staleness(torch.tensor([-1, 0]), None, 0, 2, {})
    with pytest.raises(StaleRolloutError, match="newer than the trainer's 2"):
        check_staleness(torch.tensor([3]), None, 2, 1, {})
    # rows from rollout workers also carry the fingerprint of the weights they were sampled from
    a = {"w": torch.ones(3)}
    b = {"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}  # one element one ulp-ish off
    sent = {3: weights_fingerprint(a), 4: weights_fingerprint(b)}
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint({"w": torch.ones(3)}) == sent[3]  # same bytes, same fingerprint
    fp = torch.tensor([sent[3], sent[3], sent[4], sent[4]])
    check_staleness(v, fp, 4, 1, sent)
    with pytest.raises(StaleRolloutError, match="rows of policy version 4 .* did not load what was sent"):
        check_staleness(v, torch.tensor([sent[3], sent[3], sent[3], sent[3]]), 4, 1, sent)
