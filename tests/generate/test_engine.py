"""The generation engine against HF generate and a direct forward pass (tiny fp32 model)."""

from __future__ import annotations

import pytest
import torch

from posttrain.generate.engine import GenerationConfig, encode_prompts, generate

PROMPTS = ["Hello there, how are", "The capital of France is a city called", "Hi"]


def hf_greedy(model, tokenizer, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def trim_eos(seq: list[int], eos: int) -> list[int]:
    return seq[: seq.index(eos) + 1] if eos in seq else seq


def test_greedy_matches_hf_generate_batched_and_alone(tiny, tokenizer):
    cfg = GenerationConfig(max_new_tokens=12)
    batched = generate(tiny, tokenizer, PROMPTS, cfg)
    ids = encode_prompts(tokenizer, PROMPTS)
    assert len({len(i) for i in ids}) == 3  # different lengths: left padding is exercised
    for p, pid, got in zip(PROMPTS, ids, batched.token_ids):
        alone = generate(tiny, tokenizer, [p], cfg).token_ids[0]
        ref = trim_eos(hf_greedy(tiny, tokenizer, pid, 12), tokenizer.eos_token_id)
        assert got == ref
        assert alone == ref


def test_rows_finish_early_on_eos_like_hf(tiny, tokenizer):
    # Declare a token the model really produces as an extra EOS id, so rows finish at
    # different steps (and leave the batch) while the others continue.
    free = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12))
    extra = free.token_ids[0][3]
    tiny.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    out = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12))
    assert out.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(extra) + 1]
    assert len({len(t) for t in out.token_ids}) > 1
    for pid, got in zip(encode_prompts(tokenizer, PROMPTS), out.token_ids):
        ref = hf_greedy(tiny, tokenizer, pid, 12)
        assert got == (ref[: ref.index(extra) + 1] if extra in ref else ref)
    # EOS ends the text too: the EOS token is in token_ids but not in the text
    assert out.texts[0] == tokenizer.decode(out.token_ids[0][:-1], skip_special_tokens=True)


def test_eos_token_kept_in_ids_not_text(tiny, tokenizer):
    with torch.no_grad():
        tiny.model.norm.weight.zero_()  # all logits equal -> greedy picks the lowest id
    tiny.generation_config.eos_token_id = [tokenizer.eos_token_id, 0]
    out = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=5))
    assert out.token_ids == [[0], [0], [0]]
    assert out.texts == ["", "", ""]


def test_logprobs_match_full_forward(tiny, tokenizer):
    cfg = GenerationConfig(max_new_tokens=8)
    out = generate(tiny, tokenizer, PROMPTS, cfg)
    for pid, gen, lps in zip(encode_prompts(tokenizer, PROMPTS), out.token_ids, out.logprobs):
        full = torch.tensor([pid + gen])
        with torch.no_grad():
            logits = tiny(full).logits[0].float()
        ref = torch.log_softmax(logits[len(pid) - 1:-1], -1).gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=1e-4)


def test_sampling_logprobs_use_temperature(tiny, tokenizer):
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, seed=1)
    out = generate(tiny, tokenizer, PROMPTS[:1], cfg)
    pid = encode_prompts(tokenizer, PROMPTS[:1])[0]
    gen = out.token_ids[0]
    with torch.no_grad():
        logits = tiny(torch.tensor([pid + gen])).logits[0].float()
    ref = torch.log_softmax(logits[len(pid) - 1:-1] / 0.7, -1).gather(1, torch.tensor(gen)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), ref, atol=1e-4, rtol=1e-4)


def test_sampling_with_seed_is_reproducible(tiny, tokenizer):
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=7)
    a = generate(tiny, tokenizer, PROMPTS, cfg)
    b = generate(tiny, tokenizer, PROMPTS, cfg)
    c = generate(tiny, tokenizer, PROMPTS, GenerationConfig(**{**cfg.__dict__, "seed": 8}))
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert a.token_ids != c.token_ids


def test_max_new_tokens_honoured(tiny, tokenizer):
    out = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=5))
    assert all(len(t) == 5 for t in out.token_ids)  # random model: no EOS in 5 steps
    assert all(len(lp) == 5 for lp in out.logprobs)
    assert generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=0)).token_ids == [[], [], []]


def test_stop_string_trims_text_and_stops_row(tiny, tokenizer):
    free = generate(tiny, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=20))
    text = free.texts[0]
    assert len(text) > 6
    stop = text[3:6]
    first = text.find(stop)
    out = generate(tiny, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=20, stop=[stop, "\x00never"]))
    assert out.texts[0] == text[:first]
    assert len(out.token_ids[0]) < 20
    assert out.token_ids[0] == free.token_ids[0][: len(out.token_ids[0])]
    # the last kept token is the one that completed the stop string
    assert stop in tokenizer.decode(out.token_ids[0])
    assert stop not in tokenizer.decode(out.token_ids[0][:-1])


def test_stream_pieces_concatenate_to_text(tiny, tokenizer):
    free = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=10))
    stop = free.texts[1][5:9]
    cfg = GenerationConfig(max_new_tokens=10, stop=[stop])
    calls: list[tuple[int, int, str]] = []
    out = generate(tiny, tokenizer, PROMPTS, cfg, stream=lambda r, t, s: calls.append((r, t, s)))
    for r in range(len(PROMPTS)):
        mine = [c for c in calls if c[0] == r]
        assert [t for _, t, _ in mine] == out.token_ids[r]
        assert "".join(s for _, _, s in mine) == out.texts[r]
        assert stop not in out.texts[r]
    assert out.texts[1] == free.texts[1][: free.texts[1].find(stop)]


def test_text_equals_decode_of_ids(tiny, tokenizer):
    out = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=10))
    for ids, text in zip(out.token_ids, out.texts):
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_prompts_and_token_prompts(tiny, tokenizer):
    cfg = GenerationConfig(max_new_tokens=4, chat=True, system="Be brief.")
    chat = generate(tiny, tokenizer, ["hi"], cfg)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert generate(tiny, tokenizer, [ids], GenerationConfig(max_new_tokens=4)).token_ids == chat.token_ids
    assert generate(tiny, tokenizer, [msgs[1:]], cfg).token_ids == chat.token_ids


def test_restores_train_mode_and_rejects_bad_prompts(tiny, tokenizer):
    tiny.train()
    generate(tiny, tokenizer, ["x"], GenerationConfig(max_new_tokens=2))
    assert tiny.training
    with pytest.raises(TypeError, match="prompt 1"):
        generate(tiny, tokenizer, ["x", 3], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)


def test_repetition_penalty_changes_greedy_choice(tiny, tokenizer):
    plain = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=10))
    pen = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=10, repetition_penalty=100.0))
    assert plain.token_ids != pen.token_ids
    for ids, row in zip(encode_prompts(tokenizer, PROMPTS), pen.token_ids):
        # a huge penalty makes repeats of prompt or earlier tokens (nearly) impossible
        assert len(set(row)) == len(row) and not set(row) & set(ids)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_default_model_greedy_matches_hf_generate(backend):
    from posttrain.models import load_model

    model, tok = load_model("default", dtype="fp32")
    prompts = ["What is the capital of France?", "Write one short sentence about the sea."]
    out = generate(model, tok, prompts, GenerationConfig(max_new_tokens=16, chat=True, backend=backend))
    assert "Paris" in out.texts[0]
    for pid, got in zip(encode_prompts(tok, prompts, chat=True), out.token_ids):
        assert got == trim_eos(hf_greedy(model, tok, pid, 16), tok.eos_token_id)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_per_row_budgets_equal_unbatched_greedy(tiny, tokenizer, backend):
    limits = [3, 9, 0]
    pieces: dict[int, str] = {}
    done: list = []  # (row, output, tokens streamed so far over all rows)
    out = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=4, backend=backend),
                   stream=lambda r, t, s: pieces.__setitem__(r, pieces.get(r, "") + s), row_max_new_tokens=limits,
                   row_done=lambda r, o: done.append((r, o, sum(map(len, pieces.values())))))
    # each row is reported as soon as it ends, shortest first, with its final output
    assert [r for r, _, _ in done] == [2, 0, 1]
    assert done[1][2] < len(out.texts[0]) + len(out.texts[1])  # row 0 was reported while row 1 still ran
    for r, o, _ in done:
        assert (o.texts, o.token_ids, o.logprobs) == ([out.texts[r]], [out.token_ids[r]], [out.logprobs[r]])
    for p, n, ids, text in zip(PROMPTS, limits, out.token_ids, out.texts):
        alone = generate(tiny, tokenizer, [p], GenerationConfig(max_new_tokens=n, backend=backend))
        assert ids == alone.token_ids[0] and text == alone.texts[0]
        assert len(ids) == n  # random model: no EOS this early
        assert pieces.get(PROMPTS.index(p), "") == text  # each row's final piece is flushed
    sam_done: list[int] = []
    sam = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=4, decoding="sam", backend=backend),
                   row_max_new_tokens=limits, row_done=lambda r, o: sam_done.append(r))
    assert sam.token_ids == out.token_ids and sorted(sam_done) == [0, 1, 2]
    with pytest.raises(ValueError, match="row_max_new_tokens"):
        generate(tiny, tokenizer, PROMPTS, GenerationConfig(), row_max_new_tokens=[1, 2])


@pytest.mark.parametrize("decoding", ["plain", "sam"])
def test_per_row_stop_strings_equal_unbatched(tiny, tokenizer, decoding):
    full = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12))
    assert all(len(t) > 8 for t in full.texts)
    stops = [[full.texts[0][4:7]], [], [full.texts[2][6:8], "never appears 123"]]  # cut inside the reply
    out = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12, decoding=decoding), row_stop=stops)
    for r, (p, stop) in enumerate(zip(PROMPTS, stops)):
        alone = generate(tiny, tokenizer, [p], GenerationConfig(max_new_tokens=12, stop=stop))
        assert out.texts[r] == alone.texts[0] and out.token_ids[r] == alone.token_ids[0], r
    assert len(out.texts[0]) < len(full.texts[0]) and out.texts[1] == full.texts[1]
    with pytest.raises(ValueError, match="row_stop"):
        generate(tiny, tokenizer, PROMPTS, GenerationConfig(), row_stop=[["x"], [""], []])


@pytest.mark.parametrize("decoding", ["plain", "sam"])
def test_stream_returning_true_drops_only_that_row(tiny, tokenizer, decoding):
    cfg = GenerationConfig(max_new_tokens=10, decoding=decoding)
    calls: list[int] = []

    def stream(row, token, piece):
        calls.append(row)
        return row == 1 and calls.count(1) == 3  # drop row 1 after its 3rd token

    done: list[int] = []
    out = generate(tiny, tokenizer, PROMPTS, cfg, stream=stream, row_done=lambda r, o: done.append(r))
    full = generate(tiny, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=10))
    assert out.stats["cancelled"] == [1] and sorted(done) == [0, 2]  # a dropped row is not reported done
    assert calls.count(1) == 3 and out.token_ids[1] == full.token_ids[1][:3]
    for r in (0, 2):  # the other rows finish exactly as an unbatched run
        alone = generate(tiny, tokenizer, [PROMPTS[r]], GenerationConfig(max_new_tokens=10))
        assert out.token_ids[r] == alone.token_ids[0] and out.texts[r] == alone.texts[0]
        assert calls.count(r) == len(out.token_ids[r]) == 10
    assert "cancelled" not in full.stats
