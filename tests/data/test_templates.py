"""Loss masks: exactly the assistant turns (and their end-of-turn token) carry loss."""

from __future__ import annotations

import copy

import pytest

from posttrain.data.templates import (
    IGNORE,
    TemplateError,
    add_kl_completions,
    encode_chat,
    encode_completion,
    encode_preference,
    encode_record,
    encode_text,
    encode_unpaired,
    render_loss_mask,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_multi_turn_chat_loss_positions_token_by_token(tokenizer):
    example = encode_chat(tokenizer, CHAT)
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    loss = [tok for tok, label in zip(tokens, labels) if label != IGNORE]
    # Both assistant turns' content and each one's <|im_end|>; nothing else.
    assert loss == (tokenizer.tokenize("Hello there!") + ["<|im_end|>"]
                    + tokenizer.tokenize("4") + ["<|im_end|>"])
    # Labels are the ids themselves (unshifted) where loss is taken.
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    # Token-level layout: each loss run starts right after the "<|im_start|>assistant\n" header.
    runs, t = [], 0
    while t < len(labels):
        if labels[t] != IGNORE:
            start = t
            while t < len(labels) and labels[t] != IGNORE:
                t += 1
            runs.append((start, t))
        t += 1
    assert len(runs) == 2
    for start, end in runs:
        assert tokens[start - 4:start] == ["<|im_start|>", "ass", "istant", "Ċ"]
        assert tokens[end - 1] == "<|im_end|>" and labels[end] == IGNORE and tokens[end] == "Ċ"
    assert sum(label != IGNORE for label in labels) == len(loss)


def test_chat_default_system_prompt_gets_no_loss(tokenizer):
    # SmolLM's template injects a system prompt when none is given.
    example = encode_chat(tokenizer, CHAT[1:3])
    loss = [tok for tok, label in zip(tokenizer.convert_ids_to_tokens(example["input_ids"]), example["labels"])
            if label != IGNORE]
    assert loss == tokenizer.tokenize("Hello there!") + ["<|im_end|>"]
    assert "SmolLM" in tokenizer.decode(example["input_ids"])


def test_truncation_keeps_the_left_and_drops_examples_without_loss(tokenizer):
    full = encode_chat(tokenizer, CHAT)
    cut = next(t for t, label in enumerate(full["labels"]) if label != IGNORE) + 1  # one loss token
    short = encode_chat(tokenizer, CHAT, max_length=cut)
    assert short["input_ids"] == full["input_ids"][:cut] and short["labels"] == full["labels"][:cut]
    assert encode_chat(tokenizer, CHAT, max_length=cut - 1) is None


def test_completion_and_text(tokenizer):
    eos = tokenizer.eos_token_id
    ex = encode_completion(tokenizer, "Q: 1+1?\nA:", " 2")
    prompt = tokenizer("Q: 1+1?\nA:")["input_ids"]
    assert ex["input_ids"] == prompt + tokenizer(" 2")["input_ids"] + [eos]
    assert ex["labels"] == [IGNORE] * len(prompt) + tokenizer(" 2")["input_ids"] + [eos]
    text = encode_text(tokenizer, "Some domain text.")
    assert text["input_ids"][-1] == eos and text["labels"] == text["input_ids"]
    assert encode_completion(tokenizer, "Q: 1+1?\nA:", " 2", max_length=len(prompt)) is None
    assert encode_text(tokenizer, "Some domain text.", max_length=1) is None  # token 0 is never predicted
    assert encode_text(tokenizer, "Some domain text.", max_length=2)["labels"] == text["input_ids"][:2]


def test_encode_record_dispatches_and_copies_task(tokenizer):
    ex = encode_record(tokenizer, {"messages": CHAT, "task": "math"}, "chat")
    assert ex["task"] == "math" and ex["input_ids"] == encode_chat(tokenizer, CHAT)["input_ids"]
    assert "task" not in encode_record(tokenizer, {"text": "x"}, "text")
    assert encode_record(tokenizer, {"prompt": "a", "completion": "b"}, "completion")["labels"][-1] == \
        tokenizer.eos_token_id
    pair = {"prompt": "a", "chosen": "b", "rejected": "c"}
    assert encode_record(tokenizer, pair, "preference") == encode_preference(tokenizer, pair)
    with pytest.raises(ValueError, match="single-sequence"):
        encode_record(tokenizer, {"prompt": "a"}, "prompt")


def test_template_that_rewrites_history_is_rejected(tokenizer):
    # Like reasoning templates that drop earlier assistant turns' thoughts: the
    # rendering of a longer conversation no longer starts with the shorter one.
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<a>{{ m.content[:1] }}</a>"
        "{% else %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(TemplateError, match="prefix"):
        encode_chat(odd, CHAT)
    with pytest.raises(TemplateError, match="starts with an assistant"):
        encode_chat(tokenizer, CHAT[2:])


def test_render_loss_mask(tokenizer):
    ex = encode_chat(tokenizer, CHAT)
    plain = render_loss_mask(tokenizer, ex)
    assert "[[Hello there!<|im_end|>]]" in plain and "[[4<|im_end|>]]" in plain
    assert plain.count("[[") == 2 and "[[" not in plain.split("assistant")[0]
    colored = render_loss_mask(tokenizer, ex, color=True)
    assert "\x1b[32mHello there!<|im_end|>\x1b[0m" in colored and "[[" not in colored


# ----------------------------------------------------------------------------- preference pairs

def _loss_tokens(tokenizer, ids, labels):
    return [tok for tok, label in zip(tokenizer.convert_ids_to_tokens(ids), labels) if label != IGNORE]


def test_preference_strings_mask_the_prompt_and_label_the_reply(tokenizer):
    ex = encode_preference(tokenizer, {"prompt": "What is 2+2?", "chosen": "4", "rejected": "Five, I think."})
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=True,
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    for side, reply in (("chosen", "4"), ("rejected", "Five, I think.")):
        ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
        full = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": reply}]
        assert ids == tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
        # the completion is exactly the reply's tokens and the end-of-turn token, labelled with themselves
        assert _loss_tokens(tokenizer, ids, labels) == tokenizer.tokenize(reply) + ["<|im_end|>"]
        assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    assert set(ex) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}


def test_preference_message_forms_agree_and_prompt_assistant_turns_get_no_loss(tokenizer):
    prompt = CHAT[:4]  # system, user, assistant ("Hello there!"), user
    explicit = encode_preference(tokenizer, {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                                             "rejected": [{"role": "assistant", "content": "22"}]})
    implicit = encode_preference(tokenizer, {"chosen": prompt + [{"role": "assistant", "content": "4"}],
                                             "rejected": prompt + [{"role": "assistant", "content": "22"}]})
    assert explicit == implicit
    assert explicit["chosen_input_ids"] == encode_chat(tokenizer, CHAT)["input_ids"]
    assert _loss_tokens(tokenizer, explicit["chosen_input_ids"], explicit["chosen_labels"]) == ["4", "<|im_end|>"]
    assert _loss_tokens(tokenizer, explicit["rejected_input_ids"], explicit["rejected_labels"]) == \
        tokenizer.tokenize("22") + ["<|im_end|>"]
    # a string prompt is the same as a one-user-turn message prompt
    one = {"chosen": "4", "rejected": "22", "margin": 2, "aspect": 1}
    assert encode_preference(tokenizer, {"prompt": "Hi", **one}) == \
        encode_preference(tokenizer, {"prompt": [{"role": "user", "content": "Hi"}], **one})
    carried = encode_preference(tokenizer, {"prompt": "Hi", **one})
    assert carried["margin"] == 2.0 and isinstance(carried["margin"], float) and carried["aspect"] == 1


def test_preference_truncation_cuts_the_completion_and_drops_long_prompts(tokenizer):
    record = {"prompt": "Count to five.", "chosen": "one two three four five", "rejected": "no"}
    full = encode_preference(tokenizer, record)
    start = next(t for t, label in enumerate(full["chosen_labels"]) if label != IGNORE)  # prompt length
    cut = encode_preference(tokenizer, record, max_length=start + 2)
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][: start + 2]
    assert cut["chosen_labels"] == full["chosen_labels"][: start + 2]
    assert cut["rejected_input_ids"] == full["rejected_input_ids"][: start + 2]
    assert encode_preference(tokenizer, record, max_length=start + 1)["chosen_labels"][-1] != IGNORE
    assert encode_preference(tokenizer, record, max_length=start) is None  # the prompt alone fills it
    assert encode_preference(tokenizer, record, max_length=start - 5) is None


def test_preference_bad_records_are_named(tokenizer):
    with pytest.raises(ValueError, match="'prompt' must end with a user turn"):
        encode_preference(tokenizer, {"prompt": CHAT[:3], "chosen": "a", "rejected": "b"})
    with pytest.raises(ValueError, match="share must end with a user turn"):
        encode_preference(tokenizer, {"chosen": CHAT, "rejected": CHAT})
    with pytest.raises(ValueError, match="'rejected': the completion must start with an assistant"):
        encode_preference(tokenizer, {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}],
                                      "rejected": [{"role": "user", "content": "b"}]})
    with pytest.raises(ValueError, match="'aspect' must be a reward-head index"):
        encode_preference(tokenizer, {"prompt": "q", "chosen": "a", "rejected": "b", "aspect": "helpful"})
    with pytest.raises(ValueError, match="'margin' must be a number"):
        encode_preference(tokenizer, {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"})


def test_unpaired_records_and_pairs_encode_like_preference_sides(tokenizer):
    pair = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "Five, I think."}
    ex = encode_preference(tokenizer, pair)
    good, bad = encode_unpaired(tokenizer, pair)  # a pair feeds KTO: chosen desirable, rejected not
    assert (good["input_ids"], good["labels"], good["desirable"]) == (ex["chosen_input_ids"], ex["chosen_labels"], True)
    assert (bad["input_ids"], bad["labels"], bad["desirable"]) == (ex["rejected_input_ids"], ex["rejected_labels"],
                                                                   False)
    one = encode_unpaired(tokenizer, {"prompt": "What is 2+2?", "completion": "4", "label": True})
    assert one == [good]
    assert encode_record(tokenizer, {"prompt": "What is 2+2?", "completion": "4", "label": True}, "unpaired") == good
    start = next(t for t, label in enumerate(good["labels"]) if label != IGNORE)
    assert encode_unpaired(tokenizer, pair, max_length=start) == []  # the prompt alone fills it
    with pytest.raises(ValueError, match="field 'completion' must start with an assistant turn"):
        encode_unpaired(tokenizer, {"prompt": "Hi", "completion": [{"role": "user", "content": "x"}], "label": True})


def test_kl_rows_pair_each_prompt_with_another_prompts_completion(tokenizer):
    records = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No, {i}."} for i in range(5)]
    examples = [e for r in records for e in encode_unpaired(tokenizer, r)]
    plain = copy.deepcopy(examples)
    add_kl_completions(examples, seed=3)

    def parts(ids, labels):
        cut = next(t for t, label in enumerate(labels) if label != IGNORE)
        return tuple(ids[:cut]), tuple(ids[cut:]), labels[:cut]

    cut = {id(e): next(t for t, label in enumerate(e["labels"]) if label != IGNORE) for e in plain}
    completions = {tuple(e["input_ids"][cut[id(e)]:]): e["labels"][cut[id(e)]:] for e in plain}
    used = []
    for e, before in zip(examples, plain):
        assert (e["input_ids"], e["labels"]) == (before["input_ids"], before["labels"])
        prompt, completion, _ = parts(e["input_ids"], e["labels"])
        kl_prompt, kl_completion, kl_mask = parts(e["kl_input_ids"], e["kl_labels"])
        assert kl_prompt == prompt and kl_mask == [IGNORE] * len(prompt)  # own prompt, no loss on it
        assert kl_completion in completions
        assert e["kl_labels"][len(prompt):] == completions[kl_completion]  # the donor's labels
        used.append(kl_completion)
    # never the example's own completion's prompt: every KL row mismatches (pairs share prompts)
    by_prompt = {}
    for e in plain:
        p, c, _ = parts(e["input_ids"], e["labels"])
        by_prompt.setdefault(p, set()).add(c)
    for e in examples:
        p, _, _ = parts(e["input_ids"], e["labels"])
        assert parts(e["kl_input_ids"], e["kl_labels"])[1] not in by_prompt[p]
    assert len(set(used)) > 1
    with pytest.raises(ValueError, match="at least two different prompts"):
        add_kl_completions(copy.deepcopy(plain[:2]))
