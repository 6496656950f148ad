"""Environments for multi-turn tool-use RL: the model acts, the environment answers and scores.

One object per episode, with two methods (no base class; any object with them works):

    env.reset(record) -> str        the user turn that opens the episode (the record's question)
    env.step(action)  -> Step       Step(observation, reward, done)

`action` is a `ToolCall(name, arguments)` (the rollout parsed it from the model's turn) or an
`Answer(text)` (a turn without a tool call). A tool call gets an observation, reward 0 and
done=False; an unknown tool or bad arguments get an observation that says so (the model
reads its mistake; nothing raises). An answer ends the episode: reward 1.0 when it matches
the record's `answer` (data/answers.py: the same extraction and numbers-by-value comparison
the verifier reward uses, or SQuAD-style containment), else 0.0. `env.tools` are the
OpenAI-style JSON schemas of the functions it offers, `env.instructions` what the system
prompt tells the model, `env.example` one well-formed call to show it.

Kinds of environment sit in `ENVS`; a recipe's `env:` section names one (`name: python`) and
its settings. `build_env(section)` validates the section and returns a factory that makes a
fresh environment per episode (sharing what is expensive to load, like a knowledge base).

- `python`: one tool, `python(code)`, run in the code sandbox (eval/sandbox.py: its own
  process, uid and namespaces, wall-clock and memory limits); the observation is what the
  code printed (its last `max_observation_chars` bytes), then the error's last line or the
  timeout.
- `kb`: one tool, `search(query)`, over a knowledge base built by `posttrain kb build`
  (reason/knowledge.py); the observation is the top-k passages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

from pydantic import Field, ValidationError, field_validator

from posttrain.config import Strict, valid_regex
from posttrain.data.answers import answers_match, extract_answer
from posttrain.registry import Registry


TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"  # the call format (rl/tools.py parses it)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


def format_call(call: ToolCall) -> str:
    """A call written in the format the model is shown and the rollout parses."""
    return f"{TOOL_OPEN}{json.dumps({'name': call.name, 'arguments': call.arguments})}{TOOL_CLOSE}"


@dataclass
class Answer:
    text: str


Action = ToolCall | Answer


@dataclass
class Step:
    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # valid: the call named a known tool with good arguments


class Env(Protocol):
    tools: list[dict]
    instructions: str
    example: ToolCall
    demo: list[dict]  # a worked example as chat turns ([] for none)

    def reset(self, record: dict) -> str: ...

    def step(self, action: Action) -> Step: ...


# ----------------------------------------------------------------------------- configuration


class EnvConfig(Strict):
    """Settings every environment has; each kind adds its own."""

    name: str
    tool_call_reward: float = Field(0.0, ge=0, description="shaping: this times the episode's share of valid tool "
                                                           "calls joins its reward (0 when it made no call)")
    max_observation_chars: int = Field(800, gt=0, description="observations longer than this are cut")
    extract: str = Field("last_number", description="how the final answer is read: last_number, first_line or a "
                                                    "regex (match: answer)")
    match: Literal["answer", "contains"] = Field("answer", description="answer: the extracted answer equals the "
                                                                       "record's (numbers by value); contains: the "
                                                                       "reply contains the record's answer")
    workers: int = Field(4, gt=0, description="tool calls of one turn run this many at a time")
    demo: bool = Field(True, description="open each episode with one worked example (question, tool call, result, "
                                         "answer) before the question: small models copy it far more readily "
                                         "than they follow instructions")

    @field_validator("extract")
    @classmethod
    def _extract(cls, v: str) -> str:
        return v if v in ("last_number", "first_line") else valid_regex(v)


class PythonEnvConfig(EnvConfig):
    name: Literal["python"] = "python"
    timeout: float = Field(3.0, gt=0, description="seconds of wall clock per tool call")
    memory_mb: int = Field(512, gt=0, description="address-space limit of the sandboxed code")


class KBEnvConfig(EnvConfig):
    name: Literal["kb"] = "kb"
    index: str = Field(..., description="a knowledge base directory written by `posttrain kb build`")
    k: int = Field(3, gt=0, description="passages per search")
    method: Literal["bm25", "dense", "hybrid"] = "bm25"
    match: Literal["answer", "contains"] = "contains"


@dataclass(frozen=True)
class EnvType:
    config: type[EnvConfig]
    make: Callable[[Any], Callable[[], Env]]  # validated config -> a factory of fresh episodes


ENVS: Registry[EnvType] = Registry("environment")


def parse_env_config(section: dict | EnvConfig, source: str = "env") -> EnvConfig:
    """A recipe's env section -> its validated config, or ValueError naming each bad key."""
    if isinstance(section, EnvConfig):
        return section
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        raise ValueError(f"{source}.name: missing; choose one of {', '.join(ENVS)}")
    kind = ENVS.get(section["name"])
    try:
        return kind.config.model_validate(section)
    except ValidationError as exc:
        lines = [f"invalid {source}:"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"  {source}.{key}: {msg}")
        raise ValueError("\n".join(lines)) from None


def build_env(section: dict | EnvConfig) -> Callable[[], Env]:
    """A factory of fresh environments (one per episode) from a recipe's env section."""
    cfg = parse_env_config(section)
    return ENVS.get(cfg.name).make(cfg)


# ----------------------------------------------------------------------------- shared pieces


def function_schema(name: str, description: str, params: dict[str, str]) -> dict:
    """An OpenAI-style tool schema whose parameters are all required strings."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {p: {"type": "string", "description": d}
                                                         for p, d in params.items()},
                       "required": list(params)}}}


def check_arguments(schema: dict, arguments: dict[str, Any]) -> str | None:
    """What is wrong with a call's arguments for this tool schema (None: nothing). Checks the
    required names, unknown names and the JSON types string/number/integer/boolean."""
    params = schema["function"]["parameters"]
    props, name = params.get("properties", {}), schema["function"]["name"]
    missing = [p for p in params.get("required", []) if p not in arguments]
    if missing:
        return f"tool {name!r} needs the argument(s) {', '.join(missing)}"
    unknown = [p for p in arguments if p not in props]
    if unknown:
        return f"tool {name!r} has no argument(s) {', '.join(unknown)}; it takes {', '.join(props)}"
    kinds = {"string": str, "number": (int, float), "integer": int, "boolean": bool}
    for p, value in arguments.items():
        want = props[p].get("type")
        if want in kinds and (not isinstance(value, kinds[want]) or (want != "boolean" and isinstance(value, bool))):
            return f"tool {name!r}: argument {p!r} must be a {want}, got {type(value).__name__}"
    return None


def cut(text: str, limit: int) -> str:
    """At most `limit` characters, saying how many were cut."""
    return text if len(text) <= limit else text[:limit] + f"\n... [{len(text) - limit} characters cut]"


def answer_reward(text: str, reference: str, cfg: EnvConfig) -> float:
    if cfg.match == "contains":
        from posttrain.eval.metrics import contains_match

        return float(contains_match(text, reference))
    return float(answers_match(extract_answer(text, cfg.extract), reference))


class _ToolEnv:
    """The loop every tool environment shares: find the tool, check the arguments, run it;
    an answer is scored against the record. Subclasses give `tools` and `run(name, args)`."""

    tools: list[dict] = []
    instructions = ""
    example: ToolCall
    example_question = ""
    example_result = ""  # what the tool returns for the example call (fixed: the demo costs no tool run)
    example_answer = ""

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self.reference: str | None = None

    @property
    def demo(self) -> list[dict]:
        """The worked example: the question, the example call, what the tool returns, the answer."""
        if not self.cfg.demo:
            return []
        return [{"role": "user", "content": self.example_question},
                {"role": "assistant", "content": format_call(self.example)},
                {"role": "tool", "content": self.example_result},
                {"role": "assistant", "content": self.example_answer}]

    def reset(self, record: dict) -> str:
        answer, prompt = record.get("answer"), record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"env {self.cfg.name}: a record needs a string 'prompt', got {prompt!r}")
        if answer is None or isinstance(answer, (dict, list)):
            raise ValueError(f"env {self.cfg.name}: record {prompt[:60]!r} has no 'answer' to check the final "
                             "answer against")
        self.reference = str(answer).strip()
        return prompt

    def step(self, action: Action) -> Step:
        if self.reference is None:
            raise RuntimeError("env.step before env.reset")
        if isinstance(action, Answer):
            return Step("", answer_reward(action.text, self.reference, self.cfg), True)
        names = {t["function"]["name"]: t for t in self.tools}
        if action.name not in names:
            return Step(f"Error: unknown tool {action.name!r}; available: {', '.join(names)}", info={"valid": False})
        problem = check_arguments(names[action.name], action.arguments)
        if problem is not None:
            return Step(f"Error: {problem}", info={"valid": False})
        return Step(self.run(action.name, action.arguments), info={"valid": True})

    def run(self, name: str, arguments: dict) -> str:
        """The tool's answer as text, within cfg.max_observation_chars."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- python


class PythonEnv(_ToolEnv):
    tools = [function_schema("python", "Run Python 3 code in a fresh interpreter and return what it prints. "
                                       "Use print() to see a value.", {"code": "Python source code"})]
    instructions = "Use the python tool to compute exactly, then give the final answer as a number."
    example = ToolCall("python", {"code": "print(123 * 45 + 67)"})
    example_question = "What is 123 * 45 + 67?"
    example_result = "5602"
    example_answer = "The answer is 5602."

    def run(self, name: str, arguments: dict) -> str:
        from posttrain.eval.sandbox import SandboxLimits, run_python

        cfg = self.cfg
        # the last max_observation_chars bytes of what it printed (the sandbox marks what it cut)
        limits = SandboxLimits(timeout=cfg.timeout, memory_mb=cfg.memory_mb, output_bytes=cfg.max_observation_chars)
        result = run_python(arguments["code"], limits)  # RuntimeError: the sandbox itself broke; not the model's
        out = result.stdout.rstrip()
        if result.status == "passed":
            return out or "(no output; print() the value you need)"
        if result.status == "timeout":
            why = f"Error: timed out after {cfg.timeout:g} s"
        else:
            why = f"Error: {result.reason}"
        return f"{out}\n{why}" if out else why


def _python_factory(cfg: PythonEnvConfig) -> Callable[[], Env]:
    return lambda: PythonEnv(cfg)


ENVS.register("python", EnvType(PythonEnvConfig, _python_factory))


# ----------------------------------------------------------------------------- kb (retrieval)


class KBEnv(_ToolEnv):
    tools = [function_schema("search", "Search the knowledge base; returns the most relevant passages.",
                             {"query": "what to look for"})]
    instructions = "Search the knowledge base for the facts you need, then give a short final answer."
    example = ToolCall("search", {"query": "who founded Brightwater"})
    example_question = "Who founded the town of Brightwater?"  # invented: the demo shows the form, not a fact
    example_result = "[1] Brightwater: The town of Brightwater was founded by Mira Hale in 1821."
    example_answer = "Mira Hale"

    def __init__(self, cfg: KBEnvConfig, kb):
        super().__init__(cfg)
        self.kb = kb

    def run(self, name: str, arguments: dict) -> str:
        from posttrain.reason.knowledge import search

        hits = search(self.kb, arguments["query"], self.cfg.k, self.cfg.method)
        if not hits:
            return "No passage matches the query."
        passages = [f"[{h.rank}] " + (f"{h.chunk.title}: " if h.chunk.title else "") + h.chunk.text for h in hits]
        return cut("\n".join(passages), self.cfg.max_observation_chars)


def _kb_factory(cfg: KBEnvConfig) -> Callable[[], Env]:
    from posttrain.reason.knowledge import load_index

    if not (Path(cfg.index) / "kb.json").is_file():
        raise FileNotFoundError(f"env.index: {cfg.index} is not a knowledge base (no kb.json); "
                                "build one with `posttrain kb build DOCS --out DIR`")
    kb = load_index(cfg.index)  # loaded once, shared by every episode (searches only read it)
    return lambda: KBEnv(cfg, kb)


ENVS.register("kb", EnvType(KBEnvConfig, _kb_factory))
