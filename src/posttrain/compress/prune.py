"""Pruning: unstructured (magnitude, Wanda), N:M semi-structured, and structured depth/width.

Unstructured and N:M pruning keep dense tensors with zeros (no CPU speedup, see FACTS.md);
they return boolean masks (True = kept) that `keep_masks` holds through recovery training
and `bake_masks` folds back before saving. Structured pruning really removes decoder layers,
attention heads or MLP channels and updates the config, so the result is a smaller plain HF
model that loads anywhere.

Llama-family layout assumed: model.model.layers[i].self_attn.{q,k,v,o}_proj and
.mlp.{gate,up,down}_proj, with GQA (num_key_value_heads <= num_attention_heads); other layouts
(Phi3's fused projections, MoE experts) are refused up front by `check_supported`.

Activation statistics come from forward hooks over calibration batches:
- input norm per linear: ||X_j||_2 over all calibration tokens, for each input feature j
  (Wanda's score |W_ij| * ||X_j||, and the width scores of o_proj / down_proj columns);
- each decoder layer's input and output hidden states, for block influence
  (BI = 1 - cos(input, output), averaged over tokens; ShortGPT).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils import parametrize

from posttrain.config import DataConfig, StageConfig, Strict, TrainConfig

DEFAULT_SKIP = ("lm_head",)


# ----------------------------------------------------------------------------- calibration

def calibration_batches(tokenizer, texts: list[str], n_samples: int, max_length: int) -> list[dict[str, Tensor]]:
    """The first `n_samples` texts, each tokenized and truncated to `max_length`, one per batch.

    One text per batch means no padding, so every hooked activation is a real token.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples must be > 0, got {n_samples}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    batches = []
    for text in texts[:n_samples]:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < 2:
            continue
        ids = torch.tensor([ids], dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    if not batches:
        raise ValueError("calibration: no text has two or more tokens")
    return batches


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _run_calibration(model, calib: list[dict[str, Tensor]]) -> None:
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        for batch in calib:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)
    finally:
        model.train(was_training)


def decoder_layers(model) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: expected a Llama-family model with model.model.layers")
    return layers


def prunable_linears(model, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, nn.Linear]:
    """nn.Linear modules by qualified name, except names containing a `skip` pattern (the head)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)}


def input_norms(model, calib: list[dict[str, Tensor]], modules: dict[str, nn.Linear]) -> dict[str, Tensor]:
    """||X_j||_2 over every calibration token, per input feature of each module (fp32)."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float32, device=_device(model))
            for name, m in modules.items()}

    def hook(name):
        def pre(module, args):
            x = args[0].detach().float()
            sums[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        _run_calibration(model, calib)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


# ----------------------------------------------------------------------------- unstructured / N:M

def _mask_from_scores(score: Tensor, sparsity: float | None, n_m: tuple[int, int] | None, per_row: bool) -> Tensor:
    """True where a weight is kept. N:M keeps the n highest of every m consecutive inputs of a row;
    otherwise exactly round(sparsity * group size) lowest scores are dropped per row (or per matrix)."""
    rows, cols = score.shape
    if n_m is not None:
        n, m = n_m
        if cols % m:
            raise ValueError(f"N:M pruning needs in_features divisible by {m}; got {cols}")
        groups = score.reshape(rows, cols // m, m)
        keep_idx = groups.topk(n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep_idx, True)
        return mask.reshape(rows, cols)
    flat = score if per_row else score.reshape(1, -1)
    k = round(flat.shape[1] * sparsity)  # pruned per group
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        drop = flat.topk(k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask.reshape(rows, cols)


def _check_sparsity_args(sparsity: float | None, n_m: tuple[int, int] | None) -> None:
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity (unstructured) or n_m (semi-structured, e.g. (2, 4))")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if n_m is not None and not (0 < n_m[0] < n_m[1]):
        raise ValueError(f"n_m=(n, m) keeps n of every m weights and needs 0 < n < m; got {n_m}")


@torch.no_grad()
def _apply_masks(modules: dict[str, nn.Linear], masks: dict[str, Tensor]) -> None:
    for name, m in modules.items():
        m.weight.mul_(masks[name].to(m.weight.dtype))


def magnitude_prune(model, sparsity: float | None = None, *, n_m: tuple[int, int] | None = None,
                    skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, Tensor]:
    """Zero the smallest |W| of each linear (per matrix), or keep n of every m (n_m); returns masks."""
    _check_sparsity_args(sparsity, n_m)
    modules = prunable_linears(model, skip)
    masks = {name: _mask_from_scores(m.weight.detach().float().abs(), sparsity, n_m, per_row=False)
             for name, m in modules.items()}
    _apply_masks(modules, masks)
    return masks


def wanda_prune(model, calib: list[dict[str, Tensor]], sparsity: float | None = None, *,
                n_m: tuple[int, int] | None = None, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, Tensor]:
    """Wanda: score |W_ij| * ||X_j||, compared within each output row (as in the paper); returns masks.

    All statistics come from one pass over the dense model (the paper's variant that prunes
    layer by layer on already-pruned inputs differs slightly).
    """
    _check_sparsity_args(sparsity, n_m)
    modules = prunable_linears(model, skip)
    norms = input_norms(model, calib, modules)
    masks = {name: _mask_from_scores(m.weight.detach().float().abs() * norms[name][None, :], sparsity, n_m,
                                     per_row=True)
             for name, m in modules.items()}
    _apply_masks(modules, masks)
    return masks


# ----------------------------------------------------------------------------- masks in training

class _Mask(nn.Module):
    """weight -> weight * mask: pruned entries get zero gradient and stay zero whatever the optimizer does."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask.to(weight.dtype)


def keep_masks(model, masks: dict[str, Tensor]) -> None:
    """Register a mask parametrization on each masked linear's weight (undo with `bake_masks`)."""
    modules = dict(model.named_modules())
    unknown = [n for n in masks if n not in modules]
    if unknown:
        raise ValueError(f"masks name modules the model does not have: {unknown[:3]}")
    for name, mask in masks.items():
        linear = modules[name]
        if tuple(mask.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} != weight {tuple(linear.weight.shape)}")
        parametrize.register_parametrization(linear, "weight", _Mask(mask.to(linear.weight.device)))


def bake_masks(model) -> int:
    """Fold mask parametrizations into plain weights (zeros included) so save_pretrained writes
    ordinary tensors; returns how many were baked."""
    count = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, _Mask) for p in module.parametrizations["weight"]):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            count += 1
    return count


# ----------------------------------------------------------------------------- reports

def param_count(model, nonzero: bool = False) -> int:
    """Parameters (tied tensors once); with nonzero=True only the non-zero entries."""
    seen, total = set(), 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += int((p != 0).sum()) if nonzero else p.numel()
    return total


@torch.no_grad()
def sparsity_report(model, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict:
    """Zero fraction of the prunable linears (each and overall) and parameter counts."""
    layers = {}
    zeros = total = 0
    for name, m in prunable_linears(model, skip).items():
        w = m.weight
        z = int((w == 0).sum())
        layers[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return {"linear_sparsity": zeros / max(total, 1), "linear_params": total, "linear_zeros": zeros,
            "params": param_count(model), "nonzero_params": param_count(model, nonzero=True), "layers": layers}


# ----------------------------------------------------------------------------- depth

@torch.no_grad()
def layer_importance(model, calib: list[dict[str, Tensor]]) -> list[float]:
    """Block influence of each decoder layer: 1 - cos(input, output), averaged over calibration tokens.

    A layer that barely changes the residual stream scores near 0 and is the first to drop.
    """
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook(i):
        def fwd(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float(cos.sum())
            counts[i] += cos.numel()
        return fwd

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _run_calibration(model, calib)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(c, 1) for s, c in zip(sums, counts)]


def drop_layers(model, indices: list[int]):
    """Remove decoder layers in place and renumber the rest so KV caching indexes them right.

    Updates config.num_hidden_layers, config.layer_types (when present) and each remaining
    attention module's layer_idx. Returns the model.
    """
    layers = decoder_layers(model)
    n = len(layers)
    drop = sorted({int(i) for i in indices})
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a {n}-layer model")
    if len(drop) >= n:
        raise ValueError(f"cannot drop all {n} layers")
    keep = [i for i in range(n) if i not in drop]
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def prune_depth(model, calib: list[dict[str, Tensor]], n_drop: int | None = None,
                ratio: float | None = None) -> tuple[object, dict]:
    """Drop the `n_drop` (or round(ratio * layers)) layers of lowest block influence."""
    n = len(decoder_layers(model))
    if (n_drop is None) == (ratio is None):
        raise ValueError("prune_depth: give exactly one of n_drop or ratio")
    if n_drop is None:
        if not 0 < ratio < 1:
            raise ValueError(f"prune_depth: ratio must be in (0, 1), got {ratio}")
        n_drop = round(ratio * n)
    if not 0 < n_drop < n:
        raise ValueError(f"prune_depth: n_drop must be in 1..{n - 1} for a {n}-layer model, got {n_drop}")
    scores = layer_importance(model, calib)
    dropped = sorted(sorted(range(n), key=lambda i: scores[i])[:n_drop])
    drop_layers(model, dropped)
    return model, {"scores": scores, "dropped": dropped, "layers_before": n, "layers_after": n - n_drop}


# ----------------------------------------------------------------------------- width

def _new_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _slice_rows(lin: nn.Linear, idx: Tensor) -> nn.Linear:
    return _new_linear(lin.weight.detach()[idx], None if lin.bias is None else lin.bias.detach()[idx])


def _slice_cols(lin: nn.Linear, idx: Tensor) -> nn.Linear:
    return _new_linear(lin.weight.detach()[:, idx], None if lin.bias is None else lin.bias.detach())


def _check_ratio(ratio: float, what: str) -> None:
    if not 0 < ratio < 1:
        raise ValueError(f"{what}: ratio must be in (0, 1), got {ratio}")


def prune_mlp(model, calib: list[dict[str, Tensor]], ratio: float) -> tuple[object, dict]:
    """Remove round(ratio * intermediate) MLP channels in every layer (same count everywhere, so
    config.intermediate_size stays one number).

    Channel j of a layer scores ||X_j|| * ||W_down[:, j]||: how much it can add to the output,
    with X the calibration inputs of down_proj (activation-aware, like Wanda per channel).
    """
    _check_ratio(ratio, "prune_mlp")
    layers = decoder_layers(model)
    inter = layers[0].mlp.down_proj.in_features
    keep_n = inter - round(ratio * inter)
    if keep_n < 1 or keep_n == inter:
        raise ValueError(f"prune_mlp: ratio {ratio} of {inter} channels removes {inter - keep_n}; need 1..{inter - 1}")
    downs = {f"layer{i}": layer.mlp.down_proj for i, layer in enumerate(layers)}
    norms = input_norms(model, calib, downs)
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        score = norms[f"layer{i}"] * mlp.down_proj.weight.detach().float().norm(dim=0)
        keep = score.topk(keep_n).indices.sort().values
        mlp.gate_proj = _slice_rows(mlp.gate_proj, keep)
        mlp.up_proj = _slice_rows(mlp.up_proj, keep)
        mlp.down_proj = _slice_cols(mlp.down_proj, keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_n
    model.config.intermediate_size = keep_n
    return model, {"intermediate_before": inter, "intermediate_after": keep_n}


def prune_heads(model, calib: list[dict[str, Tensor]], ratio: float,
                unit: Literal["query", "group"] = "query") -> tuple[object, dict]:
    """Remove attention heads in every layer, keeping the GQA grouping uniform.

    unit="query": drop round(ratio * q_per_group) query heads from every kv group (k/v stay);
    unit="group": drop round(ratio * kv_heads) whole kv groups with their query heads.
    Head h scores sum over its channels c of ||X_c|| * ||W_o[:, c]|| (X: o_proj inputs); a
    group scores the sum of its heads. Sets num_attention_heads, num_key_value_heads and an
    explicit head_dim in the config.
    """
    _check_ratio(ratio, "prune_heads")
    if unit not in ("query", "group"):
        raise ValueError(f"prune_heads: unit must be 'query' or 'group', got {unit!r}")
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = decoder_layers(model)
    head_dim = layers[0].self_attn.head_dim
    per_group = heads // kv
    if unit == "query":
        remove = round(ratio * per_group)
        if not 0 < remove < per_group:
            raise ValueError(f"prune_heads: ratio {ratio} of {per_group} query heads per kv group removes {remove}; "
                             f"need 1..{per_group - 1} (or unit='group')")
        new_heads, new_kv = kv * (per_group - remove), kv
    else:
        remove = round(ratio * kv)
        if not 0 < remove < kv:
            raise ValueError(f"prune_heads: ratio {ratio} of {kv} kv groups removes {remove}; need 1..{kv - 1}")
        new_heads, new_kv = (kv - remove) * per_group, kv - remove
    outs = {f"layer{i}": layer.self_attn.o_proj for i, layer in enumerate(layers)}
    norms = input_norms(model, calib, outs)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        chan = norms[f"layer{i}"] * attn.o_proj.weight.detach().float().norm(dim=0)
        head_score = chan.reshape(heads, head_dim).sum(1).reshape(kv, per_group)
        if unit == "query":
            keep_in_group = head_score.topk(per_group - remove, dim=1).indices.sort(dim=1).values
            keep_heads = (keep_in_group + torch.arange(kv, device=chan.device)[:, None] * per_group).reshape(-1)
            keep_kv = torch.arange(kv, device=chan.device)
        else:
            keep_kv = head_score.sum(1).topk(kv - remove).indices.sort().values
            keep_heads = (keep_kv[:, None] * per_group + torch.arange(per_group, device=chan.device)).reshape(-1)
        q_idx = (keep_heads[:, None] * head_dim + torch.arange(head_dim, device=chan.device)).reshape(-1)
        kv_idx = (keep_kv[:, None] * head_dim + torch.arange(head_dim, device=chan.device)).reshape(-1)
        attn.q_proj = _slice_rows(attn.q_proj, q_idx)
        attn.o_proj = _slice_cols(attn.o_proj, q_idx)
        attn.k_proj = _slice_rows(attn.k_proj, kv_idx)
        attn.v_proj = _slice_rows(attn.v_proj, kv_idx)
        attn.num_key_value_groups = new_heads // new_kv
        for name, value in (("num_heads", new_heads), ("num_key_value_heads", new_kv)):
            if hasattr(attn, name):
                setattr(attn, name, value)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = new_heads, new_kv, head_dim
    return model, {"heads_before": heads, "heads_after": new_heads, "kv_heads_before": kv,
                   "kv_heads_after": new_kv, "head_dim": head_dim, "unit": unit}


# ----------------------------------------------------------------------------- the stage

METHODS = ("magnitude", "wanda", "magnitude-2:4", "wanda-2:4", "depth", "width-mlp", "width-heads")


class CalibrationConfig(Strict):
    path: str = Field("data/general/text.jsonl", description="JSONL of {text} rows")
    n_samples: int = Field(32, gt=0, description="texts used (one sequence each)")
    max_length: int = Field(512, ge=2)


class DistillSettings(Strict):
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixing weight")


class RecoveryConfig(Strict):
    """Post-training after pruning, through the one loop; eval_loss over tokens feeds the P2 fit."""

    objective: Literal["sft", "pretrain", "distill"] = "pretrain"
    data: DataConfig
    train: TrainConfig = TrainConfig(eval_every=10)
    distill: DistillSettings = DistillSettings()

    @model_validator(mode="after")
    def _check(self) -> RecoveryConfig:
        if not (self.data.eval or self.data.eval_fraction):
            raise ValueError("recovery.data: give eval or eval_fraction; the eval loss curve is what recovery "
                             "is measured by (and what the P2 fit reads)")
        if not self.train.eval_every:
            raise ValueError("recovery.train.eval_every is needed: the eval loss is logged over tokens at that interval")
        if self.objective == "pretrain" and self.data.kind not in (None, "text"):
            raise ValueError(f"recovery.data.kind: objective pretrain trains on raw text; got {self.data.kind!r}")
        return self


class PruneConfig(StageConfig):
    stage: Literal["prune"] = "prune"
    output_dir: str = "runs/prune"
    method: Literal["magnitude", "wanda", "magnitude-2:4", "wanda-2:4", "depth", "width-mlp", "width-heads"]
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction removed: weights (magnitude/wanda), layers "
                                "(depth), MLP channels (width-mlp), query heads or kv groups (width-heads)")
    n_drop: int | None = Field(None, gt=0, description="depth only: layers to drop (instead of ratio)")
    head_unit: Literal["query", "group"] = "query"
    calibration: CalibrationConfig = CalibrationConfig()
    eval: str | None = Field(None, description="text/chat file for the loss before/after pruning when no recovery")
    eval_max_length: int = Field(512, gt=8)
    recovery: RecoveryConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        m = self.method
        if m.endswith("2:4"):
            if self.ratio is not None:
                raise ValueError(f"ratio: method {m} prunes 2 of every 4 weights (ratio 0.5); leave ratio unset")
        elif m == "depth":
            if (self.ratio is None) == (self.n_drop is None):
                raise ValueError("method depth: give exactly one of ratio or n_drop")
        elif self.ratio is None:
            raise ValueError(f"ratio: method {m} needs a ratio in (0, 1)")
        if self.n_drop is not None and m != "depth":
            raise ValueError(f"n_drop applies to method depth only, not {m}")
        if self.head_unit != "query" and m != "width-heads":
            raise ValueError(f"head_unit applies to method width-heads only, not {m}")
        if self.recovery is not None and self.eval is not None:
            raise ValueError("eval: with a recovery section the eval set is recovery.data.eval (or eval_fraction); "
                             "leave the top-level eval unset")
        return self


def _eval_as_lm(objective):
    """Train with `objective`, but evaluate the next-token loss: the loop evaluates with the model in
    eval mode, and the P2 fit compares eval losses with L0, the unpruned model's next-token loss."""
    from posttrain.train.objectives import causal_lm_loss

    def loss(model, batch):
        return objective(model, batch) if model.training else causal_lm_loss(model, batch)

    return loss


def lm_eval_loss(model, examples: list[dict], cfg: TrainConfig, pad_token_id: int) -> float:
    """Token-mean next-token loss over `examples`, computed exactly as the loop's evaluation."""
    from posttrain.train.loop import evaluate_loss, make_accelerator, make_collate
    from posttrain.train.objectives import causal_lm_loss

    acc = make_accelerator("no")
    collate = make_collate(cfg.packing, pad_token_id, None)
    return evaluate_loss(model, causal_lm_loss, examples, cfg, collate, acc)


def unsupported_reason(model, method: str) -> str | None:
    """Why `method` cannot prune this architecture exactly, or None if it can.

    Unstructured/N:M methods prune nn.Linear weights, so a MoE whose experts are stacked 3-D
    parameters (transformers 5) would keep most of its weights; width-mlp slices separate
    gate/up/down projections and width-heads separate q/k/v/o ones (Phi3 fuses them).
    """
    model_type = getattr(model.config, "model_type", None)
    layers = decoder_layers(model)
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    if experts and method not in ("depth", "width-heads"):  # heads: attention Linears only, experts untouched
        return (f"{model_type} keeps its MoE experts as stacked 3-D parameters ({experts[0]}, ...), which {method} "
                "does not prune (it handles nn.Linear layers only); use method depth")
    if method == "width-mlp":
        mlp = layers[0].mlp
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            return (f"width-mlp slices separate mlp.gate_proj/up_proj/down_proj Linears; {model_type}'s MLP is a "
                    f"{type(mlp).__name__} ({', '.join(n for n, _ in mlp.named_children())})")
    if method == "width-heads":
        attn = layers[0].self_attn
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return (f"width-heads slices separate self_attn.q_proj/k_proj/v_proj/o_proj Linears; {model_type}'s "
                    f"attention is a {type(attn).__name__} ({', '.join(n for n, _ in attn.named_children())})")
    return None


def check_supported(model, method: str) -> None:
    """Refuse, before any work, a method that cannot prune this architecture (see unsupported_reason)."""
    why = unsupported_reason(model, method)
    if why is not None:
        raise ValueError(f"prune: method {method!r} is not supported for model type "
                         f"{getattr(model.config, 'model_type', None)!r}: {why}")


def apply_method(model, cfg: PruneConfig, calib: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor] | None, dict]:
    """Prune per cfg.method; returns (masks or None for structured methods, info)."""
    m = cfg.method
    check_supported(model, m)
    if m == "magnitude":
        return magnitude_prune(model, cfg.ratio), {"ratio": cfg.ratio}
    if m == "wanda":
        return wanda_prune(model, calib, cfg.ratio), {"ratio": cfg.ratio}
    if m == "magnitude-2:4":
        return magnitude_prune(model, n_m=(2, 4)), {"ratio": 0.5}
    if m == "wanda-2:4":
        return wanda_prune(model, calib, n_m=(2, 4)), {"ratio": 0.5}
    if m == "depth":
        _, info = prune_depth(model, calib, n_drop=cfg.n_drop, ratio=None if cfg.n_drop else cfg.ratio)
        return None, {"ratio": len(info["dropped"]) / info["layers_before"], **info}
    if m == "width-mlp":
        _, info = prune_mlp(model, calib, cfg.ratio)
        return None, {"ratio": 1 - info["intermediate_after"] / info["intermediate_before"], **info}
    _, info = prune_heads(model, calib, cfg.ratio, unit=cfg.head_unit)
    removed = (1 - info["heads_after"] / info["heads_before"])
    return None, {"ratio": removed, **info}


def run_prune(cfg: PruneConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Load, measure L0, prune, measure, optionally recover through the loop, save final/; returns the manifest."""
    from posttrain.data.examples import encode_file, with_held_out
    from posttrain.eval.suite import write_reports
    from posttrain.eval.tasks import load_texts
    from posttrain.models import save_model
    from posttrain.stage import stage_inputs, start_stage

    rec = cfg.recovery
    train_cfg = rec.train if rec else TrainConfig()
    run = start_stage(cfg, resume, overwrite, seed=train_cfg.seed)
    model, tokenizer, run_dir = run.model, run.tokenizer, run.run_dir
    check_supported(model, cfg.method)
    pad = tokenizer.pad_token_id

    examples = eval_examples = None
    data_report = None
    if rec:
        kind = "text" if rec.objective == "pretrain" else rec.data.kind
        examples, eval_examples, data_report = with_held_out(  # recovery.data has eval or eval_fraction
            rec.data, train_cfg.seed,
            lambda path, _: encode_file(tokenizer, path, kind, rec.data.max_length, rec.data.skip_invalid))
    elif cfg.eval:
        eval_examples, _ = encode_file(tokenizer, cfg.eval, None, cfg.eval_max_length, False)

    before = run.cached("prune_before.json", lambda: {
        "params": param_count(model), "nonzero_params": param_count(model, nonzero=True),
        "L0": lm_eval_loss(model, eval_examples, train_cfg, pad) if eval_examples else None})
    print(f"before pruning: {before}")

    teacher = None
    if rec and rec.objective == "distill":
        from posttrain.compress.distill import frozen_bf16_copy

        teacher = frozen_bf16_copy(model)

    texts = load_texts(cfg.calibration.path)
    calib = calibration_batches(tokenizer, texts, cfg.calibration.n_samples, cfg.calibration.max_length)
    t0 = time.perf_counter()
    masks, info = apply_method(model, cfg, calib)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    report = sparsity_report(model)
    after_prune = {"params": report["params"], "nonzero_params": report["nonzero_params"],
                   "linear_sparsity": report["linear_sparsity"],
                   "loss": lm_eval_loss(model, eval_examples, train_cfg, pad) if eval_examples else None}
    print(f"after pruning ({cfg.method}): {after_prune}")

    train_summary = None
    if rec:
        from posttrain.train.loop import train
        from posttrain.train.objectives import get_objective

        if masks is not None:
            keep_masks(model, masks)
        if rec.objective == "distill":
            from posttrain.compress.distill import make_distill_objective

            objective = _eval_as_lm(make_distill_objective(teacher, loss=rec.distill.loss,
                                                           temperature=rec.distill.temperature, beta=rec.distill.beta))
        else:
            objective = get_objective(rec.objective)
        model, train_summary = train(model, objective, examples, rec.train, run_dir, pad_token_id=pad,
                                     eval_examples=eval_examples, resume=resume)
        if masks is not None:
            bake_masks(model)
        write_reports(run_dir, {}, {})
    final_report = sparsity_report(model)
    save_model(model, tokenizer, run_dir / "final")

    params_before = before["params"]
    outputs = {
        "pruning": {
            "method": cfg.method, "ratio": info["ratio"],
            "params_before": params_before, "params_after": final_report["params"],
            "nonzero_params_after": final_report["nonzero_params"],
            "param_reduction": 1 - final_report["nonzero_params"] / before["nonzero_params"],
            "linear_sparsity": final_report["linear_sparsity"],
            "calibration_samples": len(calib), **{k: v for k, v in info.items() if k != "ratio"},
        },
        "L0": before["L0"],
        "loss_after_prune": after_prune["loss"],
        "recovery": train_summary,
        "data": data_report,
    }
    data_inputs = {"calibration": cfg.calibration.path}
    if rec:
        data_inputs.update(train=rec.data.train, eval=rec.data.eval)
    elif cfg.eval:
        data_inputs["eval"] = cfg.eval
    return run.finish(stage_inputs(cfg.model.name, data_inputs), outputs)
