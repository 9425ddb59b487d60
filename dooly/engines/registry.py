"""Engines by name. A new engine is a module with an `EngineKind` (see base.py) and a line here.

Imports are lazy: the transformers engine must not pull in vLLM, and a machine without vLLM only
fails when vLLM is asked for, with a line that says how to install it.
"""

from __future__ import annotations

import importlib

from dooly.engines.base import EngineKind
from dooly.errors import DoolyError

ENGINES = {
    "transformers": ("dooly.engines.transformers_cb", "TransformersKind"),
    "vllm": ("dooly.engines.vllm_engine", "VllmKind"),
}
ENGINE_NAMES = tuple(ENGINES)
DEFAULT_ENGINE = "transformers"
# Attention backends each engine's serving loop accepts; a store may hold more (transformers'
# paged|flex_attention is profiled, not served: dooly.engines.flex_paged). Literal here so that
# readers of a store need not import torch (dooly.engines.transformers_cb.ENGINE_BACKENDS is the source).
SERVED_BACKENDS: dict[str, tuple[str, ...]] = {"transformers": ("paged|sdpa", "paged|eager")}


def served_by(engine: str, backend: str) -> bool:
    """Whether ENGINE's serving loop runs BACKEND (an engine not listed: assumed to)."""
    served = SERVED_BACKENDS.get(engine)
    return served is None or backend in served


def engine_kind(name: str) -> EngineKind:
    """The engine called `name`; a DoolyError for an unknown name or an engine not installed."""
    if name not in ENGINES:
        raise DoolyError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    module_name, class_name = ENGINES[name]
    module = importlib.import_module(module_name)
    kind = getattr(module, class_name)()
    check = getattr(kind, "require", None)
    if check is not None:
        check()
    return kind


def default_backend(name: str) -> str:
    """The engine's default attention backend (vLLM: the one its installed build runs)."""
    return engine_kind(name).default_backend
