"""Speculative decoding: greedy output identical to plain decoding; sampling unbiased."""

import math
from collections import Counter

import pytest
import torch

from posttrain.generate.engine import GenerationConfig, generate
from posttrain.generate.sam import build_static
from posttrain.generate.speculative import LookupDrafter, SAMDrafter, speculative_decode
from posttrain.models import tiny_model

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef add(a, b):",
    "the cat sat on the mat. the cat sat on the",
    "one two three four one two three four one two",
]


@pytest.fixture
def model(tokenizer):
    m = tiny_model(tokenizer, layers=2, hidden=64, seed=1)
    return m.eval()


@pytest.mark.parametrize("decoding", ["sam", "lookup"])
def test_greedy_speculative_is_identical_to_plain(model, tokenizer, decoding):
    plain = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=48))
    spec = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=48, decoding=decoding, draft_len=6))
    assert spec.token_ids == plain.token_ids
    assert spec.texts == plain.texts
    for a, b in zip(spec.logprobs, plain.logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    assert spec.stats["accepted"] > 0 and spec.stats["forwards"] < sum(map(len, plain.token_ids))


def test_static_corpus_drafts_and_stays_identical(model, tokenizer):
    plain = generate(model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=40))
    # a corpus that contains exactly what the model will write: static drafts get accepted
    corpus = build_static([tokenizer(PROMPTS[0])["input_ids"] + plain.token_ids[0]], eos_id=tokenizer.eos_token_id)
    spec = generate(model, tokenizer, PROMPTS[:1],
                    GenerationConfig(max_new_tokens=40, decoding="sam", corpus=corpus, sam_bias=0))
    assert spec.token_ids == plain.token_ids
    assert spec.stats["sources"].get("static", 0) > 0
    assert spec.stats["tokens_per_forward"] > 3


def test_stop_strings_eos_and_budget_are_honoured(model, tokenizer):
    for cfg in (dict(max_new_tokens=7), dict(max_new_tokens=40, stop=[" the"])):
        plain = generate(model, tokenizer, PROMPTS, GenerationConfig(**cfg))
        spec = generate(model, tokenizer, PROMPTS, GenerationConfig(decoding="sam", **cfg))
        assert spec.texts == plain.texts and spec.token_ids == plain.token_ids


def test_sam_drafter_prefers_static_only_beyond_the_bias():
    static = build_static([[1, 2, 3, 4, 5, 6, 7, 8, 9]], eos_id=0)
    d = SAMDrafter(static=static, bias=2)
    d.start([9, 1, 2, 3])  # static match "1 2 3" (3) vs dynamic: no earlier "3" -> 0
    tokens, source = d.draft(3)
    assert (tokens, source) == ([4, 5, 6], "static")
    d = SAMDrafter(static=static, bias=5)
    d.start([9, 1, 2, 3])
    assert d.draft(3) == ([4, 5, 6], "static")  # dynamic has nothing, static is the fallback
    d.start([3, 7, 7, 1, 2, 3])  # dynamic "3" -> continues with 7 7 1; static match 3 < 1 + 5
    assert d.draft(3) == ([7, 7, 1], "dynamic")


def test_lookup_drafter_uses_the_earliest_occurrence():
    d = LookupDrafter(max_ngram=2)
    d.start([5, 6, 1, 5, 6, 2, 5, 6])
    assert d.draft(2) == ([1, 5], "lookup")


class FixedDrafter:
    """Always proposes the same tokens: exercises acceptance and rejection."""

    def __init__(self, tokens):
        self.tokens = tokens

    def start(self, prompt):
        pass

    def accept(self, tokens):
        pass

    def draft(self, k):
        return self.tokens[:k], "fixed"


def test_speculative_sampling_keeps_the_model_distribution(tokenizer):
    vocab = 5
    model = tiny_model(vocab_size=vocab, layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32, seed=3).eval()
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    tok = type("Tok", (), {"eos_token_id": None, "pad_token_id": 0,
                           "decode": staticmethod(lambda ids, skip_special_tokens=True: "")})()
    prompt = [1, 2, 3]
    temperature = 0.7
    with torch.no_grad():  # exact joint distribution of the first two tokens
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        exact = {}
        for a in range(vocab):
            p2 = torch.softmax(model(torch.tensor([prompt + [a]])).logits[0, -1] / temperature, -1)
            for b in range(vocab):
                exact[(a, b)] = float(p1[a] * p2[b])
    cfg = GenerationConfig(max_new_tokens=3, do_sample=True, temperature=temperature, draft_len=2)
    gen = torch.Generator().manual_seed(0)
    n = 3000
    counts = Counter()
    for _ in range(n):
        _, toks, _, _ = speculative_decode(model, tok, prompt, cfg, FixedDrafter([4, 0]), generator=gen)
        counts[tuple(toks[:2])] += 1
    chi2 = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in exact.items())
    # chi-square with 24 degrees of freedom: the 0.999 quantile is 51.18
    assert chi2 < 51.18, (chi2, counts.most_common(5))
    assert not math.isnan(chi2)


def test_sam_with_aux_draft_model_is_identical_and_uses_it(model, tokenizer):
    import copy

    plain = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=32))
    # the target itself as "aux" drafts perfectly; a different tiny model drafts badly: both lossless
    for aux, good in ((copy.deepcopy(model), True), (tiny_model(tokenizer, layers=1, hidden=32, seed=9), False)):
        spec = generate(model, tokenizer, PROMPTS,
                        GenerationConfig(max_new_tokens=32, decoding="sam", aux_model=aux, draft_len=4))
        assert spec.token_ids == plain.token_ids
        assert spec.stats["sources"].get("aux", 0) > 0
        if good:
            assert spec.stats["acceptance_rate"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("dtype,backend", [("fp32", "torch"), ("fp32", "auto"), ("bf16", "auto")])
def test_default_model_sam_is_identical_to_plain_greedy(dtype, backend):
    """fp32 on the model's own forward; fp32 and bf16 on the native decoder (where it runs)."""
    from posttrain.models import load_model

    model, tok = load_model("default", dtype=dtype)
    if backend == "auto" and dtype == "bf16":
        from posttrain.generate.native import unsupported_reason

        if unsupported_reason(model) is not None:
            pytest.skip(f"native decoder: {unsupported_reason(model)}")
    prompts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"]
    plain = generate(model, tok, prompts, GenerationConfig(max_new_tokens=48, backend=backend))
    spec = generate(model, tok, prompts, GenerationConfig(max_new_tokens=48, decoding="sam", backend=backend))
    assert spec.token_ids == plain.token_ids
    assert spec.stats["tokens_per_forward"] > 1.2


@pytest.mark.parametrize("decoding", ["plain", "sam"])
def test_ignore_eos_writes_the_full_budget(model, tokenizer, monkeypatch, decoding):
    import posttrain.generate.engine as engine

    monkeypatch.setattr(engine, "eos_ids", lambda m, t: set(range(len(tokenizer))))  # every token ends a reply
    short = generate(model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=9, decoding=decoding))
    full = generate(model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=9, decoding=decoding,
                                                                      ignore_eos=True))
    assert len(short.token_ids[0]) == 1 and len(full.token_ids[0]) == 9
