"""A model the tracer builds in fake mode skips the random init, and is otherwise the same model:
the same parameters with the same shapes and dtypes, tied the same way."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from dooly.engines.base import shape_only_mode
from dooly.engines.transformers_cb import TransformersCBEngine
from dooly.models.registry import build_hf_config, resolve_model

# Qwen2.5-0.5B's shape, shrunk; it ties its output projection to the input embedding.
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 256}


def _built(init_weights: bool) -> torch.nn.Module:
    config = build_hf_config(resolve_model("Qwen/Qwen2.5-0.5B"), **SMALL)
    with shape_only_mode(ShapeEnv(duck_shape=False)):
        return TransformersCBEngine(config, init_weights=init_weights).build_model()


def _layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def test_an_uninitialised_fake_model_has_the_initialised_ones_parameters_and_ties():
    initialised, bare = _built(init_weights=True), _built(init_weights=False)
    assert _layout(bare) == _layout(initialised)
    assert bare.config.tie_word_embeddings
    assert bare.lm_head.weight is bare.model.embed_tokens.weight
    assert initialised.lm_head.weight is initialised.model.embed_tokens.weight
