"""`dooly export vidur` from fitted models: the files parse the way Vidur's own loader reads them
(vidur/execution_time_predictor/sklearn_execution_time_predictor.py: `_load_compute_df`,
`_load_attention_df` and the feature columns of its `_train_*` methods), for a suite model and an
unseen config.json, with coverage reported per file."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from export_support import SUITE_MODEL, UNSEEN_ID, shared_store, store_args, unseen_config
from test_vidur import VIDUR_MLP_HEADER

from dooly.cli import cli
from dooly.fit.resolve import ORIGIN_STORE, ORIGIN_TRACED
from dooly.sim.options import model_dims

MAX = 256
MAX_BATCH = 8
# The medians Vidur fits its regressors on, per table.
COMPUTE_TARGETS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "input_layernorm",
                   "post_attention_layernorm", "attn_rope", "add")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return shared_store(tmp_path_factory)


def _export(store: str, model: str, out: Path) -> dict:
    args = ["export", "vidur", model, "--device", "synth", "--out", str(out), *store_args(store),
            "--max-tokens", str(MAX), "--max-seq-len", str(MAX), "--max-batch-size", str(MAX_BATCH), "--output", "json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _read(path: Path) -> tuple[list[str], list[dict[str, object]]]:
    """A CSV as pandas.read_csv types it for Vidur: numbers as floats, True/False as bools, an
    empty cell as NaN (pandas is not a Dooly dependency; these are the cells the export writes)."""
    def cell(text: str) -> object:
        if text in ("True", "False"):
            return text == "True"
        try:
            return float(text) if text else math.nan
        except ValueError:
            return text

    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [{k: cell(v) for k, v in row.items()} for row in reader]
        return list(reader.fieldnames or []), rows


def _vidur_frames(info: dict, dims) -> tuple[list[dict], list[dict]]:
    """mlp.csv and attention.csv rows Vidur keeps for this model (its filters; tp 1, block 16)."""
    files = {Path(f).name: Path(f) for f in info["files"]}
    _, compute = _read(files["mlp.csv"])
    compute = [r for r in compute if (r["n_head"], r["n_kv_head"], r["n_embd"], r["n_expanded_embd"], r["use_gated_mlp"],
                                      r["vocab_size"], r["num_tensor_parallel_workers"])
               == (dims.num_heads, dims.num_kv_heads, dims.hidden_size, dims.intermediate_size, dims.gated_mlp,
                   dims.vocab_size, 1)]
    _, attention = _read(files["attention.csv"])
    attention = [r for r in attention if (r["n_embd"], r["n_q_head"], r["n_kv_head"], r["block_size"],
                                          r["num_tensor_parallel_workers"])
                 == (dims.hidden_size, dims.num_heads, dims.num_kv_heads, 16, 1)]
    return compute, attention


@pytest.mark.parametrize("which", ["suite", "unseen"])
def test_files_parse_as_vidurs_loader_reads_them(store, tmp_path, which):
    model = SUITE_MODEL if which == "suite" else str(unseen_config(tmp_path))
    info = _export(store, model, tmp_path / "vidur")
    dims = model_dims(model)
    compute, attention = _vidur_frames(info, dims)
    assert len(compute) > 0 and len(attention) > 0, "Vidur's key-column filters must keep the rows"
    header, _ = _read(next(Path(f) for f in info["files"] if f.endswith("mlp.csv")))
    assert header == VIDUR_MLP_HEADER.split(",")
    for op in COMPUTE_TARGETS:
        assert all(not math.isnan(r[f"time_stats.{op}.median"]) for r in compute), op
    assert all(r["time_stats.mlp_up_proj.median"] > 0 for r in compute)
    prefill = [r for r in attention if r["prefill_chunk_size"] > 0]
    decode = [r for r in attention if r["prefill_chunk_size"] == 0]
    # What Vidur's attention models train on: no NaN, and the stage that did not run is 0.0.
    assert all(r["time_stats.attn_prefill.median"] > 0 for r in prefill) and all(r["time_stats.attn_decode.median"] > 0 for r in decode)
    assert all(r["time_stats.attn_decode.median"] == 0.0 for r in prefill) and all(r["time_stats.attn_prefill.median"] == 0.0 for r in decode)
    assert all(not math.isnan(v) for r in attention for k, v in r.items() if k.startswith("time_stats."))
    assert {r["attention_backend"] for r in attention} == {"AttentionBackend.FLASHINFER"}
    assert {r["is_prefill"] for r in attention} == {True, False}
    # Longer decode contexts cost more (milliseconds of the fitted attention, not a constant).
    one = sorted((r for r in decode if r["batch_size"] == 1), key=lambda r: r["kv_cache_size"])
    assert one[-1]["time_stats.attn_decode.median"] > one[0]["time_stats.attn_decode.median"]
    assert info["attention_backend"] == "AttentionBackend.FLASHINFER" and info["backend"] == "paged|sdpa"
    assert "--random_forrest_execution_time_predictor_config_attention_decode_batching_overhead_fraction" in info["vidur_flags"]
    sidecar = json.loads(Path(next(f for f in info["files"] if f.endswith("dooly_export.json"))).read_text())
    assert sidecar["coverage"] == info["coverage"]


def test_coverage_tells_measured_from_estimated(store, tmp_path):
    suite = _export(store, SUITE_MODEL, tmp_path / "suite")
    unseen = _export(store, str(unseen_config(tmp_path)), tmp_path / "unseen")
    # The suite model shares its q/o, gate/up and down projections with a profiled toy model; its
    # KV projection, lm_head and attention are estimated by class regressors.
    assert 0.0 < suite["coverage"]["mlp.csv"] < 1.0
    assert suite["coverage"]["attention.csv"] == 0.0
    assert 0 < suite["unseen_count"] < suite["op_count"]
    assert unseen["coverage"] == {"attention.csv": 0.0, "mlp.csv": 0.0}
    assert unseen["unseen_count"] == unseen["op_count"]
    assert unseen["model"] == UNSEEN_ID and unseen["inventory_model_id"] == UNSEEN_ID
    assert suite["inventory_origin"] == ORIGIN_STORE and unseen["inventory_origin"] == ORIGIN_TRACED


def test_a_config_the_store_never_ran_exports_traced_on_the_cpu(store, tmp_path):
    """MODEL named by its config.json path is resolved as `dooly simulate` resolves it: the store
    has no inventory of it, so it is traced on the CPU, and every operation is estimated."""
    config = unseen_config(tmp_path / "configs")
    info = _export(store, str(config), tmp_path / "vidur")
    assert info["inventory_origin"] == ORIGIN_TRACED and info["inventory_model_id"] == UNSEEN_ID
    assert info["model"] == UNSEEN_ID and info["vidur_model"] == UNSEEN_ID
    assert info["coverage"] == {"attention.csv": 0.0, "mlp.csv": 0.0}
    assert 0 < info["unseen_count"] == info["op_count"]
    assert {Path(f).name for f in info["files"]} == {"mlp.csv", "attention.csv", "dooly_export.json"}


def test_milliseconds_match_the_step_models_operations(store, tmp_path):
    """The fast per-operation path gives the step model's own numbers, written in milliseconds."""
    from dooly.fit.source import FittedSource, open_fitted_step
    from dooly.fit.synthetic import BACKEND, PLATFORM

    info = _export(store, SUITE_MODEL, tmp_path / "v")
    compute, _ = _vidur_frames(info, model_dims(SUITE_MODEL))
    fitted = open_fitted_step(FittedSource(store=store, platform=PLATFORM, backend=BACKEND), SUITE_MODEL)
    tokens = 128
    rows = {r["signature"]: r for r in fitted.step.op_seconds([(tokens, 0)], [])}
    down = next(e for e in fitted.inventory["operations"] if e["modules"] == ["model.layers.*.mlp.down_proj"])
    expected_ms = rows[down["signature"]]["seconds"] * 1e3  # one execution per layer
    row = next(r for r in compute if r["num_tokens"] == tokens)
    assert row["time_stats.mlp_down_proj.median"] == pytest.approx(expected_ms, rel=1e-9)
    # An estimated operation too: attention (its signature was never profiled) for 4 decodes of 128.
    _, attention = _vidur_frames(info, model_dims(SUITE_MODEL))
    attn = next(e for e in fitted.inventory["operations"] if e["op"] == "attention")
    decode = {r["signature"]: r for r in fitted.step.op_seconds([], [128] * 4)}[attn["signature"]]
    assert decode["unseen"]
    row = next(r for r in attention if (r["batch_size"], r["kv_cache_size"], r["prefill_chunk_size"]) == (4, 128, 0))
    assert row["time_stats.attn_decode.median"] == pytest.approx(decode["seconds"] * 1e3, rel=1e-9)


def test_a_model_nobody_can_resolve_is_one_error_line(store, tmp_path):
    # Any config is predictable now (traced on the CPU when the store never ran it); a name that is
    # neither bundled, nor a config, nor in the store is one error line.
    result = CliRunner().invoke(cli, ["export", "vidur", "no-such/Model-7B", "--device", "synth", "--out",
                                      str(tmp_path), *store_args(store)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "error" in result.stderr.lower()
    assert "no-such/Model-7B" in result.stderr


def test_vidur_flags_turn_the_gqa_surcharge_off_for_either_predictor():
    from dooly.errors import DoolyError
    from dooly.sim.vidur import vidur_predictor_flags

    for predictor in ("random_forrest", "linear_regression"):
        flags = vidur_predictor_flags(predictor, max_tokens=2048, max_batch_size=64, max_chunk=512)
        pairs = dict(zip(flags[::2], flags[1::2], strict=True))
        prefix = f"--{predictor}_execution_time_predictor_config_"
        assert pairs["--execution_time_predictor_config_type"] == predictor
        assert pairs[prefix + "attention_decode_batching_overhead_fraction"] == "0"
        assert pairs[prefix + "attention_prefill_batching_overhead_fraction"] == "0"
        assert pairs[prefix + "prediction_max_tokens_per_request"] == "2048"
        assert pairs[prefix + "prediction_max_prefill_chunk_size"] == "512"
        assert (prefix + "num_estimators" in pairs) == (predictor == "random_forrest")
    with pytest.raises(DoolyError, match="random_forrest"):
        vidur_predictor_flags("xgboost")
