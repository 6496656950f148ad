"""An RL stage in its own process, for the SIGKILL-resume test.

python tests/rl/rl_worker.py CONFIG.json [--resume]: run_rl on the config (an RLConfig as JSON),
or run_online_dpo when its stage is online_dpo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from posttrain.rl.controller import RLConfig, run_rl
from posttrain.rl.online_dpo import OnlineDPOConfig, run_online_dpo


def main() -> None:
    torch.set_num_threads(1)
    raw = json.loads(open(sys.argv[1]).read())
    if raw["stage"] == "online_dpo":
        run_online_dpo(OnlineDPOConfig.model_validate(raw), resume="--resume" in sys.argv)
    else:
        run_rl(RLConfig.model_validate(raw), resume="--resume" in sys.argv)


def spawn(cfg, *extra, wait: bool = True):
    """Run the stage of `cfg` in a child process (its config written beside its output dir)."""
    path = Path(cfg.output_dir + ".json")
    path.write_text(cfg.model_dump_json())
    cmd = [sys.executable, __file__, str(path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        subprocess.run(cmd, check=True, env=env, timeout=600)
        return None
    return subprocess.Popen(cmd, env=env)


def straight_and_killed(straight, killed, steps: int) -> tuple[dict, dict]:
    """Run `straight` through; run `killed`, SIGKILL it once its first checkpoint is complete,
    resume it; the final adapter weights of both."""
    from safetensors.torch import load_file

    from posttrain.train.loop import checkpoint_dirs

    spawn(straight)
    proc = spawn(killed, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint_dirs(Path(killed.output_dir)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (Path(killed.output_dir) / "final").exists(), "the run ended before the kill: nothing was tested"
    step = int(checkpoint_dirs(Path(killed.output_dir))[-1].name.split("-")[1])
    assert 1 <= step < steps
    spawn(killed, "--resume")
    return tuple(load_file(str(Path(c.output_dir) / "final" / "adapter_model.safetensors")) for c in (straight, killed))


def assert_resume_exact(straight, killed, steps: int, keys: tuple[str, ...]) -> None:
    """`killed` (killed mid-run, resumed) ends on `straight`'s adapter weights exactly and logs the
    same `keys` at every step."""
    a, b = straight_and_killed(straight, killed, steps)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a, rows_b = (_metric_rows(c) for c in (straight, killed))
    assert [r["step"] for r in rows_b] == list(range(1, steps + 1))
    for x, y in zip(rows_a, rows_b, strict=True):
        for key in keys:
            assert x[key] == y[key], (x["step"], key)


def _metric_rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    main()
