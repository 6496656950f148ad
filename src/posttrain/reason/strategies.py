"""Inference-time reasoning strategies: direct, chain-of-thought, self-consistency,
Tree-of-Thoughts (BFS / DFS) and a router that escalates per question.

Every strategy takes a batch of examples and returns one `Answer` per example with its
cost: generated tokens and model calls (one call = one generated sequence, or one
value-scoring forward pass, which is counted as one generated token since it reads one
next-token distribution). That is what the eval plots accuracy against. Generation is
batched across questions and samples through the shared engine; ToT BFS runs every
question's search in lockstep (one batched call per depth); ToT DFS, being sequential by
nature, searches one question at a time.

Strategies only see the task through `posttrain.reason.tasks.Task`, so any task and any
causal LM with a tokenizer works; prompts use the tokenizer's chat template when it has
one, plain "Question:/Answer:" text otherwise.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch
from pydantic import ValidationInfo, field_validator

from posttrain.config import AtLeastOne, Positive, Probability, Strict
from posttrain.eval.metrics import right_pad
from posttrain.generate.engine import GenerationConfig, generate, render_chat
from posttrain.reason.tasks import Example, Task, answer_phrase, fraction_text, solve24
from posttrain.registry import Registry

SEARCHES = ("bfs", "dfs")
VALUES = ("auto", "checker", "model")
PROBES = ("logprob", "vote")
FINAL_RUNGS = ("auto", "sc", "tot")


class ReasonConfig(Strict):
    """Knobs of every strategy; defaults are what the measurements used."""

    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    batch_size: AtLeastOne = 16  # prompts per engine call
    seed: int = 0
    direct_tokens: int | None = None  # None: the task's default budget
    cot_tokens: int | None = None
    fewshot: bool = False  # chain-of-thought with the task's worked examples
    # self-consistency
    samples: AtLeastOne = 5
    temperature: Positive = 0.7
    top_p: float = 0.95
    sc_verify: bool = True  # tasks with a reference-free verifier: prefer a verified sample over the vote
    # Tree-of-Thoughts
    search: str = "bfs"
    value: str = "auto"  # checker (task rules, no reference), model (sure/likely/impossible logprobs), auto
    k: AtLeastOne = 3  # proposals per state
    beam: AtLeastOne = 2  # BFS: states kept per depth
    depth: AtLeastOne = 4  # max thoughts on a path
    threshold: Probability = 0.2  # DFS: prune states valued below this
    budget: AtLeastOne = 12  # DFS: max expanded states
    step_tokens: AtLeastOne = 48  # tokens per proposed thought
    # router
    probe: str = "logprob"  # logprob: greedy direct answer's mean token probability; vote: agreement
    probe_samples: AtLeastOne = 3
    confidence: Probability = 0.8  # answer directly at or above this
    final: str = "auto"  # last rung: sc, tot, or auto (tot when the task has a verifier, else sc)

    @field_validator("search", "value", "probe", "final")
    @classmethod
    def _choice(cls, v: str, info: ValidationInfo) -> str:
        allowed = {"search": SEARCHES, "value": VALUES, "probe": PROBES, "final": FINAL_RUNGS}[info.field_name]
        if v not in allowed:
            raise ValueError(f"{info.field_name} must be one of {', '.join(allowed)}; got {v!r}")
        return v


@dataclass
class Answer:
    """One question's result: the answer, the text that led to it, and what it cost."""

    answer: str | None
    text: str
    tokens: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    rung: str | None = None  # router: which rung answered
    detail: dict = field(default_factory=dict)

    def charge(self, other: "Answer") -> None:
        self.tokens += other.tokens
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens


# ---------------------------------------------------------------------------------
# prompts and generation


def use_chat(tokenizer, cfg: ReasonConfig) -> bool:
    return cfg.chat if cfg.chat is not None else bool(getattr(tokenizer, "chat_template", None))


ANSWER_PREFIX = "The answer is"


def build_prompt(tokenizer, task: Task, question: str, style: str, chat: bool) -> str:
    """Prompt text ready for the reply. style: direct, cot, cot_fewshot.

    A direct prompt ends with the start of the reply, "The answer is", so even a small
    model answers at once instead of restating the question, and the probe's
    confidence is the probability of the answer tokens themselves."""
    if style not in ("direct", "cot", "cot_fewshot"):
        raise ValueError(f"prompt style must be direct, cot or cot_fewshot; got {style!r}")
    instruction = task.direct if style == "direct" else task.cot
    shots = task.fewshot if style == "cot_fewshot" else []
    turns = [(f"{q}\n{instruction}", a) for q, a in shots] + [(f"{question}\n{instruction}", None)]
    if chat:
        messages = []
        for user, assistant in turns:
            messages.append({"role": "user", "content": user})
            if assistant is not None:
                messages.append({"role": "assistant", "content": assistant})
        text = render_chat(tokenizer, messages)
    else:
        text = "\n\n".join(f"Question: {u}\nAnswer:" + (f" {a}" if a is not None else "") for u, a in turns)
    if style == "direct":
        text += ANSWER_PREFIX if chat else " " + ANSWER_PREFIX
    return text


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Rendered chat text already holds its special tokens; plain text gets the tokenizer's."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def run_generation(model, tokenizer, prompts: Sequence[str], chat: bool, cfg: ReasonConfig, max_new_tokens: int,
                   sample: bool = False, seed: int = 0, stop: Sequence[str] = ()) -> list[Answer]:
    """Generate one reply per prompt in batches of similar length; each Answer carries its
    text, its tokens, 1 call, and `detail["logprobs"]` (per generated token)."""
    ids = [encode(tokenizer, p, chat) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[Answer | None] = [None] * len(ids)
    for b, start in enumerate(range(0, len(order), cfg.batch_size)):
        idx = order[start:start + cfg.batch_size]
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=cfg.temperature,
                               top_p=cfg.top_p if sample else 1.0, seed=seed * 1000 + b if sample else None,
                               stop=list(stop))
        res = generate(model, tokenizer, [ids[i] for i in idx], gen)
        for i, text, toks, lps in zip(idx, res.texts, res.token_ids, res.logprobs):
            out[i] = Answer(None, text, tokens=len(toks), calls=1, prompt_tokens=len(ids[i]),
                            detail={"logprobs": lps, "token_ids": toks})
    return out  # type: ignore[return-value]


def answer_confidence(tokenizer, reply: Answer) -> float:
    """Probability per token (exp of the mean log-prob) of the reply up to the end of its
    extracted answer: how sure the model was of the answer itself, not of the chatter after it."""
    if reply.answer is None:
        return 0.0
    ids, lps = reply.detail.get("token_ids") or [], reply.detail.get("logprobs") or []
    n = len(lps)
    for end in range(1, len(ids) + 1):
        if reply.answer in tokenizer.decode(ids[:end], skip_special_tokens=True):
            n = end
            break
    return math.exp(sum(lps[:n]) / n) if n else 0.0


def mean_logprob(answer: Answer) -> float:
    lps = answer.detail.get("logprobs") or []
    return sum(lps) / len(lps) if lps else float("-inf")


@torch.inference_mode()
def option_values(model, tokenizer, prompts: Sequence[str], options: dict[str, float], chat: bool = False,
                  batch_size: int = 16) -> list[float]:
    """Model-as-scorer: the expected value of the next token over `options`.

    options maps a word (e.g. " sure") to its value; each word's first token is read from
    the next-token distribution after each prompt, renormalised over the options, and the
    value-weighted sum returned. One forward pass per prompt, batched.
    """
    first = {}
    for word, value in options.items():
        tid = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tid:
            raise ValueError(f"option {word!r} tokenizes to nothing")
        first[tid[0]] = value
    if len(first) != len(options):
        raise ValueError(f"options {list(options)} share a first token; pick words that start differently")
    token_ids = torch.tensor(list(first))
    values = torch.tensor(list(first.values()), dtype=torch.float32)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode(tokenizer, p, chat) for p in prompts]
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            ids, mask = right_pad(batch, pad, device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            last = torch.tensor([len(s) - 1 for s in batch], device=device)
            picked = logits[torch.arange(len(batch), device=device), last][:, token_ids.to(device)].float().cpu()
            probs = picked.softmax(-1)
            out.extend((probs * values).sum(-1).tolist())
    finally:
        model.train(was_training)
    return out


VERDICTS = {" sure": 1.0, " likely": 0.5, " impossible": 0.0}


# ---------------------------------------------------------------------------------
# answer aggregation


def majority_vote(answers: Sequence[str | None], scores: Sequence[float],
                  key: Callable[[str], str]) -> tuple[str | None, dict[str, int]]:
    """The most frequent answer (by `key`); ties go to the answer whose samples have the
    higher mean score (mean token log-prob), then to the first seen. None answers don't vote."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(answers):
        if a is not None:
            groups[key(a)].append(i)
    if not groups:
        return None, {}
    best = max(groups, key=lambda k: (len(groups[k]), sum(scores[i] for i in groups[k]) / len(groups[k])))
    return answers[groups[best][0]], {k: len(v) for k, v in groups.items()}


# name -> strategy(model, tokenizer, task, examples, cfg) -> one Answer per example (registered below)
STRATEGIES: Registry[Callable[..., list[Answer]]] = Registry("strategy")


def _extract(task: Task, answers: list[Answer], examples: list[Example]) -> list[Answer]:
    for a, ex in zip(answers, examples):
        a.answer = task.extract(a.text, ex)
    return answers


# ---------------------------------------------------------------------------------
# strategies


@STRATEGIES.register("direct")
def direct(model, tokenizer, task: Task, examples: list[Example], cfg: ReasonConfig) -> list[Answer]:
    """Ask for the answer only (greedy, the reply primed with "The answer is", one line)."""
    chat = use_chat(tokenizer, cfg)
    prompts = [build_prompt(tokenizer, task, ex["prompt"], "direct", chat) for ex in examples]
    out = run_generation(model, tokenizer, prompts, chat, cfg, cfg.direct_tokens or task.direct_tokens, stop=["\n"])
    for a in out:
        a.text = ANSWER_PREFIX + a.text
    return _extract(task, out, examples)


@STRATEGIES.register("cot")
def chain_of_thought(model, tokenizer, task: Task, examples: list[Example], cfg: ReasonConfig) -> list[Answer]:
    """Zero-shot ("step by step") or few-shot (cfg.fewshot: the task's worked examples) CoT, greedy."""
    chat = use_chat(tokenizer, cfg)
    style = "cot_fewshot" if cfg.fewshot else "cot"
    prompts = [build_prompt(tokenizer, task, ex["prompt"], style, chat) for ex in examples]
    out = run_generation(model, tokenizer, prompts, chat, cfg, cfg.cot_tokens or task.cot_tokens,
                         stop=["\nQuestion:"])
    return _extract(task, out, examples)


@STRATEGIES.register("cot_fewshot")
def cot_fewshot(model, tokenizer, task: Task, examples: list[Example], cfg: ReasonConfig) -> list[Answer]:
    """Few-shot chain-of-thought (the task's worked examples before the question)."""
    return chain_of_thought(model, tokenizer, task, examples, cfg.model_copy(update={"fewshot": True}))


@STRATEGIES.register("sc")
def self_consistency(model, tokenizer, task: Task, examples: list[Example], cfg: ReasonConfig) -> list[Answer]:
    """cfg.samples sampled CoT paths per question (all in one batched pass), majority vote
    over extracted answers, ties by mean token log-prob. With a reference-free verifier
    (cfg.sc_verify), a verified path wins over the vote."""
    chat = use_chat(tokenizer, cfg)
    style = "cot_fewshot" if cfg.fewshot else "cot"
    prompts = [build_prompt(tokenizer, task, ex["prompt"], style, chat) for ex in examples]
    flat = [p for p in prompts for _ in range(cfg.samples)]
    paths = run_generation(model, tokenizer, flat, chat, cfg, cfg.cot_tokens or task.cot_tokens, sample=True,
                           seed=cfg.seed, stop=["\nQuestion:"])
    results = []
    for q, ex in enumerate(examples):
        mine = paths[q * cfg.samples:(q + 1) * cfg.samples]
        answers = [task.extract(p.text, ex) for p in mine]
        scores = [mean_logprob(p) for p in mine]
        verified = [i for i, a in enumerate(answers) if cfg.sc_verify and task.verify and task.verify(a, ex)]
        if verified:
            winner, votes, pick = answers[verified[0]], {}, verified[0]
        else:
            winner, votes = majority_vote(answers, scores, task.key)
            pick = answers.index(winner) if winner is not None else 0
        res = Answer(winner, mine[pick].text, detail={"votes": votes, "samples": answers,
                                                       "verified": bool(verified)})
        for p in mine:
            res.charge(p)
        results.append(res)
    return results


# ---------------------------------------------------------------------------------
# Tree-of-Thoughts: search


@dataclass
class SearchResult:
    best: Any  # the best final state found, else the best state left in the frontier (None if none)
    value: float
    final: bool  # best is a final state
    expanded: int  # states whose children were proposed
    scored: int
    pruned: int = 0


def bfs(roots: list, expand: Callable[[list], list[list]], score: Callable[[list], list[float]],
        is_final: Callable[[Any], bool], beam: int, max_depth: int, accept: float | None = None) -> list[SearchResult]:
    """Breadth-first ToT over several independent searches in lockstep (one per root), so
    each depth costs one batched expand and one batched score for all questions.

    Per root: expand every frontier state, score the children, keep the best `beam`
    non-final ones. Final states are collected; a root's search stops once one of its final
    states is valued >= accept (None: search every depth). Returns per root the best final
    state, else the best open state of the last depth."""
    frontiers = [[root] for root in roots]
    finals: list[list[tuple[float, Any]]] = [[] for _ in roots]
    leftovers: list[list[tuple[float, Any]]] = [[] for _ in roots]
    expanded, scored = [0] * len(roots), [0] * len(roots)
    for _ in range(max_depth):
        items = [(r, st) for r, frontier in enumerate(frontiers) for st in frontier]
        if not items:
            break
        children_lists = expand([st for _, st in items])
        kids = []
        for (r, _), cl in zip(items, children_lists):
            expanded[r] += 1
            kids.extend((r, c) for c in cl)
        values = score([c for _, c in kids]) if kids else []
        per_root: list[list[tuple[float, int, Any]]] = [[] for _ in roots]
        for i, ((r, c), v) in enumerate(zip(kids, values)):
            per_root[r].append((v, i, c))
            scored[r] += 1
        for r in {r for r, _ in items}:
            ranked = sorted(per_root[r], key=lambda t: (-t[0], t[1]))
            finals[r].extend((v, c) for v, _, c in ranked if is_final(c))
            leftovers[r] = [(v, c) for v, _, c in ranked if not is_final(c)][:beam]
            frontiers[r] = [c for _, c in leftovers[r]]
            if accept is not None and any(v >= accept for v, _ in finals[r]):
                frontiers[r] = []
    out = []
    for r in range(len(roots)):
        if finals[r]:
            v, best = max(finals[r], key=lambda t: t[0])
            out.append(SearchResult(best, v, True, expanded[r], scored[r]))
        elif leftovers[r]:
            out.append(SearchResult(leftovers[r][0][1], leftovers[r][0][0], False, expanded[r], scored[r]))
        else:
            out.append(SearchResult(None, float("-inf"), False, expanded[r], scored[r]))
    return out


def dfs(root, expand: Callable[[list], list[list]], score: Callable[[list], list[float]],
        is_final: Callable[[Any], bool], threshold: float, budget: int, max_depth: int,
        accept: float | None = None) -> SearchResult:
    """Depth-first ToT with backtracking: always go to the best unexplored child; children
    valued below `threshold` are pruned; a dead end (no child left) backtracks to the next
    best sibling. Stops at the first final state valued >= accept (default: threshold), or
    after `budget` expansions, returning the best final state seen."""
    accept = threshold if accept is None else accept
    stack: list[tuple[float, int, Any]] = [(1.0, 0, root)]
    best_final: tuple[float, Any] | None = None
    best_open: tuple[float, Any] | None = None
    expanded = scored = pruned = 0
    while stack and expanded < budget:
        value, depth, state = stack.pop()
        if is_final(state):
            if best_final is None or value > best_final[0]:
                best_final = (value, state)
            if value >= accept:
                break
            continue
        if depth > 0 and (best_open is None or value > best_open[0]):
            best_open = (value, state)
        if depth >= max_depth:
            continue
        children = expand([state])[0]
        expanded += 1
        if not children:
            continue
        values = score(children)
        scored += len(children)
        kept = [(v, i) for i, v in enumerate(values) if v >= threshold]
        pruned += len(children) - len(kept)
        for v, i in sorted(kept, key=lambda t: (t[0], -t[1])):  # best pushed last: explored first
            stack.append((v, depth + 1, children[i]))
    if best_final is not None:
        return SearchResult(best_final[1], best_final[0], True, expanded, scored, pruned)
    if best_open is not None:
        return SearchResult(best_open[1], best_open[0], False, expanded, scored, pruned)
    return SearchResult(None, float("-inf"), False, expanded, scored, pruned)


# ---------------------------------------------------------------------------------
# Tree-of-Thoughts: state spaces


@dataclass
class Space:
    """A ToT state space for one question.

    prompt(state) -> text the proposer continues; samples: generations per state (1 when
    one generation lists several thoughts); parse(state, texts) -> child states;
    checker(state) -> value from task rules, or None when the task has none;
    value_prompt(state) -> text whose next token is read as sure/likely/impossible;
    answer(state) -> the final answer the state implies.
    """

    root: Any
    prompt: Callable[[Any], str]
    samples: int
    parse: Callable[[Any, list[str]], list]
    is_final: Callable[[Any], bool]
    checker: Callable[[Any], float] | None
    value_prompt: Callable[[Any], str]
    answer: Callable[[Any], str | None]
    accept: float
    stop: list[str]
    sample: bool
    chat: bool  # prompts are rendered chat text
    rule_finals: bool = False  # final states are valued by the checker even in model-value mode
    finish: bool = False  # no answer at the end of the search: prime the best state with "The answer is"


G24_PROPOSE = """Input: 2 8 8 14
Possible next steps:
2 + 8 = 10 (left: 8 10 14)
8 / 2 = 4 (left: 4 8 14)
14 + 2 = 16 (left: 8 8 16)
2 * 8 = 16 (left: 8 14 16)
8 - 2 = 6 (left: 6 8 14)
14 - 8 = 6 (left: 2 6 8)
14 / 2 = 7 (left: 7 8 8)
14 - 2 = 12 (left: 8 8 12)
Input: {numbers}
Possible next steps:
"""

G24_VALUE = """Can the numbers reach 24 with + - * /? Verdict: sure, likely or impossible.
Numbers: 4 6
Verdict: sure
Numbers: 1 3 3
Verdict: impossible
Numbers: 10 14
Verdict: sure
Numbers: 11 12
Verdict: impossible
Numbers: 5 7 8
Verdict: likely
Numbers: 4 4 10
Verdict: sure
Numbers: {numbers}
Verdict:"""

_G24_STEP = r"^\s*(\d+(?:\.\d+)?)\s*([-+*/×x÷])\s*(\d+(?:\.\d+)?)\s*="


@dataclass(frozen=True)
class G24State:
    numbers: tuple[Fraction, ...]
    exprs: tuple[str, ...]
    steps: tuple[str, ...] = ()

    def shown(self) -> str:
        return " ".join(fraction_text(n) for n in self.numbers)


def g24_children(state: G24State, texts: list[str], k: int) -> list[G24State]:
    """Valid "a op b = ..." lines -> states (result recomputed exactly; the model's own
    "= c" and "(left: ...)" are ignored); at most k, distinct remaining numbers."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b if b != 0 else None}
    children, seen = [], set()
    for text in texts:
        for line in text.splitlines():
            m = re.match(_G24_STEP, line)
            if not m:
                continue
            a_s, op, b_s = m.group(1), {"×": "*", "x": "*", "÷": "/"}.get(m.group(2), m.group(2)), m.group(3)
            shown = [fraction_text(n) for n in state.numbers]
            if a_s not in shown:
                continue
            i = shown.index(a_s)
            rest_shown = shown[:i] + [None] + shown[i + 1:]
            if b_s not in rest_shown:
                continue
            j = rest_shown.index(b_s)
            value = ops[op](state.numbers[i], state.numbers[j])
            if value is None:
                continue
            keep = [n for t, n in enumerate(state.numbers) if t not in (i, j)]
            kept_exprs = [e for t, e in enumerate(state.exprs) if t not in (i, j)]
            numbers = tuple(keep + [value])
            sig = tuple(sorted(numbers))
            if sig in seen:
                continue
            seen.add(sig)
            expr = f"({state.exprs[i]} {op} {state.exprs[j]})"
            step = f"{a_s} {op} {b_s} = {fraction_text(value)} (left: {' '.join(fraction_text(n) for n in numbers)})"
            children.append(G24State(numbers, tuple(kept_exprs + [expr]), state.steps + (step,)))
            if len(children) >= k:
                return children
    return children


def game24_space(example: Example, k: int) -> Space:
    numbers = tuple(Fraction(n) for n in example["numbers"])
    root = G24State(numbers, tuple(str(n) for n in example["numbers"]))
    solvable_cache: dict[tuple, bool] = {}

    def checker(s: G24State) -> float:
        if len(s.numbers) == 1:
            return float(s.numbers[0] == 24)
        sig = tuple(sorted(s.numbers))
        if sig not in solvable_cache:
            solvable_cache[sig] = solve24(list(sig)) is not None
        return float(solvable_cache[sig])

    def answer(s: G24State) -> str | None:
        if len(s.numbers) != 1:
            return None
        e = s.exprs[0]
        return e[1:-1] if e.startswith("(") and e.endswith(")") else e

    return Space(root=root, prompt=lambda s: G24_PROPOSE.format(numbers=s.shown()), samples=1,
                 parse=lambda s, texts: g24_children(s, texts, k), is_final=lambda s: len(s.numbers) == 1,
                 checker=checker, value_prompt=lambda s: G24_VALUE.format(numbers=s.shown()), answer=answer,
                 accept=1.0, stop=["\nInput:", "\n\n"], sample=False, chat=False,
                 rule_finals=True)


def steps_space(tokenizer, task: Task, example: Example, chat: bool, max_depth: int, k: int) -> Space:
    """Generic ToT over lines of reasoning: a state is the lines so far; a thought is the next
    line (sampled); a state is final once a line states the answer ("The answer is ...")."""
    prefix = build_prompt(tokenizer, task, example["prompt"], "cot", chat)

    def prompt(steps: tuple[str, ...]) -> str:
        return prefix + "".join(s + "\n" for s in steps)

    def parse(steps: tuple[str, ...], texts: list[str]) -> list[tuple[str, ...]]:
        out = []
        for t in texts:
            line = t.strip().splitlines()[0].strip() if t.strip() else ""
            if line and steps + (line,) not in out:
                out.append(steps + (line,))
        return out

    def is_final(steps: tuple[str, ...]) -> bool:
        return bool(steps) and (answer_phrase(steps[-1]) is not None or len(steps) >= max_depth)

    def value_prompt(steps: tuple[str, ...]) -> str:
        body = "\n".join(steps)
        return (f"Question: {example['prompt']}\nPartial solution:\n{body}\n"
                f"Is the partial solution correct so far (sure, likely or impossible)? Verdict:")

    checker = (lambda steps: task.tot_step_checker(list(steps))) if task.tot_step_checker else None
    return Space(root=(), prompt=prompt, samples=k, parse=parse, is_final=is_final, checker=checker,
                 value_prompt=value_prompt, answer=lambda steps: task.extract("\n".join(steps), example),
                 accept=0.75, stop=["\n"], sample=True, chat=chat, finish=True)


def make_space(tokenizer, task: Task, example: Example, cfg: ReasonConfig) -> Space:
    """Game-of-24 rows (with `numbers`) get the arithmetic state space; others the step space."""
    if "numbers" in example and task.verify is not None:
        return game24_space(example, cfg.k)
    return steps_space(tokenizer, task, example, use_chat(tokenizer, cfg), cfg.depth, cfg.k)


@STRATEGIES.register("tot")
def tree_of_thoughts(model, tokenizer, task: Task, examples: list[Example], cfg: ReasonConfig) -> list[Answer]:
    """Propose cfg.k thoughts per state, value states with the task checker or the model
    (cfg.value), search with BFS (beam; all questions in lockstep, batched) or DFS
    (threshold pruning, node budget; one question at a time)."""
    spaces = [make_space(tokenizer, task, ex, cfg) for ex in examples]
    if not spaces:
        return []
    mode = cfg.value
    if mode == "checker" and spaces[0].checker is None:
        raise ValueError(f"task {task.name!r} has no checker for partial states; use value=model or auto")
    if mode == "auto":
        mode = "checker" if spaces[0].checker is not None else "model"
    kind = spaces[0]  # every question of a task has the same kind of space
    costs = [Answer(None, "") for _ in examples]
    rounds = [0]

    def expand(items: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
        rounds[0] += 1
        prompts = [spaces[q].prompt(st) for q, st in items for _ in range(spaces[q].samples)]
        gens = run_generation(model, tokenizer, prompts, kind.chat, cfg, cfg.step_tokens, sample=kind.sample,
                              seed=cfg.seed + rounds[0], stop=kind.stop)
        out, pos = [], 0
        for q, st in items:
            mine, pos = gens[pos:pos + spaces[q].samples], pos + spaces[q].samples
            for g in mine:
                costs[q].charge(g)
            out.append([(q, c) for c in spaces[q].parse(st, [g.text for g in mine])])
        return out

    def score(items: list[tuple[int, Any]]) -> list[float]:
        values: list[float | None] = [None] * len(items)
        for i, (q, st) in enumerate(items):
            # checker mode; or Game-of-24 end states, where the game's rule decides, not the model
            if mode == "checker" or (spaces[q].rule_finals and spaces[q].is_final(st)):
                values[i] = spaces[q].checker(st)  # type: ignore[misc]
        open_ = [i for i, v in enumerate(values) if v is None]
        if open_:
            prompts = [spaces[items[i][0]].value_prompt(items[i][1]) for i in open_]
            for i, p, v in zip(open_, prompts, option_values(model, tokenizer, prompts, VERDICTS,
                                                             batch_size=cfg.batch_size)):
                values[i] = v
                cost = costs[items[i][0]]
                cost.tokens, cost.calls = cost.tokens + 1, cost.calls + 1
                cost.prompt_tokens += len(encode(tokenizer, p, False))
        return values  # type: ignore[return-value]

    def is_final(item: tuple[int, Any]) -> bool:
        return spaces[item[0]].is_final(item[1])

    roots = [(q, sp.root) for q, sp in enumerate(spaces)]
    if cfg.search == "bfs":
        found = bfs(roots, expand, score, is_final, cfg.beam, cfg.depth, accept=kind.accept)
    else:
        found = [dfs(root, expand, score, is_final, cfg.threshold, cfg.budget, cfg.depth, accept=kind.accept)
                 for root in roots]
    results = []
    for q, (sp, f) in enumerate(zip(spaces, found)):
        best = f.best[1] if f.best is not None else None
        steps = tuple(best.steps if isinstance(best, G24State) else (best or ()))
        res = Answer(sp.answer(best) if best is not None else None, "\n".join(steps),
                     detail={"final": f.final, "value": f.value, "expanded": f.expanded, "scored": f.scored,
                             "pruned": f.pruned, "value_mode": mode})
        res.charge(costs[q])
        results.append(res)
    # no answer at the end of the search: prime the best chain found with "The answer is" (one batch)
    todo = [q for q, r in enumerate(results) if r.answer is None and spaces[q].finish]
    if todo:
        prompts = [spaces[q].prompt(found[q].best[1] if found[q].best is not None else spaces[q].root) + ANSWER_PREFIX
                   for q in todo]
        done = run_generation(model, tokenizer, prompts, kind.chat, cfg, cfg.direct_tokens or task.direct_tokens,
                              stop=["\n"])
        for q, d in zip(todo, done):
            res = results[q]
            res.charge(d)
            res.text = (res.text + "\n" if res.text else "") + ANSWER_PREFIX + d.text
            res.answer = task.extract(ANSWER_PREFIX + d.text, examples[q])
    return results


# ---------------------------------------------------------------------------------
# router


def _probe(model, tokenizer, task, examples, cfg) -> list[tuple[Answer, float]]:
    """Cheap first look: (direct answer, confidence in [0, 1]) per question."""
    if cfg.probe == "logprob":
        out = direct(model, tokenizer, task, examples, cfg)
        return [(a, answer_confidence(tokenizer, a)) for a in out]
    chat = use_chat(tokenizer, cfg)
    prompts = [build_prompt(tokenizer, task, ex["prompt"], "direct", chat) for ex in examples]
    m = cfg.probe_samples
    samples = run_generation(model, tokenizer, [p for p in prompts for _ in range(m)], chat, cfg,
                             cfg.direct_tokens or task.direct_tokens, sample=True, seed=cfg.seed + 1, stop=["\n"])
    for s in samples:
        s.text = ANSWER_PREFIX + s.text
    out = []
    for q, ex in enumerate(examples):
        mine = samples[q * m:(q + 1) * m]
        answers = [task.extract(s.text, ex) for s in mine]
        winner, votes = majority_vote(answers, [mean_logprob(s) for s in mine], task.key)
        res = Answer(winner, mine[answers.index(winner)].text if winner is not None else mine[0].text,
                     detail={"votes": votes})
        for s in mine:
            res.charge(s)
        out.append((res, max(votes.values()) / m if votes else 0.0))
    return out


@STRATEGIES.register("router")
def router(model, tokenizer, task: Task, examples: list[Example], cfg: ReasonConfig) -> list[Answer]:
    """Escalate per question: direct if the probe is confident (or the task's verifier
    accepts it), else CoT if it agrees with the probe (or verifies), else the final rung
    (self-consistency, or ToT when the task has a verifier). Records the rung that answered."""
    final_rung = cfg.final if cfg.final != "auto" else ("tot" if task.verify is not None else "sc")
    results: list[Answer] = []
    probe = _probe(model, tokenizer, task, examples, cfg)
    for (p, conf), ex in zip(probe, examples):
        res = Answer(p.answer, p.text, rung="direct", detail={"confidence": round(conf, 4)})
        res.charge(p)
        results.append(res)

    def accepted(answer: str | None, ex: Example, fallback: bool) -> bool:
        if task.verify is not None:
            return task.verify(answer, ex)
        return answer is not None and fallback

    todo = [i for i, ((p, conf), ex) in enumerate(zip(probe, examples))
            if not accepted(p.answer, ex, conf >= cfg.confidence)]
    if todo:
        cot = chain_of_thought(model, tokenizer, task, [examples[i] for i in todo], cfg)
        still = []
        for i, c in zip(todo, cot):
            res = results[i]
            res.charge(c)
            agrees = c.answer is not None and res.answer is not None and task.key(c.answer) == task.key(res.answer)
            res.answer, res.text, res.rung = c.answer, c.text, "cot"
            if not accepted(c.answer, examples[i], agrees):
                still.append(i)
        todo = still
    if todo:
        run = tree_of_thoughts if final_rung == "tot" else self_consistency
        last = run(model, tokenizer, task, [examples[i] for i in todo], cfg)
        for i, r in zip(todo, last):
            res = results[i]
            res.charge(r)
            if r.answer is not None or res.answer is None:
                res.answer, res.text = r.answer, r.text
            res.rung = final_rung
    return results


def run_strategy(name: str, model, tokenizer, task: Task, examples: list[Example],
                 cfg: ReasonConfig | None = None) -> list[Answer]:
    """Run the registered strategy `name` (ValueError naming the choices when there is none)."""
    return STRATEGIES.get(name)(model, tokenizer, task, examples, cfg or ReasonConfig())
