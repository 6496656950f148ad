"""The reward-model and DPO stages: config -> preference pairs -> model -> loop -> run dir.

`posttrain rm` trains a reward model (a scalar head per aspect on a causal LM) with
the Bradley-Terry loss; `posttrain dpo` trains a policy with a DPO-family loss. Both
read preference records (`prompt`, `chosen`, `rejected`, optional `margin` and
`aspect`) and go through the one training loop (`train.loop.train`).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from posttrain.adapters import AdapterConfig
from posttrain.config import PairDataConfig, StageConfig, Strict, TrainConfig
from posttrain.data.examples import split_pairs
from posttrain.eval.suite import EvalConfig, evaluate_all, write_reports
from posttrain.train.dpo import PREFERENCE_LOSSES


class PairTrainConfig(TrainConfig):
    """The loop's settings with defaults for pairs: padded batches of 4 pairs, a gentle lr."""

    packing: bool = False
    batch_size: int = Field(4, gt=0, description="preference pairs per micro-batch")
    lr: float = Field(5e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)


class DPOTrainConfig(PairTrainConfig):
    """DPO packs a step's pairs into rows without padding (sequences stay separate)."""

    packing: bool = True
    batch_size: int = Field(8, gt=0, description="pairs per micro-batch (packed: at most this many per row)")
    max_tokens: int = Field(4096, gt=0, description="tokens per packed micro-batch")


def _pairs_train_check(train: TrainConfig) -> None:
    if train.packing:
        raise ValueError("train.packing: a reward model reads each sequence's last token from padded rows; "
                         "set train.packing=false")


# ----------------------------------------------------------------------------- reward model


class RMConfig(StageConfig):
    stage: Literal["rm"] = "rm"
    output_dir: str = "runs/rm"
    adapter: AdapterConfig = AdapterConfig()
    aspects: list[str] = Field(["overall"], min_length=1, description="one reward head per aspect")
    data: PairDataConfig
    train: PairTrainConfig = PairTrainConfig()

    @model_validator(mode="after")
    def _check(self) -> "RMConfig":
        _pairs_train_check(self.train)
        if self.adapter.method in ("prompt", "bottleneck"):
            raise ValueError(f"adapter.method: {self.adapter.method} is not supported for reward models; "
                             "use lora, dora, full or freeze")
        return self


@torch.no_grad()
def pair_accuracy(rm, examples: list[dict], pad_token_id: int, batch_size: int = 8) -> dict:
    """Held-out pairwise accuracy (chosen scored above rejected), overall and per aspect."""
    from posttrain.data.collate import collate_pairs
    from posttrain.train.reward_model import pair_scores as _pair_scores

    was = rm.training
    rm.eval()
    hits: dict[str, list[float]] = {}
    for i in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[i:i + batch_size], pad_token_id)
        chosen, rejected = _pair_scores(rm, batch)
        aspects = batch.get("aspect", torch.zeros(len(chosen), dtype=torch.long)).tolist()
        for a, c, r in zip(aspects, chosen.tolist(), rejected.tolist()):
            hits.setdefault(rm.aspects[a], []).append(float(c > r))
    rm.train(was)
    out = {"pair_accuracy": sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())}
    out.update({f"pair_accuracy/{k}": sum(v) / len(v) for k, v in sorted(hits.items())})
    return out


def run_rm(cfg: RMConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a reward model; reports held-out pairwise accuracy before and after."""
    from posttrain.adapters import apply_adapter, trainable_summary
    from posttrain.stage import stage_inputs, start_stage, write_json_atomic
    from posttrain.train.reward_model import RewardModel, bradley_terry_loss, save_reward_model
    from posttrain.train.loop import train

    run = start_stage(cfg, resume, overwrite, seed=cfg.train.seed)
    lm, tokenizer, run_dir = run.model, run.tokenizer, run.run_dir
    examples, held, report = split_pairs(tokenizer, cfg.data, cfg.train.seed, cfg.aspects)
    print(f"data: {report}")
    lm = apply_adapter(lm, cfg.adapter, tokenizer)
    rm = RewardModel(lm, cfg.aspects, seed=cfg.train.seed)  # its head always trains
    summary = trainable_summary(rm)
    print(summary["line"])
    pad = tokenizer.pad_token_id
    before = pair_accuracy(rm, held, pad) if held else {}
    rm, train_summary = train(rm, bradley_terry_loss, examples, cfg.train, run_dir, pad_token_id=pad,
                              eval_examples=held, resume=resume)
    after = pair_accuracy(rm, held, pad) if held else {}
    save_reward_model(rm, tokenizer, run_dir / "final")
    write_json_atomic(run_dir / "eval.json", {"before": before, "after": after})
    if after:
        print(f"held-out pairwise accuracy: {before['pair_accuracy']:.3f} -> {after['pair_accuracy']:.3f}")
    write_reports(run_dir, before, after)
    outputs = {"train": train_summary, "eval_before": before, "eval_after": after, "data": report,
               "trainable": summary}
    return run.finish(stage_inputs(cfg.model.name, {"train": cfg.data.train, "eval": cfg.data.eval}), outputs)


# ----------------------------------------------------------------------------- DPO


def disables_to_base(adapter: AdapterConfig) -> bool:
    """PEFT methods: with the adapters disabled the policy is its starting model, a reference
    that costs no second copy."""
    return adapter.method not in ("full", "freeze", "bottleneck")


class DPOSettings(Strict):
    loss: str = Field("sigmoid", description=f"a preference loss: {', '.join(PREFERENCE_LOSSES)}")
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO (sigmoid/simpo)")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target margin")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO: weight of the odds-ratio term (TRL's beta)")
    desirable_weight: float = Field(1.0, ge=0, description="KTO: lambda_D, weight of desirable examples")
    undesirable_weight: float = Field(1.0, ge=0, description="KTO: lambda_U, weight of undesirable examples")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of the chosen replies' NLL added to the loss (RPO)")
    reference: Literal["auto", "adapters_off", "precompute", "copy"] = Field(
        "auto", description="auto: the base with adapters disabled for adapter methods, else log-probs "
                            "precomputed from the starting weights (no second copy in memory)")
    reference_model: str | None = Field(None, description="a different model as the frozen reference")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        PREFERENCE_LOSSES.get(name)  # ValueError naming the registered choices
        return name

    @model_validator(mode="after")
    def _smoothing(self) -> "DPOSettings":
        if self.label_smoothing and not PREFERENCE_LOSSES.get(self.loss).label_smoothing:
            raise ValueError(f"dpo.label_smoothing applies to the "
                             f"{', '.join(n for n, s in PREFERENCE_LOSSES.items() if s.label_smoothing)} losses, "
                             f"not {self.loss}")
        return self

    @property
    def needs_reference(self) -> bool:
        return PREFERENCE_LOSSES.get(self.loss).reference

    @property
    def unpaired(self) -> bool:
        """The loss reads unpaired examples (KTO), not pairs."""
        return PREFERENCE_LOSSES.get(self.loss).data == "unpaired"

    def objective(self, reference=None):
        """The loop objective these settings describe (`reference`: a frozen model, if one is used)."""
        from posttrain.train.dpo import make_dpo_objective

        return make_dpo_objective(self.loss, beta=self.beta, label_smoothing=self.label_smoothing,
                                  simpo_gamma=self.simpo_gamma, reference=reference, rpo_alpha=self.rpo_alpha,
                                  orpo_lambda=self.orpo_lambda, desirable_weight=self.desirable_weight,
                                  undesirable_weight=self.undesirable_weight)


class WinRateConfig(Strict):
    prompts: str = Field(..., description="held-out prompts (JSONL with a prompt field)")
    reward_model: str = Field(..., description="a reward model saved by `posttrain rm` (its run dir or final/)")
    aspect: str | None = None
    max_new_tokens: int = Field(96, gt=0)
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)


class DPOEvalConfig(EvalConfig):
    win_rate: WinRateConfig | None = None


class DPOConfig(StageConfig):
    stage: Literal["dpo"] = "dpo"
    output_dir: str = "runs/dpo"
    adapter: AdapterConfig = AdapterConfig()
    data: PairDataConfig
    dpo: DPOSettings = DPOSettings()
    train: DPOTrainConfig = DPOTrainConfig()
    eval: DPOEvalConfig = DPOEvalConfig()

    @model_validator(mode="after")
    def _check(self) -> "DPOConfig":
        if self.dpo.reference == "adapters_off" and not disables_to_base(self.adapter):
            raise ValueError(f"dpo.reference: adapters_off needs an adapter method (lora, dora, ia3, prompt); "
                             f"adapter.method is {self.adapter.method}")
        if self.dpo.reference_model and self.dpo.reference not in ("auto", "copy"):
            raise ValueError("dpo.reference_model is a frozen model: use dpo.reference=copy (or auto)")
        if not self.dpo.needs_reference and (self.dpo.reference_model or self.dpo.reference != "auto"):
            raise ValueError(f"dpo.loss: {self.dpo.loss} is reference-free; leave dpo.reference=auto and no "
                             "reference_model")
        return self


def _generate_completions(model, tokenizer, prompts: list, cfg: WinRateConfig) -> list[str]:
    from posttrain.generate.engine import GenerationConfig, generate

    texts: list[str] = []
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, chat=True)
    for i in range(0, len(prompts), cfg.batch_size):
        texts.extend(generate(model, tokenizer, prompts[i:i + cfg.batch_size], gen).texts)
    return texts


def win_rate(prompts: list, ours: list[str], theirs: list[str], scorer) -> dict:
    """Share of prompts where the reward function scores `ours` above `theirs` (ties count half)."""
    a = scorer(prompts, ours).scores
    b = scorer(prompts, theirs).scores
    wins = (a > b).float() + 0.5 * (a == b).float()
    return {"win_rate": wins.mean().item(), "reward_ours": a.mean().item(), "reward_theirs": b.mean().item(),
            "per_prompt": [{"ours": x, "theirs": y} for x, y in zip(a.tolist(), b.tolist())]}


def _prompts(path: str, limit: int | None) -> list:
    from posttrain.data.formats import load_records

    data = load_records(path, kind="prompt")
    return [r["prompt"] for r in data.records[:limit]]


def run_dpo(cfg: DPOConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a policy with a DPO-family loss; evaluates before/after (tasks, refusal, RM win rate)."""
    import copy

    from posttrain.adapters import apply_adapter, init_adapter_dir, trainable_summary
    from posttrain.models import load_model, save_model
    from posttrain.stage import stage_inputs, start_stage, write_json_atomic
    from posttrain.train.dpo import precompute_reference_logps
    from posttrain.train.loop import train

    run = start_stage(cfg, resume, overwrite, seed=cfg.train.seed)
    model, tokenizer, run_dir = run.model, run.tokenizer, run.run_dir
    examples, held, report = split_pairs(tokenizer, cfg.data, cfg.train.seed, unpaired=cfg.dpo.unpaired)
    print(f"data: {report}")

    wr = cfg.eval.win_rate
    wr_prompts = _prompts(wr.prompts, wr.limit) if wr else []
    saved = run.cached("eval_before.json", lambda: {
        "scores": evaluate_all(model, tokenizer, cfg.eval) if cfg.eval.before else {},
        "win_rate_texts": _generate_completions(model, tokenizer, wr_prompts, wr) if wr else []})
    before, before_texts = saved["scores"], saved.get("win_rate_texts", [])

    reference = None
    mode = cfg.dpo.reference
    if cfg.dpo.needs_reference:
        if cfg.dpo.reference_model:
            reference, _ = load_model(cfg.dpo.reference_model, dtype=cfg.model.dtype)
        elif mode == "copy":
            reference = copy.deepcopy(model)
        elif mode == "auto":
            mode = "adapters_off" if disables_to_base(cfg.adapter) else "precompute"
        if reference is not None:
            reference.eval().requires_grad_(False)
        if mode == "precompute" and reference is None:
            t = time.time()
            for part in (examples, held or []):
                precompute_reference_logps(model, part, tokenizer.pad_token_id, batch_size=cfg.train.batch_size,
                                           adapters_off=False)
            print(f"reference log-probs precomputed for {len(examples) + len(held or [])} pairs "
                  f"in {time.time() - t:.1f} s")
    model = apply_adapter(model, cfg.adapter, tokenizer)
    summary = trainable_summary(model)
    print(summary["line"])

    objective = cfg.dpo.objective(reference)
    model, train_summary = train(model, objective, examples, cfg.train, run_dir, pad_token_id=tokenizer.pad_token_id,
                                 eval_examples=held, resume=resume)
    save_model(model, tokenizer, run_dir / "final")
    after = evaluate_all(model, tokenizer, cfg.eval)
    files: dict[str, str | None] = {"train": cfg.data.train, "eval": cfg.data.eval,
                                    "reference_model": cfg.dpo.reference_model}
    if cfg.adapter.init_from:  # the adapter this run continued: its files' hash
        files["adapter_init"] = str(init_adapter_dir(cfg.adapter.init_from))
    if wr:
        from posttrain.train.reward_model import RewardModelScorer, load_reward_model

        after_texts = _generate_completions(model, tokenizer, wr_prompts, wr)
        rm, rm_tok = load_reward_model(wr.reward_model)
        result = win_rate(wr_prompts, after_texts, before_texts, RewardModelScorer(rm, rm_tok, aspect=wr.aspect))
        write_json_atomic(run_dir / "win_rate.json", {**result, "prompts": wr_prompts, "before_texts": before_texts,
                                                      "after_texts": after_texts})
        after["win_rate_vs_start"] = result["win_rate"]
        after["rm_reward"], before["rm_reward"] = result["reward_ours"], result["reward_theirs"]
        print(f"reward-model win rate against the starting model: {result['win_rate']:.3f} "
              f"(mean reward {result['reward_theirs']:.3f} -> {result['reward_ours']:.3f})")
        files["win_rate_prompts"] = wr.prompts
    write_reports(run_dir, before, after)
    outputs = {"train": train_summary, "eval_before": before, "eval_after": after, "data": report,
               "trainable": summary, "reference": mode if cfg.dpo.needs_reference else "none"}
    return run.finish(stage_inputs(cfg.model.name, files), outputs)
