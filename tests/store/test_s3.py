"""S3 over real HTTP on loopback: retries through a spoiling proxy (moto behind it), and SeaweedFS
with signatures enforced, including a restart in the middle of a run."""

from __future__ import annotations

import logging
import threading
import time

import polars as pl
import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import EXIT_TRANSIENT, DoolyError, TransientError
from dooly.store.backends import S3Store, open_store
from dooly.store.merge import merge_store, read_snapshot
from dooly.store.shards import list_shards, read_held, write_shard

pytestmark = pytest.mark.s3

FAST_BACKOFF_S = 0.05
# An outage the retry deadline rides out (dropped connections) and one it does not (every connection).
SHORT_OUTAGE_CONNECTIONS = 4
ENDLESS_OUTAGE = 10**6
RIDE_OUT_DEADLINE_S = "30"
GIVE_UP_DEADLINE_S = 1.0
RESTART_ATTEMPTS = 12
RESTART_BACKOFF_S = 0.25
WRITES_AFTER_RESTART = 3
WRITE_PAUSE_S = 0.05
RUN_LIMIT_S = 90.0


def _s3_store(uri: str, endpoint: str, **kwargs) -> S3Store:
    """A store on an existing bucket whose first request opens the first connection (no up-front
    check), so a proxy spoiling its first connections spoils exactly the call under test."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return S3Store(bucket, prefix, endpoint_url=endpoint, **kwargs)


def _objects(raw_client, bucket: str) -> list[str]:
    listing = raw_client.list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_dropped_connections_are_retried(moto_uri, moto_endpoint, flaky_proxy, raw_s3, shard_table):
    bucket = moto_uri[len("s3://") :].split("/")[0]
    open_store(moto_uri)
    proxy = flaky_proxy(moto_endpoint, fail_first=3, mode="drop")
    store = _s3_store(moto_uri, proxy.endpoint, backoff_base_s=FAST_BACKOFF_S)
    key = write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    assert proxy.spoiled == 3
    assert _objects(raw_s3(moto_endpoint), bucket) == ["db/dooly-store.json", "db/" + key]


def test_an_upload_whose_answer_is_lost_is_not_duplicated(
    moto_uri, moto_endpoint, flaky_proxy, raw_s3, shard_table
):
    bucket = moto_uri[len("s3://") :].split("/")[0]
    direct = open_store(moto_uri)
    proxy = flaky_proxy(moto_endpoint, fail_first=1, mode="swallow")
    store = _s3_store(moto_uri, proxy.endpoint, backoff_base_s=FAST_BACKOFF_S)
    key = write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    assert proxy.spoiled == 1
    assert list_shards(direct) == [key]
    assert merge_store(direct).rows_out == 3
    assert _objects(raw_s3(moto_endpoint), bucket).count("db/" + key) == 1


def test_a_conditional_create_whose_answer_is_lost_is_still_ours(
    moto_uri, moto_endpoint, flaky_proxy
):
    open_store(moto_uri)
    proxy = flaky_proxy(moto_endpoint, fail_first=1, mode="swallow")
    store = _s3_store(moto_uri, proxy.endpoint, backoff_base_s=FAST_BACKOFF_S)
    assert store.put_if_absent("snapshots/gen-000001/claim.json", b"mine")
    assert proxy.spoiled == 1
    assert not store.put_if_absent("snapshots/gen-000001/claim.json", b"someone else")
    assert store.get_bytes("snapshots/gen-000001/claim.json") == b"mine"


def test_retries_are_bounded_and_leave_nothing(
    moto_uri, moto_endpoint, flaky_proxy, raw_s3, shard_table
):
    bucket = moto_uri[len("s3://") :].split("/")[0]
    open_store(moto_uri)
    proxy = flaky_proxy(moto_endpoint, fail_first=10**6, mode="drop")
    store = _s3_store(moto_uri, proxy.endpoint, max_attempts=3, backoff_base_s=FAST_BACKOFF_S)
    with pytest.raises(DoolyError) as info:
        write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    assert "unreachable" in str(info.value) and "after 3 attempts" in str(info.value)
    assert "\n" not in str(info.value)
    assert _objects(raw_s3(moto_endpoint), bucket) == ["db/dooly-store.json"]


def test_merge_and_read_back_through_s3(moto_uri, shard_table):
    store = open_store(moto_uri)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    write_shard(store, shard_table(n_samples=99, backend="sdpa"), run_id="run-a", chunk_index=1)
    write_shard(store, shard_table(n_samples=50, run_id="run-b"), run_id="run-b", chunk_index=0)
    store.put_bytes(list_shards(store)[0].rsplit("/", 1)[0] + "/junk.parquet", b"junk")
    report = merge_store(open_store(moto_uri, create=False))
    assert (report.rows_in, report.rows_out, len(report.quarantined)) == (9, 6, 1)
    frame, manifest = read_snapshot(store)
    assert manifest["generation"] == 1
    paged = frame.filter(pl.col("backend") == "paged|sdpa")
    assert set(paged["n_samples"]) == {50}
    held = read_held(
        store,
        platform="NVIDIA-H100-80GB-HBM3",
        engine="transformers",
        backend="sdpa",
        dtype="bfloat16",
    )
    assert held.num_rows == 3 and set(held.column("n_samples").to_pylist()) == {99}


def test_seaweedfs_with_signatures_enforced(seaweed, aws_env, shard_table):
    uri = "s3://dooly-weed/db"
    store = open_store(uri, endpoint_url=seaweed.endpoint)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    write_shard(store, shard_table(n_samples=40, run_id="run-b"), run_id="run-b", chunk_index=0)
    report = merge_store(open_store(uri, endpoint_url=seaweed.endpoint, create=False))
    assert (report.rows_in, report.rows_out) == (6, 3)
    frame, _ = read_snapshot(store)
    assert set(frame["n_samples"]) == {40}

    wrong = S3Store(
        "dooly-weed",
        "db",
        endpoint_url=seaweed.endpoint,
        secret_key="not-the-secret",
        access_key="dooly-test-key",
    )
    with pytest.raises(DoolyError) as info:
        wrong.check(create=False)
    assert "403" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DoolyError, match="403"):
        wrong.get_bytes("dooly-store.json")


def test_seaweedfs_restarted_in_the_middle_of_a_run(seaweed, aws_env, shard_table, caplog):
    uri = "s3://dooly-restart/db"
    store = _s3_store(
        uri, seaweed.endpoint, max_attempts=RESTART_ATTEMPTS, backoff_base_s=RESTART_BACKOFF_S
    )
    store.check(create=True)
    written, failures = [], []
    running, restarted = threading.Event(), threading.Event()

    def profiler_run() -> None:
        """Writes shards until a few have gone in after the restart (bounded in time)."""
        deadline = time.monotonic() + RUN_LIMIT_S
        after_restart = 0
        try:
            while after_restart < WRITES_AFTER_RESTART and time.monotonic() < deadline:
                index = len(written)
                table = shard_table([(f"op-{index}", t) for t in range(1, 4)])
                written.append(write_shard(store, table, run_id="run-a", chunk_index=index))
                running.set()
                after_restart += restarted.is_set()
                time.sleep(WRITE_PAUSE_S)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)
            running.set()

    first_pid = seaweed.process.pid
    writer = threading.Thread(target=profiler_run)
    with caplog.at_level(logging.WARNING, logger="dooly.store.backends"):
        writer.start()
        assert running.wait(RUN_LIMIT_S)
        seaweed.restart()
        restarted.set()
        writer.join(RUN_LIMIT_S)
    assert not failures, failures
    assert seaweed.process.pid != first_pid
    assert any("retry" in r.getMessage() for r in caplog.records), "no write met the restart"
    assert sorted(written) == list_shards(store)
    report = merge_store(store)
    assert report.rows_out == 3 * len(written)


def test_a_write_gives_up_at_the_retry_deadline_not_the_attempt_count(
    moto_uri, moto_endpoint, flaky_proxy, raw_s3, shard_table, monkeypatch
):
    """Many attempts allowed, a short deadline: the deadline decides, and the error is transient."""
    bucket = moto_uri[len("s3://") :].split("/")[0]
    open_store(moto_uri)
    proxy = flaky_proxy(moto_endpoint, fail_first=ENDLESS_OUTAGE, mode="drop")
    monkeypatch.setenv("DOOLY_S3_RETRY_DEADLINE_S", str(GIVE_UP_DEADLINE_S))
    store = _s3_store(moto_uri, proxy.endpoint, max_attempts=1000, backoff_base_s=FAST_BACKOFF_S)
    started = time.monotonic()
    with pytest.raises(TransientError, match="unreachable"):
        write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    assert time.monotonic() - started < GIVE_UP_DEADLINE_S + 5
    assert 1 < proxy.spoiled < 1000
    assert _objects(raw_s3(moto_endpoint), bucket) == ["db/dooly-store.json"]


def _merge_through(proxy_endpoint: str, uri: str) -> object:
    return CliRunner().invoke(cli, ["merge", "--store", uri, "--endpoint-url", proxy_endpoint, "--output", "json"])


def test_dooly_merge_rides_out_a_short_outage(moto_uri, moto_endpoint, flaky_proxy, shard_table, monkeypatch):
    store = open_store(moto_uri)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    proxy = flaky_proxy(moto_endpoint, fail_first=SHORT_OUTAGE_CONNECTIONS, mode="drop")
    monkeypatch.setenv("DOOLY_S3_CONNECT_DEADLINE_S", RIDE_OUT_DEADLINE_S)
    monkeypatch.setenv("DOOLY_S3_RETRY_DEADLINE_S", RIDE_OUT_DEADLINE_S)

    result = _merge_through(proxy.endpoint, moto_uri)

    assert result.exit_code == 0, result.output
    assert proxy.spoiled == SHORT_OUTAGE_CONNECTIONS
    assert read_snapshot(store)[1]["generation"] == 1


def test_dooly_merge_exits_transient_when_the_outage_outlasts_the_deadline(
    moto_uri, moto_endpoint, flaky_proxy, raw_s3, shard_table, monkeypatch
):
    bucket = moto_uri[len("s3://") :].split("/")[0]
    store = open_store(moto_uri)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    before = _objects(raw_s3(moto_endpoint), bucket)
    proxy = flaky_proxy(moto_endpoint, fail_first=ENDLESS_OUTAGE, mode="drop")
    monkeypatch.setenv("DOOLY_S3_CONNECT_DEADLINE_S", str(GIVE_UP_DEADLINE_S))

    result = _merge_through(proxy.endpoint, moto_uri)

    assert result.exit_code == EXIT_TRANSIENT, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "unreachable" in result.stderr and proxy.spoiled > 1
    assert _objects(raw_s3(moto_endpoint), bucket) == before
