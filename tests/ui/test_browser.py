"""The studio in a real browser: headless Chromium (Debian's package) driven over the DevTools
protocol (tests/ui/cdp.py), against `posttrain ui` started as users start it.

One walk through every page, since each step builds on the last: the form refuses a bad field
beside it, starts a tiny run whose curve grows while it trains, a second run is stopped and
resumed, the two are compared, chat streams both models' replies and stores a rating and a
choice, the data page names a bad row by its line, and the pipeline editor adds a gate that the
plan then shows, round-trips through YAML, and refuses a bad gate beside its fields. Any
console error, uncaught exception or failed load on any page fails the test.

Screenshots of each page are written to the test's tmp dir; with POSTTRAIN_UI_SCREENSHOTS=DIR
they are also copied there (the README's are made with DIR=docs/ui), and the chat is shot
again with the default model beside a short LoRA run of it on the quickstart arithmetic
(trained from the studio: minutes on a CPU, so only then).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.ui.cdp import CHROMIUM, Browser

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (`.ci/run` installs Debian's package)")

SRC = Path(__file__).resolve().parents[2] / "src"


def chat_rows(n: int) -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                            {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n"
                   for i in range(n))


@pytest.fixture
def root(tmp_path, tiny_dir):
    root = tmp_path / "studio"
    shutil.copytree(tiny_dir, root / "models" / "tiny")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text(chat_rows(64))
    lines = chat_rows(4).splitlines(keepends=True)
    (root / "data" / "mixed.jsonl").write_text("".join(lines[:2]) + '{"messages": [{"role": "user"}]}\n'
                                               + "".join(lines[2:]))
    (root / "recipes").mkdir()
    recipe = {"stage": "sft", "output_dir": "runs/first", "model": {"name": "models/tiny", "dtype": "fp32"},
              "adapter": {"method": "lora", "r": 8}, "data": {"train": "data/train.jsonl"},
              "train": {"epochs": 10, "max_steps": 150, "max_tokens": 64, "lr": 1e-3, "save_every": 10,
                        "progress": False}}
    (root / "recipes" / "tiny_sft.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (root / "recipes" / "tiny_pipeline.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "output_dir": "runs/pipe", "model": "models/tiny",
        "stages": [{"name": "tune", "verb": "sft", "config": "recipes/tiny_sft.yaml",
                    "gate": [{"metric": "train.train_loss", "max": 20}]},
                   {"name": "again", "verb": "sft", "config": "recipes/tiny_sft.yaml",
                    "overrides": {"train.lr": 5e-4}}]}, sort_keys=False))
    return root


@pytest.fixture
def studio(root):
    """`posttrain ui` on a free port, as a subprocess; stopped (and its chat servers with it) after."""
    from posttrain.ports import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(root.parent / "studio.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "ui", "--root", str(root), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/api/info", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                raise AssertionError("posttrain ui did not start:\n" + (root.parent / "studio.log").read_text()[-3000:])
            time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the lifespan stops the chat servers
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    for record in root.rglob("ui/job.json"):  # runs outlive the studio by design; not a failed test's runs
        job = json.loads(record.read_text())
        if job.get("state") == "running":
            try:
                os.killpg(int(job["pid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile", width=1280, height=900, log=tmp_path / "chromium.log")
    yield b
    b.close()


def shoot(b: Browser, tmp_path: Path, name: str, full_page: bool = True) -> None:
    path = b.screenshot(tmp_path / "shots" / f"{name}.png", full_page=full_page)
    target = os.environ.get("POSTTRAIN_UI_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def set_field(b: Browser, key: str, value: str) -> None:
    b.eval(f"""(() => {{ const el = document.getElementById({json.dumps('f-' + key)}); el.value = {json.dumps(value)};
             el.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")


def clean(b: Browser, where: str) -> None:
    assert b.problems == [], f"{where}: the page logged errors: {b.problems}"


def badge(b: Browser) -> str:
    return b.eval("(document.querySelector('main .badge') || {}).textContent || ''")


def test_the_studio_in_a_browser(studio, browser, root, tmp_path):
    b = browser
    b.goto(studio + "/#/runs")
    b.wait("document.querySelector('#runs') && /No run directories/.test(document.querySelector('main').textContent)")
    clean(b, "empty runs page")

    # --- launch: a bad field is refused beside it, then a tiny run starts from the form
    b.eval("location.hash = '#/launch'")
    b.wait("document.getElementById('f-train.lr')")
    assert b.eval("document.getElementById('recipe').value") == "recipes/tiny_sft.yaml"
    set_field(b, "train.lr", "abc")
    error = b.wait("document.querySelector('[data-error=\"train.lr\"]').textContent")
    assert error == "Input should be a valid number, unable to parse string as a number"  # the CLI's words
    assert b.eval("document.querySelector('.field[data-key=\"train.lr\"]').classList.contains('invalid')")
    b.eval("document.getElementById('start').click()")  # refused: the run must not start
    b.wait("document.getElementById('form-status').textContent === '1 problem(s)'")
    assert location(b) == "#/launch" and not (root / "runs").exists()
    b.eval("document.getElementById('f-train.lr').scrollIntoView({block: 'center'})")
    shoot(b, tmp_path, "launch", full_page=False)
    set_field(b, "train.lr", "0.001")
    b.wait("document.querySelector('[data-error=\"train.lr\"]').textContent === ''")
    b.eval("document.getElementById('start').click()")
    b.wait("location.hash === '#/run/runs/first'")
    clean(b, "launch page")

    # --- the run page: the curve grows while the run trains (server-sent events), then the run is done
    seen = []  # (points on the loss curve, status) each time either changed
    deadline = time.time() + 240
    while time.time() < deadline:
        points = b.eval("Number((document.querySelector('#curves svg') || {dataset: {}}).dataset.points || 0)")
        status = badge(b)
        if not seen or seen[-1] != (points, status):
            seen.append((points, status))
        if status == "done":
            break
        time.sleep(0.1)
    growing = [p for p, s in seen if s == "running" and p > 0]
    assert len(growing) >= 3 and growing == sorted(growing) and growing[-1] > growing[0], seen
    assert seen[-1][1] == "done", seen
    b.wait("Number(document.querySelector('#curves svg').dataset.points) === 150")
    b.wait("/exit code 0/.test(document.getElementById('log').textContent)")
    assert "run directory: runs/first" in b.eval("document.getElementById('log').textContent")
    assert "runs/first/final/adapter_model.safetensors" in b.eval("document.querySelector('main').textContent")
    shoot(b, tmp_path, "run")
    clean(b, "run page")

    # --- a second run, stopped after its first checkpoint and resumed with --resume
    b.eval("location.hash = '#/launch'")
    b.wait("document.getElementById('f-output_dir')")
    set_field(b, "output_dir", "runs/second")
    set_field(b, "train.lr", "0.003")
    set_field(b, "train.max_steps", "200")
    b.wait("document.getElementById('form-status').textContent === 'valid'")
    b.eval("document.getElementById('start').click()")
    b.wait("location.hash === '#/run/runs/second' && document.getElementById('stop')")
    deadline = time.time() + 300
    while not list((root / "runs" / "second" / "checkpoints").glob("step-*/state.json")):
        assert time.time() < deadline and not (root / "runs" / "second" / "manifest.json").exists()
        time.sleep(0.05)
    b.eval("document.getElementById('stop').click()")
    b.wait("document.getElementById('resume')")
    assert badge(b) == "stopped"
    b.eval("document.getElementById('resume').click()")
    b.wait("/--resume/.test(document.querySelector('main code').textContent)")
    b.wait("document.querySelector('main .badge').textContent === 'done'", timeout=240)
    log = (root / "runs" / "second" / "ui" / "log.txt").read_text()
    assert "exit code -15 (stopped)" in log and "resumed from" in log and log.rstrip().endswith(" s")
    assert json.loads((root / "runs" / "second" / "manifest.json").read_text())["outputs"]["train"]["steps"] == 200
    clean(b, "stop and resume")

    # --- runs list and a comparison of the two
    b.eval("location.hash = '#/runs'")
    b.wait("document.querySelectorAll('#runs tbody tr').length === 2")
    assert b.eval("[...document.querySelectorAll('#runs .badge')].map(e => e.textContent)") == ["done", "done"]
    shoot(b, tmp_path, "runs")
    b.eval("document.querySelectorAll('#runs input[type=checkbox]').forEach(c => c.click())")
    b.eval("[...document.querySelectorAll('main button')].find(e => e.textContent === 'Compare selected').click()")
    b.wait("document.querySelector('#diff tbody tr') && document.querySelector('#curves svg')")
    differ = b.eval("[...document.querySelectorAll('#diff tbody tr td:first-child')].map(e => e.textContent)")
    assert differ == ["output_dir", "train.max_steps", "train.lr"]
    assert b.eval("document.querySelectorAll('#curves svg')[0].querySelectorAll('path.series').length") == 2
    shoot(b, tmp_path, "compare")
    clean(b, "runs and compare")

    # --- chat: both runs' models side by side, streamed; a rating and a choice go to the feedback store
    b.eval("location.hash = '#/chat'")
    b.wait("document.querySelector('#model-b option[value=\"runs/second\"]')")
    b.eval("document.getElementById('model-a').value = 'runs/first'; document.getElementById('model-b').value = 'runs/second';"
           "document.getElementById('max-tokens').value = '24'; document.getElementById('load').click()")
    b.wait("document.getElementById('chat-status').textContent === 'ready'", timeout=240)
    b.eval("document.getElementById('message').value = 'What is 3 plus 3?'; document.getElementById('send').click()")
    b.wait("document.querySelectorAll('.thumb-up').length === 2")
    chunks = b.eval("[...document.querySelectorAll('.msg.assistant')].map(m => Number(m.dataset.chunks || 0))")
    assert len(chunks) == 2 and min(chunks) >= 2, chunks  # streamed: several pieces per reply
    b.eval("document.querySelector('#col-a .thumb-up').click()")
    b.wait("document.querySelector('#col-a .saved')")
    b.eval("document.getElementById('a-better').click()")
    b.wait("document.querySelector('.choose .saved')")
    shoot(b, tmp_path, "chat")
    clean(b, "chat page")
    with sqlite3.connect(root / ".posttrain-ui" / "feedback.db") as db:
        kinds = sorted(r[0] for r in db.execute("SELECT kind FROM feedback"))
        models = sorted(r[0] for r in db.execute("SELECT model FROM conversations"))
    assert kinds == ["choice", "rating"] and models == ["runs/first", "runs/second"]

    # --- data: rendered as the trainer sees it, the bad row named by its line
    b.eval("location.hash = '#/data'")
    b.wait("document.getElementById('inspect')")
    b.eval("document.getElementById('data-path').value = 'data/mixed.jsonl'; "
           "document.getElementById('data-model').value = 'runs/first'; document.getElementById('inspect').click()")
    b.wait("/mixed.jsonl: 4 valid records of kind 'chat', 1 invalid/.test(document.getElementById('data-summary')"
           ".textContent)")
    assert b.eval("document.getElementById('data-errors').textContent").count("data/mixed.jsonl:3: ") == 1
    loss = b.eval("[...document.querySelectorAll('.record .loss')].map(e => e.textContent)")
    assert len(loss) == 4 and loss[0].startswith("It is 0.")
    shoot(b, tmp_path, "data")
    clean(b, "data page")

    # --- pipelines: the editor shows the recipe's stages; a gate added in the form is in the plan shown
    # before anything runs; a bad gate is refused beside its field
    b.eval("location.hash = '#/launch?mode=pipeline'")
    b.wait("document.querySelectorAll('#stages-edit .stage').length === 2")
    assert b.eval("document.getElementById('pipeline-recipe').value") == "recipes/tiny_pipeline.yaml"
    assert [value(b, f"stages.{i}.name") for i in (0, 1)] == ["tune", "again"]
    assert (value(b, "stages.0.gate.0.metric"), value(b, "stages.0.gate.0.max")) == ("train.train_loss", "20")
    assert b.eval("document.querySelector('#stages-edit .stage[data-index=\"1\"] .override-key').value") == "train.lr"
    assert b.eval("!!document.querySelector('#metrics-sft option[value=\"train.train_loss\"]')")  # from runs/first
    b.eval("document.querySelector('.stage[data-index=\"1\"] .add-gate').click()")
    b.wait("document.querySelector('[data-path=\"stages.1.gate.0.metric\"]')")
    set_path(b, "stages.1.gate.0.metric", "train.train_loss")
    set_path(b, "stages.1.gate.0.max", "30")
    b.eval("document.getElementById('show-plan').click()")
    b.wait("document.querySelector('#plan-stages tbody tr')")
    rows = b.eval("[...document.querySelectorAll('#plan-stages tbody tr')].map(r => [...r.children].map(c => c.textContent))")
    assert [(r[1], r[2], r[6]) for r in rows] == [("tune", "sft", "run"), ("again", "sft", "run")]
    assert rows[0][5] == "train.train_loss ≤ 20" and rows[1][5] == "train.train_loss ≤ 30" and rows[1][3] == "runs/pipe/tune"
    assert not b.eval("document.getElementById('pipeline-start').disabled")
    shoot(b, tmp_path, "pipeline")
    b.eval("document.getElementById('pipeline-mode').click()")  # the same pipeline as YAML, and back
    b.wait("!document.getElementById('pipeline-yaml').hidden && /max: 30/.test(document.getElementById('pipeline-yaml').value)")
    b.eval("document.getElementById('pipeline-mode').click()")
    b.wait("!document.getElementById('pipeline-form').hidden && document.querySelector('[data-path=\"stages.1.gate.0.max\"]')")
    assert value(b, "stages.1.gate.0.max") == "30"
    names = "[...document.querySelectorAll('#stages-edit .stage')].map(s => s.querySelector('[data-path$=\\'.name\\']').value)"
    b.eval("document.querySelector('.stage[data-index=\"0\"] .move-down').click()")
    assert b.eval(names) == ["again", "tune"] and value(b, "stages.0.gate.0.max") == "30"  # its gate moved with it
    b.eval("document.querySelector('.stage[data-index=\"1\"] .move-up').click()")
    b.eval("document.getElementById('add-stage').click()")
    assert b.eval(names) == ["tune", "again", "stage3"]
    b.eval("document.querySelector('.stage[data-index=\"2\"] .remove-stage').click()")
    assert b.eval(names) == ["tune", "again"]
    set_path(b, "stages.1.gate.0.metric", "")
    set_path(b, "stages.1.gate.0.min", "40")
    assert b.eval("document.getElementById('pipeline-start').disabled")  # an edit needs a new plan
    b.eval("document.getElementById('show-plan').click()")
    b.wait("document.querySelector('[data-error=\"stages.1.gate.0.max\"]').textContent")
    assert b.eval("document.querySelector('[data-error=\"stages.1.gate.0.max\"]').textContent") == \
        "max 30 is below min 40: no value passes this gate"
    assert b.eval("document.querySelector('[data-error=\"stages.1.gate.0.metric\"]').textContent").startswith(
        "give the metric's name")
    assert b.eval("document.querySelector('[data-path=\"stages.1.gate.0.metric\"]').classList.contains('invalid')")
    assert b.eval("document.getElementById('pipeline-errors').hidden && !document.querySelector('#plan-stages')")
    assert b.eval("document.getElementById('pipeline-start').disabled") and not (root / "runs" / "pipe").exists()
    clean(b, "pipeline editor")

    if os.environ.get("POSTTRAIN_UI_SCREENSHOTS"):  # the README's chat: the default model before and after a
        # short LoRA run on the quickstart arithmetic, started from the studio (minutes on a CPU)
        shutil.copytree(Path(__file__).resolve().parents[2] / "data" / "quickstart", root / "data" / "quickstart")
        recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml").read_text())
        recipe.pop("eval")
        recipe["output_dir"] = "runs/arithmetic"
        recipe["train"].update(max_steps=80, lr=2e-3, warmup_ratio=0.1, progress=False)
        recipe["train"].pop("save_every")
        (root / "recipes" / "arithmetic.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        b.eval("location.hash = '#/launch?verb=sft&recipe=recipes/arithmetic.yaml'")
        b.wait("document.getElementById('f-output_dir') && document.getElementById('f-output_dir').value === "
               "'runs/arithmetic'")
        b.eval("document.getElementById('start').click()")
        b.wait("location.hash === '#/run/runs/arithmetic' || /problem/.test(document.getElementById('form-status')"
               ".textContent)")
        assert location(b) == "#/run/runs/arithmetic", b.eval("studio.formErrors")
        b.wait("document.querySelector('main .badge').textContent === 'done'", timeout=3600, poll=2)
        b.eval("location.hash = '#/chat'")
        b.wait("document.querySelector('#model-b option[value=\"runs/arithmetic\"]')")
        b.eval("document.getElementById('model-a').value = 'default'; document.getElementById('model-b').value = "
               "'runs/arithmetic'; document.getElementById('max-tokens').value = '48'; "
               "document.getElementById('load').click()")
        b.wait("document.getElementById('chat-status').textContent === 'ready'", timeout=600)
        b.eval("document.getElementById('message').value = 'What is 47 + 38?'; document.getElementById('send').click()")
        b.wait("document.querySelectorAll('.thumb-up').length === 2", timeout=600)
        replies = b.eval("[...document.querySelectorAll('.msg.assistant .content')].map(e => e.textContent)")
        assert len(replies) == 2 and replies[0] != replies[1], replies  # the run's adapter is served, not its base
        b.eval("document.querySelector('#col-b .thumb-up').click()")
        b.wait("document.querySelector('#col-b .saved')")
        b.eval("document.getElementById('b-better').click()")
        b.wait("document.querySelector('.choose .saved')")
        shoot(b, tmp_path, "chat")
        clean(b, "chat: the default model before and after")


def value(b: Browser, path: str) -> str:
    return b.eval(f"document.querySelector('[data-path=\"{path}\"]').value")


def set_path(b: Browser, path: str, text: str) -> None:
    b.eval(f"""(() => {{ const el = document.querySelector('[data-path="{path}"]'); el.value = {json.dumps(text)};
             el.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")


def location(b: Browser) -> str:
    return b.eval("location.hash")
