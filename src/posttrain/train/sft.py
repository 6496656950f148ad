"""The SFT and continued pre-training stages: config -> data -> model -> loop -> run dir.

`posttrain sft` and `posttrain pretrain` are the same stage with a different record
kind (chat/completion vs text); both go through `train.loop.train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.adapters import AdapterConfig
from posttrain.config import DataConfig, StageConfig, Strict, TrainConfig
from posttrain.data.examples import encode_file, with_held_out
from posttrain.eval.suite import EvalConfig, evaluate_all, write_reports


class EWCConfig(Strict):
    reference: str | None = Field(None, description="text/chat data the Fisher is estimated on")
    max_batches: int = Field(16, gt=0)


class SFTConfig(StageConfig):
    stage: Literal["sft", "pretrain"] = "sft"
    output_dir: str = "runs/sft"
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ewc: EWCConfig = EWCConfig()

    @model_validator(mode="after")
    def _check(self) -> "SFTConfig":
        if self.stage == "pretrain" and self.data.kind not in (None, "text"):
            raise ValueError(f"data.kind: pretrain trains on raw text; got {self.data.kind!r}")
        if self.train.ewc_weight > 0 and not self.ewc.reference:
            raise ValueError("train.ewc_weight > 0 needs ewc.reference (data to estimate the Fisher on)")
        check_adapter_training(self.adapter, self.train, self.data)
        return self


def check_adapter_training(adapter: AdapterConfig, train: TrainConfig, data: DataConfig) -> None:
    """Combinations every stage that trains an adapter on a data file refuses."""
    if adapter.method == "prompt" and train.packing:
        raise ValueError("adapter.method=prompt prepends virtual tokens per row: set train.packing=false")
    if adapter.method == "bottleneck" and not adapter.tasks:
        raise ValueError("adapter.method=bottleneck needs adapter.tasks")
    if train.early_stopping_patience and not (data.eval or data.eval_fraction):
        raise ValueError("train.early_stopping_patience needs data.eval or data.eval_fraction")


def run_sft(cfg: SFTConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the stage end to end; returns the manifest."""
    from posttrain.adapters import apply_adapter, trainable_summary
    from posttrain.models import save_model
    from posttrain.stage import stage_inputs, start_stage
    from posttrain.train.loop import train
    from posttrain.train.objectives import get_objective

    run = start_stage(cfg, resume, overwrite, seed=cfg.train.seed)
    model, tokenizer, run_dir = run.model, run.tokenizer, run.run_dir
    kind = "text" if cfg.stage == "pretrain" else cfg.data.kind
    tasks = cfg.adapter.tasks if cfg.adapter.method == "bottleneck" else None
    examples, eval_examples, data_report = with_held_out(
        cfg.data, cfg.train.seed,
        lambda path, _: encode_file(tokenizer, path, kind, cfg.data.max_length, cfg.data.skip_invalid, tasks))
    print(f"data: {data_report}")

    before = run.cached("eval_before.json", lambda: evaluate_all(model, tokenizer, cfg.eval) if cfg.eval.before else {})
    model = apply_adapter(model, cfg.adapter, tokenizer)
    summary = trainable_summary(model)
    print(summary["line"])

    objective = get_objective(cfg.stage)
    regularizer = None
    if cfg.train.ewc_weight > 0:
        regularizer = build_ewc(model, tokenizer, objective, cfg, run_dir)

    model, train_summary = train(model, objective, examples, cfg.train, run_dir,
                                 pad_token_id=tokenizer.pad_token_id, tasks=tasks,
                                 eval_examples=eval_examples, resume=resume, regularizer=regularizer)
    save_model(model, tokenizer, run_dir / "final")
    after = evaluate_all(model, tokenizer, cfg.eval)
    outputs = {"train": train_summary, "eval_before": before, "eval_after": after, "data": data_report,
               "trainable": summary}
    write_reports(run_dir, before, after)
    files = {"train": cfg.data.train, "eval": cfg.data.eval, "ewc_reference": cfg.ewc.reference,
             "forgetting": cfg.eval.forgetting}
    return run.finish(stage_inputs(cfg.model.name, files, cfg.eval.tasks), outputs)


def build_ewc(model, tokenizer, objective, cfg: SFTConfig, run_dir: Path):
    """Fisher on the reference data (cached in the run dir so a resumed run reuses it)."""
    from posttrain.data.collate import collate_padded
    from posttrain.train.regularizers import (anchor_params, ewc_penalty, fisher_diagonal, load_ewc_state,
                                              save_ewc_state)

    path = run_dir / "ewc.safetensors"
    if path.exists():
        fisher, anchor = load_ewc_state(path)
    else:
        ref, _ = encode_file(tokenizer, cfg.ewc.reference, None, cfg.data.max_length, cfg.data.skip_invalid)
        bs = cfg.train.batch_size
        batches = [collate_padded(ref[i : i + bs], tokenizer.pad_token_id) for i in range(0, len(ref), bs)]
        fisher = fisher_diagonal(model, objective, batches, max_batches=cfg.ewc.max_batches)
        anchor = anchor_params(model)
        save_ewc_state(path, fisher, anchor)
    return lambda m: ewc_penalty(m, fisher, anchor)
