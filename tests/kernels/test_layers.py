"""Fused RMSNorm / rotary (kernels.layers.fused_layers) == transformers' Llama modules."""


import pytest
import torch
from transformers.models.llama import modeling_llama as llama

from posttrain.models import tiny_model
from posttrain.kernels import layers as L

from .helpers import loss_and_grads, packed_batch


def _grads(fn, *inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out)
    return [o.detach() for o in outs], [x.grad for x in leaves]


def test_rmsnorm_forward_is_transformers_to_the_bit_and_grads_match():
    torch.manual_seed(0)
    norm = llama.LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 37, 96) * 3
    g = torch.randn(2, 37, 96)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        w = norm.weight.detach().to(dtype)
        ref = lambda x, w: llama.LlamaRMSNorm.forward(_Norm(w, norm.variance_epsilon), x)  # noqa: E731
        fused = lambda x, w: L._RMSNorm.apply(x, w, norm.variance_epsilon)  # noqa: E731
        (y_ref,), g_ref = _grads(ref, x.to(dtype), w, grad_out=(g.to(dtype),))
        (y, ), g_fused = _grads(fused, x.to(dtype), w, grad_out=(g.to(dtype),))
        assert torch.equal(y, y_ref), dtype
        for a, b in zip(g_fused, g_ref):  # dx and dweight
            scale = b.abs().max().item()
            assert (a.double() - b.double()).abs().max().item() <= tol * scale, dtype


class _Norm(torch.nn.Module):
    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.variance_epsilon = weight, eps


def test_rmsnorm_backward_passes_gradcheck():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: L._RMSNorm.apply(x, w, 1e-6), (x, w))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_rotary_matches_transformers(dtype, tol):
    torch.manual_seed(0)
    t, d = 29, 16
    q = torch.randn(1, t, 4, d).transpose(1, 2)  # [B, H, T, D] views, as LlamaAttention passes them
    k = torch.randn(1, t, 2, d).transpose(1, 2)
    angle = torch.arange(t)[None, :, None] * torch.rand(d // 2)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    grads = (torch.randn(1, 4, t, d).to(dtype), torch.randn(1, 2, t, d).to(dtype))
    args = [x.to(dtype) for x in (q, k)]
    trig = [x.to(dtype) for x in (cos, sin)]
    out_ref, g_ref = _grads(lambda q, k: llama.apply_rotary_pos_emb(q, k, *trig), *args, grad_out=grads)
    out, g = _grads(lambda q, k: L._Rotary.apply(q, k, *trig), *args, grad_out=grads)
    for a, b in zip(out + g, out_ref + g_ref):
        assert (a.double() - b.double()).abs().max().item() <= tol * b.abs().max().item()


def _spy(monkeypatch):
    calls = {"norm": 0, "rotary": 0}
    for name, key in (("_RMSNorm", "norm"), ("_Rotary", "rotary")):
        fn = getattr(L, name)
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _r=real, _k=key: calls.__setitem__(_k, calls[_k] + 1) or _r(*a))
    return calls


def test_bf16_training_loss_and_grads_match_transformers_modules(monkeypatch):
    torch.manual_seed(0)
    model = tiny_model(vocab_size=256).to(torch.bfloat16)  # 2 layers, full fine-tuning (norm weights train)
    batch = packed_batch([5, 17, 3, 20, 9, 12])
    calls = _spy(monkeypatch)
    fused_loss, fused = loss_and_grads(model, batch, monkeypatch)
    assert calls == {"norm": 5, "rotary": 2}
    ref_loss, ref = loss_and_grads(model, batch, monkeypatch, disable="fused_layers")
    torch.testing.assert_close(fused_loss.float(), ref_loss.float(), rtol=1e-2, atol=1e-2)
    assert fused.keys() == ref.keys()
    for name in ref:
        scale = ref[name].float().abs().max().item() + 1e-6
        assert (fused[name].float() - ref[name].float()).abs().max().item() <= 5e-2 * scale, name


def test_modules_are_restored_after_the_forward():
    model = tiny_model(vocab_size=256).to(torch.bfloat16)
    rotary = llama.apply_rotary_pos_emb
    with L.fused_layers(model):
        assert L.is_fused_rotary(llama.apply_rotary_pos_emb)
        assert "forward" in model.model.norm.__dict__ and "forward" in model.model.layers[0].input_layernorm.__dict__
    assert llama.apply_rotary_pos_emb is rotary
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fp32_training_is_bit_identical(monkeypatch):
    torch.manual_seed(0)
    model = tiny_model(vocab_size=256)
    batch = packed_batch([5, 17, 3, 20, 9, 12])
    calls = _spy(monkeypatch)
    fused_loss, fused = loss_and_grads(model, batch, monkeypatch)
    assert calls == {"norm": 0, "rotary": 0}
    ref_loss, ref = loss_and_grads(model, batch, monkeypatch, disable="fused_layers")
    assert torch.equal(fused_loss, ref_loss)
    assert all(torch.equal(fused[n], ref[n]) for n in ref)


def test_not_used_under_activation_checkpointing():
    model = tiny_model(vocab_size=256).to(torch.bfloat16)
    model.activation_checkpointing_enable()
    rotary = llama.apply_rotary_pos_emb
    with L.fused_layers(model):
        assert llama.apply_rotary_pos_emb is rotary
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_rotary_install_is_explicit_idempotent_and_nests():
    original = llama.apply_rotary_pos_emb
    assert not L.is_fused_rotary(original)  # importing the kernels patched nothing
    assert L.install_fused_rotary() is True
    try:
        assert L.is_fused_rotary(llama.apply_rotary_pos_emb)
        assert L.install_fused_rotary() is False  # already installed: the first caller undoes it
        model = tiny_model(vocab_size=256).to(torch.bfloat16)
        with L.fused_layers(model):  # nested inside an install: leaves it in place on exit
            assert L.is_fused_rotary(llama.apply_rotary_pos_emb)
        assert L.is_fused_rotary(llama.apply_rotary_pos_emb)
    finally:
        L.uninstall_fused_rotary()
    assert llama.apply_rotary_pos_emb is original
    L.uninstall_fused_rotary()  # a second uninstall is a no-op
    assert llama.apply_rotary_pos_emb is original
