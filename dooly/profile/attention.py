"""Measuring the engine's attention call, built by the engine itself.

No hand-written attention harness: each engine module builds its model (one period of its
layers), KV cache and step inputs with its own code for the exact batch composition of a point,
and hands back the attention call its forward made (`EngineKind.attention_runner`):
transformers' registered attention function with the arguments a layer passed it, or vLLM's
attention layer with the metadata its backend's builder made. The cache holds the requested
context lengths (its blocks are allocated and read at every call).
"""

from __future__ import annotations

from typing import Any

import torch

from dooly.profile.grid import GridSpec


def engine_attention(engine: str, hf_config: Any, *, backend: str, dtype: torch.dtype, device: str,
                     grid: GridSpec) -> Any:
    """The engine's attention runner for one model config, sized for every batch of `grid` and
    built with one period of the model's layers: `call_for(batch, sliding)`."""
    from dooly.engines.registry import engine_kind
    from dooly.trace.tracer import layer_plan

    period, _ = layer_plan(hf_config.get_text_config())
    return engine_kind(engine).attention_runner(
        hf_config, backend=backend, dtype=dtype, device=device, max_tokens=grid.max_tokens, max_kv=grid.max_kv,
        max_seqs=grid.max_seqs, period=period,
    )
