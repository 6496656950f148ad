"""GGUF and merged-HF export: round trips through transformers' loaders.

Most tests use a tiny Llama over a 300-token byte-level BPE trained here: transformers'
GGUF loader parses every vocabulary entry twice in Python (~4 s for the default 49k
vocabulary), so the default tokenizer is used only where the tokenizer itself is tested.

The test model has its q/k/gate/up weights scaled 10x from the usual init (std 0.02 -> 0.2).
At the usual init, attention is nearly uniform and the MLP nearly linear, so a GGUF
written without the q/k permutation, or with gate/up swapped, changed the logits by
only 0.006-0.01 -- as much as Q8_0 rounding itself (measured). Scaled, the same mistakes
move the logits by 0.73-1.02 while the formats' own errors stay small.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import posttrain.compress.export as export
from posttrain.compress.export import (ExportConfig, export_gguf, export_hf, load_gguf, logits_diff, permute_qk,
                                       run_export, verify_gguf)
from posttrain.config import build_config
from posttrain.models import save_model, tiny_model

# Max |logit diff| vs the fp32 source on CHECK_TEXT (118 tokens, logits |x| <= 0.7), with the
# measured value over seeds 0-2 of the test model. Bounds are ~3x the worst measurement; a
# missing q/k permutation or swapped gate/up gives >= 0.73, above every bound.
TOLERANCE = {
    "f32": 1e-5,   # same fp32 numbers, same kernels: measured 0.0
    "f16": 4e-3,   # 11-bit mantissa, rel. error <= 2^-11 per weight: measured 0.95e-3 .. 1.3e-3
    "bf16": 3e-2,  # 8-bit mantissa, rel. error <= 2^-8: measured 7.7e-3 .. 1.0e-2
    "q8_0": 0.1,   # int8 per 32-value block, error <= block max / 254: measured 0.027 .. 0.036
}
ROOT = Path(__file__).resolve().parents[2]
GENERAL_TEXT = ROOT / "data" / "general" / "text.jsonl"
WRONG = 0.5  # a wrong layout must move the logits at least this much (measured >= 0.73)

TEXTS = [
    "The water cycle moves water between the oceans, the air and the land.",
    "Plants turn light into chemical energy; 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n84<|im_end|>",
]


@pytest.fixture(scope="session")
def bpe():
    """A 300-token byte-level BPE with the default model's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posttrain.eval.tasks import load_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_texts(GENERAL_TEXT), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      unk_token="<|endoftext|>", pad_token="<|im_end|>")
    wrapped.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}")
    return wrapped


def sharp(tokenizer, seed: int = 0, **kwargs):
    """tiny_model with q/k/gate/up scaled 10x, so attention and MLP are far from uniform/linear."""
    model = tiny_model(tokenizer, seed=seed, **kwargs)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                module.weight.mul_(10)
    return model.eval()


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_round_trip_matches_source_logits(bpe, tmp_path, qtype):
    model = sharp(bpe)
    result = export_gguf(model, bpe, tmp_path / f"m-{qtype}.gguf", qtype)
    check = verify_gguf(model, bpe, result, TEXTS)
    assert check["max_abs_logit_diff"] <= TOLERANCE[qtype], check
    assert check["tokenizer_match"]
    assert check["ppl_gguf"] == pytest.approx(check["ppl_source"], rel=0.01)
    assert result.fallbacks == {}


def test_4_bit_gguf_round_trip(bpe, tmp_path):
    model = sharp(bpe, hidden=256, intermediate=512)  # rows of 256 values: whole K-quant blocks
    plans = {"q4_0": {"Q6_K": 1, "Q4_0": 14, "F32": 5},  # the tied embedding is the head: Q6_K
             "q4_k_m": {"Q6_K": 3, "Q4_K": 12, "F32": 5}}  # + attn_v / ffn_down of layer 1 (more_bits)
    checks = {}
    for qtype, types in plans.items():
        result = export_gguf(model, bpe, tmp_path / f"m-{qtype}.gguf", qtype)
        assert result.tensor_types == types and result.fallbacks == {}
        checks[qtype] = check = verify_gguf(model, bpe, result, TEXTS)
        assert check["tokenizer_match"]
        assert check["ppl_gguf"] == pytest.approx(check["ppl_source"], rel=0.05), check
    # measured 0.124 vs 0.140: Q4_K's per-32 scales and minimums beat Q4_0's per-32 scale
    assert checks["q4_k_m"]["mean_abs_logit_diff"] < checks["q4_0"]["mean_abs_logit_diff"] < 0.2


def test_k_quants_fall_back_like_llama_cpp_for_short_rows(bpe, tmp_path):
    result = export_gguf(sharp(bpe), bpe, tmp_path / "m.gguf", "q4_k_m")  # rows of 64 and 128 values
    assert set(result.tensor_types) == {"Q5_0", "Q8_0", "F32"}
    assert result.fallbacks["blk.0.attn_q.weight"] == "Q5_0 (row length 64 is not a multiple of 256)"
    assert result.fallbacks["token_embd.weight"] == "Q8_0 (row length 64 is not a multiple of 256)"


@pytest.mark.parametrize("mistake", ["no q/k permutation", "gate and up swapped"])
def test_a_wrong_layout_fails_the_q8_0_bound(bpe, tmp_path, monkeypatch, mistake):
    """The tolerances above are tight enough to catch the mistakes an exporter makes."""
    model = sharp(bpe)
    if mistake == "no q/k permutation":
        monkeypatch.setattr(export, "permute_qk", lambda weight, n_head: weight)
    else:
        swapped = dict(export.LAYER_TENSORS, **{"mlp.gate_proj.weight": "ffn_up.weight",
                                                "mlp.up_proj.weight": "ffn_gate.weight"})
        monkeypatch.setitem(export.GGUF_ARCHS, "llama", dataclasses.replace(export.LLAMA, layer_tensors=swapped))
    export_gguf(model, bpe, tmp_path / "wrong.gguf", "f32")
    reloaded, _ = load_gguf(tmp_path / "wrong.gguf")
    ids = torch.tensor([bpe(export.CHECK_TEXT)["input_ids"]])
    assert logits_diff(model, reloaded, ids) > max(WRONG, 5 * TOLERANCE["q8_0"])


def test_permute_qk_is_undone_by_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    q = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)  # 4 heads of 16
    k = np.arange(32 * 8, dtype=np.float32).reshape(32, 8)  # 2 kv heads
    assert not np.array_equal(permute_qk(q, 4), q)
    np.testing.assert_array_equal(undo(permute_qk(q, 4), 4, 4), q)
    np.testing.assert_array_equal(undo(permute_qk(k, 2), 4, 2), k)
    # per head, llama.cpp interleaves the two rotary halves: rows 0, 8, 1, 9, ... of head 0
    assert permute_qk(q, 4)[:4, 0].tolist() == [q[0, 0], q[8, 0], q[1, 0], q[9, 0]]


def test_gguf_metadata_and_tensor_types(bpe, tmp_path):
    model = sharp(bpe)
    export_gguf(model, bpe, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = {k: f.contents() for k, f in reader.fields.items()}
    cfg = model.config
    assert field["general.architecture"] == "llama"
    assert field["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (field["llama.block_count"], field["llama.embedding_length"], field["llama.feed_forward_length"],
            field["llama.attention.head_count"], field["llama.attention.head_count_kv"], field["llama.context_length"],
            field["llama.rope.dimension_count"], field["llama.vocab_size"]) == (2, 64, 128, 4, 2, 2048, 16, len(bpe))
    assert field["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert field["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert field["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # control, then normal
    assert len(field["tokenizer.ggml.merges"]) == len(json.loads(bpe.backend_tokenizer.to_str())["model"]["merges"])
    assert (field["tokenizer.ggml.bos_token_id"], field["tokenizer.ggml.eos_token_id"],
            field["tokenizer.ggml.unknown_token_id"], field["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 2)
    assert field["tokenizer.ggml.add_bos_token"] is False
    assert field["tokenizer.chat_template"] == bpe.chat_template
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(kinds) == 1 + 2 * 9 + 1 and "output.weight" not in kinds  # tied embeddings
    assert {kinds[n] for n in kinds if "norm" in n} == {"F32"}
    assert {kinds[n] for n in kinds if "norm" not in n} == {"Q8_0"}


def test_untied_embeddings_write_output_weight(bpe, tmp_path):
    model = sharp(bpe)
    model.config.tie_word_embeddings = False
    embedding = model.model.embed_tokens.weight.detach()
    model.lm_head.weight = nn.Parameter(embedding.flip(0).clone())  # distinct, same scale as the tolerances
    result = export_gguf(model, bpe, tmp_path / "u.gguf", "f16")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(result.path).tensors}
    assert verify_gguf(model, bpe, result)["max_abs_logit_diff"] <= TOLERANCE["f16"]


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(bpe, tmp_path):
    model = sharp(bpe, hidden=48, heads=4, kv_heads=2, intermediate=96)  # rows of 48: no Q8_0 blocks
    result = export_gguf(model, bpe, tmp_path / "odd.gguf", "q8_0")
    assert "blk.0.attn_q.weight" in result.fallbacks and "F16" in result.fallbacks["blk.0.attn_q.weight"]
    assert "blk.0.ffn_down.weight" not in result.fallbacks  # rows of 96 = 3 blocks
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(result.path).tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.ffn_down.weight"] == "Q8_0"
    assert verify_gguf(model, bpe, result)["max_abs_logit_diff"] <= TOLERANCE["q8_0"]


def test_peft_adapter_is_merged_and_bf16_weights_export(bpe, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = sharp(bpe)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    ids = torch.tensor([bpe(export.CHECK_TEXT)["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        assert (want - sharp(bpe)(input_ids=ids).logits).abs().max() > WRONG  # the adapter matters
    export_gguf(peft_model, bpe, tmp_path / "lora.gguf", "f32")
    reloaded, _ = load_gguf(tmp_path / "lora.gguf")
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - want).abs().max() <= 1e-4  # merge rounding only

    bf16 = sharp(bpe).to(torch.bfloat16)
    result = export_gguf(bf16, bpe, tmp_path / "bf16.gguf", "f16")  # bf16 values fit F16 nearly exactly
    reference = sharp(bpe)  # fp32 holding the bf16-rounded weights (`bf16.float()` would keep a bf16 RoPE table)
    reference.load_state_dict(bf16.state_dict())
    assert verify_gguf(reference, bpe, result)["max_abs_logit_diff"] <= TOLERANCE["f16"]


def test_default_tokenizer_round_trips_through_gguf(tokenizer, tmp_path):
    """The real 49k-vocabulary tokenizer: transformers rebuilds it from our metadata alone."""
    export_gguf(tiny_model(tokenizer), tokenizer, tmp_path / "d.gguf", "q8_0")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="d.gguf")
    messages = [{"role": "user", "content": "Hi! What's 2+2?"}, {"role": "assistant", "content": "4."}]
    samples = TEXTS + ["  spaces\tand\nnewlines, ünïcödé 日本語 🙂", tokenizer.apply_chat_template(messages, tokenize=False)]
    for text in samples:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.decode(tokenizer(samples[3])["input_ids"]) == samples[3]


def test_failed_write_leaves_no_file(bpe, tmp_path, monkeypatch):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old complete file")

    def crash(self, *args, **kwargs):
        self.fout[0].write(b"partial tensor data")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="injected"):
        export_gguf(sharp(bpe), bpe, target, "f16")
    assert target.read_bytes() == b"old complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp file left
    with pytest.raises(OSError, match="injected"):
        export_gguf(sharp(bpe), bpe, tmp_path / "new.gguf", "f16")
    assert not (tmp_path / "new.gguf").exists()


def test_bad_inputs_are_refused_with_clear_messages(bpe, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    model = sharp(bpe)
    with pytest.raises(ValueError, match="qtype must be one of f32, f16, bf16, q8_0, q4_0, q4_k_m; got 'q4_k'"):
        export_gguf(model, bpe, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(ValueError, match="must end in .gguf"):
        export_gguf(model, bpe, tmp_path / "m.bin", "f16")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(bpe)))
    with pytest.raises(ValueError, match="this model's type is 'gpt2'"):
        export_gguf(gpt2, bpe, tmp_path / "m.gguf", "f16")
    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(bpe), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=16))
    with pytest.raises(ValueError, match="sliding_window=16"):
        export_gguf(mistral, bpe, tmp_path / "m.gguf", "f16")
    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="byte-level BPE.*'WordLevel'"):
        export_gguf(model, PreTrainedTokenizerFast(tokenizer_object=word), tmp_path / "m.gguf", "f16")
    small = tiny_model(vocab_size=100)
    with pytest.raises(ValueError, match="300 tokens but the embedding only 100 rows"):
        export_gguf(small, bpe, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.iterdir())


class Int8Linear(nn.Module):
    """Stands in for a quantized projection (int8 weight + per-row scale)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        scale = linear.weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale).T


def _quantize_q_proj(model):
    for layer in model.model.layers:
        layer.self_attn.q_proj = Int8Linear(layer.self_attn.q_proj)
    return model


def _fake_dequantize(model):
    for layer in model.model.layers:
        q = layer.self_attn.q_proj
        linear = nn.Linear(q.qweight.shape[1], q.qweight.shape[0], bias=False)
        linear.weight = nn.Parameter(q.qweight.float() * q.scale)
        layer.self_attn.q_proj = linear
    return model


def test_quantized_projections_need_dequantize_model(bpe, tmp_path, monkeypatch):
    model = _quantize_q_proj(sharp(bpe))
    monkeypatch.setitem(__import__("sys").modules, "posttrain.compress.quantize", types.ModuleType("quantize"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is a Int8Linear, not a plain.*dequantize_model"):
        export_gguf(model, bpe, tmp_path / "m.gguf", "f16")

    fake = types.ModuleType("quantize")
    fake.dequantize_model = _fake_dequantize
    monkeypatch.setitem(__import__("sys").modules, "posttrain.compress.quantize", fake)
    ids = torch.tensor([bpe(export.CHECK_TEXT)["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    export_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    reloaded, _ = load_gguf(tmp_path / "m.gguf")
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - want).abs().max() <= 1e-4


def test_model_quantized_by_our_quantize_stage_exports(bpe, tmp_path):
    """int8 weights (and int8 embedding) from compress.quantize: exported as their dequantized values."""
    from posttrain.compress.quantize import QuantSpec, quantize_model

    model = quantize_model(sharp(bpe), QuantSpec(weights="int8", embeddings="int8")).eval()
    ids = torch.tensor([bpe(export.CHECK_TEXT)["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert (want - sharp(bpe)(input_ids=ids).logits).abs().max() > 0  # it is quantized
    export_gguf(model, bpe, tmp_path / "int8.gguf", "f32")
    reloaded, _ = load_gguf(tmp_path / "int8.gguf")
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - want).abs().max() <= 1e-4


def test_export_hf_merges_and_reloads_equal(bpe, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(sharp(bpe), LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    ids = torch.tensor([bpe(export.CHECK_TEXT)["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = export_hf(model, bpe, tmp_path / "hf", dtype="same")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - want).abs().max() <= 1e-4
    assert AutoTokenizer.from_pretrained(str(out))(TEXTS[0])["input_ids"] == bpe(TEXTS[0])["input_ids"]
    export_hf(sharp(bpe), bpe, tmp_path / "bf16", dtype="bf16")
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16


def test_run_export_merges_a_lora_run_and_writes_checked_outputs(bpe, tmp_path):
    from peft import LoraConfig, get_peft_model

    save_model(sharp(bpe), bpe, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["k_proj", "gate_proj"], init_lora_weights=False))
    save_model(lora, bpe, tmp_path / "src")  # an adapter directory over ../base, like an SFT run's final/
    assert (tmp_path / "src" / "adapter_config.json").is_file()
    ids = torch.tensor([bpe(export.CHECK_TEXT)["input_ids"]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = build_config(ExportConfig, overrides=[f"output_dir={tmp_path / 'run'}", f"model.name={tmp_path / 'src'}",
                                                "formats=[gguf-f16, gguf-q8_0, hf]", f"check_data={data}"])
    manifest = run_export(cfg)
    run = tmp_path / "run"
    assert manifest["stage"] == "export" and (run / "manifest.json").is_file() and (run / "config.yaml").is_file()
    out = manifest["outputs"]
    assert (run / "model-f16.gguf").is_file() and (run / "model-q8_0.gguf").is_file()
    assert (run / "final" / "config.json").is_file()
    for fmt, qtype in (("gguf-f16", "f16"), ("gguf-q8_0", "q8_0")):
        check = out[fmt]["check"]
        assert check["max_abs_logit_diff"] <= TOLERANCE[qtype] and check["tokenizer_match"]
        assert check["ppl_gguf"] == pytest.approx(check["ppl_source"], rel=0.01)
    assert out["gguf-q8_0"]["size_bytes"] < out["gguf-f16"]["size_bytes"]
    assert out["hf"]["check"]["max_abs_logit_diff"] == 0.0
    merged = AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - want).abs().max() <= 1e-4  # the adapter is in the export
    with pytest.raises(FileExistsError):
        run_export(cfg)
    before = (run / "model-q8_0.gguf").stat().st_mtime_ns
    again = run_export(cfg, resume=True)  # complete outputs are kept, and checked again
    assert (run / "model-q8_0.gguf").stat().st_mtime_ns == before and again["outputs"]["gguf-q8_0"]["resumed"]
    assert again["outputs"]["gguf-q8_0"]["check"]["max_abs_logit_diff"] <= TOLERANCE["q8_0"]


def test_export_config_validation():
    with pytest.raises(ValueError, match="formats.0: must be one of"):
        build_config(ExportConfig, overrides=["formats=[gguf-q4_k]"])
    with pytest.raises(ValueError, match="listed twice"):
        build_config(ExportConfig, overrides=["formats=[hf, hf]"])
    with pytest.raises(ValueError, match="formats"):
        build_config(ExportConfig, overrides=["formats=[]"])


@pytest.mark.slow
def test_default_model_q4_k_m_perplexity_within_ten_percent(tmp_path):
    """Measured: source 17.38, q4_k_m 18.64 (+7.3%, 105.5 MB), q4_0 19.40 (+11.6%, 91.7 MB) on 8 texts."""
    from posttrain.eval.tasks import load_texts
    from posttrain.models import load_model

    model, tokenizer = load_model("default", dtype="fp32")
    result = export_gguf(model, tokenizer, tmp_path / "smollm2-q4_k_m.gguf", "q4_k_m")
    assert result.size_bytes < 110e6 and result.tensor_types["Q4_K"] > 0 and result.tensor_types["Q6_K"] > 0
    check = verify_gguf(model, tokenizer, result, load_texts(GENERAL_TEXT, limit=4))
    assert check["ppl_gguf"] == pytest.approx(check["ppl_source"], rel=0.10), check


@pytest.mark.slow
def test_default_model_q8_0_perplexity_within_one_percent(tmp_path):
    from posttrain.eval.metrics import perplexity
    from posttrain.eval.tasks import load_texts
    from posttrain.models import load_model

    model, tokenizer = load_model("default", dtype="fp32")
    texts = load_texts(GENERAL_TEXT, limit=4)
    result = export_gguf(model, tokenizer, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    assert result.fallbacks == {} and result.size_bytes < 160e6
    # (the tokenizer's round trip is test_default_tokenizer_round_trips_through_gguf)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=result.path.name, dtype=torch.float32)
    source, exported = perplexity(model, tokenizer, texts), perplexity(reloaded, tokenizer, texts)
    print(f"ppl source {source:.3f} q8_0 gguf {exported:.3f}, {result.size_bytes / 1e6:.1f} MB")
    assert exported == pytest.approx(source, rel=0.01)


# ----------------------------------------------------------------------------- Gemma 3 (gemma3 architecture)


@pytest.fixture(scope="session")
def spm():
    """A ~570-token Gemma-style tokenizer: SentencePiece-style BPE (spaces as "\u2581", byte fallback),
    Gemma's special tokens and ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3), "\\n" as a user-defined
    token, whitespace-run pieces, and merges in id order -- built by transformers' own GGUF builder
    for Gemma, as the converted gemma3-270m tokenizer was."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import gemma_tokenizer

    from posttrain.eval.tasks import load_texts
    from posttrain.models import GEMMA_CHAT_TEMPLATE

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    trained.train_from_iterator(load_texts(GENERAL_TEXT), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = [p for p, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if p != "\u2581\u2581"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens = specials + ["\n", "\u2581\u2581", "\u2581\u2581\u2581"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tok = gemma_tokenizer({"tokens": tokens})
    tok.add_bos_token = True  # as Gemma's
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                          for t in specials[5:]]})
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def gemma(tokenizer, seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 6, **config):
    """A tiny Gemma 3 that llama.cpp's gemma3 graph describes: layers 5 sliding + 1 full (window 8,
    shorter than CHECK_TEXT), head_dim 256 = query_pre_attn_scalar. Norm weights are random (init
    is 0, i.e. scale 1: a missing 1 + w shift would still show, but q/k norms would not) and
    gate/up scaled 10x so the MLP is not near-linear. Measured over seeds 0-2, max |logit diff| vs
    the source: f32 0.0, f16 1.2e-3 .. 1.7e-3, bf16 8.6e-3 .. 1.4e-2, q8_0 0.031 .. 0.045 (TOLERANCE
    holds); norms written unshifted 0.83, q/k permuted the llama way 0.92."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "sliding_window": 8, "max_position_embeddings": 2048, "pad_token_id": 0, "bos_token_id": 2,
        "eos_token_id": 1, **config})
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.5)
            elif "gate_proj" in name or "up_proj" in name:
                param.mul_(10)
    return model.eval()


def greedy(model, ids: list[int], n: int = 8) -> list[int]:
    """Plain argmax decoding, one full forward per token."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_gemma3_round_trip_matches_source_logits_and_greedy_tokens(spm, tmp_path, qtype):
    model = gemma(spm)
    result = export_gguf(model, spm, tmp_path / f"g-{qtype}.gguf", qtype)
    assert result.fallbacks == {} and result.warnings == []
    check = verify_gguf(model, spm, result, TEXTS[:2])
    assert check["max_abs_logit_diff"] <= TOLERANCE[qtype], check
    assert check["tokenizer_match"]
    assert check["ppl_gguf"] == pytest.approx(check["ppl_source"], rel=0.01)
    reloaded, loaded_tokenizer = load_gguf(result.path)
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    assert reloaded.config.layer_types == model.config.layer_types
    assert reloaded.config.sliding_window == 8 and reloaded.config.head_dim == 256
    ids = spm(export.CHECK_TEXT)["input_ids"]
    if qtype == "q8_0":  # a random tiny model's next-token scores are nearly flat: Q8_0 may flip a few
        assert check["top1_agreement"] >= 0.85, check  # measured 0.90 .. 0.96
    else:
        assert greedy(reloaded, ids) == greedy(model, ids)
    messages = [{"role": "user", "content": "Hi!  Two spaces,\ttab\n\nand 日本語 🙂"}]
    text = spm.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert loaded_tokenizer(text)["input_ids"] == spm(text)["input_ids"]  # control, user-defined, byte tokens
    assert loaded_tokenizer.chat_template == spm.chat_template


def test_gemma3_4_bit_round_trip(spm, tmp_path):
    model = gemma(spm, hidden=256, intermediate=512)  # rows of 256 (and 1024 for attn_output): whole K blocks
    result = export_gguf(model, spm, tmp_path / "g-q4_k_m.gguf", "q4_k_m")
    # the tied embedding is the head: Q6_K; so are attn_v / ffn_down of layers 2 and 5 (more_bits of 6)
    assert result.tensor_types == {"Q6_K": 5, "Q4_K": 38, "F32": 37} and result.fallbacks == {}
    check = verify_gguf(model, spm, result, TEXTS[:2])
    assert check["tokenizer_match"]
    assert check["ppl_gguf"] == pytest.approx(check["ppl_source"], rel=0.05), check


def test_gemma3_metadata_tensors_and_conventions(spm, tmp_path):
    model = gemma(spm)
    export_gguf(model, spm, tmp_path / "g.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "g.gguf")
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["general.architecture"] == "gemma3"
    assert (field["gemma3.block_count"], field["gemma3.embedding_length"], field["gemma3.feed_forward_length"],
            field["gemma3.attention.head_count"], field["gemma3.attention.head_count_kv"],
            field["gemma3.attention.key_length"], field["gemma3.attention.value_length"],
            field["gemma3.attention.sliding_window"], field["gemma3.context_length"],
            field["gemma3.vocab_size"]) == (6, 64, 128, 4, 1, 256, 256, 8, 2048, len(spm))
    assert field["gemma3.rope.freq_base"] == pytest.approx(1e6)
    assert field["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert field["tokenizer.ggml.model"] == "llama" and field["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in field  # llama.cpp's converter writes none for SentencePiece
    tokens, types, scores = (field[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert tokens[:10] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                           "\n", "  ", "   "]  # whitespace runs as spaces, as in Gemma's own GGUF
    assert types[:11] == [3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 6] and tokens[10] == "<0x00>" and types[265] == 6
    assert set(types[266:]) == {1} and scores[266:269] == [0.0, -1.0, -2.0] and scores[0] == -1000.0
    assert (field["tokenizer.ggml.bos_token_id"], field["tokenizer.ggml.eos_token_id"],
            field["tokenizer.ggml.unknown_token_id"], field["tokenizer.ggml.padding_token_id"]) == (2, 1, 3, 0)
    assert field["tokenizer.ggml.add_bos_token"] is True and field["tokenizer.ggml.add_space_prefix"] is False
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{name}" for i in range(6) for name in export.GEMMA3_LAYER_TENSORS.values()}
    layer = model.model.layers[0]
    # Gemma's RMSNorm scales by 1 + w: every norm is stored as 1 + w; q/k rows keep HF's order
    q_norm = layer.self_attn.q_norm.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q_norm.weight"], q_norm + 1)
    np.testing.assert_array_equal(tensors["blk.0.post_ffw_norm.weight"],
                                  layer.post_feedforward_layernorm.weight.detach().numpy() + 1)
    q = layer.self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].reshape(q.shape), q)
    embedding = model.model.embed_tokens.weight.detach().numpy()  # unscaled: readers multiply by sqrt(hidden)
    np.testing.assert_array_equal(tensors["token_embd.weight"].reshape(embedding.shape), embedding)


@pytest.mark.parametrize("mistake", ["norms not shifted", "q/k permuted"])
def test_gemma3_wrong_conventions_fail_the_q8_0_bound(spm, tmp_path, monkeypatch, mistake):
    model = gemma(spm)
    row = export.GGUF_ARCHS["gemma3_text"]
    wrong = dataclasses.replace(row, norm_shift=0.0) if mistake == "norms not shifted" else \
        dataclasses.replace(row, permute_qk=True)
    monkeypatch.setitem(export.GGUF_ARCHS, "gemma3_text", wrong)
    export_gguf(model, spm, tmp_path / "wrong.gguf", "f32")
    reloaded, _ = load_gguf(tmp_path / "wrong.gguf")
    ids = torch.tensor([spm(export.CHECK_TEXT)["input_ids"]])
    assert logits_diff(model, reloaded, ids) > max(WRONG, 5 * TOLERANCE["q8_0"])


def test_gemma3_that_llama_cpp_cannot_describe_is_refused_and_exports_as_hf(spm, bpe, tmp_path):
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    alternating = gemma(spm, layers=2, layer_types=["sliding_attention", "full_attention"])
    ids = torch.tensor([spm(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        want = alternating(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"full attention at layers \[1\]; llama.cpp's gemma3 graph fixes it at "
                                         r"every 6th layer \(\[\] of 2\)"):
        export_gguf(alternating, spm, tmp_path / "m.gguf", "q8_0")
    out = export_hf(alternating, spm, tmp_path / "hf", dtype="same")  # HF export takes any Gemma 3
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, want)
    cases = {
        "query_pre_attn_scalar 64; llama.cpp scales attention by 1/sqrt\\(256\\)": {"query_pre_attn_scalar": 64},
        "sliding-layer rope_theta 20000; llama.cpp fixes it at 10000": {"rope_local_base_freq": 20000.0},
        "full_attention rope_type 'linear' is not supported": {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
        "final_logit_softcapping=30.0 is not supported": {"final_logit_softcapping": 30.0},
    }
    for message, config in cases.items():
        with pytest.raises(ValueError, match=message):
            export_gguf(gemma(spm, layers=6, **config), spm, tmp_path / "m.gguf", "f16")
    with pytest.raises(ValueError, match="supports byte-level BPE tokenizers .*; this one is 'BPE'"):
        export_gguf(sharp(bpe), spm, tmp_path / "m.gguf", "f16")  # SentencePiece vocabularies: gemma3 only
    llama2 = Tokenizer(models.BPE(vocab={"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}, merges=[],
                                  unk_token="<unk>", byte_fallback=True))
    llama2.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    llama2.decoder = decoders.ByteFallback()
    with pytest.raises(ValueError, match="written as Gemma's .*no prefix space"):
        export_gguf(gemma(spm), PreTrainedTokenizerFast(tokenizer_object=llama2), tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.slow
def test_gemma3_270m_q8_0_round_trip(tmp_path):
    """The real Gemma 3 270M (converted from its shipped Q4_K_M GGUF). Measured on 8 texts: Q8_0 291.5 MB,
    perplexity 16.744 -> 16.740, max |logit diff| 0.93 (logits reach |29.5|), top-1 agreement 1.0,
    16 greedy tokens equal; F16 542.8 MB, max diff 0.038. The tokenizer metadata equals the shipped
    file's (tokens and types; scores in the same order)."""
    from posttrain.eval.tasks import load_texts
    from posttrain.models import load_model, named_gguf_path

    model, tokenizer = load_model("gemma3-270m", dtype="fp32")
    result = export_gguf(model, tokenizer, tmp_path / "gemma3-270m-q8_0.gguf", "q8_0")
    assert result.tensor_types == {"Q8_0": 127, "F32": 109} and result.fallbacks == {} and result.warnings == []
    assert 280e6 < result.size_bytes < 300e6
    check = verify_gguf(model, tokenizer, result, load_texts(GENERAL_TEXT, limit=4))
    assert check["tokenizer_match"] and check["top1_agreement"] >= 0.99, check
    assert check["ppl_gguf"] == pytest.approx(check["ppl_source"], rel=0.01), check
    ours, shipped = gguf.GGUFReader(result.path), gguf.GGUFReader(named_gguf_path("gemma3-270m"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "gemma3.attention.sliding_window",
                "gemma3.rope.freq_base", "gemma3.attention.key_length", "gemma3.context_length"):
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key
    scores = [np.asarray(r.fields["tokenizer.ggml.scores"].contents()) for r in (ours, shipped)]
    np.testing.assert_array_equal(np.argsort(-scores[0], kind="stable"), np.argsort(-scores[1], kind="stable"))
