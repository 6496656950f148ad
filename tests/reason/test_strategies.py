"""Strategies: prompts, voting, BFS/DFS with scripted proposers and scorers, Game-of-24 states,
the router's escalation with a scripted model, and every strategy end to end on a tiny model."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from posttrain.generate.engine import GenerationOutput
from posttrain.reason import strategies as S
from posttrain.reason.tasks import arith_task, check24, game24_task, load_reason_task, mc_task

# ------------------------------------------------------------------ prompts and votes


def test_prompts_direct_primes_the_answer_and_fewshot_shows_worked_examples(tokenizer):
    task = arith_task()
    direct = S.build_prompt(tokenizer, task, "What is 2 + 3?", "direct", chat=True)
    assert direct.endswith(S.ANSWER_PREFIX) and task.direct in direct
    few = S.build_prompt(tokenizer, task, "What is 2 + 3?", "cot_fewshot", chat=True)
    assert all(q in few and a in few for q, a in task.fewshot) and few.count(task.cot) == 3
    raw = S.build_prompt(tokenizer, task, "What is 2 + 3?", "cot", chat=False)
    assert raw == f"Question: What is 2 + 3?\n{task.cot}\nAnswer:"
    with pytest.raises(ValueError, match="style"):
        S.build_prompt(tokenizer, task, "q", "tot", chat=True)


def test_majority_vote_counts_by_key_and_breaks_ties_by_mean_logprob():
    key = arith_task().key
    assert S.majority_vote(["12", "12.0", "7", None], [-1, -1, -0.1, 0], key) == ("12", {key("12"): 2, key("7"): 1})
    winner, _ = S.majority_vote(["5", "7", "5", "7"], [-2.0, -0.5, -2.0, -0.5], key)
    assert winner == "7"  # 2 votes each; 7's paths are more likely
    assert S.majority_vote([None, None], [0, 0], key) == (None, {})


def test_answer_confidence_covers_the_answer_tokens_only(tokenizer):
    ids = tokenizer(" 7. There are many apples", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids[:2]] == [" ", "7"]
    lps = [-0.3, -0.1] + [-5.0] * (len(ids) - 2)
    reply = S.Answer("7", "The answer is 7. There are many apples", detail={"token_ids": ids, "logprobs": lps})
    assert S.answer_confidence(tokenizer, reply) == pytest.approx(0.818731, abs=1e-5)  # exp(-0.2): " " and "7"
    reply.answer = "apples"
    assert S.answer_confidence(tokenizer, reply) == pytest.approx(math.exp(-25.4 / 7))  # every token
    reply.answer = None
    assert S.answer_confidence(tokenizer, reply) == 0.0


def test_config_rejects_bad_values():
    for bad in ({"search": "astar"}, {"value": "oracle"}, {"k": 0}, {"confidence": 1.5}, {"temperature": 0}):
        with pytest.raises(ValueError):
            S.ReasonConfig(**bad)


def test_config_names_the_bad_field_and_strategies_are_registered():
    for bad, field in (({"search": "astar"}, "search must be one of bfs, dfs"), ({"k": 0}, "k must be >= 1"),
                       ({"threshold": -0.1}, "threshold is a probability"), ({"nope": 1}, "nope")):
        with pytest.raises(ValueError, match=field):
            S.ReasonConfig(**bad)
    assert S.STRATEGIES.names() == ("direct", "cot", "cot_fewshot", "sc", "tot", "router")
    assert S.STRATEGIES.get("cot") is S.chain_of_thought
    with pytest.raises(ValueError, match="unknown strategy 'beam'; choose one of direct, cot, cot_fewshot"):
        S.STRATEGIES.get("beam")


# ------------------------------------------------------------------ searches with scripted proposer/scorer

# a tree: state -> children; values per state; finals end in "!"
TREE = {"r": ["a", "b", "c"], "a": ["a1", "a2"], "b": ["b1"], "c": ["c1!"], "a1": [], "a2": ["a2x!"],
        "b1": ["b1!"]}
VALUES = {"a": 0.9, "b": 0.6, "c": 0.1, "a1": 0.95, "a2": 0.5, "b1": 0.7, "c1!": 1.0, "a2x!": 0.3, "b1!": 0.8}


def scripted():
    log = {"expanded": [], "scored": []}

    def expand(states):
        log["expanded"].append(list(states))
        return [TREE.get(s, []) for s in states]

    def score(states):
        log["scored"].extend(states)
        return [VALUES[s] for s in states]

    return expand, score, log


def is_final(s):
    return s.endswith("!")


def test_bfs_keeps_the_best_beam_states_per_depth():
    expand, score, log = scripted()
    res = S.bfs(["r"], expand, score, is_final, beam=2, max_depth=5)[0]
    # depth 1 keeps a, b (c is cut by the beam); depth 2 keeps a1, b1; depth 3 finds b1! (a1 is a dead end)
    assert log["expanded"] == [["r"], ["a", "b"], ["a1", "b1"]]
    assert res.final and res.best == "b1!" and res.value == 0.8 and res.expanded == 5


def test_bfs_wide_beam_finds_the_best_final_and_stops_when_accepted():
    expand, score, log = scripted()
    res = S.bfs(["r"], expand, score, is_final, beam=3, max_depth=5, accept=1.0)[0]
    assert res.best == "c1!" and res.value == 1.0
    assert len(log["expanded"]) == 2  # c1! (valued 1.0) appeared at depth 2: no third round


def test_bfs_runs_several_searches_in_lockstep_with_one_expand_per_depth():
    expand, score, log = scripted()
    res = S.bfs(["r", "b"], expand, score, is_final, beam=2, max_depth=5, accept=0.75)
    # root "b" finds b1! (0.8 >= accept) at depth 2 and stops; root "r" goes on alone
    assert log["expanded"] == [["r", "b"], ["a", "b", "b1"], ["a1", "b1"]]
    assert [(x.best, x.expanded) for x in res] == [("b1!", 5), ("b1!", 2)]


def test_bfs_without_a_final_returns_the_best_open_state():
    expand, score, _ = scripted()
    res = S.bfs(["r"], expand, score, is_final, beam=2, max_depth=1)[0]
    assert not res.final and res.best == "a"


def test_dfs_goes_best_first_backtracks_and_prunes():
    expand, score, log = scripted()
    res = S.dfs("r", expand, score, is_final, threshold=0.4, budget=10, max_depth=5, accept=0.75)
    # r -> a (0.9) -> a1 (0.95, dead end) -> back to a2 (0.5) -> a2x! (0.3, pruned) -> back to b -> b1 -> b1!
    assert [e[0] for e in log["expanded"]] == ["r", "a", "a1", "a2", "b", "b1"]
    assert res.final and res.best == "b1!" and res.pruned == 2  # c (0.1) and a2x! (0.3)


def test_dfs_respects_the_node_budget():
    expand, score, log = scripted()
    res = S.dfs("r", expand, score, is_final, threshold=0.4, budget=3, max_depth=5)
    assert len(log["expanded"]) == 3 and not res.final and res.best == "a1"


# ------------------------------------------------------------------ Game-of-24 states


def test_g24_children_recompute_results_and_reject_bad_steps():
    state = S.G24State(tuple(Fraction(n) for n in (4, 6, 8, 2)), ("4", "6", "8", "2"))
    text = ("4 + 8 = 13 (left: 13 6 2)\n"  # wrong "= 13": recomputed as 12
            "9 * 2 = 18\n"  # 9 is not available
            "8 + 4 = 12 (left: 2 6 12)\n"  # same remaining numbers as the first: dropped
            "6 / 6 = 1\n"  # only one 6
            "8 / 2 = 4 (left: 4 4 6)\n"
            "6 - 2 = 4\n")
    kids = S.g24_children(state, [text], k=5)
    assert [sorted(c.numbers) for c in kids] == [[2, 6, 12], [4, 4, 6], [4, 4, 8]]
    assert kids[0].exprs[-1] == "(4 + 8)" and kids[0].steps[-1] == "4 + 8 = 12 (left: 6 2 12)"
    assert len(S.g24_children(state, [text], k=2)) == 2
    frac = S.g24_children(S.G24State((Fraction(8), Fraction(3)), ("8", "3")), ["8 / 3 = 2.67"], k=3)[0]
    assert frac.numbers == (Fraction(8, 3),) and frac.shown() == "2.667"


def fake_engine(reply):
    """A stand-in for the engine: reply(prompt_text) -> (text, per-token logprobs)."""
    def _gen(model, tokenizer, prompts, config, stream=None):
        texts, toks, lps = [], [], []
        for p in prompts:
            text, lp = reply(tokenizer.decode(p))
            texts.append(text)
            toks.append(list(range(len(lp))))
            lps.append(lp)
        return GenerationOutput(texts, toks, lps)
    return _gen


def test_tot_with_scripted_proposals_solves_game24_and_accounts_tokens(monkeypatch, tokenizer):
    proposals = {"4 6 8 2": "8 / 2 = 4 (left: 4 4 6)\n4 + 8 = 12 (left: 6 2 12)", "6 2 12": "6 * 2 = 12",
                 "4 6 4": "4 + 4 = 8\n6 - 4 = 2", "12 12": "12 + 12 = 24", "6 8": "6 + 8 = 14",
                 "4 2": "4 * 2 = 8"}

    def reply(prompt):
        numbers = prompt.rsplit("Input: ", 1)[1].split("\n")[0]
        return proposals.get(numbers, ""), [-0.1] * 5

    monkeypatch.setattr(S, "generate", fake_engine(reply))
    task, ex = game24_task(), [{"prompt": "make 24", "numbers": [4, 6, 8, 2], "answer": "24"}]
    for search in ("bfs", "dfs"):
        out = S.tree_of_thoughts(None, tokenizer, task, ex, S.ReasonConfig(search=search, value="checker", k=3))[0]
        assert check24(out.answer, [4, 6, 8, 2]), (search, out)
        assert out.detail["final"] and out.tokens == 5 * out.calls and out.calls == out.detail["expanded"]
    # 4 6 4 cannot reach 24 by the checker, so BFS with beam 1 never expands it
    out = S.tree_of_thoughts(None, tokenizer, task, ex, S.ReasonConfig(search="bfs", beam=1, value="checker"))[0]
    assert out.answer == "(4 + 8) + (6 * 2)" and out.calls == 3


def test_step_tot_stops_on_a_checked_answer_and_else_asks_for_one(monkeypatch, tokenizer):
    ex = [{"prompt": "What is 3 + 3?", "answer": "6"}]
    cfg = S.ReasonConfig(search="bfs", k=2, depth=2, value="checker")
    # thoughts with no number: never final before the depth limit, no answer in them -> primed finish
    monkeypatch.setattr(S, "generate", fake_engine(
        lambda p: (" 6.", [-0.1]) if p.endswith(S.ANSWER_PREFIX) else ("Add the two numbers.", [-0.1] * 3)))
    out = S.tree_of_thoughts(None, tokenizer, arith_task(), ex, cfg)[0]
    assert out.answer == "6" and out.text.endswith("The answer is 6.")
    assert out.calls == 2 + 2 + 1 and out.tokens == 4 * 3 + 1  # two depths x k samples, then the finish
    # a checked equation followed by the answer line is accepted at once (value 1.0 >= accept), before depth 3
    replies = iter(["3 + 3 = 6", "3 + 3 = 7", "The answer is 6.", "The answer is 6."])
    monkeypatch.setattr(S, "generate", fake_engine(lambda p: (next(replies), [-0.1])))
    out = S.tree_of_thoughts(None, tokenizer, arith_task(), ex, S.ReasonConfig(k=2, depth=3, beam=1))[0]
    assert out.answer == "6" and out.text == "3 + 3 = 6\nThe answer is 6." and out.detail["value"] == 1.0


def test_checker_value_on_a_task_without_one_is_refused(tokenizer):
    ex = [{"prompt": "q\nA) a\nB) b\nC) c\nD) d", "answer": "A"}]
    with pytest.raises(ValueError, match="no checker"):
        S.tree_of_thoughts(None, tokenizer, mc_task(), ex, S.ReasonConfig(value="checker"))


# ------------------------------------------------------------------ router and self-consistency, scripted


def test_router_escalates_direct_then_cot_then_sc(monkeypatch, tokenizer):
    # q1: confident direct; q2: unsure direct, CoT agrees; q3: unsure, CoT disagrees -> self-consistency
    def reply(prompt):
        q = next(q for q in ("q1", "q2", "q3") if q in prompt)
        if prompt.endswith(S.ANSWER_PREFIX):
            return {"q1": (" 5.", [-0.01, -0.01]), "q2": (" 6.", [-2.0, -1.0]), "q3": (" 7.", [-3.0, -1.0])}[q]
        if "step by step" in prompt:
            return {"q2": ("3 + 3 = 6\nThe answer is 6.", [-0.5] * 8), "q3": ("The answer is 9.", [-0.5] * 4)}[q]
        raise AssertionError(prompt)

    monkeypatch.setattr(S, "generate", fake_engine(reply))
    monkeypatch.setattr(S, "self_consistency", lambda m, t, task, exs, cfg: [
        S.Answer("8", "voted", tokens=30, calls=5) for _ in exs])
    ex = [{"prompt": q, "answer": "0"} for q in ("q1", "q2", "q3")]
    out = S.router(None, tokenizer, arith_task(), ex, S.ReasonConfig(confidence=0.9))
    assert [(o.rung, o.answer) for o in out] == [("direct", "5"), ("cot", "6"), ("sc", "8")]
    assert [o.tokens for o in out] == [2, 2 + 8, 2 + 4 + 30] and [o.calls for o in out] == [1, 2, 7]


def test_router_with_a_verifier_accepts_only_verified_answers(monkeypatch, tokenizer):
    def reply(prompt):
        return (" 4 * 6 * 1 * 1" if "1 1 4 6" in prompt else " 24", [-5.0] * 4)  # unsure but verifiable

    monkeypatch.setattr(S, "generate", fake_engine(reply))
    monkeypatch.setattr(S, "tree_of_thoughts", lambda m, t, task, exs, cfg: [S.Answer(None, "", 7, 2) for _ in exs])
    ex = [{"prompt": "Use 1 1 4 6", "numbers": [1, 1, 4, 6], "answer": "24"},
          {"prompt": "Use 2 2 2 2", "numbers": [2, 2, 2, 2], "answer": "24"}]
    out = S.router(None, tokenizer, game24_task(), ex, S.ReasonConfig())
    assert out[0].rung == "direct" and out[0].answer == "4 * 6 * 1 * 1"
    assert out[1].rung == "tot" and out[1].tokens == 4 + 4 + 7  # probe, CoT, ToT


def test_self_consistency_votes_over_sampled_paths(monkeypatch, tokenizer):
    calls = iter(["The answer is 5.", "The answer is 7.", "so 7", "The answer is 5.", "The answer is 7."])
    monkeypatch.setattr(S, "generate", fake_engine(lambda p: (next(calls), [-0.2, -0.2])))
    out = S.self_consistency(None, tokenizer, arith_task(), [{"prompt": "q", "answer": "7"}],
                             S.ReasonConfig(samples=5))[0]
    assert out.answer == "7" and out.calls == 5 and out.tokens == 10
    assert sorted(out.detail["votes"].values()) == [2, 3]


# ------------------------------------------------------------------ end to end on a tiny random model


def test_option_values_match_the_logits(tiny, tokenizer):
    prompts = ["Verdict:", "Numbers: 4 6\nVerdict:"]
    got = S.option_values(tiny, tokenizer, prompts, S.VERDICTS, batch_size=1)
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in S.VERDICTS]
    for p, v in zip(prompts, got):
        with torch.no_grad():
            logits = tiny(torch.tensor([tokenizer(p)["input_ids"]])).logits[0, -1, ids]
        probs = logits.softmax(-1)
        assert v == pytest.approx(float(probs[0] + 0.5 * probs[1]), abs=1e-5)
    assert got == pytest.approx(S.option_values(tiny, tokenizer, prompts, S.VERDICTS, batch_size=2), abs=1e-5)


@pytest.mark.parametrize("name", list(S.STRATEGIES))
@pytest.mark.parametrize("task_name", ["arith", "game24", "mc"])
def test_every_strategy_runs_on_a_tiny_model_and_accounts_tokens(tiny, tokenizer, name, task_name):
    task, ex = load_reason_task(task_name, limit=2)
    cfg = S.ReasonConfig(direct_tokens=4, cot_tokens=6, step_tokens=6, samples=2, k=2, depth=2, budget=3,
                         probe="vote" if task_name == "mc" else "logprob", search="dfs" if task_name == "mc" else "bfs",
                         value="model" if task_name == "game24" else "auto", chat=task_name != "arith")
    out = S.run_strategy(name, tiny, tokenizer, task, ex, cfg)
    assert len(out) == 2
    for a in out:
        assert a.calls >= 1 and a.tokens >= 1 and a.prompt_tokens > 0
        assert a.tokens <= a.calls * 6
        assert (a.rung is not None) == (name == "router")
    if name == "sc":
        assert all(a.calls == 2 for a in out)
    if name in ("direct", "cot", "cot_fewshot"):
        assert all(a.calls == 1 for a in out)


def test_unknown_strategy_is_refused(tiny, tokenizer):
    with pytest.raises(ValueError, match="unknown strategy 'beam'"):
        S.run_strategy("beam", tiny, tokenizer, arith_task(), [{"prompt": "q", "answer": "1"}])
