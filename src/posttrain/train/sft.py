"""The SFT and continued pre-training stages: config -> data -> model -> loop -> run dir.

`posttrain sft` and `posttrain pretrain` are the same stage with a different record
kind (chat/completion vs text); both go through `train.loop.train`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.adapters import AdapterConfig
from posttrain.config import Strict, TrainConfig
from posttrain.eval.tasks import EvalSpec


class ModelConfig(Strict):
    name: str = Field("default", description="'default', HF dir, run dir, .gguf file or hub id")
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    trust_remote_code: bool = False


class DataConfig(Strict):
    train: str = Field(..., description="JSONL/JSON/Parquet/CSV file or datasets directory")
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="held out from train when no eval file")
    kind: Literal["chat", "completion", "text"] | None = None
    max_length: int = Field(1024, gt=8)
    skip_invalid: bool = False


class EvalConfig(Strict):
    tasks: list[EvalSpec] = []
    before: bool = True
    forgetting: str | None = Field(None, description="general text JSONL: perplexity before/after")


class EWCConfig(Strict):
    reference: str | None = Field(None, description="text/chat data the Fisher is estimated on")
    max_batches: int = Field(16, gt=0)


class SFTConfig(Strict):
    stage: Literal["sft", "pretrain"] = "sft"
    output_dir: str = "runs/sft"
    model: ModelConfig = ModelConfig()
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


def encode_file(tokenizer, path: str, kind: str | None, max_length: int, skip_invalid: bool,
                tasks: list[str] | None = None) -> tuple[list[dict], dict]:
    """Load, validate and tokenize a data file; returns examples and a report of counts."""
    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_record

    data = load_records(path, kind=kind, skip_invalid=skip_invalid)
    if data.kind not in ("chat", "completion", "text"):
        raise ValueError(f"{path}: {data.kind} records cannot be used for SFT/pre-training")
    examples, no_loss = [], 0
    for i, record in enumerate(data.records):
        if tasks is not None and record.get("task") not in tasks:
            raise ValueError(f"{path}: record {i + 1}: field 'task' must be one of {tasks}; got {record.get('task')!r}")
        ex = encode_record(tokenizer, record, data.kind, max_length=max_length)
        if ex is None or not any(t != -100 for t in ex["labels"][1:]):
            no_loss += 1
            continue
        examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no example carries a loss token after truncation to {max_length} tokens")
    report = {"path": path, "kind": data.kind, "records": len(data.records), "skipped_invalid": data.skipped,
              "dropped_no_loss": no_loss, "examples": len(examples)}
    return examples, report


def split_eval(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded `fraction` of the examples (at least one) held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(examples) * fraction))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def run_sft(cfg: SFTConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the stage end to end; returns the manifest."""
    from posttrain.adapters import apply_adapter, trainable_summary
    from posttrain.models import load_model, resolve_model_path, save_model
    from posttrain.stage import content_hash, prepare_run_dir, write_json_atomic, write_manifest
    from posttrain.train.loop import train
    from posttrain.train.objectives import get_objective

    started = time.time()
    run_dir = prepare_run_dir(cfg.output_dir, cfg, resume=resume, overwrite=overwrite)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype,
                                  trust_remote_code=cfg.model.trust_remote_code)
    kind = "text" if cfg.stage == "pretrain" else cfg.data.kind
    tasks = cfg.adapter.tasks if cfg.adapter.method == "bottleneck" else None
    examples, data_report = encode_file(tokenizer, cfg.data.train, kind, cfg.data.max_length,
                                        cfg.data.skip_invalid, tasks)
    eval_examples = None
    if cfg.data.eval:
        eval_examples, _ = encode_file(tokenizer, cfg.data.eval, kind, cfg.data.max_length,
                                       cfg.data.skip_invalid, tasks)
    elif cfg.data.eval_fraction:
        examples, eval_examples = split_eval(examples, cfg.data.eval_fraction, cfg.train.seed)
    print(f"data: {data_report}")

    before_path = run_dir / "eval_before.json"
    if resume and before_path.exists():  # measured on the base model when the run started
        before = json.loads(before_path.read_text())
    else:
        before = evaluate_all(model, tokenizer, cfg.eval) if cfg.eval.before else {}
        write_json_atomic(before_path, before)
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
    inputs = {"model": {"spec": cfg.model.name, "resolved": resolve_model_path(cfg.model.name)},
              "data": {k: {"path": p, "sha256": content_hash(p)}
                       for k, p in (("train", cfg.data.train), ("eval", cfg.data.eval),
                                    ("ewc_reference", cfg.ewc.reference), ("forgetting", cfg.eval.forgetting))
                       if p},
              "eval_tasks": {t.name: {"path": t.path, "sha256": content_hash(t.path)} for t in cfg.eval.tasks}}
    return write_manifest(run_dir, cfg.stage, inputs, outputs, started)


def evaluate_all(model, tokenizer, cfg: EvalConfig) -> dict[str, float]:
    """Task scores plus the forgetting perplexity, as one flat dict."""
    from posttrain.eval.tasks import evaluate_perplexity, run_eval

    scores = run_eval(model, tokenizer, cfg.tasks) if cfg.tasks else {}
    if cfg.forgetting:
        scores["general_ppl"] = evaluate_perplexity(model, tokenizer, cfg.forgetting, name="general_ppl").score
    return scores


def write_reports(run_dir: Path, before: dict, after: dict) -> None:
    from posttrain.eval.report import bar_chart, format_table, loss_curve

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    if (run_dir / "metrics.jsonl").exists():
        loss_curve(run_dir / "metrics.jsonl", plots / "loss.png")
    if after:
        results = {"before": before, "after": after} if before else {"after": after}
        print(format_table(results))
        bar_chart(results, plots / "eval.png")


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
