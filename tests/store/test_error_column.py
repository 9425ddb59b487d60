"""The optional `error` column: shards written before it (the committed stores under data/) read and
merge beside shards that carry it, unchanged on disk and with no schema-version bump."""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dooly import SCHEMA_VERSION
from dooly.store.backends import LocalStore
from dooly.store.merge import merge_store, read_snapshot
from dooly.store.schema import OPTIONAL_COLUMNS, SHARD_SCHEMA
from dooly.store.shards import read_held, schema_problem, write_shard

ROOT = Path(__file__).resolve().parents[2]
# A committed H100 shard written before the `error` column: gemma-2's soft-capped flex points,
# 84 of its 94 rows failed, 10 held.
COMMITTED_SHARD = (
    "shards/platform=NVIDIA-H100-80GB-HBM3/engine=transformers/backend=paged~7Cflex_attention/dtype=bfloat16/"
    "20261124T152303Z-dc8360b2-00003-e077bfc5745e98ce.parquet"
)
PARTITION = {"platform": "NVIDIA-H100-80GB-HBM3", "engine": "transformers", "backend": "paged|flex_attention",
             "dtype": "bfloat16"}
NEW_RUN = "20261207T000000Z-newrun01"
# Points of the committed shard measured again by the new run, each failing with this text.
REMEASURED = 5
ERROR_TEXT = "RuntimeError: InductorError: LoweringException: soft-cap score_mod under dynamic shapes"


def _key(row: dict) -> tuple[str, str]:
    return row["signature"], row["point_key"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mixed_store(tmp_path: Path) -> tuple[LocalStore, Path, pa.Table]:
    """A store holding the committed shard as committed, and a new shard (with the column) that
    measures its first REMEASURED points again, later, on the same stack: each a failed row with text."""
    source = ROOT / "data" / "h100" / "db" / COMMITTED_SHARD
    copy = tmp_path / COMMITTED_SHARD
    copy.parent.mkdir(parents=True)
    shutil.copyfile(source, copy)
    old = pq.read_table(copy)
    new = old.slice(0, REMEASURED).drop_columns(["run_id", "created_at", "status"])
    new = (new.append_column("status", pa.array(["error"] * REMEASURED))
           .append_column("run_id", pa.array([NEW_RUN] * REMEASURED))
           .append_column("created_at", pa.array([datetime.now(UTC)] * REMEASURED, pa.timestamp("us", tz="UTC")))
           .append_column("error", pa.array([ERROR_TEXT] * REMEASURED))
           .select(SHARD_SCHEMA.names))
    store = LocalStore(tmp_path)
    write_shard(store, new, run_id=NEW_RUN, chunk_index=0)
    return store, copy, old


def test_the_committed_shard_predates_the_column_at_the_current_schema_version(mixed_store):
    _store, copy, old = mixed_store
    schema = pq.read_schema(copy)
    assert "error" not in schema.names and "error" in OPTIONAL_COLUMNS
    assert schema.metadata[b"dooly.schema_version"] == str(SCHEMA_VERSION).encode()
    assert schema_problem(schema) is None
    assert pc.sum(pc.equal(old["status"], "error")).as_py() > REMEASURED


def test_read_held_reads_both_shapes_with_nulls_for_the_old_one(mixed_store):
    store, _copy, old = mixed_store
    held = read_held(store, **PARTITION)
    assert held.num_rows == old.num_rows + REMEASURED
    errors = held.column("error").to_pylist()
    assert errors.count(ERROR_TEXT) == REMEASURED
    assert errors.count(None) == old.num_rows


def test_merge_keeps_both_shapes_and_the_newer_rows_text(mixed_store):
    store, copy, old = mixed_store
    before = _digest(copy)
    report = merge_store(store)
    assert report.quarantined == []
    assert (report.rows_in, report.rows_out) == (old.num_rows + REMEASURED, old.num_rows)
    frame, _manifest = read_snapshot(store)
    assert frame.columns == SHARD_SCHEMA.names
    remeasured = {_key(row) for row in old.to_pylist()[:REMEASURED]}
    by_key = {_key(row): row for row in frame.to_dicts()}
    assert {key for key, row in by_key.items() if row["error"] is not None} == remeasured
    assert all(by_key[key]["error"] == ERROR_TEXT and by_key[key]["run_id"] == NEW_RUN for key in remeasured)
    # The old rows that won are the committed rows, column for column.
    for row in old.to_pylist()[REMEASURED:]:
        assert by_key[_key(row)] == {**row, "error": None}
    assert _digest(copy) == before


def test_a_shard_missing_a_required_column_is_still_refused(mixed_store):
    _store, copy, _old = mixed_store
    assert "missing column(s) hostname" in schema_problem(pq.read_table(copy).drop_columns(["hostname"]).schema)
