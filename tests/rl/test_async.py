"""one_step_off and async rollouts: separate rollout workers sample ahead of the update, within a
staleness bound, from weights the actor pushes (LoRA: the adapter only)."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.rl.controller import ActorWorker, RolloutWorker, prompt_batch, run_rl
from posttrain.rl.rollout import StaleRolloutError

PROBE = torch.tensor([[1, 5, 9, 200, 31, 7, 3]])


def _rows(cfg):
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


def _probe(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def _instrument(monkeypatch) -> dict:
    """Find out, without the version stamps, which actor version every rollout batch was sampled
    from: the rollout copy's logits on a probe (the weights that sample) against the actor's at
    each version it exported. Batches are trained in the order they were sampled."""
    log = {"exported": {}, "sampled": [], "trained": []}
    export, generate, update = ActorWorker.export_weights, RolloutWorker.generate, ActorWorker.update

    def exporting(self, send=True):
        out = export(self, send)
        log["exported"][self.version] = _probe(self.raw)
        return out

    def generating(self, batch, **kw):
        held = _probe(self.rollout.model)
        log["sampled"].append([v for v, logits in log["exported"].items()
                               if torch.allclose(logits, held, atol=1e-5, rtol=1e-5)])
        return generate(self, batch, **kw)

    def updating(self, batch):
        log["trained"].append((self.version, sorted(set(batch["policy_version"].tolist()))))
        return update(self, batch)

    monkeypatch.setattr(ActorWorker, "export_weights", exporting)
    monkeypatch.setattr(RolloutWorker, "generate", generating)
    monkeypatch.setattr(ActorWorker, "update", updating)
    return log


def _lags(log: dict) -> list[int]:
    """Per trained batch: the trainer's version minus the newest version whose weights sampled it."""
    assert len(log["sampled"]) == len(log["trained"])
    out = []
    for matches, (trained_at, stamps) in zip(log["sampled"], log["trained"]):
        assert matches, "a rollout sampled from weights the actor never had"
        assert stamps == [max(matches)] or stamps[0] in matches  # the stamp names the weights that sampled
        out.append(trained_at - max(matches))
    return out


@pytest.mark.parametrize("mode,bound", [("one_step_off", 1), ("async", 2)])
def test_every_rollout_samples_weights_within_the_staleness_bound(rl_setup, monkeypatch, mode, bound):
    log = _instrument(monkeypatch)
    cfg = rl_setup("grpo", 6, output_dir=f"{rl_setup('grpo', 1).output_dir}-{mode}", rollout={"mode": mode})
    run_rl(cfg)
    lags = _lags(log)
    # the first batches come from the starting weights; after that every batch is exactly `bound` behind
    assert lags == [min(i, bound) for i in range(6)], lags
    rows = _rows(cfg)
    assert [r["async/staleness_max"] for r in rows] == [float(x) for x in lags]
    assert all(r["sync/tensors"] > 0 for r in rows if "sync/tensors" in r)


def test_a_rollout_stuck_on_old_weights_is_refused(rl_setup, monkeypatch):
    """Sync deliberately broken: the weights go out once, at the start. The update refuses the
    third batch (2 versions behind, bound 1); with the check switched off, the instrumented
    test above sees the lag and would fail."""
    import posttrain.rl.controller as controller

    real_push, pushes = controller.push_weights, []

    def first_push_only(groups):
        pushes.append(1)
        return real_push(groups) if len(pushes) == 1 else controller.Pending([], remote=False)

    monkeypatch.setattr(controller, "push_weights", first_push_only)
    cfg = rl_setup("grpo", 4, rollout={"mode": "one_step_off"})
    with pytest.raises(StaleRolloutError, match="version 0, 2 updates behind the trainer's version 2; .* allows 1"):
        run_rl(cfg)

    pushes.clear()
    log = _instrument(monkeypatch)
    monkeypatch.setattr("posttrain.rl.rollout.check_staleness", lambda *a, **k: {})
    run_rl(rl_setup("grpo", 4, output_dir=cfg.output_dir + "-unchecked", rollout={"mode": "one_step_off"}))
    assert max(_lags(log)) > 1  # what the instrumented test asserts against


def test_an_adapter_that_never_reaches_the_sampler_is_refused(rl_setup, monkeypatch):
    """verl#7495: in async mode the adapter was silently never loaded by the rollout engine. Here
    the worker takes the version number but not the tensors: the fingerprint of what it holds is
    not the one sent, and the first update refuses its rollouts."""
    monkeypatch.setattr("posttrain.train.loop.load_trainable_state", lambda model, state: None)
    with pytest.raises(StaleRolloutError, match="rows of policy version 0 .* did not load what was sent"):
        run_rl(rl_setup("grpo", 2, rollout={"mode": "one_step_off"}))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_weight_sync_sends_the_adapter_only_and_moves_what_the_rollout_samples(rl_setup, method):
    cfg = rl_setup("grpo", 1, adapter={"method": method}, rollout={"mode": "one_step_off", "max_new_tokens": 8})
    actor, rollout = ActorWorker(cfg), RolloutWorker(cfg)
    params = dict(actor.raw.named_parameters())
    sent = actor.export_weights()
    if method == "lora":  # exactly the adapter's A and B matrices: no base weight travels
        assert set(sent["tensors"]) == {n for n in params if "lora_A" in n or "lora_B" in n}
        assert sum(t.numel() for t in sent["tensors"].values()) < 0.01 * sum(p.numel() for p in params.values())
    else:  # full fine-tuning: every weight
        assert set(sent["tensors"]) == set(params)
    report = rollout.load_weights(sent)
    assert report["version"] == 0 and report["fingerprint"] == sent["fingerprint"]
    prompts = prompt_batch([{"prompt": "Count to 3."}, {"prompt": "Say hi."}], 1)
    before = rollout.generate(prompts, greedy=True)
    assert before["policy_version"].tolist() == [0, 0]

    with torch.no_grad():  # a trained policy: the adapter (or every weight) moved
        for name, p in actor.raw.named_parameters():
            if p.requires_grad and (method == "full" or "lora_B" in name):
                p.add_(torch.randn_like(p) * 0.3)
    actor.version = 1
    assert rollout.generate(prompts, greedy=True)["response_ids"] == before["response_ids"]  # stale until pushed
    rollout.load_weights(actor.export_weights())
    after = rollout.generate(prompts, greedy=True)
    assert after["response_ids"] != before["response_ids"]
    assert after["policy_version"].tolist() == [1, 1]
    assert after["response_ids"] == actor.generate(prompts, greedy=True)["response_ids"]  # as the actor samples
    torch.testing.assert_close(_probe(rollout.rollout.model), _probe(actor.raw), atol=1e-5, rtol=1e-5)


def test_one_step_off_on_ray_gives_the_local_run(rl_setup, ray_cluster):
    """Ray runs the next batch's sampling while the update runs; calls to the rollout worker keep
    the driver's order, so each batch is sampled from the same version as in the local run."""
    local = rl_setup("grpo", 4, rollout={"mode": "one_step_off"})
    remote = rl_setup("grpo", 4, backend="ray", rollout={"mode": "one_step_off"})
    run_rl(local)
    run_rl(remote)
    a, b = _rows(local), _rows(remote)
    assert [r["async/staleness_max"] for r in b] == [0.0, 1.0, 1.0, 1.0]
    for x, y in zip(a, b, strict=True):
        for key in ("reward", "kl", "loss", "actor/grad_norm", "drift/mean_abs", "async/staleness_mean"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
    assert all(0 <= r["trainer_idle_share"] <= 1 for r in b)


@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_off_policy_grpo_with_the_correction_raises_the_reward(rl_setup, mode):
    cfg = rl_setup("grpo", 20, output_dir=f"{rl_setup('grpo', 1).output_dir}-{mode}", rollout={"mode": mode},
                   algo={"tis_cap": 2.0, "mis_threshold": 4.0})
    manifest = run_rl(cfg)
    first, last = manifest["outputs"]["reward_first5"], manifest["outputs"]["reward_last5"]
    assert last > first + 0.1, (mode, first, last)
    rows = _rows(cfg)
    assert rows[0]["drift/max_abs"] < 1e-4  # the first batch: sampled from the weights it trains
    assert max(r["drift/max_abs"] for r in rows[2:]) > 1e-2  # later ones lag: the rollout log-probs show it
    assert all("mis/masked_share" in r for r in rows)


def test_corrections_from_the_update_forward_equal_a_separate_old_logprob_pass(rl_setup):
    """One update per batch: TIS and MIS take the trainer's log-probs from the update's own
    forward instead of a no-grad pass before it (one forward fewer per step). Off-policy, so
    the weights are not 1, the result equals the run with the pass. (The logged `kl` differs:
    without the pass it is the sampler's log-probs against the reference, a version behind.)"""
    extra = {"rollout": {"mode": "one_step_off"}}
    skip = rl_setup("grpo", 5, algo={"tis_cap": 1.2, "mis_threshold": 1.3}, **extra)
    assert not skip.recompute_old_logp
    full = rl_setup("grpo", 5, output_dir=skip.output_dir + "-pass", **extra,
                    algo={"tis_cap": 1.2, "mis_threshold": 1.3, "recompute_old_logp": True})
    run_rl(skip)
    run_rl(full)
    a, b = _rows(skip), _rows(full)
    assert max(r["drift/max_abs"] for r in a[1:]) > 0.2  # ratios beyond the cap and threshold occur
    for x, y in zip(a, b, strict=True):
        for key in ("reward", "loss", "actor/kl_loss", "actor/grad_norm", "drift/mean_abs", "mis/masked_share"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert any(r["mis/masked_share"] > 0 for r in a)


def test_sigkill_mid_async_run_then_resume_matches_the_uninterrupted_run(rl_setup):
    """The batches sampled ahead (from weights no longer held anywhere) are saved with the
    checkpoint; the resumed run trains on them and ends on the uninterrupted run's weights."""
    from tests.rl.rl_worker import assert_resume_exact

    extra = {"train": {"save_every": 2}, "rollout": {"mode": "async"}, "algo": {"tis_cap": 2.0}}
    straight = rl_setup("grpo", 8, **extra)
    killed = rl_setup("grpo", 8, output_dir=straight.output_dir + "-killed", **extra)
    assert_resume_exact(straight, killed, 8, ("reward", "kl", "loss", "async/staleness_max"))
