import sys
from pathlib import Path

import pytest
import torch

from posttrain.data.collate import collate_packed, collate_padded
from posttrain.models import tiny_model
from posttrain.train import objectives
from posttrain.train.objectives import _forward_loss, causal_lm_loss, get_objective

sys.path.insert(0, str(Path(__file__).parent))
from loop_worker import make_examples  # noqa: E402


@pytest.fixture
def model():
    return tiny_model(vocab_size=256)


def test_loss_matches_hf_loss_on_padded_batch(model):
    batch = collate_padded(make_examples(6), pad_token_id=0)
    ours, metrics = causal_lm_loss(model, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert metrics["loss_tokens"] == int((batch["labels"][:, 1:] != -100).sum())


def test_chunked_head_gives_same_loss_and_grads(model):
    batch = collate_packed(make_examples(6))
    full, _ = causal_lm_loss(model, batch, chunk_size=10_000)
    full.backward()
    g1 = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    chunked, _ = causal_lm_loss(model, batch, chunk_size=7)
    chunked.backward()
    torch.testing.assert_close(full, chunked, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, model.model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_wrapper_forward_path_matches_decoder_path(model, collate):
    exs = make_examples(5)
    batch = collate_padded(exs, pad_token_id=0) if collate == "padded" else collate_packed(exs)
    a, ma = causal_lm_loss(model, batch)
    b, mb = _forward_loss(model, batch)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ma["loss_tokens"] == mb["loss_tokens"]


def test_wrapped_models_take_the_forward_path(model, monkeypatch):
    calls = []
    monkeypatch.setattr(objectives, "_forward_loss", lambda m, b: calls.append(m) or (torch.zeros(()), {}))

    class Wrapper(torch.nn.Module):  # stands in for DDP: exposes .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    causal_lm_loss(Wrapper(model), collate_padded(make_examples(2), pad_token_id=0))
    assert len(calls) == 1


def test_unknown_objective_names_the_choices():
    with pytest.raises(ValueError, match="choose one of sft, pretrain"):
        get_objective("ppo2")
