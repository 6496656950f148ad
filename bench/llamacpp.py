"""llama.cpp on the same machine: batch-1 decode, 512-token prefill and bytes per weight, ours vs llama.cpp.

One run, same prompt token ids for both engines (our tokenizer's; llama.cpp's tokenizer is not
involved), the default model (SmolLM2-135M-Instruct), `--threads` threads each:

- ours: the native decoder (`NativeRows`, what the engine runs at batch 1) with bf16 weights,
  int8 weights per output channel (`posttrain quantize`'s default), int8 in groups of 32 (Q8_0's
  bytes) and int4 in groups of 32 (asymmetric: Q4_1's layout and bytes);
- llama.cpp (llama-cpp-python built by bench/setup_llamacpp.sh, run in a worker process of its
  own, bench/llamacpp_worker.py, which times its own calls): GGUF files written by
  `export_gguf` (what `posttrain export` writes) as F16, BF16, Q8_0, Q4_0 and Q4_K_M, and the
  Q4_1 file the default model ships as (our weights are that file dequantized).

Per engine/format: decode tokens/s at batch 1 (greedy argmax over the full logits after a short
chat prompt, `--new-tokens` steps, EOS ignored; both sides in a plain Python loop: ours
`NativeRows.extend`, llama.cpp `llama_decode` of one token + `llama_get_logits_ith`; llama.cpp's
own defaults otherwise: flash attention auto, weight repacking on, mmap), the
seconds to prefill a 512-token prompt to its first logits (ours: `NativeRows.start`, which hands
bf16 prompts of 320+ tokens to the torch forward), and bytes per weight (stored bytes / parameters).
Engines of one weight class (16 / 8 / 4 bits) alternate inside every round (order reversed on
odd rounds) and the median of `--rounds` is reported, so drift on a shared machine hits both.

Answers: with our bf16 greedy tokens as the reference, every engine's own greedy tokens (how many
of the first N agree before the first difference) and its teacher-forced top-1 agreement (fed
the reference tokens, how many of its N argmaxes equal them). Exact equality is not expected
across kernels (different accumulation orders, F16 vs bf16 rounding).

    bench/setup_llamacpp.sh                      # once: builds llama-cpp-python into .llamacpp/
    python bench/llamacpp.py                     # full run, writes bench/results/llamacpp.json
    python bench/llamacpp.py --quick             # fewer tokens/rounds, no JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, ROOT, finish, load_average, run_context  # noqa: E402

PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."
# weight class -> (our variants, llama.cpp formats); "q4_1" is the file the default model ships as
CLASSES = {
    "16-bit": (["bf16"], ["f16", "bf16"]),
    "8-bit": (["int8", "int8-g32"], ["q8_0"]),
    "4-bit": (["int4-g32"], ["q4_0", "q4_1", "q4_k_m"]),
}
EXPORTED = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")  # written by export_gguf; q4_1 is the shipped file


# ----------------------------------------------------------------------------- pure helpers (tested)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def matches(a: list[int], b: list[int]) -> int:
    """Positions where two sequences agree (over the shorter one)."""
    return sum(x == y for x, y in zip(a, b))


def gguf_bytes_per_weight(path: str | Path) -> tuple[float, int, int]:
    """(bytes per weight, tensor bytes, parameters) of a GGUF: every stored tensor, norms included
    (a tied head is one tensor, counted once)."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    n = sum(int(t.n_elements) for t in reader.tensors)
    return nbytes / n, nbytes, n


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Ours over llama.cpp for every (ours, llama.cpp) pair of a weight class: decode tok/s ratio and
    prefill speed ratio (llama.cpp seconds / ours); above 1 means ours is faster."""
    out = []
    for cls in dict.fromkeys(r["class"] for r in rows):
        ours = [r for r in rows if r["class"] == cls and r["engine"] == "ours"]
        peers = [r for r in rows if r["class"] == cls and r["engine"] == "llama.cpp"]
        for o in ours:
            for p in peers:
                out.append({"class": cls, "ours": o["format"], "llama_cpp": p["format"],
                            "bits_ours": round(8 * o["bytes_per_weight"], 2),
                            "bits_llama_cpp": round(8 * p["bytes_per_weight"], 2),
                            "decode": round(o["decode_tok_s"] / p["decode_tok_s"], 2),
                            "prefill": round(p["prefill_s"] / o["prefill_s"], 2)})
    return out


# ----------------------------------------------------------------------------- engines


@dataclass
class Engine:
    """One engine + weight format: `decode` and `prefill` timed, `close` frees it."""

    engine: str
    format: str
    cls: str
    bytes_per_weight: float
    size_bytes: int
    decode_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    greedy: list[int] = field(default_factory=list)  # its own greedy tokens
    forced: list[int] = field(default_factory=list)  # its argmaxes fed the reference tokens

    def decode(self, prompt: list[int], steps: int, feed: list[int] | None = None) -> tuple[list[int], float]:
        raise NotImplementedError

    def prefill(self, ids: list[int]) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Ours(Engine):
    def __init__(self, fmt: str, cls: str, model, n_params: int, amx: bool = True):
        """amx=False: the vdpbf16ps kernels for every call, even where the engine would use AMX tiles
        (the packed copy is shared with other engines of the same model; each sets its path per call)."""
        from posttrain.compress.quantize import weight_bytes
        from posttrain.generate.native import native_lm

        size = weight_bytes(model)
        super().__init__("ours", fmt, cls, size / n_params, size)
        self.model = model
        self.lm = native_lm(model, required=True)
        self.amx = self.lm.amx and amx

    def decode(self, prompt, steps, feed=None):
        """Greedy: the prompt's logits give token 0, each of `steps` single-token steps the next; with
        `feed`, token i+1 is fed regardless (teacher forcing) and the argmaxes are returned."""
        from posttrain.generate.backends import NativeRows

        self.lm.amx = self.amx
        with torch.inference_mode():
            rows = NativeRows(self.lm, [prompt], steps + 1)
            out = [int(rows.start()[0].argmax())]
            start = time.perf_counter()
            for i in range(steps):
                nxt = feed[i] if feed is not None else out[-1]
                out.append(int(rows.extend([[nxt]])[0, 0].argmax()))
            return out, time.perf_counter() - start

    def prefill(self, ids):
        from posttrain.generate.backends import NativeRows

        self.lm.amx = self.amx
        with torch.inference_mode():
            start = time.perf_counter()
            NativeRows(self.lm, [ids], 1).start()
            return time.perf_counter() - start

    def close(self):
        self.lm = self.model = None


class Worker:
    """bench/llamacpp_worker.py in a process of its own: llama.cpp's models, memory and threads
    stay out of this (torch) process; requests and answers are JSON lines."""

    def __init__(self, site: Path):
        import subprocess
        import tempfile

        if not site.is_dir():
            raise SystemExit(f"no llama.cpp build at {site}; run bench/setup_llamacpp.sh first")
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llamacpp-worker-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("llamacpp_worker.py")), str(site)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def __call__(self, op: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(f"the llama.cpp worker died during {op!r} (exit {self.proc.wait()}); "
                               f"its log {self.log.name} ends:\n{tail}")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(f"llama.cpp worker, {op!r}: {answer['error']}\n{answer['traceback']}")
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class LlamaCpp(Engine):
    def __init__(self, fmt: str, cls: str, path: Path, worker: Worker, threads: int, n_ctx: int, flash_attn: str):
        bpw, nbytes, _ = gguf_bytes_per_weight(path)
        super().__init__("llama.cpp", fmt, cls, bpw, nbytes)
        self.worker = worker
        worker("load", name=fmt, path=str(path), threads=threads, n_ctx=n_ctx, flash_attn=flash_attn)

    def decode(self, prompt, steps, feed=None):
        answer = self.worker("decode", name=self.format, prompt=prompt, steps=steps, feed=feed)
        return answer["tokens"], answer["seconds"]

    def prefill(self, ids):
        return self.worker("prefill", name=self.format, ids=ids)["seconds"]

    def close(self):
        self.worker("close", name=self.format)


# ----------------------------------------------------------------------------- setup


def gguf_files(export_dir: Path, formats: list[str], re_export: bool) -> dict[str, Path]:
    """The GGUF of each format: exported once into export_dir (atomic writes) and reused after."""
    from posttrain.models import default_gguf_path

    files = {f: export_dir / f"model-{f}.gguf" for f in formats if f in EXPORTED}
    missing = [f for f, p in files.items() if re_export or not p.is_file()]
    if missing:
        from posttrain.compress.export import export_gguf
        from posttrain.models import load_model

        model, tok = load_model("default", dtype="fp32")  # what `posttrain export` loads
        for f in missing:
            export_gguf(model, tok, files[f], f)
        del model
        gc.collect()
    if "q4_1" in formats:
        files["q4_1"] = default_gguf_path()
    return files


def our_model(fmt: str):
    """The default model with our weights of `fmt` (bf16 activations)."""
    from posttrain.compress.quantize import quantize_model
    from posttrain.models import load_model
    from posttrain.quantized import QuantSpec

    model, _ = load_model("default", dtype="bf16")
    specs = {"bf16": None, "int8": QuantSpec(weights="int8"), "int8-g32": QuantSpec(weights="int8", group_size=32),
             "int4-g32": QuantSpec(weights="int4", group_size=32)}
    if fmt not in specs:
        raise SystemExit(f"unknown format of ours {fmt!r}; one of {', '.join(specs)}")
    if specs[fmt] is not None:
        quantize_model(model, specs[fmt])  # what `posttrain quantize` does with this quant spec
    return model.eval()


def parameters(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines")
    ap.add_argument("--rounds", type=int, help="timed rounds, median reported (default 3; --quick 1)")
    ap.add_argument("--new-tokens", type=int, help="decode steps at batch 1 (default 128; --quick 32)")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--classes", help="weight classes (default all: " + ",".join(CLASSES) + "; --quick 16-bit,8-bit)")
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp flash attention (auto: its default, which turns it on for the CPU)")
    ap.add_argument("--native-amx", choices=["both", "auto", "off"], default="both",
                    help="our matmuls: auto = on AMX tiles where the CPU has them (what the engine does), off = "
                         "our vdpbf16ps kernels, both = a row for each where the CPU has AMX")
    ap.add_argument("--llamacpp-dir", default=os.environ.get("LLAMACPP_DIR", str(ROOT / ".llamacpp")))
    ap.add_argument("--export-dir", default=str(ROOT / "runs" / "bench_llamacpp"),
                    help="where the GGUF files are written once and reused")
    ap.add_argument("--re-export", action="store_true", help="write the GGUF files again")
    ap.add_argument("--out", default=str(RESULTS_DIR / "llamacpp.json"))
    ap.add_argument("--quick", action="store_true", help="smaller defaults (see above); no JSON")
    args = ap.parse_args(argv)
    for name, full, quick in (("rounds", 3, 1), ("new_tokens", 128, 32), ("classes", ",".join(CLASSES), "16-bit,8-bit")):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    classes = args.classes.split(",")
    if unknown := [c for c in classes if c not in CLASSES]:
        raise SystemExit(f"--classes: unknown {unknown}; choose from {', '.join(CLASSES)}")
    if "16-bit" not in classes:
        raise SystemExit("--classes must include 16-bit: our bf16 greedy tokens are the reference for agreement")

    worker = Worker(Path(args.llamacpp_dir))
    info = worker("info")
    print(f"llama.cpp {info['version']}: {info['system_info']}", flush=True)
    from posttrain.eval.tasks import load_texts
    from posttrain.generate.engine import encode_prompts
    from posttrain.generate.native import amx_available
    from posttrain.models import load_tokenizer

    torch.set_num_threads(args.threads)
    load_before = load_average()
    tok = load_tokenizer("default")
    prompt = encode_prompts(tok, [PROMPT], chat=True)[0]
    long_ids = tok(" ".join(load_texts(str(ROOT / "data/general/text.jsonl"))))["input_ids"][:args.prefill_tokens]
    if len(long_ids) < args.prefill_tokens:
        raise SystemExit(f"data/general/text.jsonl has {len(long_ids)} tokens; --prefill-tokens asks for more")
    files = gguf_files(Path(args.export_dir), [f for c in classes for f in CLASSES[c][1]], args.re_export)
    n_ctx = max(len(prompt) + args.new_tokens + 8, args.prefill_tokens + 8)
    n_ctx = -(-n_ctx // 256) * 256
    n_params = None
    reference: list[int] = []
    rows = []
    with torch.inference_mode():
        for cls in classes:
            ours_fmts, llama_fmts = CLASSES[cls]
            engines: list[Engine] = []
            for fmt in ours_fmts:
                model = our_model(fmt)
                if n_params is None:  # bf16 comes first: the float parameter count (tied head once)
                    n_params = parameters(model)
                engines.append(Ours(fmt, cls, model, n_params, amx=args.native_amx != "off"))
                if args.native_amx == "both" and engines[-1].amx:
                    engines.append(Ours(f"{fmt} vdpbf16ps", cls, model, n_params, amx=False))
            for fmt in llama_fmts:
                engines.append(LlamaCpp(fmt, cls, files[fmt], worker, args.threads, n_ctx, args.flash_attn))
            # warm-up (packing, thread pools, llama.cpp's repacking) and the untimed answer checks
            for e in engines:
                e.greedy, _ = e.decode(prompt, args.new_tokens)
                e.prefill(long_ids)
                if not reference:
                    reference = e.greedy
                e.forced, _ = e.decode(prompt, args.new_tokens, feed=reference[:-1])
                print(f"  warmed up: {e.engine} {e.format}", flush=True)
            for r in range(args.rounds):
                for e in engines if r % 2 == 0 else engines[::-1]:
                    e.decode_s.append(e.decode(prompt, args.new_tokens)[1])
                    e.prefill_s.append(e.prefill(long_ids))
                print(f"  {cls}: round {r + 1} of {args.rounds} done", flush=True)
            for e in engines:
                rows.append({
                    "class": cls, "engine": e.engine, "format": e.format,
                    "bytes_per_weight": round(e.bytes_per_weight, 4), "size_mb": round(e.size_bytes / 1e6, 1),
                    "decode_tok_s": round(args.new_tokens / statistics.median(e.decode_s), 1),
                    "decode_s_rounds": [round(s, 4) for s in e.decode_s],
                    "prefill_s": round(statistics.median(e.prefill_s), 4),
                    "prefill_s_rounds": [round(s, 4) for s in e.prefill_s],
                    "greedy_prefix_match": common_prefix(e.greedy, reference),
                    "teacher_forced_top1": matches(e.forced, reference),
                    "tokens_compared": len(reference)})
                print({k: v for k, v in rows[-1].items() if not k.endswith("_rounds")}, flush=True)
                e.close()
            del engines, model
            gc.collect()
    peak_rss_mb = {"ours_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                   "llama_cpp_worker": worker("info")["peak_rss_mb"]}
    worker.close()
    result = {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "prompt_tokens": len(prompt), "prefill_tokens": args.prefill_tokens, "flash_attn": args.flash_attn,
              "native_amx": args.native_amx, "amx_available": amx_available(),
              "parameters": n_params, "rows": rows, "ours_over_llama_cpp": ratio_rows(rows),
              "llama_cpp": {k: v for k, v in info.items() if k != "peak_rss_mb"}, "peak_rss_mb": peak_rss_mb,
              "gguf_files": {f: str(p) for f, p in files.items()},
              **run_context(load_before, load_average(), "transformers")}

    def table(r):
        n = r["rows"][0]["tokens_compared"]
        print(f"\nbatch 1, default model ({r['parameters'] / 1e6:.1f}M parameters), {r['threads']} threads, "
              f"our matmuls on AMX: {r['amx_available'] and r['native_amx'] != 'off'} (rows marked vdpbf16ps: "
              f"our AVX512-BF16 kernels instead), "
              f"median of {r['rounds']} rounds; decode: {r['new_tokens']} steps after a {r['prompt_tokens']}-token "
              f"prompt; prefill: {r['prefill_tokens']} tokens; agreement with our bf16 greedy over {n} tokens")
        print("| weights | engine | format | bits/weight | decode tok/s | prefill s | greedy prefix | "
              "teacher-forced top-1 |\n|---|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['class']} | {row['engine']} | {row['format']} | {8 * row['bytes_per_weight']:.2f} | "
                  f"{row['decode_tok_s']} | {row['prefill_s']} | {row['greedy_prefix_match']}/{n} | "
                  f"{row['teacher_forced_top1']}/{n} |")
        print("\nours over llama.cpp (above 1: ours faster)")
        print("| weights | ours | llama.cpp | bits ours / llama.cpp | decode | prefill |\n|---|---|---|---|---|---|")
        for q in r["ours_over_llama_cpp"]:
            print(f"| {q['class']} | {q['ours']} | {q['llama_cpp']} | {q['bits_ours']} / {q['bits_llama_cpp']} | "
                  f"{q['decode']}x | {q['prefill']}x |")
        print(f"llama.cpp {r['llama_cpp']['version']}: {r['llama_cpp']['system_info']}")
        print(f"peak RSS (MB): {r['peak_rss_mb']}")

    return finish(result, args.out, args.quick, table)


if __name__ == "__main__":
    main()
