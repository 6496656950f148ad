"""Hand-written autograd kernels that make training steps faster without changing their result.

- `attention.packed_attention`: per-example causal SDPA for a packed row, instead of
  transformers' dense block-diagonal mask.
- `layers.fused_layers`: Llama RMSNorm and rotary embedding as single autograd Functions.
- `lora.fused_lora`: PEFT LoRA Linear layers in the base's compute dtype.

Each is a context manager around a forward, falls back to the library's own code wherever
it is not exact (fp32 runs stay bit-identical), and has a parity test in tests/kernels.
Layer: beside models and adapters; imports torch, transformers, peft and posttrain.models
only, never train/ or adapters (which import from here).
"""

from __future__ import annotations

import logging
import threading

LOG = logging.getLogger("posttrain")
_stated: set[tuple[str, str]] = set()  # (fast path, architecture) fallbacks already logged
_stated_lock = threading.Lock()


def fallback_once(path: str, model_type: str | None, reason: str) -> bool:
    """Log, once per process, that `path` (a fast path) does not run on `model_type` and why.

    A fast path that cannot handle an architecture runs the library's own code instead; this
    says so in one line (not once per step) so a slower run is explained. True if logged now.
    """
    key = (path, str(model_type))
    with _stated_lock:
        if key in _stated:
            return False
        _stated.add(key)
    LOG.warning("%s: not used for model type %r (%s); running the plain transformers path", path, model_type, reason)
    return True


def checkpointing(base) -> bool:
    """Activation checkpointing on? (transformers 5 renamed is_gradient_checkpointing.)

    Every kernel here is off under checkpointing: its patch is undone when the block is left,
    and a recomputed forward would run after that, through different code.
    """
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(base, name, False))
