"""Tables, PNG plots and atomic JSON."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess

import pytest

from posttrain.eval.report import bar_chart, format_table, loss_curve, metric_table, read_metrics
from posttrain.fileio import write_json_atomic
from posttrain.stages import verbs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULTS = {"base": {"gsm": 0.25, "ppl": 22.2712}, "tuned": {"gsm": 0.5, "ppl": 20.0, "f1": 0.1}}


def test_format_table_two_models_has_delta():
    table = format_table(RESULTS)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "tuned", "delta"]
    assert lines[2].split() == ["gsm", "0.2500", "0.5000", "+0.2500"]
    assert lines[3].split() == ["ppl", "22.2712", "20.0000", "-2.2712"]
    assert lines[4].split() == ["f1", "-", "0.1000", "-"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


def test_metric_table_is_the_input_model_then_each_stage_after():
    state = {"stages": {"sft": {"metrics_before": {"acc": 0.1}, "metrics": {"acc": 0.4}},
                        "export": {"metrics": {}},
                        "dpo": {"metrics_before": {"acc": 0.4}, "metrics": {"acc": 0.5, "ppl": 9.0}}}}
    assert metric_table(state) == {"input": {"acc": 0.1}, "sft": {"acc": 0.4}, "dpo": {"acc": 0.5, "ppl": 9.0}}
    assert list(metric_table(state)) == ["input", "sft", "dpo"]
    assert metric_table({"stages": {"a": {"metrics": {}}}}) == {}


def test_format_table_columns_order_and_single_model():
    flipped = format_table(RESULTS, columns=["tuned", "base"]).splitlines()
    assert flipped[2].split() == ["gsm", "0.5000", "0.2500", "-0.2500"]
    single = format_table({"m": {"acc": 1234.5}}).splitlines()
    assert single[0].split() == ["metric", "m"] and single[2].split() == ["acc", "1234.50"]
    with pytest.raises(KeyError, match="nope"):
        format_table(RESULTS, columns=["nope"])


def test_bar_chart_writes_png_atomically(tmp_path):
    out = bar_chart(RESULTS, tmp_path / "plots" / "eval.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(tmp_path / "plots") == ["eval.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="no metrics"):
        bar_chart({"a": {}}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_loss_curve_reads_train_and_eval_rows(tmp_path):
    rows = [{"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7},
            {"step": 3, "loss": 1.2}, {"step": 3, "tokens_per_s": 100}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_metrics(path) == ([(1, 2.0), (2, 1.5), (3, 1.2)], [(2, 1.7)])
    png = loss_curve(path, tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_loss_curve_errors_name_file_line_field(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2:step"):
        loss_curve(path, tmp_path / "x.png")
    path.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no rows with 'loss'"):
        loss_curve(path, tmp_path / "x.png")
    path.write_text('{"step": 1, "loss": "high"}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1:loss"):
        read_metrics(path)


def test_write_json_atomic_roundtrip_and_failure_keeps_old(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json_atomic(path, {"a": {"b": 1.5}, "name": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": {"b": 1.5}, "name": "ü"}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text(encoding="utf-8"))["a"] == {"b": 1.5}
    assert os.listdir(path.parent) == ["results.json"]


def test_metric_curves_plot_the_keys_rows_have(tmp_path):
    from posttrain.eval.report import metric_curves

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "reward": i / 10, "kl": 0.01 * i}) + "\n" for i in range(1, 6)))
    png = metric_curves(path, tmp_path / "rl.png", ["reward", "kl", "missing"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows with any of"):
        metric_curves(path, tmp_path / "none.png", ["missing"])


# --- pipeline report -------------------------------------------------------------------------

HOSTILE = '<script>alert("x")</script> & <img src=https://evil.example/x.png>'


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_pipeline_dir(root, stopped: bool = False):
    """A hand-written pipeline output dir: sft -> dpo -> grpo -> prune -> distill -> quantize -> export.

    stopped=True: the quantize gate fails (with a hostile message), export is never reached, and sft
    was skipped (reused, no metrics.jsonl).
    """
    out = root / "out"
    gate_ok = {"metric": "acc", "min": 0.1, "max": None, "relative_to_previous": False, "label": "acc",
               "value": 0.41, "passed": True}
    stages = {
        "sft": {"stage": "sft", "verb": "sft", "status": "done", "seconds": 12.5, "gates": [gate_ok],
                "metrics_before": {"acc": 0.25, "ppl": 22.27}, "metrics": {"acc": 0.41, "ppl": 19.5},
                "outputs": {"train": {"steps": 3, "train_loss": 1.2, "tokens_per_s": 640.0}}},
        "dpo": {"stage": "dpo", "verb": "dpo", "status": "done", "seconds": 20.0,
                "metrics_before": {"acc": 0.41, "ppl": 19.5}, "metrics": {"acc": 0.47, "ppl": 19.9}},
        "grpo": {"stage": "grpo", "verb": "grpo", "status": "done", "seconds": 30.0, "metrics": {"acc": 0.5}},
        "prune": {"stage": "prune", "verb": "prune", "status": "done", "seconds": 5.0, "metrics": {},
                  "outputs": {"pruning": {"params_before": 134_515_008, "nonzero_params_after": 100_000_000},
                              "L0": 2.9, "loss_after_prune": 4.2, "recovery": {"best_eval_loss": 3.1}}},
        "distill": {"stage": "distill", "verb": "distill", "status": "done", "seconds": 9.0,
                    "metrics_before": {"acc": 0.3}, "metrics": {"acc": 0.45},
                    "outputs": {"trainable": {"total": 100_000_000}, "eval_teacher": {"acc": 0.5}}},
        "quantize": {"stage": "quantize", "verb": "quantize", "status": "done", "seconds": 3.0,
                     "metrics_before": {"acc": 0.45, "ppl": 21.0}, "metrics": {"acc": 0.44, "ppl": 21.3},
                     "outputs": {"weight_bytes_before": 269_000_000, "weight_bytes_after": 141_000_000}},
        "export": {"stage": "export", "verb": "export", "status": "done", "seconds": 4.0, "metrics": {},
                   "outputs": {"gguf-q8_0": {"path": str(out / "export" / "model-q8_0.gguf"), "size_bytes": 145_000_000,
                                             "check": {"ppl": 22.3, "ok": True}},
                               "hf": {"path": str(out / "export" / "final"), "size_bytes": 270_000_000}}},
    }
    if stopped:
        stages["sft"]["status"] = "skipped"
        stages["quantize"].update(status="failed_gate", error="gate failed after stage quantize: " + HOSTILE,
                                  gates=[{**gate_ok, "min": 0.9, "passed": False, "value": 0.44}])
        del stages["export"]
    plan = [{"stage": name, "verb": name} for name in ("sft", "dpo", "grpo", "prune", "distill", "quantize", "export")]
    out.mkdir(parents=True)
    data = {"arith": {"name": "arith", "status": "done", "path": str(out / "data" / "arith.jsonl"), "rows": 2000,
                      "kept": 1958, "dropped": 42, "seconds": 1.5}}
    (out / "pipeline.json").write_text(json.dumps({"name": "demo & co", "data": data, "stages": stages, "plan": plan}))
    if not stopped:
        _jsonl(out / "sft" / "metrics.jsonl", [{"step": i, "loss": 2.0 / i, "lr": 1e-4, "tokens": 100 * i}
                                               for i in range(1, 4)] + [{"step": 3, "eval_loss": 1.1}])
    _jsonl(out / "dpo" / "metrics.jsonl", [{"step": i, "loss": 0.69 - 0.05 * i, "rewards/chosen": 0.1 * i,
                                            "rewards/margin": 0.2 * i, "rewards/accuracy": 0.5 + 0.1 * i}
                                           for i in range(1, 5)])
    _jsonl(out / "grpo" / "metrics.jsonl", [{"step": i, "reward": 0.1 * i, "kl": 0.01 * i, "kl_coef": 0.05,
                                             "actor/loss": 0.3} for i in range(1, 6)])
    return out


def _page_parts(text):
    """(tags, src/href/action values) of real elements, as a browser parses the page."""
    from html.parser import HTMLParser

    tags, urls = [], []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append(tag)
            urls.extend(v or "" for k, v in attrs if k in ("src", "href", "action", "srcset", "poster"))

    Parser().feed(text)
    return tags, urls


def _external_links(text):
    """Every src/href of the page that is not an embedded data: URI; also url(...) in the CSS."""
    import re

    tags, urls = _page_parts(text)
    return [u for u in urls if not u.startswith("data:image/png;base64,")] + re.findall(r"url\(|@import", text)


def test_pipeline_report_has_every_section(tmp_path):
    from posttrain.eval.report import write_pipeline_report

    out = make_pipeline_dir(tmp_path)
    path = write_pipeline_report(out, verbs("compress"))
    assert path == out / "report" / "report.html"
    text = path.read_text(encoding="utf-8")
    for name in ("sft", "dpo", "grpo", "prune", "distill", "quantize", "export"):
        assert f"<td>{name}</td>" in text
    assert "demo &amp; co" in text and "status: <b>done</b>" in text and "total time 85.0 s" in text
    assert ">0.4100<" in text and ">19.5000<" in text and "+0.1600" in text  # sft acc and its delta
    assert "acc = 0.4100 (needs \u2265 0.1)" in text  # the gate outcome
    assert ">141.00<" in text and ">269.00<" in text  # quantize weight MB before/after
    assert ">2.9000<" in text and ">4.2000<" in text and ">3.1000<" in text  # prune L0, pruned, recovered
    assert "export/model-q8_0.gguf" in text and "145.0 MB" in text and "ppl=22.3000" in text
    assert "steps 3, final train loss 1.2000, tokens/s 640" in text  # the sft train summary
    assert "<td>arith</td>" in text and ">1,958<" in text and ">42<" in text and "data/arith.jsonl" in text
    assert text.count('<img src="data:image/png;base64,') == 5
    assert not _external_links(text) and "<script" not in text.lower()
    pngs = sorted(p.name for p in (out / "report").glob("*.png"))
    assert pngs == ["compression.png", "curves-dpo.png", "curves-grpo.png", "curves-sft.png", "metrics.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in (out / "report").glob("*.png"))
    assert sorted(os.listdir(out / "report")) == sorted(pngs + ["report.html"])  # no temp files left


def test_pipeline_report_of_a_stopped_run_escapes_and_shows_dashes(tmp_path):
    from posttrain.eval.report import write_pipeline_report

    out = make_pipeline_dir(tmp_path, stopped=True)
    (out / "report").mkdir()
    (out / "report" / "curves-old.png").write_bytes(PNG_MAGIC)  # a figure of an earlier run: removed
    text = write_pipeline_report(out, verbs("compress")).read_text(encoding="utf-8")
    assert "stopped by a gate after stage quantize" in text.replace("</b>", "")
    assert HOSTILE not in text and not _external_links(text)
    assert set(_page_parts(text)[0]) <= {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3",
                                         "p", "b", "span", "div", "table", "thead", "tbody", "tr", "th", "td", "img"}
    assert text.count(html.escape(HOSTILE)) == 1  # shown as text under the failed gate
    assert '<span class="badge failed">failed</span> acc = 0.4400 (needs \u2265 0.9)' in text
    assert '<span class="badge not_reached">not reached</span>' in text  # export never ran
    assert "reused; took 12.5 s" in text and "total time 68.5 s" in text  # the skipped sft is not counted
    assert "\u2014 (no export stage finished)" in text
    assert not (out / "report" / "curves-old.png").exists() and not (out / "report" / "curves-sft.png").exists()
    # an error in a stage: its message is shown (escaped) in the status cell
    state = json.loads((out / "pipeline.json").read_text())
    state["stages"]["quantize"].update(status="error", error="RuntimeError: " + HOSTILE, gates=[])
    (out / "pipeline.json").write_text(json.dumps(state))
    text = write_pipeline_report(out, verbs("compress")).read_text(encoding="utf-8")
    assert "status: <b>error in stage quantize</b>" in text and "<script" not in text.lower()
    assert f'<span class="badge error">error</span><div class="msg">RuntimeError: {html.escape(HOSTILE)}</div>' in text


def test_pipeline_report_bad_inputs(tmp_path):
    from posttrain.eval.report import write_pipeline_report

    with pytest.raises(FileNotFoundError, match="no pipeline.json"):
        write_pipeline_report(tmp_path, verbs("compress"))
    (tmp_path / "pipeline.json").write_text('{"name": "x",\n "stages": [}')
    with pytest.raises(ValueError, match=r"pipeline\.json:2: not valid JSON"):
        write_pipeline_report(tmp_path, verbs("compress"))
    (tmp_path / "pipeline.json").write_text('{"name": "x", "stages": {"a": 3}}')
    with pytest.raises(ValueError, match="stages.a: expected an object"):
        write_pipeline_report(tmp_path, verbs("compress"))
    # a broken metrics.jsonl is named in the page; the rest still renders
    (tmp_path / "pipeline.json").write_text('{"name": "x", "stages": {"a": {"verb": "sft", "status": "done"}}}')
    _jsonl(tmp_path / "a" / "metrics.jsonl", [{"loss": 1.0}])
    text = write_pipeline_report(tmp_path, verbs("compress")).read_text()
    assert "metrics.jsonl:1:step: a row with &#x27;loss&#x27; needs a numeric step" in text
    assert "\u2014 (no stage recorded eval metrics)" in text


def test_report_cli_prints_the_path(tmp_path, capsys):
    from posttrain.cli import main

    out = make_pipeline_dir(tmp_path)
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report" / "report.html")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no pipeline.json" in capsys.readouterr().err


def test_every_embedded_image_decodes(tmp_path):
    import base64
    import io
    import re

    from PIL import Image

    from posttrain.eval.report import write_pipeline_report

    text = write_pipeline_report(make_pipeline_dir(tmp_path), verbs("compress")).read_text(encoding="utf-8")
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(blobs) == 5
    for blob in blobs:
        with Image.open(io.BytesIO(base64.b64decode(blob, validate=True))) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _chromium_render(page, png, profile):
    """Screenshot `page` headless; returns the page's console lines (Chromium logs them to stderr as
    `INFO:CONSOLE(...)` with --enable-logging=stderr, errors and uncaught exceptions included)."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}",
                           f"--screenshot={png}", "--window-size=1200,2000", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def _ink(png):
    """(distinct colours, share of pixels that are not the page background) of a screenshot."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
    background = max(colours)[1]
    return len(colours), 1 - max(colours)[0] / (rgb.size[0] * rgb.size[1]), background


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (`.ci/run` installs the Debian package)")
def test_report_renders_in_headless_chromium(tmp_path):
    from posttrain.eval.report import write_pipeline_report

    # the checks can fail: a page with console errors is caught, a blank page reads as blank
    scratch = tmp_path / "scratch.html"
    scratch.write_text('<html><body><script>console.error("deliberate"); notDefined();</script></body></html>')
    console = _chromium_render(scratch, tmp_path / "scratch.png", tmp_path / "profile")
    assert any('"deliberate"' in line for line in console), console
    assert any("Uncaught ReferenceError" in line for line in console), console
    assert _ink(tmp_path / "scratch.png")[0] == 1

    page = write_pipeline_report(make_pipeline_dir(tmp_path, stopped=True), verbs("compress"))
    shot = tmp_path / "report.png"
    assert _chromium_render(page, shot, tmp_path / "profile") == []
    colours, ink, background = _ink(shot)
    assert colours > 200 and ink > 0.05, (colours, ink)
    assert background == (255, 255, 255)
