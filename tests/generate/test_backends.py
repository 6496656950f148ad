"""`backend: auto`: the native decoder for small batches, the torch forward for large batches of a
plain float model unless the native matmuls run on AMX (bench/backend_crossover.py measured where
the two cross)."""

import pytest
import torch

from posttrain.adapters import AdapterConfig, apply_adapter
from posttrain.generate.backends import AUTO_TORCH_BATCH, NativeRows, TorchRows, make_rows
from posttrain.generate.native import unsupported_reason
from posttrain.models import tiny_model


@pytest.fixture
def model(tokenizer):
    m = tiny_model(tokenizer, layers=2, hidden=64, heads=2, kv_heads=1).eval()
    if unsupported_reason(m) is not None:
        pytest.skip("the native decoder cannot run here")
    return m


def rows(model, n):
    return make_rows(model, [[1, 2, 3]] * n, pad_id=0, extra=4, backend="auto")


def test_auto_switches_to_torch_at_the_measured_batch_size(model):
    assert isinstance(rows(model, AUTO_TORCH_BATCH - 1), NativeRows)
    assert isinstance(rows(model, AUTO_TORCH_BATCH), TorchRows)  # fp32: no AMX path
    assert isinstance(make_rows(model, [[1, 2, 3]] * AUTO_TORCH_BATCH, 0, 4, backend="native"), NativeRows)


def test_auto_keeps_a_bf16_model_native_at_any_batch_where_amx_runs_its_matmuls(model, monkeypatch):
    import posttrain.generate.native as native

    bf16 = model.to(torch.bfloat16)
    if unsupported_reason(bf16) is not None:
        pytest.skip(f"the native bf16 decoder cannot run here: {unsupported_reason(bf16)}")
    monkeypatch.setattr(native, "amx_available", lambda: True)
    assert isinstance(rows(bf16, 4 * AUTO_TORCH_BATCH), NativeRows)
    monkeypatch.setattr(native, "amx_available", lambda: False)
    assert isinstance(rows(bf16, AUTO_TORCH_BATCH), TorchRows)


def test_adapters_and_integer_weights_stay_native_at_any_batch(model, tokenizer):
    from posttrain.quantized import QuantSpec
    from posttrain.compress.quantize import quantize_model

    lora = apply_adapter(model, AdapterConfig(method="lora", r=2))
    assert isinstance(rows(lora, 4 * AUTO_TORCH_BATCH), NativeRows)
    int8 = tiny_model(tokenizer, layers=2, hidden=64, heads=2, kv_heads=1, dtype=torch.bfloat16).eval()
    quantize_model(int8, QuantSpec(weights="int8", group_size=32))
    if unsupported_reason(int8) is not None:
        pytest.skip(f"the native decoder cannot run int8 here: {unsupported_reason(int8)}")
    assert isinstance(rows(int8, 4 * AUTO_TORCH_BATCH), NativeRows)


def test_torch_rows_feed_the_head_a_contiguous_input_and_leave_no_hook(model):
    """hidden[:, -1:] is a strided view; the torch path hands the head a contiguous copy (a frozen
    bf16 head copied its whole weight per row otherwise) and removes its hook after each call."""
    seen = []
    head = model.get_output_embeddings()
    probe = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    rows = TorchRows(model, [[1, 2, 3], [4, 5]], pad_id=0)
    with torch.no_grad():
        first = rows.start()
        rows.extend([[6], [7]])
    probe.remove()
    assert seen == [True, True] and first.shape[0] == 2
    assert not head._forward_pre_hooks  # nothing left behind (the native decoder refuses hooked models)


def test_long_prompts_prefill_on_the_torch_forward_and_decode_natively(tokenizer):
    """From torch_prefill_min tokens a prompt is prefilled alone by the torch forward: its first
    logits are the torch forward's, its K/V in the native cache match a native prefill's to bf16
    rounding, decoding goes on natively from them, and shorter prompts are untouched."""
    from posttrain.generate.backends import torch_prefill_model
    from posttrain.generate.native import native_lm

    model = tiny_model(tokenizer, layers=2, hidden=64, heads=2, kv_heads=1, dtype=torch.bfloat16).eval()
    if unsupported_reason(model) is not None:
        pytest.skip("the native decoder cannot run here")
    lm = native_lm(model, required=True)
    assert torch_prefill_model(lm) is model
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (40, 5, 30, 7)]
    native = NativeRows(lm, prompts, 4, torch_prefill_min=10 ** 9)
    want = native.start()
    want_next = native.extend([[int(t)] for t in want.argmax(-1)])[:, -1]
    want_k = [k.clone() for k in lm.cache.kcache]
    want_v = [v.clone() for v in lm.cache.vcache]
    handed = NativeRows(lm, prompts, 4, torch_prefill_min=20)
    got = handed.start()
    for s in (0, 2):  # the long ones: the torch forward's logits, each prompt alone
        assert torch.equal(got[s], TorchRows(model, [prompts[s]], 0).start()[0])
        n = len(prompts[s])
        for l in range(2):
            torch.testing.assert_close(lm.cache.kcache[l][s, :, :, :n].float(), want_k[l][s, :, :, :n].float(),
                                       rtol=0.05, atol=0.05)
            torch.testing.assert_close(lm.cache.vcache[l][s, :n].float(), want_v[l][s, :n].float(),
                                       rtol=0.05, atol=0.05)
    for s in (1, 3):  # the short ones: native, bit for bit
        assert torch.equal(got[s], want[s])
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    got_next = handed.extend([[int(t)] for t in want.argmax(-1)])[:, -1]
    torch.testing.assert_close(got_next, want_next, rtol=0.05, atol=0.05)
    assert torch.equal(got_next.argmax(-1), want_next.argmax(-1))
    # only bf16 models without adapters or integer weights hand over (the case measured)
    fp32 = tiny_model(tokenizer, layers=2, hidden=64, heads=2, kv_heads=1).eval()
    assert torch_prefill_model(native_lm(fp32, required=True)) is None
    lora = apply_adapter(tiny_model(tokenizer, layers=2, hidden=64, heads=2, kv_heads=1, dtype=torch.bfloat16),
                         AdapterConfig(method="lora", r=2))
    assert torch_prefill_model(native_lm(lora, required=True)) is None
