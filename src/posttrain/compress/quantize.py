"""Quantization: post-training (PTQ) and quantization-aware training (QAT).

Weights are stored as integers with fp16 scales, in modules that replace `nn.Linear`
and `nn.Embedding`:
  int8     symmetric, per output channel (group_size=None) or per group of K inputs
  int4     asymmetric (scale and minimum) per group of K inputs, two values per byte
  int8dyn  int8 weights as above and int8 per-token activations (`torch._int_mm`)
The PyTorch forward dequantizes (correct everywhere, used by training and
perplexity); decoding goes through the native CPU decoder, which reads the integer
weights directly (generate/native.c), because a batch-1 decode step is bound by the
bytes of weights it reads. The tied embedding / LM head of small models is a large
share of the bytes (113 MB of the default model's 538 MB in fp32), so it is quantized
too (int8 per row) unless `embeddings: none`.

QAT registers a fake-quant parametrization on each target weight: the forward sees
exactly the weights `quantize_model` will produce (same function), the backward is
the straight-through estimator. `convert_qat` removes the parametrizations and
quantizes, so the converted model computes what the QAT model was trained to compute.

A quantized checkpoint is a directory: config.json and tokenizer as usual, the
integer tensors in model.safetensors, and quantization.json (the spec).
`posttrain.models.load_model` recognises it.
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

from posttrain.config import StageConfig, Strict, TrainConfig
from posttrain.eval.suite import EvalConfig

QUANT_FILE = "quantization.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def fake_quantize(w: Tensor, weights: str, group_size: int | None) -> Tensor:
    """The weights `quantize_model` would store, dequantized (no gradient path)."""
    if weights == "int8":
        return dequantize_int8(*quantize_int8(w, group_size), dtype=w.dtype)
    return dequantize_int4(*quantize_int4(w, group_size), dtype=w.dtype)


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


class QuantEmbedding(nn.Module):
    """int8 embedding rows with one fp16 scale per row (the rows of a tied LM head too)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, 1, dtype=torch.float16))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "QuantEmbedding":
        out = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.dtype)
        out.qweight, out.scale = quantize_int8(emb.weight.detach(), None)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.qweight).to(self.dtype)
        return rows * F.embedding(ids, self.scale).to(self.dtype)


def tied_head(emb: QuantEmbedding) -> QuantLinear:
    """An LM head that shares the quantized embedding's tensors (no second copy)."""
    head = QuantLinear(emb.embedding_dim, emb.num_embeddings, "int8", None, dtype=emb.dtype)
    head.qweight, head.scale = emb.qweight, emb.scale
    return head


# ----------------------------------------------------------------------------- model level


def _matches(name: str, spec: QuantSpec) -> bool:
    if any(fnmatch.fnmatchcase(name, p) for p in spec.skip):
        return False
    return name.rsplit(".", 1)[-1] in spec.targets


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def target_linears(model: nn.Module, spec: QuantSpec) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, spec)]
    if not names:
        raise ValueError(f"no linear layer matches quant.targets {spec.targets} (skip {spec.skip})")
    return names


def check_groups(model: nn.Module, names: list[str], spec: QuantSpec) -> None:
    """Every target's input size must be a multiple of the group size: say which is not, before changing anything."""
    if spec.group_size is None:
        return
    for name in names:
        k = model.get_submodule(name).in_features
        if k % spec.group_size:
            divisors = [g for g in (32, 64, 96, 128, 192, 256) if all(
                model.get_submodule(n).in_features % g == 0 for n in names)]
            raise ValueError(f"quant.group_size {spec.group_size} does not divide the input size {k} of {name}; "
                             f"group sizes that fit every target layer: {divisors or 'none of 32..256'}")


def is_tied(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and isinstance(emb, nn.Embedding) and head.weight is emb.weight


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace target linears (and embeddings) in place with integer modules; returns the model."""
    if hasattr(model, "peft_config"):
        raise ValueError("quantize: the model carries PEFT adapters; merge them first (posttrain merge)")
    tied = is_tied(model)
    names = target_linears(model, spec)
    check_groups(model, names, spec)
    for name in names:
        _set(model, name, QuantLinear.from_linear(model.get_submodule(name), spec.mode, spec.group_size))
    if spec.embeddings == "int8":
        emb = model.get_input_embeddings()
        qemb = QuantEmbedding.from_embedding(emb)
        model.set_input_embeddings(qemb)
        head = model.get_output_embeddings()
        if tied:
            model.set_output_embeddings(tied_head(qemb))
        elif head is not None:
            model.set_output_embeddings(QuantLinear.from_linear(head, "int8", None))
    model.config.tie_word_embeddings = tied
    model._posttrain_quant = spec
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Plain nn.Linear / nn.Embedding again (for export or further training), in place."""
    spec = getattr(model, "_posttrain_quant", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and name != _head_name(model):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
            lin.weight.data = m.dequantized(dtype)
            if m.bias is not None:
                lin.bias.data = m.bias.data.to(dtype)
            _set(model, name, lin)
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, dtype=dtype)
        plain.weight.data = dequantize_int8(emb.qweight, emb.scale, dtype)
        model.set_input_embeddings(plain)
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        lin = nn.Linear(head.in_features, head.out_features, bias=False, dtype=dtype)
        if getattr(model.config, "tie_word_embeddings", False):
            lin.weight = model.get_input_embeddings().weight
        else:
            lin.weight.data = head.dequantized(dtype)
        model.set_output_embeddings(lin)
    if spec is not None:
        del model._posttrain_quant
    return model


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, shared tensors counted once (rotary tables excluded)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "rotary_emb" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- activation-aware scaling


@torch.no_grad()
def awq_scale(model: nn.Module, batches: list[Tensor], spec: QuantSpec, grid: int = 11,
              max_rows: int = 1024) -> dict[str, float]:
    """AWQ-style: scale input channels that see large activations up before quantizing (so they
    lose less), and fold the inverse scale into the op that feeds them (the RMSNorm weight, or
    up_proj's rows for down_proj). The float model computes the same function afterwards.

    For each group of linears sharing an input, s = mean|x|^a for a in [0, 1] (`grid` points);
    the a that minimises the quantized outputs' squared error on calibration rows wins.
    Returns the chosen exponent per group.
    """
    from posttrain.adapters import decoder_layers

    _, layers = decoder_layers(model)
    inputs: dict[str, list[Tensor]] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for key, mod in ((f"{i}.attn", layer.self_attn.q_proj), (f"{i}.mlp", layer.mlp.gate_proj),
                         (f"{i}.down", layer.mlp.down_proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, key=key: inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).float())))
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    chosen = {}
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups = [(f"{i}.attn", [attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm.weight, None),
                  (f"{i}.mlp", [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm.weight, None),
                  (f"{i}.down", [mlp.down_proj], None, mlp.up_proj)]
        for key, linears, norm_w, feeder in groups:
            if not all(_matches(n, spec) for n in _names(model, linears)):
                continue
            x = torch.cat(inputs[key])
            x = x[torch.linspace(0, len(x) - 1, min(max_rows, len(x))).long()]
            mean_abs = x.abs().mean(0).clamp_min(1e-6)
            ws = [lin.weight.float() for lin in linears]
            want = [x @ w.T for w in ws]
            best = (float("inf"), 0.0, None)
            for a in torch.linspace(0, 1, grid).tolist():
                sc = mean_abs.pow(a)
                sc = sc / (sc.max() * sc.min()).sqrt()
                err = sum(((x / sc) @ fake_quantize(w * sc, spec.weights, spec.group_size).T - y).pow(2).sum().item()
                          for w, y in zip(ws, want))
                if err < best[0]:
                    best = (err, a, sc)
            _, a, sc = best
            for lin in linears:
                lin.weight.data = (lin.weight.float() * sc).to(lin.weight.dtype)
            if norm_w is not None:
                norm_w.data = (norm_w.float() / sc).to(norm_w.dtype)
            else:
                feeder.weight.data = (feeder.weight.float() / sc[:, None]).to(feeder.weight.dtype)
            chosen[key] = a
    return chosen


def _names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    ids = {id(m) for m in modules}
    return [n for n, m in model.named_modules() if id(m) in ids]


def calibration_ids(tokenizer, path: str, n_samples: int, max_length: int) -> list[Tensor]:
    """Token ids of the first `n_samples` texts of a JSONL file (text, or prompt + completion)."""
    from posttrain.eval.tasks import load_texts

    texts = load_texts(path, limit=n_samples)
    return [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_length).input_ids for t in texts]


# ----------------------------------------------------------------------------- save / load


def quantized_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict without the tied head's duplicate tensors and without rotary tables."""
    head = _head_name(model) if getattr(model.config, "tie_word_embeddings", False) else None
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
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name in target_linears(model, spec):
        lin = model.get_submodule(name)
        _set(model, name, QuantLinear(lin.in_features, lin.out_features, spec.mode, spec.group_size,
                                      lin.bias is not None, dtype))
    if spec.embeddings == "int8":
        emb = model.get_input_embeddings()
        qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, dtype)
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
    """Rotary tables are computed buffers, not saved: rebuild them after a meta-device build."""
    for name, m in list(model.named_modules()):
        if name.endswith("rotary_emb") and hasattr(m, "inv_freq"):
            _set(model, name, type(m)(m.config))


# ----------------------------------------------------------------------------- QAT


class FakeQuant(nn.Module):
    """Parametrization: forward sees the quantized weights, gradients pass straight through."""

    def __init__(self, weights: str, group_size: int | None):
        super().__init__()
        self.weights, self.group_size = weights, group_size

    def forward(self, w: Tensor) -> Tensor:
        # exactly the quantized values forward (w - w.detach() is 0), identity gradient backward
        return fake_quantize(w.detach(), self.weights, self.group_size) + (w - w.detach())


def prepare_qat(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Fake-quantize the target linears' weights during training (activations stay float)."""
    from torch.nn.utils import parametrize

    names = target_linears(model, spec)
    check_groups(model, names, spec)
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight",
                                             FakeQuant(spec.weights, spec.group_size))
    model._posttrain_qat = spec
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Drop the fake-quant parametrizations (keeping the trained float weights) and quantize."""
    from torch.nn.utils import parametrize

    spec: QuantSpec = model._posttrain_qat
    for name, m in list(model.named_modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    del model._posttrain_qat
    return quantize_model(model, spec)


# ----------------------------------------------------------------------------- the stage


class QATSettings(Strict):
    """Quantization-aware training through the loop before converting."""

    data: str = Field(..., description="training JSONL (text, chat or completion records)")
    eval: str | None = Field(None, description="held-out JSONL for eval_loss during training")
    kind: Literal["chat", "completion", "text"] | None = None
    max_length: int = Field(512, gt=8)
    objective: Literal["pretrain", "sft", "distill"] = Field(
        "distill", description="distill: match the unquantized model's token distribution (forward KL)")
    temperature: float = Field(1.0, gt=0)


class CalibrationConfig(Strict):
    data: str | None = Field(None, description="text JSONL for activation statistics (AWQ-style scaling)")
    n_samples: int = Field(32, gt=0)
    max_length: int = Field(256, gt=8)
    awq: bool = Field(False, description="activation-aware input-channel scaling before quantizing")

    @model_validator(mode="after")
    def _check(self) -> "CalibrationConfig":
        if self.awq and not self.data:
            raise ValueError("calibration.awq needs calibration.data (a text JSONL)")
        return self


class QuantizeConfig(StageConfig):
    stage: Literal["quantize"] = "quantize"
    output_dir: str = "runs/quantize"
    quant: QuantSpec = QuantSpec()
    calibration: CalibrationConfig = CalibrationConfig()
    qat: QATSettings | None = Field(None, description="train with fake quantization before converting")
    train: TrainConfig = TrainConfig(lr=2e-5, max_steps=40, weight_decay=0.0)
    eval: EvalConfig = EvalConfig()


def run_quantize(cfg: QuantizeConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """PTQ (or QAT then convert) -> quantized checkpoint in output_dir/final, with before/after eval."""
    from posttrain.eval.suite import evaluate_all, write_reports
    from posttrain.models import resolve_dtype
    from posttrain.stage import stage_inputs, start_stage, write_json_atomic

    if resume:
        raise ValueError("quantize: --resume is not supported (PTQ takes seconds; rerun with --overwrite)")
    run = start_stage(cfg, overwrite=overwrite, dtype="fp32" if cfg.qat else None)
    model, tok, run_dir = run.model, run.tokenizer, run.run_dir
    before = evaluate_all(model, tok, cfg.eval) if cfg.eval.before else {}
    bytes_before = weight_bytes(model)
    train_summary = None
    if cfg.calibration.awq:
        ids = calibration_ids(tok, cfg.calibration.data, cfg.calibration.n_samples, cfg.calibration.max_length)
        exponents = awq_scale(model, ids, cfg.quant)
        print(f"awq: mean exponent {sum(exponents.values()) / max(len(exponents), 1):.2f} over {len(exponents)} groups")
    if cfg.qat:
        model, train_summary = _qat(model, tok, cfg, run_dir)
        model = convert_qat(model)
    else:
        quantize_model(model, cfg.quant)
    serve_dtype = resolve_dtype(cfg.model.dtype)
    model.to(serve_dtype)
    save_quantized(model, tok, run_dir / "final")
    after = evaluate_all(model, tok, cfg.eval)
    outputs = {"eval_before": before, "eval_after": after, "weight_bytes_before": bytes_before,
               "weight_bytes_after": weight_bytes(model), "train": train_summary,
               "spec": cfg.quant.model_dump(mode="json")}
    write_json_atomic(run_dir / "eval.json", {"before": before, "after": after})
    write_reports(run_dir, before, after)
    print(f"weights: {bytes_before / 1e6:.1f} MB -> {outputs['weight_bytes_after'] / 1e6:.1f} MB")
    return run.finish(stage_inputs(cfg.model.name, {"train": cfg.qat.data if cfg.qat else None}), outputs)


def _qat(model: nn.Module, tok, cfg: QuantizeConfig, run_dir: Path):
    """Fake-quantized training of the target linears (everything else frozen) through the loop."""
    from posttrain.train.loop import train
    from posttrain.train.objectives import get_objective
    from posttrain.data.examples import encode_file

    q = cfg.qat
    kind = "text" if q.objective == "pretrain" else q.kind
    examples, report = encode_file(tok, q.data, kind, q.max_length, False)
    eval_examples = encode_file(tok, q.eval, kind, q.max_length, False)[0] if q.eval else None
    print(f"qat data: {report}")
    if q.objective == "distill":
        from posttrain.compress.distill import frozen_bf16_copy, make_distill_objective

        objective = make_distill_objective(frozen_bf16_copy(model), loss="forward_kl", temperature=q.temperature)
    else:
        objective = get_objective(q.objective)
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_qat(model, cfg.quant)
    for name in target_linears(model, cfg.quant):
        model.get_submodule(name).parametrizations.weight.original.requires_grad_(True)
    return train(model, objective, examples, cfg.train, run_dir, pad_token_id=tok.pad_token_id,
                 eval_examples=eval_examples)
