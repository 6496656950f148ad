"""DPO family: completion log-probs, the losses against TRL, the reference options, training."""

import collections
import copy
import json
import random
import types

import pytest
import torch

from posttrain.adapters import AdapterConfig, apply_adapter
from posttrain.config import TrainConfig
from posttrain.data.collate import collate_pairs, collate_two_sided, model_inputs
from posttrain.data.templates import IGNORE
from posttrain.models import tiny_model
from posttrain.train import dpo, loop, objectives
from posttrain.train.dpo import (
    completion_logps,
    dpo_loss,
    make_dpo_objective,
    precompute_reference_logps,
)

VOCAB = 256


def make_pairs(n: int = 8, seed: int = 0, **extra) -> list[dict]:
    """Random pairs: a shared prompt, then different completions of different lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 8))]
        pair = {}
        for side in ("chosen", "rejected"):
            completion = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))]
            pair[f"{side}_input_ids"] = prompt + completion
            pair[f"{side}_labels"] = [IGNORE] * len(prompt) + completion
        out.append({**pair, **extra})
    return out


def naive_logps(model, batch):
    """Full logits, log_softmax, gather the labels, sum the label positions of each row."""
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * keep).sum(1), keep.sum(1)


def lora(model, seed=1):
    """A LoRA policy whose adapters already change the outputs (B is not zero)."""
    peft_model = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return peft_model


@pytest.fixture
def model():
    return tiny_model(vocab_size=VOCAB)


def test_completion_logps_equals_naive_full_logits(model):
    batch = collate_pairs(make_pairs(5), pad_token_id=0)
    want, want_n = naive_logps(model, batch)
    for chunk in (2048, 7):  # one head call, and several checkpointed chunks
        got, n = completion_logps(model, batch, chunk_size=chunk)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert n.tolist() == want_n.tolist() == [len([t for t in lab[1:] if t != IGNORE])
                                                 for lab in batch["labels"].tolist()]
    # gradients too: chunked/checkpointed head vs the naive graph
    got, _ = completion_logps(model, batch, chunk_size=7)
    got.sum().backward()
    g = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    naive_logps(model, batch)[0].sum().backward()
    torch.testing.assert_close(g, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)


def test_packed_pairs_give_the_padded_logps_loss_and_gradients(model):
    pairs = make_pairs(5)
    padded, packed = collate_pairs(pairs, pad_token_id=0), collate_pairs(pairs, pad_token_id=0, packed=True)
    assert packed["input_ids"].shape[0] == 1 and packed["seq_index"].max().item() == 9
    assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum())  # no padding
    want, want_n = completion_logps(model, padded)
    got, n = completion_logps(model, packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert n.tolist() == want_n.tolist()
    policy = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8))
    objective = make_dpo_objective("sigmoid", beta=0.1)
    grads = []
    for batch in (padded, packed):
        loss, metrics = objective(policy, batch)
        loss.backward()
        grads.append([p.grad.clone() for p in policy.parameters() if p.requires_grad])
        policy.zero_grad()
        assert metrics["loss_tokens"] == 5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        objective(policy, {**packed, "seq_index": packed["seq_index"].clamp(max=8)})


def test_completion_logps_through_the_wrapper_forward(model, monkeypatch):
    # DDP/FSDP models and prompt tuning go through model(...) with logits_to_keep / virtual tokens
    batch = collate_pairs(make_pairs(4), pad_token_id=0)
    want, _ = completion_logps(model, batch)
    monkeypatch.setattr(objectives, "is_wrapped", lambda m: True)
    torch.testing.assert_close(completion_logps(model, batch)[0], want, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    prompted = apply_adapter(model, AdapterConfig(method="prompt", num_virtual_tokens=3))
    width = batch["input_ids"].shape[1]
    logits = prompted(**model_inputs(batch)).logits[:, -width:][:, :-1]
    targets = batch["labels"][:, 1:]
    token = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(completion_logps(prompted, batch)[0], (token * (targets != IGNORE)).sum(1),
                               rtol=1e-5, atol=1e-5)


def _trl_dpo(loss_type, beta, per_token, completion_mask, ref_chosen, ref_rejected):
    """TRL 1.16 DPOTrainer._compute_loss on a stub model that returns the given per-token log-probs.

    The stub `self` carries only the fields _compute_loss reads; precompute_ref_logps=True makes
    it take the reference log-probs from the inputs, so both sides see the same tensors.
    """
    from accelerate import Accelerator
    from trl import DPOTrainer

    rows, width = completion_mask.shape
    zeros = torch.zeros(rows, width - 1)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=Accelerator(cpu=True), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)

    def fake_model(**kwargs):
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool())

    inputs = {"input_ids": torch.ones(rows, width, dtype=torch.long), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(stub, fake_model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def _logps(b=6, width=12, seed=0):
    """Per-token completion log-probs [2B, T-1] (zero off the completion), the mask, references."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * b, width, dtype=torch.long)
    for r in range(2 * b):
        start = int(torch.randint(2, 6, (1,), generator=gen))
        end = int(torch.randint(start + 1, width + 1, (1,), generator=gen))
        mask[r, start:end] = 1
    per_token = -torch.rand(2 * b, width - 1, generator=gen, dtype=torch.float32) * 4 * mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * b, generator=gen)
    return per_token, mask, ref[:b], ref[b:]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_trl_dpo_trainer(loss_type, beta):
    per_token, mask, ref_c, ref_r = _logps()
    b = ref_c.shape[0]
    logps, counts = per_token.sum(1), mask.sum(1)
    want, m = _trl_dpo(loss_type, beta, per_token, mask, ref_c, ref_r)
    losses, chosen, rejected = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, loss_type, beta,
                                        chosen_tokens=counts[:b], rejected_tokens=counts[b:])
    assert losses.shape == (b,)
    torch.testing.assert_close(losses.mean(), want, rtol=1e-5, atol=1e-5)
    assert chosen.mean().item() == pytest.approx(m["rewards/chosen"], abs=1e-5)
    assert rejected.mean().item() == pytest.approx(m["rewards/rejected"], abs=1e-5)
    assert (chosen - rejected).mean().item() == pytest.approx(m["rewards/margins"], abs=1e-5)
    assert (chosen > rejected).float().mean().item() == pytest.approx(m["rewards/accuracies"])


def _trl_cpo(loss_type, beta, label_smoothing, gamma, chosen, rejected):
    """TRL 1.16 CPOTrainer.cpo_loss (a pure function of its config fields) on the given log-probs."""
    from trl.experimental.cpo import CPOTrainer

    stub = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                 simpo_gamma=gamma, accelerator=types.SimpleNamespace(device="cpu"))
    return CPOTrainer.cpo_loss(stub, chosen, rejected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_matches_trl_cpo_trainer(label_smoothing):
    # TRL's SimPO is CPOTrainer(loss_type="simpo") on per-token *average* log-probs; ours averages
    # the summed log-probs by the token counts itself.
    per_token, mask, _, _ = _logps(seed=1)
    b = per_token.shape[0] // 2
    logps, counts = per_token.sum(1), mask[:, 1:].sum(1)
    avg = logps / counts
    want, want_c, want_r = _trl_cpo("simpo", 2.0, label_smoothing, 0.8, avg[:b], avg[b:])
    losses, chosen, rejected = dpo_loss(logps[:b], logps[b:], None, None, "simpo", 2.0, label_smoothing, gamma=0.8,
                                        chosen_tokens=counts[:b], rejected_tokens=counts[b:])
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen, want_c)
    torch.testing.assert_close(rejected, want_r)


def test_conservative_dpo_matches_trl_label_smoothing():
    # TRL 1.16's DPOTrainer dropped label smoothing from its sigmoid loss; CPOTrainer keeps the
    # conservative form -(1-e) logsig(beta d) - e logsig(-beta d). Fed the log-ratios as its
    # "policy" log-probs, its d equals DPO's difference of log-ratios.
    per_token, _, ref_c, ref_r = _logps(seed=2)
    b = ref_c.shape[0]
    logps = per_token.sum(1)
    want, _, _ = _trl_cpo("sigmoid", 0.3, 0.25, 0.0, logps[:b] - ref_c, logps[b:] - ref_r)
    losses, _, _ = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, "sigmoid", 0.3, label_smoothing=0.25)
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)
    plain, _, _ = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, "sigmoid", 0.3)
    assert not torch.allclose(plain, losses)


def test_dpo_loss_rejects_bad_settings():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        dpo_loss(x, x, x, x, "kto")
    with pytest.raises(ValueError, match="pass chosen_tokens"):
        dpo_loss(x, x, x, x, "ipo")
    with pytest.raises(ValueError, match="needs reference"):
        dpo_loss(x, x, None, None, "sigmoid")
    with pytest.raises(ValueError, match="label_smoothing applies"):
        dpo_loss(x, x, x, x, "hinge", label_smoothing=0.1)


def test_reference_with_adapters_disabled_is_the_base_model(model):
    base = copy.deepcopy(model)
    policy = lora(model)
    batch = collate_pairs(make_pairs(4), pad_token_id=0)
    base_logps, _ = completion_logps(base, batch)
    assert not torch.allclose(completion_logps(policy, batch)[0], base_logps, atol=1e-3)  # adapters matter

    objective = make_dpo_objective("sigmoid", beta=0.1)
    with_peft, m = objective(policy, batch)
    with_copy, m_copy = make_dpo_objective("sigmoid", beta=0.1, reference=base)(policy, batch)
    torch.testing.assert_close(with_peft, with_copy, rtol=1e-6, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert m[key] == pytest.approx(m_copy[key], abs=1e-5)
    assert m["loss_tokens"] == 4 and 0.0 <= m["rewards/accuracy"] <= 1.0
    # the adapters are back on afterwards, and the reference took no gradient
    with_peft.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "lora" in n)
    assert not torch.allclose(completion_logps(policy, batch)[0].detach(), base_logps)


def test_precomputed_reference_gives_the_same_loss(model):
    policy = lora(model)
    pairs = make_pairs(6)
    batch = collate_pairs(pairs, pad_token_id=0)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        objective = make_dpo_objective(loss_type, beta=0.2)
        on_the_fly, _ = objective(policy, batch)
        pre = precompute_reference_logps(policy, copy.deepcopy(pairs), pad_token_id=0, batch_size=4)
        assert all("ref_chosen_logp" in e and "ref_rejected_logp" in e for e in pre)
        precomputed, _ = objective(policy, collate_pairs(pre, pad_token_id=0))
        torch.testing.assert_close(precomputed, on_the_fly, rtol=1e-5, atol=1e-6)
    assert policy.training  # restored after the eval-mode pass


def test_full_model_needs_a_reference(model):
    batch = collate_pairs(make_pairs(2), pad_token_id=0)
    with pytest.raises(ValueError, match="DPO needs a reference"):
        make_dpo_objective("sigmoid")(model, batch)
    loss, m = make_dpo_objective("simpo", beta=2.0)(model, batch)  # reference-free
    assert torch.isfinite(loss) and m["loss_tokens"] == 2


def _train_pairs(model, objective, pairs, tmp_path, epochs=3, packing=False):
    """Run the project's loop on pair examples (it plans, weights and collates them as pairs)."""
    cfg = TrainConfig(lr=2e-2, batch_size=4, packing=packing, max_tokens=4096, epochs=epochs, warmup_ratio=0.0,
                      progress=False, schedule="constant")
    return loop.train(model, objective, pairs, cfg, tmp_path, pad_token_id=0)


@pytest.mark.parametrize("loss_type,packing", [("sigmoid", False), ("ipo", False), ("hinge", False),
                                               ("simpo", False), ("sigmoid", True)])
def test_training_raises_the_chosen_minus_rejected_margin(model, loss_type, packing, tmp_path):
    torch.manual_seed(0)  # LoRA A's init
    policy = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8))  # B = 0: starts at the reference
    pairs = make_pairs(8)
    batch = collate_pairs(pairs, pad_token_id=0)
    beta = 2.0 if loss_type == "simpo" else 0.1
    objective = make_dpo_objective(loss_type, beta=beta)

    def margin():
        with torch.no_grad():
            logps, counts = completion_logps(policy, batch)
            if loss_type in ("simpo", "ipo"):
                logps = logps / counts
            return (logps[:8] - logps[8:]).mean().item()

    before = margin()
    first = objective(policy, batch)[1]
    _, summary = _train_pairs(policy, objective, pairs, tmp_path, packing=packing)
    after = margin()
    last = objective(policy, batch)[1]
    assert summary["steps"] == 6  # 3 epochs of 2 batches
    # measured: summed log-probs +3.4 (sigmoid), +4.0 (hinge); per-token averages +0.65 (ipo), +0.62 (simpo)
    assert after > before + (0.3 if loss_type in ("simpo", "ipo") else 1.5), (before, after)
    assert last["rewards/margin"] > first["rewards/margin"] and last["loss"] < first["loss"]
    if loss_type != "simpo":
        assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["rewards/margin"] for r in rows]  # the objective's metrics reach the log (and the report)
    assert len(logged) == 6 and logged[-1] > logged[0] and all(0 <= r["rewards/accuracy"] <= 1 for r in rows)


def test_rpo_adds_the_chosen_token_mean_nll(model):
    policy = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8))
    batch = collate_pairs(make_pairs(4), pad_token_id=0)
    plain, m0 = make_dpo_objective("sigmoid", beta=0.1)(policy, batch)
    rpo, m1 = make_dpo_objective("sigmoid", beta=0.1, rpo_alpha=0.5)(policy, batch)
    logps, counts = completion_logps(policy, batch)
    nll = -(logps[:4].sum() / counts[:4].sum())
    torch.testing.assert_close(rpo, plain + 0.5 * nll, rtol=1e-5, atol=1e-6)
    assert m1["nll/chosen"] == pytest.approx(nll.item(), rel=1e-5)
    with pytest.raises(ValueError, match="rpo_alpha"):
        make_dpo_objective("sigmoid", rpo_alpha=-1.0)


def _trl_orpo(lam, chosen_avg, rejected_avg):
    """TRL's ORPOTrainer.odds_ratio_loss (per-pair lambda x logsig(log odds ratio)) on average log-probs."""
    from trl.experimental.orpo import ORPOTrainer

    stub = types.SimpleNamespace(beta=lam, accelerator=types.SimpleNamespace(device="cpu"))
    return ORPOTrainer.odds_ratio_loss(stub, chosen_avg, rejected_avg)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_trl_orpo_trainer(lam):
    # TRL: loss = NLL(chosen, token mean over the batch) - mean(odds_ratio_loss); ours folds the
    # NLL into each pair's loss, so the mean over pairs is the same number.
    per_token, mask, _, _ = _logps(seed=3)
    per_token = per_token * 0.3  # mean log-probs on both sides of -ln 2 (log1mexp's two branches)
    b = per_token.shape[0] // 2
    logps, counts = per_token.sum(1), mask[:, 1:].sum(1)
    avg = logps / counts
    assert (avg > -0.69).any() and (avg < -0.7).any()
    ratio_losses, want_c, want_r, _, _ = _trl_orpo(lam, avg[:b], avg[b:])
    nll = -(per_token[:b] * mask[:b, 1:]).sum() / mask[:b, 1:].sum()
    losses, chosen, rejected = dpo_loss(logps[:b], logps[b:], None, None, "orpo", chosen_tokens=counts[:b],
                                        rejected_tokens=counts[b:], orpo_lambda=lam)
    torch.testing.assert_close(losses - nll, -ratio_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.mean(), nll - ratio_losses.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen, want_c)
    torch.testing.assert_close(rejected, want_r)


def test_orpo_trains_a_full_model_without_a_reference(model, tmp_path):
    # reference-free: a full model needs no copy, adapters or precomputed log-probs
    torch.manual_seed(0)
    pairs = make_pairs(8)
    batch = collate_pairs(pairs, pad_token_id=0)
    objective = make_dpo_objective("orpo", orpo_lambda=1.0)
    first = objective(model, batch)[1]
    _train_pairs(model, objective, pairs, tmp_path)
    last = objective(model, batch)[1]
    assert last["loss"] < first["loss"] and last["nll/chosen"] < first["nll/chosen"]
    assert last["rewards/margin"] > first["rewards/margin"], (first, last)


def _trl_kto(beta, weights, per_token, kl_per_token, mask, kl_mask, labels, ref, ref_kl):
    """TRL's KTOTrainer._compute_loss (loss_type="kto", precomputed reference) on a stub model that
    returns the given per-token log-probs for the completions and for the KL rows."""
    from accelerate import Accelerator
    from trl import KTOTrainer

    rows, width = mask.shape
    ids, kl_ids = torch.ones(rows, width, dtype=torch.long), torch.ones(rows, width, dtype=torch.long)
    zeros = torch.zeros(rows, width - 1)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=Accelerator(cpu=True), aux_loss_enabled=False,
        precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=weights[0],
        undesirable_weight=weights[1], _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1)
    stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)

    def fake_model(**kwargs):
        log_probs = kl_per_token if kwargs["input_ids"] is kl_ids else per_token
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_mask), "KL_completion_mask": kl_mask,
              "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = KTOTrainer._compute_loss(stub, fake_model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("beta,weights,kl_shift", [(0.1, (1.0, 1.0), 1.0), (0.5, (1.0, 1.33), 1.0),
                                                   (0.5, (1.0, 1.0), -3.0)])
def test_kto_loss_matches_trl_kto_trainer(beta, weights, kl_shift):
    # kl_shift < 0 makes the KL rows' policy-minus-reference mean negative: the clamp at 0 matters
    per_token, mask, ref, _ = _logps(seed=4)  # 2B rows: B completions, then B KL rows
    n = ref.shape[0]
    completions, kl_rows = per_token[:n], per_token[n:]
    logps, kl_logps = completions.sum(1), kl_rows.sum(1)
    ref_kl = kl_logps - kl_shift + torch.linspace(-0.5, 0.5, n)
    labels = torch.tensor([True, False, True, True, False, False])
    want, m = _trl_kto(beta, weights, completions, kl_rows, mask[:n], mask[n:], labels, ref, ref_kl)
    spec = dpo.PREFERENCE_LOSSES.get("kto")
    assert (spec.reference, spec.data) == (True, "unpaired")
    settings = dpo.LossSettings(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    losses, rewards, kl = spec.fn(logps, ref, kl_logps, ref_kl, labels, settings)
    torch.testing.assert_close(losses.mean(), want, rtol=1e-5, atol=1e-5)
    assert kl.item() == pytest.approx(m["kl"], abs=1e-6) and kl.item() == max(0.0, (kl_logps - ref_kl).mean().item())
    assert rewards[labels].mean().item() == pytest.approx(m["rewards/chosen"], abs=1e-5)
    assert rewards[~labels].mean().item() == pytest.approx(m["rewards/rejected"], abs=1e-5)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto' \\(kto reads unpaired data\\)"):
        dpo_loss(logps, logps, ref, ref, "kto")


def make_unpaired(n: int = 8, seed: int = 0) -> list[dict]:
    """Random unpaired examples (half desirable) with their KL rows."""
    from posttrain.data.templates import add_kl_completions

    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 8))]
        completion = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))]
        out.append({"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion,
                    "desirable": i % 2 == 0})
    return add_kl_completions(out, seed=seed)


def test_kto_reference_options_agree_and_kto_refuses_pairs(model):
    base = copy.deepcopy(model)
    policy = lora(model)
    examples = make_unpaired(6)
    batch = collate_two_sided(examples, pad_token_id=0)
    objective = make_dpo_objective("kto", beta=0.5)
    with_peft, m = objective(policy, batch)
    with_copy, _ = make_dpo_objective("kto", beta=0.5, reference=base)(policy, batch)
    pre = precompute_reference_logps(policy, copy.deepcopy(examples), pad_token_id=0, batch_size=4)
    assert all("ref_logp" in e and "ref_kl_logp" in e for e in pre)
    precomputed, _ = objective(policy, collate_two_sided(pre, pad_token_id=0, packed=True))
    torch.testing.assert_close(with_copy, with_peft, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(precomputed, with_peft, rtol=1e-5, atol=1e-6)
    assert m["loss_tokens"] == 6 and m["kl"] >= 0 and m["desirable"] == 0.5
    logps = completion_logps(policy, batch)[0].detach()
    ref = completion_logps(base, batch)[0]
    assert m["rewards/chosen"] == pytest.approx((0.5 * (logps[:6] - ref[:6]))[0::2].mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="the kto loss reads unpaired data; got a batch of pairs"):
        objective(policy, collate_pairs(make_pairs(2), pad_token_id=0))
    with pytest.raises(ValueError, match="the sigmoid loss reads pairs data; got a batch of unpaired examples"):
        make_dpo_objective("sigmoid")(policy, batch)


def test_kto_training_raises_desirable_over_undesirable_log_ratios(model, tmp_path):
    torch.manual_seed(0)
    policy = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8))  # starts at the reference
    examples = make_unpaired(8)
    objective = make_dpo_objective("kto", beta=0.5)
    batch = collate_two_sided(examples, pad_token_id=0)
    first = objective(policy, batch)[1]
    _, summary = _train_pairs(policy, objective, examples, tmp_path, packing=True)
    last = objective(policy, batch)[1]
    assert summary["steps"] == 6  # 3 epochs of 2 batches of 4: one loss unit per example, like pairs
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6) and first["kl"] == 0.0
    assert last["rewards/margin"] > 0.5 and last["loss"] < first["loss"], (first, last)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("kl" in r for r in rows)
