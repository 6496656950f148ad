"""Advantage estimators, KL estimators and the PPO losses against hand-computed values."""

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.rl import algorithms as A


def _cfg(**kw):
    base = dict(gamma=1.0, lam=1.0, whiten_advantages=False, scale_by_std=True, eps=1e-6)
    return SimpleNamespace(**{**base, **kw})


def test_gae_matches_a_hand_computed_recursion():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 has 2 tokens
    gamma, lam = 0.9, 0.8
    adv, ret = A.gae_advantages({"token_rewards": rewards, "values": values, "mask": mask}, _cfg(gamma=gamma, lam=lam))
    want = torch.zeros(2, 3)
    for b, n in ((0, 3), (1, 2)):
        last = 0.0
        for t in reversed(range(n)):
            nv = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * nv - values[b, t].item()
            last = delta + gamma * lam * last
            want[b, t] = last
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, (want + values) * mask)
    assert adv[1, 2] == 0 and ret[1, 2] == 0


def test_grpo_and_rloo_advantages_per_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    mask = torch.ones(6, 2)
    adv, ret = A.grpo_advantages({"scores": scores, "group": group, "mask": mask}, _cfg())
    g0 = (scores[:4] - 0.25) / (scores[:4].std() + 1e-6)
    torch.testing.assert_close(adv[:4, 0], g0)
    torch.testing.assert_close(adv[4:, 1], torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 1e-6))
    assert ret is None
    dr = A.grpo_advantages({"scores": scores, "group": group, "mask": mask}, _cfg(scale_by_std=False))[0]
    torch.testing.assert_close(dr[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25, -1.0, 1.0]))
    rloo = A.rloo_advantages({"scores": scores, "group": group, "mask": mask}, _cfg())[0]
    torch.testing.assert_close(rloo[:, 0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, -2.0, 2.0]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        A.rloo_advantages({"scores": scores[:1], "group": group[:1], "mask": mask[:1]}, _cfg())


def test_registry_adds_estimators_and_rejects_duplicates(monkeypatch):
    from posttrain.registry import Registry

    scratch = Registry("advantage estimator")  # the built-ins plus a test one, put back after the test
    for name, fn in A.ADVANTAGES.items():
        scratch.register(name, fn)
    monkeypatch.setattr(A, "ADVANTAGES", scratch)

    @A.ADVANTAGES.register("test_constant")
    def constant(data, cfg):
        return data["mask"] * 2.0, None

    adv, _ = A.compute_advantages("test_constant", {"mask": torch.ones(1, 3)}, _cfg())
    assert adv.sum() == 6
    with pytest.raises(ValueError, match="already registered"):
        A.ADVANTAGES.register("test_constant")(constant)
    monkeypatch.undo()
    assert "test_constant" not in A.ADVANTAGES
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'; choose one of gae, grpo, rloo"):
        A.compute_advantages("nope", {}, _cfg())


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(A.kl_estimate(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(A.kl_estimate(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    k3 = A.kl_estimate(logp, ref, "k3")
    torch.testing.assert_close(k3, torch.exp(ref - logp) - (ref - logp) - 1)
    assert (k3 >= 0).all() and k3[2] == 0
    # k1 and k3 are unbiased for KL(p||q) under samples from p
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        est = A.kl_estimate(p.log()[x], q.log()[x], kind).mean()
        assert abs(est - exact) < 0.01, (kind, est, exact)


def test_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, 0.0, 0.0]])
    r, kl = A.token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, (logp - ref) * mask)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 2.05], [-0.9, 0.0, 0.0]]))  # k1 = -1 there: +0.1


def _algo(**kw):
    return SimpleNamespace(**{"clip": 0.2, "clip_high": None, **kw})


def test_ppo_loss_clips_the_ratio_and_clip_higher_widens_only_the_top():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    rows = torch.zeros(4)
    loss, m = A.policy_loss("ppo", logp, old, adv, rows, _algo())
    # min(r A, clip(r) A) per token, negated: 1.2, 0.8 (clipped), 1.1, 0.9 (inside the range)
    torch.testing.assert_close(loss, -torch.tensor([1.2, -0.8, 1.1, -0.9]).mean())
    assert m["clipfrac"] == 0.5
    weighted, _ = A.policy_loss("ppo", logp, old, adv, rows, _algo(), weight=torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(weighted, -torch.tensor([0.0, 0.0, 1.1, -0.9]).mean())
    high, _ = A.policy_loss("ppo", logp, old, adv, rows, _algo(clip_high=0.28))
    torch.testing.assert_close(high, -torch.tensor([1.28, -0.8, 1.1, -0.9]).mean())  # 1.5 -> 1.28, 0.5 -> 0.8
    with pytest.raises(ValueError, match="choose one of ppo, gspo, cispo"):
        A.policy_loss("nope", logp, old, adv, rows, _algo())


def test_gspo_uses_one_clipped_ratio_per_sequence_with_token_gradients():
    # sequence 0: token log-ratios 0.2 and 0 -> s = exp(0.1); sequence 1: log-ratio 1.0 -> s = e, clipped
    old = torch.zeros(3)
    logp = torch.tensor([0.2, 0.0, 1.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0])
    per_token, m = A.POLICY_LOSSES.get("gspo")(logp, old, adv, torch.tensor([0, 0, 1]), _algo())
    s0 = math.exp(0.1)
    torch.testing.assert_close(per_token.detach(), torch.tensor([-s0, -s0, -1.2]))
    per_token.sum().backward()
    # d/dlogp_t of -A * s with s's value and the token's own path: -A * s on sequence 0, 0 where clipped
    torch.testing.assert_close(logp.grad, torch.tensor([-s0, -s0, 0.0]))
    assert m["clipfrac"] == pytest.approx(1 / 3)


def test_cispo_keeps_a_gradient_on_clipped_tokens():
    old = torch.zeros(2)
    logp = torch.tensor([math.log(2.0), math.log(0.5)], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    per_token, m = A.POLICY_LOSSES.get("cispo")(logp, old, adv, torch.tensor([0, 1]), _algo(clip_high=0.28))
    # weights clip(2, .8, 1.28) = 1.28 and clip(.5, .8, 1.28) = .8, detached: loss = -w A log p
    torch.testing.assert_close(per_token.detach(), torch.tensor([-1.28 * math.log(2.0), 0.8 * math.log(0.5)]))
    per_token.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.28, 0.8]))  # PPO would give 0 on both
    assert m["clipfrac"] == 1.0


def test_loss_aggregations_weight_tokens_as_each_paper_averages():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # lengths 3 and 1, N = 4
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [10.0, 0.0, 0.0, 0.0]])

    def objective(mode, max_len=None):
        w = A.aggregation_weights(mask, mode, max_len)
        return (w * loss).sum() / mask.sum()  # what the update computes: the token mean of w * loss

    torch.testing.assert_close(objective("token-mean"), torch.tensor(16 / 4))
    torch.testing.assert_close(objective("seq-mean-token-mean"), torch.tensor((6 / 3 + 10 / 1) / 2))
    torch.testing.assert_close(objective("seq-mean-token-sum-norm", 4), torch.tensor((6 / 4 + 10 / 4) / 2))
    with pytest.raises(ValueError, match="maximum response length"):
        A.aggregation_weights(mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="choose token-mean"):
        A.aggregation_weights(mask, "seq-sum")


def test_reinforce_pp_whitens_returns_to_go_over_the_batch():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards = torch.tensor([[-0.1, 1.0], [2.0, 0.0]])  # KL penalty on each token, score on the last
    adv, returns = A.compute_advantages("reinforce_pp", {"token_rewards": rewards, "mask": mask}, _cfg())
    togo = torch.tensor([0.9, 1.0, 2.0])  # returns-to-go of the three real tokens
    want = (togo - togo.mean()) / togo.var(unbiased=False).add(1e-8).sqrt()
    assert returns is None
    torch.testing.assert_close(adv[mask.bool()], want)
    assert adv[1, 1] == 0


def test_reinforce_pp_baseline_subtracts_the_group_mean_first():
    mask = torch.ones(4, 1)
    scores = torch.tensor([1.0, 0.0, 5.0, 5.0])
    data = {"token_rewards": scores[:, None].clone(), "mask": mask, "scores": scores,
            "group": torch.tensor([0, 0, 1, 1])}
    adv, _ = A.compute_advantages("reinforce_pp_baseline", data, _cfg())
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(adv[:, 0], centred / centred.var(unbiased=False).add(1e-8).sqrt())


def test_truncated_and_masked_importance_sampling():
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    rollout = torch.zeros(3, 2)
    trainer = torch.tensor([[math.log(3.0), 0.0], [0.1, -0.1], [-1.0, 5.0]])
    torch.testing.assert_close(A.tis_weights(trainer, rollout, mask, cap=2.0),
                               torch.tensor([[2.0, 1.0], [math.exp(0.1), math.exp(-0.1)], [math.exp(-1.0), 0.0]]))
    # geometric-mean ratios: exp(log(3)/2) = 1.73, exp(0) = 1, exp(-1) = 0.37 (the padded 5.0 is ignored)
    torch.testing.assert_close(A.mis_mask(trainer, rollout, mask, threshold=2.0),
                               torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(A.mis_mask(trainer, rollout, mask, threshold=1.5),
                               torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    # the same on a packed micro-batch's flat tokens (the update's own forward, no separate pass)
    flat = mask.bool()
    rows = torch.arange(3.0)[:, None].expand(3, 2)[flat]
    for cap, threshold in ((2.0, 2.0), (2.0, None), (None, 1.5)):
        weight, keep = A.flat_rollout_correction(trainer[flat], rollout[flat], rows, cap, threshold)
        expected_keep = A.mis_mask(trainer, rollout, mask, threshold) if threshold else mask
        expected = (A.tis_weights(trainer, rollout, mask, cap) if cap else mask) * expected_keep
        torch.testing.assert_close(weight, expected[flat])
        torch.testing.assert_close(keep, expected_keep[flat])


def test_overlong_penalty_and_informative_groups():
    pen = A.overlong_penalty(torch.tensor([10, 12, 14, 16]), max_len=16, buffer=4, factor=0.5)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.25, -0.5]))
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert A.informative_groups(scores, torch.tensor([0, 0, 1, 1, 2, 2])) == [1]


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old = torch.tensor([0.0, 0.0])
    returns = torch.tensor([1.0, 1.0])
    values = torch.tensor([0.5, 2.0])
    loss, _ = A.value_loss(values, old, returns, torch.ones(2), clip=0.2)
    # row 0: unclipped (0.5-1)^2=.25, clipped (0.2-1)^2=.64 -> .64; row 1: (2-1)^2=1, (0.2-1)^2=.64 -> 1
    torch.testing.assert_close(loss, 0.5 * torch.tensor((0.64 + 1.0) / 2))


def test_adaptive_kl_moves_towards_the_target():
    ctl = A.AdaptiveKL(0.1, target=1.0, horizon=100)
    assert ctl.update(3.0, 10) > 0.1  # KL too high -> stronger penalty
    ctl = A.AdaptiveKL(0.1, target=1.0, horizon=100)
    assert ctl.update(0.1, 10) < 0.1
    assert A.AdaptiveKL(0.1, None).update(5.0, 10) == 0.1
