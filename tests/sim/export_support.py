"""A small fitted store for the exporters' tests: two synthetic toy models profiled and fitted,
plus an inventory (with the transformers module names the exporters map) for a bundled suite
model, stored where `dooly profile` writes it (inventories/<model key>/<backend>.json, the key a
hash of its config facts), so the resolver finds it as it finds any profiled model's. The suite
model shares some signatures with the toys (measured) and not others (class regressors).

The unseen config.json is a model the store never ran: the resolver traces it on the CPU, and
every signature of it is estimated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from dooly.fit import synthetic as syn

SUITE_MODEL = "meta-llama/Llama-3.2-1B"
# Llama-3.2-1B's shapes (bundled config): hidden 2048, MLP 8192, 32 heads of 64, 8 KV heads, 16 layers.
SUITE_SHAPES = syn.ToyModel(SUITE_MODEL, 2048, 8192, 32, 8, 64, 128256, 16)
UNSEEN_ID = "tiny-unseen"
UNSEEN = syn.UNSEEN_MODEL
FOLDS = 2
PROFILED = syn.TOY_MODELS[:2]

# The module each synthetic operation ran in, in syn.model_operations' order.
_MODULES = (
    ["model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.o_proj"],
    ["model.layers.*.self_attn.k_proj"],
    ["model.layers.*.mlp.gate_proj"],
    ["model.layers.*.mlp.down_proj"],
    ["lm_head"],
    ["model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm", "model.norm"],
    ["model.layers.*.mlp.act_fn"],
    ["model.layers.*.self_attn"],
)


def inventory_with_modules(shapes: syn.ToyModel, model_id: str, key: str) -> dict[str, Any]:
    operations = syn.model_operations(shapes)
    assert len(operations) == len(_MODULES), "synthetic operations changed: update _MODULES"
    for operation, modules in zip(operations, _MODULES, strict=True):
        operation["modules"] = modules
    return {"model_id": model_id, "model_key": key, "backend": syn.BACKEND, "dtype": syn.DTYPE, "operations": operations}


def unseen_config(directory: Path) -> Path:
    """A llama-type config.json with UNSEEN's shapes, in a folder named UNSEEN_ID."""
    folder = directory / UNSEEN_ID
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": UNSEEN.hidden,
        "intermediate_size": UNSEEN.intermediate, "num_attention_heads": UNSEEN.heads,
        "num_key_value_heads": UNSEEN.kv_heads, "head_dim": UNSEEN.head_dim, "vocab_size": UNSEEN.vocab,
        "num_hidden_layers": UNSEEN.layers, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def build_store(root: Path) -> str:
    """Profile (synthetically), merge and fit; store the suite model's inventory."""
    from dooly.cli import cli
    from dooly.models.registry import model_key, resolve_model
    from dooly.profile.run import inventory_key
    from dooly.store.backends import open_store
    from dooly.store.documents import write_json
    from dooly.store.merge import merge_store
    from dooly.store.shards import write_shard

    store = open_store(str(root))
    write_shard(store, syn.snapshot_table(PROFILED), run_id="synthetic", chunk_index=0)
    for model in PROFILED:
        write_json(store, syn.inventory_store_key(model), syn.inventory(model))
    suite_key = model_key(resolve_model(SUITE_MODEL))
    write_json(store, inventory_key(suite_key, syn.BACKEND), inventory_with_modules(SUITE_SHAPES, SUITE_MODEL, suite_key))
    merge_store(store)
    result = CliRunner().invoke(cli, ["fit", "--store", str(root), "--folds", str(FOLDS), "--output", "json"])
    assert result.exit_code == 0, result.output
    return str(root)


def store_args(store: str) -> list[str]:
    return ["--store", store, "--platform", syn.PLATFORM, "--backend", syn.BACKEND]


_BUILT: dict[str, str] = {}


def shared_store(tmp_path_factory: Any) -> str:
    """One fitted store per test session, shared by the exporters' test modules (fitting takes
    tens of seconds on a busy 2-core machine)."""
    if "root" not in _BUILT:
        _BUILT["root"] = build_store(tmp_path_factory.mktemp("export-db"))
    return _BUILT["root"]
