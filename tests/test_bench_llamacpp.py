"""bench/llamacpp.py's helpers (the comparison itself needs llama.cpp, which CI does not build)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_llamacpp", BENCH / "llamacpp.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    yield module
    sys.modules.pop("bench_llamacpp", None)


def test_agreement_counts(bench):
    assert bench.common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert bench.common_prefix([5], [6]) == 0
    assert bench.common_prefix([1, 2], [1, 2, 3]) == 2
    assert bench.matches([1, 2, 3, 4], [1, 2, 9, 4]) == 3
    assert bench.matches([], [1]) == 0


def test_gguf_bytes_per_weight_counts_stored_bytes(bench, tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.standard_normal((64, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("b.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    bpw, nbytes, n = bench.gguf_bytes_per_weight(path)
    # F16: 2 bytes a weight; Q8_0: 34 bytes per block of 32; F32: 4
    assert n == 64 * 32 + 64 * 64 + 64
    assert nbytes == 64 * 32 * 2 + 64 * 64 // 32 * 34 + 64 * 4
    assert bpw == pytest.approx(nbytes / n)


def test_ratio_rows_pair_ours_with_each_peer_of_its_class(bench):
    rows = [
        {"class": "16-bit", "engine": "ours", "format": "bf16", "bytes_per_weight": 2.0, "decode_tok_s": 200.0,
         "prefill_s": 0.10},
        {"class": "16-bit", "engine": "llama.cpp", "format": "f16", "bytes_per_weight": 2.0, "decode_tok_s": 100.0,
         "prefill_s": 0.05},
        {"class": "8-bit", "engine": "ours", "format": "int8", "bytes_per_weight": 1.0, "decode_tok_s": 150.0,
         "prefill_s": 0.2},
        {"class": "8-bit", "engine": "llama.cpp", "format": "q8_0", "bytes_per_weight": 1.0625,
         "decode_tok_s": 300.0, "prefill_s": 0.4},
    ]
    out = bench.ratio_rows(rows)
    assert [(q["ours"], q["llama_cpp"]) for q in out] == [("bf16", "f16"), ("int8", "q8_0")]
    assert out[0]["decode"] == 2.0 and out[0]["prefill"] == 0.5  # ours decodes faster, prefills slower
    assert out[1]["decode"] == 0.5 and out[1]["prefill"] == 2.0
    assert out[1]["bits_llama_cpp"] == 8.5


def test_missing_llama_cpp_build_says_how_to_make_it(bench, tmp_path):
    with pytest.raises(SystemExit, match="setup_llamacpp.sh"):
        bench.Worker(tmp_path / "nowhere")
