"""Records -> token ids with loss labels.

An *example* is ``{"input_ids": list[int], "labels": list[int]}`` plus ``"task"``
when the record has one. Labels are NOT shifted: ``labels[t] == input_ids[t]``
where token t carries loss, else -100; the objective shifts them (logits at t-1
predict token t).

Chat records are rendered with the tokenizer's own chat template, and the loss
covers each assistant turn's content and its end-of-turn token (``<|im_end|>``),
never the system/user turns nor the ``<|im_start|>assistant\\n`` header. The
assistant spans are found without knowing the template: the rendering of
``messages[:i]`` with the generation prompt ends where turn i's content starts,
and the rendering of ``messages[:i+1]`` (less trailing whitespace) ends where the
turn ends. Characters map to tokens through the fast tokenizer's offsets.

Truncation keeps the first ``max_length`` tokens. An example left without any
loss token after position 0 (nothing predicts token 0) returns **None**; callers
count those as dropped.
"""

from __future__ import annotations

import random
from typing import Any

IGNORE = -100  # label of positions that carry no loss


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used to mask assistant turns."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the [start, end) character span of each assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"{type(tokenizer).__name__} has no chat template; chat records need one")
    full = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError("the conversation starts with an assistant turn; chat templates cannot "
                                "render the empty prefix that locates it (start with a system or user turn)")
        before = _render(tokenizer, messages[:i], True)  # ends where turn i's content starts
        through = _render(tokenizer, messages[: i + 1], False).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise TemplateError(
                f"the chat template does not render a conversation as a prefix of its continuation "
                f"(assistant turn {i}): earlier turns change when later ones are added, so assistant "
                f"turns cannot be located; use a template without that behaviour")
        spans.append((len(before), len(through)))
    return full, spans


def _finish(ids: list[int], labels: list[int], max_length: int | None) -> dict | None:
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels[1:]):  # token 0 is never predicted: no loss there
        return None
    return {"input_ids": ids, "labels": labels}


def encode_chat(tokenizer, messages: list[dict], max_length: int | None = None) -> dict | None:
    """Tokenize a conversation; loss on every assistant turn and its end-of-turn token."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("encode_chat needs a fast tokenizer (it maps characters to tokens with offsets)")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    span = 0
    for t, (start, _end) in enumerate(offsets):  # offsets and spans are both ascending
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span < len(spans) and start >= spans[span][0]:
            labels[t] = ids[t]
    return _finish(ids, labels, max_length)


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise TemplateError(f"{type(tokenizer).__name__} has no eos token; completion/text examples end with one")
    return tokenizer.eos_token_id


def encode_completion(tokenizer, prompt: str, completion: str, max_length: int | None = None) -> dict | None:
    """Prompt then completion + EOS; loss on the completion and EOS only.

    The two parts are tokenized separately, so the prompt's tokens are exactly what
    generation from that prompt would see.
    """
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [_eos(tokenizer)]
    return _finish(p + c, [IGNORE] * len(p) + c, max_length)


def encode_text(tokenizer, text: str, max_length: int | None = None) -> dict | None:
    """Plain text + EOS, loss on every token (domain pre-training, perplexity)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [_eos(tokenizer)]
    return _finish(ids, list(ids), max_length)


def encode_record(tokenizer, record: dict[str, Any], kind: str, max_length: int | None = None) -> dict | None:
    """Encode one validated record of a trainable kind (chat, completion, text, preference, unpaired);
    copies ``task``."""
    if kind == "preference":  # a pair example, not a single sequence
        return encode_preference(tokenizer, record, max_length)
    if kind == "unpaired":  # one sequence with its label (no KL row: that needs the other examples)
        examples = encode_unpaired(tokenizer, record, max_length)
        return examples[0] if examples else None
    if kind == "chat":
        example = encode_chat(tokenizer, record["messages"], max_length)
    elif kind == "completion":
        example = encode_completion(tokenizer, record["prompt"], record["completion"], max_length)
    elif kind == "text":
        example = encode_text(tokenizer, record["text"], max_length)
    else:
        raise ValueError(f"kind {kind!r} has no single-sequence encoding (use chat, completion or text)")
    if example is not None and "task" in record:
        example["task"] = record["task"]
    return example


GREEN, RESET = "\x1b[32m", "\x1b[0m"


def loss_spans(tokenizer, example: dict) -> list[tuple[str, bool]]:
    """The example's text as (text, carries loss) runs: consecutive tokens of equal loss state
    decoded together (`posttrain data inspect` and the web studio's data page show these)."""
    ids, labels = example["input_ids"], example["labels"]
    spans, t = [], 0
    while t < len(ids):
        loss = labels[t] != IGNORE
        end = t
        while end < len(ids) and (labels[end] != IGNORE) == loss:
            end += 1
        spans.append((tokenizer.decode(ids[t:end], skip_special_tokens=False), loss))
        t = end
    return spans


def render_loss_mask(tokenizer, example: dict, color: bool = False) -> str:
    """The example's text with loss-carrying tokens marked: ``[[...]]``, or green with ``color``."""
    return "".join((f"{GREEN}{text}{RESET}" if color else f"[[{text}]]") if loss else text
                   for text, loss in loss_spans(tokenizer, example))


# ----------------------------------------------------------------------------- preference pairs

def _preference_messages(record: dict[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) as message lists; the prompt ends with a user turn.

    Strings become one user / one assistant turn. Without a prompt, chosen and rejected are
    whole conversations and the prompt is their shared leading messages.
    """
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError("fields 'chosen' and 'rejected' must both be strings or both be message lists")
    if isinstance(chosen, str):
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    if prompt is None:
        if isinstance(record["chosen"], str):
            raise ValueError("field 'prompt' is missing (needed when chosen/rejected are strings)")
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        where = "the messages chosen and rejected share"
    else:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        where = "field 'prompt'"
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError(f"{where} must end with a user turn (the completion is the assistant's reply)")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion or completion[0]["role"] != "assistant":
            raise ValueError(f"field '{name}': the completion must start with an assistant turn after the prompt")
    return prompt, chosen, rejected


def _encode_completion_turns(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """ids and labels of prompt + completion, loss on the completion's assistant turns only.

    Same span rule as encode_chat (content + end-of-turn token), but assistant turns inside
    the prompt carry no loss: they are context, not the answer being compared.
    """
    messages = prompt + completion
    text, spans = assistant_spans(tokenizer, messages)
    in_prompt = sum(m["role"] == "assistant" for m in prompt)
    spans = spans[in_prompt:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    span = 0
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span < len(spans) and start >= spans[span][0]:
            labels[t] = ids[t]
    return ids, labels


def encode_preference(tokenizer, record: dict[str, Any], max_length: int | None = None) -> dict | None:
    """A preference record -> the pair example (chosen_/rejected_ input_ids and labels).

    Both sides are rendered with the chat template as prompt + completion; labels cover the
    completion's assistant turns with their end-of-turn token, -100 on the prompt. Carries
    ``margin`` and ``aspect``. With ``max_length``, a completion is cut to fit; a prompt that
    leaves no room for a completion token returns None (the caller counts it as dropped).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("encode_preference needs a fast tokenizer (it maps characters to tokens with offsets)")
    prompt, chosen, rejected = _preference_messages(record)
    example: dict[str, Any] = {}
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = _encode_completion_turns(tokenizer, prompt, completion)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            return None
        example[f"{name}_input_ids"], example[f"{name}_labels"] = ids, labels
    margin, aspect = record.get("margin"), record.get("aspect")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"field 'margin' must be a number; got {margin!r}")
        example["margin"] = float(margin)
    if aspect is not None:
        if isinstance(aspect, bool) or not isinstance(aspect, int) or aspect < 0:
            raise ValueError(f"field 'aspect' must be a reward-head index (int >= 0); got {aspect!r} "
                             "(map aspect names to indices before encoding)")
        example["aspect"] = aspect
    return example


# ----------------------------------------------------------------------------- unpaired (KTO)

def _unpaired_messages(record: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(prompt, completion) as message lists; the prompt ends with a user turn."""
    prompt, completion = record["prompt"], record["completion"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("field 'prompt' must end with a user turn (the completion is the assistant's reply)")
    if not completion or completion[0]["role"] != "assistant":
        raise ValueError("field 'completion' must start with an assistant turn after the prompt")
    return prompt, completion


def encode_unpaired(tokenizer, record: dict[str, Any], max_length: int | None = None) -> list[dict]:
    """An unpaired record (prompt, completion, label) -> one example; a preference record -> two
    (chosen desirable, rejected undesirable), so pair data also feeds KTO.

    Example: input_ids/labels as encode_preference's sides (loss on the completion's assistant
    turns) and `desirable` (bool). A completion cut away by `max_length` is dropped (the list
    is shorter). Add the KL rows with `add_kl_completions` once the examples are split.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("encode_unpaired needs a fast tokenizer (it maps characters to tokens with offsets)")
    if "chosen" in record:
        prompt, chosen, rejected = _preference_messages(record)
        sides = [(chosen, True), (rejected, False)]
    else:
        prompt, completion = _unpaired_messages(record)
        sides = [(completion, record["label"])]
    out = []
    for completion, desirable in sides:
        ids, labels = _encode_completion_turns(tokenizer, prompt, completion)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            continue
        out.append({"input_ids": ids, "labels": labels, "desirable": bool(desirable)})
    return out


def add_kl_completions(examples: list[dict], seed: int = 0, max_length: int | None = None) -> list[dict]:
    """Give each unpaired example a KL row: its prompt with another example's completion.

    KTO estimates KL(policy || reference) from mismatched (prompt_i, completion_j) pairs, as
    TRL does by rotating completions by one; here the rotation runs over a seeded permutation
    of all the examples, skipping a neighbour with the same prompt (a pair file gives two
    completions per prompt). Token-level splice, as TRL: prompt_i's ids + completion_j's ids.
    Fixed before training, so reference log-probs of the KL rows can be precomputed. In place.
    """
    def split(e: dict) -> int:  # index of the first completion token
        return next(i for i, t in enumerate(e["labels"]) if t != IGNORE)

    if len(examples) < 2:
        raise ValueError("KTO's KL estimate needs at least two examples (it mismatches prompts and completions)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cut = [split(e) for e in examples]
    prompts = [tuple(e["input_ids"][:c]) for e, c in zip(examples, cut)]
    for k, i in enumerate(order):
        for back in range(1, len(order)):
            j = order[k - back]
            if prompts[j] != prompts[i]:
                break
        else:
            raise ValueError("KTO's KL estimate needs at least two different prompts")
        ids = list(prompts[i]) + examples[j]["input_ids"][cut[j]:]
        labels = [IGNORE] * cut[i] + examples[j]["labels"][cut[j]:]
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        examples[i]["kl_input_ids"], examples[i]["kl_labels"] = ids, labels
    return examples
