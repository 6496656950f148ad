"""`posttrain <verb>`: one verb per stage; `--config recipe.yaml` plus `key.sub=value` overrides."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from posttrain.stages import CLI_ROLES, STAGES, Stage, verbs

EPILOG = """sections: {sections} (all keys: --print-config).
overrides: any config key as dotted key=value after the options, e.g.
  posttrain {verb} --config recipes/{recipe}.yaml train.lr=1e-4 adapter.r=8 data.train=my.jsonl"""
STAGES_FOR_CLI = verbs(*CLI_ROLES)


def _add_stage(sub, stage: Stage):
    p = sub.add_parser(stage.verb, help=stage.help, description=stage.help,
                       epilog=EPILOG.format(sections=", ".join(stage.sections), verb=stage.verb, recipe=stage.recipe),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="recipe YAML (see recipes/)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key with its value) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when `posttrain plan` predicts the run will not fit the device's memory")
    if stage.backends:
        p.add_argument("--backend", choices=["local", "ray"],
                       help="where the worker groups run (default: the config's backend, local)")
    return p


FLAG_EPILOG = """--config FILE: a YAML mapping of these options by long name (max_new_tokens: 64, ...);
key=value after the options overrides it; flags given on the command line win over both."""


def _add_flag_config(p, overrides: bool = True) -> None:
    p.add_argument("--config", "-c", help="YAML with any of these options by long name")
    if overrides:  # (merge: its positional SOURCE would be ambiguous with them)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. max_new_tokens=64")


def apply_flag_config(parser: argparse.ArgumentParser, args, argv: list[str] | None):
    """--config YAML + key=value overrides for flag-style verbs: they become the subparser's
    defaults and the command line is parsed again, so explicit flags still win."""
    if args.verb not in ("generate", "chat", "merge", "eval"):
        return args
    from posttrain.config import apply_overrides, load_yaml

    values = load_yaml(args.config) if args.config else {}
    values = apply_overrides(values, list(getattr(args, "overrides", [])))
    if args.verb == "eval":
        values.pop("tasks", None)  # read by cmd_eval from the file itself
    if not values:
        return args
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.verb]
    known = {a.dest for a in sub._actions} - {"help", "config", "overrides"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for '{args.verb}'; allowed: {', '.join(sorted(known))}")
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training for language models: adapt, align, compress, evaluate, deploy.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb in STAGES_FOR_CLI:
        _add_stage(sub, STAGES.get(verb))

    p = sub.add_parser("eval", help="evaluate a model (optionally against another) on local tasks",
                       description="Evaluate one model, or two side by side (--compare), on generation tasks "
                                   "and perplexity sets; prints a table and writes a bar chart PNG.",
                       epilog="task files: JSONL rows {prompt, answer}; perplexity files: rows {text}. "
                              "Or give --config with a tasks: list (see recipes/eval.yaml).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default="default", help="model spec: default, gemma3-270m, HF dir, run dir, .gguf, hub id")
    p.add_argument("--compare", help="a second model to compare against (e.g. the base)")
    p.add_argument("--config", "-c", help="YAML with a tasks: list (name, path, type, metric, extract, ...) "
                                          "and any option below by its long name (model, compare, limit, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. limit=20")
    p.add_argument("--task", action="append", default=[], metavar="PATH[:METRIC]",
                   help="generation task file; METRIC exact_match (default), accuracy or token_f1; "
                        "or 'humaneval' (code, pass@k: see below)")
    p.add_argument("--perplexity", action="append", default=[], metavar="PATH", help="text JSONL for perplexity")
    p.add_argument("--limit", type=int, help="at most this many rows per task")
    p.add_argument("--guard", metavar="RULES.yaml",
                   help="output-guard rules applied to the replies of --task files (blocked = refusal text); "
                        "e.g. --task data/safety/harmful_test.jsonl:refusal_rate --guard recipes/data/guard_rules.yaml")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--out", help="directory for results.json and the bar chart (default: eval-out)")
    g = p.add_argument_group("code (--task humaneval: pass@k, completions run in a sandbox)")
    g.add_argument("--samples", type=int, default=1, help="completions per problem, n (default 1)")
    g.add_argument("--k", default="1", help="comma-separated k of pass@k, each <= --samples (default 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); sampling uses top-p 0.95")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds per program in the sandbox (default 5)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="per completion (default 256)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="ask through the chat template; score the reply's code block")

    p = sub.add_parser("plan", help="will it fit? predict a recipe's peak memory and step time before loading",
                       description="Predict the peak memory of a training recipe from the model's config.json\n"
                                   "(or GGUF metadata) alone: weights, gradients, optimizer state, activations,\n"
                                   "the vocabulary head, reference/teacher copies, the rollout KV cache, and on\n"
                                   "CPU the load peak. Prints a table, whether it fits the device, and when it\n"
                                   "does not, what to change with the predicted peak of each change (exit 1).\n"
                                   "Nothing is loaded.",
                       epilog="examples:\n"
                              "  posttrain plan --config recipes/sft_full.yaml\n"
                              "  posttrain plan -c recipes/sft_lora.yaml model.name=HuggingFaceTB/SmolLM2-1.7B \\\n"
                              "      data.max_length=4096 --device cuda:24GB\n"
                              "  (a hub id needs its config.json in the local HF cache: the planner reads no network)\n"
                              "Training stages run the same check at start and refuse a run that cannot fit\n"
                              "(--no-memory-check runs it anyway). CPU figures are checked by bench/plan_check.py\n"
                              "(BENCHMARKS.md); GPU figures are unchecked.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="the stage's recipe YAML (its stage: key names the stage; default sft)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for the stage's verb")
    p.add_argument("--stage", choices=[v for v in STAGES_FOR_CLI], help="the stage (default: the recipe's stage:)")
    p.add_argument("--device", help="cpu (this machine's available RAM), cuda (device 0's free memory), or a "
                                    "stated size: cpu:64GB, cuda:80GB (GB = GiB) (default: cuda if present, else cpu)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak matmul TFLOP/s for the step-time estimate (default on cpu: measured)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("generate", help="generate text from prompts",
                       description="Generate from one or more prompts (or a JSONL file of {prompt}).",
                       epilog=FLAG_EPILOG)
    _add_flag_config(p)
    p.add_argument("--model", "-m", default="default")
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", help="JSONL with a prompt field per row")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--decoding", default="plain", choices=["plain", "sam", "lookup"],
                   help="sam: SAM-Decoding (suffix-automaton drafts, lossless for greedy); lookup: prompt lookup")
    p.add_argument("--corpus", help="static SAM corpus: a saved automaton (.npz, see `posttrain sam build`) "
                                    "or JSONL/.txt files, comma-separated")
    p.add_argument("--draft-len", type=int, help="tokens drafted per verification step (default 4)")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "torch"],
                   help="where forward passes run: native (our CPU decoder), torch (the model's forward), "
                        "auto (native when it can run the model)")
    p.add_argument("--aux-model", help="SAM[aux]: a smaller model with the same tokenizer that drafts when "
                                       "the automata find no match (model spec)")
    p.add_argument("--stats", action="store_true", help="print acceptance statistics and tokens/s to stderr")

    p = sub.add_parser("sam", help="SAM-Decoding tools").add_subparsers(dest="sam_verb", metavar="<tool>")
    q = p.add_parser("build", help="build a static suffix automaton from a corpus and save it (.npz)",
                     description="Tokenize JSONL (text/prompt/completion/messages fields) or .txt files, join the "
                                 "documents with EOS and save the automaton for --corpus.")
    q.add_argument("files", nargs="+")
    q.add_argument("--out", "-o", required=True, help="output .npz")
    q.add_argument("--model", "-m", default="default", help="whose tokenizer to use")

    p = sub.add_parser("chat", help="interactive chat in the terminal (streams tokens)", epilog=FLAG_EPILOG)
    _add_flag_config(p)
    p.add_argument("--model", "-m", default="default")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])

    p = sub.add_parser("run", help="run a pipeline YAML: data, stages, gates, deploy; skip what is unchanged",
                       description="Run PIPELINE.yaml (see recipes/pipeline_demo.yaml): prepare the data: entries "
                                   "(<output_dir>/data/NAME.jsonl), run each stage into <output_dir>/<name> with the "
                                   "model: initialisation and the shared eval:, check its gates, then export the "
                                   "deploy: model to <output_dir>/deploy (and serve it if deploy.serve is set, or post its "
                                   "LoRA adapter to a running server if deploy.swap_into is). Unchanged steps are skipped, unfinished ones resumed; a failed gate stops the run.",
                       epilog="keys: name, output_dir, data, model, eval, stages (name, verb, config, overrides, "
                              "gate), deploy (source, config, formats, overrides, serve, gate, swap_into, swap_name, "
                              "swap_key_env, swap_reset_baseline)")
    p.add_argument("pipeline", help="pipeline YAML")
    p.add_argument("--force", action="store_true", help="re-run every step even if unchanged")
    p.add_argument("--no-serve", action="store_true", help="do not start the server of deploy.serve")

    p = sub.add_parser("report", help="(re)write the HTML report of a pipeline run: OUTPUT_DIR/report/report.html",
                       description="Write OUTPUT_DIR/report/report.html (self-contained: stages, timings, gates, "
                                   "metrics before/after, training curves, compression, export) plus its PNGs, "
                                   "from OUTPUT_DIR/pipeline.json and the stage run dirs. `run` does this itself.")
    p.add_argument("output_dir", help="the pipeline's output_dir (holds pipeline.json)")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)",
                       description="Serve MODEL over an OpenAI-compatible API: /v1/chat/completions and "
                                   "/v1/completions (streaming with SSE), /v1/models, /health, /metrics (Prometheus). "
                                   "Concurrent requests are decoded as one batch (--max-batch) that they join and "
                                   "leave at token boundaries (--batching continuous, the default); SAM speculative "
                                   "decoding drafts for greedy requests while few decode.")
    p.add_argument("model", nargs="?", default="default", help="model spec: default, gemma3-270m, HF dir, run dir, .gguf")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model name clients send (default: MODEL as given)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept only 'Authorization: Bearer KEY' (repeatable; default: no auth)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="a LoRA adapter (PEFT dir or run dir) over MODEL, served as model NAME (repeatable)")
    p.add_argument("--admin-key", action="append", default=[], metavar="KEY",
                   help="enable /admin/adapters (load, swap, delete adapters while serving) for "
                        "'Authorization: Bearer KEY' (repeatable; also read from $POSTTRAIN_ADMIN_KEY; must differ "
                        "from every --api-key; default: /admin/* off)")
    p.add_argument("--monitor-window", type=int, default=100,
                   help="replies per adapter in /metrics' window series: refusal rate, mean reply length, "
                        "tokens/s (default 100)")
    p.add_argument("--drift-threshold", type=float, default=0.5,
                   help="relative change of a window series from its baseline that sets posttrain_drift_alert "
                        "(default 0.5; 0 = off)")
    p.add_argument("--drift-baseline", metavar="FILE",
                   help="baselines as YAML/JSON {served name: {refusal_rate: x, reply_tokens: y, tokens_per_s: z}, "
                        "'*': {up_rate: u}} (default: each series' first full window)")
    p.add_argument("--guard", metavar="RULES.yaml", help="output-guard rules (guarded streams arrive in one chunk)")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens accepted (default 512)")
    p.add_argument("--queue", type=int, default=32, help="requests waiting or running; more get 429 (default 32)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--decoding", default="sam", choices=["sam", "lookup", "plain"],
                   help="speculative drafting of greedy requests (continuous: while at most 2 rows decode; static: a "
                        "request alone; batches of several decode plain)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="concurrent compatible requests decoded as one batch (default 16; 1 = one at a time)")
    p.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                   help="continuous (default): requests join and leave the running batch at every token; "
                        "static: a batch is formed, decoded to its end, then the next (the server before "
                        "continuous batching; also what runs where the native decoder cannot)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="static batching: how long a new batch waits for more requests before it starts (default 5)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--max-n", type=int, default=4, help="most samples (`n`) one request may ask for (default 4)")
    p.add_argument("--feedback-db", metavar="PATH|URL|off",
                   help="where replies and /v1/feedback are stored: a SQLite file (WAL) or a postgresql:// URL; "
                        "'off' stores nothing (default: MODEL/serve/feedback.db when MODEL is a directory, "
                        "else ./serve/feedback.db)")
    p.add_argument("--no-redact-feedback", action="store_true",
                   help="store prompts, replies and feedback text as they are (default: emails, phone and card "
                        "numbers replaced by [EMAIL]/[PHONE]/[CARD] before storage)")

    p = sub.add_parser("ui", help="web studio: runs and live curves, launch forms, chat, data preview",
                       description="Serve the web studio over ROOT: every run directory under it (status, config, "
                                   "manifest, live curves, eval tables, gates, artifacts; several side by side), "
                                   "forms that start the project's verbs and pipelines (stop, resume), chat with "
                                   "any run's model through `posttrain serve` (thumbs and A/B choices go to its "
                                   "feedback database), and data files as the trainer sees them. Paths in recipes "
                                   "are relative to ROOT, which the studio works in; it reads and starts nothing "
                                   "outside it. Runs it starts keep going when it stops.",
                       epilog="binds 127.0.0.1 by default; any other --host needs --token (or POSTTRAIN_UI_TOKEN): "
                              "open http://HOST:PORT/?token=TOKEN once, the browser keeps it in a cookie")
    p.add_argument("--root", default=".", help="the directory of runs, recipes and data (default: .)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", help="require this token (default: $POSTTRAIN_UI_TOKEN; needed beyond loopback)")
    p.add_argument("--feedback-db", metavar="PATH|URL|off",
                   help="where chat replies and feedback go, shared by the chat servers: a SQLite file (relative to "
                        "ROOT) or a postgresql:// URL (default: ROOT/.posttrain-ui/feedback.db)")

    p = sub.add_parser("feedback", help="feedback collected by `posttrain serve`: export as training data",
                       description="Tools for the feedback database of `posttrain serve --feedback-db`."
                       ).add_subparsers(dest="feedback_verb", metavar="<tool>")
    text = ("Export feedback as training data: choices between two replies -> preference pairs "
            "(prompt, chosen, rejected) for `posttrain dpo`; ratings -> KTO examples (prompt, completion, "
            "label) for `posttrain dpo dpo.loss=kto`. The latest feedback on a reply (or pair) wins; the "
            "data filters run on the rows (default: exact + near dedup, PII redaction); OUT is written "
            "atomically, with OUT.report.json (counts, skipped and dropped rows).")
    q = p.add_parser("export", help="feedback -> preference pairs (DPO) or KTO examples", description=text)
    q.add_argument("--db", required=True, help="the server's feedback database: SQLite file or postgresql:// URL")
    q.add_argument("--out", "-o", required=True, help="output JSONL")
    q.add_argument("--since", help="only feedback given at or after this ISO date or date-time (no zone = UTC)")
    q.add_argument("--kind", default="preference", choices=["preference", "kto"],
                   help="preference: choices -> pairs (default); kto: ratings -> unpaired examples")
    q.add_argument("--rules", help="filter rules YAML (recipes/data/filter_rules.yaml; default: dedup + PII)")

    p = sub.add_parser("merge", help="fold an adapter (LoRA/DoRA/IA3) into a full model directory",
                       description="Fold adapters into the base weights and save a plain transformers model.")
    _add_flag_config(p, overrides=False)
    p.add_argument("source", nargs="?", help="adapter dir or run dir whose final/ is an adapter")
    p.add_argument("--out", "-o", help="output model directory (required)")
    p.add_argument("--dtype", default="fp32", choices=["auto", "bf16", "fp32"])

    p = sub.add_parser("filter", help="filter a JSONL file: dedup, length, PII, blocklist, regex, score",
                       description="Drop (or redact) rows of IN by the rules in --rules and write the kept rows "
                                   "to OUT atomically, plus a report of every dropped row and its reason "
                                   "(default OUT.report.json). Without --rules: exact + near dedup and PII "
                                   "redaction. See recipes/data/filter_rules.yaml.")
    p.add_argument("input", metavar="IN", help="input JSONL file")
    p.add_argument("output", metavar="OUT", help="output JSONL file (written atomically)")
    p.add_argument("--rules", "-r", help="rules YAML (keys: exact_dedup, near_dedup, min_chars, max_chars, "
                                         "min_words, max_words, pii, blocklist, regex, score)")
    p.add_argument("--report", help="report JSON path (default: OUT.report.json)")

    p = sub.add_parser("reason", help="reasoning strategies: direct, CoT, self-consistency, Tree-of-Thoughts, router",
                       description="Answer one question with a strategy (-p), or --eval: every strategy on a task, "
                                   "a table of accuracy vs generated tokens, results JSON and a PNG curve.",
                       epilog="tasks: arith, game24, mc (data/reason/) or a JSONL of {prompt, answer} "
                              "(+ numbers for Game-of-24, options for multiple choice).\n"
                              "  posttrain reason --strategy cot -p 'Tom has 3 apples and buys 4. How many?' --task arith\n"
                              "  posttrain reason --eval --task game24 --strategies direct,cot,sc,tot,router --limit 10",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default="default")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--task", "-t", default="arith", help="arith, game24, mc or a JSONL path")
    p.add_argument("--strategy", "-s", default="cot", help="direct, cot, cot_fewshot, sc, tot, router")
    p.add_argument("--prompt", "-p", help="one question (game24: the numbers are read from it)")
    p.add_argument("--eval", action="store_true", help="evaluate --strategies on the task's file")
    p.add_argument("--strategies", default="direct,cot,sc,tot,router", help="comma-separated (with --eval)")
    p.add_argument("--limit", type=int, help="at most this many questions (with --eval)")
    p.add_argument("--out", default="reason-out", help="directory for results.json and accuracy_vs_tokens.png")
    for flag, kind, what in (("--samples", int, "self-consistency paths (5)"), ("--temperature", float, "sampling (0.7)"),
                             ("--search", str, "ToT search: bfs or dfs"), ("--value", str, "ToT value: auto, checker, model"),
                             ("--k", int, "ToT proposals per state (3)"), ("--beam", int, "ToT BFS beam (2)"),
                             ("--depth", int, "ToT max depth (4)"), ("--threshold", float, "ToT DFS prune value (0.2)"),
                             ("--budget", int, "ToT DFS expansions (12)"), ("--probe", str, "router probe: logprob or vote"),
                             ("--confidence", float, "router: answer directly at or above (0.8)"),
                             ("--final", str, "router last rung: auto, sc, tot"), ("--seed", int, "sampling seed (0)"),
                             ("--cot-tokens", int, "CoT token budget (task default)")):
        p.add_argument(flag, type=kind, help=what)
    p.add_argument("--fewshot", action="store_true", help="chain-of-thought with the task's worked examples")

    p = sub.add_parser("kb", help="knowledge base: build, search, retrieval-augmented answers with citations")
    p = p.add_subparsers(dest="kb_verb", metavar="<tool>")
    q = p.add_parser("build", help="index documents (.md/.txt/.jsonl) and knowledge-graph triples",
                     description="Chunk documents (Markdown by headings, text by paragraphs, JSONL rows with "
                                 "'text' [+ 'title', 'id']) and triples (JSONL/TSV/CSV: subject, relation, object; "
                                 "one statement chunk per subject) and write a BM25 (and --dense) index to --out.")
    q.add_argument("documents", nargs="*", metavar="DOC")
    q.add_argument("--triples", action="append", default=[], metavar="FILE", help="triples file (repeatable)")
    q.add_argument("--out", "-o", required=True, help="index directory (kb.json [+ embeddings.npy])")
    q.add_argument("--dense", action="store_true", help="also embed chunks with all-MiniLM-L6-v2 (offline package)")
    q.add_argument("--max-words", type=int, default=120, help="words per chunk (longer blocks are windowed)")
    q.add_argument("--overlap", type=int, default=20, help="words shared by consecutive windows")
    for name, text in (("search", "print the top-k chunks for a query"),
                       ("ask", "answer a question from the top-k chunks, citing them [n]"),
                       ("eval", "score answers on a QA file {prompt, answer, gold?}: F1, exact, contains, "
                                "citations, recall@k; --closed-book for the no-retrieval baseline")):
        q = p.add_parser(name, help=text, description=text)
        q.add_argument("index", help="directory written by `posttrain kb build`")
        if name != "eval":
            q.add_argument("query", help="the query / question")
        q.add_argument("-k", type=int, default=3, help="chunks to retrieve (default 3: short prompts for small models)")
        q.add_argument("--method", default="bm25", choices=["bm25", "dense", "hybrid"])
        if name == "search":
            continue
        q.add_argument("--model", "-m", default="default", help="model spec: default, gemma3-270m, HF dir, run dir, hub id")
        q.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
        q.add_argument("--max-new-tokens", type=int, default=32 if name == "eval" else 64)
        if name == "eval":
            q.add_argument("--qa", required=True, help="QA JSONL: prompt, answer, optional gold chunk id(s)")
            q.add_argument("--closed-book", action="store_true", help="no retrieval: the question alone")
            q.add_argument("--limit", type=int, help="at most this many questions")
            q.add_argument("--out", help="write the scores and every prediction to this JSON file")

    p = sub.add_parser("synth", help="synthetic data: self-instruct, or rejection sampling with a verifier",
                       description="Generate a chat dataset with a teacher model (any model spec).\n"
                                   "  mode=rejection: k samples per prompt with a known answer; only verified\n"
                                   "    answers kept (deduplicated, at most m per prompt).\n"
                                   "  mode=self-instruct: new instructions from seed tasks, filtered (dedup,\n"
                                   "    length, PII, ...), then responses (optional reward-model threshold).\n"
                                   "Every row carries provenance; counts go to OUTPUT.report.json.",
                       epilog="sections: mode, output, teacher, self_instruct | rejection (all keys: "
                              "--print-config).\n  posttrain synth --config recipes/synth_rejection.yaml "
                              "rejection.k=8 teacher.name=runs/sft output=synth.jsonl",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="recipe YAML (recipes/synth_rejection.yaml, synth_self_instruct.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rejection.k=8")

    p = sub.add_parser("data", help="data tools").add_subparsers(dest="data_verb", metavar="<tool>")
    q = p.add_parser("inspect", help="render records through the chat template and mark loss tokens",
                     description="Shows validation results, then a few records as the model sees them, with "
                                 "the tokens that carry loss marked [[like this]].")
    q.add_argument("file")
    q.add_argument("--model", "-m", default="default", help="whose tokenizer/chat template to use")
    q.add_argument("--n", type=int, default=3, help="records to render")
    q.add_argument("--kind", choices=["chat", "completion", "text", "preference", "prompt", "unpaired"])
    q.add_argument("--max-length", type=int, default=1024)
    q.add_argument("--color", action="store_true", help="color loss tokens instead of brackets")
    return parser


def cmd_stage(args) -> int:
    from posttrain.config import build_config

    stage = STAGES.get(args.verb)
    config_cls, run = stage.load()
    overrides = [f"{k}={v}" for k, v in stage.presets.items()] + list(args.overrides)
    if stage.backends and args.backend:
        overrides.append(f"backend={args.backend}")
    if args.print_config:
        from posttrain.config import dump_config

        if not args.config:  # show the defaults without a data file
            given = {o.split("=", 1)[0] for o in overrides}
            overrides += [p for p in stage.placeholders if p.split("=", 1)[0] not in given]
        print(dump_config(build_config(config_cls, args.config, overrides)), end="")
        return 0
    cfg = build_config(config_cls, args.config, overrides)
    if args.no_memory_check:
        from posttrain.plan import SKIP_ENV

        os.environ[SKIP_ENV] = "0"
    manifest = run(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"run directory: {cfg.output_dir}  (final model: {cfg.output_dir}/final)")
    return 0 if manifest else 1


def cmd_plan(args) -> int:
    import json

    from posttrain.config import build_config, load_yaml
    from posttrain.plan import format_plan, get_device, measure_cpu_flops, plan_stage
    from posttrain.stages import stage_of_recipe

    stage = STAGES.get(args.stage) if args.stage else stage_of_recipe(load_yaml(args.config) if args.config else {})
    config_cls, _ = stage.load()
    overrides = [f"{k}={v}" for k, v in stage.presets.items()] + list(args.overrides)
    given = {o.split("=", 1)[0] for o in overrides}
    data = load_yaml(args.config) if args.config else {}
    for placeholder in stage.placeholders:  # required data keys: the plan reads no data file
        key = placeholder.split("=", 1)[0]
        node = data
        for part in key.split(".")[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if key not in given and key.split(".")[-1] not in (node if isinstance(node, dict) else {}):
            overrides.append(placeholder)
    cfg = build_config(config_cls, args.config, overrides)
    device = get_device(args.device, args.peak_tflops)
    if device.kind == "cpu" and not device.peak_flops:
        import dataclasses

        device = dataclasses.replace(device, peak_flops=measure_cpu_flops(), flops_measured=True)
    plan = plan_stage(cfg, device)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, stage.verb))
    return 0 if plan.fits else 1


def cmd_run(args) -> int:
    from posttrain.eval.report import format_table, metric_table, write_pipeline_report
    from posttrain.pipeline import load_pipeline, run_pipeline

    pipe = load_pipeline(args.pipeline)
    try:
        state = run_pipeline(pipe, force=args.force)
    finally:  # also after a failed gate or an error: the report shows where the run stopped
        if (Path(pipe.output_dir) / "pipeline.json").is_file():
            print(f"report: {write_pipeline_report(pipe.output_dir, verbs('compress'))}")
    table = metric_table(state)
    if table:
        print(format_table(table))
    print(f"pipeline {state['name']}: " + ", ".join(f"{k} {v['status']}" for k, v in state["stages"].items()))
    if state.get("swap"):
        swap = state["swap"]
        print(f"swap into {swap['url']}: {swap['name']!r} {swap['status']} (version {swap.get('version')})")
    if pipe.deploy is not None and pipe.deploy.serve is not None and not args.no_serve:
        serve = pipe.deploy.serve
        print(f"serving {pipe.output_dir}/deploy on http://{serve.host}:{serve.port}/v1 (Ctrl-C stops)")
        return main(serve_argv(pipe))
    return 0


def serve_argv(pipe) -> list[str]:
    """The `posttrain serve` command line of a pipeline's deploy.serve section."""
    serve = pipe.deploy.serve
    feedback = ["--feedback-db", serve.feedback_db] if serve.feedback_db else []
    return ["serve", str(Path(pipe.output_dir) / "deploy"), "--host", serve.host, "--port", str(serve.port),
            *feedback, *serve.args]


def cmd_report(args) -> int:
    from posttrain.eval.report import write_pipeline_report

    print(write_pipeline_report(args.output_dir, verbs("compress")))
    return 0


def cmd_eval(args) -> int:
    from posttrain.config import load_yaml
    from posttrain.eval.report import bar_chart, format_table
    from posttrain.fileio import write_json_atomic
    from posttrain.eval.tasks import EvalSpec, run_eval
    from posttrain.models import load_model

    if "humaneval" in args.task:
        return _eval_humaneval(args)
    specs = [EvalSpec.model_validate(t) for t in load_yaml(args.config).get("tasks", [])] if args.config else []
    for item in args.task:
        path, _, metric = item.partition(":")
        specs.append(EvalSpec(name=Path(path).stem, path=path, type="generation", metric=metric or "exact_match",
                              limit=args.limit, guard=args.guard))
    for path in args.perplexity:
        specs.append(EvalSpec(name=f"{Path(path).stem}_ppl", path=path, type="perplexity", limit=args.limit))
    if not specs:
        raise ValueError("nothing to evaluate: give --task FILE, --perplexity FILE or --config with tasks")
    if args.guard and not args.task:
        raise ValueError("--guard applies to --task files; in a --config, give each task its own guard: key")
    results = {}
    # the baseline (--compare) first, so the delta column reads "model minus baseline"
    for label, spec in ((args.compare, args.compare), (args.model, args.model)):
        if spec is None:
            continue
        model, tok = load_model(spec, dtype=args.dtype)
        results[label] = run_eval(model, tok, specs)
        del model
    print(format_table(results))
    out = Path(args.out or "eval-out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    bar_chart(results, out / "eval.png")
    print(f"wrote {out}/results.json and {out}/eval.png")
    return 0


def _eval_humaneval(args) -> int:
    """`eval --task humaneval`: pass@k per model; humaneval.json keeps every completion and its outcome."""
    from posttrain.eval.code import evaluate_humaneval
    from posttrain.eval.sandbox import SandboxLimits
    from posttrain.fileio import write_json_atomic
    from posttrain.models import load_model

    if args.task != ["humaneval"] or args.perplexity:
        raise ValueError("--task humaneval runs on its own: give the other tasks in a separate eval")
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers like 1,10; got {args.k!r}") from None
    results = {}
    for spec in (s for s in (args.compare, args.model) if s is not None):
        model, tok = load_model(spec, dtype=args.dtype)
        results[spec] = evaluate_humaneval(model, tok, samples=args.samples, ks=ks, temperature=args.temperature,
                                           limit=args.limit, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                           chat=args.chat, limits=SandboxLimits(timeout=args.timeout))
        del model
    for spec, r in results.items():
        scores = "  ".join(f"pass@{k} {r[f'pass@{k}']:.4f}" for k in ks)
        print(f"{spec}: humaneval ({r['problems']} problems, n={args.samples}, T={args.temperature:g}"
              f"{', chat' if args.chat else ''}): {scores}  outcomes {r['outcomes']}")
    out = Path(args.out or "eval-out")
    write_json_atomic(out / "humaneval.json", results)
    print(f"wrote {out}/humaneval.json")
    return 0


def cmd_generate(args) -> int:
    import json
    import time

    from posttrain.generate.engine import GenerationConfig, generate
    from posttrain.models import load_model

    prompts = list(args.prompt)
    if args.file:
        from posttrain.data.formats import load_records

        prompts += [r["prompt"] for r in load_records(args.file, kind="prompt").records]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --file prompts.jsonl")
    if (args.corpus or args.aux_model) and args.decoding != "sam":
        raise ValueError("--corpus and --aux-model are used by --decoding sam only")
    model, tok = load_model(args.model, dtype=args.dtype)
    aux = load_model(args.aux_model, dtype=args.dtype)[0] if args.aux_model else None
    from posttrain.eval.tasks import load_corpus

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature or 1.0, top_p=args.top_p, top_k=args.top_k,
                           seed=args.seed, stop=args.stop, chat=not args.no_chat, decoding=args.decoding,
                           backend=args.backend, corpus=load_corpus(args.corpus, tok) if args.corpus else None,
                           aux_model=aux, **({"draft_len": args.draft_len} if args.draft_len else {}))
    start = time.perf_counter()
    out = generate(model, tok, prompts, cfg)
    seconds = time.perf_counter() - start
    for prompt, text in zip(prompts, out.texts):
        print(json.dumps({"prompt": prompt, "output": text}, ensure_ascii=False))
    if args.stats:
        n = sum(len(t) for t in out.token_ids)
        print(json.dumps({"tokens": n, "seconds": round(seconds, 3), "tokens_per_s": round(n / seconds, 2),
                          **out.stats}), file=sys.stderr)
    return 0


def cmd_sam(args) -> int:
    from posttrain.generate.sam import build_static, tokenize_corpus
    from posttrain.models import load_tokenizer

    if args.sam_verb != "build":
        raise ValueError("usage: posttrain sam build FILE... --out corpus.npz")
    tok = load_tokenizer(args.model)
    docs = tokenize_corpus(tok, args.files)
    sam = build_static(docs, eos_id=tok.eos_token_id)
    sam.save(args.out)
    print(f"{args.out}: {len(docs)} documents, {len(sam)} tokens, {sam.num_states} states")
    return 0


def cmd_chat(args) -> int:
    from posttrain.generate.engine import GenerationConfig, generate
    from posttrain.models import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature or 1.0)
    print("chat: type a message, /reset to clear, /quit (or Ctrl-D) to leave")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        print("bot> ", end="", flush=True)
        out = generate(model, tok, [prompt], cfg, stream=lambda row, tid, piece: print(piece, end="", flush=True))
        print()
        messages.append({"role": "assistant", "content": out.texts[0]})


def cmd_serve(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from posttrain.config import format_validation_error, load_yaml

    from posttrain.models import load_model
    from posttrain.serve import ServeConfig, create_app

    if any("=" not in a for a in args.adapter):
        raise ValueError("--adapter takes NAME=RUN_DIR, e.g. --adapter math=runs/sft-math")
    adapters = dict(a.split("=", 1) for a in args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("--adapter: a NAME is given twice")
    admin_keys = list(args.admin_key)
    if os.environ.get("POSTTRAIN_ADMIN_KEY", "").strip():
        admin_keys.append(os.environ["POSTTRAIN_ADMIN_KEY"].strip())
    baseline = load_yaml(args.drift_baseline) if args.drift_baseline else {}
    guard = None
    if args.guard:
        from posttrain.generate.guard import load_guard

        guard = load_guard(args.guard)
    feedback_db = args.feedback_db or str(Path(args.model if Path(args.model).is_dir() else ".") / "serve"
                                          / "feedback.db")
    try:
        config = ServeConfig(model_name=args.name or args.model, api_keys=args.api_key,
                             max_tokens_cap=args.max_tokens_cap, queue_size=args.queue, timeout_s=args.timeout,
                             max_body_bytes=args.max_body, decoding=args.decoding, guard=guard,
                             max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, batching=args.batching,
                             max_n=args.max_n, feedback_db=None if feedback_db == "off" else feedback_db,
                             feedback_redact_pii=not args.no_redact_feedback, admin_keys=admin_keys,
                             monitor_window=args.monitor_window,
                             drift_threshold=args.drift_threshold if args.drift_threshold else None,
                             drift_baseline=baseline)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, "serve options")) from None
    model, tok = load_model(args.model, dtype=args.dtype)
    app = create_app(model, tok, config, adapter_paths=adapters)
    if config.feedback_db:
        from posttrain.data.feedback import describe

        print(f"replies and feedback are stored in {describe(config.feedback_db)}"
              f"{' (PII redacted)' if config.feedback_redact_pii else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_ui(args) -> int:
    import secrets

    import uvicorn

    from posttrain.ui.app import LOOPBACK, create_app

    token = args.token or os.environ.get("POSTTRAIN_UI_TOKEN", "").strip() or None
    if args.host not in LOOPBACK and not token:
        raise ValueError(f"--host {args.host}: the studio starts training runs, so serving it beyond loopback needs "
                         f"a token: --token TOKEN or $POSTTRAIN_UI_TOKEN (for example {secrets.token_urlsafe(18)})")
    root = Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root}: no such directory")
    os.chdir(root)
    app = create_app(".", token=token, feedback_db=args.feedback_db)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"posttrain studio: http://{shown}:{args.port}/{'?token=' + token if token else ''}  (root {Path.cwd()}; "
          "Ctrl-C stops it, runs it started keep going)", flush=True)
    # an open page keeps event streams open: give them a few seconds, then stop (and the chat servers with it)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    return 0


def cmd_feedback(args) -> int:
    from posttrain.data.feedback import export_feedback
    from posttrain.data.filters import load_rules
    from posttrain.train.reward_model import filter_scorer

    if args.feedback_verb != "export":
        raise ValueError("usage: posttrain feedback export --db PATH --out FILE [--since DATE] [--kind preference|kto]")
    rules = load_rules(args.rules)
    report = export_feedback(args.db, args.out, "unpaired" if args.kind == "kto" else "preference", args.since,
                             rules, scorer=filter_scorer(rules))
    what = "preference pairs" if args.kind == "preference" else "KTO examples"
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
    print(f"{report['feedback_rows']} feedback rows -> {report['records']} {what} (superseded "
          f"{report['superseded']}, skipped: {skipped}) -> {report['kept']} kept by the filters "
          f"({report['filters']['dropped']} dropped)")
    print(f"wrote {args.out} and {args.out}.report.json")
    return 0


def cmd_merge(args) -> int:
    from posttrain.adapters import merge_adapter
    from posttrain.models import load_model, save_model

    if not args.source or not args.out:
        raise ValueError("usage: posttrain merge SOURCE --out DIR (or source:/out: in --config)")
    model, tok = load_model(args.source, dtype=args.dtype)
    merged = merge_adapter(model)
    save_model(merged, tok, args.out)
    print(f"merged model written to {args.out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_filter(args) -> int:
    from posttrain.data.filters import filter_file, load_rules, summary
    from posttrain.train.reward_model import filter_scorer

    rules = load_rules(args.rules)
    result = filter_file(args.input, args.output, rules, report_path=args.report, scorer=filter_scorer(rules))
    print(summary(result))
    print(f"wrote {args.output} and {args.report or str(args.output) + '.report.json'}")
    return 0


def cmd_synth(args) -> int:
    from posttrain.config import build_config, dump_config
    from posttrain.generate.synth import SynthConfig, run_synth, summary
    from posttrain.train.reward_model import filter_scorer

    cfg = build_config(SynthConfig, args.config, list(args.overrides))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    result = run_synth(cfg, make_scorer=filter_scorer)
    print(summary(result.report))
    print(f"wrote {cfg.output} and {cfg.output}.report.json")
    return 0


def cmd_data(args) -> int:
    from posttrain.data.examples import inspect_file
    from posttrain.data.templates import GREEN, RESET
    from posttrain.models import load_tokenizer

    if args.data_verb != "inspect":
        raise ValueError("usage: posttrain data inspect FILE")
    report = inspect_file(lambda: load_tokenizer(args.model), args.file, kind=args.kind, n=args.n,
                          max_length=args.max_length)
    print(f"{args.file}: {report['valid']} valid records of kind '{report['kind']}', {report['invalid']} invalid")
    for reason in report["errors"]:
        print(f"  invalid: {reason}")
    for rec in report["records"]:
        if not rec["spans"]:
            print(f"--- record {rec['index']}: no loss tokens within {args.max_length} tokens")
            continue
        print(f"--- record {rec['index']}: {rec['tokens']} tokens, {rec['loss_tokens']} carry loss")
        print("".join((f"{GREEN}{text}{RESET}" if args.color else f"[[{text}]]") if loss else text
                      for text, loss in rec["spans"]))
    return 0


def cmd_reason(args) -> int:
    import json
    import re

    from posttrain.fileio import write_json_atomic
    from posttrain.models import load_model
    from posttrain.reason.evaluate import evaluate_strategies, format_results, plot_accuracy_vs_tokens
    from posttrain.reason.strategies import STRATEGIES, ReasonConfig, run_strategy
    from posttrain.reason.tasks import LETTERS, load_reason_task

    knobs = {k: getattr(args, k) for k in ("samples", "temperature", "search", "value", "k", "beam", "depth",
                                           "threshold", "budget", "probe", "confidence", "final", "seed",
                                           "cot_tokens") if getattr(args, k) is not None}
    cfg = ReasonConfig(fewshot=args.fewshot, **knobs)
    if args.eval == bool(args.prompt):
        raise ValueError("give either --prompt QUESTION (one answer) or --eval (a task file), not both or neither")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.eval else [args.strategy]
    for name in strategies:
        STRATEGIES.get(name)  # an unknown name: ValueError naming the choices
    task, examples = load_reason_task(args.task, args.limit if args.eval else 1)
    model, tok = load_model(args.model, dtype=args.dtype)
    if not args.eval:
        ex = {"prompt": args.prompt, "answer": ""}
        if task.verify is not None:
            ex["numbers"] = [int(n) for n in re.findall(r"\d+", args.prompt)]
            if not ex["numbers"]:
                raise ValueError(f"--task {args.task}: the question must contain the numbers to combine")
        options = re.findall(r"^\s*[A-D][).]\s*(.+)$", args.prompt, re.MULTILINE)
        if len(options) == len(LETTERS):
            ex["options"] = options
        ans = run_strategy(args.strategy, model, tok, task, [ex], cfg)[0]
        print(json.dumps({"answer": ans.answer, "strategy": args.strategy, "rung": ans.rung, "tokens": ans.tokens,
                          "calls": ans.calls, "verified": task.verify(ans.answer, ex) if task.verify else None}))
        print(ans.text)
        return 0
    results = {task.name: evaluate_strategies(model, tok, task, examples, strategies, cfg)}
    print(format_results(results))
    out = Path(args.out)
    write_json_atomic(out / "results.json", {"model": args.model, "config": vars(cfg), "results": results})
    plot_accuracy_vs_tokens(results, out / "accuracy_vs_tokens.png", title=f"{args.model}: accuracy vs compute")
    print(f"wrote {out}/results.json and {out}/accuracy_vs_tokens.png")
    return 0


def cmd_kb(args) -> int:
    import json

    from posttrain.reason import knowledge as K

    if args.kb_verb == "build":
        if not args.documents and not args.triples:
            raise ValueError("give documents (DOC...) and/or --triples FILE")
        kb = K.build_kb(args.documents, args.triples, args.max_words, args.overlap, dense=args.dense)
        K.save_index(kb, args.out)
        print(f"{args.out}: {len(kb.chunks)} chunks from {len({c.source for c in kb.chunks})} files"
              + (f", {kb.embeddings.shape[1]}-dim embeddings" if kb.embeddings is not None else ""))
        return 0
    if args.kb_verb not in ("search", "ask", "eval"):
        raise ValueError("usage: posttrain kb build|search|ask|eval ... (see posttrain kb --help)")
    kb = K.load_index(args.index)
    if args.kb_verb == "search":
        print(K.format_hits(K.search(kb, args.query, args.k, args.method)))
        return 0
    from posttrain.models import load_model

    qa = K.load_qa(args.qa, args.limit) if args.kb_verb == "eval" else None
    model, tok = load_model(args.model, dtype=args.dtype)
    if args.kb_verb == "ask":
        a = K.ask(model, tok, kb, [args.query], args.k, args.method, args.max_new_tokens)[0]
        print(f"answer: {a.reply}\nretrieved:\n{K.format_hits(a.hits)}")
        print(f"cited: {', '.join(c.id for c in a.cited)}" if a.cited else f"note: {a.note or 'nothing retrieved'}")
        return 0
    result = K.evaluate_qa(model, tok, qa, None if args.closed_book else kb, args.k, args.method,
                           args.max_new_tokens)
    print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in result.items()
                      if key != "predictions"}))
    if args.out:
        from posttrain.fileio import write_json_atomic

        write_json_atomic(args.out, result)
    return 0


COMMANDS = {**{v: cmd_stage for v in STAGES_FOR_CLI},
            "eval": cmd_eval, "generate": cmd_generate, "chat": cmd_chat, "merge": cmd_merge, "data": cmd_data,
            "filter": cmd_filter, "kb": cmd_kb, "synth": cmd_synth,
            "sam": cmd_sam, "reason": cmd_reason, "serve": cmd_serve, "run": cmd_run, "feedback": cmd_feedback,
            "report": cmd_report, "plan": cmd_plan, "ui": cmd_ui}


# oneDNN keeps up to 1024 compiled matmul primitives, each with its buffers; packed rows give a new
# shape almost every step, so a process's resident memory crept up over a run (135M LoRA, 512-token
# rows of 64-256-token documents, 34 steps: peak 2.20 GB by default, 1.90 GB at 128, 1.84 GB at 16).
# 128 costs ~2% of step time there (16: 28%). Read at the first matmul, so set before any runs.
ONEDNN_CACHE = "128"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    try:
        args = apply_flag_config(parser, args, argv)
        return COMMANDS[args.verb](args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:  # ModelLoadError is a ValueError
        print(f"posttrain {args.verb}: error: {exc}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
