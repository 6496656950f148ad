"""Single-controller RL driver (HybridFlow style): PPO, GRPO and RLOO read top to bottom.

The driver owns no model. Roles live in worker groups: the actor (policy, its optimizer and
the rollout copy it samples from; also the reference when training LoRA, as the base with
adapters disabled), the critic (PPO only), a reference (full fine-tuning only: a frozen
copy) and the reward (any `RewardFunction`). The driver moves one typed `Batch` between
them: tensors plus per-row metadata, split across a group's data-parallel workers and
merged back. A group runs its workers in this process (`local`, the default) or as Ray
actors (`ray`); the driver code is the same, see `rl_step` and `async_step`.

Per-token tensors are ``[B, T]`` over each rollout's response tokens, right padded, with
`mask`. Training packs each (prompt, response) of a minibatch into one row without padding
(as DPO's pairs), so an update costs the real tokens only.

Rollout modes (`rollout.mode`). sync: the actor samples from its own rollout copy, then trains
on what it sampled. one_step_off / async: separate rollout workers (`RolloutWorker`) sample the
batches of the next steps while the actor trains on the current one (`RolloutQueue`, at most
`rollout.max_staleness` batches ahead: 1 for one_step_off); after each update the actor pushes
its trainable tensors (LoRA: the adapter only) to them (`push_weights`). Every sample records the
policy version it was sampled with, and the update refuses samples beyond the bound or from
weights other than those sent (rl/rollout.check_staleness); the rollout log-probs feed the
TIS/MIS corrections against the trainer's own. With the Ray backend the actor and the critic can
be data-parallel groups (`actor_workers`, `critic_workers`; rl/distributed.py).

With an `env` (multi-turn tool use, rl/tools.py) a rollout is an episode: `response_ids` hold
the model's turns and the observation turns between them, `response_mask` is 1 on the model's
tokens, and the per-token tensors run over those tokens only; observations are context in
training, never labels. The environment's answer check is the score (plus `reward` if given).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from posttrain.adapters import AdapterConfig
from posttrain.config import StageConfig, Strict
from posttrain.rl.online_dpo import OnlineDataConfig
from posttrain.train.preference import PairTrainConfig
from posttrain.eval.suite import EvalConfig, evaluate_all

IGNORE = -100


# ----------------------------------------------------------------------------- the batch


@dataclass
class Batch:
    """Rows of one rollout batch: tensors with a leading row dimension, and per-row metadata lists."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        for v in self.tensors.values():
            return v.shape[0]
        for v in self.meta.values():
            return len(v)
        return 0

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.tensors.items()} | {k: len(v) for k, v in self.meta.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch fields disagree on the number of rows: {sizes}")

    def __getitem__(self, key: str):
        return self.tensors[key] if key in self.tensors else self.meta[key]

    def split(self, n: int) -> list[Batch]:
        """n contiguous parts (sizes differ by at most one); empty parts are dropped."""
        size = len(self)
        bounds = [round(i * size / n) for i in range(n + 1)]
        return [self.slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    def slice(self, a: int, b: int) -> Batch:
        return Batch({k: v[a:b] for k, v in self.tensors.items()}, {k: v[a:b] for k, v in self.meta.items()})

    def index(self, idx: list[int]) -> Batch:
        t = torch.tensor(idx, dtype=torch.long)
        return Batch({k: v[t] for k, v in self.tensors.items()}, {k: [v[i] for i in idx] for k, v in self.meta.items()})

    def union(self, other: Batch) -> Batch:
        """This batch's fields plus `other`'s (same rows); a field in both must not differ."""
        if len(other) and len(self) and len(other) != len(self):
            raise ValueError(f"cannot join batches of {len(self)} and {len(other)} rows")
        for k in set(self.tensors) & set(other.tensors):
            if not torch.equal(self.tensors[k], other.tensors[k]):
                raise ValueError(f"both batches carry a different {k!r}")
        return Batch({**self.tensors, **other.tensors}, {**self.meta, **other.meta})

    @staticmethod
    def cat(parts: list[Batch]) -> Batch:
        """Rows of all parts in order; [B, T] tensors are right padded with zeros to the widest."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Batch()
        tensors = {}
        for k in parts[0].tensors:
            vals = [p.tensors[k] for p in parts]
            if vals[0].dim() == 2:
                width = max(v.shape[1] for v in vals)
                vals = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in vals]
            tensors[k] = torch.cat(vals)
        meta = {k: [x for p in parts for x in p.meta[k]] for k in parts[0].meta}
        return Batch(tensors, meta)


def pad_rows(rows: list[list[float]], dtype=torch.float32) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def packed_sequences(prompt_ids: list[list[int]], response_ids: list[list[int]],
                     loss_masks: list[list[int]] | None = None) -> dict[str, Tensor]:
    """Prompt + response of every row in one packed row; labels on the response tokens only.

    The label order (row-major) is row 0's response tokens, then row 1's, ...: the order of
    `x[mask.bool()]` for a right-padded [B, T] tensor over the same responses. Multi-turn
    episodes (rl/tools.py) pass `loss_masks`: a response is then the model's turns with the
    tool observations between them, and only tokens with mask 1 get a label, so observation
    tokens are context only (no log-prob, ratio, KL or gradient of their own); the [B, T]
    tensors then run over each row's masked-in tokens.
    """
    from posttrain.data.collate import collate_packed

    if loss_masks is None:
        labels = list(response_ids)
    else:
        labels = []
        for k, (r, m) in enumerate(zip(response_ids, loss_masks)):
            if len(m) != len(r):
                raise ValueError(f"row {k}: {len(r)} response tokens but a loss mask of {len(m)}")
            labels.append([t if keep else IGNORE for t, keep in zip(r, m)])
    rows = [{"input_ids": p + r, "labels": [IGNORE] * len(p) + lab}
            for p, r, lab in zip(prompt_ids, response_ids, labels)]
    batch = collate_packed(rows)
    batch["seq_index"] = torch.tensor([[k for k, r in enumerate(rows) for _ in r["input_ids"]]], dtype=torch.long)
    return batch


def micro_batches(n_tokens: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive row groups of at most max_tokens tokens (a longer row goes alone)."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(n_tokens):
        if cur and used + n > max_tokens:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def packed_groups(prompt_ids: list[list[int]], response_ids: list[list[int]], max_tokens: int,
                  loss_masks: list[list[int]] | None = None):
    """(row indices, packed batch) per micro-batch of at most max_tokens tokens."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    for group in micro_batches(lengths, max_tokens):
        yield group, packed_sequences([prompt_ids[i] for i in group], [response_ids[i] for i in group],
                                      None if loss_masks is None else [loss_masks[i] for i in group])


def sequences(batch: Batch) -> tuple[list[list[int]], list[list[int]], list[list[int]] | None]:
    """(prompt ids, response ids, loss masks or None) of a rollout batch's rows."""
    return batch["prompt_ids"], batch["response_ids"], batch.meta.get("response_mask")


def trained_lengths(response_ids: list[list[int]], loss_masks: list[list[int]] | None) -> list[int]:
    """Labelled tokens per row: the whole response, or its masked-in (model-written) tokens."""
    return [len(r) for r in response_ids] if loss_masks is None else [sum(m) for m in loss_masks]


def per_row(flat: Tensor, lengths: list[int], group: list[int]) -> list[list[float]]:
    """A micro-batch's per-token values (label order) back into one list per row (`lengths`: labelled
    tokens of every row of the batch)."""
    return [x.tolist() for x in flat.split([lengths[i] for i in group])]


def minibatch_updates(model, objective, batch: Batch, fields: tuple[str, ...], algo, train_cfg, optimizer, scheduler,
                      acc, seed: int, max_len: int | None = None, dp: tuple[int, int] = (0, 1)) -> list[dict]:
    """algo.epochs passes of algo.minibatches optimizer steps over a rollout batch.

    Each step's rows are packed into micro-batches of at most train_cfg.max_tokens tokens, the
    per-token `fields` of the batch flattened in label order beside them, with `rows` (each
    token's row in the step) and `agg_weight` (algo.loss_agg over the step's rows; `max_len`
    normalises seq-mean-token-sum-norm); the objective's metrics come back token-weighted, one
    row per step, with the loss and gradient norm.

    Data parallel (`dp` = (rank, world) > 1 replicas, rl/distributed.py): every rank holds the
    whole batch and draws the same minibatches; each trains its contiguous share of a minibatch's
    rows, with the weights (aggregation, token count) of the whole minibatch, and the summed
    gradients are all-reduced before the step, so the replicas take the one-process step.
    """
    from posttrain.rl.algorithms import aggregation_weights
    from posttrain.rl.distributed import all_reduce_grads, all_reduce_sum, shard
    from posttrain.train.loop import optimizer_step

    rank, world = dp
    model.train()
    history: list[dict] = []
    rng = random.Random(seed)
    order = list(range(len(batch)))
    for _ in range(algo.epochs):
        rng.shuffle(order)
        for part in (order[i::algo.minibatches] for i in range(algo.minibatches)):
            if not part:
                continue
            sub = batch.index(sorted(part))
            mask = sub["mask"].bool()
            extra = {"agg_weight": aggregation_weights(sub["mask"], getattr(algo, "loss_agg", "token-mean"), max_len),
                     "rows": torch.arange(len(sub), dtype=torch.float32)[:, None].expand(mask.shape)}
            mine = shard(len(sub), rank, world) if world > 1 else list(range(len(sub)))
            if len(sub) < world:  # every replica decides alike: none may wait in an all-reduce for one that left
                raise ValueError(f"data-parallel update: a minibatch of {len(sub)} rows leaves some of the {world} "
                                 "replicas nothing to train; use fewer replicas or algo.minibatches, or more rows")
            micro = []
            prompt_ids, response_ids, masks = sequences(sub.index(mine))
            for local, mb in packed_groups(prompt_ids, response_ids, train_cfg.max_tokens, masks):
                group = [mine[i] for i in local]
                for key in fields:
                    if key in sub.tensors:
                        mb[key] = sub[key][group][mask[group]].float()
                for key, value in extra.items():
                    mb[key] = value[group][mask[group]]
                micro.append(mb)
            n_tokens = int(mask.sum())  # the whole minibatch's: every rank scales by the global count
            seen: list[dict] = []

            def tracked(m_, mb_, _seen=seen):
                loss, metrics = objective(m_, mb_)
                _seen.append(metrics)
                return loss, metrics

            reduce = (lambda: all_reduce_grads(model.parameters())) if world > 1 else None
            loss_sum, _, grad_norm = optimizer_step(model, tracked, micro, n_tokens, optimizer, scheduler, train_cfg,
                                                    acc, after_backward=reduce)
            keys = [k for k in seen[0] if k != "loss_tokens"]  # the same on every rank: the same objective
            sums = [sum(m[k] * m["loss_tokens"] for m in seen) for k in keys] + [loss_sum]
            if world > 1:
                sums = all_reduce_sum(sums)
            row = {k: v / n_tokens for k, v in zip(keys, sums)}
            row["loss"] = sums[-1] / n_tokens
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            history.append(row)
    return history


# ----------------------------------------------------------------------------- configs


class RolloutSettings(Strict):
    prompts_per_step: int = Field(8, gt=0)
    samples_per_prompt: int = Field(4, gt=0, description="group size k (GRPO/RLOO need >= 2)")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    greedy: bool = Field(False, description="greedy rollouts (benchmarks; no exploration)")
    decoding: Literal["plain", "sam"] = Field("plain", description="sam: SAM speculative decoding, lossless")
    dynamic_sampling: bool = Field(False, description="DAPO: drop prompts whose samples all got the same reward "
                                                      "and sample more prompts to refill the step")
    max_sampling_rounds: int = Field(3, gt=0, description="dynamic sampling: rollout rounds per step at most")
    max_turns: int = Field(4, gt=0, description="tool use (with env): model turns per episode at most; "
                                                "max_new_tokens is then per turn")
    mode: Literal["sync", "one_step_off", "async"] = Field(
        "sync", description="sync: the actor samples, then trains on what it sampled; one_step_off: separate "
                            "rollout workers sample batch k+1 while the actor trains on batch k; async: they "
                            "run up to max_staleness batches ahead (a bounded queue)")
    max_staleness: int | None = Field(None, ge=0, description="policy versions (updates) a sample may lag the "
                                                              "trainer; the update refuses older ones. Default: "
                                                              "sync 0, one_step_off 1, async 2")
    workers: int = Field(1, gt=0, description="one_step_off/async: data-parallel rollout workers (each holds "
                                              "the policy; the actor pushes its trainable tensors after "
                                              "every update)")

    @property
    def staleness_bound(self) -> int:
        """The resolved max_staleness: how many updates a sample may lag the policy it trains."""
        if self.max_staleness is not None:
            return self.max_staleness
        return {"sync": 0, "one_step_off": 1, "async": 2}[self.mode]


class AlgoSettings(Strict):
    advantage: str | None = Field(None, description="estimator from rl.algorithms.ADVANTAGES; default per algorithm")
    kl_coef: float = Field(0.05, ge=0)
    kl_target: float | None = Field(None, gt=0, description="adaptive KL: the per-sequence KL to track (PPO)")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(None, description="default: k1 in the reward, k3 in the loss")
    kl_in: Literal["reward", "loss"] | None = Field(None, description="default: PPO/RLOO reward, GRPO loss")
    policy_loss: str = Field("ppo", description="from rl.algorithms.POLICY_LOSSES: ppo (clipped surrogate), gspo "
                                                "(sequence-level ratio), cispo (clipped, detached IS weight)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="token-mean (DAPO), seq-mean-token-mean (GRPO paper), seq-mean-token-sum-norm "
                                  "(Dr. GRPO, over rollout.max_new_tokens)")
    clip: float = Field(0.2, gt=0, description="eps_low: the ratio's lower clip is 1 - clip")
    clip_high: float | None = Field(None, gt=0, description="eps_high (DAPO clip-higher, e.g. 0.28); default: clip")
    value_clip: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    scale_by_std: bool = Field(True, description="GRPO: divide by the group's std (Dr. GRPO: false)")
    eps: float = Field(1e-6, gt=0)
    epochs: int = Field(1, gt=0, description="passes over each rollout batch")
    minibatches: int = Field(1, gt=0, description="optimizer steps per pass")
    tis_cap: float | None = Field(None, gt=0, description="truncated importance sampling: weight tokens by "
                                                           "min(p_trainer/p_rollout, cap)")
    mis_threshold: float | None = Field(None, gt=1, description="masked importance sampling: drop sequences whose "
                                                                "geometric-mean p_trainer/p_rollout is beyond "
                                                                "[1/t, t]")
    overlong_buffer: int | None = Field(None, gt=0, description="DAPO overlong shaping: the last N tokens before "
                                                                "rollout.max_new_tokens cost up to overlong_factor")
    overlong_factor: float = Field(1.0, ge=0)
    recompute_old_logp: bool | None = Field(
        None, description="a separate no-grad pass for the trainer's log-probs before the update; default: only "
                          "where they are needed (several updates per batch, KL in the reward). Otherwise "
                          "the update's own forward gives them (and the drift monitor, TIS and MIS) for free")


class CriticSettings(Strict):
    lr: float = Field(1e-4, gt=0)
    adapter: AdapterConfig | None = Field(None, description="default: the actor's adapter settings")


class RLTrainConfig(PairTrainConfig):
    max_steps: int = Field(20, gt=0, description="rollout-update rounds")
    lr: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    max_tokens: int = Field(4096, gt=0, description="tokens per packed micro-batch in updates and scoring")


class HeldOutReward(Strict):
    prompts: str = Field(..., description="held-out prompt records")
    limit: int | None = Field(64, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollout.max_new_tokens")


class RLEvalConfig(EvalConfig):
    held_out_reward: HeldOutReward | None = None


class RLConfig(StageConfig):
    stage: Literal["ppo", "grpo", "rloo"] = "grpo"
    output_dir: str = "runs/rl"
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(None, description="an existing Ray cluster; default: start one locally")
    reward_workers: int = Field(1, gt=0, description="data-parallel reward workers")
    actor_workers: int = Field(1, gt=0, description="data-parallel actor replicas (ray backend): each computes "
                                                    "the gradient of its shard of every minibatch, all-reduced "
                                                    "with torch.distributed (gloo on CPU, NCCL on GPU)")
    critic_workers: int = Field(1, gt=0, description="data-parallel critic replicas (ppo; ray backend)")
    adapter: AdapterConfig = AdapterConfig()
    data: OnlineDataConfig
    reward: dict[str, Any] | None = Field(None, description="a reward function config (see rl/rewards.py "
                                                            "build_reward); with env, optional and added to the "
                                                            "environment's reward")
    env: dict[str, Any] | None = Field(None, description="multi-turn tool use: an environment from rl/envs.py ENVS "
                                                         "(name: python | kb, and its settings); its final-answer "
                                                         "check is the reward")
    rollout: RolloutSettings = RolloutSettings()
    algo: AlgoSettings = AlgoSettings()
    critic: CriticSettings = CriticSettings()
    train: RLTrainConfig = RLTrainConfig()
    eval: RLEvalConfig = RLEvalConfig()
    eval_every: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        from posttrain.rl.algorithms import ADVANTAGES
        from posttrain.rl.rewards import parse_reward_config

        from posttrain.rl.algorithms import POLICY_LOSSES
        from posttrain.rl.envs import parse_env_config

        if self.reward is None and self.env is None:
            raise ValueError("reward: missing; give a reward function, or an env (tool use) whose answer check "
                             "scores the episode")
        if self.reward is not None:
            parse_reward_config(self.reward, source="reward")
        if self.env is not None:
            parse_env_config(self.env, source="env")
            if self.algo.overlong_buffer is not None:
                raise ValueError("algo.overlong_buffer: not supported with env (multi-turn); rollout.max_new_tokens "
                                 "bounds each turn")
            if self.rollout.decoding != "plain":
                raise ValueError("rollout.decoding: multi-turn tool rollouts decode with plain batched decoding")

        if self.algo.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"algo.policy_loss: unknown loss {self.algo.policy_loss!r}; "
                             f"registered: {', '.join(sorted(POLICY_LOSSES))}")
        if self.algo.overlong_buffer is not None and self.algo.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"algo.overlong_buffer: {self.algo.overlong_buffer} is longer than "
                             f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")
        if self.rollout.dynamic_sampling and self.stage == "ppo":
            raise ValueError("rollout.dynamic_sampling: drops prompts whose samples agree, which needs groups "
                             "(grpo or rloo)")
        if self.algo.advantage is not None and self.algo.advantage not in ADVANTAGES:
            raise ValueError(f"algo.advantage: unknown estimator {self.algo.advantage!r}; "
                             f"registered: {', '.join(sorted(ADVANTAGES))}")
        if self.stage in ("grpo", "rloo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"rollout.samples_per_prompt: {self.stage} compares samples of the same prompt; use >= 2")
        if self.advantage_name == "gae" and self.stage != "ppo":
            raise ValueError("algo.advantage: gae needs a critic, which only the ppo stage trains")
        r = self.rollout
        if r.mode == "sync" and r.staleness_bound != 0:
            raise ValueError(f"rollout.max_staleness: {r.max_staleness} needs rollout.mode one_step_off or async; "
                             "sync trains on samples of the current weights (0)")
        if r.mode == "one_step_off" and r.staleness_bound != 1:
            raise ValueError(f"rollout.max_staleness: one_step_off lags exactly one version, got {r.max_staleness}; "
                             "use rollout.mode async for more")
        if r.mode == "async" and r.staleness_bound < 1:
            raise ValueError("rollout.max_staleness: async needs >= 1 (0 is rollout.mode sync)")
        if r.mode != "sync" and r.dynamic_sampling:
            raise ValueError(f"rollout.dynamic_sampling: refills a step with fresh samples, which rollout.mode "
                             f"{r.mode} (batches sampled ahead) does not support; use sync")
        if r.mode == "sync" and r.workers != 1:
            raise ValueError("rollout.workers: separate rollout workers sample only in rollout.mode one_step_off "
                             "or async; sync samples on the actor")
        for name in ("actor_workers", "critic_workers"):
            if getattr(self, name) > 1 and self.backend != "ray":
                raise ValueError(f"{name}: data-parallel replicas are separate processes; use backend: ray")
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum: use algo.minibatches; micro-batches follow train.max_tokens")
        if self.train.gradient_checkpointing:
            raise ValueError("train.gradient_checkpointing: the RL stages do not support it yet")
        return self

    @property
    def advantage_name(self) -> str:
        return self.algo.advantage or {"ppo": "gae", "grpo": "grpo", "rloo": "rloo"}[self.stage]

    @property
    def recompute_old_logp(self) -> bool:
        a = self.algo
        if a.recompute_old_logp is not None:
            return a.recompute_old_logp
        return a.epochs * a.minibatches > 1 or self.kl_in == "reward"

    @property
    def max_response_tokens(self) -> int:
        """The most model-written tokens a rollout can have (every turn at its budget with tools)."""
        return self.rollout.max_new_tokens * (self.rollout.max_turns if self.env is not None else 1)

    @property
    def logprob_temperature(self) -> float:
        """The temperature the sampler's log-probs were taken at; every recomputation uses it."""
        return 1.0 if self.rollout.greedy else self.rollout.temperature

    @property
    def kl_in(self) -> str:
        return self.algo.kl_in or ("loss" if self.stage == "grpo" else "reward")

    @property
    def kl_estimator(self) -> str:
        return self.algo.kl_estimator or ("k3" if self.kl_in == "loss" else "k1")


# ----------------------------------------------------------------------------- workers


def _setup(cfg: RLConfig, threads: int | None, offset: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed * 1000 + offset)


def _save_rng_dir(path: Path) -> Path:
    from posttrain.train.loop import save_rng

    path.mkdir(parents=True, exist_ok=True)
    save_rng(path)
    return path


def _load_rng_dir(path: Path) -> Path:
    from posttrain.train.loop import load_rng

    load_rng(path)
    return path


def _response_logps(model, rollout: Batch, temperature: float, max_tokens: int) -> Tensor:
    """[B, T] log p(response token) under `model` at the sampler's temperature (no grad); with
    loss masks, of the model-written tokens only."""
    from posttrain.train.objectives import label_token_logps

    prompt_ids, response_ids, masks = sequences(rollout)
    lengths = trained_lengths(response_ids, masks)
    rows: list[list[float]] = [[] for _ in prompt_ids]
    with torch.no_grad():
        for group, batch in packed_groups(prompt_ids, response_ids, max_tokens, masks):
            for i, values in zip(group, per_row(label_token_logps(model, batch, temperature), lengths, group)):
                rows[i] = values
    return pad_rows(rows)


def sample_rollouts(worker, batch: Batch, greedy: bool | None = None, max_new_tokens: int | None = None,
                    seed: int | None = None) -> Batch:
    """One response per row from `worker.rollout.model` (the actor's own rollout copy, or a rollout
    worker's); `worker` holds cfg, tokenizer, rollout and the env factory (make_env, env_cfg)."""
    from posttrain.generate.engine import GenerationConfig, encode_prompts, generate

    r = worker.cfg.rollout
    greedy = r.greedy if greedy is None else greedy
    gen = GenerationConfig(max_new_tokens=max_new_tokens or r.max_new_tokens, do_sample=not greedy,
                           temperature=1.0 if greedy else r.temperature, top_p=r.top_p, top_k=r.top_k, seed=seed,
                           decoding=r.decoding)
    if worker.make_env is not None:
        return _episodes(worker, batch, gen)
    model, tokenizer = worker.rollout.model, worker.tokenizer
    prompt_ids = encode_prompts(tokenizer, batch["prompt"], chat=True)
    # greedy: a prompt repeated k times has one reply; decode each distinct prompt once
    unique = list(dict.fromkeys(map(tuple, prompt_ids))) if greedy else [tuple(p) for p in prompt_ids]
    if r.decoding == "sam":  # speculative decoding runs one prompt at a time
        # one seed per row: k samples of one prompt must not share a random stream
        outs = [generate(model, tokenizer, [list(p)],
                         dataclasses.replace(gen, seed=None if seed is None else seed * 4099 + i))
                for i, p in enumerate(unique)]
        made = [(o.texts[0], o.token_ids[0], o.logprobs[0]) for o in outs]
    else:
        out = generate(model, tokenizer, [list(p) for p in unique], gen)
        made = list(zip(out.texts, out.token_ids, out.logprobs))
    if greedy:
        by_prompt = dict(zip(unique, made))
        made = [by_prompt[tuple(p)] for p in prompt_ids]
    texts, ids, lps = (list(x) for x in zip(*made))
    mask = pad_rows([[1.0] * len(t) for t in ids])
    return Batch({"mask": mask, "rollout_logp": pad_rows(lps)},
                 {"prompt_ids": prompt_ids, "response_ids": ids, "response": texts})


def _episodes(worker, batch: Batch, gen) -> Batch:
    """Multi-turn tool-use rollouts (rl/tools.py): per row the whole episode after the prompt as
    `response_ids` with `response_mask` (1 on the model's tokens); the [B, T] tensors run over the
    model's tokens only; the environment's reward and the tool figures per row."""
    from posttrain.rl.tools import run_episodes, transcript

    eps = run_episodes(worker.rollout.model, worker.tokenizer, batch["record"], worker.make_env, gen,
                       worker.cfg.rollout.max_turns, worker.env_cfg.workers)
    w = worker.env_cfg.tool_call_reward
    per_episode = {"reward/env": [e.env_reward for e in eps], "reward/tool_shaping": [e.shaping(w) for e in eps],
                   "tools/attempted": [e.attempted for e in eps], "tools/valid": [e.valid for e in eps],
                   "tools/turns": [len(e.turns) for e in eps],
                   "tools/answered": [any(t["kind"] == "answer" for t in e.turns) for e in eps]}
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in per_episode.items()}
    tensors["mask"] = pad_rows([[1.0] * len(e.logprobs) for e in eps])
    tensors["rollout_logp"] = pad_rows([e.logprobs for e in eps])
    meta = {"prompt_ids": [e.prompt_ids for e in eps], "response_ids": [e.tokens for e in eps],
            "response_mask": [e.loss_mask for e in eps], "response": [e.answer or "" for e in eps],
            "transcript": [transcript(worker.tokenizer, e) for e in eps]}
    return Batch(tensors, meta)


def _env_factory(cfg: RLConfig) -> tuple:
    """(env config, episode factory) for multi-turn tool use, else (None, None)."""
    if cfg.env is None:
        return None, None
    from posttrain.rl.envs import build_env, parse_env_config

    env_cfg = parse_env_config(cfg.env)
    return env_cfg, build_env(env_cfg)


def _join_group(dist: dict | None, rank: int) -> int:
    """Join the data-parallel group the driver set up (`dist`: addr, port, world); the world size."""
    if not dist or dist["world"] == 1:
        return 1
    from posttrain.rl.distributed import init_group

    init_group(dist["addr"], dist["port"], rank, dist["world"], dist.get("timeout_s", 300.0))
    return dist["world"]


def _rank_seed(seed: int | None, rank: int) -> int | None:
    """Data-parallel samplers draw different streams (rank 0 keeps the seed: one worker is unchanged)."""
    return seed if seed is None or rank == 0 else seed + 7919 * rank


class ActorWorker:
    """The policy: samples rollouts, recomputes log-probs, updates; with LoRA also the reference."""

    def __init__(self, cfg: RLConfig, threads: int | None = None, rank: int = 0, dist: dict | None = None):
        from posttrain.adapters import apply_adapter, trainable_summary
        from posttrain.models import load_model
        from posttrain.train.loop import build_optimizer, lr_lambda, make_accelerator

        _setup(cfg, threads, 1)
        self.cfg, self.rank, self.world = cfg, rank, _join_group(dist, rank)
        model, self.tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype,
                                           trust_remote_code=cfg.model.trust_remote_code)
        self.model = apply_adapter(model, cfg.adapter, self.tokenizer)
        self.summary = trainable_summary(self.model)
        self.acc = make_accelerator("no")  # the RL drivers do not autocast
        optimizer = build_optimizer(self.model, cfg.train)
        total = cfg.train.max_steps * cfg.algo.epochs * cfg.algo.minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train, total))
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.raw = self.acc.unwrap_model(self.model)
        self._rollout = None
        self.version = 0  # the policy version: updates applied so far; every sample records its own
        self.sent: dict[int, int] = {}  # version -> fingerprint of the weights exported as that version
        self.env_cfg, self.make_env = _env_factory(cfg)  # multi-turn tool use: episodes beside the sampler

    @property
    def rollout(self):
        """The rollout copy (rl/rollout.py), made on first use: with separate rollout workers
        (one_step_off/async) the actor samples only for evaluation."""
        if self._rollout is None:
            from posttrain.rl.rollout import RolloutModel

            self._rollout = RolloutModel(self.raw)
        return self._rollout

    def info(self) -> dict:
        return {"trainable": self.summary, "rollout_copy": self.rollout.is_copy}

    def generate(self, batch: Batch, greedy: bool | None = None, max_new_tokens: int | None = None,
                 seed: int | None = None) -> Batch:
        """Sample one response per row (rows already repeated k times per prompt) from the current
        weights; each row records the policy version it was sampled with."""
        self.rollout.sync(self.raw)
        out = sample_rollouts(self, batch, greedy, max_new_tokens, _rank_seed(seed, self.rank))
        return out.union(Batch({"policy_version": torch.full((len(out),), self.version, dtype=torch.long)}))

    def export_weights(self, send: bool = True) -> dict:
        """What a rollout worker needs to sample this version: the trainable tensors only (with LoRA
        the adapter's A/B matrices, not the frozen base; full fine-tuning: every weight), and their
        fingerprint, kept here to check rollouts against (`send=False`: only that, on replicas
        whose identical tensors rank 0 sends)."""
        from posttrain.rl.rollout import weights_fingerprint
        from posttrain.train.loop import trainable_state

        tensors = {n: t.clone() for n, t in trainable_state(self.raw).items()}
        fingerprint = weights_fingerprint(tensors)
        self.sent[self.version] = fingerprint
        for v in [v for v in self.sent if v < self.version - self.cfg.rollout.staleness_bound - 1]:
            del self.sent[v]
        return {"version": self.version, "fingerprint": fingerprint, "tensors": tensors if send else {}}

    def logprobs(self, batch: Batch) -> Batch:
        """The trainer's log-probs of the sampled tokens before the update (PPO's old log-probs)."""
        temp = self.cfg.logprob_temperature
        return Batch({"old_logp": _response_logps(self.model, batch, temp,
                                                  self.cfg.train.max_tokens)})

    def ref_logprobs(self, batch: Batch) -> Batch:
        """The reference's log-probs: the base with the adapters disabled (no second copy)."""
        temp = self.cfg.logprob_temperature
        with self.raw.disable_adapter():
            return Batch({"ref_logp": _response_logps(self.raw, batch, temp,
                                                      self.cfg.train.max_tokens)})

    def update(self, batch: Batch) -> dict:
        """algo.epochs passes of algo.minibatches clipped-surrogate steps over the rollout batch (the
        whole batch on every data-parallel replica; each trains its share). Refuses a batch sampled
        from weights older than rollout.max_staleness versions (rl/rollout.check_staleness), or,
        from rollout workers, from weights other than those sent; then the version goes up by one."""
        from posttrain.rl.algorithms import flat_rollout_correction, kl_estimate, policy_loss
        from posttrain.rl.rollout import check_staleness
        from posttrain.train.objectives import label_token_logps

        cfg, a = self.cfg, self.cfg.algo
        lag = check_staleness(batch["policy_version"], batch.tensors.get("policy_fingerprint"), self.version,
                              cfg.rollout.staleness_bound, self.sent) if "policy_version" in batch.tensors else {}
        temp = cfg.logprob_temperature
        kl_coef = float(batch["kl_coef"][0]) if "kl_coef" in batch.tensors else a.kl_coef
        kl_in_loss = cfg.kl_in == "loss" and kl_coef > 0

        drift_max = [0.0]
        correct = a.tis_cap is not None or a.mis_threshold is not None
        mis_rows = [0.0, 0.0]  # sequences masked by MIS, sequences seen (corrections from this forward)

        def objective(model, mb):
            logp = label_token_logps(model, mb, temp)
            # on-policy, one update: the trainer's log-probs before the step are this forward's own
            old = mb["old_logp"] if "old_logp" in mb else logp.detach()
            weight = mb["agg_weight"] * mb["is_weight"] if "is_weight" in mb else mb["agg_weight"]
            if correct and "is_weight" not in mb:  # TIS/MIS against the rollout's log-probs, from this forward
                w, keep = flat_rollout_correction(old, mb["rollout_logp"], mb["rows"], a.tis_cap, a.mis_threshold)
                weight = weight * w
                if a.mis_threshold is not None:  # keep is one value per sequence
                    mis_rows[0] += mb["rows"][keep == 0].unique().numel()
                    mis_rows[1] += mb["rows"].unique().numel()
            loss, m = policy_loss(a.policy_loss, logp, old, mb["adv"], mb["rows"], a, weight)
            if "old_logp" not in mb:
                drift = (logp.detach() - mb["rollout_logp"]).abs()
                m["drift_mean_abs"] = drift.mean().item()
                drift_max[0] = max(drift_max[0], drift.max().item())
            if kl_in_loss:
                kl = (kl_estimate(logp, mb["ref_logp"], cfg.kl_estimator) * mb["agg_weight"]).mean()
                loss = loss + kl_coef * kl
                m["kl_loss"] = kl.item()
            m.update(loss=loss.item(), loss_tokens=logp.numel())
            return loss, m

        fields = ("old_logp", "adv", "ref_logp", "is_weight", "rollout_logp")
        history = minibatch_updates(self.model, objective, batch, fields, a, cfg.train, self.optimizer,
                                    self.scheduler, self.acc, cfg.train.seed, cfg.max_response_tokens,
                                    dp=(self.rank, self.world))
        self.version += 1
        out = {f"actor/{k}": sum(h[k] for h in history) / len(history) for k in history[0] if k != "drift_mean_abs"}
        out["actor/lr"] = self.scheduler.get_last_lr()[0]
        if mis_rows[1]:
            if self.world > 1:
                from posttrain.rl.distributed import all_reduce_sum

                mis_rows[:] = all_reduce_sum(mis_rows)
            out["mis/masked_share"] = mis_rows[0] / mis_rows[1]
        if "old_logp" not in batch.tensors:
            out["drift/mean_abs"] = history[0]["drift_mean_abs"]
            if self.world > 1:
                from posttrain.rl.distributed import all_reduce_max

                drift_max[0] = all_reduce_max(drift_max[0])
            out["drift/max_abs"] = drift_max[0]
        return out | lag

    def trainable_state(self) -> dict[str, Tensor]:
        """The trained tensors (checks that data-parallel replicas agree)."""
        from posttrain.train.loop import trainable_state

        return trainable_state(self.raw)

    def evaluate(self, eval_cfg: EvalConfig) -> dict:
        """The eval suite on the current weights (rank 0 only: replicas hold the same weights)."""
        if self.rank:
            return {}
        self.rollout.sync(self.raw)
        return evaluate_all(self.rollout.model, self.tokenizer, eval_cfg)

    def save(self, path: str) -> None:
        """The final model or adapter (rank 0 only: replicas would write the same files at once)."""
        from posttrain.models import save_model

        if self.rank:
            return
        save_model(self.raw, self.tokenizer, path)

    def save_state(self, path: str) -> None:
        """Rank 0: weights, optimizer, schedule, RNG, and the policy version with the fingerprints
        it sent (in-flight rollouts are checked against them after a resume); other replicas hold
        the same weights and optimizer state, so only their RNG."""
        from posttrain.train.loop import save_train_state

        if self.rank:
            _save_rng_dir(Path(path) / f"actor-rank{self.rank}")
            return
        save_train_state(Path(path) / "actor", self.raw, self.optimizer, self.scheduler)
        (Path(path) / "actor" / "version.json").write_text(
            json.dumps({"version": self.version, "sent": {str(k): v for k, v in self.sent.items()}}))

    def load_state(self, path: str) -> None:
        from posttrain.train.loop import load_train_state

        load_train_state(Path(path) / "actor", self.raw, self.optimizer, self.scheduler)
        if self.rank:
            _load_rng_dir(Path(path) / f"actor-rank{self.rank}")
        version_file = Path(path) / "actor" / "version.json"
        if version_file.exists():
            state = json.loads(version_file.read_text())
            self.version, self.sent = state["version"], {int(k): v for k, v in state["sent"].items()}
        else:  # a checkpoint from before versions were saved: one version per update of a sync run
            self.version = self.scheduler.last_epoch // (self.cfg.algo.epochs * self.cfg.algo.minibatches)


class RolloutWorker:
    """Samples rollouts for one_step_off/async runs, beside the actor: the policy rebuilt from the
    model and adapter config, its trainable tensors replaced by each version the actor pushes
    (`load_weights`: with LoRA the adapter tensors only), folded into a plain rollout copy as the
    actor's own (rl/rollout.py). Every row records the version it was sampled with and the
    fingerprint of the weights this worker actually holds, which the actor's update checks
    against what it sent: an adapter that never reached the sampler is an error, not a silent
    run on the base model. Before the first push the version is -1, which no update accepts."""

    def __init__(self, cfg: RLConfig, threads: int | None = None, rank: int = 0):
        from posttrain.adapters import apply_adapter
        from posttrain.models import load_model
        from posttrain.rl.rollout import RolloutModel

        _setup(cfg, threads, 5 + rank)
        self.cfg, self.rank = cfg, rank
        model, self.tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype,
                                           trust_remote_code=cfg.model.trust_remote_code)
        self.policy = apply_adapter(model, cfg.adapter, self.tokenizer).eval()
        self.rollout = RolloutModel(self.policy)
        self.version, self.fingerprint = -1, -1
        self.env_cfg, self.make_env = _env_factory(cfg)

    def load_weights(self, sent: dict) -> dict:
        """Take version `sent["version"]` (`ActorWorker.export_weights`): its tensors into the
        policy (names and shapes must match its trainable ones), folded into the rollout copy."""
        from posttrain.rl.rollout import weights_fingerprint
        from posttrain.train.loop import load_trainable_state, trainable_state

        load_trainable_state(self.policy, sent["tensors"])
        self.rollout.sync(self.policy)
        self.version = sent["version"]
        self.fingerprint = weights_fingerprint(trainable_state(self.policy))  # what is held, read back
        return {"version": self.version, "fingerprint": self.fingerprint, "tensors": len(sent["tensors"]),
                "bytes": sum(t.numel() * t.element_size() for t in sent["tensors"].values())}

    def generate(self, batch: Batch, greedy: bool | None = None, max_new_tokens: int | None = None,
                 seed: int | None = None) -> Batch:
        out = sample_rollouts(self, batch, greedy, max_new_tokens, _rank_seed(seed, self.rank))
        n = len(out)
        return out.union(Batch({"policy_version": torch.full((n,), self.version, dtype=torch.long),
                                "policy_fingerprint": torch.full((n,), self.fingerprint, dtype=torch.long)}))

    def save_state(self, path: str) -> None:  # its weights are the actor's, pushed again on resume
        _save_rng_dir(Path(path) / f"rollout-{self.rank}")

    def load_state(self, path: str) -> None:
        _load_rng_dir(Path(path) / f"rollout-{self.rank}")


class ReferenceWorker:
    """A frozen copy of the starting model (full fine-tuning; LoRA uses the actor's base)."""

    def __init__(self, cfg: RLConfig, threads: int | None = None, rank: int = 0):
        from posttrain.models import load_model

        _setup(cfg, threads, 2)
        self.cfg = cfg
        self.model, _ = load_model(cfg.model.name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        self.model.eval().requires_grad_(False)

    def ref_logprobs(self, batch: Batch) -> Batch:
        temp = self.cfg.logprob_temperature
        return Batch({"ref_logp": _response_logps(self.model, batch, temp,
                                                  self.cfg.train.max_tokens)})

    def save_state(self, path: str) -> None:  # frozen: only its process's RNG
        _save_rng_dir(Path(path) / "reference")

    def load_state(self, path: str) -> None:
        _load_rng_dir(Path(path) / "reference")


class CriticWorker:
    """PPO's value model: the starting model's decoder with its own adapter and a scalar head per token."""

    def __init__(self, cfg: RLConfig, threads: int | None = None, rank: int = 0, dist: dict | None = None):
        from posttrain.adapters import apply_adapter
        from posttrain.models import load_model
        from posttrain.train.reward_model import RewardModel
        from posttrain.train.loop import build_optimizer, lr_lambda, make_accelerator

        _setup(cfg, threads, 3)
        self.cfg, self.rank, self.world = cfg, rank, _join_group(dist, rank)
        lm, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        lm = apply_adapter(lm, cfg.critic.adapter or cfg.adapter, tokenizer)
        self.model = RewardModel(lm, ["value"], seed=cfg.train.seed)
        with torch.no_grad():
            self.model.head.weight.zero_()  # values start at 0: no made-up baseline in the first steps
        train = cfg.train.model_copy(update={"lr": cfg.critic.lr})
        self.train_cfg = train
        self.acc = make_accelerator("no")  # the RL drivers do not autocast
        optimizer = build_optimizer(self.model, train)
        total = cfg.train.max_steps * cfg.algo.epochs * cfg.algo.minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, total))
        self.optimizer = optimizer

    def _values(self, mb: dict) -> Tensor:
        """One value per label (response) position, from the hidden state that predicts it."""
        from posttrain.kernels.layers import fused_layers
        from posttrain.train.objectives import loss_position_hidden

        with fused_layers(self.model.lm):
            hidden, _ = loss_position_hidden(self.model.lm, mb)
        return self.model.head(hidden.float()).squeeze(-1)

    def values(self, batch: Batch) -> Batch:
        rows: list[list[float]] = [[] for _ in range(len(batch))]
        self.model.eval()
        with torch.no_grad():
            prompt_ids, response_ids, masks = sequences(batch)
            lengths = trained_lengths(response_ids, masks)
            for group, mb in packed_groups(prompt_ids, response_ids, self.cfg.train.max_tokens, masks):
                for i, values in zip(group, per_row(self._values(mb), lengths, group)):
                    rows[i] = values
        return Batch({"values": pad_rows(rows)})

    def update(self, batch: Batch) -> dict:
        from posttrain.rl.algorithms import value_loss

        a = self.cfg.algo

        def objective(model, mb):
            v = self._values(mb)
            loss, m = value_loss(v, mb["values"], mb["returns"], torch.ones_like(v), a.value_clip)
            m.update(loss_tokens=v.numel())
            return loss, m

        history = minibatch_updates(self.model, objective, batch, ("values", "returns"), a, self.train_cfg,
                                    self.optimizer, self.scheduler, self.acc, self.cfg.train.seed + 1,
                                    self.cfg.max_response_tokens, dp=(self.rank, self.world))
        return {f"critic/{k}": sum(h[k] for h in history) / len(history) for k in history[0]}

    def trainable_state(self) -> dict[str, Tensor]:
        from posttrain.train.loop import trainable_state

        return trainable_state(self.model)

    def save_state(self, path: str) -> None:
        """Rank 0 all of it; other replicas (same weights and optimizer state) their RNG."""
        from posttrain.train.loop import save_train_state

        if self.rank:
            _save_rng_dir(Path(path) / f"critic-rank{self.rank}")
            return
        save_train_state(Path(path) / "critic", self.model, self.optimizer, self.scheduler)

    def load_state(self, path: str) -> None:
        from posttrain.train.loop import load_train_state

        load_train_state(Path(path) / "critic", self.model, self.optimizer, self.scheduler)
        if self.rank:
            _load_rng_dir(Path(path) / f"critic-rank{self.rank}")


class RewardWorker:
    """Scores (prompt, response) rows with the configured `RewardFunction`."""

    def __init__(self, cfg: RLConfig, threads: int | None = None, rank: int = 0):
        from posttrain.models import load_tokenizer
        from posttrain.rl.rewards import build_reward

        _setup(cfg, threads, 4)
        self.rank = rank
        self.reward_fn = build_reward(cfg.reward, tokenizer=load_tokenizer(cfg.model.name))

    def save_state(self, path: str) -> None:
        """Its RNG and the reward function's own state (a mixture's dynamic weights), per rank."""
        out = _save_rng_dir(Path(path) / f"reward-{self.rank}")
        if hasattr(self.reward_fn, "state_dict"):
            (out / "reward.json").write_text(json.dumps(self.reward_fn.state_dict()))

    def load_state(self, path: str) -> None:
        src = _load_rng_dir(Path(path) / f"reward-{self.rank}")
        if hasattr(self.reward_fn, "load_state_dict"):
            self.reward_fn.load_state_dict(json.loads((src / "reward.json").read_text()))

    def score(self, batch: Batch) -> Batch:
        judged = self.reward_fn(batch["prompt"], batch["response"], batch["record"])
        tensors = {"scores": judged.scores.float()}
        for name, part in judged.parts.items():
            tensors[f"reward/{name}"] = part.float()
        return Batch(tensors)


# ----------------------------------------------------------------------------- worker groups


class WorkerGroup:
    """n workers of one role; `call` splits a batch over them and merges the results.

    backend "local": the workers are objects in this process. backend "ray": each is a Ray
    actor (its own process); arguments and results travel through Ray's object store; calls
    to one worker run in the order the driver made them. `data_parallel` (ray, n > 1): the
    workers are replicas of one trained model that join a torch.distributed group at a TCP
    address the driver chooses (its own node, where rank 0 is placed; rl/distributed.py).
    """

    def __init__(self, cls, n: int, backend: str, *args, data_parallel: bool = False, **kwargs):
        self.backend, self.n = backend, n
        if backend == "local":
            if data_parallel and n > 1:
                raise ValueError("data-parallel replicas need backend ray (one process each)")
            self.workers = [cls(*args, rank=i, **kwargs) for i in range(n)]
        elif backend == "ray":
            import ray

            remote = ray.remote(num_cpus=0)(cls)  # CPU threads are set per worker, not reserved by Ray
            placed = [remote] * n
            if data_parallel and n > 1:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                from posttrain.ports import free_port

                kwargs = {**kwargs, "dist": {"addr": ray.util.get_node_ip_address(), "port": free_port(""), "world": n}}
                here = ray.get_runtime_context().get_node_id()  # rank 0 serves the store at the driver's address
                placed[0] = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
            self.workers = [r.remote(*args, rank=i, **kwargs) for i, r in enumerate(placed)]
        else:
            raise ValueError(f"unknown backend {backend!r}; choose local or ray")

    def _start(self, calls: list[tuple[Any, str, tuple, dict]]) -> Pending:
        if self.backend == "local":
            return Pending([getattr(w, m)(*a, **k) for w, m, a, k in calls], remote=False)
        return Pending([getattr(w, m).remote(*a, **k) for w, m, a, k in calls], remote=True)

    def _run(self, calls: list[tuple[Any, str, tuple, dict]]) -> list:
        return self._start(calls).results()

    def submit(self, method: str, batch: Batch, **kwargs) -> Pending:
        """As `call`, without waiting (ray); local workers run at once."""
        return self._start([(w, method, (p,), kwargs) for w, p in zip(self.workers, batch.split(self.n))])

    def call(self, method: str, batch: Batch, **kwargs) -> Batch | list:
        """Split `batch` over the workers (data parallel), run `method` on each part, merge."""
        return self.submit(method, batch, **kwargs).get()

    def broadcast(self, method: str, *args, **kwargs) -> list:
        """The same call on every worker; one result per worker."""
        return self._run([(w, method, args, kwargs) for w in self.workers])


@dataclass
class Pending:
    """Calls made on a group: Ray object refs still in flight, or (local) their results."""

    values: list
    remote: bool

    def done(self) -> bool:
        """Whether every call has finished (without waiting)."""
        if not self.remote:
            return True
        import ray

        ready, _ = ray.wait(self.values, num_returns=len(self.values), timeout=0)
        return len(ready) == len(self.values)

    def results(self) -> list:
        if not self.remote:
            return self.values
        import ray

        return ray.get(self.values)

    def get(self) -> Batch | list:
        """The results, merged into one Batch when each is one."""
        results = self.results()
        return Batch.cat(results) if all(isinstance(r, Batch) for r in results) else results


@dataclass
class Groups:
    actor: WorkerGroup
    reference: WorkerGroup  # the actor group itself when training adapters
    reward: WorkerGroup | None  # None: an environment's answer check is the whole reward
    critic: WorkerGroup | None
    rollout: WorkerGroup | None = None  # one_step_off/async: the samplers; sync: the actor samples

    def unique(self) -> list[WorkerGroup]:
        """Each group once (with LoRA the reference is the actor group itself)."""
        out: list[WorkerGroup] = []
        for g in (self.actor, self.reference, self.reward, self.critic, self.rollout):
            if g is not None and all(g is not o for o in out):
                out.append(g)
        return out


def build_groups(cfg: RLConfig, threads: int | None = None) -> Groups:
    from posttrain.train.preference import disables_to_base

    b = cfg.backend
    actor = WorkerGroup(ActorWorker, cfg.actor_workers, b, cfg, threads, data_parallel=True)
    reference = actor if disables_to_base(cfg.adapter) else WorkerGroup(ReferenceWorker, 1, b, cfg, threads)
    reward = WorkerGroup(RewardWorker, cfg.reward_workers, b, cfg, threads) if cfg.reward is not None else None
    critic = (WorkerGroup(CriticWorker, cfg.critic_workers, b, cfg, threads, data_parallel=True)
              if cfg.advantage_name == "gae" else None)
    rollout = WorkerGroup(RolloutWorker, cfg.rollout.workers, b, cfg, threads) if cfg.rollout.mode != "sync" else None
    return Groups(actor, reference, reward, critic, rollout)


def push_weights(groups: Groups) -> Pending:
    """The actor's current version to every rollout worker (LoRA: the adapter tensors only). Every
    actor replica records the fingerprint of what was sent (its update checks rollouts against
    it); rank 0's tensors go out. Ray: nothing waits here; the tensors travel from the actor to
    the rollout workers through the object store, and each worker loads them before the
    generation calls made after this one."""
    actor = groups.actor
    exports = actor._start([(w, "export_weights", (), {"send": i == 0}) for i, w in enumerate(actor.workers)])
    sent = exports.values[0]  # ray: an object ref, resolved by each rollout worker
    return groups.rollout._start([(w, "load_weights", (sent,), {}) for w in groups.rollout.workers])


# ----------------------------------------------------------------------------- the driver


def add_advantages(batch: Batch, cfg: RLConfig, kl_coef: float) -> tuple[Batch, dict]:
    """Token rewards (KL in the reward), advantages and returns; also the drift/TIS weights."""
    from posttrain.rl.algorithms import (compute_advantages, kl_estimate, masked_mean, mis_mask, overlong_penalty,
                                         tis_weights, token_rewards)

    mask = batch["mask"]
    # the trainer's log-probs where a pass computed them, else the sampler's (equal up to drift)
    logp = batch["old_logp"] if "old_logp" in batch.tensors else batch["rollout_logp"]
    kl_k1 = kl_estimate(logp, batch["ref_logp"], "k1") * mask
    in_reward = kl_coef if cfg.kl_in == "reward" else 0.0
    a = cfg.algo
    scores = batch["scores"]
    metrics = {}
    if a.overlong_buffer is not None:  # DAPO: replies near the length limit lose up to overlong_factor
        penalty = overlong_penalty(mask.sum(1), cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_factor)
        scores = scores + penalty
        metrics["overlong_penalty"] = penalty.mean().item()
    data = {"scores": scores, "mask": mask, "group": batch["group"]}
    # token-level estimators (GAE, REINFORCE++): the score on the last token, the KL penalty on each
    data["token_rewards"], _ = token_rewards(scores, logp, batch["ref_logp"], mask, in_reward, cfg.kl_estimator)
    if cfg.advantage_name == "gae":
        data["values"] = batch["values"]
    elif in_reward:  # sequence-level methods: the summed KL penalty joins the score
        data["scores"] = scores - in_reward * (kl_estimate(logp, batch["ref_logp"], cfg.kl_estimator) * mask).sum(1)
    adv, returns = compute_advantages(cfg.advantage_name, data, a)
    tensors = {"adv": adv, "kl_coef": torch.full((len(batch),), kl_coef)}
    if returns is not None:
        tensors["returns"] = returns
    # rollout-vs-trainer corrections; without an old-log-prob pass the actor's update applies them
    # from its own forward (algorithms.flat_rollout_correction)
    if (a.tis_cap is not None or a.mis_threshold is not None) and "old_logp" in batch.tensors:
        weight = mask.to(torch.float32)
        if a.tis_cap is not None:
            weight = weight * tis_weights(batch["old_logp"], batch["rollout_logp"], mask, a.tis_cap)
        if a.mis_threshold is not None:
            kept = mis_mask(batch["old_logp"], batch["rollout_logp"], mask, a.mis_threshold)
            weight = weight * kept
            metrics["mis/masked_share"] = 1.0 - kept.amax(1).mean().item()
        tensors["is_weight"] = weight
    metrics.update({"kl": kl_k1.sum(1).mean().item(), "adv_abs": masked_mean(adv.abs(), mask).item()})
    if "old_logp" in batch.tensors:  # else the actor's update reports the drift from its own forward
        drift = (batch["old_logp"] - batch["rollout_logp"]).abs() * mask
        metrics.update({"drift/mean_abs": masked_mean(drift, mask).item(), "drift/max_abs": drift.max().item()})
    return batch.union(Batch(tensors)), metrics


def score_rows(groups: Groups, cfg: RLConfig, batch: Batch) -> Batch:
    """Each row's score: the reward function's, plus with an env the episode's own reward (answer
    correctness + the tool-call shaping term the rollout computed)."""
    out = groups.reward.call("score", batch) if groups.reward is not None else Batch()
    if cfg.env is None:
        return out
    env_score = batch["reward/env"] + batch["reward/tool_shaping"]
    tensors = dict(out.tensors)
    tensors["scores"] = env_score + tensors["scores"] if "scores" in tensors else env_score
    return Batch(tensors)


def sample_scored(groups: Groups, cfg: RLConfig, prompts: Batch, seed: int,
                  refill: Callable[[], Batch] | None = None) -> tuple[Batch, dict]:
    """Rollouts and their rewards. With rollout.dynamic_sampling (DAPO), groups whose samples
    all got the same reward (zero advantage) are dropped and `refill()` prompts are sampled, up
    to rollout.max_sampling_rounds rounds, until prompts_per_step informative groups are kept."""
    from posttrain.rl.algorithms import informative_groups

    timing = {"time/rollout": 0.0, "time/reward": 0.0}

    def draw(p: Batch, s: int) -> Batch:
        start = time.perf_counter()
        b = p.union(groups.actor.call("generate", p, seed=s))
        mid = time.perf_counter()
        b = b.union(score_rows(groups, cfg, b))
        timing["time/rollout"] += mid - start
        timing["time/reward"] += time.perf_counter() - mid
        return b

    batch = draw(prompts, seed)
    r = cfg.rollout
    if not r.dynamic_sampling:
        return batch, timing
    kept, n_kept, drawn, rounds = [], 0, 0, 0
    while True:
        rounds += 1
        drawn += len(batch["group"].unique())
        ok = set(informative_groups(batch["scores"], batch["group"]))
        rows = [i for i, g in enumerate(batch["group"].tolist()) if g in ok]
        if rows:
            kept.append(batch.index(rows))
            n_kept += len(ok)
        if n_kept >= r.prompts_per_step or rounds >= r.max_sampling_rounds or refill is None:
            break
        batch = draw(refill(), seed + rounds * 7919)
    metrics = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/kept_share": n_kept / max(drawn, 1), **timing}
    if not kept:  # nothing informative in any round: train on the last one (its advantages are 0)
        return batch, metrics
    batch = Batch.cat(kept)
    first = list(dict.fromkeys(batch["group"].tolist()))[: r.prompts_per_step]
    return batch.index([i for i, g in enumerate(batch["group"].tolist()) if g in set(first)]), metrics


TRAINER_PHASES = ("logprobs", "values", "critic_update", "actor_update")  # the trainer's own work


def train_on(groups: Groups, cfg: RLConfig, batch: Batch, kl_coef: float) -> tuple[Batch, dict]:
    """Steps 3-8 on a scored rollout batch: old and reference log-probs, values, advantages, the
    critic's and the actor's updates (each data-parallel replica gets the whole batch)."""
    t = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        t[f"time/{name}"] = now - clock
        clock = now

    if cfg.recompute_old_logp:
        batch = batch.union(groups.actor.call("logprobs", batch))                   # 3. old log-probs
    batch = batch.union(groups.reference.call("ref_logprobs", batch))               # 4. reference
    lap("logprobs")
    if groups.critic is not None:
        batch = batch.union(groups.critic.call("values", batch))                    # 5. values
        lap("values")
    batch, metrics = add_advantages(batch, cfg, kl_coef)                            # 6. advantages
    if groups.critic is not None:
        metrics.update(groups.critic.broadcast("update", batch)[0])                 # 7. critic update
        lap("critic_update")
    metrics.update(groups.actor.broadcast("update", batch)[0])                      # 8. actor update
    lap("actor_update")
    metrics.update(t)
    return batch, metrics


def _step_times(metrics: dict, started: float) -> None:
    """time/step, time/trainer_idle (the step's wall time outside the trainer's own work: waiting
    for rollouts and rewards, the driver's arithmetic) and its share."""
    total = time.perf_counter() - started
    busy = sum(metrics.get(f"time/{p}", 0.0) for p in TRAINER_PHASES)
    metrics.update({"time/step": total, "time/trainer_idle": max(total - busy, 0.0),
                    "trainer_idle_share": max(total - busy, 0.0) / total if total > 0 else 0.0})


def rl_step(groups: Groups, cfg: RLConfig, prompts: Batch, kl_coef: float, seed: int,
            refill: Callable[[], Batch] | None = None) -> tuple[Batch, dict]:
    """One synchronous round, top to bottom: the actor samples, then trains on what it sampled.
    `prompts` has one row per sample (each prompt repeated k times); `refill()` gives more such
    rows when dynamic sampling drops groups."""
    started = time.perf_counter()
    batch, sampling = sample_scored(groups, cfg, prompts, seed, refill)            # 1-2. rollout, reward
    batch, metrics = train_on(groups, cfg, batch, kl_coef)                          # 3-8
    metrics.update(sampling)
    _step_times(metrics, started)
    return batch, metrics


def step_seed(cfg: RLConfig, step: int) -> int:
    """The sampling seed of the rollouts step `step` trains on (the same in every rollout mode)."""
    return cfg.train.seed * 100_003 + step


class RolloutQueue:
    """one_step_off/async: rollout batches the rollout workers sample ahead, oldest first.

    `submit(step, prompts)` starts sampling the batch step `step` will train on (Ray: the call is
    in flight; the workers take it after every weight push made before it); `pop()` waits for the
    oldest. What the queue holds at a checkpoint is saved with it (`materialize`), so a resumed
    run trains on the very batches the uninterrupted one would have."""

    def __init__(self, groups: Groups, cfg: RLConfig):
        self.groups, self.cfg = groups, cfg
        self.entries: deque[tuple[int, Batch, Pending | None]] = deque()
        self.next_step = 0  # the step of the next submitted batch

    def __len__(self) -> int:
        return len(self.entries)

    def submit(self, step: int, prompts: Batch) -> None:
        self.entries.append((step, prompts, self.groups.rollout.submit("generate", prompts,
                                                                        seed=step_seed(self.cfg, step))))
        self.next_step = step + 1

    def restore(self, batches: list[tuple[int, Batch]]) -> None:
        self.entries.extend((step, b, None) for step, b in batches)
        if batches:
            self.next_step = batches[-1][0] + 1

    def pop(self) -> tuple[int, Batch]:
        step, prompts, pending = self.entries.popleft()
        return step, prompts if pending is None else prompts.union(pending.get())

    def materialize(self) -> list[tuple[int, Batch]]:
        """Every queued batch, waited for (and kept as such in the queue)."""
        self.entries = deque((s, p if pending is None else p.union(pending.get()), None)
                             for s, p, pending in self.entries)
        return [(s, b) for s, b, _ in self.entries]


def start_rollouts(groups: Groups, cfg: RLConfig, start: int = 0,
                   queued: list[tuple[int, Batch]] | None = None) -> tuple[RolloutQueue | None, list[Pending]]:
    """one_step_off/async: the queue (with a checkpoint's `queued` batches) and the first push,
    which gives the rollout workers the actor's current weights; (None, []) in sync mode."""
    if groups.rollout is None:
        return None, []
    queue = RolloutQueue(groups, cfg)
    queue.next_step = start
    queue.restore(queued or [])
    return queue, [push_weights(groups)]


def reap_pushes(pushed: list[Pending], wait: bool = False) -> list[dict]:
    """The finished weight pushes (all of them with `wait`), oldest first, taken off `pushed`: each
    rollout worker's load report (a failed load raises here). Never waited for mid-run: with
    several batches in flight a worker loads a version only after the generations queued before."""
    out = []
    while pushed and (wait or pushed[0].done()):
        out.extend(pushed.pop(0).results())
    return out


def async_step(groups: Groups, cfg: RLConfig, queue: RolloutQueue, kl_coef: float, step: int,
               pushed: list[Pending], next_prompts: Callable[[], Batch]) -> tuple[Batch, dict]:
    """One one_step_off/async round: top the queue up to rollout.max_staleness batches beyond
    this step's (never past train.max_steps; `next_prompts()` gives each one's rows), take the
    oldest (the next ones are sampled meanwhile), score it, train on it, push the new weights to
    the rollout workers. `pushed` holds the pushes not yet known to have landed (reap_pushes).
    Local workers sample at submission, so there the step only keeps the semantics (which
    version samples which batch), not the overlap."""
    started = time.perf_counter()
    while queue.next_step <= min(step + cfg.rollout.staleness_bound, cfg.train.max_steps - 1):
        queue.submit(queue.next_step, next_prompts())
    queued, batch = queue.pop()
    if queued != step:
        raise RuntimeError(f"rollout queue out of order: step {step} got the batch sampled for step {queued}")
    mid = time.perf_counter()
    loads = reap_pushes(pushed)
    batch = batch.union(score_rows(groups, cfg, batch))                             # 2. reward
    sampling = {"time/rollout_wait": mid - started, "time/reward": time.perf_counter() - mid}
    batch, metrics = train_on(groups, cfg, batch, kl_coef)                          # 3-8
    clock = time.perf_counter()
    pushed.append(push_weights(groups))                                             # 9. weights out
    metrics.update(sampling, **{"time/weight_push": time.perf_counter() - clock})
    if loads:
        metrics.update({"sync/tensors": loads[-1]["tensors"], "sync/mbytes": loads[-1]["bytes"] / 2**20})
    metrics["async/queued"] = len(queue)
    _step_times(metrics, started)
    return batch, metrics


def prompt_batch(records: list[dict], k: int, first_group: int = 0) -> Batch:
    """Each record repeated k times, with its group id (GRPO/RLOO compare within a group)."""
    rows = [(r, first_group + i) for i, r in enumerate(records) for _ in range(k)]
    return Batch({"group": torch.tensor([g for _, g in rows], dtype=torch.long)},
                 {"prompt": [r["prompt"] for r, _ in rows], "record": [r for r, _ in rows]})


def held_out_reward(groups: Groups, cfg: RLConfig, records: list[dict], max_new_tokens: int) -> dict:
    """Greedy replies to held-out prompts, scored by the reward function; with an env, greedy
    episodes, and also their answer accuracy and tool figures."""
    batch = prompt_batch(records, 1)
    batch = batch.union(groups.actor.call("generate", batch, greedy=True, max_new_tokens=max_new_tokens))
    scores = score_rows(groups, cfg, batch)
    lengths = batch["mask"].sum(1)
    out = {"held_out/reward": scores["scores"].mean().item(), "held_out/length": lengths.mean().item()}
    if cfg.env is not None:
        out["held_out/accuracy"] = batch["reward/env"].mean().item()
        out.update({f"held_out/{k.removeprefix('tools/')}": v for k, v in tool_metrics(batch).items()})
    return out


def tool_metrics(batch: Batch) -> dict:
    """A tool-use batch's figures: tools/valid_rate (valid calls / attempted calls over the batch;
    None when no turn attempted one), tools/calls and tools/turns per episode, tools/answered
    (share of episodes that ended with a final answer)."""
    attempted = batch["tools/attempted"].sum().item()
    return {"tools/valid_rate": batch["tools/valid"].sum().item() / attempted if attempted else None,
            "tools/calls": batch["tools/attempted"].mean().item(), "tools/turns": batch["tools/turns"].mean().item(),
            "tools/answered": batch["tools/answered"].mean().item()}


def save_batch(batch: Batch, stem: Path) -> None:
    """A rollout batch as STEM.safetensors (its tensors) + STEM.json (its per-row metadata: token
    ids, texts, prompt records); no pickle."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in batch.tensors.items()}, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(batch.meta))


def load_batch(stem: Path) -> Batch:
    from safetensors.torch import load_file

    return Batch(load_file(str(stem.with_suffix(".safetensors"))), json.loads(stem.with_suffix(".json").read_text()))


def save_rl_checkpoint(run_dir: Path, groups: Groups, driver: dict, keep: int,
                       queue: RolloutQueue | None = None) -> Path:
    """checkpoints/step-N: each worker's state (actor and critic weights, optimizer, schedule,
    its process's RNG, the policy version; reward state per rank); state.json holds the driver's
    step, KL coefficient and prompt cursor (the driver draws no random numbers of its own). With
    rollouts sampled ahead (one_step_off/async) the batches in the queue, sampled from weights
    no longer held anywhere, are saved too (rollouts/), so a resume trains on them as the
    uninterrupted run does."""
    from posttrain.train.loop import write_checkpoint

    queued = queue.materialize() if queue is not None else []

    def write(tmp: Path) -> None:
        for group in groups.unique():
            group.broadcast("save_state", str(tmp))
        if queued:
            (tmp / "rollouts").mkdir()
        for step, batch in queued:
            save_batch(batch, tmp / "rollouts" / f"step-{step}")

    return write_checkpoint(run_dir, driver["step"], {**driver, "queued_steps": [s for s, _ in queued]}, keep, write)


def load_queued(ckpt: Path) -> list[tuple[int, Batch]]:
    """The rollout batches a checkpoint's queue held (save_rl_checkpoint), oldest first."""
    steps = json.loads((ckpt / "state.json").read_text()).get("queued_steps", [])
    return [(s, load_batch(ckpt / "rollouts" / f"step-{s}")) for s in steps]


def run_rl(cfg: RLConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """The ppo / grpo / rloo stage end to end; returns the manifest."""
    from tqdm.auto import tqdm

    from posttrain.data.formats import load_records
    from posttrain.eval.report import metric_curves
    from posttrain.eval.suite import write_reports
    from posttrain.rl.algorithms import AdaptiveKL
    from posttrain.rl.rollout import prompt_batches, reward_ends
    from posttrain.stage import stage_inputs, start_stage
    from posttrain.train.loop import MetricsLog, resume_point

    run = start_stage(cfg, resume=resume, overwrite=overwrite, load=False)  # the workers load their own copies
    run_dir = run.run_dir
    ckpt = resume_point(run_dir, resume)
    records = load_records(cfg.data.prompts, kind="prompt").records
    held = None
    if cfg.eval.held_out_reward is not None:
        h = cfg.eval.held_out_reward
        held = load_records(h.prompts, kind="prompt").records[: h.limit]
        held_tokens = h.max_new_tokens or cfg.rollout.max_new_tokens
    if cfg.backend == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True)
    threads = torch.get_num_threads()
    groups = build_groups(cfg, threads)
    print(groups.actor.broadcast("info")[0]["trainable"]["line"])

    def evaluate_before() -> dict:
        out = groups.actor.broadcast("evaluate", cfg.eval)[0] if cfg.eval.before and cfg.eval.tasks else {}
        if held is not None:
            out.update(held_out_reward(groups, cfg, held, held_tokens))
        return out

    before = run.cached("eval_before.json", evaluate_before)
    kl = AdaptiveKL(cfg.algo.kl_coef, cfg.algo.kl_target)
    rounds = prompt_batches(records, cfg.rollout.prompts_per_step, cfg.train.seed)
    drawn, start = 0, 0
    if ckpt is not None:  # everything an uninterrupted run would hold at this step
        driver = json.loads((ckpt / "state.json").read_text())
        start, kl.value, drawn = driver["step"], driver["kl_coef"], driver["rounds_drawn"]
        for _ in range(drawn):  # the prompt cursor: the same seeded shuffle, advanced as far
            next(rounds)
        for group in groups.unique():
            group.broadcast("load_state", str(ckpt))
        print(f"resumed from {ckpt} (step {start} of {cfg.train.max_steps})")
    log = MetricsLog(run_dir, start if ckpt is not None else None, enabled=True)
    history: list[dict] = [json.loads(line) for line in log.path.read_text().splitlines()] if ckpt else []
    k = cfg.rollout.samples_per_prompt

    def next_round() -> list[dict]:
        nonlocal drawn
        drawn += 1
        return next(rounds)

    bar = tqdm(range(start, cfg.train.max_steps), desc=cfg.stage, disable=not cfg.train.progress,
               dynamic_ncols=True, initial=start, total=cfg.train.max_steps)
    next_group = 0

    def refill() -> Batch:  # dynamic sampling's extra prompts: group ids after the step's own
        nonlocal next_group
        next_group += cfg.rollout.prompts_per_step
        return prompt_batch(next_round(), k, first_group=next_group)

    queue, pushed = start_rollouts(groups, cfg, start, load_queued(ckpt) if ckpt is not None else [])
    if queue is not None and cfg.algo.tis_cap is None and cfg.algo.mis_threshold is None:
        print(f"note: rollout.mode {cfg.rollout.mode} trains on samples up to {cfg.rollout.staleness_bound} "
              "versions old without a correction; set algo.tis_cap (and/or algo.mis_threshold)")

    for step in bar:
        t0 = time.perf_counter()
        next_group = 0
        if queue is None:
            batch, m = rl_step(groups, cfg, prompt_batch(next_round(), k), kl.value, seed=step_seed(cfg, step),
                               refill=refill)
        else:
            batch, m = async_step(groups, cfg, queue, kl.value, step, pushed, lambda: prompt_batch(next_round(), k))
        row = {"step": step + 1, "reward": batch["scores"].mean().item(), "kl_coef": kl.value,
               "response_length": batch["mask"].sum(1).mean().item(), "loss": m["actor/loss"], **m}
        for name in batch.tensors:
            if name.startswith("reward/") and not name.startswith("reward/weight/"):
                row[name] = batch[name].mean().item()
        if cfg.env is not None:
            row.update(tool_metrics(batch))
        kl.update(m["kl"], len(batch))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            if cfg.eval.tasks:
                row.update({f"eval/{n}": v for n, v in groups.actor.broadcast("evaluate", cfg.eval)[0].items()})
            if held is not None:
                row.update(held_out_reward(groups, cfg, held, held_tokens))
        row["step_s"] = time.perf_counter() - t0
        history.append(row)
        log.write(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{m['kl']:.3f}")
        done = step + 1
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < cfg.train.max_steps:
            save_rl_checkpoint(run_dir, groups, {"step": done, "kl_coef": kl.value, "rounds_drawn": drawn},
                               cfg.train.keep_checkpoints, queue)
    reap_pushes(pushed, wait=True)  # a failed last load is an error too
    log.close()
    groups.actor.broadcast("save", str(run_dir / "final"))
    after = groups.actor.broadcast("evaluate", cfg.eval)[0] if cfg.eval.tasks else {}
    if held is not None:
        after.update(held_out_reward(groups, cfg, held, held_tokens))
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    curves = ["reward", "kl", "response_length", "actor/loss"]
    if cfg.env is not None:
        curves += ["reward/env", "tools/valid_rate", "tools/turns", "tools/calls"]
    metric_curves(log.path, plots / f"{cfg.stage}.png", curves)
    write_reports(run_dir, before, after)
    first, last = reward_ends(history)
    n5 = min(5, len(history))
    print(f"mean reward of fresh samples: first {n5} steps {first:.3f} -> last {n5} steps {last:.3f}")
    phases = [k for k in history[0] if k.startswith("time/")]
    timing = {p: sum(h[p] for h in history) / len(history) for p in phases}
    outputs = {"steps": len(history), "reward_first5": first, "reward_last5": last, "eval_before": before,
               "eval_after": after, "mean_phase_s": timing, "backend": cfg.backend,
               "final_kl": history[-1]["kl"]}
    return run.finish(stage_inputs(cfg.model.name, {"prompts": cfg.data.prompts}), outputs)
