"""Batched generation over a KV cache: one engine for eval, RL, reasoning and serving.

We run our own decode loop instead of `model.generate` so that every caller shares
one engine whose steps we control (speculative / SAM decoding plugs into the same
rows). The loop is deliberately plain:

    prefill the prompts -> repeat: pick next token per row, append, check EOS /
    stop strings / budget, drop finished rows, forward one token per live row.

Forward passes run on a backend (`backends.py`): the native CPU decoder (`native.c`:
4-5x the tokens/s of the HF forward at batch 1, rows independent of each other) when
it can run the model, else the model's own forward with left padding, a 2-D attention
mask and explicit position ids, as HF `generate` does, so greedy output there is
identical to `model.generate(do_sample=False)` and independent of the padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from posttrain.generate.backends import BACKENDS, make_rows
from posttrain.generate.decoding import RowText, eos_ids, filter_top_k_top_p, pad_id

StreamFn = Callable[[int, int, str], Any]  # return True to drop that row


@dataclass
class GenerationConfig:
    """Decoding settings. `do_sample=False` is greedy; sampling knobs then do nothing."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    chat: bool = False
    system: str | None = None
    ignore_eos: bool = False  # generate max_new_tokens regardless of EOS (benchmarks)
    # speculative decoding (batch 1 per prompt): "sam" (suffix automata), "lookup" (prompt lookup)
    decoding: str = "plain"
    draft_len: int = 4  # CPU verification of up to 8 rows costs ~1.1-1.3 steps: see BENCHMARKS.md
    corpus: Any = None  # static SAM corpus: a saved automaton path or a SuffixAutomaton
    sam_bias: int = 5
    aux_model: Any = None  # SAM[aux]: a smaller causal LM with the same tokenizer drafts when no match
    # where forward passes run: "native" (our CPU decoder), "torch" (the model's forward), "auto" (native if it can)
    backend: str = "auto"
    guard: Any = None  # GuardRules (generate/guard.py): replies are blocked or redacted after decoding

    def __post_init__(self) -> None:
        if self.decoding not in ("plain", "sam", "lookup"):
            raise ValueError(f"decoding must be plain, sam or lookup; got {self.decoding!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")
        if (self.corpus is not None or self.aux_model is not None) and self.decoding != "sam":
            raise ValueError("a static corpus or an auxiliary draft model is used by decoding=sam only")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class GenerationOutput:
    """Per prompt: the text (special tokens skipped, cut before any stop string),
    the generated token ids (including a final EOS token if one was produced, and the
    token that completed a stop string), and one logprob per generated token."""

    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    stats: dict = field(default_factory=dict)  # speculative decoding: acceptance, draft sources


# ---------------------------------------------------------------------------------
# prompt preparation


def render_chat(tokenizer, messages: list[dict[str, Any]], system: str | None = None) -> str:
    """Messages -> prompt text via the tokenizer's chat template, ready for the reply."""
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, prompts: Sequence[Any], chat: bool = False, system: str | None = None) -> list[list[int]]:
    """Strings, token-id lists or message lists -> token ids.

    Strings go through the chat template when `chat=True`; message lists always do;
    token-id lists are used as given.
    """
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if chat:
                text = render_chat(tokenizer, [{"role": "user", "content": p}], system)
                out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                out.append(tokenizer(p)["input_ids"])
        elif isinstance(p, (list, tuple)) and p and all(isinstance(m, dict) for m in p):
            text = render_chat(tokenizer, list(p), system)
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
            out.append(list(p))
        else:
            raise TypeError(f"prompt {i}: expected str, list[int] or list of message dicts, got {type(p).__name__}")
        if not out[-1]:
            raise ValueError(f"prompt {i} is empty after tokenization")
    return out


# ---------------------------------------------------------------------------------
# token choice


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as HF): shrink logits of tokens already in the sequence."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def choose_tokens(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return (tokens, their logprobs).

    The logprob is log_softmax(logits / T) of the model's raw logits, T = temperature
    when sampling and 1 for greedy. Repetition penalty and top-k/top-p truncation are
    *not* folded in, so a training forward pass with logits / T reproduces the values
    exactly (what RL importance ratios need).
    """
    temperature = config.temperature if config.do_sample else 1.0
    logprobs_all = F.log_softmax(logits / temperature, dim=-1)
    scores = logits
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, config.repetition_penalty)
    if config.do_sample:
        scores = filter_top_k_top_p(scores / temperature, config.top_k, config.top_p)
        probs = scores.softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    else:
        tokens = scores.argmax(-1)
    return tokens, logprobs_all.gather(1, tokens[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------
# the loop


@torch.inference_mode()
def _generate(model, tokenizer, prompt_ids, config, stream, limits: list[int], row_stops: list[list[str]],
              row_done=None):
    n = len(prompt_ids)
    stops = set() if config.ignore_eos else eos_ids(model, tokenizer)
    rows = [RowText(tokenizer, row_stops[r]) for r in range(n)]
    tokens_out: list[list[int]] = [[] for _ in range(n)]
    logprobs_out: list[list[float]] = [[] for _ in range(n)]
    cancelled: list[int] = []
    active = [r for r in range(n) if limits[r] > 0]  # original row index of each live batch row
    if row_done is not None:
        for r in range(n):
            if limits[r] == 0:
                row_done(r, GenerationOutput([""], [[]], [[]]))
    if not active:
        return rows, tokens_out, logprobs_out, cancelled

    budget = max(limits)
    batch = make_rows(model, [prompt_ids[r] for r in active], pad_id(model, tokenizer), budget, config.backend)
    logits = batch.start()
    device = logits.device
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        for b, r in enumerate(active):
            seen[b, prompt_ids[r]] = True
    for step in range(budget):
        next_tokens, next_logprobs = choose_tokens(logits, config, seen, generator)
        keep = []
        for b, (tok, lp) in enumerate(zip(next_tokens.tolist(), next_logprobs.tolist())):
            r = active[b]
            tokens_out[r].append(tok)
            logprobs_out[r].append(lp)
            done = tok in stops
            if not done:
                done = rows[r].add(tok)
            done = done or step + 1 == limits[r]
            if done:
                rows[r].flush()
            if stream is not None and stream(r, tok, rows[r].piece(final=done)) and not done:
                cancelled.append(r)  # the caller dropped this row: the others go on
                done = True
            elif done and row_done is not None:
                row_done(r, GenerationOutput([rows[r].text], [tokens_out[r]], [logprobs_out[r]]))
            if not done:
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(active):
            batch.keep(keep)
            next_tokens = next_tokens[torch.tensor(keep, device=device)]
            seen = seen[keep] if seen is not None else None
            active = [active[b] for b in keep]
        if seen is not None:
            seen[torch.arange(len(active), device=device), next_tokens] = True
        logits = batch.extend(next_tokens[:, None].tolist())[:, -1]
    return rows, tokens_out, logprobs_out, cancelled


def generate(model, tokenizer, prompts: Sequence[Any], config: GenerationConfig | None = None,
             stream: StreamFn | None = None, row_max_new_tokens: Sequence[int] | None = None,
             row_stop: Sequence[Sequence[str]] | None = None,
             row_done: Callable[[int, GenerationOutput], None] | None = None) -> GenerationOutput:
    """Generate a continuation for every prompt in one left-padded batch.

    prompts: strings, token-id lists, or chat message lists (rendered with the
    chat template). `stream(row, token_id, text_piece)` is called once per generated
    token; pieces may be "" while text is held back (incomplete UTF-8, a possible stop
    string) and concatenate to exactly `texts[row]`. Rows that finish (EOS, stop
    string, budget) leave the batch so they cost nothing afterwards. The model runs
    in eval mode under inference_mode; its train/eval mode is restored afterwards.

    Per-row control, so unrelated requests can share one batch (the server does):
    `row_max_new_tokens[i]` is row i's own budget (default: `config.max_new_tokens`
    for every row); a row reaching it finishes like one reaching the global budget.
    `row_stop[i]` is row i's own stop strings (default: `config.stop` for every row).
    If `stream` returns True for a row, that row is dropped at once (no further calls
    for it; its output keeps the tokens so far, its index is in `stats["cancelled"]`)
    while the other rows go on unchanged. `row_done(row, output)` is called as soon as a
    row finishes (not when dropped) with that row's final output (before the guard), so a
    caller can answer it while longer rows still decode.
    """
    config = config or GenerationConfig()
    if not prompts:
        return GenerationOutput([], [], [])
    if row_max_new_tokens is None:
        limits = [config.max_new_tokens] * len(prompts)
    else:
        limits = [int(x) for x in row_max_new_tokens]
        if len(limits) != len(prompts) or any(x < 0 for x in limits):
            raise ValueError(f"row_max_new_tokens needs one budget >= 0 per prompt ({len(prompts)}), got {limits}")
    row_stops = [list(config.stop)] * len(prompts) if row_stop is None else [list(x) for x in row_stop]
    if len(row_stops) != len(prompts) or any(not isinstance(t, str) or not t for x in row_stops for t in x):
        raise ValueError(f"row_stop needs one list of non-empty stop strings per prompt ({len(prompts)}), "
                         f"got {row_stop!r}")
    prompt_ids = encode_prompts(tokenizer, prompts, config.chat, config.system)
    was_training = model.training
    model.eval()
    try:
        if config.decoding == "plain":
            rows, token_ids, logprobs, cancelled = _generate(model, tokenizer, prompt_ids, config, stream, limits,
                                                             row_stops, row_done)
            out = GenerationOutput([r.text for r in rows], token_ids, logprobs)
        else:
            out = _generate_speculative(model, tokenizer, prompt_ids, config, stream, limits, row_stops, row_done)
            cancelled = out.stats.pop("cancelled_rows", [])
        if cancelled:
            out.stats["cancelled"] = cancelled
        if config.guard is not None:
            from posttrain.generate.guard import guard_text

            checked = [guard_text(t, config.guard) for t in out.texts]
            out.texts = [g.text for g in checked]
            out.stats["guard_blocked"] = sum(g.blocked for g in checked)
        return out
    finally:
        model.train(was_training)


def _generate_speculative(model, tokenizer, prompt_ids, config, stream, limits, row_stops,
                          row_done=None) -> GenerationOutput:
    from dataclasses import replace

    from posttrain.generate.speculative import SpecStats, make_drafter, speculative_decode

    drafter = make_drafter(config.decoding, config.corpus, config.sam_bias, config.aux_model)
    device = next(model.parameters()).device
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stops = set() if config.ignore_eos else eos_ids(model, tokenizer)
    pad = pad_id(model, tokenizer)
    texts, token_ids, logprobs, total, cancelled = [], [], [], SpecStats(), []
    for row, prompt in enumerate(prompt_ids):
        row_config = replace(config, max_new_tokens=limits[row], stop=row_stops[row])
        state, toks, lps, stats = speculative_decode(model, tokenizer, prompt, row_config, drafter, stream, row,
                                                     generator, stops=stops, pad=pad)
        texts.append(state.text)
        token_ids.append(toks)
        logprobs.append(lps)
        total.add(stats)
        if stats.cancelled:
            cancelled.append(row)
        elif row_done is not None:
            row_done(row, GenerationOutput([state.text], [toks], [lps]))
    out = GenerationOutput(texts, token_ids, logprobs, total.summary())
    out.stats["cancelled_rows"] = cancelled
    return out
