"""Pruning: exact sparsity, Wanda's score, 2:4 pattern, masks through training, structured
pruning that saves, reloads and decodes with a KV cache."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from posttrain.compress.prune import (
    PruneConfig,
    bake_masks,
    calibration_batches,
    drop_layers,
    keep_masks,
    layer_importance,
    magnitude_prune,
    param_count,
    prunable_linears,
    prune_depth,
    prune_heads,
    prune_mlp,
    run_prune,
    sparsity_report,
    wanda_prune,
)
from posttrain.config import build_config
from posttrain.models import save_model, tiny_model

TEXTS = ["The water cycle moves water between the oceans, the air and the land.",
         "Photosynthesis turns light into chemical energy in green plants.",
         "A bridge spreads its load into the ground through piers and abutments.",
         "Bread rises because yeast releases carbon dioxide into the dough."]


@pytest.fixture
def calib(tokenizer):
    return calibration_batches(tokenizer, TEXTS, n_samples=4, max_length=32)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_calibration_batches_one_unpadded_text_each(tokenizer):
    batches = calibration_batches(tokenizer, TEXTS, n_samples=3, max_length=8)
    assert len(batches) == 3
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= 8 for b in batches)
    assert all(bool(b["attention_mask"].all()) for b in batches)
    with pytest.raises(ValueError, match="n_samples"):
        calibration_batches(tokenizer, TEXTS, n_samples=0, max_length=8)


def test_magnitude_sparsity_is_exact_and_drops_the_smallest(tiny):
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(tiny).items()}
    embed = tiny.model.embed_tokens.weight.detach().clone()
    masks = magnitude_prune(tiny, 0.3)
    assert "lm_head" not in masks and masks
    for name, m in prunable_linears(tiny).items():
        zeros = int((m.weight == 0).sum())
        assert zeros == round(0.3 * m.weight.numel()) == int((~masks[name]).sum())
        kept, dropped = before[name].abs()[masks[name]], before[name].abs()[~masks[name]]
        assert dropped.max() <= kept.min()
    assert torch.equal(tiny.model.embed_tokens.weight, embed)  # embeddings (and the tied head) untouched


def test_wanda_sparsity_is_exact_per_output_row(tiny, calib):
    wanda_prune(tiny, calib, 0.5)
    for m in prunable_linears(tiny).values():
        per_row = (m.weight == 0).sum(1)
        assert (per_row == round(0.5 * m.in_features)).all()
    assert sparsity_report(tiny)["linear_sparsity"] == pytest.approx(0.5)


class _Toy(nn.Module):
    """Token id -> fixed feature vector -> one linear: calibration inputs are chosen by hand."""

    def __init__(self, features: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("features", features)
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.proj(self.features[input_ids])


def test_wanda_scores_weight_times_input_norm_hand_example():
    # One token whose features make the input-column norms [1, 10, 0.1, 5].
    features = torch.tensor([[1.0, 10.0, 0.1, 5.0]])
    weight = torch.tensor([[1.0, 0.2, 4.0, 0.3],    # |W|*||x|| = [1, 2, 0.4, 1.5] -> keep cols 1, 3
                           [2.0, 1.0, 1.0, 1.0]])   # [2, 10, 0.1, 5]             -> keep cols 1, 3
    calib = [{"input_ids": torch.zeros(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1, dtype=torch.long)}]
    toy = _Toy(features, weight)
    masks = wanda_prune(toy, calib, 0.5)
    assert masks["proj"].tolist() == [[False, True, False, True], [False, True, False, True]]
    assert torch.equal(toy.proj.weight, weight * masks["proj"])
    # Plain magnitude drops the smallest |W| of the matrix instead: 0.2 and 0.3 go first.
    toy = _Toy(features, weight)
    masks = magnitude_prune(toy, 0.25)
    assert masks["proj"].tolist() == [[True, False, True, False], [True, True, True, True]]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_pattern_holds_in_every_group(tiny, calib, method):
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(tiny).items()}
    masks = magnitude_prune(tiny, n_m=(2, 4)) if method == "magnitude" else wanda_prune(tiny, calib, n_m=(2, 4))
    for name, m in prunable_linears(tiny).items():
        groups = (m.weight != 0).reshape(m.out_features, -1, 4)
        assert (groups.sum(-1) == 2).all()
        assert torch.equal(masks[name], m.weight != 0)
        if method == "magnitude":  # the two largest |W| of each group survive
            w = before[name].abs().reshape(m.out_features, -1, 4)
            kept = w[groups.reshape(w.shape)].reshape(*w.shape[:2], 2)
            dropped = w[~groups.reshape(w.shape)].reshape(*w.shape[:2], 2)
            assert (kept.min(-1).values >= dropped.max(-1).values).all()


def test_sparsity_arguments_are_checked(tiny):
    with pytest.raises(ValueError, match="exactly one"):
        magnitude_prune(tiny)
    with pytest.raises(ValueError, match="exactly one"):
        magnitude_prune(tiny, 0.5, n_m=(2, 4))
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(tiny, 1.5)


def test_masks_survive_training_and_the_baked_model_loads_in_transformers(tiny, tokenizer, calib, tmp_path):
    from posttrain.config import TrainConfig
    from posttrain.train.loop import train
    from posttrain.train.objectives import get_objective

    masks = wanda_prune(tiny, calib, 0.5)
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(tiny).items()}
    keep_masks(tiny, masks)
    examples = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        examples.append({"input_ids": ids, "labels": list(ids)})
    cfg = TrainConfig(max_steps=3, batch_size=2, packing=False, lr=5e-2, warmup_ratio=0, weight_decay=0.1,
                      progress=False)
    tiny, _ = train(tiny, get_objective("pretrain"), examples, cfg, tmp_path / "run", pad_token_id=2)
    moved = 0
    for name, m in prunable_linears(tiny).items():
        assert torch.equal(m.weight == 0, ~masks[name]), name  # pruned stay zero, no kept weight hit zero
        moved += int((m.weight != before[name]).sum())
    assert moved > 0  # training did change the kept weights
    assert bake_masks(tiny) == len(masks)
    assert sparsity_report(tiny)["linear_sparsity"] == pytest.approx(0.5)
    save_model(tiny, tokenizer, tmp_path / "out")
    keys = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"] \
        if (tmp_path / "out" / "model.safetensors.index.json").exists() else None
    assert keys is None or not any("parametrizations" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = calib[0]["input_ids"]
    assert torch.allclose(_logits(reloaded, ids), _logits(tiny, ids), atol=1e-5)
    assert sparsity_report(reloaded)["linear_sparsity"] == pytest.approx(0.5)


def test_keep_masks_checks_names_and_shapes(tiny):
    with pytest.raises(ValueError, match="does not have"):
        keep_masks(tiny, {"model.nope": torch.ones(2, 2, dtype=torch.bool)})
    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match="mask shape"):
        keep_masks(tiny, {name: torch.ones(2, 2, dtype=torch.bool)})


# ----------------------------------------------------------------------------- structured

def _check_saved_and_cached(model, tokenizer, ids, tmp_path):
    """Save/reload in plain transformers gives identical logits; cached decoding equals full forwards."""
    save_model(model, tokenizer, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    # Incremental decoding with a KV cache vs the full forward at every position.
    with torch.no_grad():
        out = reloaded(input_ids=ids[:, :4], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(4, ids.shape[1]):
            out = reloaded(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), _logits(reloaded, ids), atol=1e-5)
    with_cache = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    without = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    return reloaded


def test_depth_drops_an_identity_layer_and_keeps_logits(tokenizer, calib, tmp_path):
    model = tiny_model(tokenizer, layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: block influence 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids = calib[0]["input_ids"]
    reference = _logits(model, ids)
    scores = layer_importance(model, calib)
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and min(scores[:2] + scores[3:]) > 1e-3
    params = param_count(model)
    _, info = prune_depth(model, calib, n_drop=1)
    assert info["dropped"] == [2]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert param_count(model) < params
    assert torch.allclose(_logits(model, ids), reference, atol=1e-5)
    reloaded = _check_saved_and_cached(model, tokenizer, ids, tmp_path)
    assert reloaded.config.num_hidden_layers == 3


def test_drop_layers_renumbers_layer_types_and_rejects_bad_indices(tokenizer):
    model = tiny_model(tokenizer, layers=4)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    drop_layers(model, [0, 3])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="out of range"):
        drop_layers(model, [5])
    with pytest.raises(ValueError, match="all"):
        drop_layers(model, [0, 1])


def test_prune_mlp_removes_dead_channels_exactly(tiny, tokenizer, calib, tmp_path):
    with torch.no_grad():  # a quarter of the channels write nothing: they must be the ones removed
        for i, layer in enumerate(tiny.model.layers):
            dead = torch.arange(i, 128, 4)
            layer.mlp.down_proj.weight[:, dead] = 0
    ids = calib[1]["input_ids"]
    reference = _logits(tiny, ids)
    _, info = prune_mlp(tiny, calib, ratio=0.25)
    assert info["intermediate_after"] == 96 == tiny.config.intermediate_size
    for layer in tiny.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (96, 64) and layer.mlp.down_proj.weight.shape == (64, 96)
    assert torch.allclose(_logits(tiny, ids), reference, atol=1e-5)
    _check_saved_and_cached(tiny, tokenizer, ids, tmp_path)


@pytest.mark.parametrize("unit", ["query", "group"])
def test_prune_heads_removes_silent_heads_exactly(tiny, tokenizer, calib, tmp_path, unit):
    # tiny: 4 query heads, 2 kv heads (2 per group), head_dim 16.
    silent = [1, 2] if unit == "query" else [2, 3]  # one per group, or all of kv group 1
    with torch.no_grad():
        for layer in tiny.model.layers:
            for h in silent:
                layer.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
    ids = calib[2]["input_ids"]
    reference = _logits(tiny, ids)
    _, info = prune_heads(tiny, calib, ratio=0.5, unit=unit)
    heads, kv = (2, 2) if unit == "query" else (2, 1)
    assert (tiny.config.num_attention_heads, tiny.config.num_key_value_heads, tiny.config.head_dim) == (heads, kv, 16)
    assert (info["heads_after"], info["kv_heads_after"]) == (heads, kv)
    attn = tiny.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (heads * 16, 64) and attn.k_proj.weight.shape == (kv * 16, 64)
    assert attn.o_proj.weight.shape == (64, heads * 16)
    assert torch.allclose(_logits(tiny, ids), reference, atol=1e-5)
    tiny.set_attn_implementation("eager")  # eager attention reads the module's num_key_value_groups
    assert torch.allclose(_logits(tiny, ids), reference, atol=1e-5)
    tiny.set_attn_implementation("sdpa")
    _check_saved_and_cached(tiny, tokenizer, ids, tmp_path)


def test_width_ratios_are_checked(tiny, calib):
    with pytest.raises(ValueError, match="query heads per kv group"):
        prune_heads(tiny, calib, ratio=0.1)
    with pytest.raises(ValueError, match="ratio"):
        prune_mlp(tiny, calib, ratio=1.0)


# ----------------------------------------------------------------------------- the stage

def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="needs a ratio"):
        PruneConfig(method="wanda")
    with pytest.raises(ValueError, match="2 of every 4"):
        PruneConfig(method="wanda-2:4", ratio=0.5)
    with pytest.raises(ValueError, match="exactly one of ratio or n_drop"):
        PruneConfig(method="depth", ratio=0.2, n_drop=3)
    with pytest.raises(ValueError, match="n_drop applies to method depth"):
        PruneConfig(method="wanda", ratio=0.5, n_drop=3)
    with pytest.raises(ValueError, match="eval or eval_fraction"):
        PruneConfig(method="depth", n_drop=2, recovery={"data": {"train": "x.jsonl"}})
    with pytest.raises(ValueError, match=r"method: must be one of"):
        build_config(PruneConfig, overrides=["method=sparsegpt", "ratio=0.5"])


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_run_prune_wanda_with_recovery(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    save_model(model, tokenizer, tmp_path / "base")
    texts = [f"{t} Sentence number {i} adds a little variety." for i in range(3) for t in TEXTS]
    data = _write_jsonl(tmp_path / "text.jsonl", texts)
    cfg = PruneConfig(output_dir=str(tmp_path / "run"), model={"name": str(tmp_path / "base"), "dtype": "fp32"},
                      method="wanda", ratio=0.5, calibration={"path": data, "n_samples": 4, "max_length": 32},
                      recovery={"objective": "pretrain",
                                "data": {"train": data, "eval_fraction": 0.25, "max_length": 64},
                                "train": {"max_steps": 4, "eval_every": 2, "batch_size": 3, "packing": False,
                                          "lr": 1e-2, "progress": False}})
    manifest = run_prune(cfg)
    out = manifest["outputs"]
    assert out["pruning"]["ratio"] == 0.5 and out["pruning"]["linear_sparsity"] == pytest.approx(0.5)
    assert out["pruning"]["params_before"] == out["pruning"]["params_after"] == param_count(model)
    assert out["pruning"]["nonzero_params_after"] < out["pruning"]["params_before"]
    assert out["L0"] is not None and out["loss_after_prune"] is not None
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["tokens"] > 0 for r in evals)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert sparsity_report(final)["linear_sparsity"] == pytest.approx(0.5)
    with pytest.raises(FileExistsError):
        run_prune(cfg)


def test_run_prune_width_heads_without_recovery(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    save_model(model, tokenizer, tmp_path / "base")
    data = _write_jsonl(tmp_path / "text.jsonl", TEXTS)
    cfg = PruneConfig(output_dir=str(tmp_path / "run"), model={"name": str(tmp_path / "base"), "dtype": "fp32"},
                      method="width-heads", ratio=0.5, head_unit="group", eval=data,
                      calibration={"path": data, "n_samples": 4, "max_length": 32})
    out = run_prune(cfg)["outputs"]
    assert out["pruning"]["ratio"] == 0.5 and out["pruning"]["kv_heads_after"] == 1
    assert out["pruning"]["params_after"] < out["pruning"]["params_before"]
    assert out["L0"] > 0 and out["loss_after_prune"] > 0 and out["recovery"] is None
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.config.num_key_value_heads == 1 and param_count(final) == out["pruning"]["params_after"]


def test_run_prune_depth_with_distill_recovery_logs_the_lm_eval_loss(tokenizer, tmp_path):
    model = tiny_model(tokenizer, layers=3)
    save_model(model, tokenizer, tmp_path / "base")
    texts = [f"{t} Sentence number {i} adds a little variety." for i in range(3) for t in TEXTS]
    data = _write_jsonl(tmp_path / "text.jsonl", texts)
    cfg = PruneConfig(output_dir=str(tmp_path / "run"), model={"name": str(tmp_path / "base"), "dtype": "fp32"},
                      method="depth", n_drop=1, calibration={"path": data, "n_samples": 4, "max_length": 32},
                      recovery={"objective": "distill", "distill": {"loss": "forward_kl"},
                                "data": {"train": data, "eval_fraction": 0.25, "max_length": 64},
                                "train": {"max_steps": 2, "eval_every": 1, "batch_size": 3, "packing": False,
                                          "lr": 1e-7, "progress": False}})
    out = run_prune(cfg)["outputs"]
    assert out["pruning"]["layers_after"] == 2 and out["pruning"]["ratio"] == pytest.approx(1 / 3)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the training loss is the KL to the teacher; the eval loss is next-token CE, comparable to L0
    first_eval = next(r["eval_loss"] for r in rows if "eval_loss" in r)
    assert first_eval == pytest.approx(out["loss_after_prune"], abs=1e-3)
    assert abs(rows[0]["loss"] - first_eval) > 1.0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.config.num_hidden_layers == 2
