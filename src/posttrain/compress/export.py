"""Export a trained model: a merged plain HF directory, and GGUF files for llama.cpp.

GGUF is written with the `gguf` package (gguf-py): architecture "llama", tensors named
the llama.cpp way, and all metadata -- model shape and tokenizer -- built from the HF
model and tokenizer themselves, so any Llama-family model with a byte-level BPE
tokenizer exports without a source GGUF to copy from. llama.cpp stores q/k projection
rows in a different rotary order from HF (pairs interleaved, not halves); readers,
transformers' GGUF loader included, undo that, so the export must apply it.

`posttrain export` runs `run_export`: load -> merge adapters -> write the formats ->
reload each GGUF with transformers and compare logits and perplexity with the source.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from posttrain.fileio import atomic_write
from posttrain.config import ModelConfig, StageConfig
from posttrain.quantized import ScaledEmbedding

GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
LLAMA_TYPES = ("llama", "mistral")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "qkv_proj", "gate_up_proj")  # the last two: Phi3's fused projections
CHECK_TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, astronauts walked on the Moon; "
              "today, students learn why the sky is blue and how plants turn light into sugar.")

# HF parameter name (per layer) -> llama.cpp tensor name
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# llama.cpp token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


# ----------------------------------------------------------------------------- model side


def llama_config(model) -> dict:
    """The shape numbers a llama GGUF records; refuses what the llama graph cannot run."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_TYPES:
        raise ValueError(
            f"GGUF export supports Llama-family models ({', '.join(LLAMA_TYPES)}); this model's type is "
            f"{model_type!r}. Export it as a HF directory (format 'hf') instead."
        )
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise ValueError(
            f"GGUF export: mistral with sliding_window={config.sliding_window} is not llama-compatible "
            "(the llama graph attends to the whole context)"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"GGUF export: rope_type {rope_type!r} is not supported (only plain RoPE)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"GGUF export: {model_type} with {flag}=True has no llama GGUF layout")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"GGUF export: hidden_act {config.hidden_act!r}; the llama graph uses silu")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 2:
        raise ValueError(f"GGUF export: head_dim {head_dim} is odd; RoPE needs pairs")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": heads,
        "head_count_kv": kv_heads,
        "head_dim": head_dim,
        "rope_freq_base": float(theta),
        "rms_eps": float(config.rms_norm_eps),
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
    }


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (per head: first half, second half of the rotary dims) -> llama.cpp's
    order (per head: the two halves interleaved pairwise). Inverse of transformers' GGUF un-permute."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def plain_model(model) -> nn.Module:
    """Merge PEFT adapters and turn quantized projections back into nn.Linear."""
    from posttrain.adapters import merge_adapter
    from posttrain.models import base_model

    model = base_model(merge_adapter(getattr(model, "module", model)))
    odd = _non_linear_projections(model)
    if odd:
        dequantize = _dequantizer()
        if dequantize is None:
            raise ValueError(
                f"export: {odd[0][0]} is a {odd[0][1]}, not a plain nn.Linear/nn.Embedding with float weights "
                f"({len(odd)} such modules), and posttrain.compress.quantize.dequantize_model is not available"
            )
        model = dequantize(model)
        odd = _non_linear_projections(model)
        if odd:
            raise ValueError(f"export: {odd[0][0]} is still a {odd[0][1]} after dequantize_model")
    return model


def _dequantizer():
    """posttrain.compress.quantize.dequantize_model, or None where that module/function is absent."""
    try:
        module = importlib.import_module("posttrain.compress.quantize")
    except ModuleNotFoundError as exc:
        if exc.name != "posttrain.compress.quantize":
            raise
        return None
    return getattr(module, "dequantize_model", None)


def _family_embedding(module: nn.Module, embedding: nn.Module) -> bool:
    """A model family's own nn.Embedding subclass with a plain weight (Gemma's embedding scales its
    rows by sqrt(hidden); posttrain.quantized.ScaledEmbedding is what a dequantized one becomes)."""
    return module is embedding and isinstance(module, nn.Embedding) and (
        type(module).__module__.startswith("transformers.models.") or type(module) is ScaledEmbedding)


def _non_linear_projections(model) -> list[tuple[str, str]]:
    """(name, class) of every projection, embedding or head that is not a plain float module."""
    odd = []
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    for name, module in model.named_modules():
        want = nn.Embedding if module is embedding else nn.Linear
        if module is not embedding and module is not head and name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        weight = getattr(module, "weight", None)
        if type(module) is not want and not _family_embedding(module, embedding):
            odd.append((name, type(module).__name__))
        elif weight is None or type(weight.detach()) is not torch.Tensor or not weight.dtype.is_floating_point:
            odd.append((name, f"{want.__name__} with a {type(weight).__name__} weight"))
    return odd


def tensor_names(model, shape: dict) -> list[tuple[str, str]]:
    """(HF state-dict key, llama.cpp name) for every weight; refuses a missing or extra parameter."""
    pairs = [("model.embed_tokens.weight", "token_embd.weight")]
    for i in range(shape["block_count"]):
        pairs += [(f"model.layers.{i}.{hf}", f"blk.{i}.{name}") for hf, name in LAYER_TENSORS.items()]
    pairs.append(("model.norm.weight", "output_norm.weight"))
    if not shape["tied"]:
        pairs.append(("lm_head.weight", "output.weight"))
    state = model.state_dict()
    missing = [hf for hf, _ in pairs if hf not in state]
    if missing:
        raise ValueError(f"GGUF export: the model has no {missing[0]}; not a Llama layout")
    used = {hf for hf, _ in pairs} | {"lm_head.weight"}
    extra = [k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ValueError(f"GGUF export: parameters with no place in a llama GGUF: {extra[:5]}")
    return pairs


def gguf_tensors(model, shape: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array), q/k permuted; one at a time, so only one fp32 copy is alive."""
    state = model.state_dict()
    for hf, name in tensor_names(model, shape):
        array = state[hf].detach().to(torch.float32).cpu().numpy()
        if name.endswith(".attn_q.weight"):
            array = permute_qk(array, shape["head_count"])
        elif name.endswith(".attn_k.weight"):
            array = permute_qk(array, shape["head_count_kv"])
        yield name, array


def tensor_type(name: str, qtype: str, n_layers: int, tied: bool) -> str:
    """The GGML type a 2-D tensor gets in a `qtype` file, as llama.cpp's quantizer assigns it:
    q4_0 and q4_k_m put the output head (the tied embedding when there is no output.weight) in
    Q6_K; q4_k_m also uses Q6_K for attn_v / ffn_down on a third of the layers."""
    from posttrain.compress.kquants import q4_k_m_type

    if qtype == "q4_k_m":
        return q4_k_m_type(name, n_layers, tied)
    if qtype == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return "Q6_K"
    return {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[qtype]


def encode_tensor(array: np.ndarray, qtype: str, name: str = "", n_layers: int = 1,
                  tied: bool = True) -> tuple[np.ndarray, str, str | None]:
    """Array -> (data, GGML type name, why it fell back or None). 1-D tensors (norms) stay F32.
    A row length that is not a whole number of the type's blocks falls back as llama.cpp does
    (Q4_K -> Q5_0, Q6_K -> Q8_0, 32-value types -> F16)."""
    import gguf

    from posttrain.compress.kquants import K_ENCODERS, K_FALLBACK

    if array.ndim == 1 or qtype == "f32":
        return array.astype(np.float32), "F32", None
    wanted = tensor_type(name, qtype, n_layers, tied)
    ggml_type, why = wanted, None
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0]
    if ggml_type in K_FALLBACK and array.shape[-1] % block:
        why = f"row length {array.shape[-1]} is not a multiple of {block}"
        ggml_type = K_FALLBACK[ggml_type]
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0]
    if ggml_type == "F16" or array.shape[-1] % block:
        if array.shape[-1] % block:
            why = f"row length {array.shape[-1]} is not a multiple of {block}"
        if np.abs(array).max() > np.finfo(np.float16).max:
            return array.astype(np.float32), "F32", "values beyond the F16 range"
        return array.astype(np.float16), "F16", why
    if ggml_type in K_ENCODERS:
        return K_ENCODERS[ggml_type](array), ggml_type, why
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[ggml_type]), ggml_type, why


# ----------------------------------------------------------------------------- tokenizer side


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """llama.cpp's tokenizer.ggml.* fields for a byte-level BPE HF tokenizer, plus warnings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model_spec = spec.get("model") or {}
    if model_spec.get("type") != "BPE" or not _has_byte_level(spec):
        raise ValueError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style); this one is "
            f"{model_spec.get('type')!r} with pre_tokenizer {(spec.get('pre_tokenizer') or {}).get('type')!r}"
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has {len(vocab)} tokens but the embedding only {vocab_size} rows")
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = NORMAL if token not in added else CONTROL if added[token] else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges") or []]
    pre, warnings = _pre_tokenizer_name(spec)
    if spec.get("normalizer"):
        warnings.append(f"normalizer {spec['normalizer'].get('type')} is not recorded in GGUF")
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    meta = {
        "model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
        "add_bos": len(full) > len(plain) and full[0] == tokenizer.bos_token_id,
        "add_eos": len(full) > len(plain) and full[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        "warnings": warnings,
    }
    for name in ("bos", "eos", "unk", "pad"):
        meta[f"{name}_id"] = getattr(tokenizer, f"{name}_token_id", None)
    return meta


def _has_byte_level(spec: dict) -> bool:
    def walk(node) -> bool:
        if not isinstance(node, dict):
            return False
        return node.get("type") == "ByteLevel" or any(walk(n) for n in node.get("pretokenizers") or [])

    return walk(spec.get("pre_tokenizer")) or walk(spec.get("decoder"))


def _pre_tokenizer_name(spec: dict) -> tuple[str, list[str]]:
    """The llama.cpp `tokenizer.ggml.pre` name whose split rule matches the HF pre-tokenizer."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
    )

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", []
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm", []
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name, []
    return "default", [f"pre-tokenizer {kinds} has no llama.cpp name; wrote 'default' (its split rule may differ)"]


# ----------------------------------------------------------------------------- writers


@dataclass
class GGUFExport:
    """What export_gguf wrote; usable as a path (os.fspath)."""

    path: Path
    qtype: str
    size_bytes: int
    tensor_types: dict[str, int]
    fallbacks: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __fspath__(self) -> str:
        return str(self.path)

    def summary(self) -> dict:
        return {"path": str(self.path), "qtype": self.qtype, "size_bytes": self.size_bytes,
                "tensor_types": self.tensor_types, "fallbacks": self.fallbacks, "warnings": self.warnings}


def export_gguf(model, tokenizer, out_path: str | os.PathLike, qtype: GGUFType = "f16",
                name: str | None = None) -> GGUFExport:
    """Write a llama GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_K_M weights, F32 norms) atomically; returns
    what was written.

    PEFT adapters are merged first (in place: the PEFT wrapper is consumed). Block types need
    rows of whole blocks (32 values; 256 for K-quants); a tensor that is not falls back as
    llama.cpp's quantizer does (`encode_tensor`) and is listed in `fallbacks`.
    """
    import gguf

    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {', '.join(GGUF_TYPES)}; got {qtype!r}")
    out_path = Path(out_path)
    if out_path.suffix != ".gguf":
        raise ValueError(f"GGUF output path must end in .gguf: {out_path}")
    model = plain_model(model)
    shape = llama_config(model)
    tok = tokenizer_metadata(tokenizer, shape["vocab_size"])
    encoded, types, fallbacks = [], {}, {}
    tied = "output.weight" not in {name for _, name in tensor_names(model, shape)}
    for tensor_name, array in gguf_tensors(model, shape):
        data, ggml_type, why = encode_tensor(array, qtype, tensor_name, shape["block_count"], tied)
        encoded.append((tensor_name, data, ggml_type))
        types[ggml_type] = types.get(ggml_type, 0) + 1
        if why:
            fallbacks[tensor_name] = f"{ggml_type} ({why})"
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[qtype]
    name = name or Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name)
            writer.add_file_type(int(file_type))
            if qtype not in ("f32", "f16", "bf16"):
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_context_length(shape["context_length"])
            writer.add_embedding_length(shape["embedding_length"])
            writer.add_block_count(shape["block_count"])
            writer.add_feed_forward_length(shape["feed_forward_length"])
            writer.add_head_count(shape["head_count"])
            writer.add_head_count_kv(shape["head_count_kv"])
            writer.add_rope_dimension_count(shape["head_dim"])
            if shape["head_dim"] * shape["head_count"] != shape["embedding_length"]:
                writer.add_key_length(shape["head_dim"])
                writer.add_value_length(shape["head_dim"])
            writer.add_rope_freq_base(shape["rope_freq_base"])
            writer.add_layer_norm_rms_eps(shape["rms_eps"])
            writer.add_vocab_size(shape["vocab_size"])
            writer.add_tokenizer_model(tok["model"])
            writer.add_tokenizer_pre(tok["pre"])
            writer.add_token_list(tok["tokens"])
            writer.add_token_types(tok["token_type"])
            writer.add_token_merges(tok["merges"])
            for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                             ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
                if tok[key] is not None:
                    add(tok[key])
            writer.add_add_bos_token(tok["add_bos"])
            writer.add_add_eos_token(tok["add_eos"])
            if tok["chat_template"]:
                writer.add_chat_template(tok["chat_template"])
            for tensor_name, data, ggml_type in encoded:
                raw = None if ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[ggml_type]
                writer.add_tensor(tensor_name, data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(out_path, write)
    result = GGUFExport(out_path, qtype, out_path.stat().st_size, types, fallbacks, tok["warnings"])
    line = f"gguf: {out_path} ({qtype}, {result.size_bytes / 1e6:.1f} MB, tensors {types})"
    for tensor_name, why in fallbacks.items():
        line += f"\n  {tensor_name}: {why}"
    for warning in tok["warnings"]:
        line += f"\n  warning: {warning}"
    print(line)
    return result


def export_hf(model, tokenizer, out_dir: str | os.PathLike,
              dtype: Literal["same", "fp32", "bf16", "fp16"] = "same") -> Path:
    """Merge adapters and save a plain transformers model dir (safetensors + tokenizer), atomically.

    Casting to `dtype` happens in place on the merged model.
    """
    from posttrain.adapters import merge_adapter
    from posttrain.models import base_model, resolve_dtype, save_model

    model = base_model(merge_adapter(getattr(model, "module", model)))
    if dtype != "same":
        model.to(resolve_dtype(dtype))
    return save_model(model, tokenizer, out_dir)


# ----------------------------------------------------------------------------- checks


def load_gguf(path: str | os.PathLike):
    """Reload a GGUF with transformers (fp32 weights): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


@torch.inference_mode()
def compare_logits(a, b, input_ids: torch.Tensor) -> dict[str, float]:
    """Max and mean |logit difference| of two models on the same ids (in fp32), and how often
    their next-token argmax agrees."""
    la = a(input_ids=input_ids).logits.float()
    lb = b(input_ids=input_ids).logits.float()
    diff = (la - lb).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "top1_agreement": (la.argmax(-1) == lb.argmax(-1)).float().mean().item()}


def logits_diff(a, b, input_ids: torch.Tensor) -> float:
    return compare_logits(a, b, input_ids)["max_abs_logit_diff"]


def verify_gguf(source, tokenizer, path: str | os.PathLike, texts: list[str] | None = None,
                max_length: int = 256) -> dict:
    """Reload the GGUF with transformers; compare logits (fixed text), tokenization and perplexity.

    `source` should be the fp32 model the file was written from (the reload computes in fp32).
    """
    from posttrain.eval.metrics import perplexity

    reloaded, gguf_tokenizer = load_gguf(path)
    samples = [CHECK_TEXT] + list(texts or [])
    ids = torch.tensor([tokenizer(CHECK_TEXT)["input_ids"]])
    result = compare_logits(source.eval(), reloaded, ids)
    result["tokenizer_match"] = all(tokenizer(t)["input_ids"] == gguf_tokenizer(t)["input_ids"] for t in samples)
    if texts:
        result["ppl_source"] = perplexity(source, tokenizer, texts, max_length=max_length)
        result["ppl_gguf"] = perplexity(reloaded, tokenizer, texts, max_length=max_length)
    return result


# ----------------------------------------------------------------------------- stage

ExportFormat = Literal["hf", "gguf-f32", "gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m"]


class ExportModelConfig(ModelConfig):
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = Field("fp32", description="load dtype; quantize from fp32")


class ExportConfig(StageConfig):
    stage: Literal["export"] = "export"
    output_dir: str = "runs/export"
    model: ExportModelConfig = ExportModelConfig()
    dtype: Literal["same", "fp32", "bf16", "fp16"] = Field(
        "same", description="dtype of the merged HF export ('same' keeps the loaded dtype)")
    formats: list[ExportFormat] = Field(["hf", "gguf-q8_0"], min_length=1)
    name: str | None = Field(None, description="general.name in the GGUF (default: the model's directory name)")
    check: bool = Field(True, description="reload every output and compare logits/perplexity with the source")
    check_data: str | None = Field("data/general/text.jsonl", description="text JSONL for the perplexity check")
    check_texts: int = Field(8, gt=0, description="rows of check_data used")
    check_max_length: int = Field(256, gt=8)

    @model_validator(mode="after")
    def _check(self) -> "ExportConfig":
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats: listed twice: {self.formats}")
        return self


def run_export(cfg: ExportConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Load, merge, write each format into the run dir, check round trips; returns the manifest.

    HF export goes to `final/` (so the run dir loads as a model); GGUF files to `model-<type>.gguf`.
    With resume, outputs already written (atomically, so complete) are kept and only checked.
    """
    from posttrain.eval.tasks import load_texts
    from posttrain.models import load_model
    from posttrain.stage import stage_inputs, start_stage

    run = start_stage(cfg, resume, overwrite, load=False)  # loaded below with the adapter merged
    run_dir = run.run_dir
    texts = load_texts(cfg.check_data, cfg.check_texts) if cfg.check and cfg.check_data else None
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype,
                                  trust_remote_code=cfg.model.trust_remote_code, merge_adapter=True)
    model = plain_model(model).eval()
    outputs: dict = {}
    reference = None
    if cfg.check:  # GGUF reloads compute in fp32: compare with the source weights in fp32
        reference = model if model.dtype == torch.float32 else _fp32_copy(model)
    # GGUF first: the HF export may cast the model in place to a lower precision
    for fmt in sorted(cfg.formats, key=lambda f: f == "hf"):
        if fmt == "hf":
            out = run_dir / "final"
            if not (resume and (out / "config.json").is_file()):
                export_hf(model, tokenizer, out, cfg.dtype)
            entry = {"path": str(out), "size_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}
            if cfg.check:
                entry["check"] = _check_hf(model, tokenizer, out)
        else:
            qtype = fmt.removeprefix("gguf-")
            out = run_dir / f"model-{qtype}.gguf"
            if resume and out.is_file():
                entry = {"path": str(out), "qtype": qtype, "size_bytes": out.stat().st_size, "resumed": True}
            else:
                entry = export_gguf(model, tokenizer, out, qtype, name=cfg.name).summary()
            if cfg.check:
                entry["check"] = verify_gguf(reference, tokenizer, out, texts, cfg.check_max_length)
        if cfg.check:
            print(f"check {fmt}: {entry['check']}")
        outputs[fmt] = entry
    return run.finish(stage_inputs(cfg.model.name, {"check_data": cfg.check_data if texts else None}), outputs)


def _fp32_copy(model):
    """An fp32 model with the same weights. Built fresh, not `model.float()`: casting a bf16 model
    back keeps its bf16-rounded RoPE frequency buffer, which alone moved tiny-model logits by 7e-3."""
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def _check_hf(model, tokenizer, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=model.dtype).eval()
    ids = torch.tensor([tokenizer(CHECK_TEXT)["input_ids"]])
    return compare_logits(model.eval(), reloaded, ids)
