"""`dooly demo` and `dooly fleet submit --executor local`: the same Job manifests, run here.

The demo's orchestration is tested with a stand-in `dooly` program (tests/fleet/fake_dooly.py) that
takes the real arguments and leaves real files behind, so the ordering (profile shards, then merge,
then fit, then simulate) and the summing of the pods' figures are checked on real processes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.fleet import commands, jobs
from dooly.fleet.demo import ProfileTotals, demo_spec, metric_columns, run_demo
from dooly.fleet.executor import LocalExecutor
from dooly.fleet.spec import FleetSpec

FAKE_DOOLY = Path(__file__).with_name("fake_dooly.py")
RUN_ID = "20250101-020000"
SHARDS = 3
PLATFORM = "Test-CPU-9000"


def _executor() -> LocalExecutor:
    return LocalExecutor(programs={"dooly": [sys.executable, str(FAKE_DOOLY)]})


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_DOOLY")}
    return {**env, **extra}


def test_demo_profiles_shards_merges_fits_and_simulates(tmp_path, capsys):
    store = tmp_path / "db"
    spec = demo_spec(str(store), shards=SHARDS)
    backends = sorted({t.backend for t in spec.targets()})
    assert len(spec.models) == 3 and len(backends) == 2

    report = run_demo(spec, executor=_executor(), env=_env(), run_id=RUN_ID, platform=PLATFORM)
    assert report.failed is None
    assert len(report.jobs) == len(backends) + 1 + len(backends) * len(spec.models)
    profile_jobs = report.jobs[: len(backends)]
    assert all(len(job.pods) == SHARDS for job in profile_jobs)
    assert sorted(p.name for p in (store / "shards").iterdir()) == sorted(
        f"{b.replace('|', '_')}-{i}-of-{SHARDS}.json" for b in backends for i in range(SHARDS)
    )
    # The stand-in prints, for shard i, 1+i device-s and 3+2i baseline device-s, and for the Job's
    # plan 5+k profiled and 2k reused signatures for the k-th model.
    models = range(len(spec.models))
    per_backend = {
        "profiled": sum(5 + k for k in models),
        "reused": sum(2 * k for k in models),
        "device": sum(1.0 + i for i in range(SHARDS)),
        "baseline": sum(3.0 + 2 * i for i in range(SHARDS)),
    }
    totals = report.totals
    assert totals.profiled_signatures == len(backends) * per_backend["profiled"]
    assert totals.reused_signatures == len(backends) * per_backend["reused"]
    assert totals.device_seconds == pytest.approx(len(backends) * per_backend["device"])
    assert totals.baseline_device_seconds == pytest.approx(len(backends) * per_backend["baseline"])
    saved = len(backends) * (per_backend["baseline"] - per_backend["device"])
    assert totals.saved_seconds == pytest.approx(saved)

    pairs = sorted((s.model, s.backend) for s in report.simulations)
    assert pairs == sorted((m, b) for m in spec.models for b in backends)
    assert {s.result["platform"] for s in report.simulations} == {PLATFORM}
    assert all(s.result["metrics"]["ttft_s_p50"] == pytest.approx(0.1 * len(backends) * SHARDS) for s in report.simulations)
    assert metric_columns(report.simulations) == ["metrics.ttft_s_p50", "metrics.tpot_s_p50"]
    json.dumps(report.to_json())

    commands._print_demo(report)
    printed = capsys.readouterr().out
    fraction = 100 * saved / (len(backends) * per_backend["baseline"])
    assert f"saved {saved:.1f} ({fraction:.1f}%) by reuse" in printed
    assert all(model in printed for model in spec.models)


def test_demo_stops_at_the_first_failed_job(tmp_path):
    spec = demo_spec(str(tmp_path / "db"), shards=1, backends=["paged|sdpa"])
    report = run_demo(spec, executor=_executor(), env=_env(FAKE_DOOLY_FAIL_FIT="1"), run_id=RUN_ID, platform=PLATFORM)
    assert report.failed is not None and report.failed.name == f"dooly-{RUN_ID}-merge"
    assert report.simulations == []
    assert "no rows for op class" in report.failed.pods[-1].stderr["fit"]
    assert (tmp_path / "db" / "snapshot.json").exists()


def test_demo_manifests_come_from_the_render_builders(tmp_path):
    spec = demo_spec(str(tmp_path / "db"))
    profile = jobs.build_profile_jobs(spec, run_id=RUN_ID)
    assert all(j["spec"]["completionMode"] == "Indexed" for j in profile)
    assert all("nodeSelector" not in j["spec"]["template"]["spec"] for j in profile)
    args = profile[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--store") + 1] == str(tmp_path / "db")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--shards", "0"], "--shards must be"),
        (["demo", "--backend", "flash"], "unknown backend 'flash'"),
        (["demo", "--model", "acme/none"], "unknown model"),
        (["fleet", "submit", "--store", "./db"], "pick one GPU type with --gpu"),
    ],
)
def test_local_runs_refuse_bad_input_with_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_local_submit_needs_the_s3_secret_before_running_anything(small_fleet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(cli, ["fleet", "submit", "--fleet", str(small_fleet), "--gpu", "h100"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: container profile: env AWS_ACCESS_KEY_ID needs key 'AWS_ACCESS_KEY_ID' of Secret 'dooly-s3': "
        "set the environment variable AWS_ACCESS_KEY_ID or give a secrets file"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]


def test_profile_totals_without_a_per_model_plan_add_the_pods_counts():
    totals = ProfileTotals()
    totals.add_job([
        {"profiled_signatures": 4, "reused_signatures": [1, 2], "device_seconds": 2.0, "baseline_device_seconds": 5.0},
        {"profiled_signatures": 3, "reused_signatures": 0, "device_seconds": 1.0, "baseline_device_seconds": 1.0},
    ])
    assert (totals.profiled_signatures, totals.reused_signatures, totals.pods) == (7, 2, 2)
    assert totals.saved_seconds == pytest.approx(3.0) and totals.saved_fraction == pytest.approx(0.5)
    assert ProfileTotals().saved_fraction == 0.0


def test_local_submit_runs_the_real_commands_and_reports_a_failed_job(small_fleet, tmp_path, monkeypatch):
    """The real `dooly profile` in a GPU pool's pod refuses to measure a machine without a GPU:
    the FailJob rule stops the Job at once, the merge still runs (and finds nothing), exit 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    store = tmp_path / "db"
    result = CliRunner().invoke(
        cli, ["fleet", "submit", "--fleet", str(small_fleet), "--gpu", "h100", "--backend", "paged|sdpa",
              "--store", str(store), "--run-id", RUN_ID, "--output", "json"]
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [(j["name"], j["reason"]) for j in report["jobs"]] == [
        (f"dooly-{RUN_ID}-h100-transformers-paged-sdpa", "PodFailurePolicy"),
        (f"dooly-{RUN_ID}-merge", "PodFailurePolicy"),
    ]
    assert "no CUDA device is visible" in report["jobs"][0]["error"]
    assert "no CUDA device is visible" in result.stderr


def test_local_gpu_pods_record_a_calibration_run_of_their_shards_model(small_fleet, tmp_path):
    """Run locally, as in the cluster: shard i benches models[i % len(models)] in its own /tmp (an
    emptyDir: pods side by side never share a run directory) and records that run in the store."""
    models = ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B")
    small_fleet.write_text(small_fleet.read_text().replace("completions: 3", "completions: 4"))
    store = tmp_path / "db"
    spec = FleetSpec.load(small_fleet, store=str(store)).select(gpus=["h100"], backends=["paged|sdpa"], models=models)
    [job] = jobs.build_profile_jobs(spec, run_id=RUN_ID)
    assert job["spec"]["parallelism"] == 2
    result = _executor().run_job(job, env=_env())
    assert result.succeeded, [p.stderr for p in result.pods]
    runs = [json.loads(p.read_text()) for p in (store / "calibration-runs").glob("*/bench.json")]
    assert sorted(int(r["shard"]) for r in runs) == [0, 1, 2, 3]
    by_shard = {int(r["shard"]): r for r in runs}
    assert [by_shard[i]["model"] for i in range(4)] == [models[0], models[1], models[2], models[0]]
    outs = {r["out"] for r in runs}
    assert len(outs) == 4 and jobs.CALIBRATION_DIR not in outs
