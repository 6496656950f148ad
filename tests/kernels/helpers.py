"""Shared by the kernel parity tests: a random packed batch, and the objective's loss + grads with a
kernel off (the kernels are switched on by train/objectives.py, so parity is checked there)."""

import contextlib

import torch

from posttrain.data.collate import collate_packed
from posttrain.train import objectives as O


def packed_batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(5, 250, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return collate_packed(examples)


def loss_and_grads(model, batch, monkeypatch, disable: str | None = None):
    """causal_lm_loss and the parameter grads; `disable` names a kernel, as objectives imports it, to turn off."""
    if disable is not None:
        monkeypatch.setattr(O, disable, lambda *args: contextlib.nullcontext({}))
    model.zero_grad()
    loss, _ = O.causal_lm_loss(model, batch)
    loss.backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
