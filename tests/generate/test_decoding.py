"""Pieces both decoders share: top-k / top-p truncation, incremental detokenization."""

from __future__ import annotations

import torch

from posttrain.generate.decoding import RowText, filter_top_k_top_p


def test_filter_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.1)).tolist() == [[False, True, True, True]]


def test_row_text_holds_half_characters_and_flushes(tokenizer):
    ids = tokenizer("a🤗b", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # the emoji spans several byte tokens
    row = RowText(tokenizer, stop=[])
    pieces = []
    for t in ids:
        row.add(t)
        pieces.append(row.piece(final=False))
    assert "".join(pieces) == row.text == "a🤗b"
    assert all("\ufffd" not in p for p in pieces)
    cut = ids[:-2]  # ends inside the emoji: held back until flushed at the end
    row = RowText(tokenizer, stop=[])
    for t in cut:
        row.add(t)
    assert row.text == "a"
    row.flush()
    assert row.text == tokenizer.decode(cut) and row.text.endswith("\ufffd")
