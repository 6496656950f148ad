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


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4)
    loss, m = A.policy_loss(logp, old, adv, mask, clip=0.2)
    # min(r A, clip(r) A) per token, negated: 1.2, 0.8 (clipped), 1.1, 0.9 (inside the range)
    torch.testing.assert_close(loss, -torch.tensor([1.2, -0.8, 1.1, -0.9]).mean())
    assert m["clipfrac"] == 0.5
    weighted, _ = A.policy_loss(logp, old, adv, mask, clip=0.2, is_weight=torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(weighted, -torch.tensor([0.0, 0.0, 1.1, -0.9]).mean())


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
