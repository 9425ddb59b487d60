"""`dooly bench` on the real transformers continuous-batching engine (CPU, a tiny model), and the
ground truth it writes going through `dooly overhead` and `dooly validate`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from tiny_configs import TINY_LLAMA

from dooly.cli import cli
from dooly.workload import WorkloadSpec, generate_requests

WORKLOAD = ["--requests", "10", "--rate", "25", "--prompt-len", "uniform:8:48", "--output-len", "uniform:2:9", "--seed", "4"]
# Small cache and token budget: several prefill chunks and batched decodes in a few seconds.
SETTINGS = ["--set", "num_blocks=48", "--set", "block_size=16", "--set", "max_batch_tokens=64"]
# The engine adds a request within this long of its workload arrival time (open loop, CPU CI).
ARRIVAL_SLACK_S = 0.25


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    config = root / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = root / "gt"
    result = CliRunner().invoke(
        cli,
        ["bench", str(config), "--out", str(out), "--dtype", "float32", "--warmup-requests", "1", *SETTINGS, *WORKLOAD, "--output", "json"],
    )
    assert result.exit_code == 0, result.output
    return out


def _spec() -> WorkloadSpec:
    from dooly.workload import spec_from_options

    return spec_from_options(requests=10, rate=25.0, prompt_len="uniform:8:48", output_len="uniform:2:9", seed=4)


def test_every_request_generates_exactly_its_tokens_with_one_timestamp_each(bench_dir):
    requests = {r["request_id"]: r for r in pq.read_table(bench_dir / "requests.parquet").to_pylist()}
    planned = {r.request_id: r for r in generate_requests(_spec())}
    assert set(requests) == set(planned)
    for rid, row in requests.items():
        assert row["error"] == ""
        assert row["prompt_tokens"] == planned[rid].prompt_tokens
        assert row["output_tokens"] == planned[rid].output_tokens
        times = row["token_times_s"]
        assert len(times) == row["output_tokens"]
        assert times == sorted(times)
        assert row["arrived_at_s"] < row["first_token_s"] == times[0] <= row["finished_s"]


def test_arrivals_follow_the_workload_clock(bench_dir):
    requests = pq.read_table(bench_dir / "requests.parquet").to_pylist()
    planned = {r.request_id: r.arrival_s for r in generate_requests(_spec())}
    origin = min(r["arrived_at_s"] for r in requests) - min(planned.values())
    for row in requests:
        assert row["arrived_at_s"] - origin == pytest.approx(planned[row["request_id"]], abs=ARRIVAL_SLACK_S)


def test_steps_account_for_every_prompt_and_generated_token(bench_dir):
    requests = pq.read_table(bench_dir / "requests.parquet").to_pylist()
    steps = pq.read_table(bench_dir / "steps.parquet").to_pylist()
    prefill_tokens = sum(chunk["q"] for step in steps for chunk in step["prefill"])
    decodes = sum(len(step["decode_ctx"]) for step in steps)
    assert prefill_tokens == sum(r["prompt_tokens"] for r in requests)
    # The first token comes from the last prefill chunk; every later token is one decode.
    assert decodes == sum(r["output_tokens"] - 1 for r in requests)
    starts = [s["start_s"] for s in steps]
    assert starts == sorted(starts)
    for step in steps:
        tokens = sum(c["q"] for c in step["prefill"]) + len(step["decode_ctx"])
        assert 0 < tokens <= 64
        assert step["duration_s"] >= step["prepare_s"] + step["update_s"] > 0
        assert step["device_s"] is None  # CPU run: no CUDA events
        assert 0.0 <= step["gc_s"] <= step["duration_s"]


def test_the_gc_clock_counts_collections_while_installed_only():
    import gc

    from dooly.engines.transformers_bench import GcClock

    clock = GcClock()
    garbage = [[index] for index in range(200_000)]
    del garbage
    gc.collect()
    counted = clock.seconds
    assert counted > 0.0
    clock.stop()
    gc.collect()
    assert clock.seconds == counted


def test_engine_settings_and_provenance_are_recorded(bench_dir):
    engine = json.loads((bench_dir / "engine.json").read_text())
    assert engine["num_blocks"] == 48 and engine["block_size"] == 16 and engine["max_batch_tokens"] == 64
    assert engine["use_cuda_graph"] == [False, False]
    bench = json.loads((bench_dir / "bench.json").read_text())
    assert bench["schema"] == "dooly.ground_truth/1"
    assert bench["engine"] == "transformers" and bench["backend"] == "paged|sdpa"
    assert bench["stack"]["engine_version"] == "5.17.0"
    assert bench["summary"]["finished"] == 10
    host = bench["host"]
    assert host["cpu"] and host["logical_cpus"] >= 1 and host["python"].count(".") == 2
    assert host["list_probe_s"] > 0.0
    assert WorkloadSpec.from_dict(bench["workload"]).num_requests == 10


def test_overhead_then_validate_on_the_recorded_run(bench_dir, tmp_path):
    runner = CliRunner()
    overhead = tmp_path / "overhead.json"
    result = runner.invoke(
        cli, ["overhead", "--analytic", str(bench_dir.parent / "config.json"), "--ground-truth", str(bench_dir), "--out", str(overhead), "--output", "json"]
    )
    assert result.exit_code == 0, result.output
    fitted = json.loads(overhead.read_text())
    assert fitted["schema"] == "dooly.cpu_overhead/1" and "default" in fitted["terms"]
    result = runner.invoke(
        cli,
        ["validate", str(bench_dir.parent / "config.json"), "--analytic", "--ground-truth", str(bench_dir), "--cpu-overhead", str(overhead), "--output", "json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["requests"]["ttft"]["n"] == 10 and report["requests"]["unmatched_requests"] == 0
    steps = pq.read_table(bench_dir / "steps.parquet").num_rows
    assert report["steps"]["n"] == steps
    # The recorded engine settings drove the re-simulation.
    assert report["simulation"]["settings"]["num_blocks"] == 48


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attention", "flex_attention"], "runs paged|sdpa, paged|eager"),
        (["--attention", "paged|flex_attention"], "the engine cannot run paged|flex_attention: profile only"),
        (["--set", "no_such_setting=1"], "engine settings rejected"),
        (["--requests", "0"], "num_requests must be >= 1"),
        (["--warm-passes", "-1"], "--warm-passes must be >= 0"),
        (["--engine", "vllm", "--warm-passes", "1"], "applies to the transformers engine"),
        (["meta-llama/Llama-3.2-1B"], "2 MODELs given: pick one with --model-index N"),
        (["meta-llama/Llama-3.2-1B", "--model-index", "-1"], "--model-index"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, extra, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "gt"
    result = CliRunner().invoke(cli, ["bench", str(config), "--out", str(out), "--requests", "2", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_several_models_serve_the_one_at_the_model_index_modulo_their_count():
    """A fleet's shard pods pass their completion index: shard i serves models[i % n]."""
    from dooly.engines.commands import choose_model

    models = ("a", "b", "c")
    assert [choose_model(models, i) for i in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert choose_model(("a",), None) == choose_model(("a",), 5) == "a"


def _bench_tiny(tmp_path: Path, *args: str) -> Path:
    """`dooly bench` of the tiny Llama on the CPU, no warm-up requests; ARGS add the workload and
    settings. Returns the output directory."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "gt"
    result = CliRunner().invoke(
        cli, ["bench", str(config), "--out", str(out), "--dtype", "float32", "--warmup-requests", "0", *args,
              "--output", "json"],
    )
    assert result.exit_code == 0, result.output
    return out


def test_a_warm_pass_serves_the_workload_unrecorded_first(tmp_path):
    workload = ["--requests", "3", "--rate", "50", "--prompt-len", "16", "--output-len", "3", "--seed", "1"]
    out = _bench_tiny(tmp_path, "--warm-passes", "1", *SETTINGS, *workload)
    requests = pq.read_table(out / "requests.parquet").to_pylist()
    assert sorted(r["request_id"] for r in requests) == ["r0", "r1", "r2"]
    steps = pq.read_table(out / "steps.parquet").to_pylist()
    # Only the recorded pass: its 48 prompt tokens and 3 x 2 decodes, not the warm pass's too.
    assert sum(c["q"] for s in steps for c in s["prefill"]) == 48
    assert sum(len(s["decode_ctx"]) for s in steps) == 6
    assert json.loads((out / "bench.json").read_text())["warm_passes"] == 1


def test_a_cpu_run_bounds_an_unset_token_budget_by_its_cache(tmp_path):
    """transformers would size an unset max_batch_tokens from the host's memory (tens of GB of IO
    buffers for a tiny model): on the CPU the cache's slots bound it instead."""
    from dooly.engines.transformers_bench import CPU_MAX_BATCH_TOKENS, cpu_settings

    workload = ["--requests", "2", "--rate", "50", "--prompt-len", "8", "--output-len", "2", "--seed", "1"]
    out = _bench_tiny(tmp_path, "--set", "num_blocks=16", "--set", "block_size=16", *workload)
    assert json.loads((out / "engine.json").read_text())["max_batch_tokens"] == 16 * 16
    assert cpu_settings({"max_batch_tokens": 64, "num_blocks": 16}, 256)["max_batch_tokens"] == 64
    assert cpu_settings({"num_blocks": 4}, 256)["max_batch_tokens"] == 4 * 256
    assert cpu_settings({}, 256)["max_batch_tokens"] == CPU_MAX_BATCH_TOKENS
