"""Fused Llama-style RMSNorm and rotary embedding (forward and hand-written backward) for bf16/fp16 training."""

from __future__ import annotations

import importlib
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from posttrain.kernels import checkpointing, fallback_once
from posttrain.models import base_model

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


def _fused_rotary_over(original):
    """`apply_rotary_pos_emb` through `_Rotary` where it is exact, else `original` (the module's own).

    Falls back for fp32, mixed dtypes, another unsqueeze_dim, and partial rotary (cos narrower
    than the head, as Phi3's partial_rotary_factor < 1 gives), which `_Rotary` does not cover.
    """

    def fused(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
        if (unsqueeze_dim != 1 or q.dtype not in _HALF or not (q.dtype == k.dtype == cos.dtype == sin.dtype)
                or cos.shape[-1] != q.shape[-1]):
            return original(q, k, cos, sin, unsqueeze_dim)
        return _Rotary.apply(q, k, cos, sin)

    fused.posttrain_fused = True
    return fused


def is_fused_rotary(fn) -> bool:
    return bool(getattr(fn, "posttrain_fused", False))


_HALF = (torch.bfloat16, torch.float16)
# model_type -> transformers modeling module whose RMSNorm forward and apply_rotary_pos_emb are
# Llama's math (RMSNorm checked source-identical in transformers 5.25; rotary parity-tested per
# family in tests/kernels/test_arch_parity.py). Gemma is not here: its RMSNorm is x * (1 + w) in
# fp32, a different rounding, so it keeps transformers' modules.
FUSED_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "qwen2_moe": "qwen2_moe", "phi3": "phi3"}
_originals: dict[str, object] = {}  # family -> its apply_rotary_pos_emb while replaced
_rotary_lock = threading.Lock()


def _modeling(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def install_fused_rotary(family: str = "llama") -> bool:
    """Point transformers' `apply_rotary_pos_emb` of one family at the fused one; False if already done.

    Process-wide, not per model, because transformers offers no per-model hook: e.g.
    LlamaAttention's forward calls the module-level function `modeling_llama.apply_rotary_pos_emb`
    by name. So while it is installed every forward of that family in the process (any model, any
    thread) goes through the fused version, which hands fp32, mixed-dtype and partial-rotary calls
    to the original, so only bf16/fp16 forwards elsewhere see the fused version's rounding.
    Idempotent: a nested `fused_layers` finds it installed, gets False and leaves undoing it to the
    caller that got True (`uninstall_fused_rotary`). Nothing is patched at import time.
    """
    modeling = _modeling(family)
    with _rotary_lock:
        if family in _originals:
            return False
        _originals[family] = modeling.apply_rotary_pos_emb
        modeling.apply_rotary_pos_emb = _fused_rotary_over(modeling.apply_rotary_pos_emb)
        return True


def uninstall_fused_rotary(family: str = "llama") -> None:
    """Put transformers' own `apply_rotary_pos_emb` of the family back (no-op when not installed)."""
    with _rotary_lock:
        if family in _originals:
            _modeling(family).apply_rotary_pos_emb = _originals.pop(family)


def _norm_forward(norm):
    original = norm.forward

    def forward(x: Tensor) -> Tensor:
        if x.dtype not in _HALF or norm.weight.dtype != x.dtype:
            return original(x)
        return _RMSNorm.apply(x, norm.weight, float(norm.variance_epsilon))

    return forward


@contextmanager
def fused_layers(model) -> Iterator[None]:
    """RMSNorm and rotary embedding through the fused Functions above in this block.

    Only the families in FUSED_TYPES are switched (Gemma's norm is 1 + weight in fp32; other
    families are logged once by `fallback_once` and keep transformers' modules); each falls back
    to the original for fp32 inputs. Off under activation checkpointing: a recomputed forward
    would run after the block is left. The norms are switched per module instance; rotary
    process-wide, see `install_fused_rotary`.
    """
    base = base_model(model)
    if checkpointing(base):
        yield
        return
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    family = FUSED_TYPES.get(model_type)
    if family is None:
        fallback_once("fused RMSNorm/rotary", model_type,
                      f"supported: {', '.join(FUSED_TYPES)}; other norms/rotary differ from Llama's")
        yield
        return
    modeling = _modeling(family)
    patched = []
    attention = False
    for m in base.modules():
        kind = type(m)
        if kind.__module__ != modeling.__name__:
            continue
        attention = attention or kind.__name__.endswith("Attention")
        if kind.__name__.endswith("RMSNorm") and "forward" not in m.__dict__:
            m.forward = _norm_forward(m)
            patched.append(m)
    rotary = attention and install_fused_rotary(family)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        if rotary:
            uninstall_fused_rotary(family)
