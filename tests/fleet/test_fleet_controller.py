"""submit / wait / status / logs against a fake Kubernetes API server on 127.0.0.1.

The kubernetes client is real and unpatched: it reads a kubeconfig the fixture writes and speaks
HTTP to the fake server, which stores the Jobs and lets the tests decide how they end.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.fleet import jobs
from dooly.fleet.controller import FleetController
from dooly.fleet.spec import FleetSpec

RUN_ID = "20250101-020000"
FAST_POLL = ["--poll", "0.05", "--timeout", "30"]


def _submit(small_fleet, kubeconfig, *extra, run_id=RUN_ID):
    args = ["fleet", "submit", "--executor", "kubernetes", "--fleet", str(small_fleet), "--kubeconfig",
            str(kubeconfig), "--run-id", run_id, *extra]
    return CliRunner().invoke(cli, args)


def test_submit_dry_runs_everything_then_creates_the_run(fake_api, kubeconfig, small_fleet):
    result = _submit(small_fleet, kubeconfig, "--output", "json")
    assert result.exit_code == 0, result.stderr
    expected = jobs.build_run_manifests(FleetSpec.load(small_fleet), run_id=RUN_ID)
    assert json.loads(result.stdout)["jobs"] == [m["metadata"]["name"] for m in expected]
    posts = fake_api.calls("POST")
    dry = [i for i, (_, _, q) in enumerate(posts) if q.get("dryRun") == "All"]
    real = [i for i, (_, _, q) in enumerate(posts) if "dryRun" not in q]
    assert len(dry) == len(real) == len(expected)
    assert max(dry) < min(real)
    assert all(q.get("fieldValidation") == "Strict" for _, _, q in (posts[i] for i in dry))
    for manifest in expected:
        stored = fake_api.jobs[("dooly", manifest["metadata"]["name"])]
        assert stored["spec"] == manifest["spec"]
        assert stored["metadata"]["labels"] == manifest["metadata"]["labels"]
    merge = fake_api.jobs[("dooly", expected[-1]["metadata"]["name"])]
    assert merge["spec"]["suspend"] is True


def test_wait_resumes_the_merge_only_after_profiling_and_succeeds(fake_api, kubeconfig, small_fleet):
    fake_api.finish_after_polls = 1
    result = _submit(small_fleet, kubeconfig, "--wait", *FAST_POLL, "--output", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["succeeded"] and report["finished"]
    assert {j["phase"] for j in report["jobs"]} == {"succeeded"}
    merge_name = f"dooly-{RUN_ID}-merge"
    assert fake_api.patches == [(merge_name, [])]


def test_a_failed_profiling_job_still_merges_and_exits_1(fake_api, kubeconfig, small_fleet):
    spec = FleetSpec.load(small_fleet)
    failing = jobs.build_profile_jobs(spec, run_id=RUN_ID)[1]["metadata"]["name"]
    fake_api.finish_after_polls = 1
    fake_api.outcomes[failing] = "Failed"
    result = _submit(small_fleet, kubeconfig, "--wait", *FAST_POLL)
    assert result.exit_code == 1
    assert f"run {RUN_ID}: failed" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith(failing))
    assert "failed (BackoffLimitExceeded)" in row
    assert [name for name, _ in fake_api.patches] == [f"dooly-{RUN_ID}-merge"]
    assert fake_api.jobs[("dooly", f"dooly-{RUN_ID}-merge")]["status"]["conditions"][0]["type"] == "Complete"


def test_wait_times_out_with_exit_1(fake_api, kubeconfig, small_fleet):
    assert _submit(small_fleet, kubeconfig).exit_code == 0
    started = time.monotonic()
    result = CliRunner().invoke(
        cli, ["fleet", "wait", "--kubeconfig", str(kubeconfig), "--fleet", str(small_fleet), "--poll", "0.05",
              "--timeout", "1"]
    )
    assert result.exit_code == 1
    assert f"run {RUN_ID}: timed out" in result.stdout
    assert time.monotonic() - started < 10
    assert fake_api.patches == []


def test_status_picks_the_newest_run_and_logs_print_every_container(fake_api, kubeconfig, small_fleet):
    older, newer = "20250101-020000", "20250102-020000"
    assert _submit(small_fleet, kubeconfig, run_id=older).exit_code == 0
    assert _submit(small_fleet, kubeconfig, run_id=newer).exit_code == 0
    common = ["--kubeconfig", str(kubeconfig), "--fleet", str(small_fleet)]
    status = CliRunner().invoke(cli, ["fleet", "status", *common, "--output", "json"])
    assert status.exit_code == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["run_id"] == newer and not report["finished"]
    phases = {j["name"]: j["phase"] for j in report["jobs"]}
    assert phases[f"dooly-{newer}-merge"] == "suspended"

    merge = f"dooly-{newer}-merge"
    pod = fake_api.add_pod(merge, 0, {"merge": "merged 12 shards\n", "fit": "fitted 3 models\n",
                                      "calibrate": "calibrated 2 keys\n"})
    logs = CliRunner().invoke(cli, ["fleet", "logs", *common, "--job", merge])
    assert logs.exit_code == 0, logs.stderr
    assert logs.stdout == (f"==> {pod}/merge <==\nmerged 12 shards\n==> {pod}/fit <==\nfitted 3 models\n"
                           f"==> {pod}/calibrate <==\ncalibrated 2 keys\n")
    missing = CliRunner().invoke(cli, ["fleet", "logs", *common, "--run-id", older])
    assert missing.exit_code == 2 and "no pods" in missing.stderr


def test_an_unreachable_cluster_is_one_line_exit_2(dead_kubeconfig, small_fleet):
    started = time.monotonic()
    result = _submit(small_fleet, dead_kubeconfig)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot reach the Kubernetes API at http://127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 15


def test_bad_input_makes_no_api_call(fake_api, kubeconfig, small_fleet, tmp_path):
    assert _submit(small_fleet, kubeconfig, "--gpu", "b200").exit_code == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text(small_fleet.read_text().replace("gpus: 2", "gpus: -1"))
    result = CliRunner().invoke(
        cli, ["fleet", "submit", "--executor", "kubernetes", "--fleet", str(broken), "--kubeconfig", str(kubeconfig)]
    )
    assert result.exit_code == 2 and "line" in result.stderr
    assert fake_api.requests == []


def test_a_missing_namespace_is_found_by_the_dry_run_and_nothing_is_created(fake_api, kubeconfig, small_fleet):
    small_fleet.write_text(small_fleet.read_text().replace("namespace: dooly", "namespace: perf-lab"))
    result = _submit(small_fleet, kubeconfig)
    assert result.exit_code == 2
    assert 'namespaces "perf-lab" not found' in result.stderr
    assert fake_api.jobs == {}
    assert all(q.get("dryRun") == "All" for _, _, q in fake_api.calls("POST"))


def test_a_refused_creation_rolls_back_the_jobs_already_created(fake_api, kubeconfig, small_fleet):
    fake_api.reject_create = (3, 403)
    result = _submit(small_fleet, kubeconfig)
    assert result.exit_code == 2
    assert "exceeded quota" in result.stderr
    assert fake_api.jobs == {}
    assert len(fake_api.calls("DELETE")) == 2


def test_wrong_credentials_and_missing_kubeconfig_are_one_line(fake_api, tmp_path, small_fleet, monkeypatch):
    from fleet_support import write_kubeconfig

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    bad_token = write_kubeconfig(tmp_path / "bad", fake_api.url, token="wrong")
    result = _submit(small_fleet, bad_token)
    assert result.exit_code == 2 and "401" in result.stderr
    missing = _submit(small_fleet, tmp_path / "nope")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: no usable Kubernetes configuration")
    assert fake_api.jobs == {}


def test_controller_api_directly(fake_api, kubeconfig, small_fleet):
    spec = FleetSpec.load(small_fleet)
    controller = FleetController.connect("dooly", kubeconfig=str(kubeconfig))
    manifests = jobs.build_run_manifests(spec, run_id=RUN_ID)
    assert controller.submit(manifests) == [m["metadata"]["name"] for m in manifests]
    with pytest.raises(DoolyError, match="already exists"):
        controller.submit(manifests)
    assert len(fake_api.jobs) == len(manifests)
    fake_api.finish_after_polls = 0
    run = controller.wait(RUN_ID, timeout_s=30, poll_s=0.05)
    assert run.succeeded
    assert [j.component for j in run.jobs] == ["profile"] * (len(manifests) - 1) + ["merge"]
    assert {j.backend for j in run.jobs if j.component == "profile"} == {t.backend for t in spec.targets()}
