"""Shared helpers for bench/ scripts: machine description, matmul peak, atomic JSON.

Every benchmark states the machine it ran on and the load it ran under, because on a
shared 2-core box the same script can differ 3x between an idle and a busy minute.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The matmul-relevant ISA flags (AMX / AVX-512 bf16 decide the bf16 peak)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(),
    }


def library_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def matmul_peak(dtype: torch.dtype = torch.bfloat16, size: int = 2048, repeats: int = 7) -> float:
    """Best-of-`repeats` FLOP/s of one square matmul (2·n³ FLOPs): the machine's peak.

    Best, not mean: the peak is what the hardware can do; other processes on a shared
    machine only ever make single timings slower.
    """
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: thread pool, kernel selection
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def best_matmul_peak(dtype: torch.dtype = torch.bfloat16, sizes=(1024, 2048, 3072), repeats: int = 7) -> dict:
    """Peak over a few sizes (the best size differs between AMX, AVX-512 and cache sizes)."""
    per_size = {n: matmul_peak(dtype, n, repeats) for n in sizes}
    best = max(per_size, key=per_size.get)
    return {"flops": per_size[best], "size": best, "per_size_tflops": {n: round(f / 1e12, 4) for n, f in per_size.items()}}


def write_json(path: str | Path, data: dict) -> Path:
    """Write JSON atomically (the package's one atomic writer)."""
    from posttrain.fileio import write_json_atomic

    return write_json_atomic(path, data)


def run_context(load_before, load_after, *libraries: str) -> dict:
    """What a results JSON records about where it ran: machine, load, OMP policy, versions."""
    import os

    return {"machine": machine_info(), "load_average_before": load_before, "load_average_after": load_after,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "versions": library_versions(*libraries)}


def finish(result: dict, out: str | Path, quick: bool, print_table) -> dict:
    """Print the table and, for a full run, write the results JSON."""
    print_table(result)
    if not quick:
        write_json(out, result)
        print(f"wrote {out}")
    return result


# ----------------------------------------------------------------------------- child processes


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               TOKENIZERS_PARALLELISM="false")
    return env


# The child reports its own VmHWM (peak RSS of its address space since exec) at exit. getrusage's
# ru_maxrss would also count the pages a forked child shares with this (bigger) process before exec.
WRAP = """
import atexit, runpy, sys
out, what = sys.argv[1], sys.argv[2]
def dump():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(out, "w").write(line.split()[1])
atexit.register(dump)
if what == "-c":
    exec(sys.argv[3])
else:
    sys.argv = [what] + sys.argv[3:]
    runpy.run_module(what, run_name="__main__", alter_sys=True)
"""


def run_child(args: list[str], log: Path, env: dict | None = None) -> tuple[int, float, int]:
    """(peak RSS bytes of that child alone, seconds, exit status); args: ['-m', module, ...] or ['-c', code]."""
    start = time.perf_counter()
    hwm = log.with_suffix(".hwm")
    hwm.unlink(missing_ok=True)
    with open(log, "w") as fh:
        what = args if args[0] == "-c" else args[1:]  # "-c" CODE, or MODULE ARGS...
        rc = subprocess.run([sys.executable, "-c", WRAP, str(hwm), *what],
                            stdout=fh, stderr=subprocess.STDOUT, env={**child_env(), **(env or {})},
                            cwd=ROOT).returncode
    peak = int(hwm.read_text()) * 1024 if hwm.is_file() else 0
    return peak, time.perf_counter() - start, rc
