"""Merge: the dedup rule against a reference, generations, quarantine, races and a killed merge."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from packaging.version import InvalidVersion, Version

from dooly import SCHEMA_VERSION
from dooly.cli import cli
from dooly.errors import EXIT_SHRINK_REFUSED, DoolyError
from dooly.store import merge as merge_module
from dooly.store.backends import LocalStore, open_store
from dooly.store.merge import (
    CLAIM_NAME,
    KEEP_GENERATIONS,
    MANIFEST_NAME,
    generation_key,
    merge_store,
    read_snapshot,
    snapshot_generation,
)
from dooly.store.shards import list_shards, partition_prefix, write_shard

DEDUP_KEY = ["platform", "engine", "backend", "dtype", "signature", "point_key"]
KILL_DEADLINE_S = 60.0
MERGE_PROCESS_TIMEOUT_S = 120


def _version_key(text):
    """Reference version order, written independently of the merge module."""
    try:
        return (1, Version(text))
    except InvalidVersion:
        return (0, text)


def reference_snapshot(rows: list[dict]) -> set[tuple]:
    """The documented rule, applied row by row in plain Python."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row[c] for c in DEDUP_KEY)].append(row)
    winners = set()
    for members in groups.values():
        members.sort(key=lambda r: (r["_shard"], r["_position"]))
        members.sort(
            key=lambda r: (
                _version_key(r["engine_version"]),
                _version_key(r["torch_version"]),
                _version_key(r["cuda_version"]),
                r["n_samples"],
                r["created_at"],
                r["run_id"],
            ),
            reverse=True,
        )
        best = members[0]
        winners.add(tuple(best[c] for c in sorted(best) if not c.startswith("_")))
    return winners


def snapshot_rows(frame: pl.DataFrame) -> set[tuple]:
    rows = frame.to_arrow().to_pylist()
    return {tuple(r[c] for c in sorted(r)) for r in rows}


def random_store(root: Path, make, seed: int, shards: int = 14) -> tuple[LocalStore, list[dict]]:
    """Shards with heavy key overlap and ties at every level of the rule."""
    rng = random.Random(seed)
    store = LocalStore(root)
    stacks = [
        ("5.9.0", "2.11.0+cu130", "13.0"),
        ("5.17.0", "2.11.0+cu130", "12.8"),
        ("5.17.0", "2.11.0+cu130", "13.0"),
        ("5.17.0rc1", "2.13.0", "13.0"),
        ("5.17.0", "2.13.0", "13.0"),
        ("5.17.0", "2.9.1", "13.0"),
        ("unknown", "2.13.0", "13.0"),
    ]
    pool = [(f"op-{i}", t) for i in range(4) for t in (1, 2, 3)]
    times = [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=h) for h in range(2)]
    rows: list[dict] = []
    for index in range(shards):
        engine_version, torch_version, cuda_version = rng.choice(stacks)
        run_id = rng.choice(["run-a", "run-b", "run-c"])
        keys = rng.sample(pool, rng.randint(3, len(pool)))
        table = make(
            keys,
            run_id=run_id,
            engine_version=engine_version,
            torch_version=torch_version,
            cuda_version=cuda_version,
            backend=rng.choice(["paged|sdpa", "sdpa"]),
            n_samples=[rng.randint(1, 2) for _ in keys],
            created_at=[rng.choice(times) for _ in keys],
            latency_median_s=[rng.random() for _ in keys],
        )
        key = write_shard(store, table, run_id=run_id, chunk_index=index)
        for position, row in enumerate(table.to_pylist()):
            rows.append({**row, "_shard": key, "_position": position})
    return store, rows


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_snapshot_matches_the_documented_rule(tmp_path, shard_table, seed):
    store, rows = random_store(tmp_path, shard_table, seed)
    report = merge_store(store)
    frame, manifest = read_snapshot(store)
    expected = reference_snapshot(rows)
    assert snapshot_rows(frame) == expected
    assert report.rows_in == len(rows) == manifest["rows_in"]
    assert report.rows_out == len(expected) == frame.height
    assert report.duplicates_dropped == len(rows) - len(expected)
    assert frame.columns == pq.read_schema(store.url_for(list_shards(store)[0])).names


def test_versions_compare_as_versions_not_strings(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    for run, version in [("run-1", "5.9.0"), ("run-2", "5.17.0"), ("run-3", "5.17.0rc1")]:
        write_shard(
            store,
            shard_table(run_id=run, engine_version=version, n_samples=100 if run == "run-1" else 1),
            run_id=run,
            chunk_index=0,
        )
    merge_store(store)
    frame, _ = read_snapshot(store)
    assert set(frame["engine_version"]) == {"5.17.0"}
    assert frame.height == 3


def test_hash_collisions_are_settled_on_the_exact_key(tmp_path, shard_table):
    store, _rows = random_store(tmp_path, shard_table, seed=7, shards=20)
    shards = merge_module._scan_order(
        merge_module._inspect_all(store, list_shards(store), show=False)
    )
    frame = merge_module._key_frame(store, shards)
    exact = merge_module._select_winners(frame)
    for mask in (0, 1, 3):
        assert merge_module._select_winners(frame, hash_mask=mask).to_list() == exact.to_list()


def test_same_shards_give_the_same_snapshot(tmp_path, shard_table):
    store, _rows = random_store(tmp_path, shard_table, seed=11)
    merge_store(store)
    first, _ = read_snapshot(store)
    merge_store(store, force=True)
    second, manifest = read_snapshot(store)
    assert manifest["generation"] == 2
    assert first.equals(second)


def test_unchanged_store_makes_no_new_generation(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    assert merge_store(store).generation == 1
    again = merge_store(store)
    assert again.unchanged and again.generation == 1 and again.rows_out == 3
    write_shard(store, shard_table([("op-new", 5)]), run_id="run-a", chunk_index=1)
    report = merge_store(store)
    assert (report.generation, report.unchanged, report.rows_out) == (2, False, 4)


def test_old_generations_are_pruned(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    for _ in range(KEEP_GENERATIONS + 2):
        merge_store(store, force=True)
    manifests = [k for k in store.list_keys("snapshots/") if k.endswith(MANIFEST_NAME)]
    assert manifests == [generation_key(g, MANIFEST_NAME) for g in range(3, KEEP_GENERATIONS + 3)]
    assert snapshot_generation(store) == KEEP_GENERATIONS + 2


def _write_parquet(store, key: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.put_bytes(key, buffer.getvalue())


def _corrupt_pages(data: bytes) -> bytes:
    """Flip bytes inside the first column chunk's compressed payload; the footer stays valid."""
    column = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(0)
    spoiled = bytearray(data)
    start = column.data_page_offset + column.total_compressed_size // 2
    for index in range(start, start + 16):
        spoiled[index] ^= 0xFF
    return bytes(spoiled)


def test_bad_shards_are_quarantined_and_the_merge_goes_on(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    good = write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    prefix = partition_prefix("NVIDIA-H100-80GB-HBM3", "transformers", "paged|sdpa", "bfloat16")
    valid = store.get_bytes(good)
    bad = {
        prefix + "garbage.parquet": None,
        prefix + "truncated.parquet": None,
        prefix + "wrong-schema.parquet": None,
        prefix + "two-stacks.parquet": None,
        prefix + "bad-pages.parquet": None,
    }
    store.put_bytes(prefix + "garbage.parquet", b"definitely not parquet")
    store.put_bytes(prefix + "truncated.parquet", valid[: len(valid) // 2])
    _write_parquet(store, prefix + "wrong-schema.parquet", shard_table().drop_columns(["hostname"]))
    mixed = pa.concat_tables([shard_table(), shard_table([("op-x", 7)], torch_version="2.13.0")])
    _write_parquet(store, prefix + "two-stacks.parquet", mixed)
    big = shard_table([(f"op-{i}", t) for i in range(40) for t in range(1, 30)], run_id="run-z")
    key_z = write_shard(store, big, run_id="run-z", chunk_index=0)
    store.put_bytes(prefix + "bad-pages.parquet", _corrupt_pages(store.get_bytes(key_z)))
    store.delete(key_z)

    report = merge_store(store)

    assert sorted(report.quarantined) == sorted(bad)
    assert list_shards(store) == [good]
    for key in bad:
        assert store.exists("quarantine/" + key) and not store.exists(key)
    frame, manifest = read_snapshot(store)
    assert frame.height == 3 and report.rows_out == 3 and report.rows_in == 3
    assert sorted(manifest["quarantined"]) == sorted(bad)
    assert manifest["shards"] == [good]


def test_a_merge_that_would_shrink_the_snapshot_is_not_published(tmp_path, shard_table):
    db = tmp_path / "db"
    store = open_store(str(db))
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    lost = write_shard(store, shard_table([("op-c", 1), ("op-c", 2)]), run_id="run-a", chunk_index=1)
    assert merge_store(store).rows_out == 5
    store.put_bytes(lost, b"spoiled in place")
    before = store.list_keys("snapshots/")

    result = CliRunner().invoke(cli, ["merge", "--store", str(db)])

    assert result.exit_code == EXIT_SHRINK_REFUSED
    assert result.stdout == "" and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "would hold 3 rows, fewer than generation 1's 5" in result.stderr
    assert "to be quarantined (1)" in result.stderr and store.exists(lost) and lost in result.stderr
    assert store.list_keys("snapshots/") == before
    assert read_snapshot(store)[1]["generation"] == 1

    allowed = CliRunner().invoke(cli, ["merge", "--store", str(db), "--allow-shrink", "--output", "json"])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["rows_out"] == 3 and read_snapshot(store)[1]["generation"] == 2


def test_a_store_of_only_bad_shards_stops_with_one_line(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(partition_prefix("p", "e", "b", "d") + "x.parquet", b"junk")
    with pytest.raises(DoolyError, match="no readable shards"):
        merge_store(store)
    assert store.list_keys("snapshots/") == []


def test_merge_command_reports_in_json(tmp_path, shard_table):
    store = open_store(str(tmp_path / "db"))
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    write_shard(store, shard_table(n_samples=50), run_id="run-a", chunk_index=1)
    result = CliRunner().invoke(cli, ["merge", "--store", str(tmp_path / "db"), "--output", "json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["generation"] == 1
    assert (payload["rows_in"], payload["rows_out"], payload["duplicates_dropped"]) == (6, 3, 3)
    text = CliRunner().invoke(cli, ["merge", "--store", str(tmp_path / "db")])
    assert text.exit_code == 0 and "unchanged" in text.stdout


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda root: root.mkdir(), "holds no shards"),
        (lambda root: None, "does not exist"),
        (
            lambda root: (
                root.mkdir(),
                (root / "dooly-store.json").write_text('{"schema_version": 99}'),
            ),
            "schema version 99",
        ),
    ],
)
def test_merge_command_fails_in_one_line_with_exit_2(tmp_path, prepare, message):
    root = tmp_path / "db"
    prepare(root)
    result = CliRunner().invoke(cli, ["merge", "--store", str(root)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not root.exists() or not (root / "snapshots").exists()


def test_snapshots_of_another_schema_version_are_refused(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    merge_store(store)
    manifest_key = generation_key(1, MANIFEST_NAME)
    manifest = json.loads(store.get_bytes(manifest_key))
    manifest["schema_version"] = SCHEMA_VERSION + 1
    store.put_bytes(manifest_key, json.dumps(manifest).encode())
    with pytest.raises(DoolyError, match="snapshots of schema version"):
        read_snapshot(store)
    with pytest.raises(DoolyError, match="snapshots of schema version"):
        merge_store(store)


def test_no_snapshot_yet_is_one_line(tmp_path):
    with pytest.raises(DoolyError, match="no snapshot yet"):
        read_snapshot(LocalStore(tmp_path))
    assert snapshot_generation(LocalStore(tmp_path)) is None


def test_a_claimed_generation_is_skipped(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    dead_claim = {"claimed_at": (datetime.now(UTC) - timedelta(days=1)).isoformat()}
    store.put_if_absent(generation_key(1, CLAIM_NAME), json.dumps(dead_claim).encode())
    report = merge_store(store)
    assert report.generation == 2
    assert snapshot_generation(store) == 2
    # The dead claim was older than the stale limit, so the committed merge cleared it.
    assert not store.exists(generation_key(1, CLAIM_NAME))


def _check_consistent(store) -> None:
    """Every complete generation's data holds exactly what its manifest says."""
    for key in store.list_keys("snapshots/"):
        if key.endswith(MANIFEST_NAME):
            manifest = json.loads(store.get_bytes(key))
            data = pl.read_parquet(
                store.url_for(manifest["data_key"]),
                storage_options=store.storage_options() or None,
            )
            assert data.height == manifest["rows_out"]
            assert data.select(DEDUP_KEY).is_duplicated().sum() == 0


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_racing_merges_leave_a_consistent_store(request, tmp_path, shard_table, backend):
    uri = str(tmp_path / "db") if backend == "local" else request.getfixturevalue("moto_uri")
    store = open_store(uri)
    store_rows = []
    for index in range(6):
        table = shard_table([(f"op-{index % 3}", t) for t in range(1, 6)], n_samples=index)
        write_shard(store, table, run_id="run-a", chunk_index=index)
        store_rows.extend(table.to_pylist())
    reports, errors = [], []
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        try:
            reports.append(merge_store(open_store(uri, create=False), force=True))
        except DoolyError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(MERGE_PROCESS_TIMEOUT_S)
    assert not errors
    assert sorted(r.generation for r in reports) == [1, 2, 3]
    _check_consistent(store)
    frame, manifest = read_snapshot(store)
    assert manifest["generation"] == 3 and frame.height == 15


def _merge_process(uri: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dooly.cli", "merge", "--store", uri, "--force"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_merge_killed_half_way_leaves_the_previous_generation(tmp_path, shard_table):
    store = open_store(str(tmp_path / "db"))
    keys = [(f"op-{i}", t) for i in range(100) for t in range(1, 40)]
    for index in range(8):
        write_shard(store, shard_table(keys, n_samples=index), run_id="run-a", chunk_index=index)
    merge_store(store)
    before, _ = read_snapshot(store)
    killed_mid_merge = []
    for delay in (0.0, 0.2, 0.5):
        generation = snapshot_generation(store) + 1
        process = _merge_process(store.uri)
        deadline = time.monotonic() + KILL_DEADLINE_S
        claim = Path(store.url_for(generation_key(generation, CLAIM_NAME)))
        while not claim.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(MERGE_PROCESS_TIMEOUT_S)
        if process.returncode == -signal.SIGKILL and not store.exists(
            generation_key(generation, MANIFEST_NAME)
        ):
            killed_mid_merge.append(generation)
        _check_consistent(store)
        frame, manifest = read_snapshot(store)
        assert frame.sort(DEDUP_KEY).equals(before.sort(DEDUP_KEY))
        assert manifest["generation"] == snapshot_generation(store)
    assert killed_mid_merge
    report = merge_store(store, force=True)
    assert report.generation == snapshot_generation(store) > max(killed_mid_merge)
    for generation in killed_mid_merge:
        assert not store.exists(generation_key(generation, MANIFEST_NAME))
    frame, _ = read_snapshot(store)
    assert frame.sort(DEDUP_KEY).equals(before.sort(DEDUP_KEY))


def test_a_failed_merge_removes_its_claim_and_data(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    # A directory where the data file must go: the upload fails after the claim is taken.
    Path(store.url_for(generation_key(1, "data.parquet"))).mkdir(parents=True)
    with pytest.raises(DoolyError) as info:
        merge_store(store)
    assert "cannot write snapshots/gen-000001/data.parquet" in str(info.value)
    assert "\n" not in str(info.value)
    assert store.list_keys("snapshots/") == []
    assert snapshot_generation(store) is None
