"""The `posttrain` command line, driven through main() on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from posttrain.cli import main


@pytest.fixture
def files(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": f"{i}"}]}) + "\n"
                            for i in range(12)))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n" for i in range(3)))
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "Rivers carry water to the sea."}) + "\n")
    return {"chat": chat, "task": task, "text": text}


def test_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for verb in ("sft", "pretrain", "eval", "generate", "chat", "merge", "data"):
        assert verb in out


NOISE = ("Failed to load", "_C_mxfp8", "_C_cutlass", "_pytree", "torchao")  # torchao's import-time warnings


def test_first_commands_print_no_torchao_warnings(tiny_dir):
    """transformers imports torchao when it is installed; a fresh user's first commands must not show it."""
    root = Path(__file__).resolve().parents[1]
    runs = (["--help"], ["data", "inspect", str(root / "data/quickstart/train.jsonl"), "--n", "1"],
            ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2"])
    for argv in runs:
        proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *argv], capture_output=True, text=True,
                              check=True)
        noise = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
        assert noise == [], f"posttrain {' '.join(argv)} printed: {noise}"
        if argv[0] == "data":
            assert "carry loss" in proc.stdout  # inspect really loaded the default tokenizer
    assert json.loads(proc.stdout.splitlines()[0])  # generate really loaded the model and decoded


def test_cli_parser_and_model_load_do_not_import_torchao(tiny_dir):
    code = f"""
import importlib.util, sys
found = importlib.util.find_spec("torchao") is not None
import posttrain.cli
posttrain.cli.build_parser()
from posttrain.models import load_model
from posttrain.adapters import AdapterConfig, apply_adapter
model, tok = load_model({str(tiny_dir)!r})
apply_adapter(model, AdapterConfig(method="lora", r=2), tok)
assert "torchao" not in sys.modules, "torchao imported"
assert (importlib.util.find_spec("torchao") is not None) == found, "torchao left hidden"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_data_inspect_marks_loss_tokens(files, tiny_dir, capsys):
    assert main(["data", "inspect", str(files["chat"]), "--model", str(tiny_dir), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "12 valid records of kind 'chat'" in out
    assert "[[0<|im_end|>]]" in out.replace(" ", "")
    assert "[[" not in out.split("assistant")[0]  # nothing before the assistant turn carries loss


def test_bad_override_exits_2_and_names_the_key(capsys):
    assert main(["sft", "data.train=x.jsonl", "adapter.r=-1"]) == 2
    assert "adapter.r" in capsys.readouterr().err


def test_missing_data_file_is_a_clear_error(tmp_path, tiny_dir, capsys):
    code = main(["sft", f"model.name={tiny_dir}", f"data.train={tmp_path}/nope.jsonl",
                 f"output_dir={tmp_path}/run", "eval.before=false"])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_sft_then_merge_then_eval_compare(tmp_path, tiny_dir, files, capsys):
    run = tmp_path / "run"
    assert main(["sft", f"model.name={tiny_dir}", "model.dtype=fp32", f"data.train={files['chat']}",
                 f"output_dir={run}", "train.max_steps=2", "train.progress=false", "train.max_tokens=64"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    merge_cfg = tmp_path / "merge.yaml"
    merge_cfg.write_text(f"source: {run}\nout: {tmp_path / 'merged2'}\n")
    assert main(["merge", "--config", str(merge_cfg)]) == 0
    assert (tmp_path / "merged2" / "config.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(merged)  # plain transformers, no PEFT
    assert type(plain).__name__ == "LlamaForCausalLM"
    out_dir = tmp_path / "eval"
    assert main(["eval", "--model", str(merged), "--compare", str(tiny_dir), "--dtype", "fp32",
                 "--task", f"{files['task']}:exact_match", "--perplexity", str(files["text"]),
                 "--out", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert "task" in table and "text_ppl" in table
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results) == {str(merged), str(tiny_dir)}
    assert (out_dir / "eval.png").stat().st_size > 1000


def test_generate_prints_json_lines(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--dtype", "fp32", "-p", "hi", "-p", "hello there",
                 "--max-new-tokens", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in lines] == ["hi", "hello there"]
    assert all(isinstance(r["output"], str) for r in lines)


def test_sam_build_then_generate_with_corpus_matches_plain(tmp_path, tiny_dir, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"text": "def add(a, b):\n    return a + b\n"}) + "\n")
    assert main(["sam", "build", str(corpus), "--model", str(tiny_dir), "--out", str(tmp_path / "c.npz")]) == 0
    assert "1 documents" in capsys.readouterr().out
    outs = {}
    for extra in ([], ["--decoding", "sam", "--corpus", str(tmp_path / "c.npz"), "--stats"],
                  ["--decoding", "lookup"]):
        assert main(["generate", "--model", str(tiny_dir), "--dtype", "fp32", "-p", "def add(a, b):",
                     "--max-new-tokens", "12", *extra]) == 0
        captured = capsys.readouterr()
        outs[tuple(extra[:2])] = captured.out
        if "--stats" in extra:
            assert json.loads(captured.err.strip().splitlines()[-1])["tokens_per_forward"] >= 1
    assert len(set(outs.values())) == 1  # greedy: every decoding gives the same text


def test_corpus_without_sam_is_refused(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "-p", "x", "--corpus", "c.npz"]) == 2
    assert "--decoding sam" in capsys.readouterr().err


def test_chat_streams_replies_and_keeps_history(tiny_dir, monkeypatch, capsys):
    lines = iter(["hello", "and again", "/reset", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    import posttrain.generate.engine as engine

    real = engine.generate

    def spy(model, tok, prompts, cfg, stream=None):
        seen.append(prompts[0])
        return real(model, tok, prompts, cfg, stream=stream)

    monkeypatch.setattr(engine, "generate", spy)
    assert main(["chat", "--model", str(tiny_dir), "--dtype", "fp32", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("bot> ") == 2
    assert "hello" in seen[1] and "and again" in seen[1]  # the second turn carries the first


def test_print_config_shows_every_key_with_overrides_applied(capsys):
    import yaml

    assert main(["sft", "--print-config", "train.lr=3e-4", "adapter.method=dora"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 3e-4 and cfg["adapter"]["method"] == "dora"
    assert {"model", "adapter", "data", "train", "eval", "ewc"} <= set(cfg)


def test_flag_verbs_take_a_config_file_and_overrides(tmp_path, tiny_dir, capsys):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: {tiny_dir}\ndtype: fp32\nmax_new_tokens: 2\nprompt: [hi]\n")
    assert main(["generate", "--config", str(cfg), "max_new_tokens=3"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["prompt"] == "hi"
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_new_tokenz: 3\n")
    assert main(["generate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokenz" in err and "max_new_tokens" in err
    assert main(["merge"]) == 2 and "usage: posttrain merge" in capsys.readouterr().err


def test_kb_build_search_and_eval_closed_book_vs_rag(tmp_path, tiny_dir, capsys):
    doc = tmp_path / "notes.md"
    doc.write_text("# Island\n\nThe capital of Vessarin is Hollowmere.\n\n# Food\n\nTarrow stew is the dish.\n")
    triples = tmp_path / "kg.tsv"
    triples.write_text("Vessarin\thas capital\tHollowmere\n")
    assert main(["kb", "build", str(doc), "--triples", str(triples), "--out", str(tmp_path / "kb")]) == 0
    assert "3 chunks from 2 files" in capsys.readouterr().out
    assert main(["kb", "search", str(tmp_path / "kb"), "capital town", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "notes.md:3" in out and "kg.tsv:Vessarin" in out and "notes.md:7" not in out
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"prompt": "What is the capital?", "answer": "Hollowmere", "gold": "notes.md:3"}\n')
    for extra in ([], ["--closed-book"]):
        assert main(["kb", "eval", str(tmp_path / "kb"), "--qa", str(qa), "--model", str(tiny_dir),
                     "--max-new-tokens", "3", "--out", str(tmp_path / "r.json"), *extra]) == 0
        scores = json.loads(capsys.readouterr().out)
        assert scores["n"] == 1 and 0 <= scores["f1"] <= 1
        assert ("recall@3" in scores) == (not extra)
    assert json.loads((tmp_path / "r.json").read_text())["predictions"][0]["retrieved"] == []
    assert main(["kb", "ask", str(tmp_path / "kb"), "What is the capital?", "--model", str(tiny_dir),
                 "--max-new-tokens", "3", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "[1]" in out and ("cited: " in out or "note: the model cited no" in out)
    assert main(["kb", "build", "--out", str(tmp_path / "kb2")]) == 2
    assert "give documents" in capsys.readouterr().err


def test_data_inspect_renders_unpaired_records(tmp_path, tiny_dir, capsys):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "say 1", "completion": "1", "label": True}) + "\n"
                    + json.dumps({"prompt": "say 2", "completion": "no", "label": "no"}) + "\n")
    assert main(["data", "inspect", str(path), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "1 valid records of kind 'unpaired', 1 invalid" in out
    assert "u.jsonl:2: field 'label' must be true or false" in out
    assert "[[1<|im_end|>]]" in out.replace(" ", "")


def test_data_inspect_of_pairs_counts_them_without_loading_a_tokenizer(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": r}) + "\n" for r in ("b", 5)))
    assert main(["data", "inspect", str(path), "--model", "./no/such/model"]) == 0  # never loaded
    out = capsys.readouterr().out
    assert "1 valid records of kind 'preference', 1 invalid" in out and "p.jsonl:2:" in out


# ------------------------------------------------------------------------------ feedback


def test_feedback_export_writes_what_the_dpo_and_kto_loaders_read(tmp_path, tokenizer, capsys):
    from posttrain.data.examples import load_pairs, load_unpaired
    from tests.data.test_feedback import populate

    db = tmp_path / "fb.db"
    populate(db)
    rules = tmp_path / "rules.yaml"
    rules.write_text("near_dedup: {enabled: false}\n")
    pairs, kto = tmp_path / "out" / "pairs.jsonl", tmp_path / "out" / "kto.jsonl"
    assert main(["feedback", "export", "--db", str(db), "--out", str(pairs), "--since", "2000-01-01",
                 "--rules", str(rules)]) == 0
    assert "7 feedback rows -> 3 preference pairs" in capsys.readouterr().out
    assert main(["feedback", "export", "--db", str(db), "--out", str(kto), "--kind", "kto", "--rules", str(rules)]) == 0
    assert "3 KTO examples (superseded 1" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [  # atomic: no temp files left behind
        "kto.jsonl", "kto.jsonl.report.json", "pairs.jsonl", "pairs.jsonl.report.json"]
    assert load_pairs(tokenizer, str(pairs), max_length=128, skip_invalid=False)[1]["pairs"] == 3
    groups, report = load_unpaired(tokenizer, str(kto), max_length=128, skip_invalid=False)
    assert report["kind"] == "unpaired" and report["examples"] == 3 and report["desirable"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--db", "{tmp}/missing.db", "--out", "{tmp}/o.jsonl"], "missing.db: no such file"),
    (["--db", "{db}", "--out", "{tmp}/o.jsonl", "--since", "last week"], "since: 'last week' is not an ISO date"),
    (["--db", "{db}", "--out", "{tmp}/o.jsonl", "--since", "2999-01-01"], "no usable choices between two replies"),
])
def test_feedback_export_errors_are_clear(tmp_path, argv, message, capsys):
    from tests.data.test_feedback import populate

    db = tmp_path / "fb.db"
    populate(db)
    argv = [a.format(tmp=tmp_path, db=db) for a in argv]
    assert main(["feedback", "export", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_serve_stores_feedback_in_the_model_dir_by_default(tmp_path, tiny_dir, monkeypatch, capsys):
    import shutil

    import uvicorn

    model = tmp_path / "run"
    shutil.copytree(tiny_dir, model)
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.chdir(tmp_path)
    assert main(["serve", str(model), "--max-n", "2"]) == 0
    assert apps[-1].state.feedback_store.target == str(model / "serve" / "feedback.db")
    assert (model / "serve" / "feedback.db").is_file() and "(PII redacted)" in capsys.readouterr().out
    assert main(["serve", str(model), "--feedback-db", "off"]) == 0 and apps[-1].state.feedback_store is None
    url = tmp_path / "elsewhere.db"
    assert main(["serve", str(model), "--feedback-db", str(url), "--no-redact-feedback"]) == 0
    assert apps[-1].state.feedback_store.target == str(url) and "PII" not in capsys.readouterr().out
