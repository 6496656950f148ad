"""OpenAI-compatible serving: `create_app(model, tokenizer, ServeConfig)`, `posttrain serve MODEL`.

schema.py: settings, request models and their checks; scheduler.py: the worker thread that decodes
requests in a continuously refilled batch (batcher.py: static batches, the fallback); adapters.py: LoRA adapters loaded, hot-swapped and deleted while serving; monitor.py:
per-adapter window series and drift alerts; app.py: routes, auth, admission, errors.
"""

from posttrain.serve.app import create_app, load_adapters
from posttrain.serve.schema import APIError, ServeConfig

__all__ = ["APIError", "ServeConfig", "create_app", "load_adapters"]
