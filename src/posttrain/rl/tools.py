"""Multi-turn tool-use rollouts: the model writes, a tool call is parsed and run, the observation
joins the conversation as a tool turn, up to `max_turns` model turns.

The tool-call format (the Hermes / Qwen2.5 / Qwen3 convention, so models trained with it
already speak it):

    <tool_call>{"name": "python", "arguments": {"code": "print(12 * 34)"}}</tool_call>

`arguments` may also be spelled `parameters`, or be a JSON string holding the object (as
OpenAI's API sends it). Generation stops at `</tool_call>`, so the model never writes the
tool's answer itself; only the first call of a turn runs. A turn without `<tool_call>` is the
final answer. A turn that opens `<tool_call>` but does not hold a well-formed call is an
attempted, invalid call: the observation says what was wrong and the episode goes on.

Prompts: a chat template that takes `tools` (Qwen-style; the template lists them in its own
words) gets the environment's schemas through `apply_chat_template(..., tools=...)`. One that
does not (SmolLM2's plain ChatML) gets a system turn we write: the environment's
instructions, each tool's signature, the format and one example call. Observations are
rendered by the template too, as a message with role "tool" (ChatML: `<|im_start|>tool`;
Qwen: a user turn holding `<tool_response>`), followed by the template's generation prompt.

Tokens are kept, never re-tokenised: an episode is the prompt's ids, then the sampled ids of
each model turn (loss mask 1) and the ids of each observation turn (loss mask 0: the
template's turn markers around the tool's text, and the end-of-turn token when generation
stopped at `</tool_call>` rather than on its own EOS). Training packs exactly these ids, so the
policy is scored on the context it sampled in, and observation tokens get no label, no
log-prob, no ratio and no KL term (`rl/controller.py packed_sequences`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from posttrain.rl.envs import TOOL_CLOSE, TOOL_OPEN, Answer, Env, Step, ToolCall, check_arguments, format_call
_MARK = "\x00POSTTRAIN_MARK\x00"


# ----------------------------------------------------------------------------- parsing


@dataclass
class ParsedTurn:
    """kind: answer (no tool call), call (a well-formed call), invalid (an attempted call that
    does not parse; `error` says why)."""

    kind: Literal["answer", "call", "invalid"]
    call: ToolCall | None = None
    error: str = ""


def parse_turn(text: str) -> ParsedTurn:
    """Read one model turn: a final answer, a tool call, or a malformed attempt."""
    start = text.find(TOOL_OPEN)
    if start < 0:
        return ParsedTurn("answer")
    body_start = start + len(TOOL_OPEN)
    end = text.find(TOOL_CLOSE, body_start)
    if end < 0:
        return ParsedTurn("invalid", error=f"the tool call has no closing {TOOL_CLOSE}")
    body = text[body_start:end].strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return ParsedTurn("invalid", error=f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})")
    if not isinstance(obj, dict):
        return ParsedTurn("invalid", error=f"the tool call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParsedTurn("invalid", error='the tool call needs a "name" (a string)')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # OpenAI style: the arguments object as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            return ParsedTurn("invalid", error=f'"arguments" is a string that is not valid JSON ({exc.msg})')
    if not isinstance(args, dict):
        return ParsedTurn("invalid", error=f'"arguments" must be a JSON object, got {type(args).__name__}')
    extra = sorted(set(obj) - {"name", "arguments", "parameters"})
    if extra:
        return ParsedTurn("invalid", error=f"the tool call has unknown field(s) {', '.join(extra)}; "
                                           'write {"name": ..., "arguments": {...}}')
    return ParsedTurn("call", ToolCall(name, args))


# ----------------------------------------------------------------------------- prompts and turns


def template_has_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` list (Qwen, Hermes, Llama 3.1 ...); SmolLM2's does not."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(template.values())
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def system_prompt(env: Env) -> str:
    """Our system turn for templates without tool support: instructions, tools, format, example."""
    lines = [env.instructions, "", "You can call these tools:"]
    for tool in env.tools:
        f = tool["function"]
        params = ", ".join(f"{p}: {s.get('type', 'any')}" for p, s in f["parameters"].get("properties", {}).items())
        lines.append(f"- {f['name']}({params}): {f['description']}")
    lines += ["", f"To call a tool, write {TOOL_OPEN}{{\"name\": ..., \"arguments\": {{...}}}}{TOOL_CLOSE} and stop; "
                  "the result comes back in a tool message. When you know the answer, write it without a tool call.",
              f"Example: {format_call(env.example)}"]
    return "\n".join(lines)


def prompt_ids(tokenizer, env: Env, user: str | list[dict]) -> list[int]:
    """The episode's opening: system (tools), the environment's worked example if it has one,
    the user's question, the assistant prompt."""
    messages = [{"role": "user", "content": user}] if isinstance(user, str) else list(user)
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    messages = [*getattr(env, "demo", []), *messages]
    if template_has_tools(tokenizer):
        system = env.instructions if system is None else system
        return _encode(tokenizer, [{"role": "system", "content": system}, *messages], tools=env.tools)
    system = system_prompt(env) if system is None else system + "\n\n" + system_prompt(env)
    return _encode(tokenizer, [{"role": "system", "content": system}, *messages])


def _encode(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class TurnFormat:
    """How the chat template closes an assistant turn and frames a tool turn, as text:
    `close` follows the assistant's content (e.g. "<|im_end|>\\n"); a tool turn is
    `tool_prefix + observation + tool_suffix`, the suffix ending in the generation prompt."""

    close: str
    tool_prefix: str
    tool_suffix: str

    @staticmethod
    def of(tokenizer) -> TurnFormat:
        """Read the three pieces off the template by rendering a conversation with marked contents."""
        convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}]
        base = tokenizer.apply_chat_template(convo, tokenize=False)
        full = tokenizer.apply_chat_template(convo + [{"role": "tool", "content": _MARK}], add_generation_prompt=True,
                                             tokenize=False)
        if not full.startswith(base) or base.count(_MARK) != 1 or full.count(_MARK) != 2:
            raise ValueError("the chat template renders a conversation differently once a tool turn follows; "
                             "multi-turn tool rollouts need a template that appends turns")
        close = base[base.index(_MARK) + len(_MARK):]
        prefix, suffix = full[len(base):].split(_MARK)
        return TurnFormat(close, prefix, suffix)


def observation_ids(tokenizer, fmt: TurnFormat, observation: str, ended_with: str | None) -> list[int]:
    """The ids between one model turn and the next: the rest of the assistant's closing (all of it
    when the turn stopped at </tool_call>; what follows the EOS when the model wrote it), the tool
    turn, and the generation prompt. `ended_with`: the text of the turn's last token if it was EOS."""
    close = fmt.close
    if ended_with is not None and close.startswith(ended_with):
        close = close[len(ended_with):]
    text = close + fmt.tool_prefix + observation + fmt.tool_suffix
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One conversation: `tokens` are everything after the prompt (model turns and observations),
    `loss_mask` 1 exactly on the model's tokens, `logprobs` the sampler's log-prob of each of them."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    answer: str | None = None  # the final answer turn (None when the episode ended without one)
    env_reward: float = 0.0
    attempted: int = 0  # turns that opened a tool call
    valid: int = 0  # of those, calls that parsed, named a known tool and had good arguments
    done: bool = False

    @property
    def model_tokens(self) -> list[int]:
        return [t for t, m in zip(self.tokens, self.loss_mask) if m]

    def shaping(self, tool_call_reward: float) -> float:
        return tool_call_reward * self.valid / self.attempted if self.attempted else 0.0

    def add(self, ids: Sequence[int], trained: bool, logprobs: Sequence[float] = ()) -> None:
        self.tokens += list(ids)
        self.loss_mask += [int(trained)] * len(ids)
        if trained:
            if len(logprobs) != len(ids):
                raise ValueError(f"{len(ids)} sampled tokens but {len(logprobs)} log-probs")
            self.logprobs += list(logprobs)


def run_episodes(model, tokenizer, records: Sequence[dict], make_env: Callable[[], Env], gen, max_turns: int,
                 workers: int = 4) -> list[Episode]:
    """One episode per record, all advancing together: each turn is one batched generation over
    the episodes still going, then their tool calls run (`workers` at a time) and observations
    are appended. `gen` is the GenerationConfig of every turn (max_new_tokens is per turn; its
    seed, when set, is varied per turn); stop strings get `</tool_call>` added."""
    from posttrain.generate.decoding import eos_ids
    from posttrain.generate.engine import generate

    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    fmt = TurnFormat.of(tokenizer)
    stops = eos_ids(model, tokenizer)
    envs = [make_env() for _ in records]
    episodes = [Episode(prompt_ids(tokenizer, env, env.reset(r))) for env, r in zip(envs, records)]
    live = list(range(len(episodes)))
    for turn in range(max_turns):
        if not live:
            break
        cfg = dataclasses.replace(gen, stop=[*gen.stop, TOOL_CLOSE],
                                  seed=None if gen.seed is None else gen.seed + 7919 * turn)
        out = generate(model, tokenizer, [episodes[i].prompt_ids + episodes[i].tokens for i in live], cfg)
        calls: list[tuple[int, ParsedTurn, str | None]] = []
        for row, i in enumerate(live):
            ep, ids = episodes[i], out.token_ids[row]
            ep.add(ids, True, out.logprobs[row])
            text = tokenizer.decode(ids, skip_special_tokens=True)
            parsed = parse_turn(text)
            ended = tokenizer.decode(ids[-1:]) if ids and ids[-1] in stops else None
            ep.turns.append({"text": text, "kind": parsed.kind, **({"error": parsed.error} if parsed.error else {})})
            if parsed.kind == "answer":
                step = envs[i].step(Answer(text))
                ep.answer, ep.env_reward, ep.done = text, float(step.reward), True
                continue
            ep.attempted += 1
            calls.append((i, parsed, ended))
        last = turn + 1 == max_turns

        def act(item: tuple[int, ParsedTurn, str | None]) -> Step:
            i, parsed, _ = item
            if parsed.kind == "invalid":
                return Step(f"Error: {parsed.error}. Write {TOOL_OPEN}{{\"name\": ..., \"arguments\": {{...}}}}"
                            f"{TOOL_CLOSE}.", info={"valid": False})
            return envs[i].step(parsed.call)

        if calls and not last:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(calls)))) as pool:
                steps = list(pool.map(act, calls))
        else:  # the last turn: its calls are counted (and judged) but no observation follows
            steps = [Step("", info={"valid": p.kind == "call" and _known(envs[i], p.call)}) for i, p, _ in calls]
        live = []
        for (i, parsed, ended), step in zip(calls, steps):
            ep = episodes[i]
            ep.valid += int(bool(step.info.get("valid")))
            ep.turns[-1]["observation"] = step.observation
            if step.done:  # the environment ended the episode on a tool call
                ep.env_reward, ep.done = float(step.reward), True
            elif not last:
                ep.add(observation_ids(tokenizer, fmt, step.observation, ended), False)
                live.append(i)
    return episodes


def _known(env: Env, call: ToolCall) -> bool:
    """A last-turn call's validity without running it: a known tool with good arguments."""
    schema = next((t for t in env.tools if t["function"]["name"] == call.name), None)
    return schema is not None and check_arguments(schema, call.arguments) is None


def episode_metrics(episodes: Sequence[Episode], tool_call_reward: float = 0.0) -> dict[str, float | None]:
    """Per-step tool figures: tools/valid_rate (valid calls / attempted calls; None when no turn
    attempted one), tools/calls (attempted per episode), tools/turns (model turns per episode),
    tools/answered (share ending with a final answer), reward/env (answer correctness)."""
    n = max(len(episodes), 1)
    attempted = sum(e.attempted for e in episodes)
    return {"tools/valid_rate": sum(e.valid for e in episodes) / attempted if attempted else None,
            "tools/calls": attempted / n,
            "tools/turns": sum(len(e.turns) for e in episodes) / n,
            "tools/answered": sum(any(t["kind"] == "answer" for t in e.turns) for e in episodes) / n,
            "reward/env": sum(e.env_reward for e in episodes) / n,
            "reward/tool_shaping": sum(e.shaping(tool_call_reward) for e in episodes) / n}


def transcript(tokenizer, episode: Episode) -> str:
    """The episode after the prompt as text, special tokens kept (for logs and inspection)."""
    return tokenizer.decode(episode.tokens, skip_special_tokens=False)


def evaluate_tool_use(model, tokenizer, records: Sequence[dict], env: dict, max_turns: int, max_new_tokens: int,
                      batch_size: int = 32, examples: int = 5) -> dict[str, Any]:
    """Greedy episodes on held-out records: accuracy (final answer correct), the tool figures of
    `episode_metrics`, accuracy per record `kind` when records carry one, and a few transcripts."""
    from posttrain.generate.engine import GenerationConfig
    from posttrain.rl.envs import build_env, parse_env_config

    cfg = parse_env_config(env)
    make_env = build_env(cfg)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    episodes: list[Episode] = []
    for start in range(0, len(records), batch_size):
        episodes += run_episodes(model, tokenizer, records[start:start + batch_size], make_env, gen, max_turns,
                                 cfg.workers)
    out: dict[str, Any] = {"n": len(episodes), "accuracy": sum(e.env_reward for e in episodes) / max(len(episodes), 1),
                           **{k.removeprefix("tools/"): v for k, v in episode_metrics(episodes).items()
                              if k.startswith("tools/")}}
    kinds = sorted({r["kind"] for r in records if isinstance(r.get("kind"), str)})
    if kinds:
        out["accuracy_by_kind"] = {k: sum(e.env_reward for e, r in zip(episodes, records) if r.get("kind") == k)
                                   / sum(r.get("kind") == k for r in records) for k in kinds}
    out["examples"] = [{"prompt": r["prompt"], "answer": r["answer"], "reward": e.env_reward,
                        "transcript": transcript(tokenizer, e)} for r, e in list(zip(records, episodes))[:examples]]
    return out
