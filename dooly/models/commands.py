"""`dooly models`: the model configurations Dooly knows, and the shapes they imply."""

from __future__ import annotations

import logging
from typing import Any

import click

from dooly.models.registry import (
    ModelSpec,
    build_hf_config,
    bundled_model_ids,
    model_key,
    resolve_model,
)
from dooly.models.validation import allow_defaults_option
from dooly.output import emit_json, format_table, output_option

logger = logging.getLogger(__name__)

HEADERS = (
    "model",
    "architecture",
    "layers",
    "hidden",
    "heads/kv",
    "head_dim",
    "intermediate",
    "vocab",
    "experts",
    "sliding window",
)
NONE_CELL = "-"
SLIDING_LAYER_TYPE = "sliding_attention"
EXPERT_COUNT_ATTRIBUTES = ("num_local_experts", "num_experts", "n_routed_experts")


@click.command("models")
@allow_defaults_option
@click.argument("models", nargs=-1, metavar="[MODEL]...")
@click.option("--store", "store_uri", metavar="URI", default=None,
              help="Latency database to look MODEL up in when it is an id or model key only the store knows "
                   "(the config `dooly profile` stored); read only.")
@output_option
def models_command(models: tuple[str, ...], store_uri: str | None, output_format: str) -> None:
    """List the bundled model configs, or check your own, with the shapes they imply.

    Every Dooly command that takes a MODEL accepts a bundled Hugging Face id (any case, with or
    without the organisation), a path to a config.json, or a directory holding one (a downloaded
    snapshot); a command given a store also the id or model key of a model profiled into it (the
    config `dooly profile` keeps beside its inventories). No weights are needed: only the config
    decides what gets traced and profiled.
    The numbers shown come from transformers' own config class, so derived values (head_dim,
    which layers use a sliding window) are the ones the engine's forward uses.

    \b
    Examples:
      dooly models                                   all bundled models
      dooly models Llama-3.1-8B google/gemma-2-9b     just these
      dooly models ./my-model/config.json            check a config before tracing it
      dooly models my-model --store ./db             a model profiled into the store
      dooly models --output json                     for scripts (adds model_key and source)
    """
    from dooly.models.stored import resolve_model_with_store
    from dooly.store.backends import open_store

    store = open_store(store_uri, create=False) if store_uri is not None else None
    specs = (
        [resolve_model_with_store(name, store) for name in models]
        if models
        else [resolve_model(i) for i in bundled_model_ids()]
    )
    rows = [describe(spec) for spec in specs]
    if output_format == "json":
        emit_json({"models": rows})
        return
    table_rows = [
        (
            row["model_id"],
            row["architecture"],
            row["layers"],
            row["hidden_size"],
            f"{row['num_attention_heads']}/{row['num_key_value_heads']}",
            row["head_dim"],
            row["intermediate_size"],
            row["vocab_size"],
            _experts_cell(row),
            _sliding_cell(row),
        )
        for row in rows
    ]
    click.echo(format_table(HEADERS, table_rows))


def describe(spec: ModelSpec) -> dict[str, Any]:
    """The shape-deciding facts of one model, as transformers resolves them."""
    config = build_hf_config(spec)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    experts = next(
        (getattr(config, name) for name in EXPERT_COUNT_ATTRIBUTES if getattr(config, name, None)),
        None,
    )
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    sliding_layers = 0
    if window:
        sliding_layers = (
            sum(kind == SLIDING_LAYER_TYPE for kind in layer_types)
            if layer_types
            else config.num_hidden_layers
        )
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    return {
        "model_id": spec.model_id,
        "model_key": model_key(spec),
        "source": spec.source,
        "architecture": architectures[0],
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": config.vocab_size,
        "experts": experts,
        "experts_per_token": getattr(config, "num_experts_per_tok", None) if experts else None,
        "sliding_window": window or None,
        "sliding_window_layers": sliding_layers,
    }


def _experts_cell(row: dict[str, Any]) -> str:
    if not row["experts"]:
        return NONE_CELL
    return f"{row['experts']} (top {row['experts_per_token']})"


def _sliding_cell(row: dict[str, Any]) -> str:
    if not row["sliding_window"]:
        return NONE_CELL
    return f"{row['sliding_window']} on {row['sliding_window_layers']}/{row['layers']} layers"
