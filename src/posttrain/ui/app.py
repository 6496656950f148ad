"""The web studio's HTTP side: a JSON API over runs.py, forms.py and jobs.py, server-sent
events for live curves and logs, a proxy to the chat servers, and the page in static/.

Security, all in `Guard` (an ASGI middleware) and `inside`:
- `posttrain ui` binds 127.0.0.1 unless told otherwise, and any other address needs a token.
  With a token, every request needs it: `Authorization: Bearer TOKEN`, or the cookie set when
  the page is opened as /?token=TOKEN (HttpOnly, SameSite=Strict, so EventSource works).
- Without a token the Host header must be a loopback name (a DNS-rebinding page gets 403).
- Requests that change anything (POST) must be JSON and same-origin (Origin and Sec-Fetch-Site
  checked), so another site cannot make a visitor's browser start a run.
- Only the project's verbs start (jobs.py builds every argument list); every path a request
  names, and every path-like value in a config it launches, stays under the root.
- Responses carry a Content-Security-Policy without any remote source: the page works offline
  and cannot load a script from elsewhere.

The studio works in its root: paths in recipes are relative to it, as they are to the directory
`posttrain` runs in, so the root is the process's working directory (`posttrain ui --root`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections import OrderedDict
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from posttrain.config import dump_config, load_yaml, validation_problems
from posttrain.fileio import write_text_atomic
from posttrain.stages import CLI_ROLES, STAGES, stage_of_recipe, verbs
from posttrain.ui import forms, pipelines, runs
from posttrain.ui.jobs import STATE_DIR, ChatServers, Jobs
from posttrain.ui.runs import JOB_DIR, PathError, inside, relative

STATIC = Path(__file__).parent / "static"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COOKIE = "posttrain_ui_token"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
FILE_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # artifacts: no scripts
MAX_BODY = 1 << 20
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz")
TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".txt", ".log", ".md", ".csv", ".jinja", ".py", ".tsv"}


class Guard:
    """Token, Host and same-origin checks, and the security headers of every response."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        host = headers.get("host", "")
        problem = None
        if not self.token and _hostname(host) not in LOOPBACK:
            problem = (403, f"Host {host!r} is not a loopback name; a studio bound beyond 127.0.0.1 needs --token")
        elif method not in ("GET", "HEAD"):
            origin = headers.get("origin")
            if origin and urlsplit(origin).netloc != host:
                problem = (403, f"cross-origin request from {origin} refused")
            elif headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                problem = (403, "cross-site request refused")
            elif not headers.get("content-type", "").startswith("application/json"):
                problem = (415, "send JSON (Content-Type: application/json)")
        if problem is None and self.token and not self._authorized(headers):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [""])[0]
            if method == "GET" and path == "/" and given and hmac.compare_digest(given, self.token):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", path="/")
                return await response(scope, receive, self._secured(send, path))
            problem = (401, "this studio needs its token: open /?token=TOKEN, or send 'Authorization: Bearer TOKEN'")
        if problem is not None:
            status, message = problem
            response = JSONResponse({"error": message}, status_code=status) if path.startswith("/api/") or \
                method != "GET" else Response(message + "\n", status_code=status, media_type="text/plain")
            return await response(scope, receive, self._secured(send, path))
        return await self.app(scope, receive, self._secured(send, path))

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip(), self.token):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no credential
            return False
        return COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value, self.token)

    @staticmethod
    def _secured(send, path: str):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"DENY")]
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", CSP.encode()))
                if path.startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return wrapped


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Problem(Exception):
    """An answer other than 200: status and message, or field errors [(key, message)]."""

    def __init__(self, status: int, message: str, errors: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors or []

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "errors": [{"key": k, "message": m} for k, m in self.errors]},
                            status_code=self.status)


def path_problems(root: Path, data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Path-like strings (absolute, ~, or with a '..' part) in a config that leave the root."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out += path_problems(root, v, f"{prefix}{k}.")
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            out += path_problems(root, v, f"{prefix}{i}.")
    elif isinstance(data, str) and "://" not in data and (
            data.startswith(("/", "~")) or ".." in Path(data).parts):
        try:
            inside(root, data)
        except PathError as exc:
            out.append((prefix[:-1], str(exc)))
    return out


def create_app(root: str | os.PathLike | None = None, token: str | None = None, feedback_db: str | None = None,
               chat_limit: int = 2) -> FastAPI:
    """The studio over `root` (default: the working directory, which it must be: see the module
    docstring). `feedback_db`: where chat replies and feedback go (default ROOT/.posttrain-ui/
    feedback.db; 'off' stores nothing and hides the feedback buttons)."""
    root = Path(root or ".").resolve()
    if root != Path.cwd().resolve():
        raise ValueError(f"the studio works in its root: run it with the working directory {root} "
                         "(posttrain ui --root does this)")
    if feedback_db is None:
        feedback_db = str(Path(STATE_DIR) / "feedback.db")
    feedback_db = None if feedback_db == "off" else feedback_db
    jobs = Jobs(root)
    chats = ChatServers(root, feedback_db, limit=chat_limit)
    tokenizers: OrderedDict[str, Any] = OrderedDict()

    async def lifespan(_app):
        yield
        await asyncio.to_thread(chats.close)

    from contextlib import asynccontextmanager

    app = FastAPI(title="posttrain studio", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=asynccontextmanager(lifespan))
    app.state.jobs, app.state.chats, app.state.root = jobs, chats, root
    app.add_middleware(Guard, token=token)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(Problem)
    async def _problem(_request, exc: Problem):
        return exc.response()

    @app.exception_handler(PathError)
    async def _path_error(_request, exc: PathError):
        return JSONResponse({"error": str(exc), "errors": []}, status_code=403)

    def run_dir(rel: str) -> Path:
        path = inside(root, rel)
        if not path.is_dir() or runs.run_kind(path) is None:
            raise Problem(404, f"{rel}: no run directory there")
        return path

    async def body(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise Problem(413, f"request body over {MAX_BODY} bytes")
        try:
            data = json.loads(raw or b"{}")
        except ValueError as exc:
            raise Problem(400, f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Problem(400, "request body must be a JSON object")
        return data

    # ------------------------------------------------------------------------------- page

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info")
    async def info():
        return {"root": str(root), "feedback_db": feedback_db, "token": token is not None,
                "verbs": [{"verb": v, "help": STAGES.get(v).help, "role": STAGES.get(v).role}
                          for v in verbs(*CLI_ROLES)]}

    # ------------------------------------------------------------------------------- runs

    @app.get("/api/runs")
    async def list_runs():
        found = await asyncio.to_thread(runs.find_runs, root)
        return {"runs": [runs.summarize(root, p, jobs.state(p)) for p in found]}

    @app.get("/api/run")
    async def get_run(path: str):
        where = run_dir(path)
        return await asyncio.to_thread(runs.detail, root, where, jobs.state(where))

    @app.get("/api/run/metrics")
    async def run_metrics(path: str):
        where = run_dir(path)
        rows, _ = runs.read_rows(where / "metrics.jsonl", 0, limit=64 << 20)
        return {"rows": rows, "keys": runs.curve_keys_of(rows)}

    def live(where: Path) -> bool:
        if jobs.running(where):
            return True
        metrics = where / "metrics.jsonl"
        return not (where / "manifest.json").is_file() and metrics.is_file() and \
            jobs.state(where) is None and time.time() - metrics.stat().st_mtime < 60

    async def tail(request: Request, path: Path, where: Path, kind: str):
        """SSE of a growing file's complete lines: metrics rows with the curve keys so far, or log
        text. A replaced or shortened file (a resumed run trims its metrics) sends `reset`; the
        stream ends (`end`) when the run is not running and everything is sent."""
        last_id = request.headers.get("last-event-id", "")
        offset = int(last_id) if last_id.isdigit() else 0
        inode, keys, quiet = None, {}, time.time()
        while True:
            running = live(where)
            try:
                stat = path.stat()
            except OSError:
                stat = None
            if stat is not None:
                if (inode is not None and stat.st_ino != inode) or stat.st_size < offset:
                    offset, keys = 0, {}
                    yield "event: reset\ndata: {}\n\n"
                inode = stat.st_ino
            sent = False
            if stat is not None and stat.st_size > offset:
                if kind == "metrics":
                    rows, new = runs.read_rows(path, offset)
                    if new > offset:
                        for row in rows:
                            keys.update(dict.fromkeys(row))
                        data = {"rows": rows, "keys": runs.pick_curve_keys(keys)}
                else:
                    new, data = _read_text(path, offset)
                if new > offset:
                    offset, sent = new, True
                    yield f"id: {offset}\ndata: {json.dumps(data)}\n\n"
            if not running and not sent:
                yield "event: end\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            if time.time() - quiet > 15:
                quiet = time.time()
                yield ": keep-alive\n\n"
            await asyncio.sleep(0.25)

    def sse(generator) -> StreamingResponse:
        return StreamingResponse(generator, media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    @app.get("/api/run/stream/metrics")
    async def stream_metrics(request: Request, path: str):
        where = run_dir(path)
        return sse(tail(request, where / "metrics.jsonl", where, "metrics"))

    @app.get("/api/run/stream/log")
    async def stream_log(request: Request, path: str):
        where = run_dir(path)
        return sse(tail(request, where / JOB_DIR / "log.txt", where, "log"))

    @app.get("/api/compare")
    async def compare(path: list[str] = Query(default=[])):
        if len(path) < 2:
            raise Problem(400, "compare needs two or more runs: ?path=A&path=B")
        configs = {}
        for rel in path:
            where = run_dir(rel)
            data = load_yaml(where / "config.yaml") if (where / "config.yaml").is_file() else {}
            configs[relative(root, where)] = data
        return runs.config_diff(configs)

    @app.get("/api/file")
    async def get_file(path: str):
        target = inside(root, path)
        if not target.is_file():
            raise Problem(404, f"{path}: no such file")
        suffix = target.suffix.lower()
        if suffix == ".png":
            media = "image/png"
        elif suffix in (".html", ".htm"):
            media = "text/html"
        elif suffix in TEXT_SUFFIXES:
            media = "text/plain; charset=utf-8"
        else:
            return FileResponse(target, media_type="application/octet-stream", filename=target.name,
                                headers={"content-security-policy": FILE_CSP})
        return FileResponse(target, media_type=media, headers={"content-security-policy": FILE_CSP})

    # ------------------------------------------------------------------------------ launch

    def stage_of(verb: str):
        if verb not in verbs(*CLI_ROLES):
            raise Problem(400, f"unknown verb {verb!r}; the studio starts {', '.join(verbs(*CLI_ROLES))} and run")
        stage = STAGES.get(verb)
        return stage, stage.load()[0]

    def recipe_path(rel: str | None) -> Path | None:
        if not rel:
            return None
        path = inside(root, rel)
        if not path.is_file():
            raise Problem(404, f"{rel}: no such recipe")
        return path

    @app.get("/api/recipes")
    async def recipes():
        return {"recipes": await asyncio.to_thread(_recipes, root)}

    @app.get("/api/schema")
    async def schema(verb: str, recipe: str | None = None):
        stage, cls = stage_of(verb)
        path = recipe_path(recipe)
        try:
            values, problems = forms.recipe_values(stage, cls, path)
        except (ValueError, FileNotFoundError) as exc:
            raise Problem(400, str(exc)) from None
        return {"verb": verb, "help": stage.help, "fields": forms.describe_fields(cls), "values": values,
                "fixed": sorted(stage.presets), "errors": [{"key": k, "message": m} for k, m in problems]}

    def check_launch(data: dict):
        stage, cls = stage_of(str(data.get("verb", "")))
        values = data.get("values")
        if not isinstance(values, dict):
            raise Problem(400, "values: expected an object of dotted key -> form text")
        cfg, problems = forms.config_from_form(stage, cls, values)
        if cfg is None:
            raise Problem(422, "invalid config", problems)
        dumped = cfg.model_dump(mode="json")
        problems = [p for p in path_problems(root, dumped) if p[0] != "output_dir"]  # checked below
        try:
            where = inside(root, cfg.output_dir)
        except PathError as exc:
            problems.append(("output_dir", str(exc)))
            where = None
        if where == root or (where is not None and where.is_dir() and any(
                runs.run_kind(child) for child in where.iterdir() if child.is_dir() and child.name != JOB_DIR)):
            problems.append(("output_dir", "give the run its own directory under the root (this one holds other runs)"))
        elif where is not None:
            if jobs.running(where):
                problems.append(("output_dir", f"{cfg.output_dir} is running now; stop it or choose another "
                                               "output_dir"))
            elif ((where / "config.yaml").exists() or (where / "checkpoints").exists()) and not data.get("overwrite"):
                problems.append(("output_dir", f"{cfg.output_dir} already holds a run: tick 'overwrite' to replace "
                                               "it, resume it from its page, or choose another output_dir"))
        if problems:
            raise Problem(422, "invalid config", problems)
        return stage, cfg, where

    def invalid(exc: Problem) -> JSONResponse:
        """Field problems are an answer, not a failure: 200 with ok false, so the page (whose console
        must stay clean) shows them beside the fields; other problems keep their status."""
        if exc.status != 422:
            return exc.response()
        return JSONResponse({"ok": False, "error": exc.message,
                             "errors": [{"key": k, "message": m} for k, m in exc.errors]})

    @app.post("/api/validate")
    async def validate(request: Request):
        try:
            _, cfg, _ = check_launch(await body(request))
        except Problem as exc:
            return invalid(exc)
        return {"ok": True, "config": dump_config(cfg)}

    @app.post("/api/launch")
    async def launch(request: Request):
        data = await body(request)
        try:
            stage, cfg, where = check_launch(data)
        except Problem as exc:
            return invalid(exc)
        launch_file = where / JOB_DIR / "launch.yaml"
        write_text_atomic(launch_file, dump_config(cfg))
        args = ["--config", relative(root, launch_file)] + (["--overwrite"] if data.get("overwrite") else [])
        try:
            job = jobs.start(where, stage.verb, args)
        except RuntimeError as exc:
            raise Problem(409, str(exc)) from None
        return {"ok": True, "run": relative(root, where), "job": job}

    def pipeline_source(data: dict) -> tuple[dict, str]:
        """(the mapping, its YAML text) of a request's `yaml` text or editor `form`."""
        if "form" in data:
            try:
                parsed, problems = pipelines.from_form(data["form"])
            except pipelines.FormError as exc:
                raise Problem(400, str(exc)) from None
            if problems:
                raise Problem(422, "invalid pipeline", problems)
            return parsed, pipelines.dump(parsed)
        text = data.get("yaml")
        if not isinstance(text, str) or not text.strip():
            raise Problem(400, "yaml: give the pipeline YAML (or the editor's form)")
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise Problem(422, "invalid pipeline", [("yaml", f"not valid YAML: {exc}")]) from None
        if not isinstance(parsed, dict):
            raise Problem(422, "invalid pipeline", [("yaml", "the top level must be a mapping")])
        return parsed, text

    def pipeline_of(data: dict):
        """The validated pipeline, its run dir and YAML text; or Problem 422 with every problem
        keyed by the field it belongs to (the editor's paths are the YAML's)."""
        from posttrain.pipeline import PipelineConfig

        parsed, text = pipeline_source(data)
        try:
            pipe = PipelineConfig.model_validate(parsed)
        except ValidationError as exc:
            raise Problem(422, "invalid pipeline", pipelines.place(validation_problems(exc), parsed)) from None
        problems = path_problems(root, parsed)
        try:
            where = inside(root, pipe.output_dir)
            if where == root:
                problems.append(("output_dir", "give the pipeline its own directory under the root"))
        except PathError as exc:
            problems.append(("output_dir", str(exc)))
        for i, stage in enumerate(pipe.stages):
            if stage.config:
                try:
                    problems += [(f"stages.{i}.config", f"in {stage.config}: {k}: {m}")
                                 for k, m in path_problems(root, load_yaml(recipe_path(stage.config)))]
                except (Problem, PathError, ValueError, FileNotFoundError) as exc:
                    problems.append((f"stages.{i}.config", getattr(exc, "message", str(exc))))
        if not problems:
            problems = pipelines.stage_problems(pipe)  # every stage's config, as the run builds it
        if problems:
            raise Problem(422, "invalid pipeline", problems)
        return pipe, where, text

    async def plan_of(pipe):
        from posttrain.pipeline import plan_pipeline

        try:
            return await asyncio.to_thread(plan_pipeline, pipe)
        except (ValueError, FileNotFoundError) as exc:
            raise Problem(422, "invalid pipeline", [("stages", str(exc))]) from None

    @app.get("/api/pipeline/schema")
    async def pipeline_schema():
        return await asyncio.to_thread(pipelines.schema, root)

    @app.post("/api/pipeline/form")
    async def pipeline_form(request: Request):
        """YAML text -> the editor's form, the keys it cannot show, and the eval section's metric names."""
        try:
            parsed, _ = pipeline_source(await body(request))
        except Problem as exc:
            return invalid(exc)
        form, unshown = await asyncio.to_thread(pipelines.to_form, parsed)  # imports the pipeline (torch)
        return {"ok": True, "form": form, "unshown": unshown, "eval_metrics": pipelines.eval_metrics(parsed)}

    @app.post("/api/pipeline/yaml")
    async def pipeline_yaml(request: Request):
        """The editor's form -> YAML text (not validated: the plan does that)."""
        try:
            parsed, text = pipeline_source(await body(request))
        except Problem as exc:
            return invalid(exc)
        return {"ok": True, "yaml": text, "eval_metrics": pipelines.eval_metrics(parsed)}

    @app.post("/api/pipeline/plan")
    async def pipeline_plan(request: Request):
        try:
            pipe, where, _ = await asyncio.to_thread(pipeline_of, await body(request))
            plan = await plan_of(pipe)
        except Problem as exc:
            return invalid(exc)
        return {"ok": True, "plan": plan, "running": jobs.running(where)}

    @app.post("/api/pipeline/launch")
    async def pipeline_launch(request: Request):
        try:
            pipe, where, text = await asyncio.to_thread(pipeline_of, await body(request))
            await plan_of(pipe)  # every stage config valid before anything starts
        except Problem as exc:
            return invalid(exc)
        if jobs.running(where):
            raise Problem(409, f"{pipe.output_dir} is running now")
        path = where / JOB_DIR / "pipeline.yaml"
        write_text_atomic(path, text)
        try:
            job = jobs.start(where, "run", [relative(root, path), "--no-serve"])
        except RuntimeError as exc:
            raise Problem(409, str(exc)) from None
        return {"ok": True, "run": relative(root, where), "job": job}

    @app.post("/api/run/stop")
    async def stop(request: Request):
        where = run_dir(str((await body(request)).get("path", "")))
        try:
            return {"job": await asyncio.to_thread(jobs.stop, where)}
        except RuntimeError as exc:
            raise Problem(409, str(exc)) from None

    @app.post("/api/run/resume")
    async def resume(request: Request):
        where = run_dir(str((await body(request)).get("path", "")))
        if jobs.running(where):
            raise Problem(409, f"{relative(root, where)} is running")
        if runs.run_kind(where) == "pipeline":
            yaml_path = where / JOB_DIR / "pipeline.yaml"
            if not yaml_path.is_file():
                raise Problem(400, "this pipeline was not started from the studio, so its YAML is unknown here; "
                                   "`posttrain run PIPELINE.yaml` resumes it")
            verb, args = "run", [relative(root, yaml_path), "--no-serve"]
        else:
            config = load_yaml(where / "config.yaml")
            try:
                verb = stage_of_recipe(config).verb
            except ValueError as exc:
                raise Problem(400, str(exc)) from None
            if verb not in verbs(*CLI_ROLES):
                raise Problem(400, f"a {verb} stage runs inside a pipeline; resume the pipeline")
            try:
                same = inside(root, str(config.get("output_dir", ""))) == where
            except PathError:
                same = False
            if not same:
                raise Problem(400, f"config.yaml's output_dir {config.get('output_dir')!r} does not name this "
                                   "directory from the studio's root; resume it from where it was started "
                                   f"(posttrain {verb} --config {relative(root, where)}/config.yaml --resume)")
            if not (where / "checkpoints").is_dir():
                raise Problem(400, "no checkpoints to resume from (train.save_every saves them)")
            verb, args = verb, ["--config", relative(root, where / "config.yaml"), "--resume"]
        try:
            job = jobs.start(where, verb, args)
        except RuntimeError as exc:
            raise Problem(409, str(exc)) from None
        return {"run": relative(root, where), "job": job}

    # -------------------------------------------------------------------------------- chat

    def model_spec(spec: str) -> str:
        """A named model, or a model/run directory under the root (as a path relative to it)."""
        from posttrain.models import NAMED_MODELS

        if spec in NAMED_MODELS:
            return spec
        path = inside(root, spec)
        if not path.exists():
            raise Problem(404, f"{spec}: no model there (give a named model: {', '.join(NAMED_MODELS)}, or a "
                               "run or model directory under the root)")
        return relative(root, path)

    @app.get("/api/chat/models")
    async def chat_models():
        from posttrain.models import NAMED_MODELS, is_run_dir

        found = await asyncio.to_thread(runs.find_runs, root)
        named = [{"model": n, "label": f"{n} (named model)"} for n in NAMED_MODELS]
        trained = [{"model": relative(root, p), "label": relative(root, p)} for p in found if is_run_dir(p)]
        return {"models": named + trained, "servers": [s.info() for s in chats.servers.values()],
                "feedback": feedback_db is not None}

    @app.post("/api/chat/start")
    async def chat_start(request: Request):
        spec = model_spec(str((await body(request)).get("model", "")))
        try:
            server = await chats.ensure(spec)
        except RuntimeError as exc:
            raise Problem(502, str(exc)) from None
        return server.info()

    async def proxy(request: Request, slot: str, path: str):
        import httpx

        server = chats.get(slot)
        if server is None or server.proc.poll() is not None:
            raise Problem(404, "that chat model is not running; choose it again")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise Problem(413, f"request body over {MAX_BODY} bytes")
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        try:
            upstream = await client.send(client.build_request("POST", server.url + path, content=raw,
                                                              headers={"content-type": "application/json"}),
                                         stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            raise Problem(502, f"the chat server did not answer: {exc}") from None

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()

        return StreamingResponse(relay(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type", "application/json"))

    @app.post("/api/chat/{slot}/v1/chat/completions")
    async def chat_completions(request: Request, slot: str):
        return await proxy(request, slot, "/v1/chat/completions")

    @app.post("/api/chat/{slot}/v1/feedback")
    async def chat_feedback(request: Request, slot: str):
        return await proxy(request, slot, "/v1/feedback")

    # -------------------------------------------------------------------------------- data

    @app.get("/api/data/files")
    async def data_files():
        return {"files": await asyncio.to_thread(_data_files, root)}

    def tokenizer(spec: str):
        from posttrain.models import load_tokenizer

        if spec not in tokenizers:
            tokenizers[spec] = load_tokenizer(spec)
            while len(tokenizers) > 4:
                tokenizers.popitem(last=False)
        tokenizers.move_to_end(spec)
        return tokenizers[spec]

    @app.post("/api/data/inspect")
    async def data_inspect(request: Request):
        from posttrain.data.examples import inspect_file

        data = await body(request)
        rel = str(data.get("path", ""))
        target = inside(root, rel)
        if not target.exists():
            raise Problem(404, f"{rel}: no such data file")
        spec = model_spec(str(data.get("model") or "default"))
        kind = data.get("kind") or None
        try:
            n, max_length = int(data.get("n", 5)), int(data.get("max_length", 1024))
        except (TypeError, ValueError):
            raise Problem(400, "n and max_length must be integers") from None
        if not 1 <= n <= 200 or max_length < 8:
            raise Problem(400, "n must be 1-200 and max_length at least 8")

        def work():
            return inspect_file(lambda: tokenizer(spec), str(target), kind=kind, n=n, max_length=max_length)

        try:
            report = await asyncio.to_thread(work)
        except (ValueError, FileNotFoundError) as exc:  # DataError and ModelLoadError are ValueErrors
            raise Problem(422, str(exc).replace(str(target), relative(root, target))) from None
        report["path"] = relative(root, target)
        report["errors"] = [e.replace(str(target), report["path"]) for e in report["errors"]]
        return report

    return app


def _read_text(path: Path, offset: int, limit: int = 1 << 20) -> tuple[int, dict]:
    """Complete lines of a log from `offset`: (new offset, {"text": ...})."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read(limit)
    end = chunk.rfind(b"\n")
    if end < 0:
        return (offset + len(chunk), {"text": chunk.decode("utf-8", "replace")}) if len(chunk) == limit \
            else (offset, {"text": ""})
    return offset + end + 1, {"text": chunk[:end + 1].decode("utf-8", "replace")}


def _recipes(root: Path) -> list[dict]:
    """Stage and pipeline recipes under ROOT/recipes (and ROOT itself): path and what they run."""
    found = []
    candidates = sorted((root / "recipes").rglob("*.yaml"))[:500] if (root / "recipes").is_dir() else []
    candidates += sorted(root.glob("*.yaml"))
    for path in candidates:
        try:
            data = load_yaml(path)
        except (ValueError, FileNotFoundError):
            continue
        if isinstance(data.get("stages"), list):
            found.append({"path": relative(root, path), "pipeline": True, "verb": "run"})
        elif "stage" in data:
            try:
                verb = stage_of_recipe(data).verb
            except ValueError:
                continue
            found.append({"path": relative(root, path), "pipeline": False, "verb": verb})
    return found


def _data_files(root: Path, limit: int = 500) -> list[str]:
    found = []
    for base in (root / "data", root):
        if not base.is_dir():
            continue
        pattern = base.rglob("*") if base != root else base.glob("*")
        for path in sorted(pattern):
            if path.is_file() and path.name.endswith(DATA_SUFFIXES) and not any(
                    p.startswith(".") for p in path.relative_to(root).parts):
                rel = relative(root, path)
                if rel not in found:
                    found.append(rel)
            if len(found) >= limit:
                return found
    return found
