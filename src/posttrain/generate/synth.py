"""Synthetic data: self-instruct generation and rejection sampling with a teacher model.

Two plain pipelines, both ending in a chat JSONL whose every row carries `provenance`
(teacher, sampling settings, seed rows or source line, generation index, filter and
verifier outcome) and a report of counts written next to it (OUT.report.json):

* self-instruct: a few seed tasks -> a numbered list the teacher continues -> parsed
  instructions -> `filters.filter_records` (dedup against the seeds and each other,
  length, blocklist, ...) -> one response each -> response filters (length, reward-model
  score threshold) and an optional verifier callable -> rows.
* rejection sampling (STaR-style): for each prompt with a known answer, k sampled
  responses -> extracted answer checked with `data.answers` (or a task checker) -> the
  verified ones, deduplicated, at most m per prompt -> rows. `verify: false` keeps
  unverified samples instead (the ablation that shows the verifier matters).

Sampling and selection are separate functions (`sample_candidates`, `select_rejection`)
so one set of samples can feed both the verified and the unverified dataset.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, model_validator

from posttrain.config import Strict
from posttrain.data.answers import load_checkable
from posttrain.data.filters import FilterRules, filter_records
from posttrain.data.formats import DataError, read_jsonl

Verifier = Callable[[dict, str], bool]  # (source item {prompt, answer, ...}, response text) -> correct?
RowVerifier = Callable[[dict], bool]  # a finished chat row (self-instruct) -> keep?


# ================================================================================ config

class TeacherConfig(Strict):
    name: str = Field("default", description="a named model ('default' = SmolLM2-135M-Instruct, 'gemma3-270m'), HF dir, run dir, .gguf file or hub id")
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"


class Sampling(Strict):
    """Decoding settings of one generation step; temperature 0 is greedy."""

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int = 0
    batch_size: int = Field(32, gt=0, description="prompts (x samples) per generate() call")

    def generation_config(self, batch: int = 0, chat: bool = True, system: str | None = None, stop=()):
        """The engine's config for batch number `batch` (its seed is seed + batch, so
        a rerun with the same settings draws the same samples)."""
        from posttrain.generate.engine import GenerationConfig

        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                                temperature=self.temperature or 1.0, top_p=self.top_p, top_k=self.top_k,
                                seed=self.seed + batch, chat=chat, system=system, stop=list(stop))


def _default_instruction_filters() -> FilterRules:
    return FilterRules(min_words=3, max_words=80, pii={"action": "drop"})


def _default_response_filters() -> FilterRules:
    # instructions were deduplicated already; two answers may legitimately agree
    return FilterRules(exact_dedup=False, near_dedup={"enabled": False}, min_chars=1, pii={"action": "off"})


class SelfInstructConfig(Strict):
    seeds: str = Field(..., description="JSONL of seed tasks: rows with 'instruction', 'prompt' or 'messages'")
    num_instructions: int = Field(32, gt=0, description="stop once this many instructions survive the filters")
    seeds_per_prompt: int = Field(3, gt=0, description="seed tasks shown in each few-shot prompt")
    prompts_per_round: int = Field(16, gt=0, description="few-shot prompts generated per round")
    max_rounds: int = Field(8, gt=0)
    header: str = "Come up with a series of tasks:"
    instruction_sampling: Sampling = Sampling(max_new_tokens=64, temperature=0.9, top_p=0.95)
    response_sampling: Sampling = Sampling(max_new_tokens=128, temperature=0.0)
    system: str | None = None
    instruction_filters: FilterRules = Field(default_factory=_default_instruction_filters)
    response_filters: FilterRules = Field(default_factory=_default_response_filters,
                                          description="on the finished rows; score.reward_model + score.min "
                                                      "keeps rows a reward model rates highly")


class RejectionConfig(Strict):
    prompts: str = Field(..., description="JSONL: {prompt|messages, answer} rows, or chat rows whose last "
                                          "assistant turn is the reference answer")
    limit: int | None = Field(None, gt=0, description="use the first N prompts")
    k: int = Field(4, gt=0, description="samples per prompt")
    max_per_prompt: int = Field(1, gt=0, description="kept rows per prompt (m)")
    extract: str = Field("last_number", description="last_number, first_line or a regex (its group 1)")
    verify: bool = Field(True, description="false keeps unverified samples (ablation)")
    require_finished: bool = Field(False, description="drop samples cut off by max_new_tokens (finished ones "
                                                      "are preferred for the per-prompt cap either way)")
    prompt_suffix: str = Field("", description="appended to the user turn while sampling only; rows keep "
                                               "the original prompt")
    system: str | None = None
    sampling: Sampling = Sampling(max_new_tokens=32, temperature=0.8)
    filters: FilterRules = Field(default_factory=lambda: FilterRules(near_dedup={"enabled": False},
                                                                     pii={"action": "off"}),
                                 description="on verified rows before the per-prompt cap (exact dedup by default)")

    @model_validator(mode="after")
    def _check(self) -> "RejectionConfig":
        from posttrain.config import valid_regex

        if self.extract not in ("last_number", "first_line"):
            valid_regex(self.extract)
        if self.filters.score.min is not None and not self.filters.score.reward_model:
            raise ValueError("filters.score.min needs filters.score.reward_model")
        return self


class SynthConfig(Strict):
    mode: Literal["self-instruct", "rejection"]
    output: str = Field(..., description="chat JSONL to write (report: OUTPUT.report.json)")
    teacher: TeacherConfig = TeacherConfig()
    self_instruct: SelfInstructConfig | None = None
    rejection: RejectionConfig | None = None

    @model_validator(mode="after")
    def _section(self) -> "SynthConfig":
        key = self.mode.replace("-", "_")
        if getattr(self, key) is None:
            raise ValueError(f"mode {self.mode!r} needs a '{key}' section")
        other = "rejection" if key == "self_instruct" else "self_instruct"
        if getattr(self, other) is not None:
            raise ValueError(f"mode {self.mode!r} does not use the '{other}' section; remove it")
        return self


# ================================================================================ source rows

def load_seed_tasks(path: str | Path) -> list[dict]:
    """[{id, instruction}] from rows with 'instruction', 'prompt' (string) or 'messages'
    (the first user turn); `id` is the row's 'id' field or its line number."""
    out = []
    for line, row in read_jsonl(path):
        if isinstance(row.get("instruction"), str):
            text = row["instruction"]
        elif isinstance(row.get("prompt"), str):
            text = row["prompt"]
        elif isinstance(row.get("messages"), list):
            text = next((m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"),
                        None)
        else:
            text = None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line}: field 'instruction' (or 'prompt', or a user turn in 'messages') "
                            "must be a non-empty string")
        out.append({"id": row.get("id", line), "instruction": " ".join(text.split())})
    if not out:
        raise DataError(f"{path}: no seed tasks")
    return out


def as_messages(prompt: str | list[dict], suffix: str = "") -> list[dict]:
    """A prompt as chat messages; `suffix` is appended to the last user turn."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if suffix:
        msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + suffix}
    return msgs


# ================================================================================ self-instruct

_NUMBERED = re.compile(r"^\s*(?:task\s*)?(\d+)\s*[.):]\s*(.*)$", re.IGNORECASE)


def few_shot_prompt(header: str, seeds: Sequence[str]) -> str:
    """header, the seeds as a numbered list, and the next number for the teacher to fill."""
    lines = [header] + [f"{i}. {s}" for i, s in enumerate(seeds, 1)]
    return "\n".join(lines) + f"\n{len(seeds) + 1}."


def parse_instructions(continuation: str, truncated: bool = False) -> tuple[list[str], int]:
    """Instructions in a continuation of `few_shot_prompt` (which ends in "N."): the first
    line is item N, later items need their own "M." marker; unnumbered lines continue the
    item before them. Returns (instructions, items dropped as incomplete): when the
    generation ran out of tokens (`truncated`) its last item is cut off mid-way."""
    items: list[str] = []
    current: list[str] | None = []
    for i, line in enumerate(continuation.split("\n")):
        m = _NUMBERED.match(line)
        if i == 0:
            current.append(line.strip())
        elif m:
            items.append(" ".join(current))
            current = [m.group(2).strip()]
        elif not line.strip():
            items.append(" ".join(current))
            current = None  # a blank line ends the list
            break
        else:
            current.append(line.strip())
    if current is not None:
        items.append(" ".join(current))
    cut = 0
    if truncated and current is not None and items:
        items.pop()
        cut = 1
    return [" ".join(s.split()) for s in items if s.strip()], cut


@dataclass
class SynthResult:
    rows: list[dict]
    report: dict = field(default_factory=dict)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled, leave=False)


def self_instruct(model, tokenizer, seeds: Sequence[dict], cfg: SelfInstructConfig, teacher: str = "model",
                  verifier: RowVerifier | None = None, scorer=None, progress: bool = True) -> SynthResult:
    """New instructions from seed tasks, then a response each; see the module docstring.

    `scorer(records) -> scores` serves `response_filters.score` (`run_synth` builds it from
    the reward model named there); `verifier(row) -> bool` drops rows it rejects (counted as 'verifier').
    """
    from posttrain.generate.engine import generate

    if cfg.seeds_per_prompt > len(seeds):
        raise ValueError(f"self_instruct.seeds_per_prompt is {cfg.seeds_per_prompt} but there are only "
                         f"{len(seeds)} seed tasks")
    rng = random.Random(cfg.instruction_sampling.seed)
    counts: Counter = Counter()
    seed_records = [{"prompt": s["instruction"]} for s in seeds]
    kept: list[dict] = []  # candidate instructions that passed the filters so far
    candidates: list[dict] = []
    rounds = 0
    bar = _bar(cfg.num_instructions, "self-instruct: instructions", progress)
    while len(kept) < cfg.num_instructions and rounds < cfg.max_rounds:
        shown = [rng.sample(range(len(seeds)), cfg.seeds_per_prompt) for _ in range(cfg.prompts_per_round)]
        prompts = [few_shot_prompt(cfg.header, [seeds[i]["instruction"] for i in idx]) for idx in shown]
        out = generate(model, tokenizer, prompts,
                       cfg.instruction_sampling.generation_config(batch=rounds, chat=False, stop=["\n\n"]))
        for p, (idx, text, ids) in enumerate(zip(shown, out.texts, out.token_ids)):
            items, cut = parse_instructions(text, truncated=len(ids) >= cfg.instruction_sampling.max_new_tokens)
            counts["truncated"] += cut
            for j, instruction in enumerate(items):
                candidates.append({"prompt": instruction, "provenance": {
                    "round": rounds, "prompt_index": p, "item": j,
                    "seed_ids": [seeds[i]["id"] for i in idx]}})
        rounds += 1
        # the seeds go first so a copy of a seed is dropped as its duplicate; rerun on every
        # round's candidates so far, so the first occurrence of an instruction always wins
        result = filter_records(seed_records + [{"prompt": c["prompt"]} for c in candidates],
                                cfg.instruction_filters, scorer=None)
        kept = [candidates[n - len(seeds) - 1] for n in result.kept_lines if n > len(seeds)]
        bar.n = min(len(kept), cfg.num_instructions)
        bar.refresh()
    bar.close()
    drops = Counter(d.rule for d in result.dropped if d.line > len(seeds))
    if counts["truncated"]:
        drops["truncated"] = counts["truncated"]
    del counts["truncated"]
    if len(kept) > cfg.num_instructions:
        drops["over_num_instructions"] = len(kept) - cfg.num_instructions
        kept = kept[:cfg.num_instructions]
    counts.update({"rounds": rounds, "instructions_generated": len(candidates),
                   "instructions_kept": len(kept)})

    rows: list[dict] = []
    for b in range(0, len(kept), cfg.response_sampling.batch_size):
        batch = kept[b:b + cfg.response_sampling.batch_size]
        out = generate(model, tokenizer, [c["prompt"] for c in batch],
                       cfg.response_sampling.generation_config(batch=b // cfg.response_sampling.batch_size,
                                                               chat=True, system=cfg.system))
        for c, text in zip(batch, out.texts):
            rows.append({"messages": [{"role": "user", "content": c["prompt"]},
                                      {"role": "assistant", "content": text.strip()}],
                         "provenance": {"mode": "self-instruct", "teacher": teacher, **c["provenance"],
                                        "instruction_sampling": cfg.instruction_sampling.model_dump(),
                                        "response_sampling": cfg.response_sampling.model_dump()}})
    result = filter_records(rows, cfg.response_filters, scorer=scorer)
    response_drops = Counter(d.rule for d in result.dropped)
    rows = result.kept
    if verifier is not None:
        verdicts = [bool(verifier(r)) for r in rows]
        response_drops["verifier"] += verdicts.count(False)
        rows = [r for r, ok in zip(rows, verdicts) if ok]
    for i, r in enumerate(rows):
        r["provenance"]["filters"] = "passed" + (" (verified)" if verifier is not None else "")
        r["provenance"]["index"] = i
    report = {"mode": "self-instruct", "teacher": teacher, "seeds": len(seeds), **counts,
              "instruction_drops": dict(drops.most_common()),
              "responses_generated": len(kept), "response_drops": dict(response_drops.most_common()),
              "kept": len(rows)}
    return SynthResult(rows, report)


# ================================================================================ rejection sampling

def answer_verifier(extract: str = "last_number") -> Verifier:
    """The default checker: the extracted answer equals the item's reference (numbers by value)."""
    from posttrain.data.answers import answers_match, extract_answer

    return lambda item, text: answers_match(extract_answer(text, extract), item["answer"])


def sample_candidates(model, tokenizer, items: Sequence[dict], cfg: RejectionConfig,
                      verify: Verifier | None = None, progress: bool = True) -> list[dict]:
    """k samples per item, each checked: [{item, sample, text, extracted, verified, finished}]
    in item order. Batches hold whole items (k rows each) so a batch's seed fixes its samples."""
    from posttrain.data.answers import extract_answer
    from posttrain.generate.engine import generate

    verify = verify or answer_verifier(cfg.extract)
    per_batch = max(1, cfg.sampling.batch_size // cfg.k)
    out_rows: list[dict] = []
    bar = _bar(len(items), "rejection: sampling", progress)
    for b, start in enumerate(range(0, len(items), per_batch)):
        batch = items[start:start + per_batch]
        prompts = [as_messages(it["prompt"], cfg.prompt_suffix) for it in batch for _ in range(cfg.k)]
        out = generate(model, tokenizer, prompts, cfg.sampling.generation_config(batch=b, system=cfg.system))
        for r, (text, ids) in enumerate(zip(out.texts, out.token_ids)):
            n, j = start + r // cfg.k, r % cfg.k
            text = text.strip()  # what the row will hold is what gets checked
            out_rows.append({"item": n, "sample": j, "batch": b, "text": text,
                             "extracted": extract_answer(text, cfg.extract),
                             "verified": bool(verify(items[n], text)),
                             "finished": len(ids) < cfg.sampling.max_new_tokens})
        bar.update(len(batch))
    bar.close()
    return out_rows


def select_rejection(items: Sequence[dict], candidates: Sequence[dict], cfg: RejectionConfig,
                     teacher: str = "model", source: str | None = None, verified_only: bool | None = None,
                     scorer=None) -> SynthResult:
    """Chat rows from checked samples: verified ones (or all, `verified_only=False`), then
    `cfg.filters` (exact dedup by default), then at most `max_per_prompt` per prompt
    (samples that finished before max_new_tokens first, then in sample order).
    Every candidate ends up either kept or counted under one drop reason."""
    verified_only = cfg.verify if verified_only is None else verified_only
    drops: Counter = Counter()
    pool = []
    # per prompt, samples that ended on their own come first: the cap keeps those
    for c in sorted(candidates, key=lambda c: (c["item"], not c["finished"], c["sample"])):
        if verified_only and not c["verified"]:
            drops["no_answer" if c["extracted"] is None else "wrong_answer"] += 1
            continue
        if not c["text"]:
            drops["empty"] += 1
            continue
        if cfg.require_finished and not c["finished"]:
            drops["unfinished"] += 1
            continue
        it = items[c["item"]]
        pool.append({"messages": as_messages(it["prompt"]) + [{"role": "assistant", "content": c["text"]}],
                     "provenance": {"mode": "rejection", "teacher": teacher, "source": source,
                                    "source_line": it["line"], "sample_index": c["sample"], "batch": c["batch"],
                                    "sampling": cfg.sampling.model_dump(), "prompt_suffix": cfg.prompt_suffix,
                                    "system": cfg.system, "extract": cfg.extract, "reference": it["answer"],
                                    "extracted": c["extracted"], "verified": c["verified"],
                                    "finished": c["finished"], "_item": c["item"]}})
    result = filter_records(pool, cfg.filters, scorer=scorer)
    drops.update(d.rule for d in result.dropped)
    per_item: Counter = Counter()
    rows = []
    for r in result.kept:
        n = r["provenance"].pop("_item")
        if per_item[n] >= cfg.max_per_prompt:
            drops["over_max_per_prompt"] += 1
            continue
        per_item[n] += 1
        r["provenance"]["filters"] = "passed"
        rows.append(r)
    for r in pool:  # dropped rows still carry the private key; kept ones had it removed
        r["provenance"].pop("_item", None)
    n_verified = sum(c["verified"] for c in candidates)
    report = {"mode": "rejection", "teacher": teacher, "source": source, "verified_only": verified_only,
              "prompts": len(items), "k": cfg.k, "generated": len(candidates), "verified": n_verified,
              "verified_rate": round(n_verified / len(candidates), 4) if candidates else 0.0,
              "prompts_with_verified": len({c["item"] for c in candidates if c["verified"]}),
              "kept": len(rows), "prompts_with_kept": len(per_item),
              "dropped": dict(drops.most_common())}
    return SynthResult(rows, report)


def rejection_sample(model, tokenizer, items: Sequence[dict], cfg: RejectionConfig, teacher: str = "model",
                     source: str | None = None, verify: Verifier | None = None, scorer=None,
                     progress: bool = True) -> SynthResult:
    """sample_candidates + select_rejection."""
    candidates = sample_candidates(model, tokenizer, items, cfg, verify=verify, progress=progress)
    return select_rejection(items, candidates, cfg, teacher=teacher, source=source, scorer=scorer)


# ================================================================================ files and the CLI

def write_dataset(result: SynthResult, output: str | Path, extra: dict | None = None) -> Path:
    """The rows (atomic) and OUTPUT.report.json (atomic) next to them; returns the report path."""
    from posttrain.fileio import write_json_atomic, write_text_atomic

    write_text_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows))
    report_path = Path(f"{output}.report.json")
    write_json_atomic(report_path, {"output": str(output), **result.report, **(extra or {})})
    return report_path


def _scorer(rules: FilterRules, make_scorer: Callable[[FilterRules], Any] | None):
    if rules.score.min is None:
        return None
    if make_scorer is None:
        raise ValueError("score.min is set but no scorer was given: pass make_scorer "
                         "(the CLI and the pipeline pass train.reward_model.filter_scorer)")
    return make_scorer(rules)


def run_synth(cfg: SynthConfig, progress: bool = True,
              make_scorer: Callable[[FilterRules], Any] | None = None) -> SynthResult:
    """Load the teacher and the source rows, run the configured mode, write the dataset.

    `make_scorer(rules) -> scorer` serves a ``score.min`` rule (a reward model lives in a
    higher layer than generation, so the caller supplies it)."""
    import time

    from posttrain.models import load_model, resolve_model_path
    from posttrain.stage import content_hash

    started = time.time()
    if cfg.mode == "rejection":  # read (and validate) the data before loading any model
        rc = cfg.rejection
        items = load_checkable(rc.prompts, rc.limit, allow_empty_answer=False)
        scorer = _scorer(rc.filters, make_scorer)
    else:
        sc = cfg.self_instruct
        seeds = load_seed_tasks(sc.seeds)
        if sc.seeds_per_prompt > len(seeds):
            raise ValueError(f"self_instruct.seeds_per_prompt is {sc.seeds_per_prompt} but {sc.seeds} has "
                             f"{len(seeds)} seed tasks")
        scorer = _scorer(sc.response_filters, make_scorer)
    model, tokenizer = load_model(cfg.teacher.name, dtype=cfg.teacher.dtype)
    teacher = {"spec": cfg.teacher.name, "resolved": resolve_model_path(cfg.teacher.name)}
    if cfg.mode == "rejection":
        result = rejection_sample(model, tokenizer, items, rc, teacher=cfg.teacher.name, source=rc.prompts,
                                  scorer=scorer, progress=progress)
        source = rc.prompts
    else:
        result = self_instruct(model, tokenizer, seeds, sc, teacher=cfg.teacher.name, scorer=scorer,
                               progress=progress)
        source = sc.seeds
    extra = {"teacher_resolved": teacher["resolved"], "source_sha256": content_hash(source),
             "config": cfg.model_dump(mode="json"), "seconds": round(time.time() - started, 1)}
    write_dataset(result, cfg.output, extra)
    result.report.update(extra)
    return result


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    if report["mode"] == "rejection":
        lines = [f"{report['prompts']} prompts x k={report['k']}: generated {report['generated']}, verified "
                 f"{report['verified']} ({report['verified_rate']:.1%}, {report['prompts_with_verified']} prompts), "
                 f"kept {report['kept']} rows from {report['prompts_with_kept']} prompts"]
        lines += [f"  dropped {n:>6}  {why}" for why, n in report["dropped"].items()]
    else:
        lines = [f"{report['instructions_generated']} instructions generated in {report['rounds']} rounds, "
                 f"{report['instructions_kept']} kept; {report['kept']} rows after the response filters"]
        lines += [f"  instruction dropped {n:>5}  {why}" for why, n in report["instruction_drops"].items()]
        lines += [f"  response dropped {n:>8}  {why}" for why, n in report["response_drops"].items()]
    return "\n".join(lines)
