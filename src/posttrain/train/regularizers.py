"""Regularizers against catastrophic forgetting: EWC (elastic weight consolidation).

EWC keeps the parameters that mattered for earlier data near their old values:
penalty = sum_i F_i (theta_i - theta*_i)^2, with F the diagonal Fisher estimated on
reference data and theta* the parameters before the new training (the loop multiplies
by weight/2). Everything is keyed by `model.named_parameters()` names of *trainable*
parameters, so it works the same for full, freeze and PEFT-wrapped models; a key
mismatch raises instead of silently giving a zero penalty.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from posttrain.fileio import atomic_write

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]
EWC_FORMAT = "posttrain-ewc"


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fisher_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[dict],
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over batches of squared gradients (fp32, CPU).

    Gradients are of each batch's loss (not per example), the usual cheap estimate.
    Runs in eval mode (no dropout) and leaves no gradients behind on the model.
    """
    params = _trainable(model)
    if not params:
        raise ValueError("fisher_diagonal: the model has no trainable parameters")
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            for p in params.values():
                p.grad = None
            loss, _ = loss_fn(model, batch)
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float().pow(2).cpu()
            count += 1
    finally:
        for p in params.values():
            p.grad = None
        model.train(was_training)
    if count == 0:
        raise ValueError("fisher_diagonal: no batches given; the Fisher needs reference data")
    return {n: f / count for n, f in fisher.items()}


def anchor_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies of the trainable parameters: theta* for the penalty."""
    return {n: p.detach().float().cpu().clone() for n, p in _trainable(model).items()}


def ewc_penalty(model: nn.Module, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over the Fisher's parameters (fp32 scalar, differentiable).

    Raises when a Fisher key is not a trainable parameter of `model` (e.g. a Fisher
    computed before PEFT wrapping, whose names lack `base_model.model.`).
    """
    params = _trainable(model)
    missing = [k for k in fisher if k not in params]
    if missing:
        hint = next(iter(params), None)
        what = "none" if len(missing) == len(fisher) else f"{len(missing)} of {len(fisher)}"
        raise KeyError(
            f"ewc_penalty: {what} of the Fisher keys match trainable parameters of the model "
            f"(first missing: {missing[0]!r}; a model key looks like {hint!r}). The Fisher must be "
            "computed on the model as it is trained (same adapter wrapping, same frozen parameters)."
        )
    no_anchor = [k for k in fisher if k not in anchor]
    if no_anchor:
        raise KeyError(f"ewc_penalty: anchor lacks {len(no_anchor)} Fisher keys, e.g. {no_anchor[0]!r}")
    total = None
    for name, f in fisher.items():
        p = params[name]
        if f.shape != p.shape or anchor[name].shape != p.shape:
            raise ValueError(
                f"ewc_penalty: shape mismatch for {name}: param {tuple(p.shape)}, "
                f"fisher {tuple(f.shape)}, anchor {tuple(anchor[name].shape)}"
            )
        f = f.to(p.device, torch.float32)
        term = (f * (p.float() - anchor[name].to(p.device, torch.float32)).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("ewc_penalty: empty Fisher")
    return total


def save_ewc_state(path: str | os.PathLike, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> None:
    """Write Fisher and anchor to one safetensors file, atomically."""
    from safetensors.torch import save_file

    if set(fisher) - set(anchor):
        raise ValueError("save_ewc_state: every Fisher key needs an anchor")
    tensors = {f"fisher/{k}": v.detach().float().cpu().contiguous() for k, v in fisher.items()}
    tensors |= {f"anchor/{k}": v.detach().float().cpu().contiguous() for k, v in anchor.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": EWC_FORMAT, "version": "1"}))


def load_ewc_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read (fisher, anchor) written by save_ewc_state."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EWC state not found: {path}")
    fisher, anchor = {}, {}
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") != EWC_FORMAT:
            raise ValueError(f"{path}: not an EWC state file (metadata format != {EWC_FORMAT!r})")
        for key in f.keys():
            kind, _, name = key.partition("/")
            if kind not in ("fisher", "anchor") or not name:
                raise ValueError(f"{path}: unexpected tensor {key!r} in an EWC state file")
            (fisher if kind == "fisher" else anchor)[name] = f.get_tensor(key)
    if not fisher or set(fisher) - set(anchor):
        raise ValueError(f"{path}: EWC state has no Fisher or Fisher keys without an anchor")
    return fisher, anchor
