"""The quantized-weight format: integer round trips, the modules, and the checkpoint directory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from posttrain.compress.quantize import quantize_model
from posttrain.models import load_model, tiny_model
from posttrain.quantized import (QuantLinear, QuantSpec, dequantize_int4, dequantize_int8, load_quantized,
                                 quantize_int4, quantize_int8, save_quantized, unpack_int4)


def test_int8_per_channel_round_trip_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (24, 1) and scale.dtype == torch.float16
    assert q.abs().max() == 127  # the largest weight of each row maps to ±127
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale.float() / 2 + 1e-6).all()


def test_int8_groups_give_one_scale_per_group():
    w = torch.ones(4, 64)
    w[:, 32:] *= 100  # second group 100x larger: a per-channel scale would flatten the first group
    q, scale = quantize_int8(w, group_size=32)
    assert scale.shape == (4, 2)
    assert torch.allclose(dequantize_int8(q, scale), w, rtol=1e-3)  # fp16 scales
    q1, s1 = quantize_int8(w)
    assert (dequantize_int8(q1, s1)[:, :32] - 1).abs().max() > 0.1


def test_int4_packs_two_values_per_byte_and_keeps_the_group_grid_exactly():
    # weights on a 16-level grid per group (like a Q4_1 GGUF) come back exactly
    torch.manual_seed(0)
    levels = torch.randint(0, 16, (8, 64)).float()
    levels[:, 0], levels[:, 1] = 0, 15  # every group spans the full range
    levels[:, 32], levels[:, 33] = 0, 15
    w = levels * 0.0625 - 0.5
    packed, scale, minimum = quantize_int4(w, 32)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), levels.to(torch.uint8))
    assert torch.allclose(dequantize_int4(packed, scale, minimum), w, atol=1e-6)


def test_quant_linear_matches_the_dequantized_float_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=True)
    x = torch.randn(3, 5, 64)
    for mode, group in (("int8", None), ("int8", 32), ("int4", 32)):
        q = QuantLinear.from_linear(lin, mode, group)
        ref = x @ q.dequantized().T + lin.bias
        assert torch.allclose(q(x), ref, atol=1e-5)
        assert (q.dequantized() - lin.weight).abs().max() < (0.02 if mode == "int8" else 0.2)


def test_dynamic_int8_activations_follow_the_float_product():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    q = QuantLinear.from_linear(lin, "int8dyn", None)
    x = torch.randn(7, 64)
    ref = x @ q.dequantized().T
    out = q(x)
    assert out.shape == (7, 32)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.02  # activation rounding: close, but not the weight-only result


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(weights="int4", group_size=32),
                                  QuantSpec(activations="int8"), QuantSpec(group_size=32, embeddings="none")],
                         ids=["int8", "int4", "int8dyn", "int8-g32-float-embed"])
def test_saved_checkpoint_reloads_with_identical_logits(tokenizer, tmp_path, spec):
    torch.manual_seed(0)
    model = tiny_model(tokenizer)
    quantize_model(model, spec)
    ids = torch.randint(0, 1000, (2, 9))
    want = model(input_ids=ids).logits
    save_quantized(model, tokenizer, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["spec"]["weights"] == spec.weights
    loaded, tok = load_model(tmp_path / "q", dtype="fp32")  # through the project's one loader
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, QuantLinear)
    assert torch.equal(loaded(input_ids=ids).logits, want)
    assert tok.eos_token_id == tokenizer.eos_token_id


def test_corrupt_checkpoint_is_refused_with_the_tensor_named(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(tokenizer)
    quantize_model(model, QuantSpec())
    save_quantized(model, tokenizer, tmp_path / "q")
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.qweight"] = state["model.layers.0.mlp.up_proj.qweight"][:, :10].contiguous()
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj.qweight has shape"):
        load_quantized(tmp_path / "q")


def _tiny_gemma3(tokenizer):
    """A random Gemma 3 text model: its embedding multiplies rows by sqrt(hidden_size)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


def test_int8_embedding_keeps_gemmas_embedding_scale_through_save_load_and_dequantize(tokenizer, tmp_path):
    from posttrain.compress.quantize import dequantize_model

    model = _tiny_gemma3(tokenizer)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        quantize_model(model, QuantSpec(weights="int8", embeddings="int8"))
        got = model(input_ids=ids).logits
    assert model.get_input_embeddings().embed_scale == pytest.approx(64 ** 0.5)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # int8 rounding, not a dropped x8 factor
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, _ = load_model(tmp_path / "q", dtype="fp32")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, got)
        plain = dequantize_model(loaded)(input_ids=ids).logits
    assert (plain - got).abs().max() < 1e-4
