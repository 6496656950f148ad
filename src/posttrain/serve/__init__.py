"""OpenAI-compatible serving: `create_app(model, tokenizer, ServeConfig)`, `posttrain serve MODEL`."""

from posttrain.serve.app import APIError, ServeConfig, create_app, load_adapters

__all__ = ["APIError", "ServeConfig", "create_app", "load_adapters"]
