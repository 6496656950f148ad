"""Distillation: divergences (hand values, TRL, limits), the chunked objective against a naive
full-logits one, on-policy sampling, sequence-level records, and the stage end to end."""

import copy
import json
import math
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from posttrain.compress.distill import (
    DistillConfig,
    batch_examples,
    check_same_vocab,
    distill_divergence,
    make_distill_objective,
    make_on_policy_objective,
    prompt_of,
    run_distill,
    teacher_generations,
)
from posttrain.config import TrainConfig
from posttrain.data.collate import collate_packed, collate_padded, model_inputs
from posttrain.data.templates import encode_record
from posttrain.generate.engine import GenerationConfig, generate
from posttrain.models import load_model, save_model, tiny_model
from posttrain.train.loop import train
from posttrain.train.objectives import causal_lm_loss

# ----------------------------------------------------------------------------- divergences

LN3 = math.log(3.0)


def test_divergences_match_hand_computed_values():
    student = torch.tensor([[0.0, 0.0]])  # (1/2, 1/2)
    teacher = torch.tensor([[0.0, LN3]])  # (1/4, 3/4)
    fwd = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    m = (0.375, 0.625)  # 0.5 teacher + 0.5 student
    jsd = 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])) \
        + 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    for kind, want in (("forward_kl", fwd), ("reverse_kl", rev), ("jsd", jsd)):
        got = distill_divergence(student, teacher, kind)
        assert got.shape == (1,)
        assert got.item() == pytest.approx(want, rel=1e-6), kind
    # temperature 2 halves the logits: teacher (1, sqrt 3) / (1 + sqrt 3)
    p = 1 / (1 + math.sqrt(3))
    fwd_t2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert distill_divergence(student, teacher, "forward_kl", temperature=2.0).item() == pytest.approx(fwd_t2, rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl_gkd(beta, temperature):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 50, generator=gen) * 3, torch.randn(2, 6, 50, generator=gen) * 3
    labels = torch.randint(0, 50, (2, 6), generator=gen)
    labels[0, :2] = -100
    want = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    keep = labels != -100
    ours = distill_divergence(s[keep], t[keep], "jsd", temperature, beta)
    assert ours.mean().item() == pytest.approx(want.item(), rel=1e-5)
    if beta in (0.0, 1.0):  # TRL's ends are exactly forward / reverse KL: so are ours
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
        assert distill_divergence(s[keep], t[keep], kind, temperature).mean().item() == pytest.approx(want.item(),
                                                                                                      rel=1e-5)


def test_jsd_limits_and_basic_properties():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 40, generator=gen, dtype=torch.float64), torch.randn(5, 40, generator=gen, dtype=torch.float64)
    fwd, rev = distill_divergence(s, t, "forward_kl"), distill_divergence(s, t, "reverse_kl")
    eps = 1e-5
    torch.testing.assert_close(distill_divergence(s, t, "jsd", beta=eps) / eps, fwd, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(distill_divergence(s, t, "jsd", beta=1 - eps) / eps, rev, rtol=1e-3, atol=1e-6)
    mid = distill_divergence(s, t, "jsd", beta=0.5)
    assert (mid > 0).all() and (mid <= math.log(2) + 1e-6).all()  # the JSD is bounded by ln 2
    assert not torch.equal(fwd, rev)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert distill_divergence(s, s + 7.0, kind).abs().max() < 1e-9  # shift-invariant, zero when equal
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distill_divergence(s, t, "kl")
    with pytest.raises(ValueError, match="share the vocabulary"):
        distill_divergence(s, t[:, :30])


# ----------------------------------------------------------------------------- the objective


def _examples(n, seed=0, lo=6, hi=14):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        ids = torch.randint(5, 400, (length,), generator=gen).tolist()
        cut = length // 2
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def _teacher(tokenizer, seed=1, sharpen=20.0):
    """A tiny teacher with confident (non-uniform) predictions: its final norm scaled up."""
    teacher = tiny_model(tokenizer, seed=seed)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(sharpen)
    return teacher


def _naive(student, teacher, batch, kind, temperature, beta, ce_weight):
    """Full logits over every position, then select: what the chunked objective must equal."""
    s = student(**model_inputs(batch)).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**model_inputs(batch)).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    div = distill_divergence(s[keep], t[keep], kind, temperature, beta).mean()
    ce = F.cross_entropy(s[keep].float(), targets[keep])
    return (1 - ce_weight) * div + ce_weight * ce


@pytest.mark.parametrize("kind,temperature,beta,ce_weight", [
    ("forward_kl", 1.0, 0.5, 0.0), ("reverse_kl", 2.0, 0.5, 0.0), ("jsd", 1.5, 0.3, 0.25)])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_objective_equals_naive_full_logits(tokenizer, tiny, kind, temperature, beta, ce_weight, layout):
    teacher = _teacher(tokenizer)
    examples = _examples(5)
    batch = collate_packed(examples) if layout == "packed" else collate_padded(examples, tokenizer.pad_token_id)
    n = int((batch["labels"][:, 1:] != -100).sum())
    objective = make_distill_objective(teacher, kind, temperature, beta, ce_weight, chunk_size=7)  # several chunks
    loss, metrics = objective(tiny, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in tiny.named_parameters()}
    tiny.zero_grad()
    want = _naive(tiny, teacher, batch, kind, temperature, beta, ce_weight)
    want.backward()
    assert metrics["loss_tokens"] == n
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for k, p in tiny.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)  # grads up to ~0.2
    assert 0.0 <= metrics["agreement"] <= 1.0 and metrics["kl"] > 0 and metrics["nll"] > 0


def test_zero_loss_when_the_student_is_the_teacher(tokenizer):
    teacher = _teacher(tokenizer)
    student = copy.deepcopy(teacher).requires_grad_(True)
    batch = collate_packed(_examples(4))
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss, metrics = make_distill_objective(teacher, kind, chunk_size=5)(student, batch)
        assert abs(loss.item()) < 1e-5, kind
        assert metrics["agreement"] == 1.0 and abs(metrics["kl"]) < 1e-5


def test_gradients_reach_only_the_student(tokenizer, tiny):
    teacher = _teacher(tokenizer)
    before = {k: p.clone() for k, p in teacher.named_parameters()}
    objective = make_distill_objective(teacher, "jsd", chunk_size=4)
    loss, _ = objective(tiny, collate_packed(_examples(3)))
    loss.backward()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, before[k]) for k, p in teacher.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.parameters())


def test_bf16_teacher_with_fp32_student(tokenizer, tiny):
    teacher = _teacher(tokenizer).to(torch.bfloat16)
    loss, _ = make_distill_objective(teacher, chunk_size=8)(tiny, collate_packed(_examples(3)))
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    want = _naive(tiny, teacher, collate_packed(_examples(3)), "forward_kl", 1.0, 0.5, 0.0)
    assert loss.item() == pytest.approx(want.item(), rel=5e-3)  # bf16 attention paths round differently


def _mean_kl(student, objective, examples):
    student.eval()
    with torch.no_grad():
        _, metrics = objective(student, collate_packed(examples))
    student.train()
    return metrics["kl"]


def _depth_pruned(teacher):
    """The teacher without its last layer: the student of the distillation demonstration, in small."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    del student.model.layers[-1]
    student.config.num_hidden_layers -= 1
    return student


def test_distillation_through_the_loop_lowers_the_kl(tokenizer, tmp_path):
    teacher = _teacher(tokenizer, sharpen=5.0)
    student = _depth_pruned(teacher)
    objective = make_distill_objective(teacher, "forward_kl", chunk_size=64)
    examples, held_out = _examples(48, seed=2), _examples(8, seed=3)
    start_train, start_held = _mean_kl(student, objective, examples[:8]), _mean_kl(student, objective, held_out)
    cfg = TrainConfig(max_steps=20, lr=1e-3, max_tokens=120, warmup_ratio=0.0, progress=False)
    student, summary = train(student, objective, examples, cfg, tmp_path / "run", pad_token_id=tokenizer.pad_token_id)
    assert summary["steps"] == 20
    end_train, end_held = _mean_kl(student, objective, examples[:8]), _mean_kl(student, objective, held_out)
    assert end_train < 0.5 * start_train, (start_train, end_train)  # measured 0.111 -> 0.017
    assert end_held < 0.9 * start_held, (start_held, end_held)  # random tokens: 0.112 -> 0.076
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


# ----------------------------------------------------------------------------- on-policy


def test_batch_examples_and_prompts_round_trip_packed_and_padded(tokenizer):
    examples = _examples(3)
    for batch in (collate_packed(examples), collate_padded(examples, tokenizer.pad_token_id)):
        got = batch_examples(batch)
        assert [g[0] for g in got] == [e["input_ids"] for e in examples]
        assert [prompt_of(g[0], g[1]) for g in got] == [e["input_ids"][: len(e["input_ids"]) // 2] for e in examples]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_on_policy_scores_the_students_own_samples(tokenizer, tiny, layout):
    seen = []

    def spy(model, batch):
        seen.append(batch)
        return causal_lm_loss(model, batch)

    examples = _examples(3)
    batch = collate_packed(examples) if layout == "packed" else collate_padded(examples, tokenizer.pad_token_id)
    planned = int((batch["labels"][:, 1:] != -100).sum())
    objective = make_on_policy_objective(spy, tokenizer, lmbda=1.0, max_new_tokens=5, temperature=1.0)
    tiny.train()
    torch.manual_seed(7)
    _, metrics = objective(tiny, batch)
    prompts = [e["input_ids"][: len(e["input_ids"]) // 2] for e in examples]
    torch.manual_seed(7)
    samples = generate(tiny, tokenizer, prompts, GenerationConfig(max_new_tokens=5, do_sample=True)).token_ids
    assert tiny.training  # sampling put the model back in training mode
    used = batch_examples(seen[-1])
    assert [u[0] for u in used] == [p + s for p, s in zip(prompts, samples)]
    assert [[t for t in u[1] if t != -100] for u in used] == samples
    assert metrics["on_policy"] == 1.0 and metrics["loss_tokens"] == planned
    assert metrics["sampled_tokens"] == sum(len(s) for s in samples)
    # evaluation and lmbda=0 keep the batch's own completions
    tiny.eval()
    objective(tiny, batch)
    tiny.train()
    _, off = make_on_policy_objective(spy, tokenizer, lmbda=0.0)(tiny, batch)
    for kept in seen[-2:]:
        assert torch.equal(kept["input_ids"], batch["input_ids"])
    assert off["on_policy"] == 0.0 and off["loss_tokens"] == planned


def test_on_policy_lmbda_is_the_share_of_sampled_micro_batches(tokenizer, tiny):
    calls = []
    objective = make_on_policy_objective(lambda m, b: (calls.append(b) or causal_lm_loss(m, b)), tokenizer,
                                         lmbda=0.5, max_new_tokens=1)
    batch = collate_packed(_examples(2))
    tiny.train()
    random.seed(0)
    flags = [objective(tiny, batch)[1]["on_policy"] for _ in range(40)]
    assert 8 <= sum(flags) <= 32  # Binomial(40, 0.5): outside this range with probability < 1e-4


def test_on_policy_distillation_trains_a_lora_student_through_the_loop(tokenizer, tmp_path):
    from posttrain.adapters import AdapterConfig, apply_adapter

    teacher = _teacher(tokenizer)
    student = apply_adapter(tiny_model(tokenizer, seed=0), AdapterConfig(method="lora", r=4, alpha=8), tokenizer)
    inner = make_distill_objective(teacher, "reverse_kl", chunk_size=64)
    objective = make_on_policy_objective(inner, tokenizer, lmbda=1.0, max_new_tokens=4)
    lora_before = {k: p.clone() for k, p in student.named_parameters() if p.requires_grad}
    cfg = TrainConfig(max_steps=3, lr=1e-2, max_tokens=64, progress=False)
    student, summary = train(student, objective, _examples(12), cfg, tmp_path / "run",
                             pad_token_id=tokenizer.pad_token_id)
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss"])
    assert any(not torch.equal(p, lora_before[k]) for k, p in student.named_parameters() if p.requires_grad)


def test_on_policy_resume_samples_the_same_tokens(tokenizer, tmp_path):
    """The coin and the sampler draw from the global RNGs the loop checkpoints: resuming from
    step 2 reaches the weights of the uninterrupted 4-step run."""
    from posttrain.adapters import AdapterConfig, apply_adapter

    teacher = _teacher(tokenizer)

    def run(run_dir, resume):
        torch.manual_seed(0)
        student = apply_adapter(tiny_model(tokenizer, seed=0), AdapterConfig(method="lora", r=4, alpha=8), tokenizer)
        inner = make_distill_objective(teacher, "forward_kl", chunk_size=64)
        objective = make_on_policy_objective(inner, tokenizer, lmbda=0.5, max_new_tokens=3)
        cfg = TrainConfig(max_steps=4, lr=1e-2, max_tokens=64, save_every=2, progress=False)
        student, _ = train(student, objective, _examples(12), cfg, run_dir, pad_token_id=tokenizer.pad_token_id,
                           resume=resume)
        return {k: p.detach().clone() for k, p in student.named_parameters() if p.requires_grad}

    full = run(tmp_path / "a", resume=False)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", tmp_path / "b" / "checkpoints" / "step-2")
    resumed = run(tmp_path / "b", resume=True)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- sequence level


def test_teacher_generations_are_records_the_student_trains_on(tokenizer, tmp_path):
    teacher = _teacher(tokenizer)
    gen = GenerationConfig(max_new_tokens=6, chat=True)
    prompts = ["What is 1 plus 1?", [{"role": "user", "content": "Name a colour."}]]
    records = teacher_generations(teacher, tokenizer, prompts, gen, batch_size=1)
    texts = generate(teacher, tokenizer, prompts, gen).texts
    assert records == [
        {"messages": [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": texts[0]}]},
        {"messages": [*prompts[1], {"role": "assistant", "content": texts[1]}]}]
    raw = teacher_generations(teacher, tokenizer, ["Once upon a time"], GenerationConfig(max_new_tokens=4))
    assert list(raw[0]) == ["prompt", "completion"] and raw[0]["prompt"] == "Once upon a time"

    many = teacher_generations(teacher, tokenizer, [f"Count to {i}." for i in range(12)], gen)
    examples = [encode_record(tokenizer, r, "chat") for r in many]
    student = tiny_model(tokenizer, layers=1, seed=4)
    cfg = TrainConfig(max_steps=12, lr=3e-3, max_tokens=400, warmup_ratio=0.0, progress=False)
    student, _ = train(student, causal_lm_loss, examples, cfg, tmp_path / "run", pad_token_id=tokenizer.pad_token_id)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]


# ----------------------------------------------------------------------------- config and stage


def test_vocab_mismatch_is_a_clear_error(tokenizer, tiny):
    wider = tiny_model(tokenizer, vocab_size=len(tokenizer) + 8)
    with pytest.raises(ValueError, match="share one tokenizer"):
        check_same_vocab(tiny, tokenizer, wider, tokenizer)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<distill_test_token>"])
    with pytest.raises(ValueError, match="tokenizers differ.*<distill_test_token>"):
        check_same_vocab(tiny, tokenizer, tiny, other)
    with pytest.raises(ValueError, match="share one tokenizer"):
        make_distill_objective(wider)(tiny, collate_packed(_examples(2)))
    check_same_vocab(tiny, tokenizer, _teacher(tokenizer), tokenizer)  # same vocabulary: no error


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def dirs(tmp_path, tokenizer):
    save_model(tiny_model(tokenizer, layers=1, seed=0), tokenizer, tmp_path / "student")
    save_model(_teacher(tokenizer), tokenizer, tmp_path / "teacher")
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                           {"role": "assistant", "content": f"{i + 1}"}]} for i in range(16)]
    prompts = [{"prompt": f"What is {i} plus 2?"} for i in range(8)]
    test = [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(30, 33)]
    return {"root": tmp_path, "student": str(tmp_path / "student"), "teacher": str(tmp_path / "teacher"),
            "chats": _write_jsonl(tmp_path / "chats.jsonl", chats),
            "prompts": _write_jsonl(tmp_path / "prompts.jsonl", prompts),
            "test": _write_jsonl(tmp_path / "test.jsonl", test)}


def _cfg(dirs, **sections) -> dict:
    data = {
        "output_dir": str(dirs["root"] / "run"),
        "model": {"name": dirs["student"], "dtype": "fp32"},
        "teacher": {"name": dirs["teacher"], "dtype": "bf16"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train": dirs["chats"], "eval_fraction": 0.25},
        "distill": {"max_new_tokens": 4, "chunk_size": 64},
        "train": {"max_steps": 3, "lr": 1e-3, "max_tokens": 256, "eval_every": 3, "progress": False},
        "eval": {"tasks": [{"name": "plus1", "path": dirs["test"], "type": "generation", "metric": "accuracy",
                            "max_new_tokens": 3}]},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def test_config_rejects_bad_combinations(dirs):
    with pytest.raises(ValueError, match="logit distillation needs token sequences"):
        DistillConfig.model_validate(_cfg(dirs, data={"train": dirs["prompts"], "kind": "prompt"}))
    with pytest.raises(ValueError, match="lmbda"):
        DistillConfig.model_validate(_cfg(dirs, data={"train": dirs["prompts"], "kind": "prompt"},
                                          distill={"mode": "on_policy", "lmbda": 0.5}))
    with pytest.raises(ValueError, match="teacher"):
        DistillConfig.model_validate({k: v for k, v in _cfg(dirs).items() if k != "teacher"})
    with pytest.raises(ValueError, match="on-policy sampling"):
        DistillConfig.model_validate(_cfg(dirs, adapter={"method": "prompt"}, distill={"mode": "on_policy"},
                                          train={"packing": False}))
    with pytest.raises(ValueError, match="beta"):
        DistillConfig.model_validate(_cfg(dirs, distill={"beta": 1.5}))


def test_run_distill_rejects_a_teacher_with_another_vocabulary(dirs, tokenizer):
    save_model(tiny_model(tokenizer, vocab_size=len(tokenizer) + 8), tokenizer, dirs["root"] / "wide")
    cfg = DistillConfig.model_validate(_cfg(dirs, teacher={"name": str(dirs["root"] / "wide")}))
    with pytest.raises(ValueError, match="share one tokenizer"):
        run_distill(cfg)


@pytest.mark.parametrize("mode,data", [
    ("logit", "chats"), ("sequence", "prompts"), ("on_policy", "prompts")])
def test_run_distill_writes_a_loadable_run_dir(dirs, mode, data):
    cfg = DistillConfig.model_validate(_cfg(dirs, data={"train": dirs[data]}, distill={"mode": mode}))
    manifest = run_distill(cfg)
    run = dirs["root"] / "run"
    for name in ("config.yaml", "metrics.jsonl", "manifest.json", "final/adapter_config.json", "plots/loss.png",
                 "plots/eval.png", "eval_teacher.json", "eval_before.json"):
        assert (run / name).exists(), name
    assert manifest["stage"] == "distill" and manifest["outputs"]["mode"] == mode
    assert manifest["outputs"]["train"]["steps"] == 3
    assert set(manifest["outputs"]["eval_teacher"]) == set(manifest["outputs"]["eval_after"]) == {"plus1"}
    assert manifest["inputs"]["teacher"]["spec"] == dirs["teacher"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in rows[-1]
    if mode == "sequence":
        records = [json.loads(line) for line in (run / "teacher_generations_train.jsonl").read_text().splitlines()]
        assert len(records) == 8 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    model, _ = load_model(str(run))
    assert type(model).__name__ == "PeftModelForCausalLM"
