"""Measuring the engine's attention call, built by the engine itself.

No hand-written attention harness: the model (one period of its layers) is built from its config
by transformers, the paged KV cache and the step's packed inputs (read/write indices, 4D mask) by
the continuous-batching engine's own classes, for the exact batch composition of the point. One
step runs with the engine's registered attention function wrapped, which captures the arguments
each layer passes to it; we then time that very function with those arguments. The cache holds
the requested context lengths (its blocks are allocated and read at every call).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dooly.engines.base import Batch
from dooly.engines.transformers_cb import DEFAULT_BLOCK_SIZE, TransformersCBEngine

log = logging.getLogger(__name__)

# Blocks beyond the largest batch's needs: rounding up per sequence, plus the sliding group.
CACHE_HEADROOM = 2


class EngineAttention:
    """One engine instance per (model config, backend, dtype), reused across points."""

    def __init__(self, hf_config: Any, *, backend: str, dtype: torch.dtype, device: str, max_tokens: int,
                 max_kv: int, max_seqs: int, period: int) -> None:
        config = copy.deepcopy(hf_config)
        text = config.get_text_config()
        types = getattr(text, "layer_types", None)
        text.num_hidden_layers = period
        if types:
            text.layer_types = list(types[:period])
        blocks = CACHE_HEADROOM * (max_kv // DEFAULT_BLOCK_SIZE + max_seqs + 1)
        self.backend = backend
        self.engine = TransformersCBEngine(
            config, attention=backend, dtype=dtype, device=device, block_size=DEFAULT_BLOCK_SIZE,
            num_blocks=blocks, max_batch_tokens=max_tokens,
        )
        self.engine.build_model()
        self.engine.build_cache(max_requests=max_seqs)

    def call_for(self, batch: Batch, sliding: bool) -> Callable[[], Any]:
        """The engine's attention call for this batch, on a layer of the requested kind."""
        kwargs = self.engine.step_inputs(batch)
        with _capture_calls(self.backend) as (original, calls), torch.no_grad():
            self.engine.model(**kwargs)
        for module, args, call_kwargs in calls:
            if bool(getattr(module, "sliding_window", None)) == sliding:
                break
        else:
            raise ValueError(f"no {'sliding' if sliding else 'full'}-attention layer in this model")

        def call() -> Any:
            with torch.no_grad():
                return original(module, *args, **dict(call_kwargs))

        return call


@contextlib.contextmanager
def _capture_calls(backend: str) -> Iterator[tuple[Callable, list]]:
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    original = mapping[backend]
    calls: list[tuple[Any, tuple, dict]] = []

    def wrapper(module: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((module, args, dict(kwargs)))
        return original(module, *args, **kwargs)

    mapping[backend] = wrapper
    try:
        yield original, calls
    finally:
        mapping[backend] = original
