"""Parameter-efficient methods: full, freeze, PEFT (LoRA/DoRA/IA3/prompt tuning), bottleneck adapters."""

from __future__ import annotations

from pathlib import Path

BOTTLENECK_FILE = "bottleneck_adapters.safetensors"


def load_bottleneck_if_present(model, path: Path):
    """Attach and load our bottleneck adapters when a model dir carries them."""
    if not (Path(path) / BOTTLENECK_FILE).is_file():
        return model
    raise NotImplementedError("bottleneck adapters: not yet built")


def save_bottleneck_if_present(model, path: Path) -> None:
    return None
