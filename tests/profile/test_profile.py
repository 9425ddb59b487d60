"""Differential profiling on the CPU: only what is missing is measured, and nothing is lost or doubled."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from profile_helpers import SMALL_GRID_ARGS

from dooly.cli import cli
from dooly.profile.grid import GridSpec
from dooly.profile.measure import (
    DEFAULT_SAMPLES_CUDA,
    ERROR_CHARS,
    LONG_SAMPLE_S,
    PHASE_FAILED,
    PHASES,
    SETTLED_SAMPLES,
    SETTLED_SPREAD,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OOM,
    WARMUP_CALLS,
    Timer,
)
from dooly.profile.plan import build_plan
from dooly.profile.provenance import Stack
from dooly.store.backends import open_store
from dooly.store.shards import SHARD_SUFFIX
from dooly.trace.schema import signature_hash
from dooly.trace.tracer import trace_model

_SMALL_GRID_FIELDS: dict[str, Any] = {name.strip("-").replace("-", "_"): int(value)
                                      for name, value in zip(SMALL_GRID_ARGS[::2], SMALL_GRID_ARGS[1::2])}
SMALL_GRID = GridSpec(**_SMALL_GRID_FIELDS)


def stack_of(row: dict) -> Stack:
    """The stack a stored row was measured on, with the attention backend of the run."""
    fields = {name: row[name] for name in Stack.__dataclass_fields__}
    return Stack(**{**fields, "backend": "paged|sdpa"})

PROFILED = ("kernel", "attention")


def run_cli(*args: str) -> tuple[int, dict | str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    if "--output" in args and result.exit_code == 0:
        return result.exit_code, json.loads(result.stdout)
    return result.exit_code, result.output


def profile(store: Path, *models: str) -> dict:
    code, payload = run_cli("profile", *models, "--store", str(store), *SMALL_GRID_ARGS, "--output", "json")
    assert code == 0 and isinstance(payload, dict), payload
    return payload


def shard_rows(store: Path) -> pa.Table:
    files = sorted(store.rglob(f"*{SHARD_SUFFIX}"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def test_second_model_measures_only_its_new_signatures(tmp_path, models):
    model_a, model_b = models
    store = tmp_path / "db"
    first = profile(store, model_a)
    assert first["profiled_signatures"] > 0 and first["reused_signatures"] == 0
    assert first["error_points"] == 0
    # Every measured second is charged to one phase of the timer, and the timed samples are one of them.
    phases = first["device_seconds_by_phase"]
    assert set(phases) <= set(PHASES) and phases["samples"] > 0 and phases["build"] > 0
    assert sum(phases.values()) == pytest.approx(first["device_seconds"], rel=0.02)

    sigs_a = set(trace_model(model_a).signatures(PROFILED))
    sigs_b = set(trace_model(model_b).signatures(PROFILED))
    expected_new = sigs_b - sigs_a
    assert expected_new and sigs_a & sigs_b  # the configs share attention and projections

    second = profile(store, model_a, model_b)
    measured = {row["signature"] for row in shard_rows(store).to_pylist() if row["run_id"] == second["run_id"]}
    assert measured == expected_new
    assert second["profiled_signatures"] == len(expected_new)
    per_model = {Path(m["model"]).name: m for m in second["models"]}
    assert per_model["model-a"]["profiled_signatures"] == 0
    assert per_model["model-b"]["reused_signatures"] == len(sigs_a & sigs_b)
    # The paper's baseline: each model alone from an empty store costs more than this run did.
    assert second["baseline_device_seconds"] > second["device_seconds"] + first["device_seconds"] * 0.5

    third = profile(store, model_a, model_b)
    assert third["profiled_signatures"] == 0 and third["measured_points"] == 0 and third["shards"] == []


def test_rows_carry_provenance_and_points_are_unique(tmp_path, models):
    store = tmp_path / "db"
    profile(store, models[0])
    table = shard_rows(store)
    rows = table.to_pylist()
    assert {r["platform"] for r in rows} and all(r["torch_version"] == torch.__version__ for r in rows)
    assert {r["backend"] for r in rows} == {"any", "paged|sdpa"}
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["latency_p10_s"] <= r["latency_median_s"] <= r["latency_p90_s"] for r in rows)
    keys = [(r["signature"], r["point_key"]) for r in rows]
    assert len(keys) == len(set(keys))
    attention = [r for r in rows if r["op"] == "attention"]
    phases = {r["phase"] for r in attention}
    assert phases == {"prefill", "decode", "mixed"}
    lengths = [json.loads(r["point_key"])["seqs"] for r in attention if r["phase"] == "decode" and r["B"] > 1]
    assert any(len({ctx for _, ctx in seqs}) > 1 for seqs in lengths)  # non-uniform contexts


def test_another_software_stack_is_not_reused(tmp_path, models):
    store_dir = tmp_path / "db"
    profile(store_dir, models[0])
    for path in store_dir.rglob(f"*{SHARD_SUFFIX}"):
        table = pq.read_table(path)
        index = table.schema.get_field_index("torch_version")
        table = table.set_column(index, table.schema.field(index), pa.array(["1.0.0"] * table.num_rows))
        pq.write_table(table, path)
    code, plan = run_cli("plan", models[0], "--store", str(store_dir), *SMALL_GRID_ARGS, "--output", "json")
    assert code == 0
    assert plan["missing_signatures"] == plan["signatures"] and plan["stale_signatures"] == plan["signatures"]


def test_killed_run_resumes_without_losing_or_doubling_rows(tmp_path, models):
    store = tmp_path / "db"
    command = [sys.executable, "-m", "dooly.cli", "profile", models[1], "--store", str(store), *SMALL_GRID_ARGS,
               "--chunk-rows", "20", "--samples", "3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(store.rglob(f"*{SHARD_SUFFIX}"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    flushed = shard_rows(store)
    assert flushed is not None and flushed.num_rows > 0

    resumed = profile(store, models[1])
    total = shard_rows(store).to_pylist()
    keys = [(r["signature"], r["point_key"]) for r in total]
    assert len(keys) == len(set(keys)), "a point was measured twice"
    # Every point of the sweep is there (refinement may add others, depending on what it measured).
    plan = build_plan([trace_model(models[1])], open_store(str(tmp_path / "empty")), stack_of(total[0]), SMALL_GRID)
    expected = {(sig, p.key) for sig, item in plan.items.items() for p in item.points}
    assert expected and expected <= set(keys), "a point was lost"
    # The rerun measured only the sweep points the killed run had not flushed. (Counting every
    # measured point instead would count refinement points, which depend on CPU timing noise.)
    remeasured = {(r["signature"], r["point_key"]) for r in total if r["run_id"] == resumed["run_id"]} & expected
    flushed_keys = {(r["signature"], r["point_key"]) for r in flushed.to_pylist()}
    assert flushed_keys & expected and remeasured == expected - flushed_keys


def test_signature_hash_is_stable():
    payload = {"op": "aten.mm.default", "backend": "", "inputs": [["bfloat16", ["T", 4096]],
               ["bfloat16", [4096, 14336]]], "scalars": {}, "layout": "t.t"}
    assert signature_hash(payload) == signature_hash(dict(reversed(payload.items())))
    # Pinned: a change here silently orphans every database already built, so it must be deliberate.
    assert signature_hash(payload) == "c5061b4f10cc8193fc179c89bafe3097"


def test_signatures_agree_across_processes(models):
    code = ("import sys, json; from dooly.trace.tracer import trace_model; "
            "print(json.dumps(sorted(trace_model(sys.argv[1]).signatures())))")
    outputs = [subprocess.run([sys.executable, "-c", code, models[0]], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outputs[0] == outputs[1] and json.loads(outputs[0])


def test_out_of_memory_is_a_result():
    def build():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    timer = Timer("cpu", samples=2)
    measurement = timer.measure(build)
    assert measurement.status == STATUS_OOM and measurement.median_s is None
    assert set(timer.phase_seconds) == {PHASE_FAILED}


def test_a_failed_measurement_keeps_its_type_and_message_cut_to_error_chars():
    def build():
        raise RuntimeError("no kernel for this shape\n" + "x" * 2 * ERROR_CHARS)

    measurement = Timer("cpu", samples=2).measure(build)
    assert measurement.status == STATUS_ERROR and measurement.median_s is None
    assert measurement.error.startswith("RuntimeError: no kernel for this shape\nxxx")
    assert len(measurement.error) == ERROR_CHARS


def test_long_calls_are_sampled_until_they_settle_unless_a_count_was_asked_for():
    """A 20 ms call whose first samples run 13% slow (the H100 after an idle gap): the budgeted
    timer keeps the settled five; a short call, or an explicit count, takes every sample."""
    def sampler(values):
        stream = iter(values)
        return lambda: next(stream)

    slow, settled = 0.0225, 0.0199
    ramp = [slow, slow, 0.0218] + [settled * (1 + 0.001 * (i % 2)) for i in range(20)]
    budgeted, explicit = Timer("cuda"), Timer("cuda", samples=DEFAULT_SAMPLES_CUDA)
    values = budgeted.take_samples(sampler(ramp), slow)
    assert len(values) == SETTLED_SAMPLES and max(values) <= settled * (1 + SETTLED_SPREAD)
    assert len(explicit.take_samples(sampler(ramp), slow)) == DEFAULT_SAMPLES_CUDA
    assert len(budgeted.take_samples(sampler(ramp), LONG_SAMPLE_S / 2)) == DEFAULT_SAMPLES_CUDA
    # Never settling: every sample is kept, as without the rule.
    noisy = [settled * (1 + 0.05 * (i % 2)) for i in range(DEFAULT_SAMPLES_CUDA)]
    assert budgeted.take_samples(sampler(noisy), settled) == noisy


def test_a_long_call_is_warmed_up_once_when_the_timer_is_budgeted():
    """A call of 2x LONG_SAMPLE_S: one warm-up call instead of WARMUP_CALLS."""
    def calls_made(timer: Timer) -> int:
        count = 0

        def call() -> None:
            nonlocal count
            count += 1
            time.sleep(2 * LONG_SAMPLE_S)

        measurement = timer.measure(lambda: call)
        assert measurement.status == STATUS_OK and measurement.median_s is not None
        assert measurement.median_s >= 2 * LONG_SAMPLE_S
        return count

    # The CPU's default count equals SETTLED_SAMPLES: both timers take that many samples.
    budgeted = calls_made(Timer("cpu"))
    explicit = calls_made(Timer("cpu", samples=SETTLED_SAMPLES))
    assert explicit - budgeted == WARMUP_CALLS - 1


def test_bad_inputs_exit_2_and_leave_nothing(tmp_path, models):
    store = tmp_path / "db"
    code, output = run_cli("profile", models[0], "--store", str(store), "--platform", "NVIDIA-H100-80GB-HBM3")
    assert code == 2 and "unknown platform" in output
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                  "hidden_size": 64, "num_attention_heads": 0}))
    code, output = run_cli("profile", models[0], str(broken), "--store", str(store), *SMALL_GRID_ARGS)
    assert code == 2 and output.count("\n") == 1
    assert not list(store.rglob(f"*{SHARD_SUFFIX}")) and not list(store.rglob("inventories/*"))
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("occupied")
    code, output = run_cli("profile", models[0], "--store", str(not_a_directory / "db"), *SMALL_GRID_ARGS)
    assert code == 2 and output.startswith("error:")
    code, output = run_cli("profile", models[0], "--store", "s3://bucket/db", "--endpoint-url", "http://127.0.0.1:9",
                           *SMALL_GRID_ARGS)
    assert code == 2 and "127.0.0.1:9" in output


def test_refinement_measures_around_a_kink(models):
    from dooly.profile.grid import LADDER, refinement_points
    from dooly.profile.provenance import SHARED_BACKEND

    trace = trace_model(models[0])
    op = next(o for o in trace.operations if o.op == "aten.mm.default" and o.request_vars() == ["T"])
    ladder = [t for t in LADDER if t <= 256]

    def latency(t: int) -> float:  # linear in T, with a kernel switch between 24 and 32 tokens
        return 1e-6 * t + (5e-6 if t >= 32 else 0.0) + 1e-6

    rows = [{"T": t, "latency_median_s": latency(t), "status": "ok"} for t in ladder]
    extra = [dict(p.values)["T"] for p in refinement_points(op, rows)]
    assert extra and all(16 <= t <= 48 for t in extra)
    assert any(24 < t < 32 for t in extra)  # the midpoint that lands on the switch
    smooth = [{"T": t, "latency_median_s": 1e-6 * t + 1e-6, "status": "ok"} for t in ladder]
    assert refinement_points(op, smooth) == []
    assert SHARED_BACKEND == __import__("dooly.fit.persist", fromlist=["SHARED_BACKEND"]).SHARED_BACKEND


FLEX = "paged|flex_attention"


def test_flex_attention_profiles_its_attention_only_and_fits(tmp_path, models):
    """The profile-only backend on a store that holds the model's paged|sdpa profile: only its
    attention is measured (at the same batch compositions), and the store then fits, predicts and
    simulates it like any backend."""
    model_a = models[0]
    store = tmp_path / "db"
    sdpa = profile(store, model_a)
    code, flex = run_cli("profile", model_a, "--store", str(store), "--attention", FLEX, *SMALL_GRID_ARGS,
                         "--output", "json")
    assert code == 0, flex
    trace = trace_model(model_a, backend=FLEX)
    attention = set(trace.signatures(("attention",)))
    assert flex["backend"] == FLEX and flex["error_points"] == 0
    assert flex["profiled_signatures"] == len(attention)
    assert flex["reused_signatures"] == len(trace.signatures(PROFILED)) - len(attention)
    rows = shard_rows(store).to_pylist()
    flex_rows = [r for r in rows if r["run_id"] == flex["run_id"]]
    assert {(r["op"], r["backend"], r["status"]) for r in flex_rows} == {("attention", FLEX, "ok")}
    assert {r["signature"] for r in flex_rows} == attention
    sdpa_points = {r["point_key"] for r in rows if r["run_id"] == sdpa["run_id"] and r["op"] == "attention"}
    assert {r["point_key"] for r in flex_rows} == sdpa_points
    assert all(r["device_seconds"] > 0 for r in flex_rows)

    assert run_cli("merge", "--store", str(store))[0] == 0
    assert run_cli("fit", "--store", str(store), "--folds", "2", "--repeats", "1")[0] == 0
    platform = flex_rows[0]["platform"]
    fitted = ["--store", str(store), "--platform", platform, "--backend", FLEX]
    code, step = run_cli("predict", "--model", "model-a", *fitted, "--prefill", "8:0", "--decode", "100",
                         "--output", "json")
    assert code == 0, step
    assert step["backend"] == FLEX and step["breakdown_seconds"][f"attention:{FLEX}"] > 0
    code, served = run_cli("simulate", "model-a", *fitted, "--requests", "8", "--rate", "4", "--prompt-len", "32",
                           "--output-len", "4", "--set", "num_blocks=16", "--no-cpu-overhead", "--output", "json")
    assert code == 0, served
    assert served["num_finished"] == 8


def test_a_token_budget_adds_only_the_points_that_fill_it(tmp_path, models):
    """An engine serving at a budget past the grid's sweep runs steps of exactly that many query
    tokens: `--token-budget` measures them (attention filling it, the sweep raised to it) and only
    them on a store that holds the rest."""
    store = tmp_path / "db"
    profile(store, models[0])
    budget = 24  # past SMALL_GRID_ARGS' 16 tokens
    code, plan = run_cli("plan", models[0], "--store", str(store), *SMALL_GRID_ARGS, "--token-budget", str(budget),
                         "--output", "json")
    assert code == 0 and isinstance(plan, dict) and plan["missing_points"] > 0
    code, payload = run_cli("profile", models[0], "--store", str(store), *SMALL_GRID_ARGS, "--token-budget", str(budget),
                            "--output", "json")
    assert code == 0 and isinstance(payload, dict)
    new = [r for r in shard_rows(store).to_pylist() if r["run_id"] == payload["run_id"]]
    assert new and all(r["T"] is None or r["T"] > SMALL_GRID.max_tokens // 2 for r in new)
    filled = [r for r in new if r["op"] == "attention" and r["phase"] == "mixed" and r["T"] == budget]
    assert filled, "no mixed attention point fills the budget"
    assert max(r["T"] for r in new if r["T"] is not None) == budget
    code, again = run_cli("plan", models[0], "--store", str(store), *SMALL_GRID_ARGS, "--token-budget", str(budget),
                          "--output", "json")
    assert code == 0 and isinstance(again, dict) and again["missing_points"] == 0
    code, output = run_cli("plan", models[0], "--store", str(store), "--token-budget", "0")
    assert code == 2 and "--token-budget must be >= 1" in output


def test_a_context_adds_only_the_attention_points_at_it(tmp_path, models):
    """Long prompts reach contexts past the grid's ladders, which --max-context only caps:
    `--context N` measures attention's chunked prefills, decodes and mixed batches at context N
    and nothing else on a store that holds the rest; plan shows the contexts as it does budgets."""
    from dooly.profile.grid import spread

    store = tmp_path / "db"
    profile(store, models[0])
    context = SMALL_GRID.max_context + SMALL_GRID.max_context // 4  # past --max-context; its decodes fit --max-kv
    code, plan = run_cli("plan", models[0], "--store", str(store), *SMALL_GRID_ARGS, "--context", str(context),
                         "--output", "json")
    assert code == 0 and isinstance(plan, dict) and plan["missing_points"] > 0 and plan["contexts"] == [context]
    code, text = run_cli("plan", models[0], "--store", str(store), *SMALL_GRID_ARGS, "--context", str(context),
                         "--token-budget", "24")
    assert code == 0 and f"token budgets 24, contexts {context}: " in str(text)
    code, payload = run_cli("profile", models[0], "--store", str(store), *SMALL_GRID_ARGS, "--context", str(context),
                            "--output", "json")
    assert code == 0 and isinstance(payload, dict)
    new = [r for r in shard_rows(store).to_pylist() if r["run_id"] == payload["run_id"]]
    assert new and all(r["op"] == "attention" for r in new)
    assert {r["phase"] for r in new} == {"prefill", "decode", "mixed"}
    for row in new:
        seqs = json.loads(row["point_key"])["seqs"]
        decodes = [ctx for query, ctx in seqs if query == 1]
        assert any(query > 1 and ctx == context for query, ctx in seqs) or decodes == spread(context, len(decodes)), seqs
    code, again = run_cli("plan", models[0], "--store", str(store), *SMALL_GRID_ARGS, "--context", str(context),
                          "--output", "json")
    assert code == 0 and isinstance(again, dict) and again["missing_points"] == 0
    code, output = run_cli("plan", models[0], "--store", str(store), "--context", "0")
    assert code == 2 and "--context must be >= 1" in output
