"""RL objectives for language models: advantages, KL to the reference, policy and value losses.

Shapes: per-token tensors are ``[B, T]`` over the response tokens of each rollout, right
padded, with ``mask`` 1 on real response tokens. Sequence-level tensors are ``[B]``.

Advantage estimators live in a registry: a new one is a function decorated with
``@ADVANTAGES.register("name")``, ``fn(data, cfg) -> (advantages [B, T], returns [B, T] or None)``
over the rollout batch's tensors (`scores`, `token_rewards`, `values`, `mask`, `group`).

- PPO (Ouyang et al. 2022; Ziegler et al. 2019): token rewards = score at the last token
  minus kl_coef * KL per token; GAE over the critic's values; clipped surrogate; clipped
  value loss; fixed or adaptive KL coefficient.
- GRPO (Shao et al. 2024): k samples per prompt, advantage = (score - group mean) / group
  std on every token; KL to the reference in the loss (k3 estimator), clipping.
- RLOO (Ahmadian et al. 2024): advantage = score - mean of the other k-1 samples' scores.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from posttrain.registry import Registry

ADVANTAGES: Registry[Callable] = Registry("advantage estimator")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise to unit variance over the masked entries (and zero mean unless shift_mean=False)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probs (Schulman's k1/k2/k3).

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2;
    k3 = exp(log q - log p) - (log q - log p) - 1 (unbiased, always >= 0; GRPO's choice).
    """
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff**2
    if kind == "k3":
        neg = (-diff).clamp(max=20.0)  # exp overflow guard; the true value is huge either way
        return torch.exp(neg) - neg - 1
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")


def last_token_mask(mask: Tensor) -> Tensor:
    """1 at each row's last response token."""
    idx = (mask.sum(1).long() - 1).clamp(min=0)
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0]), idx] = mask[torch.arange(mask.shape[0]), idx]
    return out


def token_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor | None, mask: Tensor, kl_coef: float,
                  kind: str = "k1") -> tuple[Tensor, Tensor]:
    """PPO's per-token reward: -kl_coef * KL on every token, + the sequence score on the last one.

    Returns (rewards [B, T], kl [B, T]).
    """
    kl = kl_estimate(logp, ref_logp, kind) * mask if ref_logp is not None else torch.zeros_like(logp)
    rewards = -kl_coef * kl + scores[:, None].to(logp.dtype) * last_token_mask(mask)
    return rewards * mask, kl


@ADVANTAGES.register("gae")
def gae_advantages(data: dict, cfg) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the critic's values."""
    rewards, values, mask = data["token_rewards"], data["values"], data["mask"].to(data["values"].dtype)
    gamma, lam = cfg.gamma, cfg.lam
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)
        adv[:, t] = last
    adv = adv * mask
    returns = (adv + values) * mask
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    return adv, returns


def _groups(group: Tensor) -> list[Tensor]:
    return [(group == g).nonzero().squeeze(1) for g in group.unique()]


@ADVANTAGES.register("grpo")
def grpo_advantages(data: dict, cfg) -> tuple[Tensor, None]:
    """(score - group mean) / (group std + eps), the same on every token of a response."""
    scores, group, mask = data["scores"].float(), data["group"], data["mask"]
    adv = torch.zeros_like(scores)
    for idx in _groups(group):
        s = scores[idx]
        centred = s - s.mean()
        adv[idx] = centred / (s.std(unbiased=True) + cfg.eps) if cfg.scale_by_std and len(idx) > 1 else centred
    return adv[:, None] * mask, None


@ADVANTAGES.register("rloo")
def rloo_advantages(data: dict, cfg) -> tuple[Tensor, None]:
    """score - mean of the other samples of the same prompt (leave-one-out baseline)."""
    scores, group, mask = data["scores"].float(), data["group"], data["mask"]
    adv = torch.zeros_like(scores)
    for idx in _groups(group):
        s, k = scores[idx], len(idx)
        if k < 2:
            raise ValueError("RLOO needs at least 2 samples per prompt (sampling.samples_per_prompt >= 2)")
        adv[idx] = s - (s.sum() - s) / (k - 1)
    return adv[:, None] * mask, None


def compute_advantages(name: str, data: dict, cfg) -> tuple[Tensor, Tensor | None]:
    """Advantages and returns from the estimator registered as `name` (ValueError naming the choices)."""
    return ADVANTAGES.get(name)(data, cfg)


def policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, clip: float,
                is_weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate, token mean over the batch; `is_weight` multiplies it per token
    (truncated importance sampling between the rollout's and the trainer's old log-probs)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if is_weight is not None:
        per_token = per_token * is_weight
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                   "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask).item(),
                   "ratio_max": (ratio * mask).max().item()}
    return loss, metrics


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> tuple[Tensor, dict]:
    """Clipped value loss: max of the squared errors with and without clipping around the old values."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        frac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask).item()
    return loss, {"value_clipfrac": frac}


class AdaptiveKL:
    """Ziegler et al.'s controller: move kl_coef so the observed KL tracks `target` over `horizon` samples."""

    def __init__(self, init: float, target: float | None, horizon: int = 10_000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, observed_kl: float, n: int) -> float:
        if self.target is not None and math.isfinite(observed_kl):
            error = max(-0.2, min(0.2, observed_kl / self.target - 1))
            self.value *= 1 + error * n / self.horizon
        return self.value
