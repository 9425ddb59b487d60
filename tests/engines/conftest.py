"""Fixtures of the engine tests: one real vLLM engine for the tiny config, shared by a module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from vllm_helpers import TINY_CONFIG  # noqa: E402


@pytest.fixture(scope="module")
def tiny_vllm():
    """A real vLLM engine (dummy weights) for TINY_CONFIG; errors with the install hint if vLLM is absent."""
    from dooly.engines.vllm_engine import VllmEngine, VllmSettings, require_vllm

    require_vllm()
    engine = VllmEngine(TINY_CONFIG, settings=VllmSettings(kv_cache_bytes=32 * 2**20, max_model_len=2048,
                                                           max_num_batched_tokens=512, max_num_seqs=32))
    engine.build_model()
    yield engine
    engine.close()
