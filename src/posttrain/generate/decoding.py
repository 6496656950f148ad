"""What both decoders (the batched loop in engine.py and speculative.py) share: which ids end or
pad a reply, top-k / top-p truncation, and incremental detokenization with stop strings.

A module of its own so that the engine can call the speculative decoder without the
speculative decoder importing the engine back.
"""

from __future__ import annotations

import torch


def pad_id(model, tokenizer) -> int:
    """The id left padding uses: the tokenizer's pad token, else the smallest EOS id."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return min(eos_ids(model, tokenizer), default=0)


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS plus the model/generation config's."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (the most likely token always stays)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class RowText:
    """Decoded text of one row's generated tokens, grown token by token.

    Text is decoded from a window of recent tokens (not the whole sequence each step);
    a piece ending in U+FFFD (half a UTF-8 character) is held back until complete.
    Text that could still become a stop string is held back from the stream, so the
    streamed pieces concatenate to exactly the final text.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens already turned into text
        self.text = ""
        self.emitted = 0  # chars of self.text already streamed

    def add(self, token: int) -> bool:
        """Append a token; return True if a stop string is now in the text."""
        self.ids.append(token)
        return self._advance(force=False)

    def flush(self) -> bool:
        """At the end: take in text still held back (e.g. a dangling half character)."""
        return self.read < len(self.ids) and self._advance(force=True)

    def _advance(self, force: bool) -> bool:
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):
            start = max(0, len(self.text) - self.hold)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            for s in self.stop:
                cut = self.text.find(s, start)
                if cut >= 0:
                    self.text = self.text[:cut]
                    return True
        return False

    def piece(self, final: bool) -> str:
        """The next chunk safe to stream (everything left, when the row is finished)."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        chunk = self.text[self.emitted:end]
        self.emitted = end
        return chunk
