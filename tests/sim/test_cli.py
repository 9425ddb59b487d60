"""`dooly simulate`, `dooly validate` and `dooly export vidur` through the CLI."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dooly.cli import cli

MODEL = "meta-llama/Llama-3.1-8B"


def _run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _json(*args):
    result = _run(*args, "--output", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_simulate_inline_workload_json():
    summary = _json("simulate", "--analytic", "--requests", "40", "--rate", "8", "--prompt-len", "uniform:32:512", "--output-len", "zipf:1:64")
    assert summary["num_requests"] == summary["num_finished"] == 40
    assert summary["workload"]["prompt"] == {"kind": "uniform", "low": 32, "high": 512}
    assert summary["settings"]["engine"] == "transformers"
    assert summary["ttft_s"]["p50"] > 0 and summary["throughput"]["requests_per_s"] > 0


def test_simulate_text_output_and_engine_settings():
    result = _run("simulate", MODEL, "--analytic", "--engine", "vllm", "--set", "max_num_seqs=4", "--requests", "10")
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.stdout and "engine: vllm" in result.stdout


def test_workload_file_gives_the_same_run_as_flags(tmp_path):
    spec = {"schema": "dooly.workload/1", "num_requests": 25, "arrival": "gamma", "rate": 4.0, "cv": 2.0,
            "prompt": {"kind": "fixed", "value": 300}, "output": {"kind": "fixed", "value": 20}, "seed": 11}
    (tmp_path / "w.json").write_text(json.dumps(spec))
    from_file = _json("simulate", "--analytic", "--workload", str(tmp_path / "w.json"))
    from_flags = _json("simulate", "--analytic", "--requests", "25", "--arrival", "gamma", "--rate", "4", "--cv", "2",
                       "--prompt-len", "300", "--output-len", "20", "--seed", "11")
    assert from_file["ttft_s"] == from_flags["ttft_s"]
    assert from_file["workload"] == from_flags["workload"]


def test_simulate_writes_results_and_plots(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,100,5\n0.1,200,8\n0.3,50,3\n")
    out, plots = tmp_path / "out", tmp_path / "plots"
    summary = _json("simulate", "--analytic", "--trace", str(trace), "--out", str(out), "--plot", str(plots))
    assert sorted(p.name for p in out.iterdir()) == ["requests.parquet", "steps.parquet", "summary.json", "workload.json"]
    assert pq.read_table(out / "requests.parquet").num_rows == 3
    assert pq.read_table(out / "steps.parquet").num_rows == summary["steps"]["count"]
    assert sorted(p.name for p in plots.iterdir()) == ["batch_size.png", "e2e_cdf.png", "tpot_cdf.png", "ttft_cdf.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["simulate", "--analytic", "--set", "bogus=1"], "unknown key"),
        (["simulate", "--analytic", "--prompt-len", "normal:1:2"], "--prompt-len"),
        (["simulate", "--analytic", "--store", "./db"], "exactly one"),
        (["simulate", MODEL, "--store", "./db"], "--platform"),
        (["simulate", "acme/NoSuchModel", "--analytic"], "unknown model"),
        (["simulate", "--analytic", "--workload", "/nonexistent/w.json"], "does not exist"),
        (["simulate", "--analytic", "--set", "num_blocks=1", "--prompt-len", "4000"], "too small"),
        (["validate", MODEL, "--ground-truth", "/nonexistent", "--analytic"], "requests.parquet"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message):
    result = _run(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_validate_against_ground_truth_from_the_same_model(tmp_path):
    from dooly.sim.schedulers import VllmScheduler
    from dooly.sim.simulator import simulate
    from dooly.sim.step_model import AnalyticStepModel, ModelDims
    from dooly.workload import LengthSpec, WorkloadSpec, generate_requests

    config = json.loads((_configs() / "meta-llama__Llama-3.1-8B.json").read_text())
    model = AnalyticStepModel(dims=ModelDims.from_config(config))
    workload = generate_requests(WorkloadSpec(num_requests=30, rate=6.0, prompt=LengthSpec("uniform", low=20, high=900), seed=9))
    result = simulate(workload, VllmScheduler({"max_num_seqs": 8}), model, record_token_times=True, record_batches=True)
    requests, steps = _bench_tables(result)
    truth = tmp_path / "truth"
    truth.mkdir()
    pq.write_table(requests, truth / "requests.parquet")
    pq.write_table(steps, truth / "steps.parquet")
    report = _json("validate", MODEL, "--ground-truth", str(truth), "--analytic", "--engine", "vllm",
                   "--set", "max_num_seqs=8", "--plot", str(tmp_path / "scatter.png"))
    assert report["requests"]["ttft"]["n"] == 30
    assert report["requests"]["ttft"]["mape"] == pytest.approx(0.0, abs=1e-6)
    assert report["requests"]["tpot"]["mape"] == pytest.approx(0.0, abs=1e-6)
    # Replayed on the paths the engine settings imply (CUDA graph, padding): the same durations.
    assert report["steps"]["n"] == result.num_steps
    assert report["steps"]["mape"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "scatter.png").exists()
    # Other engine settings, other batches: the request errors show it.
    other = _json("validate", MODEL, "--ground-truth", str(truth), "--analytic", "--engine", "vllm", "--set", "max_num_seqs=1")
    assert other["requests"]["ttft"]["mape"] > 10


def test_export_vidur(tmp_path):
    report = _json("export", "vidur", MODEL, "--analytic", "--device", "h100", "--out", str(tmp_path),
                   "--max-tokens", "256", "--max-seq-len", "256", "--max-batch-size", "4")
    base = tmp_path / "data" / "profiling" / "compute" / "h100" / "meta-llama" / "Llama-3.1-8B"
    assert sorted(report["files"]) == sorted([str(base / "attention.csv"), str(base / "mlp.csv"), str(base / "dooly_export.json")])
    assert report["attention_backend"] == "AttentionBackend.FLASHINFER" and report["source"].startswith("analytic")
    result = _run("export", "vidur", MODEL, "--analytic", "--device", "h1/00", "--out", str(tmp_path))
    assert result.exit_code == 2 and "one path segment" in result.stderr


def _configs():
    from importlib import resources

    return resources.files("dooly.models").joinpath("configs")


def _bench_tables(result):
    """The simulation written in `dooly bench`'s ground-truth schema."""
    records = result.requests
    requests = pa.table({
        "request_id": [r.request_id for r in records],
        "arrived_at_s": [r.arrival_s for r in records],
        "first_token_s": [r.first_token_s for r in records],
        "finished_s": [r.finish_s for r in records],
        "prompt_tokens": [r.prompt_tokens for r in records],
        "output_tokens": [r.output_tokens for r in records],
        "token_times_s": [result.token_times[r.request_id] for r in records],
    })
    steps = result.steps
    prefill_type = pa.list_(pa.struct([("q", pa.int64()), ("ctx", pa.int64())]))
    step_table = pa.table({
        "step": [s.step for s in steps],
        "start_s": [s.start_s for s in steps],
        "duration_s": [s.duration_s for s in steps],
        "prefill": pa.array([[{"q": q, "ctx": c} for q, c in prefill] for prefill, _ in result.batches], type=prefill_type),
        "decode_ctx": pa.array([decode for _, decode in result.batches], type=pa.list_(pa.int64())),
    })
    return requests, step_table
