"""Data-parallel actor and critic groups: Ray workers holding replicas of one model, gradients
all-reduced with torch.distributed (gloo on CPU); two replicas step like one on the same batch."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.rl.controller import (Batch, WorkerGroup, add_advantages, build_groups, minibatch_updates,
                                     prompt_batch, run_rl, score_rows)


def _same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_two_replicas_step_like_one_on_the_same_global_batch(rl_setup, ray_cluster, stage):
    """Two rounds on the same rollout batches: one in-process worker against two Ray replicas
    (2 minibatches of 8 rows, so each replica trains 4 rows per optimizer step; PPO also 2
    epochs and a critic group). Weights after every round equal to 1e-5 on both replicas. The
    learning rate is 2e-3: Adam's first steps move every weight by about lr, whatever the size
    of its gradient, so a gradient element near zero that differs in its last bits (the replicas
    sum the two halves in another order) moves by a different fraction of lr; at the suite's
    2e-2 that reached 1.6e-5 on one element of 512."""
    from posttrain.rl.controller import ActorWorker, CriticWorker

    cfg = rl_setup(stage, 2, algo={"minibatches": 2, "loss_agg": "seq-mean-token-mean",
                                   "epochs": 2 if stage == "ppo" else 1},
                   train={"max_grad_norm": 0.5, "lr": 2e-3})
    one = build_groups(cfg, 1)
    actors = WorkerGroup(ActorWorker, 2, "ray", cfg, 1, data_parallel=True)
    critics = WorkerGroup(CriticWorker, 2, "ray", cfg, 1, data_parallel=True) if stage == "ppo" else None
    records = [{"prompt": f"Count to {i}."} for i in range(8)]
    for round_ in range(2):
        batch = prompt_batch(records[4 * round_: 4 * round_ + 4], 4)
        batch = batch.union(one.actor.call("generate", batch, seed=round_))
        batch = batch.union(score_rows(one, cfg, batch))
        if cfg.recompute_old_logp:
            batch = batch.union(one.actor.call("logprobs", batch))
        batch = batch.union(one.reference.call("ref_logprobs", batch))
        if critics is not None:
            batch = batch.union(one.critic.call("values", batch))
        batch, _ = add_advantages(batch, cfg, cfg.algo.kl_coef)
        if critics is not None:
            expected = one.critic.broadcast("update", batch)[0]
            got = critics.broadcast("update", batch)
            assert got[0] == got[1]  # the same metrics on both replicas (all-reduced)
            for key in ("critic/loss", "critic/grad_norm"):
                assert got[0][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
            ref = one.critic.broadcast("trainable_state")[0]
            for rank, state in enumerate(critics.broadcast("trainable_state")):
                _same(ref, state, f"round {round_} critic rank {rank}")
        expected = one.actor.broadcast("update", batch)[0]
        got = actors.broadcast("update", batch)
        assert got[0] == got[1]
        for key in ("actor/loss", "actor/grad_norm", "actor/clipfrac"):
            assert got[0][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
        ref = one.actor.broadcast("trainable_state")[0]
        for rank, state in enumerate(actors.broadcast("trainable_state")):
            _same(ref, state, f"round {round_} actor rank {rank}")
        assert any((v != 0).any() for k, v in ref.items() if "lora_B" in k)  # the step moved the adapter


def test_replicas_refuse_a_minibatch_with_nothing_for_one_of_them(rl_setup):
    cfg = rl_setup("grpo", 1, algo={"minibatches": 2})
    batch = Batch({"mask": torch.ones(2, 1)}, {"prompt_ids": [[1], [2]], "response_ids": [[3], [4]]})
    for rank in (0, 1):  # both refuse (the one with a row would otherwise wait in the all-reduce forever)
        with pytest.raises(ValueError, match="a minibatch of 1 rows leaves some of the 2 replicas nothing"):
            minibatch_updates(torch.nn.Linear(1, 1), None, batch, (), cfg.algo, cfg.train, None, None, None, 0,
                              dp=(rank, 2))


def test_ppo_with_actor_and_critic_groups_runs_one_step_off_on_ray(rl_setup, ray_cluster):
    """The whole driver with two actor and two critic replicas and a rollout worker; rank 0 sends
    the adapter, every replica checks rollouts against what was sent; a checkpoint holds rank 0's
    state and the other replicas' RNG."""
    cfg = rl_setup("ppo", 3, backend="ray", actor_workers=2, critic_workers=2, rollout={"mode": "one_step_off"},
                   train={"save_every": 2})
    run_rl(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["actor/grad_norm"] > 0 and "critic/loss" in r for r in rows)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step-2"
    assert (ckpt / "actor" / "trainable.safetensors").exists() and (ckpt / "actor-rank1" / "rng.json").exists()
    assert (ckpt / "critic" / "trainable.safetensors").exists() and (ckpt / "critic-rank1" / "rng.json").exists()
    assert json.loads((ckpt / "state.json").read_text())["queued_steps"] == [2]
    final = Path(cfg.output_dir) / "final"  # written once, by rank 0
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
