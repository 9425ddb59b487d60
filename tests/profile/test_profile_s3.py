"""`dooly profile` into an S3 store (moto on loopback): a rerun measures nothing; a dead endpoint is one
line and the transient exit code (a Job retries it)."""

import json

import pytest
from click.testing import CliRunner
from profile_helpers import SMALL_GRID_ARGS

from dooly.cli import cli
from dooly.errors import EXIT_TRANSIENT

pytestmark = pytest.mark.s3

FAST_ARGS = ["--device", "cpu", "--dtype", "float32", "--samples", "2", *SMALL_GRID_ARGS]


def profile(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["profile", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_a_second_identical_run_measures_nothing(models, moto_endpoint, aws_env, raw_s3):
    bucket = "dooly-profile-rerun"
    store = f"s3://{bucket}/db"
    arguments = [models[0], "--store", store, "--endpoint-url", moto_endpoint, *FAST_ARGS, "--output", "json"]

    code, output = profile(*arguments)
    assert code == 0, output
    first = json.loads(output)
    assert first["profiled_signatures"] > 0 and first["measured_points"] > 0
    listing = raw_s3(moto_endpoint).list_objects_v2(Bucket=bucket, Prefix="db/")
    keys = {o["Key"] for o in listing.get("Contents", [])}
    assert {f"db/{key}" for key in first["shards"]} <= keys

    code, output = profile(*arguments)
    assert code == 0, output
    second = json.loads(output)
    assert second["profiled_signatures"] == 0 and second["measured_points"] == 0 and second["shards"] == []
    assert second["reused_signatures"] == first["profiled_signatures"]


def test_an_unreachable_endpoint_exits_75_with_one_line_and_writes_nothing(
    models, aws_env, unused_port, moto_endpoint, raw_s3, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    buckets_before = raw_s3(moto_endpoint).list_buckets()["Buckets"]
    endpoint = f"http://127.0.0.1:{unused_port}"

    code, output = profile(models[0], "--store", "s3://dooly-unreachable/db", "--endpoint-url", endpoint, *FAST_ARGS)

    assert code == EXIT_TRANSIENT
    assert output.count("\n") == 1 and output.startswith("error:") and f"127.0.0.1:{unused_port}" in output
    assert sorted(tmp_path.rglob("*")) == before
    assert raw_s3(moto_endpoint).list_buckets()["Buckets"] == buckets_before
