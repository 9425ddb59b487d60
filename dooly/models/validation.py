"""Refuse a model config that lacks a field the tracer needs, instead of tracing transformers' defaults.

transformers' config classes give every shape field a default (LlamaConfig: hidden_size 4096,
vocab_size 32000, ...). A user config that forgets one is therefore traced, profiled and stored as a
different model than the user meant, silently. Dooly checks, before any work, that every field that
sizes a traced tensor and that the family's config class would otherwise fill with a default is
present in the config; a missing one is one error line naming it. `--allow-defaults` (a shared option
of every command that reads a model config) accepts transformers' defaults, and reports them.

Fields whose class default is None are derived, not defaulted (head_dim = hidden_size / heads,
num_key_value_heads = num_attention_heads in Llama), and are not required.

The policy lives on the click context: a command run from the CLI is strict unless --allow-defaults
was given; a library call (no click context) is permissive but still logs the defaults it used.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any, TypeVar

import click

from dooly.errors import DoolyError

logger = logging.getLogger(__name__)

# Every config field that sizes a tensor in a traced forward pass, for any family Dooly bundles
# (llama, mistral, qwen2, qwen3, gemma2, phi3, mixtral, qwen2_moe, qwen3_moe, cohere2, ...).
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
)
# Where the --allow-defaults choice is kept on the click context (meta is shared by the whole chain).
ALLOW_DEFAULTS_META_KEY = "dooly.allow_defaults"
ALLOW_DEFAULTS_HELP = (
    "Accept transformers' default for a shape field the model config leaves out (hidden_size, "
    "vocab_size, ...); without it such a config is refused. The defaults used are reported."
)

F = TypeVar("F", bound=Callable[..., Any])


def _remember_allow_defaults(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[ALLOW_DEFAULTS_META_KEY] = True
    return value


def allow_defaults_option(func: F) -> F:
    """The shared `--allow-defaults` flag; it is recorded on the click context, not passed on."""
    option = click.option(
        "--allow-defaults",
        is_flag=True,
        default=False,
        expose_value=False,
        is_eager=True,
        callback=_remember_allow_defaults,
        help=ALLOW_DEFAULTS_HELP,
    )
    return option(func)


def defaults_allowed() -> bool:
    """Whether a missing shape field may take transformers' default: always outside the CLI (a
    library caller builds what it asks for), inside it only with --allow-defaults."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True
    return bool(ctx.meta.get(ALLOW_DEFAULTS_META_KEY, False))


@cache
def defaulted_shape_fields(model_type: str) -> dict[str, Any]:
    """Shape field -> the value transformers' config class for `model_type` would give it when a
    config leaves it out (fields the class derives, with a None default, are not listed)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    defaults: dict[str, Any] = {}
    if dataclasses.is_dataclass(config_class):
        for field in dataclasses.fields(config_class):
            if field.default is not dataclasses.MISSING:
                defaults[field.name] = field.default
    for name, parameter in inspect.signature(config_class.__init__).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            defaults.setdefault(name, parameter.default)
    return {
        name: defaults[name]
        for name in SHAPE_FIELDS
        if name in defaults and defaults[name] is not None
    }


def check_required_fields(
    facts: dict, model_type: str, model_id: str, *, supplied: Iterable[str] = ()
) -> None:
    """Refuse (one line, every missing field named) a config that leaves a shape field to
    transformers' default, unless defaults are allowed; then log each default that is used.

    `supplied` names fields the caller sets itself (overrides such as num_hidden_layers=1).
    """
    present = set(facts) | set(supplied)
    missing = {
        name: value
        for name, value in defaulted_shape_fields(model_type).items()
        if name not in present
    }
    if not missing:
        return
    listed = ", ".join(f"{name} (transformers' default: {value!r})" for name, value in missing.items())
    if not defaults_allowed():
        raise DoolyError(
            f"{model_id}: the config lacks {listed}; add {'them' if len(missing) > 1 else 'it'} "
            "to the config, or pass --allow-defaults to use transformers' defaults"
        )
    logger.warning("%s: the config lacks %s; using transformers' defaults", model_id, listed)
