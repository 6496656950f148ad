"""The native CPU decoder: matches the model's forward, and a row's logits never
depend on the rows computed beside it (what makes SAM exactly lossless)."""

import pytest
import torch

from posttrain.generate.engine import GenerationConfig, generate
from posttrain.generate.native import NativeError, amx_available, native_lm, unsupported_reason
from posttrain.models import tiny_model

_why = unsupported_reason(tiny_model(None, heads=2, kv_heads=1, vocab_size=64))
pytestmark = pytest.mark.skipif(_why is not None,
                                reason=f"native decoder cannot run on this machine: {_why}")
needs_bf16 = pytest.mark.skipif(
    unsupported_reason(tiny_model(None, heads=2, kv_heads=1, dtype=torch.bfloat16, vocab_size=64)) is not None,
    reason="native bf16 decoder cannot run on this machine")

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):",
           "the cat sat on the mat. the cat sat on the mat. the cat",
           "one two three"]


def native_tiny(tokenizer, dtype=torch.float32, seed=1):
    """A tiny Llama the native decoder accepts (head size 32)."""
    return tiny_model(tokenizer, layers=2, hidden=64, heads=2, kv_heads=1, seed=seed, dtype=dtype).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_prefill_logits_match_the_model_forward(tokenizer, dtype, tol):
    if dtype == torch.bfloat16 and unsupported_reason(native_tiny(tokenizer, dtype)) is not None:
        pytest.skip("no AVX512-BF16 here")
    model = native_tiny(tokenizer, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0].float()
    lm = native_lm(model, required=True)
    lm.allocate(1, 32)
    got = lm.forward(ids[0].tolist(), [0] * 23, list(range(23)), list(range(23)))
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < tol * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_rows_are_bitwise_independent_of_their_neighbours(tokenizer, dtype):
    model = native_tiny(tokenizer, dtype)
    lm = native_lm(model, required=True)
    lm.allocate(3, 40)
    ids = torch.randint(0, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    full = lm.forward(ids, [0] * 30, list(range(30)), list(range(30)))  # one 30-row prefill (blocks of 8 + 6)
    lm.forward(ids[:20], [1] * 20, list(range(20)), [])
    singles = torch.cat([lm.forward([ids[i]], [1], [i], [0]) for i in range(20, 30)])
    # a draft-verification shaped call that also carries another sequence's rows
    lm.forward(ids[:20], [2] * 20, list(range(20)), [])
    mixed = lm.forward(ids[20:30] + ids[25:27], [2] * 10 + [0] * 2, list(range(20, 30)) + [25, 26], list(range(12)))
    assert torch.equal(singles, full[20:30])
    assert torch.equal(mixed[:10], full[20:30])
    assert torch.equal(mixed[10:], full[25:27])


def test_greedy_generation_matches_the_torch_backend_in_fp32(tokenizer):
    model = native_tiny(tokenizer)
    cfg = dict(max_new_tokens=24, ignore_eos=True)
    ours = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="native", **cfg))
    ref = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="torch", **cfg))
    assert ours.token_ids == ref.token_ids
    for a, b in zip(ours.logprobs, ref.logprobs):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_sam_and_batching_are_token_identical_to_single_plain_decoding(tokenizer, dtype):
    model = native_tiny(tokenizer, dtype)
    cfg = dict(max_new_tokens=40, ignore_eos=True, backend="native")
    singles = [generate(model, tokenizer, [p], GenerationConfig(**cfg)) for p in PROMPTS]
    batched = generate(model, tokenizer, PROMPTS, GenerationConfig(**cfg))
    sam = generate(model, tokenizer, PROMPTS, GenerationConfig(decoding="sam", draft_len=7, **cfg))
    expected = [s.token_ids[0] for s in singles]
    assert batched.token_ids == expected
    assert sam.token_ids == expected
    assert [s.logprobs[0] for s in singles] == sam.logprobs  # bitwise: same logits, same log_softmax
    assert sam.stats["accepted"] > 0


def test_weights_changed_in_place_are_repacked(tokenizer):
    model = native_tiny(tokenizer)
    first = native_lm(model)
    assert native_lm(model) is first  # unchanged weights: packed once
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    second = native_lm(model)
    assert second is not first
    ours = generate(model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=12, backend="native"))
    ref = generate(model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=12, backend="torch"))
    assert ours.token_ids == ref.token_ids


def test_unsupported_models_fall_back_or_say_why(tokenizer, monkeypatch):
    odd = tiny_model(tokenizer, heads=4, kv_heads=2)  # head size 16
    assert "head size" in unsupported_reason(odd)
    assert native_lm(odd) is None
    with pytest.raises(NativeError, match="head size"):
        generate(odd, tokenizer, ["hi"], GenerationConfig(max_new_tokens=2, backend="native"))
    auto = generate(odd, tokenizer, ["hi"], GenerationConfig(max_new_tokens=2))  # auto: the torch path
    assert len(auto.token_ids[0]) >= 1

    from peft import IA3Config, LoraConfig, get_peft_model

    assert unsupported_reason(get_peft_model(native_tiny(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))) is None
    dora = get_peft_model(native_tiny(tokenizer), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in unsupported_reason(dora)
    assert native_lm(dora) is None
    ia3 = get_peft_model(native_tiny(tokenizer), IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    assert "other than LoRA" in unsupported_reason(ia3)
    monkeypatch.setenv("POSTTRAIN_NATIVE", "0")
    assert "disabled" in unsupported_reason(native_tiny(tokenizer))
    with pytest.raises(ValueError, match="backend must be"):
        GenerationConfig(backend="gpu")


def test_bad_rows_are_refused_with_a_reason(tokenizer):
    model = native_tiny(tokenizer)
    lm = native_lm(model, required=True)
    lm.allocate(1, 8)
    with pytest.raises(ValueError, match="past the allocated length"):
        lm.forward([1], [0], [8], [0])
    with pytest.raises(ValueError, match="vocabulary"):
        lm.forward([model.config.vocab_size], [0], [0], [0])
    with pytest.raises(ValueError, match="sequence index"):
        lm.forward([1], [1], [0], [0])


def lora_tiny(tokenizer, dtype=torch.float32):
    """native_tiny under all-linear LoRA (fp32 adapters, as training makes them) with a non-zero B."""
    from posttrain.adapters import AdapterConfig, apply_adapter

    base = native_tiny(tokenizer, dtype)
    torch.manual_seed(0)  # lora_A's init draws from the global RNG: the same adapters whatever ran before
    model = apply_adapter(base, AdapterConfig(method="lora", r=4), tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    return model


def test_lora_runs_natively_folded_and_greedy_matches_the_unfolded_model(tokenizer):
    from posttrain.generate.backends import NativeRows, make_rows

    model = lora_tiny(tokenizer)
    assert isinstance(make_rows(model, [[1, 2, 3]], 0, 4), NativeRows)  # auto picks the native decoder
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    cfg = dict(max_new_tokens=24, ignore_eos=True)
    ours = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="native", **cfg))
    ref = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="torch", **cfg))  # PEFT's own forward
    assert ours.token_ids == ref.token_ids
    for a, b in zip(ours.logprobs, ref.logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    with model.disable_adapter():  # the adapter really changes the outputs, and disabling it is honoured
        base = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="torch", **cfg))
        assert generate(model, tokenizer, PROMPTS, GenerationConfig(backend="native", **cfg)).token_ids \
            == base.token_ids
    assert base.token_ids != ref.token_ids
    # the model itself is untouched: same tensors, same trainable set, still trains
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    model.train()
    ids = torch.tensor([tokenizer.encode(PROMPTS[2])])
    model(input_ids=ids, labels=ids).loss.backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()
    # a training step changes the adapter: the packed copy is rebuilt and still matches
    after = generate(model, tokenizer, PROMPTS, GenerationConfig(backend="native", **cfg))
    assert after.token_ids == generate(model, tokenizer, PROMPTS, GenerationConfig(backend="torch", **cfg)).token_ids
    assert after.token_ids != ours.token_ids


@needs_bf16
def test_lora_over_a_bf16_base_folds_like_a_merge(tokenizer):
    import copy

    model = lora_tiny(tokenizer, torch.bfloat16).eval()  # bf16 base, fp32 adapters: the training shape
    ids = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    rows = (ids[0].tolist(), [0] * 23, list(range(23)), list(range(23)))
    with torch.no_grad():
        ref = copy.deepcopy(model).float()(input_ids=ids).logits[0]  # the same weights, computed in fp32
        with model.disable_adapter():
            base = model(input_ids=ids).logits[0].float()
    merged = copy.deepcopy(model).merge_and_unload()  # what the RL rollout copy / `posttrain merge` give
    lm, lm_merged = native_lm(model, required=True), native_lm(merged, required=True)
    lm.allocate(1, 32)
    lm_merged.allocate(1, 32)
    got, got_merged = lm.forward(*rows), lm_merged.forward(*rows)
    scale = ref.abs().max().item()
    # bf16 activations and the folded weights rounded to bf16 (HF's own bf16 forward of this
    # model is 4% of the scale off fp32; the native fold 8%)
    assert (got - ref).abs().max().item() < 0.1 * scale
    assert (got - got_merged).abs().max().item() < 0.01 * scale
    assert (base - ref).abs().max().item() > 10 * (got - ref).abs().max().item()  # the delta is in there


def test_bottleneck_adapters_hooks_keep_the_model_on_the_torch_path(tokenizer):
    from posttrain.adapters import AdapterConfig, apply_adapter

    model = apply_adapter(native_tiny(tokenizer), AdapterConfig(method="bottleneck", tasks=["default"]), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    assert "hooks" in unsupported_reason(model)
    cfg = dict(max_new_tokens=10, ignore_eos=True)
    auto = generate(model, tokenizer, PROMPTS, GenerationConfig(**cfg))
    assert auto.token_ids == generate(model, tokenizer, PROMPTS, GenerationConfig(backend="torch", **cfg)).token_ids


def _amx_models(tokenizer):
    """bf16 and each integer layout the AMX prefill converts; vocab 80 = an odd number of column blocks."""
    from posttrain.compress.quantize import quantize_model
    from posttrain.quantized import QuantSpec

    models = {"bf16": tiny_model(tokenizer, layers=2, hidden=64, heads=2, kv_heads=1, intermediate=96, seed=3,
                                 vocab_size=80, dtype=torch.bfloat16).eval()}
    for name, spec in {"int8": QuantSpec(weights="int8"), "int8-g32": QuantSpec(weights="int8", group_size=32),
                       "int4-g32": QuantSpec(weights="int4", group_size=32)}.items():
        model = tiny_model(tokenizer, layers=2, hidden=64, heads=2, kv_heads=1, intermediate=96, seed=3,
                           vocab_size=80, dtype=torch.bfloat16).eval()
        quantize_model(model, spec)
        models[name] = model
    return models


needs_amx = pytest.mark.skipif(_why is not None or not amx_available(), reason="no AMX tiles on this CPU")


@needs_amx
@pytest.mark.parametrize("kind", ["bf16", "int8", "int8-g32", "int4-g32"])
def test_amx_matmuls_match_the_vdpbf16ps_path(tokenizer, kind):
    model = _amx_models(tokenizer)[kind]
    lm = native_lm(model, required=True)
    assert lm.amx
    lm.allocate(2, 300)
    # 37 + 262 rows: partial 16-row tiles, a 32-row pair cut short, and a second 256-row chunk
    ids = torch.randint(0, 80, (299,), generator=torch.Generator().manual_seed(2)).tolist()
    seq, pos = [0] * 37 + [1] * 262, list(range(37)) + list(range(262))
    got = lm.forward(ids, seq, pos, list(range(299)))
    lm.amx = False
    want = lm.forward(ids, seq, pos, list(range(299)))
    assert not torch.equal(got, want)  # it did take the other path: the rounding order differs
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.95


@needs_amx
@pytest.mark.parametrize("kind", ["bf16", "int8", "int8-g32", "int4-g32"])
def test_amx_decode_sized_calls_equal_the_rows_of_a_big_call(tokenizer, kind):
    """Calls of up to 16 rows take matmul_amx_small (three column blocks per pass, k-tiles converted
    as they are used); a row's logits must still equal the same row in a 40-row call, bit for bit,
    or a verified draft would differ from single steps and a batched row from the row alone."""
    model = _amx_models(tokenizer)[kind]
    lm = native_lm(model, required=True)
    assert lm.amx
    lm.allocate(2, 48)
    ids = torch.randint(0, 80, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    full = lm.forward(ids, [0] * 40, list(range(40)), list(range(40)))  # 40 rows: matmul_amx
    lm.forward(ids[:20], [1] * 20, list(range(20)), [])
    singles = torch.cat([lm.forward([ids[i]], [1], [i], [0]) for i in range(20, 25)])  # 1 row
    draft = lm.forward(ids[25:40], [1] * 15, list(range(25, 40)), list(range(15)))  # 15 rows
    assert torch.equal(singles, full[20:25])
    assert torch.equal(draft, full[25:40])


@needs_amx
def test_packed_amx_prefill_rows_do_not_depend_on_the_prompts_beside_them(tokenizer):
    """A prompt prefilled alone or packed with others (also across a 256-row call boundary)
    gives bit-identical logits, so batched generation still equals serial generation."""
    from posttrain.generate.backends import NativeRows

    model = _amx_models(tokenizer)["int8"]
    lm = native_lm(model, required=True)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 80, (n,), generator=gen).tolist() for n in (5, 240, 31, 70)]
    packed = NativeRows(lm, prompts, 1).start()
    alone = torch.cat([NativeRows(lm, [p], 1).start() for p in prompts])
    assert torch.equal(packed, alone)


def test_a_model_loaded_under_inference_mode_packs(tokenizer):
    with torch.inference_mode():
        model = native_tiny(tokenizer)
        lm = native_lm(model, required=True)
        lm.allocate(1, 8)
        assert lm.forward([1, 2, 3], [0, 0, 0], [0, 1, 2], [2]).shape == (1, model.config.vocab_size)
        assert native_lm(model) is lm  # the signature is stable: no repack


def test_rope_tables_are_computed_once_and_equal_a_fresh_computation(tokenizer):
    model = native_tiny(tokenizer, torch.float32)
    lm = native_lm(model, required=True)
    calls = []
    rotary = lm.rotary
    lm.rotary = lambda *a: calls.append(a[1].shape[-1]) or rotary(*a)
    for n in (10, 40, 25, 80):
        cos, sin = lm.rope_tables(n)
        want_cos, want_sin = rotary(torch.zeros(1), torch.arange(n)[None])
        assert torch.equal(cos, want_cos[0].float()) and torch.equal(sin, want_sin[0].float())
        assert cos.is_contiguous() and cos.shape[0] == n
    assert calls == [10, 40, 80]  # 25 is a slice of 40's; 80 = twice 40
