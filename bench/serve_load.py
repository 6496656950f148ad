"""A bounded load on `posttrain serve`: many concurrent clients, one local server, three ways of batching.

Starts `python -m posttrain.cli serve MODEL` as a subprocess on 127.0.0.1 (queue as large
as the number of clients, so no request should be refused), then C client threads send
N chat requests in total (greedy, max_tokens T, or request i gets T[i % len(T)] for a list;
every 4th one streamed over SSE). The same load runs once per configuration, each on a fresh
server:

- `continuous` (the default: --batching continuous --max-batch 8): requests join and leave the
  running batch at token boundaries; SAM drafts for greedy rows while at most 2 decode;
- `static` (--batching static --max-batch 8, the server before continuous batching): a batch is
  formed from the waiting requests and decoded to its end (plain batched decoding; a request
  alone uses SAM), then the next;
- `continuous-16` (opt-in, --configs): continuous with --max-batch 16, a row for every client;
- `serial` (--batching static --max-batch 1): one request at a time with SAM, the reference
  answers (serial greedy).

Latency is per request, from send to the last byte (streams: time to first chunk recorded too),
with p50/p95 per max_tokens for mixed lengths. Tokens are the server's own count (`/metrics`
generated tokens); tokens/s = tokens / wall time of the whole load; rows per forward =
`posttrain_batch_size` sum / count (static: rows per generate call; continuous: rows per step).
Every configuration's answers are compared request by request with `serial`'s (greedy: they
should be identical). Goal: zero errors.

    python bench/serve_load.py                    # 16 clients, 64 requests, 32 tokens; writes serve_load.json
    python bench/serve_load.py --quick            # 4 clients, 8 requests (unless given), no JSON
    python bench/serve_load.py --max-tokens 8,64  # mixed lengths; writes bench/results/serve_load_mixed.json
    python bench/serve_load.py --configs continuous,static   # a subset (no identity check without serial)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/sft_throughput.py

import argparse
import json
import statistics
import subprocess
import tempfile
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, finish, load_average, run_context  # noqa: E402
from posttrain.ports import free_port  # noqa: E402

TOPICS = ["the moon", "rain", "volcanoes", "bread", "bicycles", "the ocean", "honey bees", "libraries",
          "winter", "trains", "chess", "gardens", "clocks", "rivers", "music", "maps"]
ASKS = ["Explain {} in one sentence.", "Give two facts about {}.", "Why do people like {}?",
        "Write a short poem about {}."]


def metric(text: str, name: str) -> float:
    """Sum of every sample of one Prometheus metric (all label sets)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def one_request(client: httpx.Client, i: int, max_tokens: int) -> dict:
    body = {"model": "default", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": ASKS[i % len(ASKS)].format(TOPICS[i % len(TOPICS)])}]}
    start = time.perf_counter()
    record = {"i": i, "stream": i % 4 == 3, "max_tokens": max_tokens}
    try:
        if record["stream"]:
            first = None
            text = ""
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                record["status"] = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    piece = chunk["choices"][0]["delta"].get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter() - start
                    text += piece
            record["first_chunk_ms"] = None if first is None else first * 1000
            record["text"] = text
        else:
            r = client.post("/v1/chat/completions", json=body)
            record["status"] = r.status_code
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
            record["text"] = text
        record["ok"] = record["status"] == 200
        record["chars"] = len(text)
    except Exception as exc:  # counted as an error, with its message in the JSON
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    record["latency_ms"] = (time.perf_counter() - start) * 1000
    return record


CONFIGS = {"continuous": ["--batching", "continuous", "--max-batch", "8"],  # all: --decoding sam (default)
           "static": ["--batching", "static", "--max-batch", "8"],
           # opt-in: continuous with room for every client (rows join and leave, so a wider batch
           # costs only the rows actually decoding)
           "continuous-16": ["--batching", "continuous", "--max-batch", "16"],
           "serial": ["--batching", "static", "--max-batch", "1"]}


def run(args, name: str) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "posttrain.cli", "serve", args.model, "--name", "default", "--port", str(port),
           "--queue", str(args.clients), "--max-tokens-cap", str(max(args.budgets)), "--timeout", "600",
           "--decoding", "sam", *CONFIGS[name],
           # replies are stored, as by default, but in a temp dir rather than ./serve/
           "--feedback-db", str(Path(tempfile.mkdtemp(prefix="serve_load.")) / "feedback.db")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(Path(tempfile.gettempdir()) / "serve_load.server.log", "w")  # read it when the server fails
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not answer /health within 120 s")
            time.sleep(0.5)
        with httpx.Client(base_url=base, timeout=600) as warm:  # first request pays one-off setup costs
            one_request(warm, 0, 4)
        before = httpx.get(base + "/metrics").text
        load_before = load_average()
        records: list[dict] = []
        lock = threading.Lock()
        next_i = iter(range(args.requests))

        def client_loop() -> None:
            with httpx.Client(base_url=base, timeout=600) as client:
                while True:
                    with lock:
                        i = next(next_i, None)
                    if i is None:
                        return
                    rec = one_request(client, i, args.budgets[i % len(args.budgets)])
                    with lock:
                        records.append(rec)

        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        after = httpx.get(base + "/metrics").text
    finally:
        server.terminate()
        server.wait(30)
    tokens = metric(after, "posttrain_generated_tokens_total") - metric(before, "posttrain_generated_tokens_total")
    drafted = metric(after, "posttrain_draft_tokens_total") - metric(before, "posttrain_draft_tokens_total")
    accepted = (metric(after, "posttrain_draft_tokens_accepted_total")
                - metric(before, "posttrain_draft_tokens_accepted_total"))
    rows = metric(after, "posttrain_batch_size_sum") - metric(before, "posttrain_batch_size_sum")
    batches = metric(after, "posttrain_batch_size_count") - metric(before, "posttrain_batch_size_count")
    latencies = [r["latency_ms"] for r in records if r["ok"]]
    firsts = [r["first_chunk_ms"] for r in records if r["ok"] and r.get("first_chunk_ms") is not None]
    errors = [r for r in records if not r["ok"]]
    by_budget, by_budget_95 = {}, {}  # mixed lengths: the p50 and p95 latency of each max_tokens
    for t in args.budgets if len(args.budgets) > 1 else []:
        mine = [r["latency_ms"] for r in records if r["ok"] and r["max_tokens"] == t]
        by_budget[t] = round(percentile(mine, 50), 1) if mine else None
        by_budget_95[t] = round(percentile(mine, 95), 1) if mine else None
    return {
        "model": args.model, "config": name, "server_flags": ["--decoding", "sam", *CONFIGS[name]],
        "clients": args.clients, "requests": len(records), "max_tokens": args.budgets[0] if len(args.budgets) == 1 else args.budgets,
        "streamed": sum(r["stream"] for r in records), "errors": len(errors),
        "error_samples": [r.get("error") or r.get("status") for r in errors[:5]],
        "wall_s": round(wall, 2), "requests_per_s": round(len(records) / wall, 3),
        "tokens": int(tokens), "tokens_per_s": round(tokens / wall, 2),
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p95_ms": round(percentile(latencies, 95), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "mean_ms": round(statistics.mean(latencies), 1) if latencies else None,
        "stream_first_chunk_p50_ms": round(percentile(firsts, 50), 1) if firsts else None,
        "draft_tokens": int(drafted), "draft_tokens_accepted": int(accepted),
        "draft_acceptance": round(accepted / drafted, 3) if drafted else None,
        "p50_ms_by_max_tokens": by_budget, "p95_ms_by_max_tokens": by_budget_95,
        "generate_calls": int(batches), "mean_batch_size": round(rows / batches, 2) if batches else None,
        "texts": {r["i"]: r["text"] for r in records if r["ok"]},
        **run_context(load_before, load_average(), "fastapi", "uvicorn", "transformers"),
    }


def print_table(r: dict) -> None:
    configs = r["configs"]
    print(f"posttrain serve {r['model']}: {r['clients']} clients, {r['requests']} requests "
          f"({r['streamed']} streamed), max_tokens {r['max_tokens']}, greedy")
    print(f"  {'':<28}" + "".join(f"{name:>14}" for name in configs))
    rows = [("requests/s", "requests_per_s"), ("tokens/s", "tokens_per_s"), ("tokens", "tokens"),
            ("p50 latency ms", "p50_ms"), ("p95 latency ms", "p95_ms"), ("p99 latency ms", "p99_ms"),
            ("stream first chunk p50 ms", "stream_first_chunk_p50_ms"), ("rows per forward", "mean_batch_size"),
            ("forwards (calls / steps)", "generate_calls"), ("draft accepted / drafted", None),
            ("errors", "errors"), ("same answers as serial", "same_as_serial"), ("wall s", "wall_s")]
    for label, key in rows:
        values = [c.get(key) if key else f"{c['draft_tokens_accepted']} / {c['draft_tokens']}" for c in configs.values()]
        print(f"  {label:<28}" + "".join(f"{str(v):>14}" for v in values))
    for q in (50, 95):
        for t in r.get(f"p{q}_ms_by_max_tokens") or {}:
            label = f"p{q} ms, max_tokens {t}"
            print(f"  {label:<28}" + "".join(f"{str(c[f'p{q}_ms_by_max_tokens'][t]):>14}" for c in configs.values()))
    if "static" in configs and "continuous" in configs:
        for t, s in (configs["static"].get("p50_ms_by_max_tokens") or {}).items():
            c = configs["continuous"]["p50_ms_by_max_tokens"].get(t)
            if s and c:
                print(f"  continuous / static p50 latency, max_tokens {t}: {c / s:.2f}x")
        st, ct = configs["static"]["tokens_per_s"], configs["continuous"]["tokens_per_s"]
        if st:
            print(f"  continuous / static tokens/s: {ct / st:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", type=int, help="default 16 (--quick: 4)")
    parser.add_argument("--requests", type=int, help="default 64 (--quick: 8)")
    parser.add_argument("--max-tokens", default="32", help="T, or T1,T2,... cycled over the requests")
    parser.add_argument("--quick", action="store_true", help="a small load (unless sized), no JSON written")
    parser.add_argument("--configs", default="continuous,static,serial",
                        help=f"comma-separated, run in this order: {', '.join(CONFIGS)} (default: continuous,static,serial)")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial run (no identity check)")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip() and not (args.no_serial and n.strip() == "serial")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise SystemExit(f"--configs: unknown or no configuration {unknown}; choose from {', '.join(CONFIGS)}")
    args.clients = args.clients or (4 if args.quick else 16)
    args.requests = args.requests or (8 if args.quick else 64)
    args.budgets = [int(t) for t in args.max_tokens.split(",")]
    if any(t < 1 for t in args.budgets):
        raise SystemExit(f"--max-tokens: every budget must be >= 1, got {args.max_tokens}")
    runs = {name: run(args, name) for name in names}
    texts = {name: r.pop("texts") for name, r in runs.items()}
    if "serial" in texts:  # serial greedy is the reference: every configuration's answers against it
        for name, r in runs.items():
            shared = sorted(set(texts[name]) & set(texts["serial"]))
            r["compared_answers"] = len(shared)
            r["same_as_serial"] = sum(texts[name][i] == texts["serial"][i] for i in shared)
            r["differing_answers"] = [i for i in shared if texts[name][i] != texts["serial"][i]][:10]
    result = dict(runs[names[0]])  # the first (by default the default) configuration's figures at the top level
    result["configs"] = {name: {k: v for k, v in r.items() if k not in ("machine", "versions")}
                         for name, r in runs.items()}
    name = "serve_load.json" if len(args.budgets) == 1 else "serve_load_mixed.json"
    finish(result, RESULTS_DIR / name, args.quick, print_table)


if __name__ == "__main__":
    main()
