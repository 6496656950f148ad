"""Fixtures of the RL tests: a tiny GRPO/PPO setup with a learnable reward, and a Ray cluster."""

import json

import pytest

from posttrain.models import save_model, tiny_model
from posttrain.rl.controller import RLConfig


@pytest.fixture
def rl_setup(tmp_path, tokenizer):
    save_model(tiny_model(tokenizer, seed=2), tokenizer, tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(16)))

    def config(stage, steps, **extra):
        raw = {
            "stage": stage, "output_dir": str(tmp_path / f"{stage}-{extra.get('backend', 'local')}"),
            "model": {"name": str(tmp_path / "tiny"), "dtype": "fp32"},
            "adapter": {"method": "lora", "r": 8, "alpha": 16}, "data": {"prompts": str(prompts)},
            # replies that start with a space win; with top-k 8 the random model's first token
            # is a space-led one about 70% of the time, so there is something to learn
            "reward": {"type": "format", "pattern": "^\\s"},
            "rollout": {"samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 3, "top_k": 8},
            "train": {"max_steps": steps, "lr": 2e-2, "progress": False},
            "algo": {"kl_coef": 0.01}, "critic": {"lr": 1e-2},
        }
        for key, value in extra.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
        return RLConfig.model_validate(raw)

    return config


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # a dev dependency: these tests always run in CI

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
