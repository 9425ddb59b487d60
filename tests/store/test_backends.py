"""The Store contract on both backends (a directory, moto's S3), and opening stores by URI."""

from __future__ import annotations

import json
import os
import threading
import time

import pyarrow.parquet as pq
import pytest

from dooly import SCHEMA_VERSION
from dooly.errors import DoolyError
from dooly.store.backends import MARKER_KEY, LocalStore, S3Store, open_store
from dooly.store.shards import write_shard


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same tests against both backends."""
    if request.param == "local":
        return open_store(str(tmp_path / "db"))
    return open_store(request.getfixturevalue("moto_uri"))


def test_put_get_list_delete(store):
    store.put_bytes("a/b/one.bin", b"1")
    store.put_bytes("a/two.bin", b"22")
    store.put_bytes("c/three.bin", b"333")
    store.put_bytes("a/two.bin", b"two")
    assert store.get_bytes("a/two.bin") == b"two"
    assert store.list_keys("a/") == ["a/b/one.bin", "a/two.bin"]
    assert store.list_keys("a/b") == ["a/b/one.bin"]
    assert store.exists("c/three.bin") and not store.exists("c/none.bin")
    store.delete("c/three.bin")
    store.delete("c/three.bin")
    assert not store.exists("c/three.bin")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("c/three.bin")


def test_put_if_absent_creates_exactly_once_under_a_race(store):
    results = []
    barrier = threading.Barrier(4)

    def contend(index: int) -> None:
        barrier.wait()
        results.append((store.put_if_absent("locks/gen-1.json", f"{index}".encode()), index))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [index for created, index in results if created]
    assert len(results) == 4 and len(winners) == 1
    assert store.get_bytes("locks/gen-1.json") == f"{winners[0]}".encode()


def test_ranged_reader_serves_parquet_column_reads(store, shard_table):
    key = write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    with store.open_binary(key) as handle:
        table = pq.ParquetFile(handle).read(columns=["signature", "T"])
    assert table.column("T").to_pylist() == [1, 2, 1]


def test_file_upload_in_several_parts_is_whole(tmp_path, moto_uri):
    store = open_store(moto_uri)
    assert isinstance(store, S3Store)
    part = 5 * 1024 * 1024
    payload = os.urandom(2 * part + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(payload)
    store.multipart_part_bytes = part
    store.put_file("snapshots/big.bin", path)
    assert store.get_bytes("snapshots/big.bin") == payload


def test_local_reader_never_sees_a_partial_object(tmp_path):
    store = LocalStore(tmp_path)
    old, new = b"a" * 4_000_000, b"b" * 4_000_000
    store.put_bytes("data.bin", old)
    stop = threading.Event()
    seen = set()

    def read_loop() -> None:
        while not stop.is_set():
            seen.add(store.get_bytes("data.bin"))

    reader = threading.Thread(target=read_loop)
    reader.start()
    for _ in range(20):
        store.put_bytes("data.bin", new)
        store.put_bytes("data.bin", old)
    stop.set()
    reader.join(30)
    assert seen <= {old, new}
    assert store.list_keys("") == ["data.bin"]


def test_local_failed_write_leaves_nothing(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("blocker", b"a file where a directory should be")
    with pytest.raises(DoolyError, match="cannot write blocker/x") as info:
        store.put_bytes("blocker/x", b"data")
    assert "\n" not in str(info.value)
    assert store.list_keys("") == ["blocker"]
    assert sorted(os.listdir(tmp_path)) == ["blocker"]


def test_keys_cannot_escape_the_store(tmp_path):
    store = LocalStore(tmp_path / "db")
    for key in ("../outside", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            store.put_bytes(key, b"x")


def test_open_store_makes_a_local_store_and_marks_its_schema(tmp_path):
    store = open_store(f"file://{tmp_path}/db")
    assert isinstance(store, LocalStore)
    assert json.loads(store.get_bytes(MARKER_KEY)) == {"schema_version": SCHEMA_VERSION}
    deferred = open_store(f"file://{tmp_path}/later", defer_create=True)
    assert not (tmp_path / "later").exists(), "a deferred store is made by its first write"
    deferred.put_bytes("shards/a.parquet", b"x")
    assert json.loads(deferred.get_bytes(MARKER_KEY)) == {"schema_version": SCHEMA_VERSION}
    assert open_store(str(tmp_path / "db"), create=False).uri == store.uri


def test_open_store_refuses_an_unwritable_path_in_one_line(tmp_path):
    (tmp_path / "plain-file").write_text("x")
    with pytest.raises(DoolyError) as info:
        open_store(str(tmp_path / "plain-file" / "db"))
    assert "not writable" in str(info.value) and "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["plain-file"]


def test_open_store_without_create_needs_an_existing_store(tmp_path):
    with pytest.raises(DoolyError, match="does not exist"):
        open_store(str(tmp_path / "missing"), create=False)
    assert not (tmp_path / "missing").exists()


def test_open_store_refuses_another_schema_version(tmp_path):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / MARKER_KEY).write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(DoolyError, match=f"schema version {SCHEMA_VERSION + 1}"):
        open_store(str(tmp_path / "db"))


def test_open_store_refuses_unknown_schemes():
    with pytest.raises(DoolyError, match="unsupported scheme"):
        open_store("gs://bucket/db")


def test_open_store_s3_reads_the_endpoint_from_the_environment(moto_uri):
    store = open_store(moto_uri)
    assert store.uri == moto_uri
    assert store.storage_options()["aws_endpoint_url"] == os.environ["DOOLY_S3_ENDPOINT_URL"]
    assert store.exists(MARKER_KEY)
    bucket = moto_uri[len("s3://") :].split("/")[0]
    later = open_store(f"s3://{bucket}-later/db", defer_create=True)
    assert not later.exists(MARKER_KEY) and later.list_keys("") == []
    later.put_bytes("shards/a.parquet", b"x")
    assert later.exists(MARKER_KEY)


def test_open_store_s3_without_create_needs_the_bucket(moto_uri):
    with pytest.raises(DoolyError, match="does not exist"):
        open_store(moto_uri, create=False)


def test_unreachable_s3_store_fails_fast_in_one_line(aws_env, unused_port):
    port = unused_port
    started = time.monotonic()
    with pytest.raises(DoolyError) as info:
        open_store("s3://dooly-nowhere/db", endpoint_url=f"http://127.0.0.1:{port}")
    message = str(info.value)
    assert "unreachable" in message and "s3://dooly-nowhere/db" in message and "\n" not in message
    assert time.monotonic() - started < 10
