"""K-quant encoders against gguf-py's own decoder (an independent reader of ggml's layouts)."""

import gguf
import numpy as np
import pytest

from posttrain.compress.kquants import more_bits, q4_k_m_type, quantize_q4_k, quantize_q6_k


def _rel_rmse(y, x):
    return float(np.sqrt(((y - x) ** 2).mean() / (x**2).mean()))


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1))  # rows of very different scales
    x[0, :256] += 2.0  # a block that is all positive (min 0) and
    x[1, 256:] = 0.0   # an all-zero block (scale 0: no division by zero)
    return x.astype(np.float32)


@pytest.mark.parametrize("encode,ggml,bytes_per_block,bound,ref", [
    (quantize_q4_k, "Q4_K", 144, 0.08, "Q4_0"),   # 4.5 bits per value
    (quantize_q6_k, "Q6_K", 210, 0.02, "Q5_0"),   # 6.56 bits per value
])
def test_k_quants_decode_with_gguf_and_beat_the_legacy_type_of_fewer_bits(weights, encode, ggml, bytes_per_block,
                                                                           bound, ref):
    data = encode(weights)
    assert data.dtype == np.uint8 and data.shape == (6, 2 * bytes_per_block)
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[ggml])
    assert back.shape == weights.shape
    assert np.all(back[1, 256:] == 0)
    err = _rel_rmse(back[2:], weights[2:])
    legacy = gguf.GGMLQuantizationType[ref]
    ref_err = _rel_rmse(gguf.quants.dequantize(gguf.quants.quantize(weights[2:], legacy), legacy), weights[2:])
    assert err < bound and err < ref_err, (err, ref_err)
    for row in range(6):  # every row keeps its own scale: no block borrowed another's
        assert _rel_rmse(back[row], weights[row]) < 3 * bound or not weights[row].any()


def test_q4_k_m_plan_follows_llama_cpp():
    n = 30
    heavy = [i for i in range(n) if more_bits(i, n)]
    assert heavy[:4] == [0, 1, 2, 5] and heavy[-4:] == [26, 27, 28, 29]
    assert q4_k_m_type("token_embd.weight", n, tied=True) == "Q6_K"
    assert q4_k_m_type("token_embd.weight", n, tied=False) == "Q4_K"
    assert q4_k_m_type("output.weight", n, tied=False) == "Q6_K"
    assert q4_k_m_type("blk.0.ffn_down.weight", n, tied=True) == "Q6_K"
    assert q4_k_m_type("blk.3.attn_v.weight", n, tied=True) == "Q4_K"
    assert q4_k_m_type("blk.5.attn_v.weight", n, tied=True) == "Q6_K"
    assert q4_k_m_type("blk.5.attn_q.weight", n, tied=True) == "Q4_K"
