"""The DPO family: sigmoid DPO, conservative DPO, IPO, hinge, reference-free SimPO and ORPO on
pairs; KTO on unpaired examples (prompt, completion, desirable or not).

Each loss is registered once in PREFERENCE_LOSSES (`@preference_loss(name, reference=...,
data=...)`), saying whether it needs reference log-probs and which data it reads; the
`dpo` stage's `dpo.loss` setting, its reference handling and the objective all read that.

A batch is `collate_pairs` output: rows 0..B-1 chosen, B..2B-1 rejected, so chosen and
rejected go through one forward. A sequence's log-prob is the sum over its label tokens
(the completion), with the vocabulary head run only at those positions. An unpaired batch
(`collate_unpaired`) has the same shape: completions, then each one's KL row.

The reference is a frozen model passed as `reference`; without one, log-probs precomputed
into the batch (`precompute_reference_logps`: one pass before training, which also lets a
full fine-tune use its own starting point without keeping a copy); else, for a PEFT policy,
the same model with its adapters disabled (the base, no second copy). SimPO needs none.

Loss formulas follow the papers and TRL 1.16 (tests/train/test_dpo.py checks them against
TRL's DPOTrainer and CPOTrainer on the same log-probs): IPO compares per-token average
log-ratios (as TRL does, confirmed there with the IPO authors); SimPO uses average log-probs
and a target margin gamma; ORPO is checked against TRL's ORPOTrainer.odds_ratio_loss and KTO
against KTOTrainer's loss.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.data.collate import collate_two_sided
from posttrain.registry import Registry
from posttrain.train.objectives import IGNORE, Objective, label_token_logps


def completion_logps(model, batch: dict, chunk_size: int = 2048) -> tuple[Tensor, Tensor]:
    """Per-row sum of log p(label token) and per-row label-token count ([rows] each)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    if "seq_index" in batch:  # packed: one row, sequences told apart by seq_index
        rows = batch["seq_index"][:, 1:][keep]
        n_seq = int(batch["seq_index"].max()) + 1
    else:
        rows = keep.nonzero()[:, 0]  # the row of each selected position, in label order
        n_seq = keep.shape[0]
    counts = torch.zeros(n_seq, dtype=torch.long, device=rows.device).index_add(0, rows, torch.ones_like(rows))
    token_logps = label_token_logps(model, batch, chunk_size=chunk_size)
    return token_logps.new_zeros(n_seq).index_add(0, rows, token_logps), counts


@dataclass(frozen=True)
class LossSettings:
    """Every knob a preference loss may read; each loss reads only its own."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    desirable_weight: float = 1.0  # KTO's lambda_D
    undesirable_weight: float = 1.0  # KTO's lambda_U


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered loss and what it needs from the objective.

    `fn` for data="pairs": (policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens,
    rejected_tokens, settings) -> (per-pair losses, chosen rewards, rejected rewards), log-probs
    summed over each completion ([B] each; refs None when `reference` is False).
    For data="unpaired": (policy, ref, policy_kl, ref_kl, desirable, settings) -> (per-example
    losses, rewards, KL estimate), from collate_unpaired batches (completions, then KL rows).
    """

    fn: Callable
    reference: bool  # needs reference log-probs (adapters off, precomputed or a frozen copy)
    data: str = "pairs"  # "pairs" (collate_pairs batches) or "unpaired" (collate_unpaired)
    per_token: bool = False  # reads token counts (per-token averages)
    label_smoothing: bool = False  # honours label_smoothing (conservative form)


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")


def preference_loss(name: str, *, reference: bool, data: str = "pairs", per_token: bool = False,
                    label_smoothing: bool = False) -> Callable[[Callable], Callable]:
    """`@preference_loss("name", reference=..., data=...)` registers a loss function in PREFERENCE_LOSSES."""
    if data not in ("pairs", "unpaired"):
        raise ValueError(f"a preference loss reads 'pairs' or 'unpaired' data; got data={data!r}")

    def add(fn: Callable) -> Callable:
        PREFERENCE_LOSSES.register(name, PreferenceLoss(fn, reference, data, per_token, label_smoothing))
        return fn

    return add


def _per_token(x: Tensor, n: Tensor) -> Tensor:
    return x / n.to(x.dtype).clamp(min=1)


def _smoothed_sigmoid(logits: Tensor, eps: float) -> Tensor:
    """-(1-eps) logsig(z) - eps logsig(-z): conservative DPO (labels flipped with prob. eps)."""
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


@preference_loss("sigmoid", reference=True, label_smoothing=True)
def sigmoid_loss(pc, pr, rc, rr, nc, nr, s: LossSettings):
    """DPO: -logsig(beta d), d = chosen minus rejected log-ratio."""
    chosen, rejected = pc - rc, pr - rr
    return _smoothed_sigmoid(s.beta * (chosen - rejected), s.label_smoothing), s.beta * chosen.detach(), \
        s.beta * rejected.detach()


@preference_loss("ipo", reference=True, per_token=True)
def ipo_loss(pc, pr, rc, rr, nc, nr, s: LossSettings):
    """IPO: (d_avg - 1/(2 beta))^2 with per-token average log-ratios (as TRL)."""
    chosen, rejected = pc - rc, pr - rr
    delta = _per_token(chosen, nc) - _per_token(rejected, nr)
    return (delta - 1 / (2 * s.beta)) ** 2, s.beta * chosen.detach(), s.beta * rejected.detach()


@preference_loss("hinge", reference=True)
def hinge_loss(pc, pr, rc, rr, nc, nr, s: LossSettings):
    """SLiC hinge: relu(1 - beta d)."""
    chosen, rejected = pc - rc, pr - rr
    return torch.relu(1 - s.beta * (chosen - rejected)), s.beta * chosen.detach(), s.beta * rejected.detach()


@preference_loss("simpo", reference=False, per_token=True, label_smoothing=True)
def simpo_loss(pc, pr, rc, rr, nc, nr, s: LossSettings):
    """SimPO: sigmoid loss on beta (avg logp chosen - avg logp rejected) - gamma; rewards beta x avg logp."""
    chosen, rejected = _per_token(pc, nc), _per_token(pr, nr)
    logits = s.beta * (chosen - rejected) - s.simpo_gamma
    return _smoothed_sigmoid(logits, s.label_smoothing), s.beta * chosen.detach(), s.beta * rejected.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@preference_loss("orpo", reference=False, per_token=True)
def orpo_loss(pc, pr, rc, rr, nc, nr, s: LossSettings):
    """ORPO (Hong et al. 2024): token-mean NLL of the chosen replies - lambda logsig(log odds ratio).

    log odds(y) = m - log(1 - exp(m)) with m the per-token mean log-prob; the NLL is the
    batch's token mean (as TRL's ORPOTrainer), so the mean over pairs is TRL's loss. No
    reference: the NLL anchors the policy. Rewards are lambda x mean log-prob, as TRL logs them.
    """
    chosen, rejected = _per_token(pc, nc), _per_token(pr, nr)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    nll = -pc.sum() / nc.sum().clamp(min=1)
    lam = s.orpo_lambda
    return nll - lam * F.logsigmoid(log_odds), lam * chosen.detach(), lam * rejected.detach()


@preference_loss("kto", reference=True, data="unpaired")
def kto_loss(policy, ref, policy_kl, ref_kl, desirable, s: LossSettings):
    """KTO (Ethayarajh et al. 2024), as TRL's KTOTrainer: z0 = mean KL-row log-ratio, clamped at 0
    and detached; desirable lambda_D (1 - sig(beta (r - z0))), undesirable lambda_U (1 - sig(beta (z0 - r))),
    r = policy - reference log-prob of the completion. Rewards beta r."""
    kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    logratio = policy - ref
    losses = torch.where(desirable, s.desirable_weight * (1 - torch.sigmoid(s.beta * (logratio - kl))),
                         s.undesirable_weight * (1 - torch.sigmoid(s.beta * (kl - logratio))))
    return losses, s.beta * logratio.detach(), kl


def pair_loss_names() -> tuple[str, ...]:
    return tuple(n for n, spec in PREFERENCE_LOSSES.items() if spec.data == "pairs")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
             loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None, orpo_lambda: float = 0.1,
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed completion log-probs [B]
    with the pair loss `loss_type` of PREFERENCE_LOSSES.

    sigmoid: -(1-eps) logsig(beta d) - eps logsig(-beta d), d = chosen minus rejected
    log-ratio; eps = label_smoothing > 0 is conservative DPO (labels flipped with prob. eps).
    hinge: relu(1 - beta d). ipo: (d_avg - 1/(2 beta))^2 with per-token average log-ratios.
    simpo (no reference): sigmoid loss on beta (avg logp chosen - avg logp rejected) - gamma.
    orpo (no reference): chosen NLL - orpo_lambda logsig(log odds ratio) (see orpo_loss).
    Rewards are beta * log-ratio (simpo: beta * average log-prob); they carry no gradient.
    """
    spec = PREFERENCE_LOSSES.get(loss_type) if loss_type in PREFERENCE_LOSSES else None
    if spec is None or spec.data != "pairs":
        hint = f" ({loss_type} reads {spec.data} data)" if spec is not None else ""
        raise ValueError(f"unknown DPO loss_type {loss_type!r}{hint}; choose one of {', '.join(pair_loss_names())}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    if label_smoothing and not spec.label_smoothing:
        smoothing = [n for n, sp in PREFERENCE_LOSSES.items() if sp.label_smoothing]
        raise ValueError(f"label_smoothing applies to the {' and '.join(smoothing)} losses, not {loss_type!r}")
    if spec.per_token and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"the {loss_type} loss averages log-probs per token: pass chosen_tokens and rejected_tokens")
    if spec.reference and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"the {loss_type} loss needs reference log-probs")
    settings = LossSettings(beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma, orpo_lambda=orpo_lambda)
    return spec.fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, settings)


def _peft(model):
    """The PEFT model under a DDP wrapper, or None when `model` has no disable_adapter."""
    inner = getattr(model, "module", model)
    return inner if hasattr(inner, "disable_adapter") else None


@torch.no_grad()
def _reference_logps(model, batch: dict, reference) -> Tensor:
    """Reference summed log-probs of every row: `reference`, else the PEFT `model` with adapters off."""
    if reference is not None:
        device = batch["input_ids"].device
        if next(reference.parameters()).device != device:  # the loop moved only the policy
            reference.to(device)
        return completion_logps(reference, batch)[0]
    peft = _peft(model)
    if peft is None:
        raise ValueError(
            "DPO needs a reference: pass reference=<frozen model>, precompute ref_chosen_logp/ref_rejected_logp "
            "(precompute_reference_logps), or train a PEFT adapter (its base with adapters disabled is the reference)")
    with peft.disable_adapter():
        return completion_logps(peft, batch)[0]


def make_dpo_objective(loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                       simpo_gamma: float = 0.5, reference: torch.nn.Module | None = None,
                       rpo_alpha: float = 0.0, orpo_lambda: float = 0.1, desirable_weight: float = 1.0,
                       undesirable_weight: float = 1.0) -> Objective:
    """objective(model, batch) -> (mean loss over pairs or unpaired examples, metrics) for the loop.

    `rpo_alpha` > 0 adds alpha x the chosen completions' token-mean NLL (RPO, as TRL's
    `rpo_alpha`): plain DPO can widen the margin by pushing the rejected text down while the
    chosen text gains nothing, which leaves greedy generations unchanged on templated data.

    Reference (for losses registered with reference=True): `reference` (a frozen model) if given; else the batch's
    precomputed ref_chosen_logp/ref_rejected_logp (unpaired: ref_logp/ref_kl_logp); else the PEFT
    policy with its adapters disabled. A full-model policy with none of these is an error, not a
    silent self-reference.
    """
    spec = PREFERENCE_LOSSES.get(loss_type)
    if beta <= 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    for name, value in (("rpo_alpha", rpo_alpha), ("orpo_lambda", orpo_lambda), ("desirable_weight", desirable_weight),
                        ("undesirable_weight", undesirable_weight)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value}")
    if reference is not None:
        reference.eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    unpaired = spec.data == "unpaired"
    ref_keys = ("ref_logp", "ref_kl_logp") if unpaired else ("ref_chosen_logp", "ref_rejected_logp")
    settings = LossSettings(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                            orpo_lambda=orpo_lambda, desirable_weight=desirable_weight,
                            undesirable_weight=undesirable_weight)

    def objective(model, batch: dict) -> tuple[Tensor, dict]:
        if unpaired != ("desirable" in batch):
            raise ValueError(f"the {loss_type} loss reads {spec.data} data; got a batch of "
                             f"{'unpaired examples' if unpaired is False else 'pairs'}")
        logps, counts = completion_logps(model, batch)
        if logps.shape[0] % 2:
            raise ValueError("a DPO batch has chosen sequences then rejected ones (collate_pairs); got an odd count")
        b = logps.shape[0] // 2
        ref_first = ref_second = None
        if spec.reference:
            if reference is None and ref_keys[0] in batch:
                ref_first, ref_second = batch[ref_keys[0]], batch[ref_keys[1]]
            else:
                ref = _reference_logps(model, batch, reference)
                ref_first, ref_second = ref[:b], ref[b:]
        if unpaired:
            return _unpaired_step(spec, settings, rpo_alpha, logps, counts, ref_first, ref_second, batch["desirable"])
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:b], logps[b:], ref_first, ref_second, loss_type, beta, label_smoothing, simpo_gamma,
            counts[:b], counts[b:], orpo_lambda)
        loss = losses.mean()
        nll = -logps[:b].sum() / counts[:b].sum().clamp(min=1)
        if rpo_alpha > 0:
            loss = loss + rpo_alpha * nll
        margin = chosen_rewards - rejected_rewards
        metrics = {
            "loss": loss.item(),
            "nll/chosen": nll.item(),
            "loss_tokens": b,
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margin": margin.mean().item(),
            "rewards/accuracy": (margin > 0).float().mean().item(),
            "logps/chosen": logps[:b].detach().mean().item(),
            "logps/rejected": logps[b:].detach().mean().item(),
        }
        return loss, metrics

    return objective


def _unpaired_step(spec: PreferenceLoss, settings: LossSettings, rpo_alpha: float, logps: Tensor, counts: Tensor,
                   ref: Tensor | None, ref_kl: Tensor | None, desirable: Tensor) -> tuple[Tensor, dict]:
    """Loss and metrics of an unpaired batch: rows 0..B-1 completions, B..2B-1 their KL rows.

    "chosen"/"rejected" metrics are the desirable/undesirable examples' (absent when the batch
    has none of them), so the curves read like DPO's.
    """
    b = logps.shape[0] // 2
    desirable = desirable.to(logps.device)
    losses, rewards, kl = spec.fn(logps[:b], ref, logps[b:], ref_kl, desirable, settings)
    loss = losses.mean()
    good, bad = desirable, ~desirable
    nll = -logps[:b][good].sum() / counts[:b][good].sum().clamp(min=1)
    if rpo_alpha > 0 and good.any():
        loss = loss + rpo_alpha * nll
    metrics = {"loss": loss.item(), "loss_tokens": b, "kl": float(kl), "desirable": good.float().mean().item()}
    if good.any():
        metrics.update({"nll/chosen": nll.item(), "rewards/chosen": rewards[good].mean().item(),
                        "logps/chosen": logps[:b][good].detach().mean().item()})
    if bad.any():
        metrics.update({"rewards/rejected": rewards[bad].mean().item(),
                        "logps/rejected": logps[:b][bad].detach().mean().item()})
    if good.any() and bad.any():
        metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


@torch.no_grad()
def precompute_reference_logps(model_or_ref, examples: list[dict], pad_token_id: int, batch_size: int = 8,
                               adapters_off: bool = True) -> list[dict]:
    """Add ref_chosen_logp / ref_rejected_logp to every pair example (unpaired examples:
    ref_logp / ref_kl_logp), in place; returns the list.

    One pass before training, so no reference model or second forward is needed during it.
    A PEFT model is scored with its adapters disabled (its base: the reference when training
    that adapter) unless `adapters_off=False` (a PEFT model used as a separate reference).
    """
    model = getattr(model_or_ref, "module", model_or_ref)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    peft = _peft(model) if adapters_off else None
    try:
        with peft.disable_adapter() if peft is not None else nullcontext():
            for i in range(0, len(examples), batch_size):
                chunk = examples[i : i + batch_size]
                batch = collate_two_sided([_sequences_only(e) for e in chunk], pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logps, _ = completion_logps(model, batch)
                b = len(chunk)
                first, second = ("ref_logp", "ref_kl_logp") if "desirable" in batch else \
                    ("ref_chosen_logp", "ref_rejected_logp")
                for e, c, r in zip(chunk, logps[:b].tolist(), logps[b:].tolist()):
                    e[first], e[second] = c, r
    finally:
        model.train(was_training)
    return examples


def _sequences_only(example: dict) -> dict:
    keys = ("input_ids", "labels", "kl_input_ids", "kl_labels", "desirable") if "kl_input_ids" in example else \
        ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    return {k: example[k] for k in keys}
