"""The S3 path end to end against SeaweedFS (a real S3 server, signatures enforced) on loopback.

The profiling pods of a fleet Job run the real `dooly profile` through the local executor and write
shards to the bucket; one pod is killed mid-run and the Job then resumes it without losing or
doubling a row; the merge Job compacts and fits on the bucket; `dooly predict` reads the result.
Credentials reach the pods only as the fleet gives them: from the Secret, here a secrets file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dooly.fleet import checks, jobs
from dooly.fleet.executor import LocalExecutor, default_programs
from dooly.fleet.spec import PROFILE_INT_FLAGS, FleetSpec
from dooly.profile.provenance import detect_platform
from dooly.store.merge import MANIFEST_NAME, SNAPSHOTS_PREFIX
from dooly.store.shards import SHARD_SUFFIX

pytestmark = [pytest.mark.s3, pytest.mark.slow]

PREFIX = "db"
SECRET = "dooly-s3"
RUN_ID = "s3-e2e"
PROFILE_CONTAINER = "profile"
SHARDS = 2
KILLED_INDEX = 0
CHUNK_ROWS = 20
# Bounds of every wait: a cold `dooly profile` of the tiny model takes ~9 s on an idle 2-core CPU.
FIRST_SHARD_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 120
POLL_S = 0.05

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

# One CPU pool, one backend, two shards at once; the `profile:` section is the CPU-sized sweep.
FLEET = """\
namespace: dooly-e2e
store: s3://{bucket}/{prefix}
s3Secret: {secret}
images:
  registry: ghcr.io/example/dooly
  profiler: profiler:0.1.0
  controller: controller:0.1.0
models: [Qwen/Qwen2.5-0.5B]
engines:
  - name: transformers
gpuTypes:
  - name: cpu
    gpus: 0
    completions: {shards}
    parallelism: {shards}
    backends: [paged|sdpa]
tolerations: []
profile:
  dtype: float32
  maxTokens: 16
  maxSeqs: 4
  maxKv: 512
  maxContext: 128
  samples: 2
deadlines:
  profileSeconds: {deadline}
  mergeSeconds: {deadline}
  ttlSecondsAfterFinished: 600
retries:
  perIndex: 0
  merge: 0
"""


def fleet_spec(bucket: str, model: str) -> FleetSpec:
    """The fleet above, profiling `model` (a config path) with small shards.

    A fleet file names bundled model ids only, and its `profile:` section has no chunk size, so
    both are set on the validated spec; the Job builders then emit them like any other model or flag.
    """
    text = FLEET.format(bucket=bucket, prefix=PREFIX, secret=SECRET, shards=SHARDS, deadline=COMMAND_TIMEOUT_S)
    spec = FleetSpec.from_text(text, source="e2e fleet")
    return dataclasses.replace(
        spec, models=(model,), profile_flags=(*spec.profile_flags, "--chunk-rows", str(CHUNK_ROWS))
    )


def pod_command(job: dict, index: int, secrets: dict, scratch: Path) -> tuple[list[str], dict[str, str]]:
    """Command line and env of pod `index` of `job`, resolved the way the local executor does it."""
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert not pod.get("initContainers")
    env = {jobs.COMPLETION_INDEX_ENV: str(index)}
    for item in container["env"]:
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                assert ref["optional"], f"the Secret lacks {ref['key']}"
                continue
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == jobs.COMPLETION_INDEX_FIELD
            value = str(index)
        else:
            value = item["value"]
        env[item["name"]] = value
    for mount in container.get("volumeMounts", []):
        local = scratch / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        root = mount["mountPath"].rstrip("/")
        for name, value in env.items():
            if value == root or value.startswith(root + "/"):
                env[name] = str(local) + value[len(root):]
    reference = f"$({jobs.COMPLETION_INDEX_ENV})"
    args = [arg.replace(reference, str(index)) for arg in container["args"]]
    program = container["command"]
    return default_programs()[program[0]] + program[1:] + args, env


def shard_keys(client, bucket: str) -> list[str]:
    """Every shard object in the bucket (none when the bucket does not exist yet)."""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/shards/")
        return [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(SHARD_SUFFIX)]
    except client.exceptions.NoSuchBucket:
        return []


def shard_rows(client, bucket: str) -> list[dict]:
    """Every row of every shard object, read with pyarrow."""
    tables = [
        pq.read_table(pa.BufferReader(client.get_object(Bucket=bucket, Key=key)["Body"].read()))
        for key in shard_keys(client, bucket)
    ]
    return pa.concat_tables(tables).to_pylist() if tables else []


def sweep_flags(spec: FleetSpec) -> list[str]:
    """The request-dimension flags of the fleet's `profile:` section (what `dooly plan` takes too)."""
    sweep = {flag for key, flag in PROFILE_INT_FLAGS.items() if key != "samples"}
    pairs = zip(spec.profile_flags[::2], spec.profile_flags[1::2], strict=True)
    return [part for flag, value in pairs if flag in sweep for part in (flag, value)]


def start_dooly(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dooly.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> dict:
    """The JSON report of a `dooly ... --output json` process, which must exit 0 in time."""
    try:
        stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    return json.loads(stdout)


def test_fleet_profiles_into_seaweedfs_resumes_a_killed_pod_then_merges_fits_and_predicts(
    seaweed, s3_credentials, raw_s3, tmp_path
):
    client = raw_s3(seaweed.endpoint)
    bucket, fresh_bucket = (f"dooly-e2e-{uuid.uuid4().hex[:10]}" for _ in range(2))
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    model = model_dir / "config.json"
    model.write_text(json.dumps(TINY_LLAMA))

    # Processes see no AWS settings of this machine: a pod's S3 access comes from its Secret alone.
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "DOOLY_S3_ENDPOINT_URL"}
    base_env.update(
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
    )
    secrets = {SECRET: {**s3_credentials, "AWS_ENDPOINT_URL": seaweed.endpoint}}
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text(yaml.safe_dump(secrets))
    cli_env = {**base_env, **s3_credentials}

    spec = fleet_spec(bucket, str(model))
    [profile_job] = jobs.build_profile_jobs(spec, run_id=RUN_ID)
    merge_job = jobs.build_merge_job(spec, run_id=RUN_ID)
    checks.require_valid([profile_job, merge_job])
    executor = LocalExecutor(secrets_file=secrets_file)

    # One pod dies mid-run: its process is SIGKILLed once its first shard is in the bucket.
    argv, pod_env = pod_command(profile_job, KILLED_INDEX, secrets, tmp_path / "killed-pod")
    killed = subprocess.Popen(
        argv, env={**base_env, **pod_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + FIRST_SHARD_TIMEOUT_S
        while not shard_keys(client, bucket) and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(COMMAND_TIMEOUT_S)
    assert killed.returncode == -signal.SIGKILL, f"the pod ended before it was killed ({killed.returncode})"
    left_by_killed = len(shard_rows(client, bucket))
    assert left_by_killed > 0

    # The Job runs every shard, the killed one again, to completion; meanwhile one uninterrupted
    # profile of the same model fills another bucket, the reference for "nothing lost".
    fresh_uri = f"s3://{fresh_bucket}/{PREFIX}"
    fresh = start_dooly(
        "profile", str(model), "--store", fresh_uri, "--endpoint-url", seaweed.endpoint, "--device", "cpu",
        "--dtype", "float32", *spec.profile_flags, "--output", "json", env=cli_env,
    )
    profiled = executor.run_job(profile_job, env=base_env)
    fresh_report = finish(fresh)
    assert profiled.succeeded, [(p.name, p.exit_code, p.stderr) for p in profiled.pods]
    assert [p.index for p in profiled.pods] == list(range(SHARDS))
    reports = [json.loads(out) for out in profiled.outputs(PROFILE_CONTAINER)]
    assert all(r["error_points"] == 0 for r in reports)
    assert reports[KILLED_INDEX]["measured_points"] > 0, "the resumed pod had nothing left to do"

    rows = shard_rows(client, bucket)
    counts = collections.Counter((r["signature"], r["point_key"]) for r in rows)
    doubled = [key for key, n in counts.items() if n > 1]
    assert not doubled, f"{len(doubled)} points measured twice, e.g. {doubled[0]}"
    assert len(rows) == left_by_killed + sum(r["measured_points"] for r in reports)
    assert {r["run_id"] for r in rows} == {f"{profile_job['metadata']['name']}-{i}" for i in range(SHARDS)}

    # The merge Job compacts the shards into a snapshot on S3 and fits on it, while the planner
    # counts the sweep points each bucket holds. (Refinement points around latency kinks depend on
    # the timings, so the sweep points, not all rows, are what two runs must share.)
    plans = [
        start_dooly("plan", str(model), "--store", uri, "--endpoint-url", seaweed.endpoint, "--device", "cpu",
                    "--dtype", "float32", *sweep_flags(spec), "--output", "json", env=cli_env)
        for uri in (spec.store, fresh_uri)
    ]
    merged = executor.run_job(merge_job, env=base_env)
    fleet_plan, fresh_plan = (finish(plan) for plan in plans)
    fresh_rows = shard_rows(client, fresh_bucket)
    assert fresh_report["measured_points"] == len(fresh_rows)
    assert fresh_plan["missing_points"] == 0 and fresh_plan["held_points"] > 0
    assert fleet_plan["missing_points"] == 0, "the killed pod's unflushed work was lost"
    assert fleet_plan["held_points"] == fresh_plan["held_points"]
    assert {s for s, _ in counts} == {r["signature"] for r in fresh_rows}

    assert merged.succeeded, [(p.name, p.exit_code, p.failed_container, p.stderr) for p in merged.pods]
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/{SNAPSHOTS_PREFIX}")
    manifests = [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(f"/{MANIFEST_NAME}")]
    assert len(manifests) == 1
    manifest = json.loads(client.get_object(Bucket=bucket, Key=manifests[0])["Body"].read())
    assert manifest["rows_out"] == len(rows) and manifest["duplicates_dropped"] == 0

    model_id = fresh_report["models"][0]["model"]
    # `dooly predict` has no --endpoint-url: it reads the endpoint from the environment.
    prediction = finish(
        start_dooly(
            "predict", "--store", spec.store, "--model", model_id, "--platform", detect_platform("cpu"),
            "--backend", "paged|sdpa", "--dtype", "float32", "--prefill", "8:0", "--decode", "64",
            "--output", "json", env={**cli_env, "AWS_ENDPOINT_URL": seaweed.endpoint},
        )
    )
    # The fitted generation is the merged one, and every operation of the model was profiled here.
    assert prediction["generation"] == manifest["generation"] and prediction["unseen_ops"] == 0
    assert prediction["ops"] == fleet_plan["signatures"] and prediction["step_seconds"] > 0
