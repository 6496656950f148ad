"""Padded and packed batches give the same loss; packed examples never see each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.data.collate import (
    collate_packed,
    collate_padded,
    collate_pairs,
    collate_two_sided,
    collate_unpaired,
    model_inputs,
    plan_batches,
)
from posttrain.data.templates import IGNORE


def make_examples(lengths, seed=0, vocab=1000):
    """Random examples whose second half carries loss (like a prompt + completion)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    return out


def token_loss(model, batch):
    """(sum of per-token cross-entropies, number of loss tokens) with the usual shift."""
    logits = model(**model_inputs(batch)).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, int((targets != IGNORE).sum())


def test_padded_batch_layout():
    ex = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "task": "b"},
          {"input_ids": [8], "labels": [8], "task": "a"}]
    batch = collate_padded(ex, pad_token_id=2, tasks=["a", "b"], pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [8, IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["task_ids"].tolist() == [[1] * 4, [0] * 4]
    assert all(t.dtype == torch.long for t in batch.values())
    assert "task_ids" not in collate_padded([{"input_ids": [1], "labels": [1]}], pad_token_id=0)


def test_packed_batch_layout():
    ex = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "task": "b"},
          {"input_ids": [8, 9], "labels": [8, 9], "task": "a"}]
    batch = collate_packed(ex, tasks=["a", "b"])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]  # nothing predicted across the boundary
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["task_ids"].tolist() == [[1, 1, 1, 0, 0]]
    assert "attention_mask" not in batch
    assert model_inputs(batch) == {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                                   "use_cache": False}


def test_task_errors():
    ex = [{"input_ids": [1], "labels": [1], "task": "a"}]
    with pytest.raises(ValueError, match="no task list"):
        collate_packed(ex)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['a'\]"):
        collate_padded(ex, 0, tasks=["b"])
    with pytest.raises(ValueError, match="some examples have a 'task'"):
        collate_packed(ex + [{"input_ids": [1], "labels": [1]}], tasks=["a"])


def test_packed_loss_equals_unpacked_loss(tiny):
    tiny.eval()
    examples = make_examples([7, 19, 3, 12, 30])
    with torch.no_grad():
        packed_sum, packed_n = token_loss(tiny, collate_packed(examples))
        padded_sum, padded_n = token_loss(tiny, collate_padded(examples, pad_token_id=2))
        one_by_one = [token_loss(tiny, collate_padded([e], pad_token_id=2)) for e in examples]
    assert packed_n == padded_n == sum(n for _, n in one_by_one) == sum(len(e["input_ids"]) - len(e["input_ids"]) // 2
                                                                         for e in examples)
    single_sum = sum(s for s, _ in one_by_one)
    assert torch.allclose(packed_sum, padded_sum, rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed_sum, single_sum, rtol=1e-5, atol=1e-5)
    assert abs(packed_sum.item() / packed_n - padded_sum.item() / padded_n) < 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tiny, attn):
    tiny.set_attn_implementation(attn)
    tiny.eval()
    first, second = make_examples([9, 6], seed=1)
    changed = {"input_ids": [t + 1 for t in first["input_ids"]], "labels": first["labels"]}
    with torch.no_grad():
        a = tiny(**model_inputs(collate_packed([first, second]))).logits[0]
        b = tiny(**model_inputs(collate_packed([changed, second]))).logits[0]
        alone = tiny(**model_inputs(collate_padded([second], pad_token_id=2))).logits[0]
    assert not torch.allclose(a[:9], b[:9], atol=1e-3)  # the edit is visible where it should be
    assert torch.allclose(a[9:], b[9:], atol=1e-6)  # and invisible to the second example
    assert torch.allclose(a[9:], alone, atol=1e-5)


def test_default_kv_cache_would_leak_attention_across_examples(tiny):
    """Why model_inputs passes use_cache=False: with the config default (use_cache=True)
    transformers 5.24 skips packed-sequence detection and the examples see each other,
    even in train mode. If this starts failing, transformers changed; the collator
    still works (use_cache=False stays harmless)."""
    tiny.train()
    first, second = make_examples([9, 6], seed=1)
    changed = {"input_ids": [t + 1 for t in first["input_ids"]], "labels": first["labels"]}
    inputs = [model_inputs(collate_packed(pair)) for pair in ([first, second], [changed, second])]
    with torch.no_grad():
        a, b = (tiny(**{k: v for k, v in x.items() if k != "use_cache"}).logits[0, 9:] for x in inputs)
    assert tiny.config.use_cache
    assert not torch.allclose(a, b, atol=1e-3)


def test_packed_gradients_match_padded(tiny):
    examples = make_examples([5, 11, 8], seed=2)
    grads = []
    for batch in (collate_packed(examples), collate_padded(examples, pad_token_id=2)):
        tiny.zero_grad()
        total, _ = token_loss(tiny, batch)
        total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_plan_is_deterministic_and_covers_every_example_once():
    lengths = [5, 30, 12, 7, 7, 50, 3, 21, 9, 14, 2, 40]
    kw = dict(batch_size=None, max_tokens=48, packing=True, shuffle=True)
    plan = plan_batches(lengths, seed=3, epoch=1, **kw)
    assert plan == plan_batches(lengths, seed=3, epoch=1, **kw)
    assert plan != plan_batches(lengths, seed=3, epoch=2, **kw)
    assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
    for g in plan:
        assert sum(lengths[i] for i in g) <= 48 or len(g) == 1
    flat = [i for g in plan for i in g]
    for g, nxt in zip(plan, plan[1:]):  # greedy: a row closes only when the next example does not fit
        assert sum(lengths[i] for i in g) + lengths[nxt[0]] > 48
    assert flat != list(range(len(lengths)))


def test_plan_edge_cases():
    # An example longer than max_tokens gets a row of its own.
    assert plan_batches([10, 100, 10], batch_size=None, max_tokens=32, packing=True, shuffle=False,
                        seed=0, epoch=0) == [[0], [1], [2]]
    # batch_size caps examples per packed row.
    assert plan_batches([1] * 5, batch_size=2, max_tokens=100, packing=True, shuffle=False,
                        seed=0, epoch=0) == [[0, 1], [2, 3], [4]]
    # Padded batches: batch_size examples, also capped by rows x longest <= max_tokens.
    assert plan_batches([4] * 5, batch_size=2, max_tokens=None, packing=False, shuffle=False,
                        seed=0, epoch=0) == [[0, 1], [2, 3], [4]]
    assert plan_batches([4, 4, 10, 1], batch_size=8, max_tokens=20, packing=False, shuffle=False,
                        seed=0, epoch=0) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="packing needs max_tokens"):
        plan_batches([1], batch_size=4, max_tokens=None, packing=True, shuffle=False, seed=0, epoch=0)
    with pytest.raises(ValueError, match="at least one token"):
        plan_batches([0], batch_size=4, max_tokens=None, packing=False, shuffle=False, seed=0, epoch=0)


def _pair(chosen, rejected, **extra):
    return {"chosen_input_ids": chosen, "chosen_labels": [IGNORE] + chosen[1:],
            "rejected_input_ids": rejected, "rejected_labels": [IGNORE] + rejected[1:], **extra}


def test_pair_batch_layout_chosen_rows_then_rejected_rows():
    examples = [_pair([5, 6, 7], [5, 8]), _pair([9, 10], [9, 11, 12, 13])]
    batch = collate_pairs(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 10, 0, 0], [5, 8, 0, 0], [9, 11, 12, 13]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [IGNORE, 10, IGNORE, IGNORE],
                                        [IGNORE, 8, IGNORE, IGNORE], [IGNORE, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long


def test_pair_batch_per_pair_fields():
    extra = [{"margin": 1.5, "aspect": 2, "ref_chosen_logp": -3.0, "ref_rejected_logp": -4.5},
             {"margin": 0.0, "aspect": 0, "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0}]
    batch = collate_pairs([_pair([1, 2], [1, 3], **e) for e in extra], pad_token_id=0)
    assert batch["margin"].tolist() == [1.5, 0.0] and batch["margin"].dtype == torch.float32
    assert batch["aspect"].tolist() == [2, 0] and batch["aspect"].dtype == torch.long
    assert batch["ref_chosen_logp"].tolist() == [-3.0, -1.0] and batch["ref_rejected_logp"].tolist() == [-4.5, -2.0]
    with pytest.raises(ValueError, match="some pair examples have 'margin'"):
        collate_pairs([_pair([1, 2], [1, 3], margin=1.0), _pair([1, 2], [1, 3])], pad_token_id=0)
    with pytest.raises(ValueError, match="pair example 0 has no chosen_input_ids"):
        collate_pairs([{"input_ids": [1, 2], "labels": [IGNORE, 2]}], pad_token_id=0)
    with pytest.raises(ValueError, match="empty"):
        collate_pairs([], pad_token_id=0)


def _unpaired(ids, kl, desirable, **extra):
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:], "kl_input_ids": kl, "kl_labels": [IGNORE] + kl[1:],
            "desirable": desirable, **extra}


def test_unpaired_batch_layout_completions_then_kl_rows():
    examples = [_unpaired([5, 6, 7], [5, 10], True, ref_logp=-1.0, ref_kl_logp=-2.0),
                _unpaired([9, 10], [9, 6, 7], False, ref_logp=-3.0, ref_kl_logp=-4.0)]
    batch = collate_unpaired(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 10, 0], [5, 10, 0], [9, 6, 7]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 10, IGNORE], [IGNORE, 10, IGNORE], [IGNORE, 6, 7]]
    assert batch["desirable"].tolist() == [True, False] and batch["desirable"].dtype == torch.bool
    assert batch["ref_logp"].tolist() == [-1.0, -3.0] and batch["ref_kl_logp"].tolist() == [-2.0, -4.0]
    packed = collate_two_sided(examples, pad_token_id=0, packed=True)  # dispatches on the fields
    assert packed["input_ids"].tolist() == [[5, 6, 7, 9, 10, 5, 10, 9, 6, 7]]
    assert packed["seq_index"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3]]
    assert packed["desirable"].tolist() == [True, False]
    with pytest.raises(ValueError, match="unpaired example 0 has no kl_input_ids, kl_labels"):
        collate_unpaired([{"input_ids": [1, 2], "labels": [IGNORE, 2], "desirable": True}], pad_token_id=0)
    with pytest.raises(ValueError, match="some unpaired examples have 'ref_logp'"):
        collate_unpaired([examples[0], _unpaired([1, 2], [1, 3], True)], pad_token_id=0)
