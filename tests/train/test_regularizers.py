"""EWC: Fisher, anchor and penalty keyed by trainable parameter names (PEFT included)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from posttrain.adapters import AdapterConfig, apply_adapter
from posttrain.models import tiny_model
from posttrain.train.regularizers import (
    anchor_params,
    ewc_penalty,
    fisher_diagonal,
    load_ewc_state,
    save_ewc_state,
)

VOCAB = 256


def loss_fn(model, batch):
    return model(**batch).loss, {}


def batches(seed: int, n: int, lo: int = 0, hi: int = VOCAB) -> list[dict]:
    """Random token batches; different (lo, hi) ranges stand for different 'tasks'."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(lo, hi, (2, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


def train(model, data, steps: int, lam: float = 0.0, fisher=None, anchor=None, lr: float = 1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        loss, _ = loss_fn(model, data[i % len(data)])
        if lam:
            loss = loss + lam / 2 * ewc_penalty(model, fisher, anchor)
        opt.zero_grad()
        loss.backward()
        opt.step()


def lora_model(seed: int = 0):
    return apply_adapter(tiny_model(vocab_size=VOCAB, seed=seed), AdapterConfig(method="lora", r=4))


def old_task_lora():
    """A LoRA model trained a little on the 'old' task, so both lora_A and lora_B matter."""
    torch.manual_seed(0)
    model = lora_model()
    train(model, batches(1, 4, 0, 128), steps=5)
    return model


def distance(model, anchor) -> float:
    params = dict(model.named_parameters())
    return sum(float((params[k].detach() - v).pow(2).sum()) for k, v in anchor.items())


def test_fisher_is_mean_squared_gradient_over_trainable_params():
    model = lora_model()
    data = batches(0, 2)
    fisher = fisher_diagonal(model, loss_fn, data)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == trainable
    assert any(".lora_B.default." in k for k in fisher)
    expected = {}
    for b in data:
        model.zero_grad()
        loss_fn(model, b)[0].backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                expected[n] = expected.get(n, 0) + p.grad.pow(2) / len(data)
    for n in fisher:
        torch.testing.assert_close(fisher[n], expected[n])


def test_fisher_max_batches_leaves_no_grads_and_restores_mode():
    model = tiny_model(vocab_size=VOCAB)
    model.train()
    data = batches(0, 3)
    two = fisher_diagonal(model, loss_fn, data, max_batches=2)
    first_two = fisher_diagonal(model, loss_fn, data[:2])
    all_three = fisher_diagonal(model, loss_fn, data)
    for k in two:
        torch.testing.assert_close(two[k], first_two[k])
    assert not torch.allclose(two["model.norm.weight"], all_three["model.norm.weight"])
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="no batches"):
        fisher_diagonal(model, loss_fn, [])


def test_fisher_with_freeze_covers_only_trainable():
    model = apply_adapter(tiny_model(vocab_size=VOCAB), AdapterConfig(method="freeze", freeze_layers=1))
    fisher = fisher_diagonal(model, loss_fn, batches(0, 1))
    assert fisher and all(not k.startswith("model.layers.0.") for k in fisher)
    assert set(fisher) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_penalty_zero_at_anchor_nonzero_after_steps_with_lora():
    model = old_task_lora()
    fisher = fisher_diagonal(model, loss_fn, batches(1, 4, 0, 128))
    anchor = anchor_params(model)
    assert float(ewc_penalty(model, fisher, anchor).detach()) == 0.0
    train(model, batches(2, 4, 128, 256), steps=3)
    penalty = ewc_penalty(model, fisher, anchor)
    assert penalty.requires_grad and float(penalty.detach()) > 0.0


def test_penalty_pulls_weights_back_toward_anchor():
    base = old_task_lora()
    fisher = fisher_diagonal(base, loss_fn, batches(1, 4, 0, 128))
    anchor = anchor_params(base)
    new = batches(2, 4, 128, 256)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    dists, penalties = {}, {}
    for lam in (0.0, 1e4):
        base.load_state_dict(state)
        train(base, new, steps=15, lam=lam, fisher=fisher, anchor=anchor)
        dists[lam] = distance(base, anchor)
        penalties[lam] = float(ewc_penalty(base, fisher, anchor).detach())
    # measured: distance 15.5 -> 6.0, penalty 3.1e-3 -> 1.0e-4
    assert dists[0.0] > 0
    assert dists[1e4] < 0.5 * dists[0.0], dists
    assert penalties[1e4] < 0.2 * penalties[0.0], penalties


def test_anchor_is_a_detached_copy():
    model = lora_model()
    anchor = anchor_params(model)
    name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.add_(1.0)
    assert not torch.equal(anchor[name], p.detach())
    assert not anchor[name].requires_grad


def test_mismatched_names_raise():
    plain = tiny_model(vocab_size=VOCAB)
    fisher = fisher_diagonal(plain, loss_fn, batches(0, 1))
    anchor = anchor_params(plain)
    peft_model = lora_model()  # names gain base_model.model. and only lora params train
    with pytest.raises(KeyError, match="none of the Fisher keys"):
        ewc_penalty(peft_model, fisher, anchor)
    lora_fisher = fisher_diagonal(peft_model, loss_fn, batches(0, 1))
    lora_anchor = anchor_params(peft_model)
    partial = dict(lora_fisher, **{"not.a.param": torch.zeros(1)})
    with pytest.raises(KeyError, match="1 of"):
        ewc_penalty(peft_model, partial, lora_anchor)
    missing_anchor = {k: v for k, v in list(lora_anchor.items())[1:]}
    with pytest.raises(KeyError, match="anchor lacks"):
        ewc_penalty(peft_model, lora_fisher, missing_anchor)


def test_save_load_round_trip(tmp_path):
    model = lora_model()
    fisher = fisher_diagonal(model, loss_fn, batches(0, 2))
    anchor = anchor_params(model)
    path = tmp_path / "run" / "ewc.safetensors"
    save_ewc_state(path, fisher, anchor)
    f2, a2 = load_ewc_state(path)
    assert f2.keys() == fisher.keys() and a2.keys() == anchor.keys()
    for k in fisher:
        assert torch.equal(f2[k], fisher[k]) and torch.equal(a2[k], anchor[k])
    assert [p.name for p in path.parent.iterdir()] == ["ewc.safetensors"]  # no temp files left


def test_load_rejects_other_safetensors(tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an EWC state"):
        load_ewc_state(other)
    with pytest.raises(FileNotFoundError):
        load_ewc_state(tmp_path / "missing.safetensors")
