"""Objectives: batch -> (loss, metrics). A stage differs from another only here and in its data.

Every objective returns the *mean* loss over its batch's loss tokens and reports the
count as `metrics["loss_tokens"]`; the loop re-weights micro-batches by that count so
accumulation, packing and DDP all give the token-mean of the whole optimizer step.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posttrain.data.collate import model_inputs

Objective = Callable[[torch.nn.Module, dict], tuple[Tensor, dict]]
IGNORE = -100


def _unwrap(model):
    """The HF causal LM under PEFT / DDP wrappers (LoRA layers live inside its modules)."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def is_prompt_learning(model) -> bool:
    model = getattr(model, "module", model)
    cfg = getattr(model, "active_peft_config", None)
    return bool(cfg is not None and getattr(cfg, "is_prompt_learning", False))


def _routing(model, batch):
    """Route rows/tokens to named bottleneck adapters when the batch carries task ids."""
    if "task_ids" not in batch:
        return nullcontext()
    from posttrain.adapters import route_tasks

    return route_tasks(model, batch["task_ids"])


def _ce_sum(head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def loss_position_hidden(model, batch) -> tuple[Tensor, Tensor]:
    """Final hidden states at positions that predict a loss token, and those targets.

    Runs the decoder without the vocabulary head: on a 49k vocabulary the head over
    every position costs more than the layers for short prompts with short answers.
    Packed rows need `use_cache=False` (model_inputs) for transformers' block mask.
    """
    base = _unwrap(model)
    hidden = base.get_decoder()(**model_inputs(batch)).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def causal_lm_loss(model, batch: dict, chunk_size: int = 2048) -> tuple[Tensor, dict]:
    """Next-token cross-entropy on label positions only (SFT and continued pre-training).

    Logits are computed in chunks of `chunk_size` positions under activation
    checkpointing, so the head never materialises [tokens, vocab] for a long batch.
    """
    with _routing(model, batch):
        if is_prompt_learning(model) or is_wrapped(model):
            return _forward_loss(model, batch)
        hidden, targets = loss_position_hidden(model, batch)
    n = targets.numel()
    if n == 0:
        zero = hidden.sum() * 0.0
        return zero, {"loss": 0.0, "loss_tokens": 0, "token_acc": 0.0}
    head = _unwrap(model).get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    for i in range(0, n, chunk_size):
        h, t = hidden[i : i + chunk_size], targets[i : i + chunk_size]
        if n > chunk_size and torch.is_grad_enabled():
            s, c = checkpoint(_ce_sum, head, h, t, use_reentrant=False)
        else:
            s, c = _ce_sum(head, h, t)
        total = total + s
        correct += int(c)
    loss = total / n
    return loss, {"loss": loss.item(), "loss_tokens": n, "token_acc": correct / n}


def _forward_loss(model, batch: dict) -> tuple[Tensor, dict]:
    """Loss through the wrapper's own forward.

    DDP/FSDP/DeepSpeed synchronise gradients from hooks set up in their forward, and
    PEFT prompt tuning prepends virtual tokens there, so neither may be bypassed.
    `logits_to_keep` still limits the head to positions that predict a loss token in
    some row of the batch.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    inputs = model_inputs(batch)
    if is_prompt_learning(model):
        logits = model(**inputs).logits[:, -batch["input_ids"].shape[1] :][:, :-1]  # drop virtual tokens
    else:
        cols = keep.any(0).nonzero().squeeze(1)
        logits = model(**inputs, logits_to_keep=cols).logits
        targets, keep = targets[:, cols], keep[:, cols]
    sel = logits[keep].float()
    t = targets[keep]
    n = t.numel()
    loss = F.cross_entropy(sel, t, reduction="sum") / max(n, 1)
    acc = (sel.argmax(-1) == t).float().mean().item() if n else 0.0
    return loss, {"loss": loss.item(), "loss_tokens": n, "token_acc": acc}


def is_wrapped(model) -> bool:
    """DDP / FSDP / DeepSpeed engines: their forward must run for gradients to sync."""
    return hasattr(model, "module") or type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine")


OBJECTIVES: dict[str, Objective] = {"sft": causal_lm_loss, "pretrain": causal_lm_loss}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
