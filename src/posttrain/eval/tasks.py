"""Evaluation tasks from local JSONL files: prompts -> generations -> scores.

Generation tasks: one row per example, `{"prompt": str, "answer": str}`, a chat row
`{"messages": [{role, content}, ...]}` whose last turn is the assistant's reference answer
(an SFT file), or `{"messages": [...], "answer": str}` ending with the user's question
(read by `data.answers.load_checkable`, which synthetic data uses too). Perplexity sets:
rows `{"text": str}`. Both are plain files so an eval is reproducible from the file alone; every bad row fails with file:line:field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from posttrain.data.answers import Extract, answers_match, apply_extract, exact_match, load_checkable
from posttrain.data.formats import read_jsonl
from posttrain.eval.metrics import is_refusal, sequence_nll, token_f1
from posttrain.generate.engine import GenerationConfig, generate
from posttrain.generate.guard import load_guard

METRICS = ("exact_match", "accuracy", "token_f1", "refusal_rate")  # refusal_rate: rows need no answer


@dataclass
class TaskResult:
    """One task's score. predictions: per example {prompt, prediction, extracted, answer, score}."""

    name: str
    metric: str
    score: float
    n: int
    predictions: list[dict[str, Any]] = field(default_factory=list)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; bad JSON or non-objects raise."""
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    return read_jsonl(path)


def load_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The `text` field of every row of a perplexity set."""
    path = Path(path)
    texts = []
    for lineno, row in _read_jsonl(path):
        text = row.get("text")
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path}:{lineno}:text: expected a non-empty string")
        texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"{path}: no rows")
    return texts


def score_prediction(prediction: str, answer: str, metric: str, extract: Extract = None) -> tuple[str | None, float]:
    """(extracted answer, score in [0, 1]) for one example."""
    if metric == "refusal_rate":
        return None, float(is_refusal(prediction))
    extracted = apply_extract(prediction, extract)
    if metric == "accuracy":
        return extracted, float(answers_match(extracted, answer))
    if extracted is None:
        return None, 0.0
    if metric == "exact_match":
        return extracted, exact_match(extracted, answer)
    if metric == "token_f1":
        return extracted, token_f1(extracted, answer)
    raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")


def evaluate_task(model, tokenizer, path: str | Path, metric: str = "exact_match", extract: Extract = None,
                  max_new_tokens: int = 64, batch_size: int = 8, chat: bool = True, system: str | None = None,
                  limit: int | None = None, stop: Sequence[str] = (), name: str | None = None,
                  decoding: str = "plain", corpus=None, guard=None) -> TaskResult:
    """Greedy-generate an answer for each example and score it; the score is the mean.

    String prompts use the chat template when `chat` is true; `messages` rows always
    do (with `system` prepended unless they start with a system turn). Prompts are
    generated in batches of similar length to waste little on padding. `guard`
    (GuardRules) checks each reply as a deployment would, so a blocked reply is scored
    as the refusal text (what `refusal_rate` measures with the guard on).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = load_checkable(path, limit, need_answer=metric != "refusal_rate")
    name = name or Path(path).stem
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, chat=chat, system=system,
                              stop=list(stop), decoding=decoding, corpus=corpus, guard=guard)
    order = sorted(range(len(examples)), key=lambda i: len(json.dumps(examples[i]["prompt"])))
    texts: list[str] = [""] * len(examples)
    for start in tqdm(range(0, len(order), batch_size), desc=f"eval {name}", unit="batch", leave=False):
        idx = order[start:start + batch_size]
        out = generate(model, tokenizer, [examples[i]["prompt"] for i in idx], config)
        for i, text in zip(idx, out.texts):
            texts[i] = text
    predictions = []
    for ex, text in zip(examples, texts):
        extracted, score = score_prediction(text, ex["answer"], metric, extract)
        predictions.append({"line": ex["line"], "prompt": ex["prompt"], "prediction": text,
                            "extracted": extracted, "answer": ex["answer"], "score": score})
    score = sum(p["score"] for p in predictions) / len(predictions)
    return TaskResult(name=name, metric=metric, score=score, n=len(predictions), predictions=predictions)


def evaluate_perplexity(model, tokenizer, path: str | Path, max_length: int = 512, batch_size: int = 8,
                        limit: int | None = None, name: str | None = None) -> TaskResult:
    """Token-weighted perplexity over the `text` rows of a JSONL file."""
    import math

    texts = load_texts(path, limit)
    name = name or Path(path).stem
    with tqdm(total=-(-len(texts) // batch_size), desc=f"ppl {name}", unit="batch", leave=False) as bar:
        total, count = sequence_nll(model, tokenizer, texts, max_length, batch_size, progress=bar.update)
    if count == 0:
        raise ValueError(f"{path}: no text has two or more tokens; perplexity is undefined")
    return TaskResult(name=name, metric="perplexity", score=math.exp(total / count), n=len(texts))


class EvalSpec(BaseModel):
    """One entry of an eval config's `tasks:` list."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str
    type: Literal["generation", "perplexity"] = "generation"
    metric: Literal["exact_match", "accuracy", "token_f1", "refusal_rate", "perplexity"] | None = None
    extract: str | None = Field(None, description="last_number, first_line or a regex (generation only)")
    max_new_tokens: int = Field(64, gt=0)
    limit: int | None = Field(None, gt=0)
    chat: bool = True
    system: str | None = None
    stop: list[str] = Field(default_factory=list)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, ge=2, description="tokens per text (perplexity only)")
    decoding: Literal["plain", "sam", "lookup"] = "plain"
    corpus: str | None = Field(None, description="static SAM corpus (decoding=sam): saved automaton or data files")
    guard: str | None = Field(None, description="output-guard rules YAML applied to every reply (generation only)")

    @model_validator(mode="after")
    def _check(self) -> "EvalSpec":
        if self.type == "perplexity":
            if self.metric not in (None, "perplexity"):
                raise ValueError(f"task {self.name!r}: a perplexity task has metric 'perplexity', not {self.metric!r}")
            if self.extract is not None or self.guard is not None:
                raise ValueError(f"task {self.name!r}: extract and guard apply to generation tasks only")
            self.metric = "perplexity"
        else:
            if self.metric == "perplexity":
                raise ValueError(f"task {self.name!r}: metric 'perplexity' needs type: perplexity")
            self.metric = self.metric or "exact_match"
        return self


def load_corpus(path: str, tokenizer):
    """A static SAM corpus: a saved automaton (.npz) or data files (comma-separated) built now."""
    from posttrain.generate.sam import SuffixAutomaton, build_static, tokenize_corpus

    if path.endswith(".npz"):
        return SuffixAutomaton.load(path)
    return build_static(tokenize_corpus(tokenizer, path.split(",")), eos_id=tokenizer.eos_token_id)


def run_spec(model, tokenizer, spec: EvalSpec) -> TaskResult:
    if spec.type == "perplexity":
        return evaluate_perplexity(model, tokenizer, spec.path, max_length=spec.max_length,
                                   batch_size=spec.batch_size, limit=spec.limit, name=spec.name)
    return evaluate_task(model, tokenizer, spec.path, metric=spec.metric, extract=spec.extract,
                         max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, chat=spec.chat,
                         system=spec.system, limit=spec.limit, stop=spec.stop, name=spec.name,
                         decoding=spec.decoding,
                         corpus=load_corpus(spec.corpus, tokenizer) if spec.corpus else None,
                         guard=load_guard(spec.guard) if spec.guard else None)


def run_eval(model, tokenizer, specs: Sequence[EvalSpec]) -> dict[str, float]:
    """{spec.name: score} for every spec, in order (perplexity tasks report perplexity)."""
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"eval task names must be unique; repeated: {', '.join(dupes)}")
    return {spec.name: run_spec(model, tokenizer, spec).score for spec in specs}
