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
- REINFORCE++ (Hu 2025): KL in the token rewards, returns-to-go, normalised over the whole
  batch (a global baseline instead of a per-prompt one); `reinforce_pp_baseline` subtracts the
  group mean first.

Policy losses live in `POLICY_LOSSES`: ``fn(logp, old_logp, adv, rows, cfg) -> (per-token loss,
metrics)`` over the flat tokens of a packed micro-batch (`rows`: each token's sequence). How the
per-token losses are averaged is `aggregation_weights` (token-mean = DAPO, the default;
seq-mean-token-mean = the GRPO paper; seq-mean-token-sum-norm = Dr. GRPO).
- ppo: the clipped surrogate, with clip-higher (DAPO: eps_high > eps_low).
- gspo (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its token
  ratios, clipped (GSPO's own eps are ~3e-4 / 4e-4).
- cispo (MiniMax-M1, 2025): REINFORCE on every token with the importance weight clipped and
  detached, so clipped tokens still get a gradient.
Rollout corrections: truncated IS (`tis_weights`) and masked IS (`mis_mask`: sequences whose
trainer/rollout drift is beyond a threshold leave the loss); DAPO's overlong shaping
(`overlong_penalty`) and dynamic sampling (`informative_groups`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from posttrain.registry import Registry

ADVANTAGES: Registry[Callable] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable] = Registry("policy loss")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


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


def _returns_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp_advantages(data: dict, cfg) -> tuple[Tensor, None]:
    """REINFORCE++: returns-to-go of the token rewards (score on the last token minus the KL
    penalty on each), whitened over every token of the batch."""
    mask = data["mask"].to(torch.float32)
    returns = _returns_to_go(data["token_rewards"].float(), mask, cfg.gamma)
    return whiten(returns, mask), None


@ADVANTAGES.register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(data: dict, cfg) -> tuple[Tensor, None]:
    """REINFORCE++-baseline: the group-mean score subtracted first (token rewards keep their KL
    penalty), then whitened over the batch: a per-prompt baseline with a global scale."""
    mask = data["mask"].to(torch.float32)
    scores, group = data["scores"].float(), data["group"]
    centred = scores.clone()
    for idx in _groups(group):
        centred[idx] = scores[idx] - scores[idx].mean()
    rewards = data["token_rewards"].float() + ((centred - scores)[:, None] * last_token_mask(mask))
    return whiten(_returns_to_go(rewards, mask, cfg.gamma), mask), None


def compute_advantages(name: str, data: dict, cfg) -> tuple[Tensor, Tensor | None]:
    """Advantages and returns from the estimator registered as `name` (ValueError naming the choices)."""
    return ADVANTAGES.get(name)(data, cfg)


def _clip_range(cfg) -> tuple[float, float]:
    low = cfg.clip
    return low, cfg.clip_high if getattr(cfg, "clip_high", None) is not None else low


def _clipped_surrogate(ratio: Tensor, adv: Tensor, logp: Tensor, old_logp: Tensor, cfg) -> tuple[Tensor, dict]:
    """max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) per token, with the clip metrics."""
    low, high = _clip_range(cfg)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - low, 1 + high)
    with torch.no_grad():
        metrics = {"clipfrac": (clipped > unclipped).float().mean().item(),
                   "approx_kl": (0.5 * (logp - old_logp) ** 2).mean().item(), "ratio_max": ratio.max().item()}
    return torch.maximum(unclipped, clipped), metrics


@POLICY_LOSSES.register("ppo")
def ppo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, rows: Tensor, cfg) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate on each token's own ratio (clip-higher when eps_high > eps_low)."""
    return _clipped_surrogate(torch.exp(logp - old_logp), adv, logp, old_logp, cfg)


def _per_row_mean(x: Tensor, rows: Tensor) -> Tensor:
    """Mean of x over each row's tokens, broadcast back to its tokens."""
    rows = rows.long()
    n = int(rows.max()) + 1 if rows.numel() else 0
    sums = torch.zeros(n, dtype=x.dtype).index_add(0, rows, x)
    counts = torch.zeros(n, dtype=x.dtype).index_add(0, rows, torch.ones_like(x))
    return (sums / counts.clamp(min=1))[rows]


@POLICY_LOSSES.register("gspo")
def gspo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, rows: Tensor, cfg) -> tuple[Tensor, dict]:
    """GSPO-token: s = exp(mean over the sequence of log r) (its value), with each token's own
    gradient path (s * exp(logp - sg(logp))); clipped like PPO at the sequence level."""
    log_s = _per_row_mean(logp - old_logp, rows)
    return _clipped_surrogate(torch.exp(log_s.detach() + logp - logp.detach()), adv, logp, old_logp, cfg)


@POLICY_LOSSES.register("cispo")
def cispo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, rows: Tensor, cfg) -> tuple[Tensor, dict]:
    """CISPO: -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log p: every token keeps a gradient,
    the importance weight is bounded instead of the update being zeroed."""
    low, high = _clip_range(cfg)
    ratio = torch.exp(logp - old_logp).detach()
    weight = ratio.clamp(1 - low, 1 + high)
    with torch.no_grad():
        metrics = {"clipfrac": (weight != ratio).float().mean().item(),
                   "approx_kl": (0.5 * (logp - old_logp) ** 2).mean().item(), "ratio_max": ratio.max().item()}
    return -weight * adv * logp, metrics


def policy_loss(name: str, logp: Tensor, old_logp: Tensor, adv: Tensor, rows: Tensor, cfg,
                weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """The registered loss `name`, averaged over the tokens with per-token `weight` (aggregation
    weights times importance corrections; the mean of weight * loss is the objective)."""
    per_token, metrics = POLICY_LOSSES.get(name)(logp, old_logp, adv, rows, cfg)
    if weight is not None:
        per_token = per_token * weight
    return per_token.mean() if per_token.numel() else per_token.sum(), metrics


def aggregation_weights(mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    """Per-token weights w [B, T] such that the token mean of w * loss over the batch is:
    token-mean: the mean over all tokens (long replies weigh more; DAPO);
    seq-mean-token-mean: the mean over sequences of each sequence's token mean (GRPO paper);
    seq-mean-token-sum-norm: each sequence's token sum over a constant `max_len`, averaged over
    sequences (Dr. GRPO: no length bias)."""
    mask = mask.to(torch.float32)
    n, rows = mask.sum().clamp(min=1), mask.shape[0]
    if mode == "token-mean":
        return mask.clone()
    if mode == "seq-mean-token-mean":
        return mask * n / (rows * mask.sum(1, keepdim=True).clamp(min=1))
    if mode == "seq-mean-token-sum-norm":
        if not max_len:
            raise ValueError("seq-mean-token-sum-norm needs the maximum response length")
        return mask * n / (rows * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose {', '.join(LOSS_AGGREGATIONS)}")


def tis_weights(trainer_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling: min(p_trainer / p_rollout, cap) per token (Yao et al. 2025)."""
    return torch.exp(trainer_logp - rollout_logp).clamp(max=cap) * mask


def mis_mask(trainer_logp: Tensor, rollout_logp: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Masked importance sampling: 0 on every token of a sequence whose geometric-mean ratio
    p_trainer / p_rollout lies outside [1/threshold, threshold], else 1: a sequence the sampler
    drew from a visibly different distribution leaves the loss instead of being reweighted."""
    mask = mask.to(torch.float32)
    log_ratio = ((trainer_logp - rollout_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)
    keep = log_ratio.abs() <= math.log(threshold)
    return mask * keep[:, None].to(mask.dtype)


def flat_rollout_correction(trainer_logp: Tensor, rollout_logp: Tensor, rows: Tensor, tis_cap: float | None,
                            mis_threshold: float | None) -> tuple[Tensor, Tensor]:
    """`tis_weights` x `mis_mask` over the flat tokens of a packed micro-batch (`rows`: each
    token's sequence; a sequence is never split across micro-batches), for an update whose own
    forward gives the trainer's log-probs (no separate pass). Returns (per-token weight, per-token
    keep 1/0 of MIS). Pass detached log-probs: the weights are constants of the loss."""
    weight = torch.exp(trainer_logp - rollout_logp).clamp(max=tis_cap) if tis_cap is not None \
        else torch.ones_like(trainer_logp)
    keep = torch.ones_like(trainer_logp)
    if mis_threshold is not None:
        keep = (_per_row_mean(trainer_logp - rollout_logp, rows).abs() <= math.log(mis_threshold)).to(keep.dtype)
    return weight * keep, keep


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to
    -factor at max_len (a reply cut at the limit gets the whole -factor)."""
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -factor * (over / buffer).clamp(max=1.0)


def informative_groups(scores: Tensor, group: Tensor) -> list[int]:
    """DAPO's dynamic sampling: the ids of the groups whose rewards are not all equal (a group
    with one reward has zero advantage everywhere and only dilutes the batch)."""
    return [int(g) for g in group.unique() if scores[group == g].unique().numel() > 1]


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
