"""Vidur profiling CSVs: the column names Vidur reads, and rows it can filter and fit on."""

from __future__ import annotations

import csv

import pytest

from dooly.errors import DoolyError
from dooly.sim.step_model import LLAMA_3_8B, AnalyticStepModel
from dooly.sim.vidur import OpStats, VidurPoint, VidurSweep, analytic_op_predictor, analytic_op_seconds, export_vidur

# The header of Vidur's published data/profiling/compute/a100/meta-llama/Meta-Llama-3-8B/mlp.csv
# (github.com/microsoft/vidur, main).
VIDUR_MLP_HEADER = (
    "time_stats.emb.min,time_stats.emb.max,time_stats.emb.mean,time_stats.emb.median,time_stats.emb.std,"
    "time_stats.input_layernorm.min,time_stats.input_layernorm.max,time_stats.input_layernorm.mean,"
    "time_stats.input_layernorm.median,time_stats.input_layernorm.std,time_stats.attn_pre_proj.min,"
    "time_stats.attn_pre_proj.max,time_stats.attn_pre_proj.mean,time_stats.attn_pre_proj.median,"
    "time_stats.attn_pre_proj.std,time_stats.attn_rope.min,time_stats.attn_rope.max,time_stats.attn_rope.mean,"
    "time_stats.attn_rope.median,time_stats.attn_rope.std,time_stats.attn_post_proj.min,"
    "time_stats.attn_post_proj.max,time_stats.attn_post_proj.mean,time_stats.attn_post_proj.median,"
    "time_stats.attn_post_proj.std,time_stats.post_attention_layernorm.min,time_stats.post_attention_layernorm.max,"
    "time_stats.post_attention_layernorm.mean,time_stats.post_attention_layernorm.median,"
    "time_stats.post_attention_layernorm.std,time_stats.mlp_up_proj.min,time_stats.mlp_up_proj.max,"
    "time_stats.mlp_up_proj.mean,time_stats.mlp_up_proj.median,time_stats.mlp_up_proj.std,time_stats.mlp_act.min,"
    "time_stats.mlp_act.max,time_stats.mlp_act.mean,time_stats.mlp_act.median,time_stats.mlp_act.std,"
    "time_stats.mlp_down_proj.min,time_stats.mlp_down_proj.max,time_stats.mlp_down_proj.mean,"
    "time_stats.mlp_down_proj.median,time_stats.mlp_down_proj.std,time_stats.add.min,time_stats.add.max,"
    "time_stats.add.mean,time_stats.add.median,time_stats.add.std,n_head,n_kv_head,n_embd,n_expanded_embd,"
    "vocab_size,use_gated_mlp,num_tokens,num_tensor_parallel_workers"
)
# What Vidur's attention profiler records per row (AttentionWrapper.profile), and the medians its
# predictor fits on (SklearnExecutionTimePredictor._train_*).
VIDUR_ATTENTION_KEYS = {
    "n_embd", "n_q_head", "n_kv_head", "block_size", "num_tensor_parallel_workers", "max_model_len",
    "batch_size", "prefill_chunk_size", "kv_cache_size", "is_prefill", "attention_backend",
}
VIDUR_ATTENTION_TARGETS = {"time_stats.attn_prefill.median", "time_stats.attn_decode.median", "time_stats.attn_kv_cache_save.median"}

SMALL = VidurSweep(max_tokens=512, max_seq_len=512, max_batch_size=8)


def _read(path):
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


@pytest.fixture
def exported(tmp_path):
    model = AnalyticStepModel(dims=LLAMA_3_8B)
    paths = export_vidur(analytic_op_predictor(model), LLAMA_3_8B, tmp_path, "h100", "meta-llama/Meta-Llama-3-8B", block_size=16, sweep=SMALL)
    return model, paths


def test_files_land_where_vidur_looks(tmp_path, exported):
    _, paths = exported
    base = tmp_path / "data" / "profiling" / "compute" / "h100" / "meta-llama" / "Meta-Llama-3-8B"
    assert sorted(paths) == sorted([base / "mlp.csv", base / "attention.csv"])
    assert sorted(p.name for p in base.iterdir()) == ["attention.csv", "mlp.csv"]


def test_mlp_csv_has_vidurs_columns_and_filterable_rows(exported):
    model, paths = exported
    header, rows = _read(paths[0] if paths[0].name == "mlp.csv" else paths[1])
    assert ",".join(header) == VIDUR_MLP_HEADER
    # Vidur's _load_compute_df filter for Llama-3-8B at TP 1.
    kept = [
        r for r in rows
        if (r["n_head"], r["n_kv_head"], r["n_embd"], r["n_expanded_embd"], r["vocab_size"], r["use_gated_mlp"], r["num_tensor_parallel_workers"])
        == ("32", "8", "4096", "14336", "128256", "True", "1")
    ]
    assert len(kept) == len(rows) > 50
    tokens = [int(r["num_tokens"]) for r in kept]
    assert min(tokens) == 1 and max(tokens) == SMALL.max_tokens
    row = next(r for r in kept if r["num_tokens"] == "256")
    expected_ms = analytic_op_seconds(model, "mlp_up_proj", VidurPoint(num_tokens=256)) * 1e3
    assert float(row["time_stats.mlp_up_proj.median"]) == pytest.approx(expected_ms)


def test_attention_csv_rows_fit_vidurs_prefill_and_decode_models(exported):
    model, paths = exported
    header, rows = _read(next(p for p in paths if p.name == "attention.csv"))
    assert VIDUR_ATTENTION_KEYS <= set(header) and VIDUR_ATTENTION_TARGETS <= set(header)
    prefill = [r for r in rows if int(r["prefill_chunk_size"]) > 0]
    decode = [r for r in rows if int(r["prefill_chunk_size"]) == 0]
    assert prefill and decode
    assert all(r["is_prefill"] == "True" and r["batch_size"] == "1" and r["time_stats.attn_prefill.median"] for r in prefill)
    # Vidur's profiler times every attention stage on every row: a stage that ran no kernel is 0.0.
    assert all(float(r[f"time_stats.attn_decode.{s}"]) == 0.0 for r in prefill for s in ("min", "median", "max"))
    assert all(float(r["time_stats.attn_prefill.median"]) == 0.0 for r in decode)
    assert {r["attention_backend"] for r in rows} == {"AttentionBackend.FLASHINFER"}
    assert all(r["is_prefill"] == "False" and int(r["kv_cache_size"]) > 0 and r["time_stats.attn_decode.median"] for r in decode)
    assert all(int(r["prefill_chunk_size"]) + int(r["kv_cache_size"]) <= SMALL.max_seq_len for r in prefill)
    assert {int(r["batch_size"]) for r in decode} == set(range(1, SMALL.max_batch_size + 1))
    chunked = [r for r in prefill if int(r["kv_cache_size"]) > 0]
    assert chunked, "chunked-prefill rows (context before the chunk) are needed for Vidur's attn_prefill model"
    r = chunked[0]
    point = VidurPoint(int(r["prefill_chunk_size"]), 1, int(r["prefill_chunk_size"]), int(r["kv_cache_size"]), True)
    assert float(r["time_stats.attn_prefill.median"]) == pytest.approx(analytic_op_seconds(model, "attn_prefill", point) * 1e3)
    assert {r["block_size"] for r in rows} == {"16"}


def test_statistics_pass_through_in_milliseconds(tmp_path):
    def predict(op, point):
        return OpStats(median=0.002, min=0.001, max=0.004, mean=0.0025, std=0.0005)

    paths = export_vidur(predict, LLAMA_3_8B, tmp_path, "a100", "org/m", sweep=SMALL)
    _, rows = _read(next(p for p in paths if p.name == "mlp.csv"))
    assert [float(rows[0][f"time_stats.add.{s}"]) for s in ("min", "max", "mean", "median", "std")] == pytest.approx([1.0, 4.0, 2.5, 2.0, 0.5])


def test_a_failing_predictor_leaves_nothing_half_written(tmp_path):
    calls = []

    def predict(op, point):
        calls.append(op)
        if op == "attn_decode":
            raise DoolyError("no model for attn_decode")
        return 0.001

    with pytest.raises(DoolyError):
        export_vidur(predict, LLAMA_3_8B, tmp_path, "h100", "org/m", sweep=SMALL)
    assert "attn_decode" in calls
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with pytest.raises(DoolyError, match="finite"):
        export_vidur(lambda op, point: -1.0, LLAMA_3_8B, tmp_path, "h100", "org/m", sweep=SMALL)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
