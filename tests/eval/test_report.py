"""Tables, PNG plots and atomic JSON."""

from __future__ import annotations

import json
import os

import pytest

from posttrain.eval.report import bar_chart, format_table, loss_curve, read_metrics, write_json_atomic

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
