"""Speculative decoding with model-free drafts: SAM-Decoding and prompt lookup.

One loop: draft -> verify the draft in one forward pass -> accept a prefix -> crop
the KV cache -> emit one more token from the verifier (the "bonus"). Drafts come
from a `Drafter`:

- `SAMDrafter` (Hu et al., ACL 2025): the longest suffix of the text so far is
  matched in a dynamic suffix automaton over prompt + generated tokens and, if given,
  a static automaton over a corpus; the static draft is used only when its match is
  longer than the dynamic one by `bias` tokens (paper default 5).
- `LookupDrafter`: prompt-lookup decoding (the last n-gram searched for in the
  context), the baseline HF ships as `prompt_lookup_num_tokens`.

Greedy is lossless: a draft token is accepted only if it is the verifier's argmax
at its position, so the output equals plain greedy decoding whenever a multi-token
forward gives the same argmax as single steps (always in fp32 up to float ties; bf16
rounds batched matmuls differently). Sampling uses speculative sampling for a
deterministic draft: accept draft token d with probability p(d); on rejection sample
from p with d removed (renormalised), so every emitted token is distributed as p.
Batch size 1: each prompt is decoded on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from posttrain.generate.decoding import RowText, eos_ids, filter_top_k_top_p, pad_id
from posttrain.generate.sam import Matcher, SuffixAutomaton


class Drafter(Protocol):
    def start(self, prompt: list[int]) -> None: ...
    def accept(self, tokens: list[int]) -> None: ...
    def draft(self, k: int) -> tuple[list[int], str]: ...


class AuxDrafter:
    """Greedy drafts from a smaller causal LM sharing the tokenizer (SAM[aux]).

    Keeps its own KV cache over the context; after a verification step the cache is
    cropped back to the part that still agrees with the accepted text.
    """

    def __init__(self, model):
        self.model = model.eval()
        from posttrain.models import base_model

        self.config = base_model(model).config
        self.device = next(model.parameters()).device

    def start(self, prompt: list[int]) -> None:
        from transformers import DynamicCache

        self.text = list(prompt)
        self.cache = DynamicCache(config=self.config)
        self.cached: list[int] = []

    def accept(self, tokens: list[int]) -> None:
        self.text.extend(tokens)

    @torch.inference_mode()
    def draft(self, k: int) -> tuple[list[int], str]:
        from posttrain.generate.backends import _cache_kwarg

        common = 0
        limit = min(len(self.cached), len(self.text) - 1)  # keep >= 1 token to feed
        while common < limit and self.cached[common] == self.text[common]:
            common += 1
        if common < len(self.cached):
            self.cache.crop(-(len(self.cached) - common))
            self.cached = self.cached[:common]
        kw = _cache_kwarg(self.model)
        feed = self.text[common:]
        out = []
        for _ in range(k):
            ids = torch.tensor([feed], device=self.device)
            pos = torch.arange(len(self.cached), len(self.cached) + len(feed), device=self.device)[None]
            logits = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                                **{kw: self.cache}).logits
            self.cached.extend(feed)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            feed = [nxt]
        return out, "aux"


class SAMDrafter:
    """Drafts from the dynamic automaton (own text) and an optional static corpus one;
    with an auxiliary model, it drafts when neither automaton matches `aux_below` tokens."""

    def __init__(self, static: SuffixAutomaton | None = None, bias: int = 5, min_match: int = 1,
                 frequent_static: bool = True, aux: AuxDrafter | None = None, aux_below: int = 3):
        self.static = static
        self.bias = bias
        self.min_match = min_match
        self.frequent_static = frequent_static and static is not None and static.count is not None
        self.aux = aux
        self.aux_below = aux_below

    def start(self, prompt: list[int]) -> None:
        if self.aux is not None:
            self.aux.start(prompt)
        self.sam = SuffixAutomaton()
        self.sam.extend_many(prompt)
        self.dynamic = Matcher(self.sam, own_text=True)
        self.corpus = Matcher(self.static) if self.static is not None else None
        if self.corpus is not None:
            self.corpus.update_many(prompt)

    def accept(self, tokens: list[int]) -> None:
        if self.aux is not None:
            self.aux.accept(tokens)
        for t in tokens:
            self.sam.extend(t)
            self.dynamic.update(t)
            if self.corpus is not None:
                self.corpus.update(t)

    def draft(self, k: int) -> tuple[list[int], str]:
        dyn_len = self.dynamic.match_len
        if self.aux is not None and max(dyn_len, self.corpus.match_len if self.corpus else 0) < self.aux_below:
            return self.aux.draft(k)
        if self.corpus is not None and self.corpus.match_len > dyn_len + self.bias:
            tokens, n = self.corpus.draft(k, frequent=self.frequent_static)
            return (tokens, "static") if n >= self.min_match else ([], "none")
        if dyn_len >= self.min_match:
            tokens, _ = self.dynamic.draft(k)
            if tokens:
                return self._extend_periodic(tokens, k), "dynamic"
        if self.corpus is not None and self.corpus.match_len >= self.min_match:
            tokens, _ = self.corpus.draft(k, frequent=self.frequent_static)
            if tokens:
                return tokens, "static"
        return [], "none"


    def _extend_periodic(self, tokens: list[int], k: int) -> list[int]:
        """A draft that runs into the end of the text continues the repeat it is in.

        The continuation of the earliest earlier occurrence ending at e is text[e+1:];
        if that reaches the end of the text, the text is periodic from e+1 on with
        period len(text)-1-e, and the natural guess is that the period continues.
        """
        text = self.sam.text
        start = len(text) - len(tokens)
        if len(tokens) >= k or text[start:] != tokens:
            return tokens
        period = len(tokens)
        return [tokens[i % period] for i in range(k)]


class LookupDrafter:
    """Prompt lookup as HF does it: the earliest occurrence of the last n-gram (n = max..1)."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def start(self, prompt: list[int]) -> None:
        self.text = list(prompt)

    def accept(self, tokens: list[int]) -> None:
        self.text.extend(tokens)

    def draft(self, k: int) -> tuple[list[int], str]:
        text, n_text = self.text, len(self.text)
        for n in range(min(self.max_ngram, n_text - 1), 0, -1):
            tail = text[-n:]
            for start in range(0, n_text - n):
                if text[start : start + n] == tail:
                    follow = text[start + n : start + n + k]
                    if follow:
                        return follow, "lookup"
        return [], "none"


@dataclass
class SpecStats:
    forwards: int = 0  # verifier forward passes after the prefill
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    sources: dict = field(default_factory=dict)
    cancelled: bool = False  # the stream callback dropped the row (not summed by add)

    def add(self, other: "SpecStats") -> None:
        self.forwards += other.forwards
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        for k, v in other.sources.items():
            self.sources[k] = self.sources.get(k, 0) + v

    def summary(self) -> dict:
        return {"forwards": self.forwards, "drafted": self.drafted, "accepted": self.accepted,
                "emitted": self.emitted,
                "tokens_per_forward": self.emitted / max(self.forwards, 1),
                "acceptance_rate": self.accepted / max(self.drafted, 1),
                "sources": dict(self.sources)}


def make_drafter(decoding: str, corpus: str | Path | SuffixAutomaton | None = None, bias: int = 5,
                 aux_model=None) -> Drafter:
    if decoding == "lookup":
        return LookupDrafter()
    if decoding == "sam":
        static = SuffixAutomaton.load(corpus) if isinstance(corpus, (str, Path)) else corpus
        return SAMDrafter(static=static, bias=bias, aux=AuxDrafter(aux_model) if aux_model is not None else None)
    raise ValueError(f"decoding must be plain, sam or lookup; got {decoding!r}")


def _accept_greedy(logits: torch.Tensor, draft: list[int]) -> list[int]:
    """Draft tokens matching the argmax, then the verifier's own token at the first miss."""
    preds = logits.argmax(-1).tolist()
    m = 0
    while m < len(draft) and preds[m] == draft[m]:
        m += 1
    return draft[:m] + [preds[m]]


def _accept_sampled(logits: torch.Tensor, draft: list[int], config, generator) -> list[int]:
    """Speculative sampling with a deterministic draft (q = one-hot on the draft token)."""
    scores = filter_top_k_top_p(logits / config.temperature, config.top_k, config.top_p)
    probs = scores.softmax(-1)
    out = []
    u = torch.rand(len(draft), generator=generator, device=probs.device).tolist()
    for i, d in enumerate(draft):
        if u[i] < float(probs[i, d]):
            out.append(d)
            continue
        residual = probs[i].clone()
        residual[d] = 0.0
        if residual.sum() <= 0:  # p was one-hot on d yet rejected: impossible, but stay safe
            residual = probs[i]
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
    return out


@torch.inference_mode()
def speculative_decode(model, tokenizer, prompt: list[int], config, drafter: Drafter, stream=None, row: int = 0,
                       generator: torch.Generator | None = None, stops: set[int] | None = None,
                       pad: int | None = None):
    """Decode one prompt; returns (row text state, token ids, logprobs, SpecStats).

    `stops` (ids that end the reply) and `pad` default to the model's and tokenizer's; the
    engine passes its own so both of its decoders stop on the same ids.
    """
    from posttrain.generate.backends import make_rows

    if config.repetition_penalty != 1.0:
        raise ValueError("repetition_penalty is not supported with speculative decoding; use decoding=plain")
    if stops is None:
        stops = set() if config.ignore_eos else eos_ids(model, tokenizer)
    k_max = config.draft_len
    text_state = RowText(tokenizer, config.stop)
    tokens_out: list[int] = []
    logprobs_out: list[float] = []
    stats = SpecStats()
    if config.max_new_tokens == 0:
        return text_state, tokens_out, logprobs_out, stats

    rows = make_rows(model, [prompt], pad_id(model, tokenizer) if pad is None else pad,
                     config.max_new_tokens + k_max, config.backend)
    drafter.start(prompt)
    logits = rows.start()
    pending = None  # last emitted token, not yet in the cache
    draft: list[int] = []
    temperature = config.temperature if config.do_sample else 1.0
    while True:
        if pending is not None:
            draft, source = drafter.draft(min(k_max, config.max_new_tokens - len(tokens_out) - 1))
            stats.sources[source] = stats.sources.get(source, 0) + 1
            logits = rows.extend([[pending, *draft]])[0]
            stats.forwards += 1
            stats.drafted += len(draft)
        if config.do_sample:
            emitted = _accept_sampled(logits, draft, config, generator)
        else:
            emitted = _accept_greedy(logits, draft)
        accepted = len(emitted) - 1
        stats.accepted += accepted
        rows.crop(len(draft) - accepted)  # drop the rejected draft positions from the cache
        lp = F.log_softmax(logits[: len(emitted)] / temperature, dim=-1)
        lps = lp.gather(1, torch.tensor(emitted, device=lp.device)[:, None]).squeeze(1).tolist()
        done = False
        kept = []
        for tok, tok_lp in zip(emitted, lps):
            tokens_out.append(tok)
            logprobs_out.append(tok_lp)
            kept.append(tok)
            done = tok in stops or text_state.add(tok) or len(tokens_out) >= config.max_new_tokens
            if done:
                text_state.flush()
            if stream is not None and stream(row, tok, text_state.piece(final=done)) and not done:
                stats.cancelled = done = True  # the caller dropped this row
            if done:
                break
        stats.emitted += len(kept)
        if done:
            return text_state, tokens_out, logprobs_out, stats
        drafter.accept(kept)
        pending = kept[-1]
        draft = []
