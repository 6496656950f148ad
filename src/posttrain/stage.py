"""Run directories: every stage writes one, with its resolved config and a manifest of inputs.

A run directory is what the next stage points at, so it records where its inputs came
from (paths and content hashes) and what came out (metrics), like a lineage entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel

from posttrain.config import dump_config
from posttrain.fileio import write_json_atomic as _write_json
from posttrain.fileio import write_text_atomic


def write_json_atomic(path: Path, obj) -> Path:
    return _write_json(path, obj, default=str)  # manifests hold paths and other non-JSON values


def content_hash(path: str | Path) -> str | None:
    """sha256 of a file, or of a directory's files (names + contents); None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def prepare_run_dir(output_dir: str | Path, cfg: BaseModel, resume: bool, overwrite: bool = False) -> Path:
    """Create the run dir and write config.yaml; refuse to mix two runs in one directory."""
    run_dir = Path(output_dir)
    has_run = (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()
    if has_run and not (resume or overwrite):
        raise FileExistsError(
            f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, "
            "or choose another output_dir"
        )
    if resume and (run_dir / "config.yaml").exists():
        old = (run_dir / "config.yaml").read_text()
        if old != dump_config(cfg):
            raise ValueError(
                f"--resume: the config differs from the one in {run_dir}/config.yaml; resuming needs the same "
                "config (same data order and schedule)"
            )
    if overwrite and not resume:
        for name in ("checkpoints", "final", "metrics.jsonl", "tensorboard", "plots", "manifest.json"):
            target = run_dir / name
            if target.is_dir():
                import shutil

                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    return run_dir


@dataclass
class StageRun:
    """A started stage: its run dir, when it started, and its input model (None when not loaded)."""

    cfg: Any
    run_dir: Path
    started: float
    resume: bool
    model: Any = None
    tokenizer: Any = None

    def cached(self, name: str, compute: Callable[[], dict]) -> dict:
        """`compute()` once, kept as run_dir/NAME: a resumed run reads it back, since what it
        measured (the starting model) is gone once training has moved the weights."""
        path = self.run_dir / name
        if self.resume and path.exists():
            return json.loads(path.read_text())
        value = compute()
        write_json_atomic(path, value)
        return value

    def finish(self, inputs: dict, outputs: dict) -> dict:
        """Write manifest.json (inputs, outputs, timing, versions); returns it."""
        return write_manifest(self.run_dir, self.cfg.stage, inputs, outputs, self.started)


def start_stage(cfg, resume: bool = False, overwrite: bool = False, seed: int | None = None,
                load: bool = True, dtype: str | None = None) -> StageRun:
    """What every stage does first: the memory check (`plan.check_fits`: a run predicted not to fit
    the device stops here, before it loads or writes anything), the run dir with its config.yaml
    (refusing to mix two runs), the seed, and the input model `cfg.model` (in `dtype` when the
    stage needs another)."""
    started = time.time()
    if load or hasattr(cfg, "train"):  # a stage that holds a model: refuse one that cannot fit, before any write
        from posttrain.plan import check_fits

        check_fits(cfg)
    run_dir = prepare_run_dir(cfg.output_dir, cfg, resume=resume, overwrite=overwrite)
    if seed is not None:
        torch.manual_seed(seed)
    run = StageRun(cfg, run_dir, started, resume)
    if load:
        from posttrain.models import load_model

        run.model, run.tokenizer = load_model(cfg.model.name, dtype=dtype or cfg.model.dtype,
                                              trust_remote_code=cfg.model.trust_remote_code)
    return run


def model_input(spec: str) -> dict:
    from posttrain.models import resolve_model_path

    return {"spec": spec, "resolved": resolve_model_path(spec)}


def stage_inputs(model_spec: str, files: dict[str, str | None], eval_tasks=(), **models: str) -> dict:
    """The manifest's inputs: the model spec and the path it resolved to (also for each other
    model in `models`, e.g. teacher=...), each named file and eval task file with its content hash."""
    inputs = {"model": model_input(model_spec), **{k: model_input(v) for k, v in models.items()},
              "data": {k: {"path": p, "sha256": content_hash(p)} for k, p in files.items() if p}}
    if eval_tasks:
        inputs["eval_tasks"] = {t.name: {"path": t.path, "sha256": content_hash(t.path)} for t in eval_tasks}
    return inputs


def write_manifest(run_dir: Path, stage: str, inputs: dict, outputs: dict, started: float) -> dict:
    manifest = {
        "stage": stage,
        "inputs": inputs,
        "outputs": outputs,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "git_commit": git_commit(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": _version("transformers"), "peft": _version("peft"),
                     "posttrain": _version("posttrain")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    write_json_atomic(run_dir / "manifest.json", manifest)
    return manifest


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None
