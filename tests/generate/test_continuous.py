"""RunningBatch: rows joining and leaving a running batch on the native decoder give exactly what
each prompt gives decoded alone (greedy and seeded sampling), with per-row budgets, stop strings,
streaming, drops, chunked prefill, speculative drafts and a cache that grows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from posttrain.generate.continuous import RunningBatch, unsupported_reason
from posttrain.generate.engine import GenerationConfig, encode_prompts, generate
from posttrain.models import tiny_model

PROMPTS = ["The sky is", "Once upon a time there was a", "Hi", "Numbers: 1 2 3 1 2 3 1 2 3 1 2",
           "A somewhat longer prompt that has to be prefilled over several steps when chunks are small"]


def native_tiny(tokenizer, dtype=torch.float32):
    """A tiny Llama the native decoder runs (head size 32), eval mode."""
    model = tiny_model(tokenizer, hidden=64, heads=2, kv_heads=1, dtype=dtype).eval()
    reason = unsupported_reason(model)
    if reason is not None:
        pytest.skip(f"the native decoder cannot run here: {reason}")
    return model


def alone(model, tokenizer, prompt, config: GenerationConfig):
    return generate(model, tokenizer, [prompt], replace(config, decoding="plain"))


def run(batch: RunningBatch, joins: dict[int, list[tuple]], max_steps: int = 1000) -> dict:
    """Step the batch; at step s, add the rows joins[s] = [(key, prompt_ids, config)]. Returns
    key -> (row, streamed text, step it finished)."""
    results: dict = {}
    for step in range(max_steps):
        for key, prompt, config in joins.get(step, []):
            pieces: list[str] = []
            results[key] = [None, pieces, None]

            def done(row, key=key, step=step):
                results[key][2] = step

            results[key][0] = batch.add(prompt, config, lambda t, p, pieces=pieces: pieces.append(p) and False, done)
        if not len(batch) and step > max(joins):
            break
        batch.step()
    return {k: (row, "".join(pieces), end) for k, (row, pieces, end) in results.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_joining_mid_flight_equal_each_prompt_alone(tokenizer, dtype):
    model = native_tiny(tokenizer, dtype)
    ids = encode_prompts(tokenizer, PROMPTS)
    budgets = [12, 3, 20, 7, 9]
    stops = [[], [], [], [], []]
    want = {i: alone(model, tokenizer, ids[i], GenerationConfig(max_new_tokens=n, ignore_eos=True))
            for i, n in enumerate(budgets)}
    # a stop string taken from the middle of one reply ends that row there, as it does alone
    stops[2] = [want[2].texts[0][6:9]]
    want[2] = alone(model, tokenizer, ids[2], GenerationConfig(max_new_tokens=20, ignore_eos=True, stop=stops[2]))
    assert len(want[2].token_ids[0]) < 20
    batch = RunningBatch(model, tokenizer, max_rows=4, prefill_chunk=5)
    joins = {0: [(0, ids[0], GenerationConfig(max_new_tokens=12, ignore_eos=True)),
                 (1, ids[1], GenerationConfig(max_new_tokens=3, ignore_eos=True))],
             4: [(2, ids[2], GenerationConfig(max_new_tokens=20, ignore_eos=True, stop=stops[2]))],
             5: [(3, ids[3], GenerationConfig(max_new_tokens=7, ignore_eos=True))],
             9: [(4, ids[4], GenerationConfig(max_new_tokens=9, ignore_eos=True))]}
    got = run(batch, joins)
    for i in range(5):
        row, streamed, end = got[i]
        assert row.tokens == want[i].token_ids[0], i
        assert row.text.text == streamed == want[i].texts[0], i
        assert row.logprobs == pytest.approx(want[i].logprobs[0], abs=1e-5), i
        assert row.finished and not row.cancelled and end is not None
    # the 3-token row left before the late rows joined; its slot was reused (max_rows 4, five rows)
    assert got[1][2] < 9 and not len(batch) and sorted(batch.free) == [0, 1, 2, 3]


def test_eos_budget_zero_and_a_long_row_growing_the_cache(tokenizer):
    model = native_tiny(tokenizer)
    ids = encode_prompts(tokenizer, PROMPTS[:2])
    batch = RunningBatch(model, tokenizer, max_rows=2)
    assert batch.cache.max_len == 128
    ended = []
    zero = batch.add(ids[0], GenerationConfig(max_new_tokens=0), done=ended.append)
    assert zero.finished and ended == [zero] and not len(batch)
    rows = [batch.add(ids[0], GenerationConfig(max_new_tokens=40))]
    for _ in range(5):
        batch.step()
    rows.append(batch.add(ids[1], GenerationConfig(max_new_tokens=150, ignore_eos=True)))  # grows the cache
    assert batch.cache.max_len >= len(ids[1]) + 151
    while len(batch):
        batch.step()
    assert rows[0].tokens == alone(model, tokenizer, ids[0], GenerationConfig(max_new_tokens=40)).token_ids[0]
    assert rows[1].tokens == alone(model, tokenizer, ids[1],
                                   GenerationConfig(max_new_tokens=150, ignore_eos=True)).token_ids[0]
    with pytest.raises(RuntimeError, match="full"):
        for _ in range(3):
            batch.add(ids[0], GenerationConfig(max_new_tokens=5))


def test_seeded_sampling_is_independent_of_batch_mates(tokenizer):
    model = native_tiny(tokenizer)
    ids = encode_prompts(tokenizer, PROMPTS)
    sampled = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, seed=7,
                               ignore_eos=True)
    want = alone(model, tokenizer, ids[0], sampled)
    for mates in ([], [1, 2], [3, 4, 2]):
        batch = RunningBatch(model, tokenizer, max_rows=4)
        joins = {0: [(m, ids[m], GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.3))
                     for m in mates], 2: [("seeded", ids[0], sampled)]}
        got = run(batch, joins)
        assert got["seeded"][0].tokens == want.token_ids[0]
        assert got["seeded"][0].logprobs == pytest.approx(want.logprobs[0], abs=1e-5)
    # repetition penalty per row, greedy
    penalised = GenerationConfig(max_new_tokens=10, repetition_penalty=1.3, ignore_eos=True)
    batch = RunningBatch(model, tokenizer, max_rows=2)
    got = run(batch, {0: [("p", ids[3], penalised), ("g", ids[1], GenerationConfig(max_new_tokens=4))]})
    assert got["p"][0].tokens == alone(model, tokenizer, ids[3], penalised).token_ids[0]


def test_drafts_are_lossless_and_only_while_few_rows_decode(tokenizer):
    model = native_tiny(tokenizer, torch.bfloat16)
    prompt = encode_prompts(tokenizer, ["1 2 3 4 1 2 3 4 1 2 3 4 1 2 3 4 1 2 3 4"])[0]
    sam = GenerationConfig(max_new_tokens=40, ignore_eos=True, decoding="sam")
    want = alone(model, tokenizer, prompt, sam).token_ids[0]
    batch = RunningBatch(model, tokenizer, max_rows=3, draft_max_rows=1)
    got = run(batch, {0: [("a", prompt, sam)]})
    assert got["a"][0].tokens == want
    assert got["a"][0].drafted > 0  # a random tiny model repeats itself: SAM finds matches
    # three rows decoding, drafts only up to one: none drafts
    batch = RunningBatch(model, tokenizer, max_rows=3, draft_max_rows=1)
    got = run(batch, {0: [(k, prompt, sam) for k in "abc"]})
    assert all(got[k][0].tokens == want and got[k][0].drafted == 0 for k in "abc")


def test_a_dropped_row_leaves_and_the_others_go_on(tokenizer):
    model = native_tiny(tokenizer)
    ids = encode_prompts(tokenizer, PROMPTS[:2])
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    batch = RunningBatch(model, tokenizer, max_rows=2)
    seen = []
    dropper = batch.add(ids[0], config, stream=lambda t, p: seen.append(t) or len(seen) == 3,
                        done=lambda r: pytest.fail("a dropped row is not done"))
    keeper = batch.add(ids[1], config)
    while len(batch):
        batch.step()
    assert dropper.cancelled and not dropper.finished and len(dropper.tokens) == 3
    assert keeper.finished and keeper.tokens == alone(model, tokenizer, ids[1], config).token_ids[0]
    with pytest.raises(ValueError, match="vocabulary"):
        batch.add([10 ** 9], config)
    with pytest.raises(ValueError, match="empty"):
        batch.add([], config)


def test_long_prompts_handed_to_the_torch_forward_still_equal_each_prompt_alone(tokenizer, monkeypatch):
    """Prompts from TORCH_PREFILL_MIN tokens are prefilled by the torch forward, one per step, in
    the batch as in `generate`: a row still equals its prompt decoded alone."""
    from posttrain.generate import backends

    model = native_tiny(tokenizer, torch.bfloat16)
    monkeypatch.setattr(backends, "TORCH_PREFILL_MIN", 12)
    handed = []
    real = backends.prefill_with_torch
    monkeypatch.setattr(backends, "prefill_with_torch", lambda m, p, c, s: handed.append(len(p)) or real(m, p, c, s))
    ids = encode_prompts(tokenizer, PROMPTS)
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    want = {i: alone(model, tokenizer, ids[i], config).token_ids[0] for i in range(len(ids))}
    assert sorted(handed) == sorted(len(p) for p in ids if len(p) >= 12) and handed  # generate handed them over
    handed.clear()
    batch = RunningBatch(model, tokenizer, max_rows=5, prefill_chunk=4)
    got = run(batch, {0: [(i, ids[i], config) for i in range(3)], 3: [(i, ids[i], config) for i in (3, 4)]})
    assert {i: got[i][0].tokens for i in got} == want
    assert sorted(handed) == sorted(len(p) for p in ids if len(p) >= 12)
