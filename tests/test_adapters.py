"""Adapters: which parameters train, dtype handling, bottleneck routing, save/load, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from posttrain.adapters import (
    BOTTLENECK_CONFIG,
    BOTTLENECK_FILE,
    AdapterConfig,
    apply_adapter,
    merge_adapter,
    route_tasks,
    set_default_task,
    trainable_summary,
)
from posttrain.models import load_model, save_model, tiny_model

VOCAB = 256


def batch(rows: int = 3, length: int = 10, seed: int = 0) -> dict:
    ids = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def plain(dtype=torch.float32):
    return tiny_model(vocab_size=VOCAB, seed=0).to(dtype)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_steps(model, steps: int = 2, task_ids=None) -> None:
    """Adam steps; two, because zero-initialised LoRA B / bottleneck up leave A/down without gradient at step 1."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        b = batch()
        if task_ids is None:
            loss = model(**b).loss
        else:
            with route_tasks(model, task_ids):
                loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "bottleneck"}, "tasks"),
        ({"r": 0}, "r"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"method": "freeze"}, "freeze_layers"),
        ({"freeze_patterns": ["re:("]}, "freeze_patterns"),
        ({"method": "bottleneck", "tasks": ["a.b"]}, "tasks"),
        ({"method": "bottleneck", "tasks": ["a", "a"]}, "tasks"),
        ({"where": []}, "where"),
        ({"target_modules": []}, "target_modules"),
        ({"method": "ia3", "target_modules": ["q_proj"]}, "feedforward_modules"),
        ({"lora_rank": 8}, "lora_rank"),  # extra="forbid"
    ],
)
def test_config_rejects_nonsense_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        AdapterConfig(**kwargs)


# ------------------------------------------------------------------ each method trains the intended params

CASES = {
    "full": ({}, lambda n: True),
    "freeze": ({"freeze_layers": 1}, lambda n: not n.startswith("model.layers.0.")),
    "freeze_patterns": (
        {"method": "freeze", "freeze_patterns": ["*.mlp.*", r"re:layers\.1\..*norm"], "freeze_embeddings": True},
        lambda n: ".mlp." not in n and not ("layers.1." in n and "norm" in n) and "embed_tokens" not in n,
    ),
    "lora": ({"r": 4}, lambda n: ".lora_" in n),
    "dora": ({"r": 4}, lambda n: ".lora_" in n),
    "ia3": ({}, lambda n: ".ia3_l." in n),
    "prompt": ({"num_virtual_tokens": 3}, lambda n: n.startswith("prompt_encoder.")),
    "bottleneck": ({"tasks": ["a", "b"], "bottleneck_size": 8}, lambda n: ".bottleneck.adapters." in n),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_method_changes_only_intended_params(case):
    kwargs, intended = CASES[case]
    method = kwargs.get("method", case)
    cfg = AdapterConfig(**{"method": method, **kwargs})
    torch.manual_seed(0)
    model = apply_adapter(plain(), cfg)
    before = snapshot(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before if intended(n)}
    train_steps(model, task_ids=torch.tensor([0, 1, 0]) if method == "bottleneck" else None)
    after = snapshot(model)
    for n in before:
        if intended(n):
            assert not torch.equal(before[n], after[n]), f"{n} should train"
        else:
            assert torch.equal(before[n], after[n]), f"{n} should be frozen"


def test_freeze_errors_name_the_problem():
    with pytest.raises(ValueError, match="freeze_layers=5 but the model has 2"):
        apply_adapter(plain(), AdapterConfig(method="freeze", freeze_layers=5))
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_adapter(plain(), AdapterConfig(method="freeze", freeze_patterns=["*nope*"]))


def test_apply_twice_refused():
    model = apply_adapter(plain(), AdapterConfig(method="lora", r=2))
    with pytest.raises(ValueError, match="already carries adapters"):
        apply_adapter(model, AdapterConfig(method="lora", r=2))


def test_trainable_summary_counts():
    model = apply_adapter(plain(), AdapterConfig(method="freeze", freeze_layers=1))
    s = trainable_summary(model)
    assert s["total"] == sum(p.numel() for p in plain().parameters())
    assert s["trainable"] == s["total"] - sum(p.numel() for p in plain().model.layers[0].parameters())
    assert s["percent"] == pytest.approx(100 * s["trainable"] / s["total"])
    assert f"{s['trainable']:,}" in s["line"]


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt", "bottleneck"])
def test_bf16_base_with_fp32_adapters_runs_and_returns_base_dtype(method):
    cfg = AdapterConfig(method=method, tasks=["a"] if method == "bottleneck" else [], num_virtual_tokens=3)
    model = apply_adapter(plain(torch.bfloat16), cfg)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    out = model(**batch())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_same_dtype_keeps_bf16_adapters():
    model = apply_adapter(plain(torch.bfloat16), AdapterConfig(method="lora", r=2, trainable_dtype="same"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("method, extra", [("full", {}), ("freeze", {"freeze_layers": 1})])
def test_full_and_freeze_fp32_cast_whole_model(method, extra):
    # a bf16-frozen / fp32-trainable Llama fails in SDPA (q/k promoted by rotary, v not), so fp32 = all fp32
    model = apply_adapter(plain(torch.bfloat16), AdapterConfig(method=method, **extra))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model(**batch()).loss.backward()


# ------------------------------------------------------------------ bottleneck routing


def bottleneck_model(tasks=("a", "b")):
    model = apply_adapter(plain(), AdapterConfig(method="bottleneck", tasks=list(tasks), bottleneck_size=8))
    with torch.no_grad():  # make every adapter non-trivial (up starts at zero)
        for n, p in model.named_parameters():
            if ".bottleneck." in n:
                p.normal_(0, 0.5)
    return model


@torch.no_grad()
def test_bottleneck_starts_as_identity():
    model = apply_adapter(plain(), AdapterConfig(method="bottleneck", tasks=["a", "b"]))
    b = batch()
    with route_tasks(model, torch.tensor([0, 1, -1])):
        out = model(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(out, plain()(input_ids=b["input_ids"]).logits, rtol=0, atol=0)


@torch.no_grad()
def test_bottleneck_rows_routed_per_task():
    model = bottleneck_model()
    ids = batch()["input_ids"]
    base = plain()(input_ids=ids).logits
    route = torch.tensor([0, 1, -1])
    with route_tasks(model, route):
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out[2], base[2], rtol=0, atol=0)  # -1: base model
    assert not torch.allclose(out[0], base[0]) and not torch.allclose(out[1], base[1])
    # per-token [B,T] ids give the same as per-row [B] ids
    with route_tasks(model, route[:, None].expand_as(ids)):
        torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=0, atol=0)
    # changing task b's weights leaves the task-a row (and the base row) unchanged
    for n, p in model.named_parameters():
        if ".adapters.b." in n:
            p.add_(1.0)
    with route_tasks(model, route):
        out2 = model(input_ids=ids).logits
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=0)
    torch.testing.assert_close(out2[2], out[2], rtol=0, atol=0)
    assert not torch.allclose(out2[1], out[1])


@torch.no_grad()
def test_bottleneck_per_token_routing_inside_a_row():
    model = bottleneck_model()
    ids = batch(rows=1)["input_ids"]
    route = torch.tensor([[-1] * 4 + [0] * 6])
    with route_tasks(model, route):
        out = model(input_ids=ids).logits
    base = plain()(input_ids=ids).logits
    torch.testing.assert_close(out[0, :4], base[0, :4], rtol=0, atol=0)  # causal: earlier tokens see no adapter
    assert not torch.allclose(out[0, 4:], base[0, 4:])


def test_bottleneck_gradients_stay_in_their_task():
    model = bottleneck_model()
    with route_tasks(model, torch.tensor([0, 0, -1])):
        model(**batch()).loss.backward()
    for n, p in model.named_parameters():
        if ".adapters.a." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0
        elif ".adapters.b." in n:
            assert p.grad is None or p.grad.abs().sum() == 0


@torch.no_grad()
def test_default_task_and_errors():
    model = bottleneck_model()
    ids = batch()["input_ids"]
    with pytest.raises(RuntimeError, match="no task chosen"):
        model(input_ids=ids)
    set_default_task(model, "b")
    with route_tasks(model, torch.tensor([1, 1, 1])):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, routed, rtol=0, atol=0)
    set_default_task(model, None)
    torch.testing.assert_close(model(input_ids=ids).logits, plain()(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown task 'c'"):
        set_default_task(model, "c")
    with pytest.raises(ValueError, match=r"task ids must be in \[-1, 1\]"):
        with route_tasks(model, torch.tensor([2, 0, 0])):
            pass
    with pytest.raises(ValueError, match="does not match the batch"):
        with route_tasks(model, torch.zeros(3, 4, dtype=torch.long)):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="cannot be folded"):
        merge_adapter(model)


@torch.no_grad()
def test_bottleneck_deepcopy_is_independent():
    model = bottleneck_model()
    twin = copy.deepcopy(model)
    for n, p in twin.named_parameters():
        if ".adapters.a." in n:
            p.zero_()
    ids = batch()["input_ids"]
    with route_tasks(model, torch.tensor([0, 0, 0])):
        mine = model(input_ids=ids).logits
    with route_tasks(twin, torch.tensor([0, 0, 0])):
        theirs = twin(input_ids=ids).logits
    assert not torch.allclose(mine, theirs)  # twin's hooks use twin's own adapters


@torch.no_grad()
def test_bottleneck_save_load_round_trip(tmp_path, tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = apply_adapter(tiny_model(tokenizer, seed=0), AdapterConfig(method="bottleneck", tasks=["a", "b"], where=["mlp"]))
    for n, p in model.named_parameters():
        if ".bottleneck." in n:
            p.normal_(0, 0.5)
    out = save_model(model, tokenizer, tmp_path / "m")
    assert (out / BOTTLENECK_FILE).is_file() and (out / BOTTLENECK_CONFIG).is_file()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "bottleneck" in k]  # the base dir stays a plain model
    plain_base, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    loaded, _ = load_model(out, dtype="fp32")
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    for task in (0, 1, -1):
        route = torch.full((2,), task)
        with route_tasks(model, route):
            want = model(input_ids=ids).logits
        with route_tasks(loaded, route):
            got = loaded(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(plain_base(input_ids=ids).logits, tiny_model(tokenizer, seed=0)(input_ids=ids).logits)


# ------------------------------------------------------------------ merge and PEFT save/load


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_matches_unmerged_and_reloads_plain(method, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = apply_adapter(plain(), AdapterConfig(method=method, r=4))
    train_steps(model, steps=3)
    model.eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = merge_adapter(model)
        assert type(merged).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=1e-4)
        merged.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=1e-4)


def test_merge_refuses_prompt_tuning_and_passes_plain_models():
    model = apply_adapter(plain(), AdapterConfig(method="prompt", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="virtual input tokens"):
        merge_adapter(model)
    full = apply_adapter(plain(), AdapterConfig(method="full"))
    assert merge_adapter(full) is full


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_peft_adapter_reloads_with_peft(method, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = apply_adapter(plain(), AdapterConfig(method=method, r=4, num_virtual_tokens=3))
    train_steps(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(plain(), tmp_path / "adapter")
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_prompt_init_from_text(tokenizer):
    model = tiny_model(tokenizer, seed=0)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        apply_adapter(model, AdapterConfig(method="prompt", num_virtual_tokens=5, prompt_init_text="hello"))
    model = apply_adapter(model, AdapterConfig(method="prompt", num_virtual_tokens=5, prompt_init_text="Hello world"),
                          tokenizer=tokenizer)
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    ids = (ids * 5)[:5]
    table = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(table, model.get_input_embeddings().weight[ids].float())


# ------------------------------------------------------------------ init_from: continue a saved adapter


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_init_from_continues_a_saved_adapter(method, tmp_path):
    torch.manual_seed(0)
    cfg = AdapterConfig(method=method, r=4, num_virtual_tokens=3)
    trained = apply_adapter(plain(), cfg)
    train_steps(trained, steps=3)
    trained.eval()
    trained.save_pretrained(tmp_path / "run" / "final")
    torch.manual_seed(1)  # a fresh init would differ
    resumed = apply_adapter(plain(), cfg.model_copy(update={"init_from": str(tmp_path / "run")}))  # a run dir
    resumed.eval()
    fresh = apply_adapter(plain(), cfg)
    fresh.eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        torch.testing.assert_close(resumed(input_ids=ids).logits, want, rtol=0, atol=0)
        assert not torch.allclose(fresh(input_ids=ids).logits, want)
    assert all(p.dtype == torch.float32 for p in resumed.parameters() if p.requires_grad)
    assert any(p.requires_grad for p in resumed.parameters())  # it trains on


def test_init_from_refuses_mismatches_naming_them(tmp_path):
    lora = apply_adapter(plain(), AdapterConfig(method="lora", r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "a")
    base = {"method": "lora", "init_from": str(tmp_path / "a"), "target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match="r=4; these adapter settings give 8"):
        apply_adapter(plain(), AdapterConfig(**base, r=8, alpha=32))
    with pytest.raises(ValueError, match="lora_alpha=32"):
        apply_adapter(plain(), AdapterConfig(**base, r=4, alpha=16))
    with pytest.raises(ValueError, match="does not fit.*not in the saved file"):
        apply_adapter(plain(), AdapterConfig(**{**base, "target_modules": ["q_proj", "v_proj"]}, r=4))
    with pytest.raises(ValueError, match="does not exist"):
        apply_adapter(plain(), AdapterConfig(method="lora", init_from=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        apply_adapter(plain(), AdapterConfig(method="lora", init_from=str(tmp_path / "empty")))
    with pytest.raises(ValidationError, match="init_from"):
        AdapterConfig(method="full", init_from=str(tmp_path / "a"))
