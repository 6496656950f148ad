"""Fused LoRA (kernels.lora.fused_lora) == PEFT's LoRA forward and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from posttrain.adapters import AdapterConfig, apply_adapter
from posttrain.kernels.lora import _LoraLinear, fused_lora

from ..test_adapters import batch, plain


def _lora_model(dtype):
    """Tiny model with LoRA whose B is non-zero, so every LoRA gradient is non-trivial."""
    model = apply_adapter(plain(dtype), AdapterConfig(method="lora", r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def _loss_and_grads(model, fused: bool):
    model.zero_grad(set_to_none=True)
    b = batch()
    with fused_lora(model) if fused else contextlib.nullcontext():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_linear_function_matches_reference_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w, bias = torch.randn(10, 12, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    a = torch.randn(3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 7, 10, generator=g, dtype=torch.float64)
    y = _LoraLinear.apply(x, w, bias, a, b, 0.5)
    ref = x @ w.T + bias + (x @ a.T) @ b.T * 0.5
    torch.testing.assert_close(y, ref)
    got = torch.autograd.grad(y, (x, a, b), gy)
    want = torch.autograd.grad(ref, (x, a, b), gy)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww)


def test_fused_lora_bf16_base_matches_peft_and_restores_forward(monkeypatch):
    model = _lora_model(torch.bfloat16)  # bf16 base, fp32 LoRA weights (trainable_dtype="fp32")
    calls = []
    original = _LoraLinear.forward
    monkeypatch.setattr(_LoraLinear, "forward", staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a)))
    loss_f, grads_f = _loss_and_grads(model, fused=True)
    monkeypatch.undo()
    n_lora = sum(isinstance(m, LoraLinear) for m in model.modules())
    assert len(calls) == n_lora > 0  # every LoRA linear took the fused path
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, LoraLinear))
    loss_p, grads_p = _loss_and_grads(model, fused=False)
    assert abs(float(loss_f) - float(loss_p)) < 2e-2 * float(loss_p)
    for name, gp in grads_p.items():
        gf = grads_f[name]
        assert gf.dtype == torch.float32
        rel = float((gf - gp).norm() / gp.norm())
        assert rel < 0.05, f"{name}: relative gradient difference {rel:.3f}"


def test_fused_lora_fp32_is_bit_identical():
    model = _lora_model(torch.float32)
    loss_f, grads_f = _loss_and_grads(model, fused=True)
    loss_p, grads_p = _loss_and_grads(model, fused=False)
    assert torch.equal(loss_f, loss_p)
    assert all(torch.equal(grads_f[n], grads_p[n]) for n in grads_p)


def test_fused_lora_falls_back_with_dropout(monkeypatch):
    model = apply_adapter(plain(torch.bfloat16), AdapterConfig(method="lora", r=4, alpha=8, dropout=0.1))
    monkeypatch.setattr(_LoraLinear, "apply", lambda *a: pytest.fail("fused path used with LoRA dropout"))
    with fused_lora(model):
        out = model(**{k: v for k, v in batch().items() if k != "labels"})
    assert out.logits.dtype == torch.bfloat16
