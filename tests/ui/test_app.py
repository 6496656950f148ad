"""The studio's HTTP API: runs, streams, launch checks, and its security (paths, verbs, tokens, origins)."""

import json
import os
import time

import pytest
import yaml
from fastapi.testclient import TestClient

from posttrain.cli import main
from posttrain.ui.app import create_app
from tests.ui.helpers import job, pipeline_run, stage_run

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.chdir(root)
    (tmp_path / "outside.txt").write_text("secret")
    (root / "data").mkdir()
    (root / "data" / "t.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(3))
        + '{"messages": "oops"}\n')
    (root / "recipes").mkdir()
    (root / "recipes" / "sft.yaml").write_text(yaml.safe_dump({"stage": "sft", "output_dir": "runs/new",
                                                               "data": {"train": "data/t.jsonl"}}))
    (root / "recipes" / "filters.yaml").write_text("exact_dedup: true\n")  # not a stage recipe
    return root.resolve()


@pytest.fixture
def client(root):
    with TestClient(create_app(root), base_url="http://127.0.0.1:7860") as c:
        yield c


def launched(client, monkeypatch):
    """Replace Jobs.start: record what would run instead of running it."""
    calls = []

    def start(self, run_dir, verb, args):
        calls.append((run_dir, verb, args))
        return {"verb": verb, "args": args, "state": "running"}

    monkeypatch.setattr("posttrain.ui.jobs.Jobs.start", start)
    return calls


def test_runs_list_detail_metrics_compare_and_files(client, root):
    stage_run(root / "runs" / "a")
    stage_run(root / "runs" / "b", lr=5e-4)
    pipeline_run(root / "runs" / "pipe")
    listed = client.get("/api/runs").json()["runs"]
    assert [r["path"] for r in listed] == ["runs/a", "runs/b", "runs/pipe", "runs/pipe/a", "runs/pipe/b"]
    detail = client.get("/api/run", params={"path": "runs/a"}).json()
    assert detail["summary"]["status"] == "done" and detail["eval"]["after"] == {"acc": 0.5}
    metrics = client.get("/api/run/metrics", params={"path": "runs/a"}).json()
    assert len(metrics["rows"]) == 5 and metrics["keys"] == ["loss"]
    diff = client.get("/api/compare", params=[("path", "runs/a"), ("path", "runs/b")]).json()
    assert diff["differ"] == ["output_dir", "train.lr"]
    shown = client.get("/api/file", params={"path": "runs/a/config.yaml"})
    assert shown.status_code == 200 and "lr:" in shown.text and "sandbox" in shown.headers["content-security-policy"]
    assert client.get("/api/run", params={"path": "data"}).status_code == 404  # a directory, but no run
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "chart.js", "style.css", "index.html"):  # offline: no remote URL anywhere
        text = client.get(f"/static/{name}").text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_metrics_stream_sends_rows_then_ends(client, root):
    stage_run(root / "runs" / "a")
    with client.stream("GET", "/api/run/stream/metrics", params={"path": "runs/a"}) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        text = "".join(res.iter_text())
    events = [e for e in text.split("\n\n") if e.strip()]
    data = json.loads(events[0].split("data: ", 1)[1])
    assert len(data["rows"]) == 5 and data["keys"] == ["loss"] and events[0].startswith("id: ")
    assert events[-1] == "event: end\ndata: {}"
    offset = events[0].split("\n")[0][4:]  # a reconnect continues where it stopped
    with client.stream("GET", "/api/run/stream/metrics", params={"path": "runs/a"},
                       headers={"Last-Event-ID": offset}) as res:
        assert "".join(res.iter_text()).strip() == "event: end\ndata: {}"


def test_a_live_stream_follows_a_growing_file_and_a_trimmed_one(client, root, monkeypatch):
    run = stage_run(root / "runs" / "live", done=False)
    job(run, state="done")  # started by the studio: its job says whether it runs (not the file's age)
    live = {"on": True}
    monkeypatch.setattr("posttrain.ui.jobs.Jobs.running", lambda self, where: live["on"])
    import threading

    def grow():
        time.sleep(0.6)
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": 6, "loss": 2.4}) + "\n")
        time.sleep(0.6)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")  # a resume trims it
        time.sleep(0.6)
        live["on"] = False

    threading.Thread(target=grow).start()
    with client.stream("GET", "/api/run/stream/metrics", params={"path": "runs/live"}) as res:
        events = [e for e in "".join(res.iter_text()).split("\n\n") if e.strip()]
    steps = [[r["step"] for r in json.loads(e.split("data: ", 1)[1])["rows"]] if "event:" not in e else e.split("\n")[0]
             for e in events]
    assert steps == [[1, 2, 3, 4, 5], [6], "event: reset", [1], "event: end"]


def test_schema_validate_and_launch(client, root, monkeypatch):
    calls = launched(client, monkeypatch)
    recipes = client.get("/api/recipes").json()["recipes"]
    assert recipes == [{"path": "recipes/sft.yaml", "pipeline": False, "verb": "sft"}]
    schema = client.get("/api/schema", params={"verb": "sft", "recipe": "recipes/sft.yaml"}).json()
    values = schema["values"]
    assert values["data.train"] == "data/t.jsonl" and values["output_dir"] == "runs/new"
    bad = client.post("/api/validate", json={"verb": "sft", "values": {**values, "train.lr": "abc"}}).json()
    assert bad == {"ok": False, "error": "invalid config", "errors": [
        {"key": "train.lr", "message": "Input should be a valid number, unable to parse string as a number"}]}
    assert client.post("/api/validate", json={"verb": "sft", "values": values}).json()["ok"]
    answer = client.post("/api/launch", json={"verb": "sft", "values": values}).json()
    assert answer["ok"] and answer["run"] == "runs/new"
    assert calls == [(root / "runs" / "new", "sft", ["--config", "runs/new/ui/launch.yaml"])]
    assert yaml.safe_load((root / "runs" / "new" / "ui" / "launch.yaml").read_text())["data"]["train"] == "data/t.jsonl"
    stage_run(root / "runs" / "new")  # now it holds a run
    taken = client.post("/api/launch", json={"verb": "sft", "values": values}).json()
    assert not taken["ok"] and taken["errors"][0]["key"] == "output_dir" and "already holds a run" in \
        taken["errors"][0]["message"]
    assert client.post("/api/launch", json={"verb": "sft", "values": values, "overwrite": True}).json()["ok"]
    assert calls[-1][2] == ["--config", "runs/new/ui/launch.yaml", "--overwrite"]


@pytest.mark.parametrize("change, key", [
    ({"output_dir": "../escape"}, "output_dir"),
    ({"output_dir": "/tmp/elsewhere"}, "output_dir"),
    ({"output_dir": "."}, "output_dir"),
    ({"data.train": "/etc/passwd"}, "data.train"),
    ({"data.eval": "data/../../outside.txt"}, "data.eval"),
    ({"model.name": "~/models/x"}, "model.name"),
    ({"output_dir": "runs"}, "output_dir"),  # holds other runs: a run there would hide them
])
def test_launch_keeps_every_path_under_the_root(client, root, monkeypatch, change, key):
    stage_run(root / "runs" / "old")
    calls = launched(client, monkeypatch)
    values = client.get("/api/schema", params={"verb": "sft", "recipe": "recipes/sft.yaml"}).json()["values"]
    answer = client.post("/api/launch", json={"verb": "sft", "values": {**values, **change}}).json()
    assert not answer["ok"] and [e["key"] for e in answer["errors"]] == [key] and calls == []


def test_only_the_projects_verbs_start(client, monkeypatch):
    calls = launched(client, monkeypatch)
    for verb in ("bash", "run", "serve", "eval", "../sft", "sft; rm -rf /"):
        res = client.post("/api/launch", json={"verb": verb, "values": {}})
        assert res.status_code == 400 and "unknown verb" in res.json()["error"], verb
    assert client.get("/api/schema", params={"verb": "sh"}).status_code == 400
    assert calls == []


def test_stop_and_resume(client, root, monkeypatch):
    calls = launched(client, monkeypatch)
    run = stage_run(root / "runs" / "half", done=False, checkpoints=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": "pretrain", "output_dir": "runs/half"}))
    assert client.post("/api/run/resume", json={"path": "runs/half"}).json()["run"] == "runs/half"
    assert calls == [(run, "pretrain", ["--config", "runs/half/config.yaml", "--resume"])]
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": "sft", "output_dir": "elsewhere/half"}))
    res = client.post("/api/run/resume", json={"path": "runs/half"})
    assert res.status_code == 400 and "does not name this directory" in res.json()["error"]
    assert client.post("/api/run/stop", json={"path": "runs/half"}).status_code == 409  # not running
    pipe = pipeline_run(root / "runs" / "pipe")
    assert "not started from the studio" in client.post("/api/run/resume", json={"path": "runs/pipe"}).json()["error"]
    (pipe / "ui").mkdir()
    (pipe / "ui" / "pipeline.yaml").write_text("name: x\n")
    client.post("/api/run/resume", json={"path": "runs/pipe"})
    assert calls[-1] == (pipe, "run", ["runs/pipe/ui/pipeline.yaml", "--no-serve"])


def test_pipeline_plan_and_launch(client, root, monkeypatch):
    calls = launched(client, monkeypatch)
    text = yaml.safe_dump({"name": "p", "output_dir": "runs/p", "model": "default", "stages": [
        {"name": "tune", "verb": "sft", "config": "recipes/sft.yaml", "gate": [{"metric": "acc", "min": 0.1}]},
        {"name": "check", "verb": "eval"}]})
    answer = client.post("/api/pipeline/plan", json={"yaml": text}).json()
    assert not answer["ok"] and answer["errors"] == [{"key": "stages.1", "message": (
        "eval stage: nothing to evaluate; give eval.tasks or eval.forgetting (or the pipeline's eval: section)")}]
    text = text.replace("verb: eval", "verb: sft\n  config: recipes/sft.yaml")
    plan = client.post("/api/pipeline/plan", json={"yaml": text}).json()["plan"]
    assert [(s["name"], s["action"], s["input_model"]) for s in plan["stages"]] == [
        ("tune", "run", "default"), ("check", "run", "runs/p/tune")]
    assert plan["stages"][0]["gates"][0]["min"] == 0.1
    assert client.post("/api/pipeline/launch", json={"yaml": text}).json()["run"] == "runs/p"
    assert calls == [(root / "runs" / "p", "run", ["runs/p/ui/pipeline.yaml", "--no-serve"])]
    outside = client.post("/api/pipeline/plan", json={"yaml": text.replace("runs/p", "../p")}).json()
    assert not outside["ok"] and outside["errors"][0]["key"] == "output_dir"
    bad = client.post("/api/pipeline/plan", json={"yaml": "name: [unclosed"}).json()
    assert not bad["ok"] and bad["errors"][0]["message"].startswith("not valid YAML")


def test_pipeline_editor_form_yaml_and_field_problems(client, root, monkeypatch):
    calls = launched(client, monkeypatch)
    stage_run(root / "runs" / "done")
    schema = client.get("/api/pipeline/schema").json()
    assert {"sft", "dpo", "quantize", "export", "eval"} <= {v["verb"] for v in schema["verbs"]}
    assert "scaling-fit" not in {v["verb"] for v in schema["verbs"]}  # analysis verbs are no pipeline stages
    assert schema["metrics"] == {"sft": ["acc", "train.steps", "train.train_loss"]}
    assert schema["help"]["gate.relative_to_previous"] and schema["help"]["stage.config"]
    text = ("name: p  # a comment\noutput_dir: runs/p\neval: {tasks: [{name: em, path: data/t.jsonl}]}\n"
            "stages:\n- {name: tune, verb: sft, config: recipes/sft.yaml, overrides: {train.lr: 1.0e-05}}\n")
    answer = client.post("/api/pipeline/form", json={"yaml": text}).json()
    form = answer["form"]
    assert answer["unshown"] == [] and answer["eval_metrics"] == ["em"]
    assert form["stages"][0]["overrides"] == [["train.lr", "1.0e-05"]] and form["eval"].startswith("tasks:")
    assert client.post("/api/pipeline/form", json={"yaml": text + "extra: 1\n"}).json()["unshown"] == ["extra"]
    assert client.post("/api/pipeline/form", json={"yaml": "- a list"}).json()["errors"][0]["key"] == "yaml"

    form["stages"][0]["gate"] = [{"metric": "train.train_loss", "min": "", "max": "20", "relative_to_previous": False}]
    made = client.post("/api/pipeline/yaml", json={"form": form}).json()["yaml"]
    assert yaml.safe_load(made)["stages"][0]["gate"] == [{"metric": "train.train_loss", "max": 20}]
    plan = client.post("/api/pipeline/plan", json={"form": form}).json()
    assert plan["ok"] and plan["plan"]["stages"][0]["gates"][0]["max"] == 20.0

    form["stages"][0]["gate"].append({"metric": "", "min": "5", "max": "1", "relative_to_previous": True})
    form["stages"][0]["overrides"].append(["train.epochs", "many"])
    form["stages"].append({"name": "tune", "verb": "sft", "config": "recipes/nope.yaml", "eval": True,
                           "overrides": [], "gate": []})
    bad = client.post("/api/pipeline/plan", json={"form": form}).json()
    assert not bad["ok"] and [e["key"] for e in bad["errors"]] == [
        "stages.0.gate.1.metric", "stages.0.gate.1.max"]  # pydantic first: the rest is checked once these pass
    assert bad["errors"][1]["message"] == "max 1 is below min 5: no value passes this gate"
    form["stages"][0]["gate"].pop()
    bad = client.post("/api/pipeline/plan", json={"form": form}).json()
    assert [e["key"] for e in bad["errors"]] == ["stages.1.name"]  # 'tune' used twice
    form["stages"][1]["name"] = "again"
    bad = client.post("/api/pipeline/plan", json={"form": form}).json()
    assert [e["key"] for e in bad["errors"]] == ["stages.1.config"] and "recipes/nope.yaml" in bad["errors"][0]["message"]
    form["stages"].pop()
    bad = client.post("/api/pipeline/plan", json={"form": form}).json()
    assert bad["errors"] == [{"key": "stages.0.overrides.train.epochs",
                              "message": "Input should be a valid number, unable to parse string as a number"}]
    form["stages"][0]["overrides"].pop()
    form["stages"][0]["overrides"].append(["data.train", "../../outside.txt"])
    bad = client.post("/api/pipeline/plan", json={"form": form}).json()
    assert [e["key"] for e in bad["errors"]] == ["stages.0.overrides.data.train"]
    form["stages"][0]["overrides"].pop()
    assert client.post("/api/pipeline/plan", json={"form": {"stages": 1}}).status_code == 400

    assert client.post("/api/pipeline/launch", json={"form": form}).json()["run"] == "runs/p"
    written = (root / "runs" / "p" / "ui" / "pipeline.yaml").read_text()
    assert yaml.safe_load(written)["stages"][0]["gate"] == [{"metric": "train.train_loss", "max": 20}]
    assert calls == [(root / "runs" / "p", "run", ["runs/p/ui/pipeline.yaml", "--no-serve"])]
    client.post("/api/pipeline/launch", json={"yaml": text})  # YAML as written keeps its comments
    assert (root / "runs" / "p" / "ui" / "pipeline.yaml").read_text() == text


def test_data_inspect_names_bad_rows_by_line(client, root):
    report = client.post("/api/data/inspect", json={"path": "data/t.jsonl", "model": "default", "n": 2}).json()
    assert report["valid"] == 3 and report["invalid"] == 1 and report["kind"] == "chat"
    assert report["errors"] == ["data/t.jsonl:4: field 'messages' must be a non-empty list of {role, content}; got 'oops'"]
    spans = report["records"][0]["spans"]
    assert ["a0<|im_end|>", True] in [[t.strip(), loss] for t, loss in spans]
    assert not any(loss for text, loss in spans if "q0" in text)  # the user turn carries no loss
    assert client.get("/api/data/files").json()["files"] == ["data/t.jsonl"]


@pytest.mark.parametrize("method, url, kw", [
    ("GET", "/api/run", {"params": {"path": "../"}}),
    ("GET", "/api/file", {"params": {"path": "../outside.txt"}}),
    ("GET", "/api/file", {"params": {"path": "%2e%2e/outside.txt"}}),
    ("GET", "/api/file?path=..%2Foutside.txt", {}),
    ("GET", "/api/file", {"params": {"path": "/etc/passwd"}}),
    ("GET", "/api/file", {"params": {"path": "link/outside.txt"}}),
    ("GET", "/api/schema", {"params": {"verb": "sft", "recipe": "../outside.txt"}}),
    ("POST", "/api/data/inspect", {"json": {"path": "../outside.txt"}}),
    ("POST", "/api/data/inspect", {"json": {"path": "data/t.jsonl", "model": "../"}}),
    ("POST", "/api/chat/start", {"json": {"model": "/etc"}}),
    ("GET", "/static/../app.py", {}),
])
def test_path_traversal_is_refused(client, root, method, url, kw):
    (root / "link").symlink_to(root.parent)
    res = client.request(method, url, **kw)
    assert res.status_code in (403, 404), res.text
    assert "secret" not in res.text and "create_app" not in res.text


def test_host_origin_and_content_type_checks(client):
    assert client.get("/api/info", headers={"Host": "evil.example:7860"}).status_code == 403  # DNS rebinding
    assert client.get("/api/info", headers={"Host": "localhost:7860"}).status_code == 200
    body = json.dumps({"path": "x"})
    assert client.post("/api/run/stop", content=body, headers={**JSON, "Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/run/stop", content=body, headers={**JSON, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post("/api/run/stop", content=body, headers={"Content-Type": "text/plain"}).status_code == 415
    same = client.post("/api/run/stop", content=body, headers={**JSON, "Origin": "http://127.0.0.1:7860"})
    assert same.status_code == 404  # past the checks: no run "x"


def test_a_token_guards_every_request(root):
    with TestClient(create_app(root, token="s3cret"), base_url="http://studio.lan:7860") as c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/").status_code == 401 and c.get("/static/app.js").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/?token=wrong", follow_redirects=False).status_code == 401
        opened = c.get("/?token=s3cret", follow_redirects=False)
        assert opened.status_code == 303 and "httponly" in opened.headers["set-cookie"].lower()
        assert "samesite=strict" in opened.headers["set-cookie"].lower()
        assert c.get("/api/info").status_code == 200  # the cookie now rides along


def test_cli_refuses_a_public_bind_without_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_UI_TOKEN", raising=False)
    assert main(["ui", "--root", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "needs a token" in capsys.readouterr().err
    assert main(["ui", "--root", str(tmp_path / "nope")]) == 2
    assert os.getcwd() != str(tmp_path)


def test_the_studio_must_run_in_its_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="works in its root"):
        create_app(tmp_path / "elsewhere")
