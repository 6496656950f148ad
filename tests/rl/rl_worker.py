"""An RL stage in its own process, for the SIGKILL-resume test.

python tests/rl/rl_worker.py CONFIG.json [--resume]: run_rl on the config (an RLConfig as JSON).
"""

from __future__ import annotations

import json
import sys

import torch

from posttrain.rl.controller import RLConfig, run_rl


def main() -> None:
    torch.set_num_threads(1)
    cfg = RLConfig.model_validate(json.loads(open(sys.argv[1]).read()))
    run_rl(cfg, resume="--resume" in sys.argv)


if __name__ == "__main__":
    main()
