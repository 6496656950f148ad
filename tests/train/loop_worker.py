"""A tiny training run in its own process: for the SIGKILL-resume and DDP tests.

python tests/train/loop_worker.py RUN_DIR '{"max_steps": 8, ...}' [--resume]
Writes RUN_DIR/final.safetensors (trainable weights) and RUN_DIR/summary.json.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.config import TrainConfig
from posttrain.models import tiny_model
from posttrain.train.loop import train, trainable_state
from posttrain.train.objectives import causal_lm_loss


def make_examples(n: int = 32, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(6, 24)
        ids = [rng.randrange(3, 256) for _ in range(length)]
        cut = length // 2
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def slow_objective(delay: float):
    def objective(model, batch):
        time.sleep(delay)  # gives the kill test a window between checkpoints
        return causal_lm_loss(model, batch)

    return objective


def main() -> None:
    run_dir, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    delay = overrides.pop("delay", 0.0)
    torch.set_num_threads(1)
    cfg = TrainConfig(progress=False, **overrides)
    model = tiny_model(vocab_size=256, seed=0)
    model, summary = train(model, slow_objective(delay), make_examples(), cfg, run_dir,
                           pad_token_id=0, resume="--resume" in sys.argv)
    from accelerate import PartialState

    if PartialState().is_main_process:
        save_file(trainable_state(model), str(run_dir / "final.safetensors"))
        (run_dir / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
