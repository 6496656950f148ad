"""GGUF K-quant encoders (Q4_K, Q6_K) and the Q4_K_M tensor-type plan, in numpy.

Why our own: gguf-py writes Q4_0/Q5_0/Q8_0 but only *reads* K-quants, and Q4_K_M is what
llama.cpp and Ollama users download. The byte layouts follow ggml's block_q4_K / block_q6_K;
`gguf.quants.dequantize` (an independent reader) is the test oracle. Scales are set from each
sub-block's range (Q4_K: min and max; Q6_K: the largest magnitude) and refined by a few
least-squares passes, not llama.cpp's full search: the perplexity round trip says how close.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per K-quant super-block


def _nearest(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _scale_min_fit(x: np.ndarray, q: np.ndarray, scale: np.ndarray, mn: np.ndarray):
    """Least-squares (scale, min) for x ~ scale * q - min on each sub-block, keeping min >= 0
    (x [..., 32], q the chosen levels); where the fit degenerates the old values stay."""
    n = x.shape[-1]
    sq, sx = q.sum(-1), x.sum(-1)
    sqq, sqx = (q * q).sum(-1), (q * x).sum(-1)
    det = n * sqq - sq * sq
    ok = det > 0
    new_scale = np.where(ok, (n * sqx - sq * sx) / np.where(ok, det, 1), scale)
    new_min = np.where(ok, (sq * new_scale - sx) / n, mn)
    good = ok & (new_scale > 0) & (new_min >= 0)
    return np.where(good, new_scale, scale), np.where(good, new_min, mn)


def quantize_q4_k(array: np.ndarray, passes: int = 2) -> np.ndarray:
    """[rows, cols] float (cols % 256 == 0) -> [rows, cols / 256 * 144] bytes of block_q4_K:
    d, dmin (fp16), 8 pairs of 6-bit (scale, min) packed in 12 bytes, 256 4-bit levels;
    value = d * scale_j * q - dmin * min_j."""
    rows, cols = array.shape
    x = array.astype(np.float32).reshape(-1, 8, 32)  # [blocks, sub-blocks, values]
    mn = np.maximum(-x.min(-1), 0.0)  # subtracted; >= 0 (a sub-block of positives keeps min 0)
    scale = (x.max(-1) + mn) / 15
    for _ in range(passes):  # levels for the current (scale, min), then the best (scale, min) for them
        q = np.clip(_nearest((x + mn[..., None]) / np.where(scale > 0, scale, 1)[..., None]), 0, 15)
        scale, mn = _scale_min_fit(x, q.astype(np.float32), scale, mn)
    d = _f16(scale.max(-1) / 63)
    dmin = _f16(mn.max(-1) / 63)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    ls = np.clip(_nearest(scale / np.where(df > 0, df, 1)), 0, 63)
    lm = np.clip(_nearest(mn / np.where(dminf > 0, dminf, 1)), 0, 63)
    eff_scale, eff_min = df * ls, dminf * lm
    q = np.clip(_nearest((x + eff_min[..., None]) / np.where(eff_scale > 0, eff_scale, 1)[..., None]), 0, 15)
    q = np.where(eff_scale[..., None] > 0, q, 0).astype(np.uint8)

    n = x.shape[0]
    scales = np.zeros((n, 12), dtype=np.uint8)
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    scales[:, 0:4] = (ls[:, 0:4] & 63) | ((ls[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (lm[:, 0:4] & 63) | ((lm[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(n, 128)  # sub-blocks 2g (low) and 2g+1 (high)
    out = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)
    return out.reshape(rows, cols // QK_K * 144)


def quantize_q6_k(array: np.ndarray, passes: int = 2) -> np.ndarray:
    """[rows, cols] float (cols % 256 == 0) -> [rows, cols / 256 * 210] bytes of block_q6_K:
    128 low-nibble bytes, 64 bytes of high 2-bit pairs, 16 int8 scales (one per 16 values),
    fp16 d; value = d * scale_j * (q - 32), q in 0..63."""
    rows, cols = array.shape
    x = array.astype(np.float32).reshape(-1, 16, 16)
    idx = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    scale = -peak / 32  # the largest magnitude lands on -32 (the wider side of -32..31)
    for _ in range(passes):  # levels, then the least-squares scale for them
        safe = np.where(scale != 0, scale, 1)
        q = np.clip(_nearest(x / safe[..., None]), -32, 31).astype(np.float32)
        qq = (q * q).sum(-1)
        scale = np.where(qq > 0, (q * x).sum(-1) / np.where(qq > 0, qq, 1), scale)
    smax_idx = np.abs(scale).argmax(-1)
    smax = np.take_along_axis(scale, smax_idx[:, None], -1)[:, 0]
    d = _f16(-smax / 128)  # like ggml: the largest scale lands on -128, clipped to 127
    df = d.astype(np.float32)[:, None]
    sc = np.clip(_nearest(scale / np.where(df != 0, df, 1)), -128, 127)
    eff = df * sc
    q = np.clip(_nearest(x / np.where(eff != 0, eff, 1)[..., None]), -32, 31)
    q = (np.where(eff[..., None] != 0, q, 0) + 32).astype(np.uint8).reshape(-1, 2, 128)  # two halves

    n = x.shape[0]
    q1, q2, q3, q4 = q[..., 0:32], q[..., 32:64], q[..., 64:96], q[..., 96:128]
    ql = np.concatenate([(q1 & 0xF) | ((q3 & 0xF) << 4), (q2 & 0xF) | ((q4 & 0xF) << 4)], axis=-1)  # [n, 2, 64]
    qh = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)  # [n, 2, 32]
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8),
                          d.view(np.uint8).reshape(n, 2)], axis=1)
    return out.reshape(rows, cols // QK_K * 210)


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one
    between get the larger type in the *_M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, n_layers: int, tied: bool) -> str:
    """The GGML type llama.cpp's Q4_K_M gives a 2-D tensor: Q6_K for the output head (the tied
    embedding when there is no output.weight), and for attn_v / ffn_down on `more_bits`
    layers; Q4_K elsewhere."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q6_K"
    if name.startswith("blk.") and (name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight")):
        return "Q6_K" if more_bits(int(name.split(".")[1]), n_layers) else "Q4_K"
    return "Q4_K"


# a K-quant needs rows in whole 256-value blocks; llama.cpp falls back to these otherwise
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
K_ENCODERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
