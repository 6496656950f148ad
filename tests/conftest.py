"""Shared fixtures: the default tokenizer and tiny random Llama models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest
import torch

from posttrain.models import load_tokenizer, save_model, tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (converts the embedded GGUF on first use)."""
    return load_tokenizer("default")


@pytest.fixture
def tiny(tokenizer):
    """A fresh 2-layer, 64-wide Llama over the default vocabulary, fp32, seeded."""
    torch.manual_seed(0)
    return tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """The tiny model saved as an HF directory, for tests that pass `--model PATH` (read-only)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(tiny_model(tokenizer), tokenizer, path)
    return path


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models are overhead-bound: one thread is faster; slow tests get every core."""
    before = torch.get_num_threads()
    torch.set_num_threads(before if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)
