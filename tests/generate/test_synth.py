"""Synthetic data: instruction parsing, filters counted, provenance, rejection keeps only
verified rows, atomic output, config errors; a stub generator where a random model cannot
be right, the tiny model where the real engine must run."""

import json
import os
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import build_config
from posttrain.data.formats import DataError, load_records
from posttrain.generate.engine import GenerationOutput
from posttrain.generate.synth import (RejectionConfig, SelfInstructConfig, SynthConfig, SynthResult, few_shot_prompt,
                                      load_seed_tasks, parse_instructions, rejection_sample, run_synth,
                                      sample_candidates, select_rejection, self_instruct, write_dataset)

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [{"id": f"s{i}", "instruction": t} for i, t in enumerate(
    ["Write a haiku about the sea.", "List three uses of a brick.", "Explain why ice floats on water.",
     "Give two synonyms for quick."])]


def stub_generate(monkeypatch, reply):
    """Replace the engine: reply(prompt, config, index) -> text; every reply 'finished' (1 token)."""
    calls = []

    def generate(model, tokenizer, prompts, config=None, stream=None):
        calls.append((list(prompts), config))
        texts = [reply(p, config, i) for i, p in enumerate(prompts)]
        return GenerationOutput(texts, [[1] for _ in texts], [[0.0] for _ in texts])

    monkeypatch.setattr("posttrain.generate.engine.generate", generate)
    return calls


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ parsing

def test_few_shot_prompt_numbers_the_seeds_and_leaves_the_next_number_open():
    assert few_shot_prompt("Tasks:", ["a b", "c d"]) == "Tasks:\n1. a b\n2. c d\n3."


def test_parse_instructions_numbered_multiline_and_blank_line_end():
    text = " Name a red fruit.\n4) Describe\nthe moon briefly.\nTask 5: Count to three.\n\n9. after the list"
    items, cut = parse_instructions(text)
    assert items == ["Name a red fruit.", "Describe the moon briefly.", "Count to three."]
    assert cut == 0


def test_parse_instructions_drops_the_cut_off_last_item_when_truncated():
    items, cut = parse_instructions(" First task here.\n5. Second task that was cut", truncated=True)
    assert items == ["First task here."] and cut == 1
    assert parse_instructions(" Only one", truncated=False) == (["Only one"], 0)
    assert parse_instructions("   ", truncated=False) == ([], 0)


# ------------------------------------------------------------------------------ self-instruct

def test_self_instruct_filters_are_applied_and_counted_with_provenance(monkeypatch):
    continuation = ("  Write a haiku about the sea.\n"          # copy of a seed -> exact duplicate
                    "5. Describe a rainy day in a city.\n"
                    "6. Hi\n"                                    # 1 word -> too short
                    "7. Email me at jane.doe@example.com today please\n"  # PII -> dropped
                    "8. Describe a rainy day in a city.\n")      # repeat of item 5 -> duplicate
    calls = stub_generate(monkeypatch, lambda p, cfg, i: continuation if not cfg.chat else f"answer to: {p}")
    cfg = SelfInstructConfig(seeds="unused", num_instructions=5, seeds_per_prompt=3, prompts_per_round=1,
                             max_rounds=1)
    res = self_instruct(None, None, SEEDS, cfg, teacher="stub")
    rep = res.report
    assert rep["instructions_generated"] == 5 and rep["instructions_kept"] == 1
    assert rep["instruction_drops"] == {"exact_duplicate": 2, "too_short": 1, "pii:email": 1}
    assert [r["messages"][0]["content"] for r in res.rows] == ["Describe a rainy day in a city."]
    assert res.rows[0]["messages"][1]["content"] == "answer to: Describe a rainy day in a city."
    prov = res.rows[0]["provenance"]
    assert prov["teacher"] == "stub" and prov["mode"] == "self-instruct" and prov["round"] == 0
    assert len(prov["seed_ids"]) == 3 and set(prov["seed_ids"]) <= {s["id"] for s in SEEDS}
    assert prov["instruction_sampling"]["temperature"] == 0.9 and prov["filters"] == "passed"
    # the few-shot prompt showed exactly the seeds named in the provenance
    shown = calls[0][0][0]
    assert all(s["instruction"] in shown for s in SEEDS if s["id"] in prov["seed_ids"])
    assert calls[0][1].do_sample and not calls[0][1].chat and not calls[1][1].do_sample and calls[1][1].chat


def test_self_instruct_verifier_and_score_threshold_drop_rows(monkeypatch):
    items = "\n".join(f"{n}. Describe the color number {w} in detail" for n, w in
                      zip(range(5, 9), ["one", "two", "three", "four"]))
    stub_generate(monkeypatch, lambda p, cfg, i: " " + items.split(". ", 1)[1] if not cfg.chat else p.upper())
    cfg = SelfInstructConfig(seeds="unused", num_instructions=4, seeds_per_prompt=2, prompts_per_round=1,
                             max_rounds=1, instruction_filters={"near_dedup": {"enabled": False}},
                             response_filters={"exact_dedup": False, "near_dedup": {"enabled": False},
                                               "pii": {"action": "off"}, "score": {"min": 0.5}})
    scores = {"ONE": 1.0, "TWO": 0.0, "THREE": 1.0, "FOUR": 1.0}

    def scorer(records):
        return [next(v for k, v in scores.items() if f" {k} " in r["messages"][1]["content"]) for r in records]

    res = self_instruct(None, None, SEEDS, cfg, scorer=scorer, verifier=lambda row: "FOUR" not in str(row))
    assert res.report["instructions_kept"] == 4 and res.report["instructions_generated"] == 4
    capped = self_instruct(None, None, SEEDS, cfg.model_copy(update={"num_instructions": 3}), scorer=scorer)
    assert capped.report["instruction_drops"] == {"over_num_instructions": 1}
    assert res.report["response_drops"] == {"score": 1, "verifier": 1}
    assert sorted(r["messages"][1]["content"].split()[4] for r in res.rows) == ["ONE", "THREE"]
    assert all(r["provenance"]["filters"] == "passed (verified)" for r in res.rows)


def test_self_instruct_runs_on_the_tiny_model(tiny, tokenizer):
    cfg = SelfInstructConfig(seeds="unused", num_instructions=2, seeds_per_prompt=2, prompts_per_round=2,
                             max_rounds=1, instruction_sampling={"max_new_tokens": 12, "seed": 3},
                             response_sampling={"max_new_tokens": 6, "temperature": 0},
                             instruction_filters={"pii": {"action": "off"}})
    res = self_instruct(tiny, tokenizer, SEEDS, cfg, progress=False)
    rep = res.report
    assert rep["rounds"] == 1
    parsed = rep["instructions_generated"]
    assert rep["instructions_kept"] + sum(rep["instruction_drops"].values()) - rep["instruction_drops"].get(
        "truncated", 0) == parsed
    assert len(res.rows) == rep["kept"] <= rep["instructions_kept"]
    for r in res.rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]


# ------------------------------------------------------------------------------ rejection sampling

ITEMS = [{"prompt": "What is 3 + 4?", "answer": "7", "line": 1}, {"prompt": "What is 2 + 2?", "answer": "4", "line": 2}]


def test_rejection_keeps_only_verified_dedups_and_caps(monkeypatch):
    replies = {"7": ["7", "The answer is 7.", "8", "7"], "4": ["five", "3", "22", "4"]}
    stub_generate(monkeypatch, lambda p, cfg, i: replies["7" if "3 + 4" in p[-1]["content"] else "4"][i % 4])
    cfg = RejectionConfig(prompts="unused", k=4, max_per_prompt=2, prompt_suffix=" Just the number.")
    res = rejection_sample(None, None, ITEMS, cfg, teacher="stub", source="src.jsonl", progress=False)
    rep = res.report
    assert (rep["generated"], rep["verified"], rep["kept"]) == (8, 4, 3)
    assert rep["dropped"] == {"wrong_answer": 3, "no_answer": 1, "exact_duplicate": 1}
    assert rep["generated"] == rep["kept"] + sum(rep["dropped"].values())
    assert [r["messages"][1]["content"] for r in res.rows] == ["7", "The answer is 7.", "4"]
    for r in res.rows:
        p = r["provenance"]
        assert p["verified"] is True and p["extracted"] == p["reference"]
        assert r["messages"][0]["content"] in ("What is 3 + 4?", "What is 2 + 2?")  # no sampling suffix
        assert p["prompt_suffix"] == " Just the number." and p["source"] == "src.jsonl" and p["teacher"] == "stub"
        assert {"source_line", "sample_index", "sampling", "finished", "filters"} <= set(p)


def test_cap_prefers_finished_samples_and_unverified_selection_keeps_wrong_answers():
    cands = [{"item": 0, "sample": 0, "batch": 0, "text": "7 and more", "extracted": "7", "verified": True,
              "finished": False},
             {"item": 0, "sample": 1, "batch": 0, "text": "7", "extracted": "7", "verified": True, "finished": True},
             {"item": 1, "sample": 0, "batch": 0, "text": "5", "extracted": "5", "verified": False, "finished": True}]
    cfg = RejectionConfig(prompts="unused", k=2, max_per_prompt=1)
    res = select_rejection(ITEMS, cands, cfg)
    assert [r["messages"][1]["content"] for r in res.rows] == ["7"]
    assert res.report["dropped"] == {"wrong_answer": 1, "over_max_per_prompt": 1}
    strict = select_rejection(ITEMS, cands, cfg.model_copy(update={"require_finished": True}))
    assert strict.report["dropped"]["unfinished"] == 1
    loose = select_rejection(ITEMS, cands, cfg, verified_only=False)
    assert [r["provenance"]["verified"] for r in loose.rows] == [True, False]


def test_rejection_on_the_tiny_model_with_a_custom_verifier_is_reproducible(tiny, tokenizer):
    cfg = RejectionConfig(prompts="unused", k=3, max_per_prompt=3, sampling={"max_new_tokens": 5, "seed": 7,
                                                                             "batch_size": 6})
    verify = lambda item, text: len(text) % 2 == 0  # noqa: E731 - a checker a random model can pass
    first = sample_candidates(tiny, tokenizer, ITEMS, cfg, verify=verify, progress=False)
    again = sample_candidates(tiny, tokenizer, ITEMS, cfg, verify=verify, progress=False)
    assert [c["text"] for c in first] == [c["text"] for c in again]
    assert len(first) == 6 and [c["item"] for c in first] == [0, 0, 0, 1, 1, 1]
    res = select_rejection(ITEMS, first, cfg)
    assert all(len(r["messages"][1]["content"]) % 2 == 0 for r in res.rows)
    assert res.report["verified"] == sum(c["verified"] for c in first)
    assert res.report["generated"] == res.report["kept"] + sum(res.report["dropped"].values())


def test_load_seed_tasks_names_the_bad_line(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "ok"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"s.jsonl:2: field 'instruction'"):
        load_seed_tasks(seeds)


# ------------------------------------------------------------------------------ files, config, CLI

def test_write_dataset_is_atomic_and_writes_the_report_beside(tmp_path):
    out = tmp_path / "out.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "provenance": {"verified": True}}
    report = write_dataset(SynthResult([row], {"mode": "rejection", "kept": 1}), out)
    assert report == Path(f"{out}.report.json") and json.loads(report.read_text())["kept"] == 1
    assert load_records(out).kind == "chat"
    before = out.read_bytes()
    with pytest.raises(TypeError):
        write_dataset(SynthResult([{**row, "provenance": {"bad": {1, 2}}}], {}), out)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.report.json"]  # no temp file left


def test_a_score_rule_takes_its_scorer_from_the_caller(tmp_path):
    """The reward model is above generation: run_synth asks its caller for the scorer, before loading the teacher."""
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": "q", "answer": "1"}])
    cfg = build_config(SynthConfig, None, ["mode=rejection", "output=o.jsonl", f"rejection.prompts={src}",
                                           "rejection.filters.score.reward_model=rm",
                                           "rejection.filters.score.min=0.5"])
    with pytest.raises(ValueError, match="score.min is set but no scorer was given"):
        run_synth(cfg)

    class Built(Exception):
        pass

    seen = []

    def make_scorer(rules):
        seen.append((rules.score.reward_model, rules.score.min))
        raise Built

    with pytest.raises(Built):
        run_synth(cfg, make_scorer=make_scorer)
    assert seen == [("rm", 0.5)]


@pytest.mark.parametrize("overrides,message", [
    (["mode=rejection"], "mode 'rejection' needs a 'rejection' section"),
    (["mode=rejection", "rejection.prompts=x.jsonl", "self_instruct.seeds=s.jsonl"], "remove it"),
    (["mode=bogus"], "mode: must be one of"),
    (["mode=rejection", "rejection.prompts=x.jsonl", "rejection.k=0"], "rejection.k"),
    (["mode=rejection", "rejection.prompts=x.jsonl", "rejection.extract=(["], "not a valid regex"),
    (["mode=rejection", "rejection.prompts=x.jsonl", "rejection.bogus=1"], "rejection.bogus: unknown key"),
])
def test_bad_config_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_config(SynthConfig, None, ["output=o.jsonl", *overrides])


def test_shipped_synth_recipes_validate_and_their_files_exist():
    for name in ("synth_rejection", "synth_self_instruct"):
        cfg = build_config(SynthConfig, ROOT / "recipes" / f"{name}.yaml")
        src = cfg.rejection.prompts if cfg.rejection else cfg.self_instruct.seeds
        assert (ROOT / src).is_file()
    assert len(load_seed_tasks(ROOT / "recipes/data/synth_seed_tasks.jsonl")) >= 10


def test_cli_synth_rejection_writes_rows_and_report(tmp_path, tiny_dir, capsys):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"say {i}", "answer": str(i)} for i in range(3)])
    out = tmp_path / "syn.jsonl"
    code = main(["synth", "mode=rejection", f"output={out}", f"teacher.name={tiny_dir}", f"rejection.prompts={src}",
                 "rejection.k=2", "rejection.verify=false", "rejection.sampling.max_new_tokens=4"])
    assert code == 0
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["generated"] == 6 and report["teacher"] == str(tiny_dir) and report["source_sha256"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == report["kept"] and all(r["provenance"]["source"] == str(src) for r in rows)
    assert "prompts x k=2" in capsys.readouterr().out


def test_cli_synth_bad_input_exits_2_with_the_reason(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q"}])
    assert main(["synth", "mode=rejection", "output=o.jsonl", f"rejection.prompts={bad}"]) == 2
    assert "bad.jsonl:1:answer: expected a string" in capsys.readouterr().err
    assert main(["synth", "mode=rejection", "output=o.jsonl"]) == 2
    assert "needs a 'rejection' section" in capsys.readouterr().err
