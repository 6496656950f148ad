"""The native CPU decoder per architecture: greedy tokens equal to the torch forward's where it runs
(MODEL_TYPES), a refusal naming the model type for backend='native' and one log line for 'auto'
elsewhere."""

import logging

import pytest
import torch

from posttrain import kernels
from posttrain.generate.engine import GenerationConfig, generate
from posttrain.generate.native import MODEL_TYPES, NativeError, unsupported_reason
from posttrain.models import TINY_ARCHS, tiny_model

_why = unsupported_reason(tiny_model(None, heads=2, kv_heads=1, vocab_size=64))
pytestmark = pytest.mark.skipif(_why is not None, reason=f"native decoder cannot run on this machine: {_why}")

PROMPTS = ["the cat sat on the mat. the cat", "one two three"]


def model_of(arch: str, tokenizer):
    """Head size 32 (what the native kernels need); embeddings x20 so argmax ties are unlikely."""
    model = tiny_model(tokenizer, heads=2, kv_heads=1, arch=arch, seed=1).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_native_greedy_equals_torch_or_is_refused_by_model_type(arch, tokenizer, monkeypatch, caplog):
    model = model_of(arch, tokenizer)
    cfg = dict(max_new_tokens=12, ignore_eos=True)
    ref = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="torch", **cfg))
    if arch in MODEL_TYPES:  # llama, mistral, qwen2 (q/k/v biases)
        ours = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="native", **cfg))
        assert ours.token_ids == ref.token_ids
        for a, b in zip(ours.logprobs, ref.logprobs):
            assert a == pytest.approx(b, abs=1e-4)
        return
    with pytest.raises(NativeError, match=f"model type {arch!r} is not one of {', '.join(MODEL_TYPES)}"):
        generate(model, tokenizer, PROMPTS, GenerationConfig(backend="native", **cfg))
    monkeypatch.setattr(kernels, "_stated", set())
    caplog.set_level(logging.WARNING, logger="posttrain")
    for _ in range(2):
        auto = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="auto", **cfg))
        assert auto.token_ids == ref.token_ids
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("native decoder: not used")]
    assert len(lines) == 1 and f"model type {arch!r}" in lines[0], lines
