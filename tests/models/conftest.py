"""Fixtures for the model-config tests: small config files written to a temporary directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

# A small but complete Llama config: valid, quick to build, and easy to break one field at a time.
SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


@pytest.fixture
def small_llama() -> dict:
    """A fresh copy of a valid small config, for a test to change."""
    return json.loads(json.dumps(SMALL_LLAMA))


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a dict (or raw text) as a config file under tmp_path; returns the file's path."""

    def write(content: dict | str, relative: str = "model/config.json") -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
        return path

    return write
