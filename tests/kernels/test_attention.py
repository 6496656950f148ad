"""Per-example attention for packed rows (kernels.attention.packed_attention) == transformers' masked SDPA."""


import pytest
import torch

from posttrain.models import tiny_model
from posttrain.kernels import attention as A

from .helpers import loss_and_grads, packed_batch


def test_packed_index_regroups_rows_in_order():
    idx, valid = A.packed_index(torch.tensor([[0, 1, 2, 0, 0, 1]]))
    assert idx.tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 4]]
    assert valid.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert torch.arange(6)[None].expand(3, -1).gather(1, idx)[valid].tolist() == list(range(6))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_same_loss_and_grads_as_masked_sdpa(dtype, tol, monkeypatch):
    torch.manual_seed(0)
    model = tiny_model(vocab_size=256).to(dtype)  # GQA: 4 query heads over 2 kv heads
    batch = packed_batch([5, 17, 3, 20, 9, 12, 8, 6, 20, 4, 7, 11, 15, 14, 13, 16, 18, 19, 10, 2])
    calls = []
    real = A._packed_sdpa
    monkeypatch.setattr(A, "_packed_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))  # re-registered
    fast_loss, fast = loss_and_grads(model, batch, monkeypatch)
    assert calls, "the per-example path was not taken"
    ref_loss, ref = loss_and_grads(model, batch, monkeypatch, disable="packed_attention")
    assert model.config._attn_implementation == "sdpa"  # switched back
    torch.testing.assert_close(fast_loss.float(), ref_loss.float(), rtol=tol, atol=tol)
    for name in ref:
        scale = ref[name].float().abs().max().item() + 1e-6
        assert (fast[name].float() - ref[name].float()).abs().max().item() <= tol * scale, name


def test_not_used_when_dense_is_cheaper(monkeypatch):
    model = tiny_model(vocab_size=256)
    batch = packed_batch([40, 3, 2])  # one long example: padding 3 x 40 costs more than 45²/2
    with A.packed_attention(model, batch) as extra:
        assert extra == {} and model.config._attn_implementation == "sdpa"


def test_used_under_activation_checkpointing_with_the_same_grads(monkeypatch):
    """The recomputed forward (in backward, after the switch is undone) runs per example too, without a mask."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=256)
    batch = packed_batch([5, 17, 3, 20, 9, 12, 8, 6, 20, 4])
    plain_loss, plain = loss_and_grads(model, batch, monkeypatch, disable="packed_attention")
    model.gradient_checkpointing_enable()
    masks = []
    real = A._packed_sdpa
    monkeypatch.setattr(A, "_packed_sdpa", lambda m, q, k, v, mask, **kw: masks.append(mask) or real(m, q, k, v, mask, **kw))
    loss, grads = loss_and_grads(model, batch, monkeypatch)
    layers = model.config.num_hidden_layers
    assert len(masks) == 2 * layers and all(m is None for m in masks)  # forward, then recomputed in backward
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-6)


def test_sdpa_without_packed_index_is_transformers_own():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    A.register_packed_sdpa()
    model = tiny_model(vocab_size=256).eval()
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)  # 4 query heads, 2 kv
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    layer = model.model.layers[0].self_attn
    ours, _ = A._sdpa_or_packed(layer, q, k, v, mask, dropout=0.0)
    theirs, _ = sdpa_attention_forward(layer, q, k, v, mask, dropout=0.0)
    assert torch.equal(ours, theirs)


def test_short_attention_function_matches_per_example_sdpa():
    """_PackedShortAttention (gathers both ways, GQA as stacked rows) vs fp32 SDPA run example by example."""
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 5]
    t, heads, kv, d = sum(lengths), 6, 2, 8
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    idx, valid = A.packed_index(pos)
    q, k, v = (torch.randn(1, t, n, d, generator=g).to(torch.bfloat16).transpose(1, 2).requires_grad_()
               for n in (heads, kv, kv))
    grad_out = torch.randn(1, t, heads, d, generator=g).to(torch.bfloat16)
    out = A._PackedShortAttention.apply(q, k, v, idx, valid, d**-0.5)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    parts, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        kk, vv = (x[:, :, sl].repeat_interleave(heads // kv, dim=1) for x in (k32, v32))
        parts.append(torch.nn.functional.scaled_dot_product_attention(q32[:, :, sl], kk, vv, is_causal=True))
        start += n
    ref = torch.cat(parts, dim=2).transpose(1, 2)  # [1, T, H, D]
    want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), grad_out.float()))
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)
