"""Export a trained model: a merged plain HF directory, and GGUF files for llama.cpp.

GGUF is written with the `gguf` package (gguf-py), tensors named the llama.cpp way, and all
metadata -- model shape and tokenizer -- built from the HF model and tokenizer themselves, so
a model exports without a source GGUF to copy from. Two llama.cpp architectures are written,
each a row of GGUF_ARCHS (tensor names, shape metadata, weight conventions):

- "llama" (HF llama, mistral without sliding window). llama.cpp stores q/k projection rows in
  a different rotary order from HF (pairs interleaved, not halves); readers, transformers'
  GGUF loader included, undo that, so the export must apply it.
- "gemma3" (HF gemma3_text, e.g. Gemma 3 270M). No q/k permutation (llama.cpp runs Gemma's
  RoPE on halves, as HF does); every RMSNorm weight is stored as 1 + w (Gemma's norm scales by
  1 + w, llama.cpp's by the stored weight); the embedding stays unscaled (both multiply it by
  sqrt(hidden) at run time). llama.cpp fixes what the metadata cannot say -- 5 sliding layers
  then 1 full, local RoPE base 10000, attention scale 1/sqrt(head_dim) -- so a model that differs
  is refused, not written wrong.

Tokenizers: byte-level BPE (GPT-2 / Llama-3 / SmolLM) as llama.cpp's "gpt2" model, and, for
gemma3, Gemma's SentencePiece-style BPE (byte fallback, spaces as "\u2581") as its "llama"
model with scores and token types.

`posttrain export` runs `run_export`: load -> merge adapters -> write the formats ->
reload each GGUF with transformers and compare logits and perplexity with the source.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from posttrain.fileio import atomic_write
from posttrain.config import ModelConfig, StageConfig
from posttrain.quantized import ScaledEmbedding

GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "qkv_proj", "gate_up_proj")  # the last two: Phi3's fused projections
CHECK_TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, astronauts walked on the Moon; "
              "today, students learn why the sky is blue and how plants turn light into sugar.")

# HF parameter name (per layer) -> llama.cpp tensor name, for the llama architecture
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
# Gemma 3: the same projections; q/k norms, and a norm after attention and around the MLP.
# Its post_attention_layernorm follows attention (llama's is the norm before the MLP).
GEMMA3_LAYER_TENSORS = {
    **{hf: name for hf, name in LAYER_TENSORS.items() if hf != "post_attention_layernorm.weight"},
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3 graph: layer i is full attention iff (i + 1) % 6 == 0
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # and its sliding layers' RoPE base, both fixed, not metadata

# llama.cpp token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6


# ----------------------------------------------------------------------------- model side


@dataclass(frozen=True)
class GGUFArch:
    """How models of one HF type are written as one llama.cpp architecture: a row of GGUF_ARCHS."""

    name: str  # general.architecture, and the prefix of the architecture's metadata keys
    layer_tensors: dict[str, str]  # HF per-layer parameter -> llama.cpp tensor name
    shape: Callable[[Any], dict]  # model -> the numbers the metadata records; refuses what it cannot record
    keys: Callable[[Any, dict], None]  # (GGUFWriter, shape): the metadata keys only this architecture has
    permute_qk: bool  # q/k rows in llama.cpp's interleaved rotary order (the llama graph) or HF's (NEOX RoPE)
    norm_shift: float = 0.0  # added to every norm weight (Gemma's RMSNorm computes x * (1 + w))
    sentencepiece: bool = False  # transformers rebuilds a "llama"-model vocabulary for it as Gemma's tokenizer


def _shape(model) -> dict:
    """The shape numbers every architecture records, and the refusals they share."""
    config = model.config
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"GGUF export: {config.model_type} with {flag}=True has no llama.cpp layout here")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 2:
        raise ValueError(f"GGUF export: head_dim {head_dim} is odd; RoPE needs pairs")
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": heads,
        "head_count_kv": kv_heads,
        "head_dim": head_dim,
        "rms_eps": float(config.rms_norm_eps),
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
        "warnings": [],
    }


def llama_config(model) -> dict:
    """The shape numbers a llama GGUF records; refuses what the llama graph cannot run."""
    config = model.config
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        raise ValueError(
            f"GGUF export: mistral with sliding_window={config.sliding_window} is not llama-compatible "
            "(the llama graph attends to the whole context)"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"GGUF export: rope_type {rope_type!r} is not supported (only plain RoPE)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"GGUF export: hidden_act {config.hidden_act!r}; the llama graph uses silu")
    shape = _shape(model)
    shape["rope_freq_base"] = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return shape


def _llama_keys(writer, shape: dict) -> None:
    writer.add_rope_dimension_count(shape["head_dim"])
    if shape["head_dim"] * shape["head_count"] != shape["embedding_length"]:
        writer.add_key_length(shape["head_dim"])
        writer.add_value_length(shape["head_dim"])


def gemma3_config(model) -> dict:
    """The shape numbers a gemma3 GGUF records; refuses a model that llama.cpp's gemma3 graph would
    run differently, since it fixes the layer pattern, the local RoPE base and the attention scale."""
    config = model.config
    shape = _shape(model)
    n, heads, head_dim = shape["block_count"], shape["head_count"], shape["head_dim"]
    fixed = ["sliding_attention" if (i + 1) % GEMMA3_SWA_PATTERN else "full_attention" for i in range(n)]
    layer_types = list(getattr(config, "layer_types", None) or [])
    if layer_types != fixed:
        full, want = ([i for i, kind in enumerate(types) if kind == "full_attention"] for types in (layer_types, fixed))
        raise ValueError(
            f"GGUF export: gemma3 layer_types have full attention at layers {full}; llama.cpp's gemma3 graph "
            f"fixes it at every {GEMMA3_SWA_PATTERN}th layer ({want} of {n}), and a GGUF cannot record another pattern"
        )
    if not getattr(config, "sliding_window", None):
        raise ValueError("GGUF export: gemma3 without a sliding_window; llama.cpp's gemma3 graph has sliding layers")
    rope = getattr(config, "rope_parameters", None) or {}
    for kind in ("full_attention", "sliding_attention"):
        rope_type = (rope.get(kind) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"GGUF export: gemma3 {kind} rope_type {rope_type!r} is not supported (only plain RoPE)")
    local = float((rope.get("sliding_attention") or {}).get("rope_theta", GEMMA3_LOCAL_ROPE_BASE))
    if local != GEMMA3_LOCAL_ROPE_BASE:
        raise ValueError(f"GGUF export: gemma3 sliding-layer rope_theta {local:g}; llama.cpp fixes it at 10000")
    scalar = config.hidden_size // heads if n == 62 else head_dim  # llama.cpp: 1/sqrt(this); 62 layers = 27B
    if config.query_pre_attn_scalar != scalar:
        raise ValueError(
            f"GGUF export: gemma3 query_pre_attn_scalar {config.query_pre_attn_scalar}; llama.cpp scales "
            f"attention by 1/sqrt({scalar}) for this shape"
        )
    if config.query_pre_attn_scalar != 256:
        shape["warnings"].append(
            f"query_pre_attn_scalar {config.query_pre_attn_scalar}: transformers' GGUF loader assumes 256 "
            "(llama.cpp reads the file right; a transformers reload will not match)")
    for flag in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(config, flag, None):
            raise ValueError(f"GGUF export: gemma3 with {flag}={getattr(config, flag)!r} is not supported")
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(f"GGUF export: hidden_activation {config.hidden_activation!r}; the gemma3 graph uses "
                         "gelu_pytorch_tanh")
    embed_scale = float(getattr(model.get_input_embeddings(), "embed_scale", 0.0))
    if abs(embed_scale - shape["embedding_length"] ** 0.5) > 0.01 * shape["embedding_length"] ** 0.5:
        raise ValueError(f"GGUF export: gemma3 embedding scale {embed_scale:g}; llama.cpp multiplies by "
                         f"sqrt(hidden_size) = {shape['embedding_length'] ** 0.5:g}")
    shape["rope_freq_base"] = float((rope.get("full_attention") or {}).get("rope_theta", 1_000_000.0))
    shape["sliding_window"] = int(config.sliding_window)
    return shape


def _gemma3_keys(writer, shape: dict) -> None:
    writer.add_key_length(shape["head_dim"])
    writer.add_value_length(shape["head_dim"])
    writer.add_sliding_window(shape["sliding_window"])


LLAMA = GGUFArch("llama", LAYER_TENSORS, llama_config, _llama_keys, permute_qk=True)
GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "gemma3_text": GGUFArch("gemma3", GEMMA3_LAYER_TENSORS, gemma3_config, _gemma3_keys, permute_qk=False,
                            norm_shift=1.0, sentencepiece=True),
}


def gguf_arch(model) -> GGUFArch:
    """The GGUF_ARCHS row for this model's type; refuses every other type, naming it."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in GGUF_ARCHS:
        raise ValueError(
            f"GGUF export supports {', '.join(GGUF_ARCHS)} (Gemma 3 text-only) models; this model's type is "
            f"{model_type!r}. Export it as a HF directory (format 'hf') instead."
        )
    return GGUF_ARCHS[model_type]


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


def tensor_names(model, shape: dict, arch: GGUFArch = LLAMA) -> list[tuple[str, str]]:
    """(HF state-dict key, llama.cpp name) for every weight; refuses a missing or extra parameter."""
    pairs = [("model.embed_tokens.weight", "token_embd.weight")]
    for i in range(shape["block_count"]):
        pairs += [(f"model.layers.{i}.{hf}", f"blk.{i}.{name}") for hf, name in arch.layer_tensors.items()]
    pairs.append(("model.norm.weight", "output_norm.weight"))
    if not shape["tied"]:
        pairs.append(("lm_head.weight", "output.weight"))
    state = model.state_dict()
    missing = [hf for hf, _ in pairs if hf not in state]
    if missing:
        raise ValueError(f"GGUF export: the model has no {missing[0]}; not a {arch.name} layout")
    used = {hf for hf, _ in pairs} | {"lm_head.weight"}
    extra = [k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ValueError(f"GGUF export: parameters with no place in a {arch.name} GGUF: {extra[:5]}")
    return pairs


def gguf_tensors(model, shape: dict, arch: GGUFArch = LLAMA) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) in the architecture's conventions (q/k permuted, norms shifted);
    one at a time, so only one fp32 copy is alive."""
    state = model.state_dict()
    for hf, name in tensor_names(model, shape, arch):
        array = state[hf].detach().to(torch.float32).cpu().numpy()
        if arch.permute_qk and name.endswith(".attn_q.weight"):
            array = permute_qk(array, shape["head_count"])
        elif arch.permute_qk and name.endswith(".attn_k.weight"):
            array = permute_qk(array, shape["head_count_kv"])
        elif arch.norm_shift and name.endswith("norm.weight"):
            array = array + np.float32(arch.norm_shift)
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


def tokenizer_metadata(tokenizer, vocab_size: int, sentencepiece: bool = False) -> dict:
    """llama.cpp's tokenizer.ggml.* fields for a byte-level BPE HF tokenizer ("gpt2") or, where
    `sentencepiece` (the gemma3 architecture), Gemma's SentencePiece-style BPE ("llama"); plus warnings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model_spec = spec.get("model") or {}
    byte_level = model_spec.get("type") == "BPE" and _has_byte_level(spec)
    spm = sentencepiece and model_spec.get("type") == "BPE" and model_spec.get("byte_fallback") and not byte_level
    if not byte_level and not spm:
        also = " and Gemma's SentencePiece-style BPE (byte fallback)" if sentencepiece else ""
        raise ValueError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style){also}; this one is "
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
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    meta = {
        "tokens": tokens, "token_type": types, "scores": None, "add_space_prefix": None,
        "add_bos": len(full) > len(plain) and full[0] == tokenizer.bos_token_id,
        "add_eos": len(full) > len(plain) and full[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
    for name in ("bos", "eos", "unk", "pad"):
        meta[f"{name}_id"] = getattr(tokenizer, f"{name}_token_id", None)
    if byte_level:
        meta["model"] = "gpt2"
        meta["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges") or []]
        meta["pre"], meta["warnings"] = _pre_tokenizer_name(spec)
        if spec.get("normalizer"):
            meta["warnings"].append(f"normalizer {spec['normalizer'].get('type')} is not recorded in GGUF")
    else:
        meta.update(_sentencepiece_fields(spec, model_spec, tokens, types))
    return meta


SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_fields(spec: dict, model_spec: dict, tokens: list[str], types: list[int]) -> dict:
    """The "llama" (SentencePiece) vocabulary as llama.cpp's converter writes Gemma's, from a HF BPE
    with byte fallback; refuses a text pipeline other than Gemma's (spaces -> "\u2581", no prefix space),
    which is the one transformers rebuilds for a gemma3 file.

    In place on `tokens`/`types`: <0xNN> pieces are BYTE; runs of 2+ spaces are written as spaces and
    USER_DEFINED (Gemma's SentencePiece model defines them so; transformers' reader spells them back).
    Scores: llama.cpp's SentencePiece tokenizer merges the best-scored pair first, so normal pieces
    get 0, -1, -2, ... in id order (the shipped Gemma 3 GGUF's order); others -1000, bytes 0. No
    merges are written, as llama.cpp's converter writes none: transformers derives them from the
    id order too (writing Gemma's 515k merges doubled its read time). A tokenizer whose merges do
    not follow its ids is therefore not what either reader rebuilds: a warning says so."""
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer")
    if normalizer.get("type") == "Sequence" and len(normalizer.get("normalizers") or []) == 1:
        normalizer = normalizer["normalizers"][0]
    gemma_normalizer = normalizer == {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    no_op_pre = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})  # no spaces left
    if not gemma_normalizer or not no_op_pre:
        raise ValueError(
            f"GGUF export: a SentencePiece-style tokenizer is written as Gemma's (normalizer Replace ' ' -> "
            f"'{SPACE}', no pre-tokenizer, no prefix space); this one has normalizer {spec.get('normalizer')} "
            f"and pre_tokenizer {pre}"
        )
    scores, rank = [], 0
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind == NORMAL and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[index] = BYTE
        elif kind == NORMAL and len(token) > 1 and token == SPACE * len(token):
            tokens[index], types[index] = " " * len(token), USER_DEFINED
        if types[index] == NORMAL:
            scores.append(-float(rank))
            rank += 1
        else:
            scores.append(0.0 if types[index] == BYTE else -1000.0)
    ids = model_spec.get("vocab") or {}  # the merges' order vs the ids of the pieces they make
    made = [ids.get("".join(m.split(" ") if isinstance(m, str) else m)) for m in model_spec.get("merges") or []]
    warnings = []
    if any(b is None or a is None or b < a for a, b in zip(made, made[1:])):
        warnings.append("the tokenizer's merges do not follow its token ids; llama.cpp and transformers rebuild "
                        "merges in id order, so some words may split differently from the source tokenizer")
    return {"model": "llama", "pre": "default", "scores": scores, "merges": [], "add_space_prefix": False,
            "warnings": warnings}


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
    """Write a GGUF (llama or gemma3 architecture, see GGUF_ARCHS; F32/F16/BF16/Q8_0/Q4_0/Q4_K_M
    weights, F32 norms) atomically; returns what was written.

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
    arch = gguf_arch(model)
    shape = arch.shape(model)
    tok = tokenizer_metadata(tokenizer, shape["vocab_size"], sentencepiece=arch.sentencepiece)
    pairs = tensor_names(model, shape, arch)
    tied = "output.weight" not in {name for _, name in pairs}
    encoded, types, fallbacks = [], {}, {}
    for tensor_name, array in gguf_tensors(model, shape, arch):
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
        writer = gguf.GGUFWriter(tmp, arch=arch.name)
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
            writer.add_rope_freq_base(shape["rope_freq_base"])
            writer.add_layer_norm_rms_eps(shape["rms_eps"])
            writer.add_vocab_size(shape["vocab_size"])
            arch.keys(writer, shape)
            writer.add_tokenizer_model(tok["model"])
            writer.add_tokenizer_pre(tok["pre"])
            writer.add_token_list(tok["tokens"])
            if tok["scores"] is not None:
                writer.add_token_scores(tok["scores"])
            writer.add_token_types(tok["token_type"])
            if tok["merges"]:
                writer.add_token_merges(tok["merges"])
            for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                             ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
                if tok[key] is not None:
                    add(tok[key])
            writer.add_add_bos_token(tok["add_bos"])
            writer.add_add_eos_token(tok["add_eos"])
            if tok["add_space_prefix"] is not None:
                writer.add_add_space_prefix(tok["add_space_prefix"])
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
    warnings = shape["warnings"] + tok["warnings"]
    result = GGUFExport(out_path, qtype, out_path.stat().st_size, types, fallbacks, warnings)
    line = f"gguf: {out_path} ({arch.name}, {qtype}, {result.size_bytes / 1e6:.1f} MB, tensors {types})"
    for tensor_name, why in fallbacks.items():
        line += f"\n  {tensor_name}: {why}"
    for warning in warnings:
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
