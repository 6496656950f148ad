"""Objectives: batch -> (loss, metrics). A stage differs from another only here and in its data.

Every objective returns the *mean* loss over its batch's loss tokens and reports the
count as `metrics["loss_tokens"]`; the loop re-weights micro-batches by that count so
accumulation, packing and DDP all give the token-mean of the whole optimizer step.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posttrain.data.collate import model_inputs
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


# ----------------------------------------------------------------------------- packed attention
# Perf (bench/sft_throughput.py, SmolLM2-135M LoRA, 1024-token packed rows of ~30-token chats,
# 1 thread): transformers turns a packed row into a dense [T, T] block-diagonal mask, so SDPA
# pays for T² scores though only the diagonal blocks count; that was 43% of a training step.
# Regrouping the row into a right-padded [examples, longest] batch and running causal SDPA
# without a mask costs sum over examples of longest² instead. Same attention, same loss.

PACKED_SDPA = "posttrain_packed_sdpa"


def _packed_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, packed_index: tuple[Tensor, Tensor] | None = None, **kwargs):
    """Causal SDPA per example of one packed row ([1, heads, T, dim] in, [1, T, heads, dim] out).

    `packed_index` = (idx [E, M], valid [E, M]): the row positions of each example, right-padded.
    Right padding needs no mask under `is_causal`: a real query only sees earlier real keys of
    its own example; padded queries see junk and are dropped.
    """
    idx, valid = packed_index
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if idx.shape[1] <= SHORT and query.dtype != torch.float32 and not dropout:
        return _PackedShortAttention.apply(query, key, value, idx, valid, scale), None
    groups = query.shape[1] // key.shape[1]
    q = query[0][:, idx].transpose(0, 1)  # [E, H, M, D]
    k = key[0][:, idx].transpose(0, 1).repeat_interleave(groups, dim=1)
    v = value[0][:, idx].transpose(0, 1).repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
    return out.transpose(1, 2)[valid].unsqueeze(0), None  # [1, T, H, D] in row order


# torch 2.13's CPU flash-attention backward is slow on many short sequences: for 34 x 40 tokens,
# 9 heads, bf16, 1 thread, fwd+bwd took 47 ms with flash, 17 ms with the math backend and 8 ms
# written out as below; a LoRA step on 1024-token rows went 170 -> 258 tok/s. Used for
# bf16/fp16 only: its fp32 arithmetic (1e-8 from flash) is far below their rounding, while fp32
# runs keep torch's kernel, which matches padded batches to the bit-level tolerance of
# tests/train/test_loop.py (Adam amplifies the 1e-8 to 2e-5 in weights after 3 steps).
# The regrouping is part of the Function: rows -> examples and back are gathers both ways
# (forward by `idx`, backward by the inverse `inv`), never autograd's scatter-add, and GQA
# query heads share their kv head by stacking G query heads as G*M rows instead of
# repeat_interleave copies of k and v. Against autograd indexing + repeat_interleave (23
# examples, 1035 tokens, 9 q / 3 kv heads, bf16, 2 threads): fwd+bwd 20-22 -> 12.7 ms a layer;
# dK/dV are summed over the G heads in fp32 before rounding. torch.softmax in place of the
# written-out exp/max/sum and in-place backward arithmetic: 10.6-12.8 -> 8.6-9.6 ms a layer.
SHORT = 256


class _PackedShortAttention(torch.autograd.Function):
    """Per-example causal attention of one packed row, in the order flash attention computes it.

    In: query [1, H, T, D], key/value [1, KV, T, D], idx/valid [E, M] (packed_index). Out:
    [1, T, H, D]. Forward: out = softmax(s) @ v, in fp32; backward: dS = P * (dP -
    rowsum(dO * O)), flash's formula, which needs no saved softmax graph. Gradients at padded
    slots are never gathered back; zeroing dO there keeps padded queries out of dK and dV.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, idx: Tensor, valid: Tensor, scale: float) -> Tensor:
        (e, m), (h, kv, d) = idx.shape, (query.shape[1], key.shape[1], query.shape[-1])
        g = h // kv
        flat, inv = idx.reshape(-1), valid.reshape(-1).nonzero().squeeze(1)

        def slots(x: Tensor) -> Tensor:  # [1, heads, T, D] -> [E*M, heads, D] fp32
            return x[0].transpose(0, 1).index_select(0, flat).float()

        q = slots(query).view(e, m, kv, g, d).permute(0, 2, 3, 1, 4).reshape(e, kv, g * m, d)
        k = slots(key).view(e, m, kv, d).transpose(1, 2)  # [E, KV, M, D]
        v = slots(value).view(e, m, kv, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [E, KV, G*M, M]
        causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril().repeat(g, 1)
        scores.masked_fill_(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # one fused pass: exp(s - max) / sum
        out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, probs, out, flat, inv, valid)
        ctx.scale, ctx.dtype, ctx.shape = scale, query.dtype, (e, m, h, kv, g, d)
        rows = out.view(e, kv, g, m, d).permute(0, 3, 1, 2, 4).reshape(e * m, h, d).index_select(0, inv)
        return rows.to(query.dtype).unsqueeze(0)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs, out, flat, inv, valid = ctx.saved_tensors
        e, m, h, kv, g, d = ctx.shape
        go = grad_out[0].index_select(0, flat).float().mul_(valid.reshape(-1, 1, 1))
        go = go.view(e, m, kv, g, d).permute(0, 2, 3, 1, 4).reshape(e, kv, g * m, d)
        grad_v = torch.matmul(probs.transpose(-1, -2), go)
        grad_p = torch.matmul(go, v.transpose(-1, -2))
        grad_s = grad_p.sub_((go * out).sum(-1, keepdim=True)).mul_(probs).mul_(ctx.scale)
        grad_q = torch.matmul(grad_s, k)
        grad_k = torch.matmul(grad_s.transpose(-1, -2), q)

        def rows(x: Tensor) -> Tensor:  # [E*M, heads, D] slots -> [1, heads, T, D]
            return x.index_select(0, inv).to(ctx.dtype).transpose(0, 1).unsqueeze(0)

        grad_q = rows(grad_q.view(e, kv, g, m, d).permute(0, 3, 1, 2, 4).reshape(e * m, h, d))
        grad_k = rows(grad_k.transpose(1, 2).reshape(e * m, kv, d))
        grad_v = rows(grad_v.transpose(1, 2).reshape(e * m, kv, d))
        return grad_q, grad_k, grad_v, None, None, None


def _register_packed_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, _packed_sdpa)  # not a mask function: no mask is built


def packed_index(position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(idx [E, M], valid [E, M]) of a packed row whose positions restart at 0 per example."""
    pos = position_ids[0]
    starts = (pos == 0).nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([pos.numel()]))
    j = torch.arange(int(lengths.max()), device=pos.device)
    valid = j[None, :] < lengths[:, None]
    idx = torch.where(valid, starts[:, None] + j[None, :], starts[:, None])
    return idx, valid


@contextmanager
def packed_attention(base, batch: dict) -> Iterator[dict]:
    """Extra forward kwargs, with the model switched to per-example SDPA for a packed row.

    Applies only where it is exact and cheaper: one packed row (position_ids, no mask) on an
    sdpa model without sliding windows or activation checkpointing (a recomputed forward
    would run after the switch is undone), and fewer padded scores than the dense T².
    """
    config = getattr(base, "config", None)
    ids = batch.get("position_ids")
    usable = (
        ids is not None and "attention_mask" not in batch and ids.shape[0] == 1 and config is not None
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and getattr(config, "sliding_window", None) is None
        and not _checkpointing(base)
    )
    if usable:
        idx, valid = packed_index(ids)
        usable = idx.numel() * idx.shape[1] * 2 <= ids.shape[1] ** 2
    if not usable:
        yield {}
        return
    if PACKED_SDPA not in _registered:
        _register_packed_sdpa()
        _registered.add(PACKED_SDPA)
    config._attn_implementation = PACKED_SDPA
    try:
        yield {"packed_index": (idx, valid)}
    finally:
        config._attn_implementation = "sdpa"


_registered: set[str] = set()


def _fused_lora(model):
    """LoRA layers in the base's compute dtype for this forward (see adapters.fused_lora).

    Off under activation checkpointing: a recomputed forward runs after the block is left.
    """
    if _checkpointing(base_model(model)):
        return nullcontext()
    from posttrain.adapters import fused_lora

    return fused_lora(model)


# ----------------------------------------------------------------------------- fused layer pieces
# Perf (SmolLM2-135M LoRA step, ~1015-token packed row, bf16, 1 thread): besides the matmuls,
# RMSNorm and rotary ran as many small eager kernels forward and backward. RMSNorm fwd+bwd took
# 2.07 ms a call (autograd's backward through the fp32 upcast 1.7 ms), 61 calls a step; as one
# Function with a hand-written backward: 1.19-1.30 ms. Rotary (q and k) 2.0 -> 1.35 ms a layer.
# SiLU(gate)*up as a Function saving gate/up only was slower (4.05 vs 3.1-3.6 ms: recomputing
# silu costs more than the saved activation), so the MLP keeps autograd. Compiling the same math
# (torch.compile, dynamic shapes) would save about twice as much but costs ~10 s of compile on the
# first step and shifts bf16 results more; not used. Used for bf16/fp16 activations only, like
# fused_lora: fp32 runs keep transformers' modules and stay bit-identical.


class _RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm: weight * (x * rsqrt(mean(x²) + eps)) in fp32, rounded to x's dtype first.

    Forward equals transformers' to the bit; backward saves x and rstd (not the fp32 copies
    autograd keeps) and computes dx = rstd * (g' - x̂ mean(g' x̂)) with g' = g * weight, in fp32.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.to(_math_dtype(x), copy=True)  # fp32 (fp64 stays fp64, for gradcheck)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        y = xf.mul_(rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return weight * y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, rstd, weight = ctx.saved_tensors
        grad_x = grad_w = None
        xhat = x.to(rstd.dtype, copy=True).mul_(rstd)
        if ctx.needs_input_grad[1]:  # full fine-tuning: the rounded x̂ is what weight multiplied
            grad_w = (grad_y * xhat.to(x.dtype)).sum_to_size(weight.shape)
        if ctx.needs_input_grad[0]:
            g = (grad_y * weight).to(rstd.dtype)
            dot = (g * xhat).mean(-1, keepdim=True)
            grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class _Rotary(torch.autograd.Function):
    """apply_rotary_pos_emb for q and k ([B, heads, T, D]) with cos/sin [B, T, D].

    out = x cos + rotate_half(x) sin as a product plus two in-place addcmuls per half (one
    rounding for the sum instead of three); backward is the transposed rotation, saving only
    cos and sin.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1), _rotate(k, cos, sin, 1)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_q, cos, sin, -1), _rotate(grad_k, cos, sin, -1), None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: int) -> Tensor:
    """x cos + R x sin for R = rotate_half (sign 1) or its transpose (sign -1), R^T(y) = (y2, -y1)."""
    half = x.shape[-1] // 2
    out = x * cos
    if sign > 0:  # (x1 c1 - x2 s1, x2 c2 + x1 s2)
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    else:  # (g1 c1 + g2 s2, g2 c2 - g1 s1)
        out[..., :half].addcmul_(x[..., half:], sin[..., half:])
        out[..., half:].addcmul_(x[..., :half], sin[..., :half], value=-1)
    return out


def _fused_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    if unsqueeze_dim != 1 or q.dtype not in _HALF or not (q.dtype == k.dtype == cos.dtype == sin.dtype):
        return _llama_rotary(q, k, cos, sin, unsqueeze_dim)
    return _Rotary.apply(q, k, cos, sin)


_HALF = (torch.bfloat16, torch.float16)
_llama_rotary = None  # transformers' apply_rotary_pos_emb while fused_layers has replaced it


def _norm_forward(norm):
    original = norm.forward

    def forward(x: Tensor) -> Tensor:
        if x.dtype not in _HALF or norm.weight.dtype != x.dtype:
            return original(x)
        return _RMSNorm.apply(x, norm.weight, float(norm.variance_epsilon))

    return forward


@contextmanager
def fused_layers(model) -> Iterator[None]:
    """Llama RMSNorm and rotary embedding through the fused Functions above in this block.

    Only transformers' Llama classes are switched (other families may differ in detail, e.g.
    Gemma's 1 + weight); each falls back to the original for fp32 inputs. Off under activation
    checkpointing: a recomputed forward would run after the block is left.
    """
    global _llama_rotary
    base = base_model(model)
    if _checkpointing(base):
        yield
        return
    from transformers.models.llama import modeling_llama as llama

    patched = []
    for m in base.modules():
        if "forward" in m.__dict__:
            continue
        if type(m) is llama.LlamaRMSNorm:
            m.forward = _norm_forward(m)
            patched.append(m)
    rotary = any(type(m) is llama.LlamaAttention for m in base.modules()) and _llama_rotary is None
    if rotary:
        _llama_rotary, llama.apply_rotary_pos_emb = llama.apply_rotary_pos_emb, _fused_rotary
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        if rotary:
            llama.apply_rotary_pos_emb, _llama_rotary = _llama_rotary, None


def _checkpointing(base) -> bool:
    """Activation checkpointing on? (transformers 5 renamed is_gradient_checkpointing.)"""
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(base, name, False))


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
        if is_prompt_learning(model) or is_wrapped(model):
            return _forward_loss(model, batch)
        hidden, targets = loss_position_hidden(model, batch)
    n = targets.numel()
    if n == 0:
        zero = hidden.sum() * 0.0
        return zero, {"loss": 0.0, "loss_tokens": 0, "token_acc": 0.0}
    head = base_model(model).get_output_embeddings()
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
        if is_prompt_learning(model) or is_wrapped(model):
            logits, targets = wrapper_label_logits(model, batch)
            return -F.cross_entropy(logits / temperature, targets, reduction="none")
        hidden, labels = loss_position_hidden(model, batch)
    head = base_model(model).get_output_embeddings()
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
