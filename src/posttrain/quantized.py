"""The quantized-weight format: integer modules and the checkpoint directory that holds them.

This is a model format, not a compression stage: `models.load_model` reads it and the native
decoder (generate/native.py) reads its tensors, so it sits in the models layer; the
compression stage (compress/quantize.py: PTQ, AWQ, QAT) produces it.

Weights are stored as integers with fp16 scales, in modules that replace `nn.Linear`
and `nn.Embedding`:
  int8     symmetric, per output channel (group_size=None) or per group of K inputs
  int4     asymmetric (scale and minimum) per group of K inputs, two values per byte
  int8dyn  int8 weights as above and int8 per-token activations (`torch._int_mm`)
The PyTorch forward dequantizes (correct everywhere, used by training and perplexity);
decoding goes through the native CPU decoder, which reads the integer weights directly.

A quantized checkpoint is a directory: config.json and tokenizer as usual, the
integer tensors in model.safetensors, and quantization.json (the spec).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from posttrain.config import Strict

QUANT_FILE = "quantization.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "qkv_proj", "gate_up_proj")  # the last two: Phi3's fused projections


class QuantSpec(Strict):
    """What to quantize and how."""

    weights: Literal["int8", "int4"] = "int8"
    activations: Literal["none", "int8"] = Field("none", description="int8: dynamic per-token activations")
    group_size: int | None = Field(None, gt=0, description="inputs per scale; None = per output channel "
                                                           "(int8 only; int4 needs groups)")
    embeddings: Literal["none", "int8"] = Field("int8", description="the embedding and a tied LM head")
    targets: list[str] = Field(list(DEFAULT_TARGETS), description="linear layer name suffixes to quantize")
    skip: list[str] = Field([], description="glob patterns of module names to keep in float")

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.weights == "int4" and self.group_size is None:
            raise ValueError("quant.group_size: int4 needs a group size (e.g. 32, 64 or 128)")
        if self.weights == "int4" and self.group_size % 2:
            raise ValueError("quant.group_size: int4 packs two values per byte; use an even group size")
        if self.activations == "int8" and (self.weights != "int8" or self.group_size is not None):
            raise ValueError("quant.activations=int8 needs weights=int8 per channel (group_size: null)")
        return self

    @property
    def mode(self) -> str:
        return "int8dyn" if self.activations == "int8" else self.weights


# ----------------------------------------------------------------------------- math


def _groups(w: Tensor, group_size: int | None) -> Tensor:
    n, k = w.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"input size {k} is not a multiple of the group size {g}")
    return w.float().reshape(n, k // g, g)


def quantize_int8(w: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8: q in [-127, 127], scale [N, K/g] (fp16) with w ≈ q * scale."""
    wg = _groups(w, group_size)
    scale = (wg.abs().amax(-1) / 127).to(torch.float16).float().clamp_min(1e-7)
    q = torch.round(wg / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale.to(torch.float16)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 per group: q in [0, 15], w ≈ q * scale + minimum; q packed two per byte
    (even k in the low nibble) as uint8 [N, K/2]; scale and minimum fp16 [N, K/g]."""
    wg = _groups(w, group_size)
    lo = wg.amin(-1).to(torch.float16).float()
    scale = ((wg.amax(-1) - lo) / 15).to(torch.float16).float().clamp_min(1e-7)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(w.shape)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale.to(torch.float16), lo.to(torch.float16)


def dequantize_int8(q: Tensor, scale: Tensor, dtype=torch.float32) -> Tensor:
    n, k = q.shape
    groups = scale.shape[1]
    return (q.float().reshape(n, groups, k // groups) * scale.float()[..., None]).reshape(n, k).to(dtype)


def unpack_int4(packed: Tensor) -> Tensor:
    q = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    q[:, 0::2] = packed & 15
    q[:, 1::2] = packed >> 4
    return q


def dequantize_int4(packed: Tensor, scale: Tensor, minimum: Tensor, dtype=torch.float32) -> Tensor:
    q = unpack_int4(packed)
    n, k = q.shape
    groups = scale.shape[1]
    w = q.float().reshape(n, groups, k // groups) * scale.float()[..., None] + minimum.float()[..., None]
    return w.reshape(n, k).to(dtype)


# ----------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """A linear layer with integer weights; `mode` int8 | int4 | int8dyn."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int | None,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        groups = in_features // (group_size or in_features)
        if mode == "int4":
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("minimum", torch.zeros(out_features, groups, dtype=torch.float16))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.minimum = None
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int | None) -> "QuantLinear":
        w = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, mode, group_size, linear.bias is not None, w.dtype)
        if mode == "int4":
            out.qweight, out.scale, out.minimum = quantize_int4(w, group_size)
        else:
            out.qweight, out.scale = quantize_int8(w, group_size)
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.mode == "int4":
            return dequantize_int4(self.qweight, self.scale, self.minimum, dtype)
        return dequantize_int8(self.qweight, self.scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "int8dyn":
            return self._forward_dynamic(x)
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def _forward_dynamic(self, x: Tensor) -> Tensor:
        """int8 x int8 -> int32 matmul with a per-token activation scale."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        xs = (x2.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
        xq = torch.round(x2 / xs).clamp_(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.qweight.t()).float() * xs * self.scale.float()[:, 0]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, group_size={self.group_size}"


def embed_scale(emb: nn.Module) -> float:
    """The factor a scaled embedding (Gemma's sqrt(hidden)) multiplies its rows by; 1.0 for nn.Embedding."""
    value = getattr(emb, "embed_scale", None)
    return 1.0 if value is None else float(value)


class ScaledEmbedding(nn.Embedding):
    """nn.Embedding times a constant, as Gemma's embedding: what a dequantized scaled embedding becomes.
    Its state dict is an nn.Embedding's, so a saved model reloads into the family's own class."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float, dtype: torch.dtype | None = None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        self.embed_scale = scale

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * torch.tensor(self.embed_scale, dtype=self.weight.dtype)


class QuantEmbedding(nn.Module):
    """int8 embedding rows with one fp16 scale per row (the rows of a tied LM head too).

    `embed_scale` keeps a scaled embedding's constant factor (Gemma multiplies every row by
    sqrt(hidden_size); dropping it made Gemma 3 270M's perplexity 22.7 -> 6e6)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.bfloat16,
                 embed_scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.embed_scale = embed_scale
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, 1, dtype=torch.float16))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "QuantEmbedding":
        out = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.dtype, embed_scale(emb))
        out.qweight, out.scale = quantize_int8(emb.weight.detach(), None)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.qweight).to(self.dtype)
        rows = rows * F.embedding(ids, self.scale).to(self.dtype)
        if self.embed_scale != 1.0:  # as the family's own module: the factor rounded to the compute dtype
            rows = rows * torch.tensor(self.embed_scale, dtype=self.dtype)
        return rows


def tied_head(emb: QuantEmbedding) -> QuantLinear:
    """An LM head that shares the quantized embedding's tensors (no second copy)."""
    head = QuantLinear(emb.embedding_dim, emb.num_embeddings, "int8", None, dtype=emb.dtype)
    head.qweight, head.scale = emb.qweight, emb.scale
    return head


# ----------------------------------------------------------------------------- model level


def matches_spec(name: str, spec: QuantSpec) -> bool:
    """Whether a module name is a target of the spec (and not skipped)."""
    if any(fnmatch.fnmatchcase(name, p) for p in spec.skip):
        return False
    return name.rsplit(".", 1)[-1] in spec.targets


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted name."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def target_linears(model: nn.Module, spec: QuantSpec) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches_spec(n, spec)]
    if not names:
        raise ValueError(f"no linear layer matches quant.targets {spec.targets} (skip {spec.skip})")
    return names


def head_name(model: nn.Module) -> str | None:
    """The dotted name of the output embedding (LM head), or None."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None)


# ----------------------------------------------------------------------------- save / load


def quantized_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict without the tied head's duplicate tensors and without rotary tables."""
    head = head_name(model) if getattr(model.config, "tie_word_embeddings", False) else None
    out = {}
    for k, v in model.state_dict().items():
        if "rotary_emb" in k or (head and k.startswith(head + ".")):
            continue
        out[k] = v.contiguous()
    return out


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """config.json + tokenizer + model.safetensors (integer tensors) + quantization.json, atomically."""
    from safetensors.torch import save_file

    from posttrain.fileio import atomic_dir

    spec: QuantSpec | None = getattr(model, "_posttrain_quant", None)
    if spec is None:
        raise ValueError("save_quantized: the model was not quantized with quantize_model")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        save_file(quantized_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / QUANT_FILE).write_text(json.dumps({"spec": spec.model_dump(mode="json"),
                                                  "dtype": str(dtype).removeprefix("torch."),
                                                  "format": "posttrain-quantized/1"}, indent=2))
    return out_dir


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def load_quantized(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the architecture from config.json, swap in integer modules, load the tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    try:
        meta = json.loads((path / QUANT_FILE).read_text())
        spec = QuantSpec.model_validate(meta["spec"])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path / QUANT_FILE}: not a valid quantization file ({exc})") from exc
    dtype = dtype or getattr(torch, meta.get("dtype", "bfloat16"))
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    model.to(dtype)
    _init_computed_buffers(model)  # before the swap: a scaled embedding's factor is one of them
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name in target_linears(model, spec):
        lin = model.get_submodule(name)
        set_submodule(model, name, QuantLinear(lin.in_features, lin.out_features, spec.mode, spec.group_size,
                                      lin.bias is not None, dtype))
    if spec.embeddings == "int8":
        emb = model.get_input_embeddings()
        qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, dtype, embed_scale(emb))
        model.set_input_embeddings(qemb)
        head = model.get_output_embeddings()
        model.set_output_embeddings(tied_head(qemb) if tied else
                                    QuantLinear(head.in_features, head.out_features, "int8", None, dtype=dtype))
    state = load_file(str(path / "model.safetensors"))
    expected = quantized_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not match {QUANT_FILE}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in state.items():
        target = expected[k]
        if target.shape != v.shape:
            raise ValueError(f"{path}/model.safetensors: {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(target.shape)}")
    # copied in place (cast to each tensor's dtype), so the tied head keeps sharing the embedding's
    # tensors; strict=False: the tied head's own keys are not in the file
    model.load_state_dict(state, strict=False)
    if spec.embeddings == "none" and tied:
        model.tie_weights()
    _init_rotary(model)
    model._posttrain_quant = spec
    model.eval()
    return model


def _init_rotary(model: nn.Module) -> None:
    """Rotary tables are computed buffers, not saved: rebuild them after a meta-device build
    (`inv_freq`, or one table per layer type as Gemma 3's `sliding_attention_inv_freq`)."""
    for name, m in list(model.named_modules()):
        if name.endswith("rotary_emb") and any(b.endswith("inv_freq") for b, _ in m.named_buffers(recurse=False)):
            set_submodule(model, name, type(m)(m.config))


def _init_computed_buffers(model: nn.Module) -> None:
    """Other unsaved buffers (Gemma's embedding scale) hold garbage after `to_empty`: the model's
    own initializer sets them (and re-initializes that module's weights, which loading replaces)."""
    for name, m in model.named_modules():
        if getattr(m, "_non_persistent_buffers_set", None) and not name.endswith("rotary_emb"):
            model._init_weights(m)
