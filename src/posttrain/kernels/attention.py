"""Packed attention: causal SDPA per example of a packed row, registered with transformers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.kernels import fallback_once

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
    for key_name in ("sliding_window", "softcap", "s_aux"):  # packed_attention never switches such models
        if kwargs.get(key_name) is not None:
            raise RuntimeError(f"packed attention cannot apply {key_name}={kwargs[key_name]!r}; it must not be used "
                               "for this model (see kernels.attention.unsupported_reason)")
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


def _sdpa_or_packed(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """transformers' SDPA, unless the call carries `packed_index`: then per-example SDPA.

    Registered as "sdpa" so that a forward recomputed under activation checkpointing (in
    backward, after `packed_attention` has switched the config back to "sdpa") still runs
    per example: the recomputation replays the layer's keyword arguments, `packed_index`
    with them, and no mask was built for the row. Calls without `packed_index` (every caller
    but ours) reach transformers' function unchanged.
    """
    if kwargs.get("packed_index") is not None:
        return _packed_sdpa(module, query, key, value, attention_mask, **kwargs)
    return _transformers_sdpa(module, query, key, value, attention_mask, **kwargs)


def register_packed_sdpa() -> None:
    """Register `_packed_sdpa` with transformers as the attention implementation PACKED_SDPA.

    Idempotent: registers again only when `_packed_sdpa` is no longer the function registered
    (a test replaced it with a spy). A new name changes no model by itself; `packed_attention`
    switches one model's config to it for one forward. "sdpa" becomes `_sdpa_or_packed`.
    """
    global _registered, _transformers_sdpa
    if _registered is _packed_sdpa:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(PACKED_SDPA, _packed_sdpa)  # not a mask function: no mask is built
    _transformers_sdpa = sdpa_attention_forward
    AttentionInterface.register("sdpa", _sdpa_or_packed)
    _registered = _packed_sdpa


_registered: Callable | None = None  # the function registered under PACKED_SDPA
_transformers_sdpa: Callable | None = None


def packed_index(position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(idx [E, M], valid [E, M]) of a packed row whose positions restart at 0 per example."""
    pos = position_ids[0]
    starts = (pos == 0).nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([pos.numel()]))
    j = torch.arange(int(lengths.max()), device=pos.device)
    valid = j[None, :] < lengths[:, None]
    idx = torch.where(valid, starts[:, None] + j[None, :], starts[:, None])
    return idx, valid


def unsupported_reason(config) -> str | None:
    """Why per-example SDPA would not compute this model's attention, or None if it would.

    It computes plain causal softmax(q k^T * scaling) v: no sliding window (Gemma2/3, Mistral
    v0.1, Qwen with use_sliding_window), no logit soft-capping (Gemma2), no attention sinks; and it
    replaces SDPA only (Gemma2 defaults to eager).
    """
    impl = getattr(config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r} is not sdpa"
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) is not False else None
    if any(t != "full_attention" for t in types) or (not types and window):
        return "sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    return None


@contextmanager
def packed_attention(base, batch: dict) -> Iterator[dict]:
    """Extra forward kwargs, with the model switched to per-example SDPA for a packed row.

    Applies only where it is exact and cheaper: one packed row (position_ids, no mask) on an
    sdpa model without sliding windows or soft-capping (`unsupported_reason`; logged once per
    architecture), and fewer padded scores than the dense T². Under activation checkpointing
    too: the recomputed forward reaches `_sdpa_or_packed` with the same `packed_index`, so a long
    packed row never builds its [T, T] block mask.
    """
    config = getattr(base, "config", None)
    ids = batch.get("position_ids")
    usable = (ids is not None and "attention_mask" not in batch and ids.shape[0] == 1 and config is not None)
    if usable:
        why = unsupported_reason(config)
        if why is not None:
            fallback_once("packed attention", getattr(config, "model_type", None), why)
            usable = False
    if usable:
        idx, valid = packed_index(ids)
        usable = idx.numel() * idx.shape[1] * 2 <= ids.shape[1] ** 2
    if not usable:
        yield {}
        return
    register_packed_sdpa()
    config._attn_implementation = PACKED_SDPA
    try:
        yield {"packed_index": (idx, valid)}
    finally:
        config._attn_implementation = "sdpa"
