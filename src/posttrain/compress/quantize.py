"""Quantization stage: post-training (PTQ, optionally AWQ-scaled) and quantization-aware training (QAT).

The integer modules, the int8/int4 formats and the checkpoint directory they are saved in
live in `posttrain.quantized` (a model format the loader and the native decoder read); this
module decides what to quantize and produces that format. The tied embedding / LM head of
small models is a large share of the bytes (113 MB of the default model's 538 MB in fp32),
so it is quantized too (int8 per row) unless `embeddings: none`.

QAT registers a fake-quant parametrization on each target weight: the forward sees
exactly the weights `quantize_model` will produce (same function), the backward is
the straight-through estimator. `convert_qat` removes the parametrizations and
quantizes, so the converted model computes what the QAT model was trained to compute.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from posttrain.config import StageConfig, Strict, TrainConfig
from posttrain.eval.suite import EvalConfig
from posttrain.quantized import (
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    ScaledEmbedding,
    dequantize_int4,
    dequantize_int8,
    head_name,
    matches_spec,
    quantize_int4,
    quantize_int8,
    save_quantized,
    set_submodule,
    target_linears,
    tied_head,
)


def fake_quantize(w: Tensor, weights: str, group_size: int | None) -> Tensor:
    """The weights `quantize_model` would store, dequantized (no gradient path)."""
    if weights == "int8":
        return dequantize_int8(*quantize_int8(w, group_size), dtype=w.dtype)
    return dequantize_int4(*quantize_int4(w, group_size), dtype=w.dtype)


# ----------------------------------------------------------------------------- model level


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


def float_experts(model: nn.Module) -> list[str]:
    """Names of stacked (3-D) expert weights, as transformers 5 stores MoE experts: not nn.Linear."""
    return [n for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in f".{n}"]


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace target linears (and embeddings) in place with integer modules; returns the model."""
    if hasattr(model, "peft_config"):
        raise ValueError("quantize: the model carries PEFT adapters; merge them first (posttrain merge)")
    tied = is_tied(model)
    names = target_linears(model, spec)
    experts = float_experts(model)
    if experts:
        logging.getLogger("posttrain").warning(
            "quantize: %s keeps %d MoE expert weight tensors (%s, ...) in float: only nn.Linear layers are "
            "quantized, and its experts are stacked 3-D parameters", getattr(model.config, "model_type", None),
            len(experts), experts[0])
    check_groups(model, names, spec)
    for name in names:
        set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), spec.mode, spec.group_size))
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
        if isinstance(m, QuantLinear) and name != head_name(model):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
            lin.weight.data = m.dequantized(dtype)
            if m.bias is not None:
                lin.bias.data = m.bias.data.to(dtype)
            set_submodule(model, name, lin)
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        plain = (nn.Embedding(emb.num_embeddings, emb.embedding_dim, dtype=dtype) if emb.embed_scale == 1.0
                 else ScaledEmbedding(emb.num_embeddings, emb.embedding_dim, emb.embed_scale, dtype=dtype))
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
            if not all(matches_spec(n, spec) for n in _names(model, linears)):
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
