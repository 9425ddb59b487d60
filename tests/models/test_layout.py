"""The layer-group layout read from config facts equals the engine's own (transformers-based)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dooly.engines.transformers_cb import cache_groups
from dooly.models.layout import cache_groups_from_facts, group_types_for_layers
from dooly.models.registry import ModelSpec, build_hf_config, bundled_model_ids, resolve_model

# Changes of the fields that decide the attention kinds, applied to a bundled config of the type,
# so defaults (a field left out) and the alternative branches are checked against the engine too.
_DELETE = object()
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", {"use_sliding_window": True}),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", {"use_sliding_window": True, "max_window_layers": _DELETE}),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", {"use_sliding_window": True, "sliding_window": _DELETE}),
    ("Qwen/Qwen2.5-7B", {"use_sliding_window": _DELETE}),
    ("mistralai/Mistral-7B-v0.3", {"sliding_window": _DELETE}),
    ("mistralai/Mistral-7B-v0.3", {"sliding_window": 1024}),
    ("mistralai/Mixtral-8x7B-v0.1", {"sliding_window": _DELETE}),
    ("microsoft/Phi-3-mini-4k-instruct", {"sliding_window": None}),
    ("google/gemma-2-9b", {"sliding_window": _DELETE, "num_hidden_layers": 8}),
    ("CohereLabs/c4ai-command-r7b-12-2024", {"sliding_window_pattern": _DELETE}),
    ("CohereLabs/c4ai-command-r7b-12-2024", {"sliding_window_pattern": 3, "num_hidden_layers": 12}),
    ("meta-llama/Llama-3.2-1B", {"num_hidden_layers": 3}),
]


def _variant(model: str, changes: dict[str, Any]) -> ModelSpec:
    spec = resolve_model(model)
    config = copy.deepcopy(spec.config)
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    return ModelSpec(model_id=spec.model_id, config=config, source=spec.source)


@pytest.mark.parametrize("model", bundled_model_ids())
def test_bundled_layout_matches_engine(model: str) -> None:
    spec = resolve_model(model)
    assert cache_groups_from_facts(spec.config) == cache_groups(build_hf_config(spec))


@pytest.mark.parametrize(("model", "changes"), VARIANTS, ids=[f"{m}-{sorted(c)}" for m, c in VARIANTS])
def test_variant_layout_matches_engine(model: str, changes: dict[str, Any]) -> None:
    spec = _variant(model, changes)
    assert cache_groups_from_facts(spec.config) == cache_groups(build_hf_config(spec))


def test_sliding_variants_are_not_trivial() -> None:
    """The variants above reach sliding groups, so the comparison covers more than all-full."""
    layouts = [cache_groups_from_facts(_variant(m, c).config) for m, c in VARIANTS]
    assert any(layout and layout["sliding_attention_groups"] and layout["full_attention_groups"] for layout in layouts)


def test_groups_follow_gcd_rule() -> None:
    kinds = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"] + ["full_attention"] * 4
    assert group_types_for_layers(kinds) == ["sliding_attention", "full_attention", "full_attention", "full_attention"]


@pytest.mark.parametrize(
    "facts",
    [
        {"model_type": "llama", "num_hidden_layers": 4, "layer_types": ["full_attention"] * 4},
        {"model_type": "some_new_arch", "num_hidden_layers": 4},
        {"model_type": "gemma2", "num_hidden_layers": 4, "text_config": {}},
        {"model_type": "llama"},
    ],
)
def test_unmirrored_facts_defer_to_engine(facts: dict[str, Any]) -> None:
    assert cache_groups_from_facts(facts) is None
