"""The feedback loop, closed: simulated users chat with `posttrain serve`, leave choices, online DPO
trains on them every K choices, and the new adapter is hot-swapped in while the users keep chatting.

A *simulated user* stands in for people: it asks short factual questions (capitals and chemical
symbols: the `fact` prompts of data/preference/train.jsonl), gets n=2 sampled replies per request,
scores each with a fixed reward function and posts which one it prefers (`POST /v1/feedback`, a
choice; equal scores: no choice, as a person without a preference would leave none). It also rates
the first reply (up when its reward is >= UP_THRESHOLD), which feeds the server's up-rate gauge.

The reward (rl/rewards.py's `Mixture` of two experts; printed in the results): the user wants the
answer, briefly:
    reward = named + brief
    named = 1 when the reply names the reference answer (`Athens`, `Na`: a whole word, any case)
    brief = -0.02 per token beyond 12 (the registered `length` reward; 0 up to 12 tokens)
So "The capital of Greece is Athens." scores 1.0, the same answer followed by 36 tokens of
rambling 0.28, a wrong 48-token ramble -0.72. It stands in for people who ask a quick question and
prefer the reply that answers it and stops. Facts, not arithmetic: the default model
(SmolLM2-135M-Instruct) knows many capitals, and its replies to them often end within 48 tokens,
so two samples usually score differently (a choice); its arithmetic replies run past any short
budget (both truncated, both wrong: no choice), which left too few pairs per round in a trial.

The loop (one server for the whole run, a fresh subprocess on a free port, continuous batching):
  0. the server starts with a LoRA *slot*: adapter `live` = a freshly initialised LoRA (B = 0, so it
     answers exactly as the base model); users and evaluation always ask for model `live`.
     Held-out evaluation of round 0 = the starting model.
  per round r = 1..R:
  1. collect: C client threads chat (temperature 0.8, top_p 0.95, n=2) until K choices are stored;
  2. export the round's choices as preference pairs (`data.feedback.export_feedback`, the code behind
     `posttrain feedback export`, with `since` = the round's start: on-policy pairs only);
  3. train: `posttrain dpo` (a subprocess) on those pairs, LoRA r16 continuing the previous round's
     adapter (`adapter.init_from`), sigmoid DPO beta 0.1 + RPO alpha 1, the base as reference;
  4. swap: the users resume; once requests are in flight, `POST /admin/adapters {name: live, path}`;
     the users keep going until C more requests finished after the swap. Every non-200 answer (chat,
     feedback, admin) or transport error anywhere in the run counts as a failed request;
  5. evaluate: users paused, every held-out prompt (the 28 `fact` prompts of data/preference/test.jsonl:
     15 countries and elements none of the users' prompts ask about) through the server on `live`,
     HELD_OUT_SAMPLES samples each at the users' temperature with a seed fixed per prompt (the
     headline: what a user gets, reproducibly), and once greedy: mean reward, share naming the
     answer, reply tokens.

    nice -n 19 env OMP_NUM_THREADS=1 python bench/feedback_loop.py           # 5 rounds x 32 choices
    nice -n 19 env OMP_NUM_THREADS=1 python bench/feedback_loop.py --smoke   # 1 round x 6 choices

Writes bench/results/feedback_loop.json and feedback_loop.png (held-out reward by round); --smoke
writes them into its work directory instead. The work directory (server log, feedback database,
each round's pairs, DPO run and adapter) is kept; --work sets it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benches: no spinning on shared cores

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, ROOT, load_average, run_child, run_context, write_json  # noqa: E402
from posttrain.ports import free_port  # noqa: E402

CATEGORIES = ("fact",)
BRIEF = {"type": "length", "min_length": 0, "max_length": 12, "unit": "tokens", "penalty": 0.02}
REWARD = {"named": "1 when the reply names the answer (whole word, any case), else 0", "brief": BRIEF,
          "reward": "named + brief"}
UP_THRESHOLD = 0.5  # a rating is "up" when the reply names the answer within 12 + 25 tokens
ADMIN_KEY = "feedback-loop-admin"
LORA = {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
SETTINGS = {
    "full": {"rounds": 5, "choices": 32, "held_out": 28, "clients": 4, "max_tokens": 48, "epochs": 2, "lr": 4e-4},
    "smoke": {"rounds": 1, "choices": 6, "held_out": 6, "clients": 2, "max_tokens": 32, "epochs": 1, "lr": 4e-4},
}
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "n": 2}
HELD_OUT_SAMPLES = 4  # seeded samples per held-out prompt (besides the greedy reply)


def prompt_records(path: Path, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of the number categories with an answer, one per prompt, in a seeded order."""
    rows, seen = [], set()
    for i, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        if row.get("category") in CATEGORIES and row["prompt"] not in seen:
            if "answer" not in row:
                raise ValueError(f"{path}:{i}: field 'answer' missing in a {row['category']} row")
            seen.add(row["prompt"])
            rows.append({"prompt": row["prompt"], "answer": str(row["answer"]), "category": row["category"]})
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def names_answer(prompts, completions, records=None):
    """The `named` expert: 1.0 when the completion names records[i]["answer"] as a whole word."""
    import re

    import torch

    from posttrain.train.reward_model import RewardOutput

    values = [float(re.search(rf"(?<!\w){re.escape(r['answer'])}(?!\w)", c, re.IGNORECASE) is not None)
              for c, r in zip(completions, records)]
    scores = torch.tensor(values)
    return RewardOutput(scores, {"named": scores})


class SimulatedUser:
    """The reward function and what a user does with it: score replies, choose, rate."""

    def __init__(self, tokenizer):
        from posttrain.rl.rewards import Mixture, build_reward

        self.tokenizer = tokenizer
        self.reward = Mixture({"named": names_answer, "brief": build_reward(BRIEF, tokenizer, name="brief")})
        self.lock = threading.Lock()  # a fast tokenizer refuses concurrent use from threads

    def score(self, record: dict, texts: list[str]) -> list[dict]:
        with self.lock:
            out = self.reward([record["prompt"]] * len(texts), texts, [record] * len(texts))
            tokens = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return [{"reward": round(float(out.scores[i]), 4), "correct": float(out.parts["named"][i]),
                 "tokens": tokens[i]} for i in range(len(texts))]

    @staticmethod
    def choose(a: dict, b: dict) -> int | None:
        """0 or 1: the preferred reply; None when the reward cannot tell them apart."""
        if a["reward"] == b["reward"]:
            return None
        return 0 if a["reward"] > b["reward"] else 1

    @staticmethod
    def rating(s: dict) -> str:
        return "up" if s["reward"] >= UP_THRESHOLD else "down"


class Users:
    """C client threads that chat, score and leave feedback while `running` is set. Every request
    outcome is an event: {round, phase, kind, status, ...}; non-200s and transport errors are failures."""

    def __init__(self, base: str, user: SimulatedUser, records: list[dict], clients: int, max_tokens: int, seed: int):
        self.base, self.user, self.records, self.max_tokens = base, user, records, max_tokens
        self.running, self.stopped = threading.Event(), threading.Event()
        self.lock = threading.RLock()  # count() runs inside wait_until's predicate, under the condition
        self.cond = threading.Condition(self.lock)
        self.active = 0  # clients inside a request/feedback exchange
        self.round, self.phase = 0, "collect"
        self.events: list[dict] = []
        self.sent: Counter = Counter()  # HTTP requests sent, by kind
        self.threads = [threading.Thread(target=self.client, args=(seed + i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def note(self, event: dict) -> None:
        with self.cond:
            self.events.append({"round": self.round, "phase": self.phase, "t": time.time(), **event})
            self.cond.notify_all()

    def post(self, client: httpx.Client, path: str, body: dict, kind: str) -> httpx.Response | None:
        with self.lock:
            self.sent[kind] += 1
        try:
            r = client.post(path, json=body)
        except httpx.HTTPError as exc:
            self.note({"kind": kind, "status": None, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return None
        if r.status_code != 200:
            self.note({"kind": kind, "status": r.status_code, "ok": False, "error": r.text[:300]})
            return None
        return r

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.base, timeout=900) as client:
            while not self.stopped.is_set():
                if not self.running.wait(0.2):
                    continue
                with self.cond:
                    if not self.running.is_set():
                        continue
                    self.active += 1
                try:
                    self.exchange(client, rng)
                finally:
                    with self.cond:
                        self.active -= 1
                        self.cond.notify_all()

    def exchange(self, client: httpx.Client, rng: random.Random) -> None:
        record = rng.choice(self.records)
        start = time.perf_counter()
        r = self.post(client, "/v1/chat/completions", {
            "model": "live", "max_tokens": self.max_tokens, **SAMPLING,
            "messages": [{"role": "user", "content": record["prompt"]}]}, "chat")
        if r is None:
            return
        choices = r.json()["choices"]
        texts, ids = [c["message"]["content"] for c in choices], [c["reply_id"] for c in choices]
        scores = self.user.score(record, texts)
        event = {"kind": "chat", "status": 200, "ok": True, "seconds": round(time.perf_counter() - start, 2),
                 "scores": scores}
        rating = self.user.rating(scores[0])
        if self.post(client, "/v1/feedback", {"reply_id": ids[0], "rating": rating}, "rating") is not None:
            event["rating"] = rating
        pick = self.user.choose(*scores)
        if pick is not None:
            body = {"reply_ids": ids, "chosen": ids[pick]}
            if self.post(client, "/v1/feedback", body, "choice") is not None:
                event["choice"] = {"chosen": scores[pick]["reward"], "rejected": scores[1 - pick]["reward"]}
        self.note(event)

    # -- control from the main thread

    def count(self, test) -> int:
        with self.lock:
            return sum(1 for e in self.events if test(e))

    def resume(self, round_: int, phase: str) -> None:
        with self.cond:
            self.round, self.phase = round_, phase
        self.running.set()

    def pause(self) -> None:
        """Stop starting exchanges; return when every client has finished its current one."""
        self.running.clear()
        with self.cond:
            self.cond.wait_for(lambda: self.active == 0)

    def wait_until(self, test, limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        with self.cond:
            return self.cond.wait_for(lambda: test() or time.monotonic() > deadline, timeout=limit_s) and \
                time.monotonic() <= deadline

    def close(self) -> None:
        self.running.clear()
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=900)


def make_slot_adapter(out: Path) -> None:
    """A fresh LoRA over the default model (B = 0: the base model's function), saved where the
    server loads `live` from at start. In a child process, so this one never holds the model."""
    code = ("import json, sys\n"
            "from posttrain.adapters import AdapterConfig, apply_adapter\n"
            "from posttrain.models import load_model, save_model\n"
            "model, tok = load_model('default')\n"
            "save_model(apply_adapter(model, AdapterConfig(**json.loads(sys.argv[-2]))), tok, sys.argv[-1])\n")
    log = out.parent / "slot.log"
    _, seconds, rc = run_child(["-c", code, json.dumps(LORA), str(out)], log)
    if rc:
        raise RuntimeError(f"making the LoRA slot failed ({rc}); see {log}")


def start_server(work: Path, slot: Path, s: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "posttrain.cli", "serve", "default", "--name", "base", "--port", str(port),
           "--adapter", f"live={slot}", "--admin-key", ADMIN_KEY, "--feedback-db", str(work / "feedback.db"),
           "--queue", str(4 * s["clients"] * SAMPLING["n"] + 16), "--max-batch", "8", "--timeout", "600",
           "--max-tokens-cap", str(s["max_tokens"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(work / "server.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}; see {work / 'server.log'}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise RuntimeError(f"server did not answer /health within 600 s; see {work / 'server.log'}")
        time.sleep(1)


def peak_rss_mb(pid: int) -> int | None:
    """A live process's peak resident memory (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        return None
    return None


def gauge(base: str, name: str) -> float | None:
    text = httpx.get(base + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def evaluate(base: str, user: SimulatedUser, records: list[dict], s: dict) -> dict:
    """Every held-out prompt through the server on `live`, C requests at a time: once greedy, and
    HELD_OUT_SAMPLES seeded samples at the users' temperature (seed fixed per prompt, the same in
    every round: what a user would get, reproducibly). Mean reward, share naming the answer,
    reply tokens, for each."""
    jobs = [(i, mode) for i in range(len(records)) for mode in ("greedy", "sampled")]
    results: dict[tuple[int, str], list[dict]] = {}
    failures: list[str] = []
    todo = iter(jobs)
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=900) as client:
            while True:
                with lock:
                    job = next(todo, None)
                if job is None:
                    return
                i, mode = job
                rec = records[i]
                body = {"model": "live", "max_tokens": s["max_tokens"], "temperature": 0,
                        "messages": [{"role": "user", "content": rec["prompt"]}]}
                if mode == "sampled":
                    body.update(SAMPLING, n=HELD_OUT_SAMPLES, seed=1000 + 10 * i)
                try:
                    r = client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    with lock:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                texts = [c["message"]["content"] for c in r.json()["choices"]]
                scored = [{**sc, "text": t} for sc, t in zip(user.score(rec, texts), texts)]
                with lock:
                    results[job] = scored

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(s["clients"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out: dict = {"requests": len(jobs), "failures": failures, "seconds": round(time.perf_counter() - start, 1)}
    for mode, prefix in (("greedy", ""), ("sampled", "sampled_")):
        done = [x for (i, m), xs in results.items() if m == mode for x in xs]
        if not done:
            raise RuntimeError(f"held-out evaluation ({mode}): every request failed: {failures[:3]}")
        out.update({f"{prefix}reward": statistics.mean(x["reward"] for x in done),
                    f"{prefix}named": statistics.mean(x["correct"] for x in done),
                    f"{prefix}tokens": statistics.mean(x["tokens"] for x in done), f"{prefix}replies": len(done)})
    out["per_prompt"] = [{"prompt": rec["prompt"], "answer": rec["answer"], "greedy": results.get((i, "greedy")),
                          "sampled": results.get((i, "sampled"))} for i, rec in enumerate(records)]
    return out


def train_round(work: Path, pairs: Path, init: Path, r: int, s: dict) -> tuple[Path, dict]:
    """`posttrain dpo` on the round's pairs, continuing the previous adapter; returns the run dir.
    The run's resolved config.yaml is checked against every setting given here."""
    import yaml

    run_dir = work / f"round-{r}" / "dpo"
    settings = {"model.name": "default", "output_dir": str(run_dir), "data.train": str(pairs), "data.max_length": 256,
                **{f"adapter.{k}": v for k, v in LORA.items()}, "adapter.init_from": str(init),
                "dpo.loss": "sigmoid", "dpo.beta": 0.1, "dpo.rpo_alpha": 1.0, "train.epochs": s["epochs"],
                "train.batch_size": 4, "train.grad_accum": 2,  # 8 pairs a step; micro-batches of 4 stay < 2 GiB
                "train.lr": s["lr"], "train.schedule": "constant", "train.warmup_ratio": 0, "train.seed": r,
                "train.progress": False, "eval.before": False}
    args = ["-m", "posttrain.cli", "dpo", "--overwrite", *(f"{k}={v}" for k, v in settings.items())]
    log = work / f"round-{r}" / "dpo.log"
    peak, seconds, rc = run_child(args, log)
    if rc:
        raise RuntimeError(f"round {r}: posttrain dpo failed ({rc}); see {log}")
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, want in settings.items():
        got = resolved
        for part in key.split("."):
            got = got[part]
        if got != want:
            raise RuntimeError(f"round {r}: {run_dir / 'config.yaml'} has {key}={got!r}, asked for {want!r}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return run_dir, {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20), "steps": len(losses),
                     "lr": metrics[0].get("lr") if metrics else None,
                     "margin_last": metrics[-1].get("rewards/margin") if metrics else None,
                     "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def swap(base: str, users: Users, run_dir: Path, r: int, clients: int) -> dict:
    """Hot-swap `live` to the new adapter while the users are chatting; returns its figures."""
    users.resume(r, "swap")
    chats = lambda: users.count(lambda e: e["round"] == r and e["phase"] == "swap" and e["kind"] == "chat")  # noqa: E731
    in_flight = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # requests admitted and decoding: the swap lands mid-traffic
        in_flight = httpx.get(base + "/health", timeout=30).json()["in_flight"]
        if in_flight >= 2:
            break
        time.sleep(0.2)
    start = time.perf_counter()
    resp = httpx.post(base + "/admin/adapters", json={"name": "live", "path": str(run_dir)},
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600)
    seconds = time.perf_counter() - start
    ok = resp.status_code == 200
    users.sent["admin"] += 1
    if not ok:
        users.note({"kind": "admin", "status": resp.status_code, "ok": False, "error": resp.text[:300]})
    body = resp.json() if ok else {}
    after = chats()
    users.wait_until(lambda: chats() >= after + clients, 1800)  # requests admitted after the swap finish too
    users.pause()
    return {"ok": ok, "status": resp.status_code, "seconds": round(seconds, 3), "load_seconds": body.get("load_seconds"),
            "version": body.get("version"), "in_flight_at_swap": in_flight,
            "replaced_in_flight": (body.get("replaced") or {}).get("in_flight"),
            "chats_during_swap_phase": chats()}


def round_stats(users: Users, r: int) -> dict:
    chats = [e for e in users.events if e["round"] == r and e["kind"] == "chat" and e["ok"] and e["phase"] == "collect"]
    scores = [s for e in chats for s in e["scores"]]
    choices = [e["choice"] for e in chats if "choice" in e]
    ratings = [e["rating"] for e in chats if "rating" in e]
    if not chats:
        return {"requests": 0}
    return {"requests": len(chats), "choices": len(choices), "ties": sum(1 for e in chats if "choice" not in e),
            "sampled_reward": statistics.mean(s["reward"] for s in scores),
            "sampled_named": statistics.mean(s["correct"] for s in scores),
            "sampled_tokens": statistics.mean(s["tokens"] for s in scores),
            "chosen_reward": statistics.mean(c["chosen"] for c in choices) if choices else None,
            "rejected_reward": statistics.mean(c["rejected"] for c in choices) if choices else None,
            "up_rate": sum(x == "up" for x in ratings) / len(ratings) if ratings else None,
            "request_seconds_mean": statistics.mean(e["seconds"] for e in chats)}


def run(args) -> dict:
    from posttrain.data.feedback import export_feedback, now_iso
    from posttrain.models import load_tokenizer

    s = dict(SETTINGS["smoke" if args.smoke else "full"])
    for key in ("rounds", "choices", "held_out", "clients"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    work = Path(args.work or tempfile.mkdtemp(prefix="feedback_loop."))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    train_records = prompt_records(ROOT / "data/preference/train.jsonl")
    held_out = prompt_records(ROOT / "data/preference/test.jsonl", s["held_out"], seed=1)
    overlap = {r["prompt"] for r in train_records} & {r["prompt"] for r in held_out}
    if overlap:
        raise RuntimeError(f"held-out prompts also in the users' prompts: {sorted(overlap)[:3]}")
    user = SimulatedUser(load_tokenizer("default"))
    load_before, started = load_average(), time.time()
    t = time.perf_counter()
    slot = work / "round-0" / "adapter"
    slot.parent.mkdir(exist_ok=True)
    make_slot_adapter(slot)
    server, base = start_server(work, slot, s)
    setup_s = time.perf_counter() - t
    print(f"server up at {base} ({setup_s:.0f} s with the slot adapter)", flush=True)
    rounds, users = [], None
    try:
        ev = evaluate(base, user, held_out, s)
        rounds.append({"round": 0, "held_out": ev, "up_rate_gauge": None})
        print(f"round 0 (start): {held_out_line(ev)}", flush=True)
        users = Users(base, user, train_records, s["clients"], s["max_tokens"], seed=args.seed)
        adapter = slot
        for r in range(1, s["rounds"] + 1):
            t0 = time.perf_counter()
            since = now_iso()
            users.resume(r, "collect")
            want = lambda: users.count(lambda e: e["round"] == r and e["phase"] == "collect"  # noqa: E731
                                       and "choice" in e) >= s["choices"]
            too_many = lambda: users.count(lambda e: e["round"] == r and e["phase"] == "collect"  # noqa: E731
                                           and e["kind"] == "chat") >= 6 * s["choices"]
            users.wait_until(lambda: want() or too_many(), 3 * 3600)
            users.pause()
            collect_s = time.perf_counter() - t0
            stats = round_stats(users, r)
            pairs = work / f"round-{r}" / "pairs.jsonl"
            pairs.parent.mkdir(exist_ok=True)
            export = export_feedback(work / "feedback.db", pairs, "preference", since=since)
            run_dir, train = train_round(work, pairs, adapter, r, s)
            sw = swap(base, users, run_dir, r, s["clients"])
            adapter = run_dir
            up_gauge = gauge(base, "posttrain_feedback_up_rate")
            ev = evaluate(base, user, held_out, s)
            rounds.append({"round": r, "held_out": ev, "collect": stats, "collect_s": round(collect_s, 1),
                           "export": {k: export[k] for k in ("feedback_rows", "records", "kept", "skipped")},
                           "train": train, "swap": sw, "up_rate_gauge": up_gauge,
                           "round_s": round(time.perf_counter() - t0, 1)})
            print(f"round {r}: {stats['requests']} requests, {export['kept']} pairs "
                  f"(sampled reward {stats.get('sampled_reward', float('nan')):.3f}), trained {train['steps']} steps "
                  f"in {train['seconds']} s, swap {sw['seconds']} s ({'ok' if sw['ok'] else 'FAILED'}, "
                  f"{sw['in_flight_at_swap']} samples in flight) -> {held_out_line(ev)}; "
                  f"round {time.perf_counter() - t0:.0f} s",
                  flush=True)
    finally:
        if users is not None:
            users.close()
        server_peak_mb = peak_rss_mb(server.pid)
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    events = users.events if users is not None else []
    failures = [e for e in events if not e["ok"]] + [
        {"kind": "held_out", "error": f} for rd in rounds for f in rd["held_out"]["failures"]]
    return {"settings": s, "sampling": SAMPLING, "reward": REWARD, "up_threshold": UP_THRESHOLD, "lora": LORA,
            "dpo": {"loss": "sigmoid", "beta": 0.1, "rpo_alpha": 1.0, "pairs_per_step": 8, "schedule": "constant",
                    "reference": "the base model (adapter disabled)"},
            "users_prompts": len(train_records), "held_out_prompts": len(held_out),
            "requests": {**(users.sent if users is not None else {}),
                         "held_out": sum(rd["held_out"]["requests"] for rd in rounds)},
            "failed_requests": len(failures),
            "failures": failures[:20], "rounds": rounds, "setup_s": round(setup_s, 1),
            "wall_s": round(time.time() - started, 1), "work_dir": str(work), "server_peak_rss_mb": server_peak_mb,
            "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **run_context(load_before, load_average(), "torch", "transformers", "peft")}


def held_out_line(ev: dict) -> str:
    return (f"held-out reward sampled {ev['sampled_reward']:.3f} (named {ev['sampled_named']:.2f}, "
            f"{ev['sampled_tokens']:.1f} tokens), greedy {ev['reward']:.3f} (named {ev['named']:.2f}, "
            f"{ev['tokens']:.1f} tokens) [{ev['seconds']} s]")


def print_table(res: dict) -> None:
    s = res["settings"]
    print(f"\nfeedback loop: {s['rounds']} rounds x {s['choices']} choices, {s['clients']} simulated users, "
          f"held-out {res['held_out_prompts']} prompts (greedy + {HELD_OUT_SAMPLES} seeded samples each); "
          f"failed requests: {res['failed_requests']} of {sum(res['requests'].values())}")
    head = ("round", "held-out reward (sampled)", "(greedy)", "named", "tokens", "users' reward", "up-rate",
            "pairs", "ties", "train s", "swap s", "in flight")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for rd in res["rounds"]:
        ev, c, sw = rd["held_out"], rd.get("collect") or {}, rd.get("swap") or {}

        def f(v, spec=".3f"):
            return "-" if v is None else format(v, spec)

        cells = (str(rd["round"]), f(ev["sampled_reward"]), f(ev["reward"]), f(ev["sampled_named"], ".2f"),
                 f(ev["sampled_tokens"], ".1f"), f(c.get("sampled_reward")), f(c.get("up_rate"), ".2f"),
                 f((rd.get("export") or {}).get("kept"), "d"), f(c.get("ties"), "d"),
                 f((rd.get("train") or {}).get("seconds"), ".0f"), f(sw.get("seconds"), ".2f"),
                 f(sw.get("in_flight_at_swap"), "d"))
        print("| " + " | ".join(cells) + " |")
    first, last = res["rounds"][0]["held_out"], res["rounds"][-1]["held_out"]
    print(f"held-out reward, sampled: {first['sampled_reward']:.3f} -> {last['sampled_reward']:.3f} "
          f"({last['sampled_reward'] - first['sampled_reward']:+.3f}); greedy: {first['reward']:.3f} -> "
          f"{last['reward']:.3f} ({last['reward'] - first['reward']:+.3f}); wall {res['wall_s']:.0f} s")
    print("users' reward: mean over the sampled replies users got in round r (on round r-1's adapter); "
          "in flight: samples decoding when the swap was posted")
    dpo_peak = max((rd["train"]["peak_rss_mb"] for rd in res["rounds"] if rd.get("train")), default=None)
    print(f"peak memory: server {res['server_peak_rss_mb']} MiB, posttrain dpo {dpo_peak} MiB, "
          f"this script {res['bench_peak_rss_mb']} MiB")


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rds = res["rounds"]
    rounds = [rd["round"] for rd in rds]
    fig, ax = plt.subplots(1, 2, figsize=(10.5, 3.9))
    ax[0].plot(rounds, [rd["held_out"]["sampled_reward"] for rd in rds], "o-",
               label=f"held-out, {HELD_OUT_SAMPLES} seeded samples/prompt")
    ax[0].plot(rounds, [rd["held_out"]["reward"] for rd in rds], "s-", alpha=0.8, label="held-out, greedy")
    users = [(rd["round"] - 1, rd["collect"]["sampled_reward"]) for rd in rds if rd.get("collect")]
    if users:
        ax[0].plot(*zip(*users), "^--", alpha=0.7, label="users' replies (that adapter)")
    ax[0].set_xlabel("adapter after r rounds of feedback")
    ax[0].set_ylabel("mean reward (named + brief)")
    ax[0].set_title("simulated users' reward")
    ax[0].legend(fontsize=8)
    ax[1].plot(rounds, [rd["held_out"]["sampled_tokens"] for rd in rds], "o-", label="reply tokens (sampled)")
    ax[1].plot(rounds, [rd["held_out"]["tokens"] for rd in rds], "s-", alpha=0.8, label="reply tokens (greedy)")
    ax[1].set_xlabel("adapter after r rounds of feedback")
    ax[1].set_ylabel("tokens")
    twin = ax[1].twinx()
    twin.plot(rounds, [rd["held_out"]["sampled_named"] for rd in rds], "^:", color="tab:green",
              label="answer named (sampled)")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("share naming the answer")
    ax[1].legend(fontsize=8, loc="upper right")
    twin.legend(fontsize=8, loc="lower left")
    ax[1].set_title("held-out replies")
    for a in ax:
        a.set_xticks(rounds)
    fig.suptitle(f"feedback loop through posttrain serve: {res['failed_requests']} failed requests of "
                 f"{sum(res['requests'].values())}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 round of 6 choices, 6 held-out prompts; writes into "
                                                               "the work dir, not bench/results")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--choices", type=int, help="K: choices collected per round")
    parser.add_argument("--held-out", type=int, dest="held_out", help="held-out prompts")
    parser.add_argument("--clients", type=int, help="simulated users chatting at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="work directory (default: a new temp dir; kept)")
    args = parser.parse_args()
    res = run(args)
    print_table(res)
    out_dir = Path(res["work_dir"]) if args.smoke else RESULTS_DIR
    write_json(out_dir / "feedback_loop.json", res)
    plot(res, out_dir / "feedback_loop.png")
    print(f"wrote {out_dir / 'feedback_loop.json'} and feedback_loop.png")
    if res["failed_requests"]:
        raise SystemExit(f"{res['failed_requests']} failed requests: {res['failures'][:3]}")


if __name__ == "__main__":
    main()
