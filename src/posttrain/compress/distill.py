"""Knowledge distillation: a student learns a teacher's distributions (logits), its
generations (sequence level), or the teacher's scores of the student's own samples
(on-policy, GKD). Every mode trains through `train.loop.train`.

Modes (`DistillConfig.distill.mode`):

- **logit**: `make_distill_objective(teacher)` runs the frozen teacher (no grad, eval mode,
  bf16 by default) and the student on the same batch (packed or padded, as the loop makes
  it), takes both models' final hidden states at the positions that predict a loss token
  (`loss_position_hidden`), and computes the divergence there only, in chunks of positions:
  the 49k-entry head never produces [tokens, vocab] logits for the whole batch, and with
  several chunks each one is recomputed in backward (activation checkpointing) instead of
  kept. The loss is the token mean over the batch's loss tokens and `loss_tokens` is their
  count, exactly like `causal_lm_loss`, so gradient accumulation and packing stay exact.
- **sequence**: `teacher_generations` turns prompts into chat/completion records whose
  replies are the teacher's generations; the student is then fine-tuned on them with
  `causal_lm_loss` (SFT on teacher outputs, Kim & Rush 2016).
- **on_policy** (GKD, Agarwal et al. 2024): `make_on_policy_objective` wraps the logit
  objective. During training, with probability `lmbda` per micro-batch, the batch's
  completions are replaced by samples from the current student: each example's prompt is
  its tokens before its first label (the generation prompt of a chat example, the prompt of
  a completion; later turns of a multi-turn chat are dropped), the student samples up to
  `max_new_tokens` tokens from it (no grad; through `RolloutModel`, a LoRA-folded plain copy
  that samples 3-4x faster than the PEFT forward), and the divergence is taken on those
  sampled tokens under teacher and student. The data are ordinary chat/completion records:
  their reference completions are the off-policy share (1 - lmbda), as in GKD's mixed
  setting; prompt-only records get a one-token placeholder completion and need lmbda = 1.
  Evaluation (model.eval()) never samples: held-out loss stays on the fixed data (for
  prompt-only records that is the divergence at the first reply token only; use
  chat/completion eval data, or eval tasks, to judge an on-policy run).
  Normalisation: a resampled micro-batch returns the mean over its *sampled* tokens but
  reports `loss_tokens` = the label count the loop planned with, so the loop's weights
  (loss_tokens / step total) still sum to one and the step is a weighted mean of
  micro-batch means. The coin and the sampler use Python's and torch's global RNGs, which
  the loop checkpoints, so a resumed run samples the same tokens.

Divergence conventions (`distill_divergence`, per token, summed over the vocabulary, both
distributions softmax(logits / temperature), no T^2 factor; the same as TRL 1.16's
`GKDTrainer.generalized_jsd_loss`, checked in tests):

- forward_kl = KL(teacher || student) (mode covering; classic KD),
- reverse_kl = KL(student || teacher) (mode seeking; MiniLLM),
- jsd (generalised JSD of GKD, mixture M = beta * teacher + (1 - beta) * student):
  beta * KL(teacher || M) + (1 - beta) * KL(student || M). As TRL does, beta = 0 is exactly
  forward KL and beta = 1 exactly reverse KL; the JSD itself tends to 0 at both ends, with
  JSD / beta -> forward KL as beta -> 0 and JSD / (1 - beta) -> reverse KL as beta -> 1.

`ce_weight` mixes in the student's cross-entropy on the label tokens:
loss = (1 - ce_weight) * divergence + ce_weight * CE (ce_weight = 1 is plain SFT on the
same batches, the baseline the distillation demonstration compares against).
"""

from __future__ import annotations

import json
import math
import random
from itertools import pairwise
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posttrain.adapters import AdapterConfig
from posttrain.config import DataConfig, StageConfig, Strict, TrainConfig
from posttrain.kernels.layers import fused_layers
from posttrain.models import base_model
from posttrain.train.objectives import (
    IGNORE,
    Objective,
    _fused_lora,
    _routing,
    loss_position_hidden,
    output_head,
    own_forward,
    wrapper_label_logits,
)
from posttrain.data.examples import encode_file, with_held_out
from posttrain.eval.suite import EvalConfig, evaluate_all
from posttrain.train.sft import check_adapter_training

LOSSES = ("forward_kl", "reverse_kl", "jsd")
MODES = ("logit", "sequence", "on_policy")


# ----------------------------------------------------------------------------- divergences


def _check_loss(kind: str, temperature: float, beta: float) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown distillation loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1]; got {beta}")


def distill_divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward_kl",
                       temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Per-position divergence [...] between student and teacher logits [..., vocab] (at least fp32).

    See the module docstring for the conventions (forward_kl = KL(teacher || student);
    jsd with mixture beta * teacher + (1 - beta) * student; beta 0 / 1 = forward / reverse KL).
    """
    _check_loss(kind, temperature, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: teacher and student must share the vocabulary")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32, or fp64 (limits tests)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return _kl(t, s)
    if kind == "reverse_kl":
        return _kl(s, t)
    mixture = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    return beta * _kl(t, mixture) + (1 - beta) * _kl(s, mixture)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


# ----------------------------------------------------------------------------- the logit objective


def _chunk_terms(s_head, s_hidden: Tensor, t_head, t_hidden: Tensor, targets: Tensor, kind: str,
                 temperature: float, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(divergence sum, student CE sum, forward KL at T=1 sum, argmax agreements) of one chunk."""
    s_logits = s_head(s_hidden).float()
    with torch.no_grad():
        t_logits = t_head(t_hidden).float()
    return _terms(s_logits, t_logits, targets, kind, temperature, beta)


def _terms(s_logits: Tensor, t_logits: Tensor, targets: Tensor, kind: str, temperature: float,
           beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    div = distill_divergence(s_logits, t_logits, kind, temperature, beta).sum()
    ce = F.cross_entropy(s_logits, targets, reduction="sum")
    with torch.no_grad():
        if kind == "forward_kl" and temperature == 1.0:
            kl = div.detach()
        else:
            kl = distill_divergence(s_logits, t_logits, "forward_kl").sum()
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).sum()
    return div, ce, kl, agree


def freeze_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no parameter ever receives a gradient."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def frozen_bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The teacher for self-distillation (QAT, pruning recovery): the model before it changes."""
    import copy

    return freeze_teacher(copy.deepcopy(model).to(torch.bfloat16))


def make_distill_objective(teacher: torch.nn.Module, loss: str = "forward_kl", temperature: float = 1.0,
                           beta: float = 0.5, ce_weight: float = 0.0, chunk_size: int = 512) -> Objective:
    """objective(student, batch) -> (token-mean loss, metrics) distilling `teacher` into the student.

    The teacher runs in whatever dtype it was loaded in (run_distill: bf16), without
    gradients, in eval mode. Metrics: loss, divergence (the chosen one), kl (forward KL at
    temperature 1, comparable across settings), nll (student CE on the labels), agreement
    (student and teacher argmax equal), loss_tokens.
    """
    _check_loss(loss, temperature, beta)
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1]; got {ce_weight}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    freeze_teacher(teacher)
    t_base = base_model(teacher)
    t_plain_head = t_base.get_output_embeddings()
    t_own = own_forward(teacher)  # a head that must run through the teacher's own forward
    t_head = (lambda logits: logits) if t_own else output_head(teacher)  # noqa: E731 (there: logits already)

    def objective(model, batch: dict) -> tuple[Tensor, dict]:
        device = batch["input_ids"].device
        if next(teacher.parameters()).device != device:  # the loop moved only the student
            teacher.to(device)
        with torch.no_grad():
            if t_own:
                t_hidden, t_targets = wrapper_label_logits(teacher, batch)
            else:
                t_hidden, t_targets = loss_position_hidden(teacher, batch)
        student_logits = None
        with _routing(model, batch), _fused_lora(model), fused_layers(model):
            if own_forward(model):  # the wrapper's (or an unknown head's) forward must run
                student_logits, targets = wrapper_label_logits(model, batch)
                s_hidden = student_logits
            else:
                s_hidden, targets = loss_position_hidden(model, batch)
        n = targets.numel()
        if n != t_targets.numel():
            raise ValueError(f"teacher and student see different loss positions ({t_targets.numel()} vs {n})")
        if n == 0:
            zero = s_hidden.sum() * 0.0
            return zero, {"loss": 0.0, "divergence": 0.0, "kl": 0.0, "nll": 0.0, "agreement": 0.0, "loss_tokens": 0}
        _check_vocab(base_model(model).get_output_embeddings(), t_plain_head)
        s_head = output_head(model)
        sums = [s_hidden.new_zeros((), dtype=torch.float32) for _ in range(4)]
        for i in range(0, n, chunk_size):
            part = slice(i, i + chunk_size)
            if student_logits is not None:
                with torch.no_grad():
                    t_logits = t_head(t_hidden[part]).float()
                terms = _terms(student_logits[part], t_logits, targets[part], loss, temperature, beta)
            elif n > chunk_size and torch.is_grad_enabled():
                terms = checkpoint(_chunk_terms, s_head, s_hidden[part], t_head, t_hidden[part], targets[part], loss,
                                   temperature, beta, use_reentrant=False)
            else:
                terms = _chunk_terms(s_head, s_hidden[part], t_head, t_hidden[part], targets[part], loss,
                                     temperature, beta)
            sums = [a + b for a, b in zip(sums, terms)]
        div, ce, kl, agree = (x / n for x in sums)
        total = (1 - ce_weight) * div + ce_weight * ce if ce_weight else div
        return total, {"loss": total.item(), "divergence": div.item(), "kl": kl.item(), "nll": ce.item(),
                       "agreement": agree.item(), "loss_tokens": n}

    return objective


def _check_vocab(s_head, t_head) -> None:
    s, t = s_head.weight.shape[0], t_head.weight.shape[0]
    if s != t:
        raise ValueError(f"the student's head has {s} vocabulary entries and the teacher's {t}: "
                         "distillation needs teacher and student to share one tokenizer and vocabulary")


# ----------------------------------------------------------------------------- on-policy (GKD)


def batch_examples(batch: dict) -> list[tuple[list[int], list[int], int | None]]:
    """(input_ids, labels, task id or None) of every example in a packed or padded batch."""
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    tasks = batch["task_ids"].tolist() if "task_ids" in batch else None
    out = []
    if "position_ids" in batch and "attention_mask" not in batch:  # one packed row
        pos = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in pairwise(starts):
            out.append((ids[0][a:b], labels[0][a:b], tasks[0][a] if tasks else None))
        return out
    lengths = batch["attention_mask"].sum(1).tolist() if "attention_mask" in batch else [len(r) for r in ids]
    for row, n in enumerate(lengths):
        out.append((ids[row][:n], labels[row][:n], tasks[row][0] if tasks else None))
    return out


def prompt_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """An example's tokens before its first label (position 0 is never a label)."""
    first = next((i for i in range(1, len(labels)) if labels[i] != IGNORE), len(labels))
    return input_ids[:first]


def resampled_batch(batch: dict, prompts: list[list[int]], samples: list[list[int]], pad_token_id: int,
                    tasks: list[int | None] | None = None) -> dict:
    """A batch of the same layout (packed / padded) with `samples` as the labelled completions."""
    from posttrain.data.collate import collate_packed, collate_padded

    examples = [{"input_ids": p + s, "labels": [IGNORE] * len(p) + s} for p, s in zip(prompts, samples)]
    packed = "position_ids" in batch and "attention_mask" not in batch
    new = collate_packed(examples) if packed else collate_padded(examples, pad_token_id)
    if tasks is not None and tasks[0] is not None:
        if packed:
            per_token = [t for ex, t in zip(examples, tasks) for _ in ex["input_ids"]]
            new["task_ids"] = torch.tensor([per_token], dtype=torch.long)
        else:
            width = new["input_ids"].shape[1]
            new["task_ids"] = torch.tensor(tasks, dtype=torch.long)[:, None].expand(-1, width).contiguous()
    return {k: v.to(batch["input_ids"].device) for k, v in new.items()}


def make_on_policy_objective(objective: Objective, tokenizer, lmbda: float = 1.0, max_new_tokens: int = 64,
                             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> Objective:
    """Wrap `objective` (the logit objective) GKD-style: in training, with probability `lmbda`
    per micro-batch, score the student's own samples instead of the batch's completions.

    Metrics add on_policy (1/0) and sampled_tokens; `loss_tokens` stays the batch's planned
    label count (module docstring: normalisation).
    """
    from posttrain.generate.engine import GenerationConfig, generate
    from posttrain.rl.rollout import RolloutModel

    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1]; got {lmbda}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                           top_k=top_k)
    state: dict = {}

    def wrapped(model, batch: dict) -> tuple[Tensor, dict]:
        planned = int((batch["labels"][:, 1:] != IGNORE).sum())
        if not model.training or lmbda == 0.0 or (lmbda < 1.0 and random.random() >= lmbda):
            loss, metrics = objective(model, batch)
            return loss, {**metrics, "on_policy": 0.0, "sampled_tokens": 0}
        policy = getattr(model, "module", model)  # DDP
        if state.get("policy") is not policy:
            state["policy"], state["sampler"] = policy, RolloutModel(policy)
        sampler = state["sampler"]
        sampler.sync(policy)
        examples = batch_examples(batch)
        prompts = [prompt_of(ids, labels) for ids, labels, _ in examples]
        out = generate(sampler.model, tokenizer, prompts, gen)
        new = resampled_batch(batch, prompts, out.token_ids, tokenizer.pad_token_id, [t for *_, t in examples])
        loss, metrics = objective(model, new)
        return loss, {**metrics, "on_policy": 1.0, "sampled_tokens": metrics["loss_tokens"], "loss_tokens": planned}

    return wrapped


# ----------------------------------------------------------------------------- sequence level


def teacher_generations(teacher, tokenizer, prompts: list, config, batch_size: int = 16) -> list[dict]:
    """Records whose replies are the teacher's generations, one per prompt.

    Message-list prompts, and string prompts under `config.chat`, give chat records
    ({"messages": prompt turns + the assistant reply}, with `config.system` if one was
    added); other string prompts give completion records ({"prompt", "completion"}).
    """
    from posttrain.generate.engine import generate

    records = []
    for i in range(0, len(prompts), batch_size):
        group = prompts[i:i + batch_size]
        out = generate(teacher, tokenizer, group, config)
        for prompt, text in zip(group, out.texts):
            if isinstance(prompt, str) and not config.chat:
                records.append({"prompt": prompt, "completion": text})
                continue
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if config.system is not None and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": config.system}, *messages]
            records.append({"messages": [*messages, {"role": "assistant", "content": text}]})
    return records


# ----------------------------------------------------------------------------- the stage


class TeacherConfig(Strict):
    name: str = Field(..., description="'default', HF dir, run dir, .gguf file or hub id (adapters are merged)")
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = Field("bf16", description="the teacher only runs forward")
    trust_remote_code: bool = False


class DistillDataConfig(DataConfig):
    kind: Literal["chat", "completion", "text", "prompt"] | None = None
    chat: bool = Field(True, description="prompt records: string prompts go through the chat template")


class DistillSettings(Strict):
    mode: Literal["logit", "sequence", "on_policy"] = "logit"
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both models in the divergence")
    beta: float = Field(0.5, ge=0, le=1, description="jsd mixture weight of the teacher (0: forward KL, 1: reverse)")
    ce_weight: float = Field(0.0, ge=0, le=1, description="loss = (1 - w) divergence + w CE on the labels")
    lmbda: float = Field(1.0, ge=0, le=1, description="on_policy: share of micro-batches on student samples")
    chunk_size: int = Field(512, gt=0, description="loss positions per head chunk")
    max_new_tokens: int = Field(128, gt=0, description="sequence: teacher reply budget; on_policy: sample budget")
    sample_temperature: float = Field(1.0, gt=0, description="on_policy student sampling / sequence teacher sampling")
    top_p: float = Field(1.0, gt=0, le=1)
    teacher_sample: bool = Field(False, description="sequence: sample the teacher instead of greedy decoding")
    generation_batch_size: int = Field(16, gt=0)


class DistillEvalConfig(EvalConfig):
    teacher: bool = Field(True, description="also evaluate the teacher (the target the student is measured against)")


class DistillConfig(StageConfig):
    stage: Literal["distill"] = "distill"
    output_dir: str = "runs/distill"
    adapter: AdapterConfig = AdapterConfig()
    teacher: TeacherConfig
    data: DistillDataConfig
    distill: DistillSettings = DistillSettings()
    train: TrainConfig = TrainConfig()
    eval: DistillEvalConfig = DistillEvalConfig()

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        mode, kind = self.distill.mode, self.data.kind
        if mode == "logit" and kind == "prompt":
            raise ValueError("data.kind: logit distillation needs token sequences (chat/completion/text); prompt "
                             "records go with distill.mode=sequence or on_policy")
        if mode in ("sequence", "on_policy") and kind == "text":
            raise ValueError(f"data.kind: distill.mode={mode} needs prompts (prompt/chat/completion records), not text")
        if mode == "on_policy" and kind == "prompt" and self.distill.lmbda < 1:
            raise ValueError("distill.lmbda: prompt records have no reference completion for the off-policy share; "
                             "set lmbda=1 or use chat/completion records")
        if mode == "on_policy" and self.adapter.method in ("prompt", "bottleneck"):
            raise ValueError(f"adapter.method={self.adapter.method}: on-policy sampling needs a student that samples "
                             "without virtual tokens or task routing (full, freeze, lora, dora, ia3)")
        check_adapter_training(self.adapter, self.train, self.data)
        return self


def check_same_vocab(student, student_tokenizer, teacher, teacher_tokenizer) -> None:
    """Teacher and student must share a tokenizer: same token -> id map and head size."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))
        raise ValueError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens, {len(differ)} "
            f"token->id entries not shared, e.g. {differ[:3]}): distillation compares distributions over one "
            "vocabulary, so the student must use the teacher's tokenizer")
    _check_vocab(base_model(student).get_output_embeddings(), base_model(teacher).get_output_embeddings())


def prompt_examples(tokenizer, records: list[dict], chat: bool, max_length: int) -> list[dict]:
    """Prompt records as examples whose only label is a placeholder EOS (on-policy with lmbda=1
    replaces it with a student sample; it only gives each example one unit of weight)."""
    from posttrain.generate.engine import encode_prompts

    eos = tokenizer.eos_token_id
    out = []
    for r in records:
        ids = encode_prompts(tokenizer, [r["prompt"]], chat=chat)[0][: max_length - 1]
        out.append({"input_ids": ids + [eos], "labels": [IGNORE] * len(ids) + [eos]})
    return out


def record_prompts(records: list[dict], kind: str) -> list:
    """The prompt of each record: a prompt record's prompt, a completion's prompt string,
    a chat's turns before its first assistant reply."""
    if kind in ("prompt", "completion"):
        return [r["prompt"] for r in records]
    prompts = []
    for r in records:
        first = next(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
        prompts.append(r["messages"][:first])
    return prompts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from posttrain.fileio import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _load_examples(cfg: DistillConfig, path: str, tokenizer, teacher, run_dir: Path, name: str,
                   resume: bool) -> tuple[list[dict], dict]:
    """A data file as training examples for the configured mode (sequence: teacher replies)."""
    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_record
    from posttrain.generate.engine import GenerationConfig

    mode, d = cfg.distill.mode, cfg.data
    if mode == "logit":
        return encode_file(tokenizer, path, d.kind, d.max_length, d.skip_invalid)
    data = load_records(path, kind=d.kind, skip_invalid=d.skip_invalid)
    report = {"path": path, "kind": data.kind, "records": len(data.records), "skipped_invalid": data.skipped}
    if data.kind not in ("prompt", "chat", "completion"):
        raise ValueError(f"{path}: distill.mode={mode} needs prompt, chat or completion records; got {data.kind}")
    if mode == "on_policy":
        if data.kind == "prompt":
            if cfg.distill.lmbda < 1:
                raise ValueError(f"{path}: prompt records need distill.lmbda=1 (no reference completion for the "
                                 "off-policy share)")
            examples = prompt_examples(tokenizer, data.records, d.chat, d.max_length)
        else:
            examples, report = encode_file(tokenizer, path, data.kind, d.max_length, d.skip_invalid)
        return examples, {**report, "examples": len(examples)}
    # sequence level: the teacher answers every prompt once; cached so a resumed run reuses them
    cache = run_dir / f"teacher_generations_{name}.jsonl"
    if resume and cache.exists():
        records = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    else:
        s = cfg.distill
        gen = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=s.teacher_sample,
                               temperature=s.sample_temperature, top_p=s.top_p, chat=d.chat and data.kind == "prompt",
                               seed=cfg.train.seed if s.teacher_sample else None)
        records = teacher_generations(teacher, tokenizer, record_prompts(data.records, data.kind), gen,
                                      s.generation_batch_size)
        _write_jsonl(cache, records)
    examples = []
    for r in records:
        ex = encode_record(tokenizer, r, "chat" if "messages" in r else "completion", max_length=d.max_length)
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no teacher generation left a loss token after truncation to {d.max_length}")
    return examples, {**report, "teacher_generations": str(cache), "examples": len(examples)}


def run_distill(cfg: DistillConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the stage end to end (run dir like run_sft, plus the teacher's scores); returns the manifest."""
    from posttrain.adapters import apply_adapter, trainable_summary
    from posttrain.models import load_model, save_model
    from posttrain.stage import stage_inputs, start_stage
    from posttrain.train.loop import train
    from posttrain.train.objectives import causal_lm_loss

    run = start_stage(cfg, resume, overwrite, seed=cfg.train.seed)
    model, tokenizer, run_dir = run.model, run.tokenizer, run.run_dir
    teacher, teacher_tokenizer = load_model(cfg.teacher.name, dtype=cfg.teacher.dtype,
                                            trust_remote_code=cfg.teacher.trust_remote_code, merge_adapter=True)
    check_same_vocab(model, tokenizer, teacher, teacher_tokenizer)
    freeze_teacher(teacher)

    examples, eval_examples, data_report = with_held_out(
        cfg.data, cfg.train.seed,
        lambda path, name: _load_examples(cfg, path, tokenizer, teacher, run_dir, name, resume))
    print(f"data: {data_report}")

    before = run.cached("eval_before.json", lambda: evaluate_all(model, tokenizer, cfg.eval) if cfg.eval.before else {})
    teacher_scores = run.cached("eval_teacher.json",
                                lambda: evaluate_all(teacher, tokenizer, cfg.eval) if cfg.eval.teacher else {})
    model = apply_adapter(model, cfg.adapter, tokenizer)
    summary = trainable_summary(model)
    print(summary["line"])

    s = cfg.distill
    if s.mode == "sequence":
        objective = causal_lm_loss
        del teacher  # its generations are all the student learns from
    else:
        objective = make_distill_objective(teacher, s.loss, s.temperature, s.beta, s.ce_weight, s.chunk_size)
        if s.mode == "on_policy":
            objective = make_on_policy_objective(objective, tokenizer, s.lmbda, s.max_new_tokens,
                                                 s.sample_temperature, s.top_p)
    tasks = cfg.adapter.tasks if cfg.adapter.method == "bottleneck" else None
    model, train_summary = train(model, objective, examples, cfg.train, run_dir, pad_token_id=tokenizer.pad_token_id,
                                 tasks=tasks, eval_examples=eval_examples, resume=resume)
    save_model(model, tokenizer, run_dir / "final")
    after = evaluate_all(model, tokenizer, cfg.eval)
    _write_reports(run_dir, teacher_scores, before, after)
    outputs = {"train": train_summary, "eval_before": before, "eval_after": after, "eval_teacher": teacher_scores,
               "data": data_report, "trainable": summary, "mode": s.mode}
    files = {"train": cfg.data.train, "eval": cfg.data.eval, "forgetting": cfg.eval.forgetting}
    return run.finish(stage_inputs(cfg.model.name, files, cfg.eval.tasks, teacher=cfg.teacher.name), outputs)


def _write_reports(run_dir: Path, teacher: dict, before: dict, after: dict) -> None:
    """Loss curve, and teacher / before / after table and bar chart (the gap the student closes)."""
    from posttrain.eval.report import bar_chart, format_table, loss_curve

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    if (run_dir / "metrics.jsonl").exists():
        loss_curve(run_dir / "metrics.jsonl", plots / "loss.png")
    if after:
        results = {k: v for k, v in (("teacher", teacher), ("before", before), ("after", after)) if v}
        print(format_table(results))
        bar_chart(results, plots / "eval.png")
