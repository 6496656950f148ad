"""Imports of transformers and PEFT that keep torchao out: one place, below every user of them."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def torchao_hidden() -> Iterator[None]:
    """Inside: `import torchao` is answered "not installed"; transformers and PEFT re-ask after.

    Why: torchao is a bench extra (the compression table's peer) that posttrain never uses (its
    quantizer is its own), yet when it is installed transformers imports it while importing its
    model code and PEFT while wrapping each layer in LoRA, and it then prints "Failed to load
    ..._C_mxfp8...so" and pytree deprecation warnings on every command. A weight can only be a
    torchao tensor if torchao was imported already, so then nothing is hidden.
    """
    if "torchao" in sys.modules:  # the caller uses torchao (or an outer torchao_hidden is active)
        yield
        return
    sys.modules["torchao"] = None  # importlib.util.find_spec() -> None, `import torchao` -> ImportError
    try:
        yield
    finally:
        del sys.modules["torchao"]
        for name in ("transformers.utils.import_utils", "peft.import_utils"):  # their answers are lru-cached
            if name in sys.modules:
                sys.modules[name].is_torchao_available.cache_clear()


def import_transformers_models() -> None:
    """Import transformers' model code without its eager torchao import (see torchao_hidden)."""
    if "transformers.modeling_utils" not in sys.modules:
        with torchao_hidden():
            import transformers.modeling_utils  # noqa: F401  (imports transformers.quantizers)
