"""The local executor runs Job manifests as real processes with Kubernetes' semantics."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from dooly import __version__
from dooly.errors import DoolyError
from dooly.fleet.executor import LocalExecutor

# Each of these pods is a short Python script; the whole file runs in a few seconds.
SLEEP_S = 0.6
FAST_DEADLINE_S = 1


def _job(
    script: str,
    *,
    name: str = "job",
    completions: int = 1,
    parallelism: int = 1,
    indexed: bool = True,
    env: list[dict] | None = None,
    args: list[str] | None = None,
    init: list[dict] | None = None,
    volumes: list[dict] | None = None,
    mounts: list[dict] | None = None,
    **spec,
) -> dict:
    container = {"name": "main", "command": [sys.executable, "-c", script], "args": args or [], "env": env or []}
    if mounts:
        container["volumeMounts"] = mounts
    pod = {"restartPolicy": "Never", "containers": [container], "volumes": volumes or []}
    if init:
        pod["initContainers"] = init
    job_spec = {
        "completions": completions,
        "parallelism": parallelism,
        "template": {"metadata": {"labels": {"team": "perf"}}, "spec": pod},
        **spec,
    }
    if indexed:
        job_spec["completionMode"] = "Indexed"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "ns1"}, "spec": job_spec}


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def test_indexed_pods_run_in_parallel_with_their_index(tmp_path):
    script = f"""
import json, os, sys, time
start = time.time(); time.sleep({SLEEP_S})
index = os.environ["JOB_COMPLETION_INDEX"]
print(json.dumps({{"index": index, "args": sys.argv[1:], "start": start, "end": time.time()}}))
"""
    job = _job(
        script,
        completions=4,
        parallelism=2,
        args=["--shard-index", "$(JOB_COMPLETION_INDEX)", "--greeting", "$(GREETING)", "$$(GREETING)", "$(UNSET)"],
        env=[{"name": "GREETING", "value": "hello-$(JOB_COMPLETION_INDEX)"}],
    )
    result = LocalExecutor().run_job(job, env={"PATH": "/usr/bin:/bin"})
    assert result.succeeded and result.reason == "Complete"
    records = [json.loads(out) for out in result.outputs("main")]
    assert [r["index"] for r in records] == ["0", "1", "2", "3"]
    for r in records:
        i = r["index"]
        assert r["args"] == ["--shard-index", i, "--greeting", f"hello-{i}", "$(GREETING)", "$(UNSET)"]
    assert _max_overlap([(r["start"], r["end"]) for r in records]) == 2


def test_secret_env_comes_from_a_secrets_file_or_the_environment(tmp_path):
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(yaml.safe_dump({"s3": {"AWS_ACCESS_KEY_ID": "from-file"}}))
    env = [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}},
        {"name": "AWS_ENDPOINT_URL", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ENDPOINT_URL", "optional": True}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
    ]
    script = "import json, os; print(json.dumps({k: os.environ.get(k) for k in " \
             "['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_ENDPOINT_URL', 'POD', 'NS', 'TEAM']}))"
    executor = LocalExecutor(secrets_file=secrets)
    result = executor.run_job(_job(script, env=env), env={"AWS_SECRET_ACCESS_KEY": "from-env"})
    seen = json.loads(result.outputs("main")[0])
    assert seen == {
        "AWS_ACCESS_KEY_ID": "from-file",
        "AWS_SECRET_ACCESS_KEY": "from-env",
        "AWS_ENDPOINT_URL": None,
        "POD": "job-0-0",
        "NS": "ns1",
        "TEAM": "perf",
    }


def test_a_missing_secret_stops_the_job_before_any_process(tmp_path):
    marker = tmp_path / "ran"
    init = [{"name": "first", "command": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]}]
    env = [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}}]
    with pytest.raises(DoolyError, match="needs key 'AWS_SECRET_ACCESS_KEY' of Secret 's3'"):
        LocalExecutor().run_job(_job("pass", env=env, init=init), env={})
    assert not marker.exists()
    with pytest.raises(DoolyError, match="not installed"):
        job = _job("pass")
        job["spec"]["template"]["spec"]["containers"][0]["command"] = ["no-such-program-dooly"]
        LocalExecutor().run_job(job, env={"PATH": "/usr/bin:/bin"})


def test_empty_dirs_are_private_scratch_directories(tmp_path):
    script = """
import os, pathlib
path = pathlib.Path(os.environ["CACHE"]) / "x.txt"
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text("ok")
print(path)
"""
    job = _job(
        script,
        env=[{"name": "CACHE", "value": "/home/dooly/.cache/sub"}],
        volumes=[{"name": "cache", "emptyDir": {}}],
        mounts=[{"name": "cache", "mountPath": "/home/dooly/.cache"}],
    )
    result = LocalExecutor().run_job(job, env={})
    assert result.succeeded, result.pods[0].stderr
    written = Path(result.outputs("main")[0].strip())
    assert written.name == "x.txt"
    assert not str(written).startswith("/home/dooly")
    assert not written.exists()


def test_failed_index_is_retried_up_to_its_backoff_limit(tmp_path):
    script = f"""
import os, pathlib, sys
index = os.environ["JOB_COMPLETION_INDEX"]
marker = pathlib.Path({str(tmp_path)!r}) / ("tried-" + index)
if index == "1" and not marker.exists():
    marker.write_text("x"); sys.exit(5)
if index == "2":
    sys.exit(7)
print(index)
"""
    result = LocalExecutor().run_job(_job(script, completions=3, parallelism=3, backoffLimitPerIndex=1), env={})
    assert not result.succeeded and result.reason == "FailedIndexes"
    assert result.failed_indexes == [2]
    attempts = {}
    for pod in result.pods:
        attempts.setdefault(pod.index, []).append(pod.exit_code)
    assert attempts == {0: [0], 1: [5, 0], 2: [7, 7]}


def test_fail_job_rule_stops_every_pod_at_once(tmp_path):
    survivor = tmp_path / "survivor"
    script = f"""
import os, sys, time
if os.environ["JOB_COMPLETION_INDEX"] == "0":
    time.sleep(0.2); sys.exit(2)
time.sleep(30)
open({str(survivor)!r}, "w")
"""
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]}
    started = time.monotonic()
    result = LocalExecutor().run_job(
        _job(script, completions=2, parallelism=2, backoffLimitPerIndex=3, podFailurePolicy=policy), env={}
    )
    assert result.reason == "PodFailurePolicy" and not result.succeeded
    assert time.monotonic() - started < 10
    assert len(result.pods) == 2
    assert not survivor.exists()


def test_active_deadline_kills_what_still_runs():
    started = time.monotonic()
    result = LocalExecutor().run_job(
        _job("import time; time.sleep(30)", indexed=False, activeDeadlineSeconds=FAST_DEADLINE_S), env={}
    )
    assert result.reason == "DeadlineExceeded" and not result.succeeded
    assert time.monotonic() - started < 10
    assert result.pods[0].exit_code is None


def test_init_containers_run_first_and_in_order(tmp_path):
    log = tmp_path / "log"
    step = "import sys; open({!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(int(sys.argv[2]))"
    init = [
        {"name": "one", "command": [sys.executable, "-c", step.format(str(log))], "args": ["one", "0"]},
        {"name": "two", "command": [sys.executable, "-c", step.format(str(log))], "args": ["two", "0"]},
    ]
    job = _job(step.format(str(log)), args=["main", "0"], indexed=False, init=init)
    assert LocalExecutor().run_job(job, env={}).succeeded
    assert log.read_text().split() == ["one", "two", "main"]

    log.unlink()
    init[1]["args"] = ["two", "3"]
    result = LocalExecutor().run_job(_job(step.format(str(log)), args=["main", "0"], indexed=False, init=init,
                                          backoffLimit=0), env={})
    assert not result.succeeded and result.reason == "BackoffLimitExceeded"
    assert log.read_text().split() == ["one", "two"]
    assert result.pods[0].failed_container == "two"


def test_the_dooly_program_is_this_interpreters_cli():
    job = _job("", indexed=False)
    job["spec"]["template"]["spec"]["containers"][0].update(command=["dooly"], args=["--version"])
    result = LocalExecutor().run_job(job, env={})
    assert result.succeeded
    assert __version__ in result.outputs("main")[0]
