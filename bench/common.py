"""Shared helpers for bench/ scripts: machine description, matmul peak, atomic JSON.

Every benchmark states the machine it ran on and the load it ran under, because on a
shared 2-core box the same script can differ 3x between an idle and a busy minute.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
