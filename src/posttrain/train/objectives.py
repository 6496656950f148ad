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
from posttrain.kernels import checkpointing, fallback_once
from posttrain.kernels.attention import packed_attention
from posttrain.kernels.layers import fused_layers
from posttrain.kernels.lora import fused_lora
from posttrain.models import base_model
from posttrain.registry import Registry

Objective = Callable[[torch.nn.Module, dict], tuple[Tensor, dict]]
IGNORE = -100
OBJECTIVES: Registry[Objective] = Registry("objective")  # by stage name, for get_objective


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


def _fused_lora(model):
    """LoRA layers in the base's compute dtype for this forward (see kernels.lora.fused_lora).

    Off under activation checkpointing: a recomputed forward runs after the block is left.
    """
    if checkpointing(base_model(model)):
        return nullcontext()
    return fused_lora(model)


# Model types whose logits are exactly lm_head(final hidden state), or that followed by the final
# tanh soft-capping Gemma2 applies (`output_head` applies it too): for these the head may run at
# loss positions only. Any other type (Cohere's logit_scale, Granite's logits_scaling, ...) may
# transform logits after the head, so it goes through the model's own forward (logged once).
HEAD_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "gemma2",
              "gemma3_text")


def head_only(model) -> bool:
    """May the LM head run at loss positions only (`loss_position_hidden` + `output_head`)?"""
    model_type = getattr(getattr(base_model(model), "config", None), "model_type", None)
    if model_type in HEAD_TYPES:
        return True
    fallback_once("head at loss positions", model_type,
                  f"supported: {', '.join(HEAD_TYPES)}; others may transform logits after the head")
    return False


def output_head(model) -> Callable[[Tensor], Tensor]:
    """The LM head as the model's forward applies it: the Linear, then final soft-capping if set
    (Gemma2: logits = cap * tanh(logits / cap), in the model's dtype, like transformers)."""
    base = base_model(model)
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if not cap:
        return head

    def capped(hidden: Tensor) -> Tensor:
        return torch.tanh(head(hidden) / cap) * cap

    return capped


def own_forward(model) -> bool:
    """Must the loss go through the model's own forward (wrappers, prompt tuning, unknown heads)?"""
    return is_prompt_learning(model) or is_wrapped(model) or not head_only(model)


def _ce_sum(head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def loss_position_hidden(model, batch) -> tuple[Tensor, Tensor]:
    """Final hidden states at positions that predict a loss token, and those targets.

    Runs the decoder without the vocabulary head: on a 49k vocabulary the head over
    every position costs more than the layers for short prompts with short answers.
    Packed rows need `use_cache=False` (model_inputs) for transformers' block mask.
    """
    base = base_model(model)
    with packed_attention(base, batch) as extra:
        hidden = base.get_decoder()(**model_inputs(batch), **extra).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


@OBJECTIVES.register("sft")
def causal_lm_loss(model, batch: dict, chunk_size: int = 2048) -> tuple[Tensor, dict]:
    """Next-token cross-entropy on label positions only (SFT and continued pre-training).

    Logits are computed in chunks of `chunk_size` positions under activation
    checkpointing, so the head never materialises [tokens, vocab] for a long batch.
    """
    with _routing(model, batch), _fused_lora(model), fused_layers(model):
        if own_forward(model):
            return _forward_loss(model, batch)
        hidden, targets = loss_position_hidden(model, batch)
    n = targets.numel()
    if n == 0:
        zero = hidden.sum() * 0.0
        return zero, {"loss": 0.0, "loss_tokens": 0, "token_acc": 0.0}
    head = output_head(model)
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


def _label_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def label_token_logps(model, batch: dict, temperature: float = 1.0, chunk_size: int = 2048) -> Tensor:
    """log p(label token) at every label position, in row-major order ([n], fp32).

    Like causal_lm_loss: hidden states only where a label is predicted, the head in chunks
    (checkpointed when there are several, so [tokens, vocab] never lives at once). Wrapped
    models (DDP/FSDP/DeepSpeed) and prompt tuning go through the wrapper's forward.
    `temperature` divides the logits, as the sampler did (RL's old/new log-probs).
    """
    with _routing(model, batch), _fused_lora(model), fused_layers(model):
        if own_forward(model):
            logits, targets = wrapper_label_logits(model, batch)
            return -F.cross_entropy(logits / temperature, targets, reduction="none")
        hidden, labels = loss_position_hidden(model, batch)
    head = output_head(model)
    n = labels.numel()
    parts = []
    for i in range(0, n, chunk_size):
        h, t = hidden[i : i + chunk_size], labels[i : i + chunk_size]
        if n > chunk_size and torch.is_grad_enabled():
            parts.append(checkpoint(_label_logps, head, h, t, temperature, use_reentrant=False))
        else:
            parts.append(_label_logps(head, h, t, temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def wrapper_label_logits(model, batch: dict) -> tuple[Tensor, Tensor]:
    """(fp32 logits, targets) at every label position, row by row, via the model's own forward;
    `logits_to_keep` limits the head to columns where some row has a label."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    inputs = model_inputs(batch)
    if is_prompt_learning(model):
        logits = model(**inputs).logits[:, -batch["input_ids"].shape[1] :][:, :-1]  # drop virtual tokens
    else:
        cols = keep.any(0).nonzero().squeeze(1)
        logits = model(**inputs, logits_to_keep=cols).logits
        targets, keep = targets[:, cols], keep[:, cols]
    return logits[keep].float(), targets[keep]


def _forward_loss(model, batch: dict) -> tuple[Tensor, dict]:
    """Loss through the wrapper's own forward.

    DDP/FSDP/DeepSpeed synchronise gradients from hooks set up in their forward, and
    PEFT prompt tuning prepends virtual tokens there, so neither may be bypassed.
    `logits_to_keep` still limits the head to positions that predict a loss token in
    some row of the batch.
    """
    sel, t = wrapper_label_logits(model, batch)
    n = t.numel()
    loss = F.cross_entropy(sel, t, reduction="sum") / max(n, 1)
    acc = (sel.argmax(-1) == t).float().mean().item() if n else 0.0
    return loss, {"loss": loss.item(), "loss_tokens": n, "token_acc": acc}


def is_wrapped(model) -> bool:
    """DDP / FSDP / DeepSpeed engines: their forward must run for gradients to sync.

    FSDP2 (`fully_shard`) does not wrap: it swaps the class for `FSDP<Name>`, and its
    root pre-forward hook (lazy init, unsharding) only runs through the root's forward.
    """
    name = type(model).__name__
    return hasattr(model, "module") or name.startswith("FSDP") or name in ("FullyShardedDataParallel",
                                                                            "DeepSpeedEngine")


OBJECTIVES.register("pretrain", causal_lm_loss)  # continued pre-training: the same loss on text


def get_objective(name: str) -> Objective:
    """The objective a stage names (objectives that need more than a name, like distill's
    teacher or DPO's reference, are built by their own make_* function)."""
    if name == "distill":
        raise ValueError("the distill objective needs a teacher: "
                         "posttrain.compress.distill.make_distill_objective(teacher, ...)")
    return OBJECTIVES.get(name)
