"""The quantization stage: PTQ, AWQ, QAT, dequantizing, and the native int kernels on its output
(the format itself is tested in tests/test_quantized.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from posttrain.compress.quantize import (QuantizeConfig, convert_qat, dequantize_model, fake_quantize, prepare_qat,
                                         quantize_model, run_quantize, weight_bytes)
from posttrain.quantized import QuantEmbedding, QuantLinear, QuantSpec
from posttrain.models import load_model, tiny_model


def test_quantize_model_replaces_targets_and_ties_the_head(tokenizer):
    torch.manual_seed(0)
    model = tiny_model(tokenizer)
    before = weight_bytes(model)
    quantize_model(model, QuantSpec())
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and isinstance(layer.mlp.down_proj, QuantLinear)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight  # one copy of the tied matrix
    assert weight_bytes(model) < 0.3 * before


def test_skip_keeps_matching_layers_in_float(tokenizer):
    model = tiny_model(tokenizer)
    quantize_model(model, QuantSpec(skip=["*.down_proj"], embeddings="none"))
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)


def test_spec_errors_are_clear():
    with pytest.raises(ValueError, match="int4 needs a group size"):
        QuantSpec(weights="int4")
    with pytest.raises(ValueError, match="activations=int8 needs weights=int8 per channel"):
        QuantSpec(activations="int8", group_size=32)
    with pytest.raises(ValueError, match="no linear layer matches"):
        quantize_model(tiny_model(), QuantSpec(targets=["nope"]))


def test_dequantize_model_gives_plain_layers_with_the_quantized_values(tokenizer):
    torch.manual_seed(0)
    model = tiny_model(tokenizer)
    quantize_model(model, QuantSpec(weights="int4", group_size=32))
    ids = torch.randint(0, 1000, (1, 8))
    want = model(input_ids=ids).logits
    dequantize_model(model)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


def test_qat_forward_equals_the_converted_model_and_training_moves_the_float_weights(tokenizer):
    torch.manual_seed(0)
    model = tiny_model(tokenizer)
    spec = QuantSpec(weights="int4", group_size=32, embeddings="none")
    prepare_qat(model, spec)
    lin = model.model.layers[0].mlp.up_proj
    raw = lin.parametrizations.weight.original
    assert torch.equal(lin.weight, fake_quantize(raw.detach(), "int4", 32))
    ids = torch.randint(0, 1000, (2, 10))
    opt = torch.optim.SGD([raw], lr=0.5)
    before = raw.detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0  # straight-through gradient
    opt.step()
    assert not torch.equal(raw.detach(), before)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    convert_qat(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


def _native_model(tokenizer, spec):
    torch.manual_seed(0)
    model = tiny_model(tokenizer, hidden=128, heads=4, kv_heads=2, intermediate=256).to(torch.bfloat16)
    return quantize_model(model, spec)


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(group_size=64), QuantSpec(weights="int4", group_size=32),
                                  QuantSpec(weights="int4", group_size=64, embeddings="none")],
                         ids=["int8", "int8-g64", "int4-g32", "int4-g64-float-embed"])
def test_native_decoder_reads_integer_weights(tokenizer, spec):
    """The C kernels compute the dequantized model (bf16 activations): a wrong layout, scale or
    nibble order gives errors of the size of the logits, not of bf16 rounding."""
    from posttrain.generate.native import native_lm

    model = _native_model(tokenizer, spec)
    lm = native_lm(model, required=True)
    assert lm.wtype == (2 if spec.weights == "int8" else 3)
    lm.allocate(1, 32)
    ids = torch.randint(0, 5000, (12,)).tolist()
    got = lm.forward(ids, [0] * 12, list(range(12)), list(range(12)))
    ref_model = dequantize_model(_native_model(tokenizer, spec)).float()
    with torch.no_grad():
        want = ref_model(input_ids=torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() < 0.03 * want.abs().max()  # measured: 0.5% (bf16 activations)


def test_native_refuses_mixed_or_dynamic_quantization(tokenizer):
    from posttrain.generate.native import unsupported_reason

    mixed = tiny_model(tokenizer, hidden=128, heads=4, intermediate=256).to(torch.bfloat16)
    quantize_model(mixed, QuantSpec(skip=["*.down_proj"]))
    assert "mix" in unsupported_reason(mixed)
    dyn = tiny_model(tokenizer, hidden=128, heads=4, intermediate=256).to(torch.bfloat16)
    quantize_model(dyn, QuantSpec(activations="int8"))
    assert "PyTorch path" in unsupported_reason(dyn)


def test_generation_engine_decodes_a_quantized_model_natively(tokenizer):
    from posttrain.generate.engine import GenerationConfig, generate

    model = _native_model(tokenizer, QuantSpec())
    native = generate(model, tokenizer, ["hello there"], GenerationConfig(max_new_tokens=6, backend="native"))
    torch_out = generate(model, tokenizer, ["hello there"], GenerationConfig(max_new_tokens=6, backend="torch"))
    assert len(native.token_ids[0]) == 6
    assert native.token_ids[0][:2] == torch_out.token_ids[0][:2]  # bf16 paths may part later on near-ties


def test_run_quantize_writes_a_loadable_checkpoint_and_reports_bytes(tokenizer, tmp_path):
    from posttrain.models import save_model

    torch.manual_seed(0)
    save_model(tiny_model(tokenizer), tokenizer, tmp_path / "base")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"The number {i} follows {i - 1} in order."}) + "\n"
                             for i in range(1, 30)))
    cfg = QuantizeConfig.model_validate({"output_dir": str(tmp_path / "run"),
                                         "model": {"name": str(tmp_path / "base"), "dtype": "fp32"},
                                         "quant": {"weights": "int4", "group_size": 32, "embeddings": "none"},
                                         "qat": {"data": str(texts), "kind": "text", "objective": "pretrain",
                                                 "max_length": 32},
                                         "train": {"max_steps": 3, "max_tokens": 256, "lr": 1e-3,
                                                   "progress": False},
                                         "eval": {"forgetting": str(texts)}})
    manifest = run_quantize(cfg)
    out = manifest["outputs"]
    assert out["train"]["steps"] == 3
    assert out["weight_bytes_after"] < out["weight_bytes_before"]
    assert out["eval_after"]["general_ppl"] > 0
    model, _ = load_model(tmp_path / "run" / "final", dtype="fp32")
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_awq_scaling_keeps_the_float_function_and_lowers_int4_error_with_outlier_channels(tokenizer):
    from posttrain.compress.quantize import awq_scale

    def outlier_model():
        torch.manual_seed(0)
        model = tiny_model(tokenizer, intermediate=128)
        with torch.no_grad():  # a few input channels see 30x larger activations (norm weight up, columns down)
            for layer in model.model.layers:
                layer.input_layernorm.weight[:4] *= 30
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.weight[:, :4] /= 30
        return model

    spec = QuantSpec(weights="int4", group_size=32, embeddings="none")
    ids = [torch.randint(0, 2000, (1, 24)) for _ in range(4)]
    model = outlier_model()
    with torch.no_grad():
        ref = torch.cat([model(input_ids=i).logits for i in ids])
    chosen = awq_scale(model, ids, spec)
    assert len(chosen) == 3 * len(model.model.layers) and max(chosen.values()) > 0
    with torch.no_grad():
        assert torch.allclose(torch.cat([model(input_ids=i).logits for i in ids]), ref, atol=1e-4)
        err_awq = (torch.cat([quantize_model(model, spec)(input_ids=i).logits for i in ids[:1]]) - ref[:1]).abs().mean()
        plain = quantize_model(outlier_model(), spec)
        err_plain = (plain(input_ids=ids[0]).logits - ref[:1]).abs().mean()
    assert err_awq < err_plain


def test_a_group_size_that_does_not_divide_a_layer_is_refused_with_the_sizes_that_fit(tokenizer):
    model = tiny_model(tokenizer, hidden=96, heads=4, intermediate=192)
    with pytest.raises(ValueError, match=r"does not divide the input size 96 of model.layers.0.self_attn.q_proj.*\[32, 96\]"):
        quantize_model(model, QuantSpec(weights="int4", group_size=64))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # nothing half-done


@pytest.mark.slow
def test_default_model_int8_keeps_perplexity_within_two_percent_and_decodes_natively():
    from posttrain.eval.metrics import perplexity
    from posttrain.eval.tasks import load_texts
    from posttrain.generate.native import native_lm

    texts = load_texts("data/general/text.jsonl", limit=8)
    model, tok = load_model("default", dtype="bf16")
    base = perplexity(model, tok, texts, max_length=256)
    quantize_model(model, QuantSpec())
    assert weight_bytes(model) < 0.3 * 538e6
    assert perplexity(model, tok, texts, max_length=256) < base * 1.02
    assert native_lm(model, required=True).wtype == 2
