"""Multi-turn tool rollouts: the call format, prompts and tool turns from the chat template, and
episodes assembled token by token (a scripted policy over a tiny random model, and the model itself)."""

from __future__ import annotations

import pytest
import torch

from posttrain.generate.engine import GenerationConfig
from posttrain.rl.controller import packed_sequences
from posttrain.rl.envs import ToolCall, build_env
from posttrain.rl.tools import (TOOL_CLOSE, TurnFormat, episode_metrics, format_call, observation_ids, parse_turn,
                                prompt_ids, run_episodes, template_has_tools, transcript)
from posttrain.train.objectives import label_token_logps
from tests.rl.tool_policy import ScriptedPolicy, by_question

CALL = '<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>'


# ----------------------------------------------------------------------------- parsing


def test_a_turn_without_a_call_is_the_answer_and_a_well_formed_call_parses():
    assert parse_turn("The answer is 42.").kind == "answer"
    turn = parse_turn("Let me compute.\n" + CALL)
    assert turn.kind == "call" and turn.call == ToolCall("python", {"code": "print(6 * 7)"})
    # OpenAI's string-encoded arguments and the "parameters" spelling are read too
    s = parse_turn('<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>')
    assert s.kind == "call" and s.call.arguments == {"code": "print(1)"}
    p = parse_turn('<tool_call> {"name": "search", "parameters": {"query": "x"}} </tool_call>')
    assert p.kind == "call" and p.call == ToolCall("search", {"query": "x"})
    assert parse_turn(format_call(ToolCall("python", {"code": "1"}))).call == ToolCall("python", {"code": "1"})


@pytest.mark.parametrize("text, why", [
    ('<tool_call>{"name": "python", "arguments": {"code": "print(1)"</tool_call>', "not valid JSON"),
    ("<tool_call>[1, 2]</tool_call>", "must be a JSON object, got list"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'needs a "name"'),
    ('<tool_call>{"name": "python", "arguments": [1]}</tool_call>', '"arguments" must be a JSON object'),
    ('<tool_call>{"name": "python", "arguments": "{oops"}</tool_call>', "string that is not valid JSON"),
    ('<tool_call>{"name": "python", "arguments": {}, "id": 3}</tool_call>', "unknown field(s) id"),
    ('<tool_call>{"name": "python", "arguments": {"code": "1"}}', "no closing </tool_call>"),
])
def test_a_malformed_call_is_an_invalid_attempt_that_says_why(text, why):
    turn = parse_turn(text)
    assert turn.kind == "invalid" and turn.call is None and why in turn.error


# ----------------------------------------------------------------------------- prompts and tool turns


def test_smollm2_has_no_tool_template_so_the_tools_go_into_our_system_turn(tokenizer):
    assert not template_has_tools(tokenizer)
    env = build_env({"name": "python"})()
    text = tokenizer.decode(prompt_ids(tokenizer, env, env.reset({"prompt": "What is 6 * 7?", "answer": "42"})))
    system, demo_q, demo_call, demo_result, demo_answer, question = text.split("<|im_start|>")[1:7]
    assert system.startswith("system\n" + env.instructions) and "- python(code: string)" in system
    assert "<tool_call>{" in system and TOOL_CLOSE in system
    assert demo_call.startswith("assistant\n<tool_call>") and demo_result == "tool\n5602<|im_end|>\n"
    assert question == "user\nWhat is 6 * 7?<|im_end|>\n" and text.endswith("<|im_start|>assistant\n")
    no_demo = build_env({"name": "python", "demo": False})()
    assert tokenizer.decode(prompt_ids(tokenizer, no_demo, "Q")).count("<|im_start|>") == 3


QWEN_LIKE = (  # the shape of Qwen2.5's template: tools listed in the system turn, tool results in a user turn
    "{%- if tools %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif not (tools and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_with_tools_lists_them_itself_and_frames_the_tool_turn(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN_LIKE
    assert template_has_tools(tok)
    env = build_env({"name": "python", "demo": False})()
    text = tok.decode(prompt_ids(tok, env, "What is 6 * 7?"))
    assert text.startswith("<|im_start|>system\n" + env.instructions + "\n# Tools\n<tools>")
    assert '"name": "python"' in text and "You can call these tools" not in text  # the template's words, not ours
    fmt = TurnFormat.of(tok)
    assert fmt == TurnFormat("<|im_end|>\n", "<|im_start|>user\n<tool_response>\n",
                             "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_the_tool_turn_closes_the_assistant_turn_unless_the_model_did(tokenizer):
    fmt = TurnFormat.of(tokenizer)
    assert fmt == TurnFormat("<|im_end|>\n", "<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n")
    after_stop = tokenizer.decode(observation_ids(tokenizer, fmt, "42", None))
    after_eos = tokenizer.decode(observation_ids(tokenizer, fmt, "42", "<|im_end|>"))
    assert after_stop == "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    assert after_eos == after_stop.removeprefix("<|im_end|>")


# ----------------------------------------------------------------------------- episodes, scripted


@pytest.fixture
def scripted(monkeypatch, tokenizer):
    def install(scripts):
        policy = ScriptedPolicy(tokenizer, by_question(scripts))
        monkeypatch.setattr("posttrain.generate.engine.generate", policy)
        return policy

    return install


def test_a_two_turn_episode_is_prompt_call_observation_answer_with_the_mask_on_model_tokens(scripted, tiny, tokenizer):
    policy = scripted({"What is 6 * 7?": [CALL, "The answer is 42."]})
    (ep,) = run_episodes(tiny, tokenizer, [{"prompt": "What is 6 * 7?", "answer": "42"}],
                         build_env({"name": "python"}), GenerationConfig(max_new_tokens=40), max_turns=3)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    call, obs = enc(CALL), enc("<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n")
    answer = enc("The answer is 42.") + [tokenizer.eos_token_id]
    assert ep.tokens == call + obs + answer
    assert ep.loss_mask == [1] * len(call) + [0] * len(obs) + [1] * len(answer)
    assert ep.model_tokens == call + answer and len(ep.logprobs) == len(call) + len(answer)
    # the second turn was sampled after exactly the prompt, the call and the observation
    assert policy.contexts == [ep.prompt_ids, ep.prompt_ids + call + obs]
    assert (ep.env_reward, ep.attempted, ep.valid, ep.answer) == (1.0, 1, 1, "The answer is 42.")
    assert [t["kind"] for t in ep.turns] == ["call", "answer"] and ep.turns[0]["observation"] == "42"
    assert transcript(tokenizer, ep).startswith(CALL + "<|im_end|>\n<|im_start|>tool\n42<|im_end|>")
    # training sees the tokens the sampler saw: log-probs recomputed on the packed row are the sampler's
    packed = packed_sequences([ep.prompt_ids], [ep.tokens], [ep.loss_mask])
    with torch.no_grad():
        again = label_token_logps(tiny, packed)
    torch.testing.assert_close(again, torch.tensor(ep.logprobs), atol=1e-4, rtol=1e-4)


def test_bad_calls_get_an_observation_that_says_why_and_the_episode_goes_on(scripted, tiny, tokenizer):
    scripts = {
        "Q1?": ['<tool_call>{"name": "python", "arguments": {"code": </tool_call>', "7"],
        "Q2?": ['<tool_call>{"name": "calculator", "arguments": {"x": "1"}}</tool_call>', "8"],
        "Q3?": ['<tool_call>{"name": "python", "arguments": {"src": "1"}}</tool_call>', "9"],
        "Q4?": [CALL, CALL, CALL],  # never answers: stops at max_turns, reward 0
        "Q5?": ["<tool_call>" + "x" * 5, "2"],  # opened, never closed
    }
    scripted(scripts)
    records = [{"prompt": q, "answer": a} for q, a in zip(scripts, ["7", "0", "9", "42", "1"])]
    eps = run_episodes(tiny, tokenizer, records, build_env({"name": "python", "tool_call_reward": 0.5}),
                       GenerationConfig(max_new_tokens=40), max_turns=2)
    obs = [ep.turns[0].get("observation", "") for ep in eps]
    assert "not valid JSON" in obs[0] and "Error: unknown tool 'calculator'; available: python" == obs[1]
    assert "needs the argument(s) code" in obs[2] and obs[3] == "42" and "no closing </tool_call>" in obs[4]
    assert [ep.env_reward for ep in eps] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert [(ep.attempted, ep.valid) for ep in eps] == [(1, 0), (1, 0), (1, 0), (2, 2), (1, 0)]
    assert [len(ep.turns) for ep in eps] == [2, 2, 2, 2, 2]
    # the last allowed turn's call is counted but gets no observation tokens after it
    four = eps[3]
    assert four.loss_mask[-1] == 1 and four.answer is None and four.shaping(0.5) == 0.5
    m = episode_metrics(eps, tool_call_reward=0.5)
    assert m["tools/valid_rate"] == pytest.approx(2 / 6) and m["tools/calls"] == pytest.approx(6 / 5)
    assert m["reward/env"] == pytest.approx(2 / 5) and m["tools/answered"] == pytest.approx(4 / 5)
    assert m["reward/tool_shaping"] == pytest.approx(0.5 / 5)


def test_episodes_sampled_from_a_tiny_model_hold_together(tiny, tokenizer):
    """The real sampler (stop strings, EOS, budgets): every row's mask, tokens and log-probs
    agree, and the trainer's recomputed log-probs on the packed rows are the sampler's."""
    records = [{"prompt": f"What is {i} * 7?", "answer": str(7 * i)} for i in range(4)]
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, seed=3, top_k=50)
    eps = run_episodes(tiny, tokenizer, records, build_env({"name": "python"}), gen, max_turns=2)
    assert len(eps) == 4
    for ep in eps:
        assert len(ep.tokens) == len(ep.loss_mask) and sum(ep.loss_mask) == len(ep.logprobs) > 0
        assert 1 <= len(ep.turns) <= 2 and ep.env_reward in (0.0, 1.0)
    packed = packed_sequences([e.prompt_ids for e in eps], [e.tokens for e in eps], [e.loss_mask for e in eps])
    with torch.no_grad():
        again = label_token_logps(tiny, packed)
    torch.testing.assert_close(again, torch.tensor([x for e in eps for x in e.logprobs]), atol=1e-4, rtol=1e-4)
    again_eps = run_episodes(tiny, tokenizer, records, build_env({"name": "python"}), gen, max_turns=2)
    assert [e.tokens for e in again_eps] == [e.tokens for e in eps]  # seeded: the same episodes
