"""Run directories under the studio's root: found, summarised, read; paths kept under the root."""

import json
import os
import sys
import time

import pytest

from posttrain.ui import runs
from posttrain.ui.jobs import Jobs
from tests.ui.helpers import job, pipeline_run, stage_run


def test_find_runs_finds_stages_and_pipelines_and_skips_what_is_not_a_run(tmp_path):
    stage_run(tmp_path / "runs" / "a")
    pipeline_run(tmp_path / "runs" / "pipe")
    stage_run(tmp_path / ".hidden" / "x")
    stage_run(tmp_path / "venv" / "x")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("")
    stage_run(tmp_path / "a" / "b" / "c" / "d" / "e")  # deeper than MAX_DEPTH
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "config.yaml").write_text("train: {lr: 1}\n")  # a config.yaml, not a run's
    stage_run(tmp_path / "runs" / "a" / "final" / "nested")  # inside a run: not entered
    found = [runs.relative(tmp_path, p) for p in runs.find_runs(tmp_path)]
    assert found == ["runs/a", "runs/pipe", "runs/pipe/a", "runs/pipe/b"]


def test_summaries_read_status_metrics_and_timing(tmp_path):
    done = stage_run(tmp_path / "done")
    row = runs.summarize(tmp_path, done, None)
    assert row["status"] == "done" and row["stage"] == "sft" and row["model"] == "models/tiny"
    assert row["metrics"] == {"steps": 5, "train_loss": 2.6, "acc": 0.5} and row["seconds"] == 12.5
    assert row["started"] == time.mktime(time.strptime("2026-01-02T03:04:05", "%Y-%m-%dT%H:%M:%S"))

    half = stage_run(tmp_path / "half", done=False, checkpoints=True)
    os.utime(half / "metrics.jsonl", (time.time() - 600, time.time() - 600))
    row = runs.summarize(tmp_path, half, None)
    assert row["status"] == "incomplete" and row["resumable"] and row["metrics"] == {"step": 5, "loss": 2.6}
    os.utime(half / "metrics.jsonl")  # written seconds ago by a run started elsewhere
    assert runs.summarize(tmp_path, half, None)["status"] == "running"
    for state in ("failed", "stopped", "lost"):
        assert runs.summarize(tmp_path, half, {"state": state, "started": 1.0, "ended": 3.0})["status"] == state
    assert runs.summarize(tmp_path, done, {"state": "failed", "started": 1.0, "ended": 3.0})["status"] == "done"

    pipe = runs.summarize(tmp_path, pipeline_run(tmp_path / "pipe"), None)
    assert pipe["kind"] == "pipeline" and pipe["status"] == "failed_gate" and pipe["seconds"] == 5.0
    assert [s["status"] for s in pipe["stages"]] == ["done", "failed_gate", "not_reached"]


def test_detail_has_config_eval_gates_and_artifacts(tmp_path):
    pipe = pipeline_run(tmp_path / "pipe")
    d = runs.detail(tmp_path, pipe / "b", None)
    assert "lr: 0.0005" in d["config"] and d["eval"] == {"before": {"acc": 0.25}, "after": {"acc": 0.5}}
    assert d["gates"][0]["passed"] and d["pipeline"] == "pipe"
    assert {"path": "pipe/b/metrics.jsonl", "size": (pipe / "b" / "metrics.jsonl").stat().st_size, "dir": False} in d["artifacts"]
    starting = tmp_path / "starting"  # a pipeline the studio just started: no pipeline.json yet
    job(starting, verb="run")
    assert runs.run_kind(starting) == "pipeline" and runs.detail(tmp_path, starting, None)["stages"] == []
    p = runs.detail(tmp_path, pipe, None)
    assert [(s["name"], s["run"]) for s in p["stages"]] == [("a", "pipe/a"), ("b", "pipe/b"), ("c", None)]
    assert "gate failed" in p["stages"][1]["error"] and p["metric_table"] == {"input": {"acc": 0.25}, "a": {"acc": 0.5},
                                                                             "b": {"acc": 0.3}}


def test_read_rows_leaves_a_line_being_written_for_later(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "note": "x"}\n{"step": 2, "lo')
    rows, offset = runs.read_rows(path)
    assert rows == [{"step": 1, "loss": 2.0}] and offset == len('{"step": 1, "loss": 2.0, "note": "x"}\n')
    with open(path, "a") as fh:
        fh.write('ss": 1.5}\nnot json\n{"step": 3, "loss": NaN}\n')
    rows, end = runs.read_rows(path, offset)
    assert rows == [{"step": 2, "loss": 1.5}, {"step": 3}] and end == path.stat().st_size
    assert runs.curve_keys_of([{"step": 1, "lr": 1, "loss": 2, "eval_loss": 1, "reward_mean": 0}]) == \
        ["loss", "eval_loss", "reward_mean"]


def test_config_diff_names_the_keys_that_differ(tmp_path):
    diff = runs.config_diff({"a": {"train": {"lr": 1, "seed": 0}, "x": 1}, "b": {"train": {"lr": 2, "seed": 0}}})
    assert diff["differ"] == ["train.lr", "x"] and diff["keys"] == ["train.lr", "train.seed", "x"]


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "runs/../../x", "~/x", "a\x00b", "link/secret"])
def test_paths_that_leave_the_root_are_refused(tmp_path, rel):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")  # a symlink inside pointing out
    with pytest.raises(runs.PathError):
        runs.inside(root.resolve(), rel)


def test_paths_under_the_root_are_resolved(tmp_path):
    assert runs.inside(tmp_path, "runs/./a/../b") == tmp_path / "runs" / "b"
    assert runs.inside(tmp_path, str(tmp_path / "x")) == tmp_path / "x"
    assert runs.inside(tmp_path, ".") == tmp_path


def test_jobs_start_stop_and_a_lost_job(tmp_path):
    """The job record follows the process: running, stopped (SIGTERM to its group), and 'lost' when a
    record says running but no such process is left (a studio restarted after a crash)."""
    fake = tmp_path / "fake-python"  # stands in for `python -m posttrain.cli VERB ...`: prints, then waits
    fake.write_text(f"#!{sys.executable}\nimport sys, time\nprint('args', sys.argv[1:], flush=True)\ntime.sleep(60)\n")
    fake.chmod(0o755)
    jobs = Jobs(tmp_path, python=str(fake))
    run = tmp_path / "runs" / "a"
    record = jobs.start(run, "sft", ["--config", "x.yaml"])
    assert record["command"] == "posttrain sft --config x.yaml" and jobs.running(run)
    with pytest.raises(RuntimeError, match="is running"):
        jobs.start(run, "sft", [])
    deadline = time.time() + 20
    while "args" not in (run / "ui" / "log.txt").read_text() and time.time() < deadline:
        time.sleep(0.05)
    jobs.stop(run)
    jobs.wait_all(20)
    deadline = time.time() + 10
    while jobs.state(run)["state"] == "running" and time.time() < deadline:
        time.sleep(0.05)
    state = jobs.state(run)
    assert state["state"] == "stopped" and state["returncode"] == -15
    log = (run / "ui" / "log.txt").read_text()
    assert "args ['-m', 'posttrain.cli', 'sft', '--config', 'x.yaml']" in log and "exit code -15 (stopped)" in log
    other = tmp_path / "runs" / "b"
    job(other, pid=2 ** 22 + 12345)  # no such process
    assert Jobs(tmp_path).state(other)["state"] == "lost"
    assert json.loads((other / "ui" / "job.json").read_text())["state"] == "running"  # reading writes nothing
