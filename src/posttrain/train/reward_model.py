"""The reward model: a causal LM's decoder + one linear head per aspect, trained on preference pairs.

It is trained here (train/preference.py's `rm` stage) and read by the stages above: RL uses
`RewardModelScorer` as one reward function among others (rl/rewards.py), preference runs
use it for win rates, data filters score with it. `bradley_terry_loss` is a loop objective
over the shared pair-batch format (rows 0..B-1 chosen, B..2B-1 rejected); a pair judges the
head its ``aspect`` names (head 0 without one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posttrain.eval.metrics import right_pad
from posttrain.models import base_model

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"
META_FORMAT = "posttrain-reward-model"


# ================================================================================ reward model


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last attended position (right or left padding)."""
    if (attention_mask.sum(1) == 0).any():
        raise ValueError("a row of the batch has no tokens (its attention_mask is all zero)")
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(1)


class RewardModel(nn.Module):
    """Decoder of a causal LM + a linear head ``hidden -> len(aspects)``, one score per aspect.

    The whole LM is kept (its vocabulary head is simply never run), so the backbone saves
    like any other model, as a full model or a PEFT adapter, and the saved directory still
    loads as a language model. The head stays fp32 whatever the backbone's dtype: rewards
    are compared by small differences, which bf16's 8 mantissa bits blur.
    """

    def __init__(self, lm: nn.Module, aspects: Sequence[str] = ("overall",), seed: int = 0):
        super().__init__()
        from posttrain.train.objectives import is_prompt_learning

        aspects = list(aspects)
        if not aspects or any(not isinstance(a, str) or not a for a in aspects):
            raise ValueError(f"aspects must be a non-empty list of names, got {aspects!r}")
        if len(set(aspects)) != len(aspects):
            raise ValueError(f"aspects has duplicates: {aspects}")
        if is_prompt_learning(lm):
            raise ValueError("reward models run the decoder directly; prompt-tuning adapters "
                             "(virtual tokens) are not supported: use LoRA, full or freeze")
        self.lm = lm
        self.aspects = aspects
        hidden = base_model(lm).config.hidden_size
        self.head = nn.Linear(hidden, len(aspects))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # scores start at ~unit scale: final-norm hidden states are ~unit per entry
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * hidden**-0.5)
            self.head.bias.zero_()
        self.head.to(next(lm.parameters()).device)

    def aspect_index(self, aspect: str | int) -> int:
        if isinstance(aspect, int):
            if not 0 <= aspect < len(self.aspects):
                raise ValueError(f"aspect index {aspect} out of range for heads {self.aspects}")
            return aspect
        if aspect not in self.aspects:
            raise ValueError(f"unknown aspect {aspect!r}; this reward model has {self.aspects}")
        return self.aspects.index(aspect)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores ``[N, n_heads]`` (fp32), each row read at its last non-pad token."""
        from posttrain.kernels.layers import fused_layers
        from posttrain.train.objectives import _fused_lora

        base = base_model(self.lm)
        with _fused_lora(self.lm), fused_layers(self.lm):
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
        last = last_token_index(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(picked.float())


def reward_model_from_lm(lm: nn.Module, aspects: Sequence[str] = ("overall",), seed: int = 0) -> RewardModel:
    """Wrap a (possibly PEFT-wrapped) causal LM as a reward model with one head per aspect."""
    return RewardModel(lm, aspects, seed=seed)


def pair_scores(rm: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) scores ``[B]`` of a collated pair batch, each on its pair's aspect head."""
    if "seq_index" in batch:
        raise ValueError("reward models score padded pair batches (each row's last token); set train.packing=false")
    scores = rm(batch["input_ids"], batch["attention_mask"]).float()
    n, heads = scores.shape
    if n % 2:
        raise ValueError(f"a pair batch has an even number of rows (chosen then rejected); got {n}")
    b = n // 2
    aspect = batch.get("aspect")
    if aspect is None:
        idx = torch.zeros(b, dtype=torch.long, device=scores.device)
    else:
        idx = aspect.to(scores.device).long()
        if idx.shape != (b,):
            raise ValueError(f"batch['aspect'] must have one entry per pair ({b}), got shape {tuple(idx.shape)}")
        if bool(((idx < 0) | (idx >= heads)).any()):
            raise ValueError(f"batch['aspect'] has {sorted(set(idx.tolist()))}; the reward model has heads 0..{heads - 1}")
    r = scores[torch.arange(n, device=scores.device), idx.repeat(2)]
    return r[:b], r[b:]


def bradley_terry_loss(rm: nn.Module, batch: dict) -> tuple[Tensor, dict]:
    """Pairwise loss ``-log sigmoid(r_chosen - r_rejected - margin)``, mean over pairs.

    `margin` (optional, per pair) asks for a larger gap on pairs rated far apart (Llama 2's
    RM). Accuracy counts pairs with r_chosen > r_rejected (margin not subtracted).
    """
    chosen, rejected = pair_scores(rm, batch)
    diff = chosen - rejected
    logits = diff - batch["margin"].to(diff) if "margin" in batch else diff
    loss = -F.logsigmoid(logits).mean()
    metrics = {
        "loss": loss.item(),
        "loss_tokens": int(chosen.shape[0]),
        "accuracy": (diff > 0).float().mean().item(),
        "reward/chosen": chosen.mean().item(),
        "reward/rejected": rejected.mean().item(),
        "reward/margin": diff.mean().item(),
    }
    return loss, metrics


@torch.no_grad()
def pairwise_accuracy(rm: nn.Module, batches: Iterable[dict]) -> float:
    """Fraction of held-out pairs the model ranks right (ties count as wrong)."""
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    correct = total = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            chosen, rejected = pair_scores(rm, batch)
            correct += int((chosen > rejected).sum())
            total += int(chosen.shape[0])
    finally:
        rm.train(was_training)
    if total == 0:
        raise ValueError("pairwise accuracy of zero pairs is undefined")
    return correct / total


def save_reward_model(rm: RewardModel, tokenizer, out_dir: str | Path) -> Path:
    """Backbone (full model or adapter, via models.save_model) + head + aspects, published atomically.

    Layout: the backbone's own files (so the directory loads as an LM too),
    ``reward_head.safetensors`` and ``reward_model.json`` ({format, aspects, hidden_size}).
    """
    from safetensors.torch import save_file

    from posttrain.fileio import atomic_dir
    from posttrain.models import save_model

    rm = getattr(rm, "module", rm)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_model(rm.lm, tokenizer, tmp)
        head = {k: v.detach().float().contiguous().cpu() for k, v in rm.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE))
        meta = {"format": META_FORMAT, "version": 1, "aspects": rm.aspects, "hidden_size": rm.head.in_features}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_reward_model(path: str | Path, dtype: str | torch.dtype | None = "auto",
                      device: str | torch.device | None = None) -> tuple[RewardModel, Any]:
    """(reward model in eval mode, tokenizer) from a `save_reward_model` directory or a run dir."""
    from safetensors.torch import load_file

    from posttrain.models import load_model, resolve_model_path

    root = Path(resolve_model_path(path))
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{root} has no {META_FILE}: not a reward model saved by save_reward_model")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise ValueError(f"{meta_path}: format must be {META_FORMAT!r}")
    aspects = meta.get("aspects")
    if not isinstance(aspects, list) or not aspects or not all(isinstance(a, str) for a in aspects):
        raise ValueError(f"{meta_path}: aspects must be a non-empty list of names, got {aspects!r}")
    lm, tokenizer = load_model(str(root), dtype=dtype, device=device)
    rm = RewardModel(lm, aspects)
    state = load_file(str(root / HEAD_FILE))
    try:
        rm.head.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{root / HEAD_FILE} does not fit a {rm.head.in_features}->{len(aspects)} head: {exc}") from exc
    return rm.eval(), tokenizer


# ================================================================================ scoring


@dataclass
class RewardOutput:
    """Scores ``[N]`` (fp32) and their breakdown: ``parts[name] -> [N]``."""

    scores: Tensor
    parts: dict[str, Tensor]


def check_scorer_inputs(prompts: Sequence[Any], completions: Sequence[str], records: Sequence[dict] | None) -> int:
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts but {n} completions")
    if records is not None and len(records) != n:
        raise ValueError(f"{len(records)} records but {n} completions")
    return n


def encode_for_reward(tokenizer, prompt: Any, completion: str, max_length: int | None = None) -> list[int]:
    """Token ids a reward model scores: the tokens `templates.encode_chat` gives the
    conversation [prompt..., assistant: completion] (what a preference pair trains on).

    A string prompt is one user turn; a message list is used as is. A tokenizer without a
    chat template gets `encode_completion`'s tokens: prompt, completion, EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                             tokenize=False, add_generation_prompt=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        if not isinstance(prompt, str):
            raise ValueError("message-list prompts need a tokenizer with a chat template")
        ids = (tokenizer(prompt, add_special_tokens=True)["input_ids"]
               + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return ids[:max_length] if max_length is not None else ids


class RewardModelScorer:
    """Scores with a `RewardModel`: one aspect's head, or a weighted sum of heads.

    Without `aspect` or `weights` the first head scores (the one pairs without an
    ``aspect`` train). With `weights` the parts hold each weighted head's raw score.
    `encode(tokenizer, prompt, completion)` replaces `encode_for_reward` if training
    data was rendered differently.
    """

    def __init__(self, rm: RewardModel, tokenizer, aspect: str | None = None, weights: dict[str, float] | None = None,
                 batch_size: int = 8, max_length: int | None = None, name: str = "reward_model",
                 encode: Callable[[Any, Any, str], list[int]] | None = None):
        if aspect is not None and weights is not None:
            raise ValueError("give a reward model scorer either aspect or weights, not both")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.rm, self.tokenizer, self.name = rm, tokenizer, name
        self.batch_size, self.max_length = batch_size, max_length
        self.encode = encode or (lambda tok, p, c: encode_for_reward(tok, p, c, max_length))
        self.index = rm.aspect_index(aspect) if aspect is not None else 0
        for a in weights or {}:
            rm.aspect_index(a)  # unknown aspects fail here, not at the first call
        self.weights = {a: float(w) for a, w in (weights or {}).items()}

    @torch.no_grad()
    def head_scores(self, prompts: Sequence[Any], completions: Sequence[str]) -> Tensor:
        """All heads' scores ``[N, n_heads]`` (fp32, CPU), in right-padded batches."""
        ids = [self.encode(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.rm.parameters()).device
        out = []
        was_training = self.rm.training
        self.rm.eval()
        try:
            for start in range(0, len(ids), self.batch_size):
                input_ids, mask = right_pad(ids[start:start + self.batch_size], pad, device)
                out.append(self.rm(input_ids, mask).float().cpu())
        finally:
            self.rm.train(was_training)
        return torch.cat(out) if out else torch.zeros((0, len(self.rm.aspects)))

    def __call__(self, prompts, completions, records=None) -> RewardOutput:
        check_scorer_inputs(prompts, completions, records)
        heads = self.head_scores(prompts, completions)
        if not self.weights:
            scores = heads[:, self.index].contiguous()
            return RewardOutput(scores, {self.name: scores})
        parts = {f"{self.name}/{a}": heads[:, self.rm.aspect_index(a)].contiguous() for a in self.weights}
        scores = sum(w * parts[f"{self.name}/{a}"] for a, w in self.weights.items())
        return RewardOutput(scores, {self.name: scores, **parts})


# ================================================================================ data filtering


def reward_model_scorer(path: str | Path, aspect: str | None = None,
                        batch_size: int = 8) -> Callable[[list[dict]], list[float]]:
    """A data-filter scorer (records -> scores) from a reward model saved by `posttrain rm` (run dir or model dir)."""
    from posttrain.data.filters import prompt_and_completion

    rm, tokenizer = load_reward_model(path)
    scorer = RewardModelScorer(rm, tokenizer, aspect=aspect, batch_size=batch_size)

    def score(records: list[dict]) -> list[float]:
        pairs = [prompt_and_completion(r) for r in records]
        out = scorer([p for p, _ in pairs], [c for _, c in pairs])
        return out.scores.tolist()

    return score


def filter_scorer(rules: Any) -> Callable[[list[dict]], list[float]] | None:
    """The scorer a filter rules' ``score`` section asks for (None without ``score.min``).

    The data filters sit below the reward model, so callers above both (the CLI's filter and
    synth commands, the pipeline) build it here and pass it in.
    """
    from posttrain.data.filters import FilterRules

    rules = rules if isinstance(rules, FilterRules) else FilterRules.model_validate(rules or {})
    if rules.score.min is None:
        return None
    if not rules.score.reward_model:
        raise ValueError("score.min is set but score.reward_model is not: nothing to score with")
    return reward_model_scorer(rules.score.reward_model, rules.score.aspect, rules.score.batch_size)
