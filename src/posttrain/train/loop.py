"""THE training loop: every gradient-based stage runs through `train`.

Plain and visible: plan micro-batches, forward, loss, backward, clip, step. The data
order is a pure function of (seed, epoch), so a checkpoint only needs the step number
to resume exactly; model/optimizer/scheduler/RNG state make the rest bit-identical.
accelerate handles devices, DDP (gloo on CPU, NCCL on GPU), FSDP/DeepSpeed and
mixed precision.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.config import TrainConfig
from posttrain.data.collate import (collate_packed, collate_padded, collate_two_sided, is_two_sided, plan_batches,
                                   two_sided_lengths)
from posttrain.fileio import atomic_dir, atomic_write, write_text_atomic
from posttrain.train.objectives import IGNORE, Objective

Regularizer = Callable[[torch.nn.Module], torch.Tensor]


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    best_eval: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)


def loss_tokens(example: dict) -> int:
    """What the objective's mean is over: positions that predict a loss token (the first
    token is never predicted), or one per preference pair."""
    if is_two_sided(example):
        return 1
    return sum(1 for t in example["labels"][1:] if t != IGNORE)


def example_length(example: dict, packing: bool = False) -> int:
    """Tokens an example adds to a batch (a padded pair: two rows of the longer side)."""
    if is_two_sided(example):
        chosen, rejected = two_sided_lengths(example)
        return chosen + rejected if packing else 2 * max(chosen, rejected)
    return len(example["input_ids"])


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def _sizes(cfg: TrainConfig, pairs: bool = False) -> dict:
    """Packed rows are filled to max_tokens (pairs: also at most batch_size pairs per row, so a
    step holds a known number of pairs); padded batches hold batch_size examples."""
    if cfg.packing:
        return {"packing": True, "batch_size": cfg.batch_size if pairs else None, "max_tokens": cfg.max_tokens}
    return {"packing": False, "batch_size": cfg.batch_size, "max_tokens": None}


def plan_steps(examples: list[dict], cfg: TrainConfig, world: int) -> list[list[list[int]]]:
    """Optimizer steps, each a list of grad_accum*world micro-batches (example indices)."""
    lengths = [example_length(e, cfg.packing) for e in examples]
    per_step = cfg.grad_accum * world
    epochs = math.ceil(cfg.epochs)
    micro: list[list[int]] = []
    for epoch in range(epochs):
        groups = plan_batches(lengths, shuffle=cfg.shuffle, seed=cfg.seed, epoch=epoch,
                              **_sizes(cfg, bool(examples) and is_two_sided(examples[0])))
        if epoch == epochs - 1 and cfg.epochs < epochs:  # fractional last epoch
            groups = groups[: int(len(groups) * (cfg.epochs - epoch))]
        micro.extend(groups)
    steps = [micro[i : i + per_step] for i in range(0, len(micro) - per_step + 1, per_step)]
    if steps and cfg.max_steps is not None:
        if cfg.max_steps > len(steps):  # cycle the data again, in fresh shuffles
            return plan_steps(examples, cfg.model_copy(update={"epochs": cfg.epochs * 2}), world)
        steps = steps[: cfg.max_steps]
    if not steps:
        raise ValueError(
            f"{len(examples)} examples make {len(micro)} micro-batches, fewer than one optimizer step "
            f"(grad_accum {cfg.grad_accum} x {world} processes): lower train.batch_size/max_tokens/grad_accum"
        )
    return steps


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }


def _set_rng_state(state: dict, torch_state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(torch_state["cpu"])
    if torch.cuda.is_available() and "cuda" in torch_state:
        torch.cuda.set_rng_state_all(torch_state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs start with '.' and are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_rng(path: Path) -> None:
    """This process's Python, NumPy and torch RNG states into path/rng.json + rng.pt."""
    torch_rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        torch_rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(torch_rng, path / "rng.pt")
    (path / "rng.json").write_text(json.dumps(_rng_state()))


def load_rng(path: Path) -> None:
    _set_rng_state(json.loads((path / "rng.json").read_text()), torch.load(path / "rng.pt", weights_only=True))


def save_train_state(path: Path, model, optimizer, scheduler) -> None:
    """What continues a trainer exactly: trainable weights, optimizer, schedule and RNG (into `path`)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(path / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    save_rng(path)


def load_train_state(path: Path, model, optimizer, scheduler) -> None:
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    load_rng(path)


def write_checkpoint(run_dir: Path, step: int, fields: dict, keep: int, write: Callable[[Path], None]) -> Path:
    """checkpoints/step-N atomically: `write(tmp)` fills a temp dir, state.json (`fields`) goes in
    last and marks it complete, then the rename; only the newest `keep` are kept. Every trainer's
    checkpoints (the offline loop, the RL driver, online DPO) are written here."""
    final = run_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as tmp:
        write(tmp)
        (tmp / "state.json").write_text(json.dumps(fields, indent=2))
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_point(run_dir: Path, resume: bool) -> Path | None:
    """The last complete checkpoint when resuming; None (saying so when resuming) otherwise."""
    ckpts = checkpoint_dirs(run_dir) if resume else []
    if resume and not ckpts:
        print(f"resume: no complete checkpoint in {run_dir}/checkpoints; starting from step 0")
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, keep: int) -> Path:
    fields = {k: v for k, v in state.__dict__.items() if k != "history"}
    return write_checkpoint(run_dir, state.step, fields, keep,
                            lambda tmp: save_train_state(tmp, model, optimizer, scheduler))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    load_train_state(path, model, optimizer, scheduler)
    return TrainState(**json.loads((path / "state.json").read_text()))


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop rows past the checkpoint
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency; a broken install only loses the TB copy
            print("warning: tensorboard not importable; logging to metrics.jsonl only")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_collate(packing: bool, pad_token_id: int, tasks: list[str] | None, pairs: bool = False):
    if pairs:
        return lambda exs: collate_two_sided(exs, pad_token_id, packed=packing)
    if packing:
        return lambda exs: collate_packed(exs, tasks=tasks)
    return lambda exs: collate_padded(exs, pad_token_id, tasks=tasks)


def _batch_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


@torch.no_grad()
def evaluate_loss(model, objective: Objective, examples: list[dict], cfg: TrainConfig, collate, accelerator) -> float:
    """Token-mean loss over `examples`, split across processes."""
    was_training = model.training
    model.eval()
    lengths = [example_length(e, cfg.packing) for e in examples]
    groups = plan_batches(lengths, shuffle=False, seed=0, epoch=0, **_sizes(cfg, bool(examples) and is_two_sided(examples[0])))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for g in groups[accelerator.process_index :: accelerator.num_processes]:
        batch = _to_device(collate([examples[i] for i in g]), accelerator.device)
        with accelerator.autocast():
            loss, m = objective(model, batch)
        total += torch.tensor([loss.item() * m["loss_tokens"], m["loss_tokens"]], dtype=torch.float64,
                              device=accelerator.device)
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


# torch's default AdamW on CPU tensors steps one tensor at a time; the fused kernel does the whole
# update in one pass. 60 fp32 tensors, 53M values, 1 thread: 218-721 ms a step by default, 71-83 ms
# fused (bench/scaling.py full SFT at 512 tokens: 135M 141 -> 174.5 tok/s, 360M 41.9 -> 106.1). Opt-in
# (train.fused_optimizer) for now: it changed the trajectory of the tiny RL learning tests (GRPO 20 steps:
# reward 0.70 -> 0.64 instead of rising), which needs a look before it becomes the default.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused with train.fused_optimizer where torch has the kernel); no weight decay on biases, norms
    and 1-D params."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: check the adapter/freeze settings")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    fused = (cfg.fused_optimizer and len({p.device.type for p in params}) == 1
             and params[0].device.type in ("cpu", "cuda") and all(p.dtype in FUSED_DTYPES for p in params))
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant; transformers 5 renamed the method).
    Our fused kernels step aside under it (kernels.checkpointing)."""
    from posttrain.models import base_model

    base = base_model(model)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_accelerator(mixed_precision: str = "no"):
    """accelerate keeps one process-wide state and refuses a second Accelerator with another mixed
    precision; a single process running stages one after another (a pipeline, the tests) gets the
    precision each stage asks for. A distributed launch keeps accelerate's rule."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)


def optimizer_step(model, objective: Objective, batches: list[dict], n_global: int, optimizer, scheduler,
                   cfg: TrainConfig, acc, regularizer: Regularizer | None = None,
                   stats: dict[str, float] | None = None,
                   after_backward: Callable[[], None] | None = None) -> tuple[float, int, float | None]:
    """One optimizer step over this process's micro-batches (gradient accumulation).

    Each micro-batch's mean loss is weighted by its share of the step's `n_global` loss
    units (tokens, or pairs), so the step descends the mean over all of them whatever
    the split into micro-batches and processes. Returns (sum of loss x units here,
    tokens seen here, gradient norm before clipping). Every trainer's update goes
    through here: the offline loop below and the online/RL drivers. `stats`, when
    given, receives the objective's other scalar metrics (DPO rewards and margins,
    token accuracy...) averaged over this process's micro-batches by their loss units.
    `after_backward` runs once the gradients are accumulated, before clipping (the RL replicas'
    own all-reduce, rl/distributed.py).
    """
    world = acc.num_processes
    raw = acc.unwrap_model(model)
    loss_sum, tokens = 0.0, 0
    sums: dict[str, float] = {}
    units = 0
    for a, batch in enumerate(batches):
        tokens += _batch_tokens(batch)
        sync = nullcontext() if a == len(batches) - 1 else acc.no_sync(model)
        with sync:
            with acc.autocast():
                loss, m = objective(model, batch)
                scaled = loss * (m["loss_tokens"] * world / max(n_global, 1))
                if regularizer is not None and cfg.ewc_weight > 0:
                    scaled = scaled + (cfg.ewc_weight / 2) * regularizer(raw) / len(batches)
            # backward outside autocast: leaving it frees autocast's bf16 copies of the weights
            # (2 bytes a parameter) before the gradients are allocated
            acc.backward(scaled)
        loss_sum += loss.item() * m["loss_tokens"]
        units += m["loss_tokens"]
        for key, value in m.items():
            if key not in ("loss", "loss_tokens") and isinstance(value, (int, float)):
                sums[key] = sums.get(key, 0.0) + float(value) * m["loss_tokens"]
    if stats is not None:
        stats.update({key: total / max(units, 1) for key, total in sums.items()})
    if after_backward is not None:
        after_backward()
    grad_norm = None
    if cfg.max_grad_norm is not None:
        grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, tokens, grad_norm


def train(
    model: torch.nn.Module,
    objective: Objective,
    train_examples: list[dict],
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    pad_token_id: int,
    tasks: list[str] | None = None,
    eval_examples: list[dict] | None = None,
    resume: bool = False,
    regularizer: Regularizer | None = None,
    accelerator=None,
) -> tuple[torch.nn.Module, dict]:
    """Train in place; returns (unwrapped model, summary). Writes metrics and checkpoints."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    world, rank = acc.num_processes, acc.process_index
    main = acc.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    steps = plan_steps(train_examples, cfg, world)
    total_steps = len(steps)
    n_loss = [loss_tokens(e) for e in train_examples]
    collate = make_collate(cfg.packing, pad_token_id, tasks, pairs=is_two_sided(train_examples[0]))

    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)

    state = TrainState()
    ckpt = resume_point(run_dir, resume)
    if ckpt is not None:
        state = load_checkpoint(ckpt, raw, optimizer, scheduler)
        if main:
            print(f"resumed from {ckpt} (step {state.step}/{total_steps})")
    log = MetricsLog(run_dir, state.step if ckpt is not None else None, enabled=main)
    best_path = run_dir / "checkpoints" / "best.safetensors"

    model.train()
    bar = tqdm(total=total_steps, initial=state.step, disable=not (cfg.progress and main), desc="train",
               dynamic_ncols=True)
    start, start_tokens, start_step = time.perf_counter(), state.tokens, state.step
    while state.step < total_steps and not state.stopped_early:
        groups = steps[state.step]
        n_global = sum(n_loss[i] for g in groups for i in g)
        mine = [groups[a * world + rank] for a in range(cfg.grad_accum)]
        batches = [_to_device(collate([train_examples[i] for i in g]), acc.device) for g in mine]
        extra: dict[str, float] = {}
        loss_sum, step_tokens, grad_norm = optimizer_step(model, objective, batches, n_global, optimizer, scheduler,
                                                          cfg, acc, regularizer, stats=extra)
        state.step += 1

        totals = acc.reduce(torch.tensor([loss_sum, float(step_tokens)], device=acc.device), "sum")
        state.tokens += int(totals[1])
        elapsed = time.perf_counter() - start
        tok_s = (state.tokens - start_tokens) / max(elapsed, 1e-9)
        row = {"step": state.step, "loss": float(totals[0]) / max(n_global, 1),
               "lr": scheduler.get_last_lr()[0], "tokens": state.tokens, "tokens_per_s": round(tok_s, 1)}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        row.update({k: round(v, 6) for k, v in extra.items()})  # this process's micro-batches
        if regularizer is not None and cfg.ewc_weight > 0:
            row["ewc_penalty"] = float(regularizer(raw).detach())

        if eval_examples and cfg.eval_every and (state.step % cfg.eval_every == 0 or state.step == total_steps):
            eval_loss = evaluate_loss(model, objective, eval_examples, cfg, collate, acc)
            row["eval_loss"] = eval_loss
            if state.best_eval is None or eval_loss < state.best_eval:
                state.best_eval, state.best_step, state.bad_evals = eval_loss, state.step, 0
                if main and cfg.restore_best:
                    best = trainable_state(raw)
                    atomic_write(best_path, lambda tmp: save_file(best, tmp))
            else:
                state.bad_evals += 1
                if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
                    state.stopped_early = True
        if state.step % cfg.log_every == 0 or "eval_loss" in row or state.step == total_steps:
            log.write(row)
        state.history.append(row)
        done_steps = state.step - start_step
        eta = (total_steps - state.step) * elapsed / max(done_steps, 1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tok_s:.0f}", eta=f"{eta / 60:.1f}m")
        bar.update(1)

        if cfg.save_every and (state.step % cfg.save_every == 0 or state.stopped_early) and state.step < total_steps:
            acc.wait_for_everyone()
            if main:
                save_checkpoint(run_dir, raw, optimizer, scheduler, state, cfg.keep_checkpoints)
            acc.wait_for_everyone()
    bar.close()
    log.close()
    acc.wait_for_everyone()

    if state.best_step is not None and cfg.restore_best and state.best_step != state.step:
        load_trainable_state(raw, load_file(str(best_path)))
    elapsed = time.perf_counter() - start
    summary = {
        "steps": state.step,
        "total_steps": total_steps,
        "tokens": state.tokens,
        "train_loss": state.history[-1]["loss"] if state.history else None,
        "best_eval_loss": state.best_eval,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "tokens_per_s": (state.tokens - start_tokens) / max(elapsed, 1e-9),
        "seconds": elapsed,
    }
    return raw, summary
