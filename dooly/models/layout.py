"""A model's KV-cache layer-group layout from its config.json facts, without importing transformers.

`dooly simulate` needs only three numbers from a model's config to charge KV blocks the way
transformers' paged cache does (how many full-attention and sliding-attention layer groups, and the
window), yet building transformers' config object to get them costs ~5 s of imports on a 2-core
machine, ten times the simulation itself. The per-layer attention kinds are plain facts of the
config: each config class derives them from a few fields with a fixed default, so this module
applies those derivations (transformers 5.17) and the engine's own grouping rule
(`group_layers_by_attn_type`: every group has the gcd of the per-kind layer counts).

The engine-side function, `dooly.engines.transformers_cb.cache_groups`, stays the reference: the
tests compare the two for every bundled config and for variants of the sliding-window fields.
For a model type whose derivation is not written here, or facts this module cannot read with
certainty (nested text configs, explicit `layer_types`), `cache_groups_from_facts` returns None
and the caller uses the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import gcd
from typing import Any

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Config-class defaults of transformers 5.17 for the fields that decide the attention kinds, used
# when config.json leaves a field out (the config class would fill in the same value).
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096
QWEN2_DEFAULT_SLIDING_WINDOW = 4096
QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28
GEMMA2_DEFAULT_SLIDING_WINDOW = 4096
GEMMA2_SLIDING_PERIOD = 2
COHERE2_DEFAULT_SLIDING_WINDOW = 4096
COHERE2_DEFAULT_SLIDING_PATTERN = 4

# Facts that change how transformers builds the attention kinds in ways this module does not
# mirror: when present, the reference function decides.
_UNMIRRORED_KEYS = ("layer_types", "text_config")

LayerKinds = tuple[list[str], int | None]


def cache_group_settings(group_types: Sequence[str], sliding_window: int | None) -> dict[str, int]:
    """The scheduler settings for a list of layer-group kinds: the counts of full and sliding
    groups (every group draws from one block pool) and the window (0 without sliding groups).

    Shared by this module and the engine's reference function, so both spell the settings alike.
    """
    sliding = sum(kind == SLIDING_ATTENTION for kind in group_types)
    return {
        "full_attention_groups": len(group_types) - sliding,
        "sliding_attention_groups": sliding,
        "sliding_window": int(sliding_window) if sliding and sliding_window is not None else 0,
    }


def group_types_for_layers(layer_types: Sequence[str]) -> list[str]:
    """The kind of each layer group, by transformers' `group_layers_by_attn_type` rule: layers are
    grouped by kind, and every group holds gcd(per-kind layer counts) layers."""
    counts: dict[str, int] = {}
    for kind in layer_types:
        counts[kind] = counts.get(kind, 0) + 1
    size = gcd(*counts.values())
    return [kind for kind, count in counts.items() for _ in range(count // size)]


def _uniform(facts: dict, default_window: int | None) -> LayerKinds:
    """Config classes without `layer_types` (llama, mistral, mixtral, phi3): the engine treats
    every layer as sliding when the config has a window, else as full attention."""
    window = facts.get("sliding_window", default_window)
    kind = SLIDING_ATTENTION if window is not None else FULL_ATTENTION
    return [kind] * int(facts["num_hidden_layers"]), window


def _qwen2(facts: dict) -> LayerKinds:
    """Qwen2Config: the window applies only with `use_sliding_window`, to layers from
    `max_window_layers` on."""
    window = facts.get("sliding_window", QWEN2_DEFAULT_SLIDING_WINDOW) if facts.get("use_sliding_window", False) else None
    first_sliding = facts.get("max_window_layers", QWEN2_DEFAULT_MAX_WINDOW_LAYERS)
    kinds = [
        SLIDING_ATTENTION if window is not None and i >= first_sliding else FULL_ATTENTION
        for i in range(int(facts["num_hidden_layers"]))
    ]
    return kinds, window


def _periodic(facts: dict, period: int, default_window: int) -> LayerKinds:
    """Gemma2/Cohere2: every `period`-th layer is full attention, the others sliding."""
    kinds = [
        SLIDING_ATTENTION if (i + 1) % period else FULL_ATTENTION for i in range(int(facts["num_hidden_layers"]))
    ]
    return kinds, facts.get("sliding_window", default_window)


_DERIVATIONS: dict[str, Callable[[dict], LayerKinds]] = {
    "llama": lambda facts: _uniform(facts, None),
    "mistral": lambda facts: _uniform(facts, MISTRAL_DEFAULT_SLIDING_WINDOW),
    "mixtral": lambda facts: _uniform(facts, None),
    "phi3": lambda facts: _uniform(facts, None),
    "qwen2": _qwen2,
    "gemma2": lambda facts: _periodic(facts, GEMMA2_SLIDING_PERIOD, GEMMA2_DEFAULT_SLIDING_WINDOW),
    "cohere2": lambda facts: _periodic(
        facts, int(facts.get("sliding_window_pattern", COHERE2_DEFAULT_SLIDING_PATTERN)), COHERE2_DEFAULT_SLIDING_WINDOW
    ),
}


def cache_groups_from_facts(facts: dict[str, Any]) -> dict[str, int] | None:
    """The paged cache's layer-group settings for a model from its config.json facts, or None
    when the facts need transformers' own config class to read (see the module docstring)."""
    derive = _DERIVATIONS.get(str(facts.get("model_type")))
    layers = facts.get("num_hidden_layers")
    if derive is None or not isinstance(layers, int) or layers <= 0:
        return None
    if any(key in facts for key in _UNMIRRORED_KEYS):
        return None
    kinds, window = derive(facts)
    return cache_group_settings(group_types_for_layers(kinds), window)
