"""Continuous batching on the native decoder: rows join and leave a running batch at token boundaries.

`engine.generate` decodes a fixed set of prompts until the longest ends; a server that batches that
way makes a request arriving mid-batch wait for the batch in flight. A `RunningBatch` instead owns
a KV cache of `max_rows` slots and is driven one `step()` at a time: rows `add`ed since the last
step are prefilled in that step's forward (their prompts in chunks of at most `prefill_chunk`
tokens per step, so a long prompt does not stall the rows already decoding), finished rows leave at
once (their `done` callback runs in the step that ends them) and their slot is reused.

Why this is exact: the native decoder computes every row of a forward call independently of the
rows beside it (bit for bit, AMX or not: tests/generate/test_continuous.py checks it), so a row's
tokens do not depend on which rows share its steps, when it joined, or how its prompt was chunked.
Greedy rows therefore equal `generate(..., [prompt])` alone, and a seeded sampled row draws from a
generator of its own, equal to a plain-decoding `generate` of that prompt alone with that seed.

Each row has its own GenerationConfig: budget, stop strings, EOS handling, temperature, top-p/k,
repetition penalty, seed. Speculative drafting (`decoding="sam"` or "lookup") is per row and only
where it pays: greedy rows (lossless, so answers stay identical) and only while at most
`draft_max_rows` rows decode, because verifying k draft tokens adds k rows to the step's forward:
on the default model (bf16, AMX, one core) a step costs ~20 ms for 1-8 rows and then ~1 ms per
extra row, so drafts are nearly free for one or two rows and cost more than they save at eight
with the ~15% acceptance measured on chat replies (BENCHMARKS.md, serving). Sampled rows decode
plain, so a seed gives the same tokens whatever the batch.

Long prompts (`backends.TORCH_PREFILL_MIN` tokens or more, bf16 models without adapters) are
prefilled whole by the model's torch forward, alone, and their K/V copied into the row's slot, as
`generate` does (the torch forward's GEMMs and SDPA beat the native per-row attention there);
at most one per step, which then takes no other prompt tokens.

Only the native decoder runs it (`unsupported_reason` says why not); the caller falls back to
static batches then. One model state per batch: adapters are selected before the batch starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from posttrain.generate.decoding import RowText, eos_ids
from posttrain.generate.engine import GenerationConfig, GenerationOutput, choose_tokens

PREFILL_CHUNK = 256  # prompt tokens per step, over all joining rows: bounds a step's time and scratch memory
DRAFT_MAX_ROWS = 2  # draft only while at most this many rows decode (see the module docstring)
CACHE_ROUND = 128  # cache lengths grow in steps of this many positions


def unsupported_reason(model, config: GenerationConfig | None = None) -> str | None:
    """Why a RunningBatch cannot run this model (with rows like `config`), or None if it can."""
    if config is not None and config.backend == "torch":
        return "backend='torch' was asked for"
    if config is not None and config.aux_model is not None:
        return "an auxiliary draft model runs on the PyTorch path"
    from posttrain.generate.native import unsupported_reason as native_reason

    return native_reason(model)


@dataclass(eq=False)
class Row:
    """One request in a running batch: its prompt, settings, callbacks and decoding state.

    `stream(token, piece) -> bool`: called per generated token (pieces concatenate to the final
    text); True drops the row at once (`cancelled`). `done(row)`: called once when the row ends
    (EOS, stop string, budget), not when it is dropped.
    """

    prompt: list[int]
    config: GenerationConfig
    stream: Callable[[int, str], bool] | None = None
    done: Callable[["Row"], None] | None = None
    slot: int = -1
    fed: int = 0  # prompt tokens already in the cache
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pending: int | None = None  # the last emitted token, not yet in the cache
    finished: bool = False
    cancelled: bool = False
    drafted: int = 0
    accepted: int = 0
    text: RowText | None = None
    stops: set[int] = field(default_factory=set)
    generator: torch.Generator | None = None
    drafter: object = None
    seen: torch.Tensor | None = None  # repetition penalty: tokens in the sequence

    @property
    def length(self) -> int:
        """Positions this row holds in the cache."""
        return self.fed + max(len(self.tokens) - 1, 0)

    def output(self) -> GenerationOutput:
        return GenerationOutput([self.text.text], [list(self.tokens)], [list(self.logprobs)],
                                {"drafted": self.drafted, "accepted": self.accepted})


@dataclass
class StepStats:
    rows: int = 0  # rows in the step's forward (decoding or prefilling)
    tokens: int = 0  # tokens emitted
    prefilled: int = 0  # prompt tokens fed
    drafted: int = 0
    accepted: int = 0


class RunningBatch:
    """A running batch of rows over one model's native decoder (see the module docstring).

    Not thread-safe: one thread adds, drops and steps. The model must not change while the batch
    runs (its packed weights were taken when the batch was made).
    """

    def __init__(self, model, tokenizer, max_rows: int, prefill_chunk: int = PREFILL_CHUNK,
                 draft_max_rows: int = DRAFT_MAX_ROWS, torch_prefill_min: int | None = None):
        from posttrain.generate import backends
        from posttrain.generate.native import native_lm

        if max_rows < 1 or prefill_chunk < 1 or draft_max_rows < 0:
            raise ValueError(f"max_rows and prefill_chunk must be >= 1 and draft_max_rows >= 0; got {max_rows}, "
                             f"{prefill_chunk}, {draft_max_rows}")
        self.model, self.tokenizer = model, tokenizer
        self.lm = native_lm(model, required=True)
        self.max_rows, self.prefill_chunk, self.draft_max_rows = max_rows, prefill_chunk, draft_max_rows
        self.eos = eos_ids(model, tokenizer)
        self.cache = self.lm.new_cache(max_rows, CACHE_ROUND)
        # long prompts: the torch forward prefills them, as engine.generate's NativeRows does (same rule,
        # each prompt alone, so a row still equals its prompt decoded alone)
        self.torch_prefill_min = backends.TORCH_PREFILL_MIN if torch_prefill_min is None else torch_prefill_min
        self.torch_model = backends.torch_prefill_model(self.lm)
        self.free = list(range(max_rows))
        self.rows: list[Row] = []  # in the order they joined

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return not self.free

    def add(self, prompt: list[int], config: GenerationConfig, stream=None, done=None) -> Row:
        """A new row; it is prefilled from the next step on. A row with max_new_tokens 0 ends at once."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < self.lm.vocab for t in prompt):
            raise ValueError(f"the prompt has a token id outside the vocabulary of {self.lm.vocab}")
        if config.repetition_penalty != 1.0 and config.decoding != "plain" and not config.do_sample:
            config = _plain(config)  # drafting does not apply a repetition penalty: this row decodes plain
        row = Row(list(prompt), config, stream, done)
        row.text = RowText(self.tokenizer, list(config.stop))
        row.stops = set() if config.ignore_eos else self.eos
        if config.do_sample and config.seed is not None:
            row.generator = torch.Generator().manual_seed(config.seed)
        if config.repetition_penalty != 1.0:
            row.seen = torch.zeros(self.lm.vocab, dtype=torch.bool)
            row.seen[prompt] = True
        if config.max_new_tokens == 0:
            row.finished = True
            if done is not None:
                done(row)
            return row
        if not self.free:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        if not config.do_sample and config.decoding != "plain":
            from posttrain.generate.speculative import make_drafter

            row.drafter = make_drafter(config.decoding, config.corpus, config.sam_bias)
            row.drafter.start(row.prompt)
        need = len(prompt) + config.max_new_tokens + 1
        if need > self.cache.max_len:
            size = -(-need // CACHE_ROUND) * CACHE_ROUND
            self.cache = self.lm.new_cache(self.max_rows, size, like=self.cache)
        row.slot = self.free.pop(0)
        self.rows.append(row)
        return row

    def drop(self, row: Row) -> None:
        """Take a row out (cancelled, or its request went away); its slot is free for the next one."""
        if row in self.rows:
            self.rows.remove(row)
            self.free.append(row.slot)
            self.free.sort()
        row.cancelled = row.cancelled or not row.finished

    def step(self) -> StepStats:
        """One forward over every row: a token (plus a draft) per decoding row, the next prompt chunk
        of joining rows; then each row's tokens are chosen and emitted, and finished rows leave."""
        stats = StepStats()
        if not self.rows:
            return stats
        flat: list[int] = []
        seq: list[int] = []
        pos: list[int] = []
        out: list[int] = []
        plan: list[tuple[Row, list[int], int]] = []  # (row, draft, first output index)
        decoding = [r for r in self.rows if r.pending is not None]
        drafting = len(decoding) <= self.draft_max_rows
        budget = self.prefill_chunk
        handed = self._torch_prefill(stats)  # at most one long prompt, prefilled by the torch forward
        if handed is not None:
            budget = 0  # that was this step's prefill
        for row in self.rows:
            if row.pending is not None:
                draft: list[int] = []
                if drafting and row.drafter is not None:
                    k = min(row.config.draft_len, row.config.max_new_tokens - len(row.tokens) - 1)
                    if k > 0:
                        draft, _ = row.drafter.draft(k)
                        draft = draft[:k]
                feed = [row.pending, *draft]
                start = row.length
                plan.append((row, draft, len(out)))
                for i, token in enumerate(feed):
                    out.append(len(flat))
                    flat.append(token), seq.append(row.slot), pos.append(start + i)
            elif budget > 0 and row.fed < len(row.prompt):  # prefilling: the next chunk of its prompt
                chunk = row.prompt[row.fed:row.fed + budget]
                for i, token in enumerate(chunk):
                    flat.append(token), seq.append(row.slot), pos.append(row.fed + i)
                budget -= len(chunk)
                row.fed += len(chunk)
                stats.prefilled += len(chunk)
                if row.fed == len(row.prompt):  # its last prompt token's logits choose the first token
                    plan.append((row, [], len(out)))
                    out.append(len(flat) - 1)
        if not flat and handed is None:
            return stats
        stats.rows = len(set(seq)) + (handed is not None)
        parts = [self.lm.forward(flat, seq, pos, out, cache=self.cache)] if flat else []
        if handed is not None:  # its first token is chosen from the torch forward's logits, after the others
            plan.append((handed[0], [], len(out)))
            parts.append(handed[1][None])
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        # greedy rows' choices and logprobs in one call each (per-row calls cost ~10% of a step)
        preds = logits.numpy().argmax(-1).tolist()  # the first maximum, as torch's; ~30x faster on one core
        greedy_lp = F.log_softmax(logits, dim=-1)
        for row, draft, first in plan:
            n = len(draft) + 1
            if row.config.do_sample or row.seen is not None:  # never drafted: one position
                seen = row.seen[None] if row.seen is not None else None
                token, _ = choose_tokens(logits[first:first + 1], row.config, seen, row.generator)
                emitted = [int(token[0])]
                lp = F.log_softmax(logits[first:first + 1] / (row.config.temperature if row.config.do_sample
                                                              else 1.0), dim=-1)
            else:  # the draft's prefix the model agrees with, then the model's own token
                m = 0
                while m < len(draft) and preds[first + m] == draft[m]:
                    m += 1
                emitted = draft[:m] + [preds[first + m]]
                lp = greedy_lp[first:first + len(emitted)]
            stats.drafted += len(draft)
            stats.accepted += len(emitted) - 1
            row.drafted += len(draft)
            row.accepted += len(emitted) - 1
            stats.tokens += self._emit(row, emitted, lp)
        return stats

    def _torch_prefill(self, stats: StepStats) -> tuple[Row, torch.Tensor] | None:
        """The first joining row with a prompt of `torch_prefill_min` tokens or more, prefilled whole
        by the torch forward into its cache slot: (row, its last position's logits); or None."""
        if self.torch_model is None:
            return None
        from posttrain.generate.backends import prefill_with_torch

        for row in self.rows:
            if row.fed == 0 and row.pending is None and len(row.prompt) >= self.torch_prefill_min:
                logits = prefill_with_torch(self.torch_model, row.prompt, self.cache, row.slot)
                row.fed = len(row.prompt)
                stats.prefilled += row.fed
                return row, logits
        return None

    def _emit(self, row: Row, emitted: list[int], logprobs: torch.Tensor) -> int:
        """Append the row's new tokens (stopping at EOS, a stop string or the budget), stream them,
        and take the row out if it ended or was dropped. `logprobs`: log-softmax rows, one per
        emitted token. Returns the tokens kept."""
        lps = logprobs.gather(1, torch.tensor(emitted)[:, None]).squeeze(1).tolist()
        kept: list[int] = []
        for token, lp in zip(emitted, lps):
            row.tokens.append(token)
            row.logprobs.append(lp)
            kept.append(token)
            if row.seen is not None:
                row.seen[token] = True
            done = token in row.stops or row.text.add(token) or len(row.tokens) >= row.config.max_new_tokens
            if done:
                row.text.flush()
            if row.stream is not None and row.stream(token, row.text.piece(final=done)) and not done:
                self.drop(row)  # the caller dropped it
                return len(kept)
            if done:
                row.finished = True
                self.drop(row)
                if row.done is not None:
                    row.done(row)
                return len(kept)
        if row.drafter is not None:
            row.drafter.accept(kept)
        row.pending = kept[-1]
        return len(kept)


def _plain(config: GenerationConfig) -> GenerationConfig:
    from dataclasses import replace

    return replace(config, decoding="plain", corpus=None, aux_model=None)
