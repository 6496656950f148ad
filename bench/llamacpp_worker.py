"""llama.cpp side of bench/llamacpp.py, in a process of its own (no torch in it; each side's
memory and OpenMP runtime stay apart). JSON lines on stdin, one JSON answer per line on stdout:

    {"op": "load", "name": N, "path": P, "threads": T, "n_ctx": C, "flash_attn": "auto" | "on" | "off"}
    {"op": "decode", "name": N, "prompt": [ids], "steps": S, "feed": [ids] | null} -> tokens, seconds
    {"op": "prefill", "name": N, "ids": [ids]}                                    -> seconds
    {"op": "close", "name": N}
    {"op": "info"}                                          -> version, system_info, peak_rss_mb (so far)

Timing happens here, around the llama.cpp calls only. Decode mirrors ours: the prompt's logits
give token 0, then each of S single-token `llama_decode` calls gives the next (greedy argmax over
the full logits, EOS ignored); with `feed`, token i+1 is fed regardless (teacher forcing).
Run as `python bench/llamacpp_worker.py LLAMACPP_DIR`.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def main(site: str) -> None:
    sys.path.append(site)  # appended: the project venv's numpy wins over anything in the target dir
    import llama_cpp
    import numpy as np

    llama_cpp.llama_backend_init()
    models: dict[str, dict] = {}

    def load(name, path, threads, n_ctx, flash_attn):
        mparams = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, 512, 512
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                   "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        vocab = llama_cpp.llama_model_get_vocab(model)
        models[name] = {"model": model, "ctx": ctx, "mem": llama_cpp.llama_get_memory(ctx),
                        "n_vocab": llama_cpp.llama_vocab_n_tokens(vocab)}
        return {}

    def evaluate(m, tokens):
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        rc = llama_cpp.llama_decode(m["ctx"], llama_cpp.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(tokens)} tokens")
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m["ctx"], -1), shape=(m["n_vocab"],))

    def decode(name, prompt, steps, feed=None):
        m = models[name]
        llama_cpp.llama_memory_clear(m["mem"], True)
        out = [int(evaluate(m, prompt).argmax())]
        start = time.perf_counter()
        for i in range(steps):
            out.append(int(evaluate(m, [feed[i] if feed is not None else out[-1]]).argmax()))
        return {"tokens": out, "seconds": time.perf_counter() - start}

    def prefill(name, ids):
        m = models[name]
        llama_cpp.llama_memory_clear(m["mem"], True)
        start = time.perf_counter()
        evaluate(m, ids)
        return {"seconds": time.perf_counter() - start}

    def close(name):
        m = models.pop(name)
        llama_cpp.llama_free(m["ctx"])
        llama_cpp.llama_model_free(m["model"])
        return {}

    def info():
        peak_kb = next((int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")), 0)
        return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                "peak_rss_mb": round(peak_kb / 1024)}

    ops = {"load": load, "decode": decode, "prefill": prefill, "close": close, "info": info}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            op = request.pop("op")
            answer = {"ok": True, **ops[op](**request)}
        except Exception as exc:  # reported to the parent, which raises it
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: llamacpp_worker.py LLAMACPP_DIR")
    main(sys.argv[1])
