"""Each training fast path, per architecture: the same loss (and grads) as plain transformers, or a
fallback to plain transformers stated once in the log. Tiny random models of every TINY_ARCHS family."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from posttrain import kernels
from posttrain.adapters import AdapterConfig, apply_adapter
from posttrain.kernels import attention as A
from posttrain.kernels import layers as L
from posttrain.kernels import lora as K
from posttrain.models import TINY_ARCHS, tiny_model
from posttrain.train import objectives as O

from .helpers import loss_and_grads, packed_batch

ARCHS = list(TINY_ARCHS)
LENGTHS = [5, 17, 3, 20, 9, 12, 8, 6, 20, 4, 7, 11, 15, 14, 13, 16]  # longer than Gemma's window of 8


def model_of(arch: str, dtype=torch.float32):
    """A tiny model whose logits are large enough (embeddings x20) for soft-capping and rounding to show."""
    model = tiny_model(vocab_size=256, heads=2, kv_heads=1, arch=arch, dtype=dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20)
    return model


def reference_loss(model, batch) -> torch.Tensor:
    """Plain transformers: each packed example alone through the model's own forward, full logits."""
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (pos == 0).nonzero().squeeze(1).tolist() + [ids.numel()]
    total, n = 0.0, 0
    for a, b in zip(starts, starts[1:]):
        logits = model(input_ids=ids[None, a:b]).logits[0, :-1].float()
        target = labels[a + 1 : b]
        keep = target != -100
        total = total + F.cross_entropy(logits[keep], target[keep], reduction="sum")
        n += int(keep.sum())
    return total / n


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """Forget which fallbacks were stated, and capture the posttrain log."""
    monkeypatch.setattr(kernels, "_stated", set())
    caplog.set_level(logging.WARNING, logger="posttrain")
    return caplog


def fallback_lines(caplog, path: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{path}: not used")]


@pytest.mark.parametrize("arch", ARCHS)
def test_all_fast_paths_on_give_plain_transformers_loss_in_fp32(arch):
    """Packed attention + head at loss positions (+ fused kernels, which pass fp32 through) against
    each example run alone through the model's forward: catches a skipped soft-cap, window or norm."""
    torch.manual_seed(0)
    model = model_of(arch)
    batch = packed_batch(LENGTHS)
    with torch.no_grad():
        loss, _ = O.causal_lm_loss(model, batch)
        ref = reference_loss(model, batch)
        logps = O.label_token_logps(model, batch)
    assert loss.item() > 0.5  # the logits are far from uniform: differences would show
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(-logps.mean(), ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_attention_matches_masked_sdpa_or_falls_back_once(arch, monkeypatch, fresh_log):
    torch.manual_seed(0)
    model = model_of(arch)
    batch = packed_batch(LENGTHS)
    calls = []
    real = A._packed_sdpa
    monkeypatch.setattr(A, "_packed_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast_loss, fast = loss_and_grads(model, batch, monkeypatch)
    ref_loss, ref = loss_and_grads(model, batch, monkeypatch, disable="packed_attention")
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-6
        assert (fast[name] - ref[name]).abs().max().item() <= 1e-4 * scale, name
    lines = fallback_lines(fresh_log, "packed attention")
    if A.unsupported_reason(model.config) is None:
        assert calls and lines == []
    else:  # Gemma2 (eager, soft-capping) and Gemma3 (sliding windows)
        assert not calls
        assert len(lines) == 1 and f"model type {arch!r}" in lines[0], lines
        loss_and_grads(model, batch, monkeypatch)
        assert len(fallback_lines(fresh_log, "packed attention")) == 1  # once per process, not per step


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_norm_and_rotary_match_transformers_in_bf16_or_fall_back_once(arch, monkeypatch, fresh_log):
    torch.manual_seed(0)
    model = model_of(arch, torch.bfloat16)  # full fine-tuning: norm weights train too
    batch = packed_batch(LENGTHS)
    calls = {"norm": 0, "rotary": 0}
    for name, key in (("_RMSNorm", "norm"), ("_Rotary", "rotary")):
        fn = getattr(L, name)
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _r=real, _k=key: calls.__setitem__(_k, calls[_k] + 1) or _r(*a))
    fused_loss, fused = loss_and_grads(model, batch, monkeypatch)
    used = dict(calls)
    ref_loss, ref = loss_and_grads(model, batch, monkeypatch, disable="fused_layers")
    lines = fallback_lines(fresh_log, "fused RMSNorm/rotary")
    if arch in L.FUSED_TYPES:
        norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
        assert used == {"norm": norms, "rotary": model.config.num_hidden_layers} and lines == []
        torch.testing.assert_close(fused_loss.float(), ref_loss.float(), rtol=1e-2, atol=1e-2)
        for name in ref:
            scale = ref[name].float().abs().max().item() + 1e-6
            assert (fused[name].float() - ref[name].float()).abs().max().item() <= 5e-2 * scale, name
    else:  # Gemma: RMSNorm is x * (1 + w) in fp32
        assert used == {"norm": 0, "rotary": 0}
        assert torch.equal(fused_loss, ref_loss)
        assert len(lines) == 1 and f"model type {arch!r}" in lines[0], lines
    assert not any(L.is_fused_rotary(getattr(L._modeling(f), "apply_rotary_pos_emb")) for f in L.FUSED_TYPES.values())


def test_fused_rotary_leaves_partial_rotary_to_the_original():
    """Phi3 with partial_rotary_factor < 1 rotates only part of each head: the fused path must not."""
    from transformers.models.phi3 import modeling_phi3 as phi3

    fused = L._fused_rotary_over(phi3.apply_rotary_pos_emb)
    q, k = torch.randn(1, 2, 5, 16).bfloat16(), torch.randn(1, 1, 5, 16).bfloat16()
    cos, sin = torch.randn(1, 5, 8).bfloat16(), torch.randn(1, 5, 8).bfloat16()
    for a, b in zip(fused(q, k, cos, sin), phi3.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_lora_matches_peft_in_bf16(arch, monkeypatch):
    """Fused LoRA is per nn.Linear, so it covers every family (Phi3's fused qkv too); on the MoE the
    routed experts are 3-D parameters that get no LoRA at all (logged by apply_adapter)."""
    torch.manual_seed(0)
    model = apply_adapter(model_of(arch, torch.bfloat16), AdapterConfig(method="lora", r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at 0: give the adapter something to add
    batch = packed_batch(LENGTHS)
    calls = []
    real = K._LoraLinear.apply
    monkeypatch.setattr(K._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    fused_loss, fused = loss_and_grads(model, batch, monkeypatch)
    n_lora = sum(1 for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert len(calls) == n_lora > 0
    ref_loss, ref = loss_and_grads(model, batch, monkeypatch, disable="_fused_lora")
    exact_loss, exact = loss_and_grads(copy.deepcopy(model).float(), batch, monkeypatch)  # fp32: no fast path
    assert fused.keys() == ref.keys() == exact.keys() and all("lora_" in n for n in ref)
    # bf16 rounding moves both bf16 paths 2-7% (gradient norm) from fp32 here; the fused one must
    # stay as close to the fp32 truth as PEFT's own bf16 forward is
    assert abs(fused_loss.float() - exact_loss) <= 2 * abs(ref_loss.float() - exact_loss) + 1e-2
    for name in ref:
        def err(grads):
            return float((grads[name].float() - exact[name]).norm() / exact[name].norm())
        assert err(fused) <= 2 * err(ref) + 0.02, f"{name}: fused {err(fused):.3f} vs PEFT {err(ref):.3f} from fp32"


def test_moe_lora_all_linear_leaves_the_routed_experts_without_adapters(caplog):
    caplog.set_level(logging.WARNING, logger="posttrain")
    model = apply_adapter(model_of("qwen2_moe"), AdapterConfig(method="lora", r=2, target_modules="all-linear"))
    wrapped = {n.split(".lora_A")[0].split("layers.0.")[-1] for n, _ in model.named_parameters()
               if "lora_A" in n and "layers.0." in n}
    assert wrapped == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                       "mlp.shared_expert_gate"}
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and not any(p.requires_grad for p in experts)
    assert any("routed MoE experts" in r.getMessage() and "qwen2_moe" in r.getMessage() for r in caplog.records)


def test_an_unknown_head_goes_through_the_model_forward_and_says_so(monkeypatch, fresh_log):
    """A family not known to compute logits as lm_head(hidden) (+ soft-cap) keeps the model's forward."""
    torch.manual_seed(0)
    model = model_of("llama")
    batch = packed_batch(LENGTHS)
    with torch.no_grad():
        ref = reference_loss(model, batch)
        monkeypatch.setattr(O, "HEAD_TYPES", ("mistral",))
        monkeypatch.setattr(O, "loss_position_hidden", lambda *a: pytest.fail("the head-only path ran"))
        loss, _ = O.causal_lm_loss(model, batch)
        O.causal_lm_loss(model, batch)
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=2e-6)
    assert len(fallback_lines(fresh_log, "head at loss positions")) == 1


def test_gemma2_soft_cap_is_applied_at_loss_positions():
    """The bug this file was written for: the head-only path skipped Gemma2's final soft-capping."""
    model = model_of("gemma2")
    hidden = torch.randn(3, model.config.hidden_size)
    cap = model.config.final_logit_softcapping
    raw = model.lm_head(hidden)
    assert raw.abs().max() > cap  # the cap changes these logits
    torch.testing.assert_close(O.output_head(model)(hidden), torch.tanh(raw / cap) * cap)
