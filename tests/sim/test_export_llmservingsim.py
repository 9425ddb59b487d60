"""`dooly export llmservingsim`: the bundle parses the way LLMServingSim's loader reads it
(serving/core/trace_generator.py: `_load_perf_db`, `_read_category_csv`, `_build_1d_table`,
`_build_attention_table`, and the per-layer lookups of `_emit_layer`), in microseconds, and the
layers an iteration calls add up to Dooly's own step prediction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from export_support import SUITE_MODEL, UNSEEN, UNSEEN_ID, shared_store, store_args, unseen_config

from dooly.cli import cli
from dooly.fit.resolve import ORIGIN_STORE, ORIGIN_TRACED

HARDWARE = "SYNTH"
MAX_TOKENS = 512
MAX_SEQS = 16
MAX_CHUNK = 256
MAX_KV = 512
US_PER_S = 1e6
# The columns each table must have, from trace_generator's readers.
COLUMNS = {
    "dense.csv": ["layer", "tokens", "time_us"],
    "per_sequence.csv": ["layer", "sequences", "time_us"],
    "attention.csv": ["prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return shared_store(tmp_path_factory)


def _export(store: str, model: str, out: Path) -> dict:
    args = ["export", "llmservingsim", model, "--hardware", HARDWARE, "--out", str(out), *store_args(store),
            "--max-tokens", str(MAX_TOKENS), "--max-seqs", str(MAX_SEQS), "--max-chunk", str(MAX_CHUNK),
            "--max-kv", str(MAX_KV), "--output", "json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _lookup_1d(rows: list[dict[str, str]], layer: str, key: str, query: int) -> float:
    """An exact grid point's latency in ns, as the simulator computes it (us * 1000, rounded)."""
    match = [r for r in rows if r["layer"] == layer and int(r[key]) == query]
    assert len(match) == 1, (layer, query)
    return max(round(float(match[0]["time_us"]) * 1000), 1)


@pytest.mark.parametrize("which", ["suite", "unseen"])
def test_bundle_parses_as_llmservingsims_loader_reads_it(store, tmp_path, which):
    model = SUITE_MODEL if which == "suite" else str(unseen_config(tmp_path))
    info = _export(store, model, tmp_path / "sim")
    sim_model = SUITE_MODEL if which == "suite" else UNSEEN_ID
    assert info["sim_model"] == sim_model
    root = tmp_path / "sim" / "profiler" / "perf" / HARDWARE / sim_model / "bf16"
    meta = yaml.safe_load((root / "meta.yaml").read_text())
    assert meta["engine_effective"]["max_num_batched_tokens"] == MAX_TOKENS
    assert meta["engine_effective"]["max_num_seqs"] == MAX_SEQS
    assert meta["skew_fit"] == {"enabled": False}
    assert meta["dooly"]["backend"] == "paged|sdpa"
    tables = {}
    for name, columns in COLUMNS.items():
        header, rows = _table(root / "tp1" / name)
        assert header == columns and rows
        assert all(float(r["time_us"]) * 1000 >= 1 for r in rows), "every latency is above the 1 ns clamp"
        tables[name] = rows
    # The catalog the simulator walks: every layer of its sequence has a table.
    catalog = yaml.safe_load((tmp_path / "sim" / "profiler" / "models" / "llama.yaml").read_text())
    dense_layers = {r["layer"] for r in tables["dense.csv"]}
    sequence = [layer for part in catalog["sequence"].values() for layer in part]
    for layer in sequence:
        category = next(c for c, entries in catalog["catalog"].items() if layer in entries)
        assert category != "dense" or layer in dense_layers, layer
    assert {r["layer"] for r in tables["per_sequence.csv"]} == {"lm_head", "sampler"}
    # Attention: (prefill_chunk, n_decode) slices over doubling axes, a decode-only and a prefill-only corner.
    pairs = {(int(r["prefill_chunk"]), int(r["n_decode"])) for r in tables["attention.csv"]}
    assert (0, 1) in pairs and (MAX_CHUNK, 0) in pairs and (16, MAX_SEQS) in pairs and (0, 0) not in pairs
    config = json.loads((tmp_path / "sim" / "configs" / "model" / f"{sim_model}.json").read_text())
    assert config["model_type"] == "llama"
    if which == "unseen":
        assert config["hidden_size"] == UNSEEN.hidden
        assert set(info["coverage"].values()) == {0.0} and info["unseen_count"] == info["op_count"]
        assert info["inventory_origin"] == ORIGIN_TRACED
    else:
        assert 0.0 < info["coverage"]["dense.csv"] < 1.0
        assert info["inventory_origin"] == ORIGIN_STORE


def test_a_config_the_store_never_ran_exports_traced_on_the_cpu(store, tmp_path):
    """MODEL named by its config.json path is resolved as `dooly simulate` resolves it: the store
    has no inventory of it, so it is traced on the CPU, and every operation is estimated."""
    config = unseen_config(tmp_path / "configs")
    info = _export(store, str(config), tmp_path / "sim")
    assert info["inventory_origin"] == ORIGIN_TRACED and info["inventory_model_id"] == UNSEEN_ID
    assert info["model"] == UNSEEN_ID and info["sim_model"] == UNSEEN_ID
    assert set(info["coverage"]) == set(COLUMNS) and set(info["coverage"].values()) == {0.0}
    assert 0 < info["unseen_count"] == info["op_count"]
    assert (tmp_path / "sim" / "profiler" / "perf" / HARDWARE / UNSEEN_ID / "bf16" / "tp1" / "dense.csv").is_file()


@pytest.mark.parametrize("batch", [(128, 256, 0, 0), (0, 0, 16, 512)], ids=["prefill", "decode"])
def test_an_iteration_adds_up_to_dooly_step_time(store, tmp_path, batch):
    """Embedding + L x (2 layernorm + qkv + rope + attention + o + gate_up + act + down) + final
    norm + lm_head + sampler, looked up at exact grid points, is Dooly's step prediction."""
    from dooly.fit.source import FittedSource, open_fitted_step
    from dooly.fit.synthetic import BACKEND, PLATFORM

    _export(store, SUITE_MODEL, tmp_path / "sim")
    tp_dir = tmp_path / "sim" / "profiler" / "perf" / HARDWARE / SUITE_MODEL / "bf16" / "tp1"
    _, dense = _table(tp_dir / "dense.csv")
    _, per_seq = _table(tp_dir / "per_sequence.csv")
    _, attention = _table(tp_dir / "attention.csv")
    fitted = open_fitted_step(FittedSource(store=store, platform=PLATFORM, backend=BACKEND), SUITE_MODEL)
    layers = 16
    chunk, kv_prefill, n_decode, kv_decode = batch
    tokens = chunk + n_decode
    attn = next(r for r in attention if (int(r["prefill_chunk"]), int(r["kv_prefill"]), int(r["n_decode"]), int(r["kv_decode"]))
                == (chunk, kv_prefill, n_decode, kv_decode))
    per_layer = 2 * _lookup_1d(dense, "layernorm", "tokens", tokens) + sum(
        _lookup_1d(dense, name, "tokens", tokens) for name in ("qkv_proj", "rotary_emb", "o_proj", "gate_up_proj", "act_fn", "down_proj"))
    per_layer += float(attn["time_us"]) * 1000
    once = sum(_lookup_1d(dense, name, "tokens", tokens) for name in ("embedding", "final_layernorm"))
    sequences = (1 if chunk else 0) + n_decode
    once += sum(_lookup_1d(per_seq, name, "sequences", sequences) for name in ("lm_head", "sampler"))
    simulated_s = (layers * per_layer + once) / 1e9
    expected_s = fitted.step.step_seconds([(chunk, kv_prefill)] if chunk else [], [kv_decode] * n_decode)
    # Within the 1 ns rounding of each lookup (and the clamp of layers this model does not run).
    assert simulated_s == pytest.approx(expected_s, rel=1e-3)


def test_moe_modules_are_refused_with_one_line(tmp_path):
    from dooly.errors import DoolyError
    from dooly.sim.llmservingsim import layer_weights

    inventory = {"model_id": "m", "operations": [
        {"signature": "s", "op": "aten.mm.default", "count": 4, "modules": ["model.layers.*.mlp.experts"]}]}
    with pytest.raises(DoolyError, match="mlp.experts"):
        layer_weights(inventory, 4)


def test_layernorm_is_one_of_two_calls_per_layer():
    from dooly.sim.llmservingsim import layer_weights

    inventory = {"model_id": "m", "operations": [
        {"signature": "norm", "op": "aten.mul.Tensor", "count": 9,
         "modules": ["model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm", "model.norm"]},
        {"signature": "resid", "op": "aten.add.Tensor", "count": 8, "modules": ["model.layers.*"]},
    ]}
    weights = layer_weights(inventory, 4)
    # 2L + 1 executions: once in the final norm, L in each layer norm; layernorm is called 2L times.
    assert weights["norm"] == pytest.approx({"layernorm": 1.0, "final_layernorm": 1.0})
    # The residual adds ride on vLLM's fused add+RMSNorm: 8 executions over 8 layernorm calls.
    assert weights["resid"] == pytest.approx({"layernorm": 1.0})
