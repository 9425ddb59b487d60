"""Shard layout, validation, idempotent keys and the planner's read of what is held."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dooly.store.backends import LocalStore
from dooly.store.documents import read_json, write_json
from dooly.store.schema import SHARD_SCHEMA, STACK_COLUMNS
from dooly.store.shards import (
    HELD_COLUMNS,
    escape_value,
    list_shards,
    parse_partition,
    partition_prefix,
    read_held,
    unescape_value,
    write_shard,
)

TRICKY_VALUES = [
    "paged|sdpa",
    "NVIDIA H100 80GB HBM3",
    "Intel(R) Xeon(R) Platinum 8480+ @ 2.0GHz",
    "a/b=c",
    "~7C",
    "..",
    "é-µ",
    "100%",
]


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_partition_values_round_trip_and_stay_path_safe(value):
    escaped = escape_value(value)
    assert unescape_value(escaped) == value
    assert set(escaped) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-~")
    prefix = partition_prefix(value, "transformers", value, "bfloat16")
    assert prefix.count("/") == 5
    values = parse_partition(prefix + "run-00000-x.parquet")
    assert values == {
        "platform": value,
        "engine": "transformers",
        "backend": value,
        "dtype": "bfloat16",
    }


def test_distinct_values_never_share_a_partition():
    escaped = {escape_value(v) for v in TRICKY_VALUES + ["paged_sdpa", "paged-sdpa", "paged~sdpa"]}
    assert len(escaped) == len(TRICKY_VALUES) + 3


def test_write_shard_lands_in_its_partition_and_reads_back(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    table = shard_table(backend="paged|eager", platform="NVIDIA H200")
    key = write_shard(store, table, run_id="run-a", chunk_index=0)
    assert key.startswith(
        partition_prefix("NVIDIA H200", "transformers", "paged|eager", "bfloat16")
    )
    written = pq.read_table(store.url_for(key))
    assert written.schema.equals(SHARD_SCHEMA, check_metadata=True)
    assert written.equals(table)


def test_a_retried_chunk_overwrites_instead_of_duplicating(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    first = write_shard(store, shard_table(), run_id="run-a", chunk_index=3)
    remeasured = shard_table(latency_median_s=[5.0, 6.0, 7.0], n_samples=20)
    second = write_shard(store, remeasured, run_id="run-a", chunk_index=3)
    assert first == second
    assert list_shards(store) == [first]
    assert pq.read_table(store.url_for(first)).column("n_samples").to_pylist() == [20, 20, 20]


def test_different_chunks_or_rows_get_different_keys(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    keys = {
        write_shard(store, shard_table(), run_id="run-a", chunk_index=0),
        write_shard(store, shard_table(), run_id="run-a", chunk_index=1),
        write_shard(store, shard_table([("op-z", 9)]), run_id="run-a", chunk_index=0),
        write_shard(store, shard_table(run_id="run-b"), run_id="run-b", chunk_index=0),
    }
    assert len(keys) == 4
    assert len(list_shards(store)) == 4


def _replace(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda t: t.drop_columns(["hostname"]), "missing column"),
        # Optional for readers (shards written before it), never for a writer.
        (lambda t: t.drop_columns(["error"]), "missing column"),
        (lambda t: t.append_column("extra", pa.array([1, 2, 3])), "unexpected column"),
        (lambda t: _replace(t, "T", pa.array([1.0, 2.0, 3.0])), "column T is double"),
        (lambda t: _replace(t, "status", pa.array(["ok", None, "ok"])), "holds nulls"),
        (lambda t: t.slice(0, 0), "at least one row"),
        (
            lambda t: _replace(t, "torch_version", pa.array(["2.11", "2.11", "2.13"])),
            "one software stack",
        ),
        (lambda t: _replace(t, "run_id", pa.array(["run-x"] * 3)), "run_id"),
        (lambda t: _replace(t, "schema_version", pa.array([99] * 3)), "schema_version"),
    ],
)
def test_write_shard_refuses_tables_that_break_the_contract(tmp_path, shard_table, spoil, message):
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError, match=message):
        write_shard(store, spoil(shard_table()), run_id="run-a", chunk_index=0)
    assert store.list_keys("") == []


def test_write_shard_accepts_tables_built_without_the_explicit_schema(tmp_path, shard_table):
    store = LocalStore(tmp_path)
    loose = pa.Table.from_pylist(shard_table().to_pylist())
    key = write_shard(store, loose, run_id="run-a", chunk_index=0)
    assert pq.read_schema(store.url_for(key)).equals(SHARD_SCHEMA, check_metadata=True)


def test_read_held_reads_one_partition_and_skips_corrupt_shards(tmp_path, shard_table, caplog):
    store = LocalStore(tmp_path)
    write_shard(store, shard_table(), run_id="run-a", chunk_index=0)
    write_shard(store, shard_table([("op-c", 4)], run_id="run-b"), run_id="run-b", chunk_index=0)
    write_shard(store, shard_table(backend="sdpa"), run_id="run-a", chunk_index=0)
    prefix = partition_prefix("NVIDIA-H100-80GB-HBM3", "transformers", "paged|sdpa", "bfloat16")
    store.put_bytes(prefix + "broken.parquet", b"not parquet at all")
    with caplog.at_level(logging.WARNING, logger="dooly.store.shards"):
        held = read_held(
            store,
            platform="NVIDIA-H100-80GB-HBM3",
            engine="transformers",
            backend="paged|sdpa",
            dtype="bfloat16",
        )
    assert held.column_names == list(HELD_COLUMNS)
    assert held.num_rows == 4
    assert set(held.column("backend").to_pylist()) == {"paged|sdpa"}
    assert "broken.parquet" in caplog.text
    assert set(HELD_COLUMNS) >= set(STACK_COLUMNS)


def test_read_held_of_an_empty_partition_is_an_empty_table(tmp_path):
    held = read_held(LocalStore(tmp_path), platform="x", engine="y", backend="z", dtype="w")
    assert held.num_rows == 0
    assert held.column_names == list(HELD_COLUMNS)


def test_json_documents_round_trip(tmp_path):
    store = LocalStore(tmp_path)
    assert read_json(store, "inventories/llama.json") is None
    write_json(store, "inventories/llama.json", {"ops": [1, 2], "model": "llama"})
    assert read_json(store, "inventories/llama.json") == {"ops": [1, 2], "model": "llama"}
