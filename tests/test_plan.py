"""The pre-flight memory planner: exact byte counts on a tiny config, the stage refusal, `posttrain plan`."""

import json
import time

import pytest

from posttrain import plan as P
from posttrain.cli import main
from posttrain.config import build_config
from posttrain.models import tiny_model

# tiny_model(vocab_size=256): 2 layers, hidden 64, 4 heads of 16, 2 kv heads, intermediate 128, tied head
# per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12288; gate/up/down 3 x 64x128 = 24576; 2 norms 128
# -> 36992; x 2 layers = 73984; embedding 256x64 = 16384 (tied: once); final norm 64 -> 90432
TINY_PARAMS = 90432
# LoRA r=4 on all seven projections: r x (in + out) = 4 x (128 + 96 + 96 + 128 + 192 + 192 + 192) = 4096 per layer
TINY_LORA_R4 = 2 * 4096


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "tiny256"
    tiny_model(vocab_size=256).save_pretrained(path)
    return path


def stated(size: str = "1GB", tflops: float | None = None) -> P.Device:
    return P.get_device(f"cpu:{size}", tflops)


def test_shape_is_read_from_config_and_safetensors_header(tiny256):
    shape, adapter = P.read_model_shape(str(tiny256))
    assert adapter is None
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate,
            shape.vocab, shape.tied) == (2, 64, 4, 2, 16, 128, 256, True)
    assert shape.exact and shape.params == TINY_PARAMS  # counted from the header, not loaded
    assert P.formula_params(shape) == TINY_PARAMS  # the formula agrees with the file
    assert shape.disk_bytes == (tiny256 / "model.safetensors").stat().st_size


def test_weights_gradients_optimizer_bytes_are_exact(tiny256):
    shape, _ = P.read_model_shape(str(tiny256))
    dev = stated()
    full = P.estimate(shape, P.Setup("sft", method="full", load_dtype="bf16", trainable_fp32=True, seq=32), dev)
    parts = {p.name: p.bytes for p in full.parts}
    assert parts["weights"] == TINY_PARAMS * 4  # full + trainable_dtype fp32: the whole model in fp32
    assert parts["gradients"] == TINY_PARAMS * 4
    assert parts["optimizer"] == TINY_PARAMS * 8  # AdamW: two fp32 moments
    assert parts["freed load copy"] == TINY_PARAMS * 2  # CPU: the bf16 copy the cast freed stays in the heap
    fp32 = P.estimate(shape, P.Setup("sft", method="full", load_dtype="fp32", trainable_fp32=True, seq=32), dev)
    assert "freed load copy" not in {p.name for p in fp32.parts}
    bf16 = P.estimate(shape, P.Setup("sft", method="full", load_dtype="bf16", trainable_fp32=False, seq=32), dev)
    parts = {p.name: p.bytes for p in bf16.parts}
    assert (parts["weights"], parts["gradients"], parts["optimizer"]) == (TINY_PARAMS * 2, TINY_PARAMS * 2,
                                                                          TINY_PARAMS * 4)
    lora = P.estimate(shape, P.Setup("sft", method="lora", lora_r=4, load_dtype="bf16", seq=32), dev)
    parts = {p.name: p.bytes for p in lora.parts}
    assert parts["weights"] == TINY_PARAMS * 2 + TINY_LORA_R4 * 4  # bf16 base + fp32 adapters
    assert (parts["gradients"], parts["optimizer"]) == (TINY_LORA_R4 * 4, TINY_LORA_R4 * 8)
    eight = P.estimate(shape, P.Setup("sft", method="full", trainable_fp32=False, optimizer="adamw8bit", seq=32), dev)
    assert {p.name: p.bytes for p in eight.parts}["optimizer"] == TINY_PARAMS * 2
    fsdp = P.estimate(shape, P.Setup("sft", method="full", trainable_fp32=True, shards=4, seq=32), dev)
    assert {p.name: p.bytes for p in fsdp.parts}["optimizer"] == TINY_PARAMS * 8 // 4


def test_lora_count_matches_peft(tiny256):
    """The LoRA parameter formula against PEFT's own model."""
    from posttrain.adapters import AdapterConfig, apply_adapter, trainable_summary

    model = apply_adapter(tiny_model(vocab_size=256), AdapterConfig(method="lora", r=4))
    shape, _ = P.read_model_shape(str(tiny256))
    assert trainable_summary(model)["trainable"] == P.trainable_params(shape, P.Setup("sft", lora_r=4)) == TINY_LORA_R4


def test_activations_scale_with_tokens_and_checkpointing_lowers_them(tiny256):
    shape, _ = P.read_model_shape(str(tiny256))
    dev = stated()

    def acts(**kw):
        return {p.name: p.bytes for p in P.estimate(shape, P.Setup("sft", method="full", **kw), dev).parts}["activations"]

    assert acts(rows=2, seq=64) == 2 * acts(rows=1, seq=64) == acts(rows=1, seq=128)
    per = P.layer_activation_bytes(shape, P.Setup("sft", method="full"))  # fp32: 4 x (8h + 2kv + 4i) + lse
    assert per == 4 * (8 * 64 + 2 * 32 + 4 * 128) + 4 * 4
    assert acts(rows=1, seq=128) == 2 * 128 * per
    # checkpointed: each layer's fp32 input (h values per token) plus one layer recomputed in backward
    assert acts(rows=1, seq=128, checkpointing=True) == 4 * 64 * 2 * 128 + 128 * per
    # the head holds at most one chunk of logits however long the batch; chunks (checkpointed) keep
    # 12 B per position and vocabulary entry, one unchunked pass 16 (fp32: logits, log-softmax, grads)
    short = P.head_peak_bytes(shape, P.Setup("sft", method="full", seq=100))
    assert short == 100 * shape.vocab * 16
    assert P.head_peak_bytes(shape, P.Setup("sft", method="full", seq=10 * P.HEAD_CHUNK)) == P.HEAD_CHUNK * shape.vocab * 12


def test_kv_cache_and_reference_copy_are_counted(tiny256):
    from posttrain.rl.controller import RLConfig
    from posttrain.train.preference import DPOConfig

    rl = build_config(RLConfig, overrides=[f"model.name={tiny256}", "data.prompts=p.jsonl", "reward.type=verifier",
                                           "adapter.method=full", "rollout.prompts_per_step=2",
                                           "rollout.samples_per_prompt=3", "rollout.max_new_tokens=16"])
    plan = P.plan_stage(rl, stated())
    parts = {p.name: p.bytes for p in plan.parts}
    # K and V x 2 layers x 32 kv dims x 6 sequences x (256 prompt + 16 new) x 2 bytes (bf16)
    assert parts["rollout KV cache"] == 2 * 2 * 32 * 6 * (256 + 16) * 2
    assert parts["reference (frozen copy)"] == TINY_PARAMS * 2
    dpo = build_config(DPOConfig, overrides=[f"model.name={tiny256}", "data.train=t.jsonl", "adapter.method=full",
                                             "dpo.reference=copy", "model.dtype=fp32"])
    assert {p.name: p.bytes for p in P.plan_stage(dpo, stated()).parts}["reference (copy)"] == TINY_PARAMS * 4


def sft_cfg(tmp_path, model, **extra):
    from posttrain.train.sft import SFTConfig

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    over = [f"model.name={model}", f"data.train={data}", f"output_dir={tmp_path / 'run'}", "data.kind=text",
            *[f"{k}={v}" for k, v in extra.items()]]
    return build_config(SFTConfig, overrides=over)


def test_a_stage_refuses_a_run_that_cannot_fit(tmp_path, tiny_dir, monkeypatch):
    from posttrain.train.sft import run_sft

    monkeypatch.setattr(P, "get_device", lambda spec=None, peak_tflops=None: P.Device("cpu", 64 * P.MiB, 64 * P.MiB,
                                                                                     "cpu with 64 MiB (test)"))
    monkeypatch.delenv(P.SKIP_ENV, raising=False)
    cfg = sft_cfg(tmp_path, tiny_dir, **{"adapter.method": "full"})
    with pytest.raises(ValueError) as err:
        run_sft(cfg)
    msg = str(err.value)
    assert "has 64 MiB available" in msg and "DOES NOT FIT" in msg
    assert "adapter.method=lora" in msg  # a suggestion with its predicted peak
    assert "--no-memory-check" in msg
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run dir was written
    # the override turns the refusal into a warning
    from posttrain.stage import start_stage

    monkeypatch.setenv(P.SKIP_ENV, "0")
    run = start_stage(cfg, load=False)
    assert (run.run_dir / "config.yaml").is_file()


def test_the_check_passes_tiny_models_quickly(tmp_path, tiny_dir):
    cfg = sft_cfg(tmp_path, tiny_dir)
    P.check_fits(cfg)  # warm: imports
    start = time.perf_counter()
    plan = P.check_fits(cfg)
    assert time.perf_counter() - start < 0.05
    assert plan is not None and plan.peak > 0


def test_an_unreadable_model_skips_the_check_with_a_note(tmp_path, capsys):
    cfg = sft_cfg(tmp_path, "no-such-org/no-such-model")
    assert P.check_fits(cfg) is None
    assert "memory check skipped" in capsys.readouterr().out


def test_cli_plan_prints_the_table_and_exits_1_when_it_does_not_fit(tiny256, capsys):
    rc = main(["plan", "-c", "recipes/sft_full.yaml", f"model.name={tiny256}", "--device", "cpu:8GB",
               "--peak-tflops", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    for part in ("weights", "gradients", "optimizer", "activations", "head (logits)", "peak", "fits", "step time"):
        assert part in out
    assert "90,432 params in bf16" in out  # sft_full.yaml: model.dtype=bf16, trainable_dtype=same
    rc = main(["plan", "-c", "recipes/sft_full.yaml", f"model.name={tiny256}", "train.max_tokens=8192",
               "--device", "cuda:0.5GB", "--peak-tflops", "100"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DOES NOT FIT" in out and "to make it fit" in out and "train.max_tokens=4096" in out
    assert "unchecked on GPU" in out
    assert main(["plan", "-c", "recipes/dpo.yaml", f"model.name={tiny256}", "--device", "cpu:8GB",
                 "--peak-tflops", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_cli_plan_help_says_what_it_reads_and_how_to_state_a_device(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in ("config.json", "Nothing is loaded", "--device", "cuda:80GB", "--no-memory-check", "unchecked"):
        assert text in out
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "--no-memory-check" in capsys.readouterr().out


def test_bad_device_and_size_are_clear_errors():
    with pytest.raises(P.PlanError, match="cuda:80GB"):
        P.get_device("tpu")
    with pytest.raises(P.PlanError, match="80GB"):
        P.parse_size("eighty")
    assert P.parse_size("24GiB") == P.parse_size("24GB") == 24 * P.GiB


def test_gguf_metadata_gives_the_same_shape_as_the_converted_model():
    """The default model's GGUF header (read by our parser, not loaded) against its converted config.json."""
    from posttrain.models import default_gguf_path, default_model_dir

    from_gguf = P.shape_from_gguf(default_gguf_path())
    from_dir = P.shape_from_dir(default_model_dir())
    for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "tied", "params"):
        assert getattr(from_gguf, key) == getattr(from_dir, key), key
    assert from_gguf.params == 134_515_008


def test_quantize_plans_forward_only_unless_qat(tiny256):
    from posttrain.compress.quantize import QuantizeConfig

    ptq = P.plan_stage(build_config(QuantizeConfig, overrides=[f"model.name={tiny256}"]), stated())
    assert "gradients" not in {p.name for p in ptq.parts} and ptq.setup.forward_only
    qat = P.plan_stage(build_config(QuantizeConfig, overrides=[f"model.name={tiny256}", "qat.data=t.jsonl"]), stated())
    parts = {p.name: p.bytes for p in qat.parts}
    assert parts["gradients"] == parts["weights"] == TINY_PARAMS * 4  # QAT trains the fp32 model
    assert parts["teacher (frozen bf16 copy)"] == TINY_PARAMS * 2  # qat.objective=distill: the float model


def test_cpu_checkpointing_over_a_frozen_base_is_not_credited_unless_malloc_returns_memory(tiny256, monkeypatch):
    """glibc keeps what recomputed layers free (bench: LoRA + checkpointing peaked above the plain run)."""
    shape, _ = P.read_model_shape(str(tiny256))

    def acts(device, **kw):
        plan = P.estimate(shape, P.Setup("sft", method="lora", seq=128, **kw), device)
        return {p.name: p.bytes for p in plan.parts}["activations"]

    plain = acts(stated())
    assert acts(stated(), checkpointing=True) == plain  # the bound we can state on CPU
    assert acts(stated(), checkpointing=True, fixed_mmap_threshold=True) < plain
    assert acts(P.get_device("cuda:8GB"), checkpointing=True) < plain  # no glibc heap on a GPU
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    from posttrain.train.sft import SFTConfig

    cfg = build_config(SFTConfig, overrides=[f"model.name={tiny256}", "data.train=t.jsonl",
                                             "train.gradient_checkpointing=true"])
    assert P.plan_stage(cfg, stated()).setup.fixed_mmap_threshold


def test_autocast_keeps_bf16_activations_and_a_bf16_copy_of_the_weights(tmp_path, tiny_dir):
    dev = stated("8GB", 1)
    plain = P.plan_stage(sft_cfg(tmp_path, tiny_dir, **{"adapter.method": "full"}), dev)
    auto = P.plan_stage(sft_cfg(tmp_path, tiny_dir, **{"adapter.method": "full", "train.mixed_precision": "bf16"}), dev)
    part = lambda plan, name: next((p.bytes for p in plan.parts if p.name == name), 0)  # noqa: E731
    assert auto.setup.compute_dtype == "fp32" and auto.setup.activation_dtype == "bf16"
    assert part(auto, "activations") < 0.8 * part(plain, "activations")
    assert part(auto, "autocast weight copies") == auto.shape.params * 2 and part(plain, "autocast weight copies") == 0
    assert part(auto, "weights") == part(plain, "weights")


def test_packed_rows_of_short_examples_count_the_short_attention_probabilities(tmp_path, tiny_dir):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": "hello world " * n}) + "\n" for n in (10, 20, 40, 60)))
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"text": "hello world " * 400}) + "\n" for _ in range(4)))
    plans = {}
    for name, path in (("short", short), ("long", long)):
        cfg = sft_cfg(tmp_path, tiny_dir, **{"data.train": str(path), "data.max_length": 1024})
        plans[name] = P.plan_stage(cfg, stated("8GB", 1))
    assert plans["short"].setup.short_attention_cols > 0 and plans["long"].setup.short_attention_cols == 0
    acts = {k: next(p.bytes for p in v.parts if p.name == "activations") for k, v in plans.items()}
    assert acts["short"] > acts["long"]


def test_the_planner_knows_the_short_attention_paths_limit():
    from posttrain.kernels.attention import SHORT

    assert P.SHORT_ATTENTION == SHORT  # plan.py avoids importing torch, so it keeps its own copy
