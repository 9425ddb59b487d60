"""Shards: the Parquet files profiler runs write, one software stack each, in a partitioned layout.

    shards/platform=<p>/engine=<e>/backend=<b>/dtype=<d>/<run_id>-<chunk>-<identity>.parquet

Partition values are escaped reversibly ("~" plus two hex digits for every byte outside
[A-Za-z0-9._-]), so "paged|sdpa" or a GPU name with spaces and slashes round-trip, and no "%"
reaches a URL parser that would decode it. The file name is a pure function of the run id, the chunk
index and the identities (signature, point_key) of the rows: a retried upload of the same chunk,
even re-measured, lands on the same key and replaces the first, so retries never duplicate rows.

This module uses pyarrow only (no polars, no boto3): the GPU image writes shards with it.
"""

from __future__ import annotations

import hashlib
import io
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dooly import SCHEMA_VERSION
from dooly.store.backends import Store
from dooly.store.keys import escape_value, unescape_value
from dooly.store.schema import OPTIONAL_COLUMNS, SHARD_SCHEMA, STACK_COLUMNS

logger = logging.getLogger(__name__)

SHARDS_PREFIX = "shards/"
INVENTORIES_PREFIX = "inventories/"
SHARD_SUFFIX = ".parquet"
PARTITION_COLUMNS = ("platform", "engine", "backend", "dtype")
# What the planner needs to decide whether a point is already held, and what it cost; the readable
# signature tells its feature set, which failure rules are learned on (`plan.failure_key`), and a
# failed row's error text why it failed; the op, its dims and request and the measured latency
# price points by their kernel's latency (`dooly.profile.latency`).
HELD_COLUMNS = ("signature", "op", "op_class", "signature_json", "config_dims", "request_vars", "T", "B", "K", "D",
                "point_key", "status", "device_seconds", "latency_median_s", "n_samples", "run_id", *STACK_COLUMNS,
                "error")
IDENTITY_HEX_CHARS = 16
CHUNK_INDEX_DIGITS = 5
PARQUET_COMPRESSION = "zstd"


def partition_prefix(platform: str, engine: str, backend: str, dtype: str) -> str:
    """The key prefix holding every shard of one platform/engine/backend/dtype."""
    values = dict(zip(PARTITION_COLUMNS, (platform, engine, backend, dtype), strict=True))
    return SHARDS_PREFIX + "".join(f"{k}={escape_value(v)}/" for k, v in values.items())


def parse_partition(key: str) -> dict[str, str]:
    """The partition values a shard key encodes (inverse of `partition_prefix`)."""
    if not key.startswith(SHARDS_PREFIX):
        raise ValueError(f"{key!r} is not a shard key")
    values = {}
    for part in key[len(SHARDS_PREFIX) :].split("/")[: len(PARTITION_COLUMNS)]:
        name, sep, value = part.partition("=")
        if not sep or name not in PARTITION_COLUMNS:
            raise ValueError(f"{key!r} is not a shard key")
        values[name] = unescape_value(value)
    if tuple(values) != PARTITION_COLUMNS:
        raise ValueError(f"{key!r} is not a shard key")
    return values


def list_shards(store: Store) -> list[str]:
    """Every shard key in the store, sorted."""
    return [k for k in store.list_keys(SHARDS_PREFIX) if k.endswith(SHARD_SUFFIX)]


def schema_problem(
    schema: pa.Schema, *, strict_nullability: bool = True, require_optional: bool = False
) -> str | None:
    """Why a schema is not SHARD_SCHEMA, or None when it is.

    Written shards must match exactly; a table handed to `write_shard` may leave its fields
    nullable (as tables built without an explicit schema do) since its null counts are checked,
    and leave a nullable column that holds only nulls untyped (such a table infers type null).
    A shard written before an OPTIONAL_COLUMNS column existed lacks it and still matches, unless
    `require_optional` (what `write_shard` asks of the tables it is given).
    """
    version = (schema.metadata or {}).get(b"dooly.schema_version")
    if version is not None and version.decode() != str(SCHEMA_VERSION):
        return f"schema version {version.decode()}, expected {SCHEMA_VERSION}"
    actual = {f.name: f for f in schema}
    expected = {f.name: f for f in SHARD_SCHEMA
                if require_optional or f.name not in OPTIONAL_COLUMNS or f.name in actual}
    missing = [name for name in expected if name not in actual]
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    extra = [name for name in actual if name not in expected]
    if extra:
        return f"unexpected column(s) {', '.join(extra)}"
    for name, field in expected.items():
        untyped_nulls = not strict_nullability and field.nullable and pa.types.is_null(actual[name].type)
        if actual[name].type != field.type and not untyped_nulls:
            return f"column {name} is {actual[name].type}, expected {field.type}"
        if strict_nullability and actual[name].nullable and not field.nullable:
            return f"column {name} is nullable, expected non-null"
    if schema.names != list(expected):
        return "columns are not in schema order"
    return None


def _validate(table: pa.Table, run_id: str) -> None:
    problem = schema_problem(table.schema.remove_metadata(), strict_nullability=False, require_optional=True)
    if problem:
        raise ValueError(f"shard table does not match SHARD_SCHEMA: {problem}")
    if table.num_rows == 0:
        raise ValueError("a shard needs at least one row")
    for field in SHARD_SCHEMA:
        if not field.nullable and table.column(field.name).null_count:
            raise ValueError(f"shard column {field.name} holds nulls")
    stacks = table.select(list(STACK_COLUMNS)).group_by(list(STACK_COLUMNS)).aggregate([])
    if stacks.num_rows != 1:
        raise ValueError(f"a shard holds one software stack; this table holds {stacks.num_rows}")
    versions = pc.unique(table.column("schema_version")).to_pylist()
    if versions != [SCHEMA_VERSION]:
        raise ValueError(f"shard rows carry schema_version {versions}, expected {SCHEMA_VERSION}")
    run_ids = pc.unique(table.column("run_id")).to_pylist()
    if run_ids != [run_id]:
        raise ValueError(f"shard rows carry run_id {run_ids}, expected {run_id!r}")


def _identity_digest(table: pa.Table) -> str:
    """A hash of the sorted (signature, point_key) pairs: what rows the shard is about."""
    pairs = table.select(["signature", "point_key"]).sort_by(
        [("signature", "ascending"), ("point_key", "ascending")]
    )
    digest = hashlib.sha256()
    signatures = pairs.column("signature").to_pylist()
    for signature, point_key in zip(signatures, pairs.column("point_key").to_pylist(), strict=True):
        digest.update(signature.encode())
        digest.update(b"\0")
        digest.update(point_key.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:IDENTITY_HEX_CHARS]


def shard_key(table: pa.Table, *, run_id: str, chunk_index: int) -> str:
    """The deterministic key `write_shard` uses for this table."""
    first = {name: table.column(name)[0].as_py() for name in PARTITION_COLUMNS}
    name = (
        f"{escape_value(run_id)}-{chunk_index:0{CHUNK_INDEX_DIGITS}d}-"
        f"{_identity_digest(table)}{SHARD_SUFFIX}"
    )
    return partition_prefix(**first) + name


def write_shard(store: Store, table: pa.Table, *, run_id: str, chunk_index: int) -> str:
    """Validate `table` against SHARD_SCHEMA and write it as one shard; returns its key.

    ValueError for a table that breaks the contract (a programming error in the caller, not a
    user error): wrong columns or types, nulls, no rows, several stacks, another run id.
    """
    if chunk_index < 0:
        raise ValueError("chunk_index must be >= 0")
    _validate(table, run_id)
    table = table.cast(SHARD_SCHEMA)
    key = shard_key(table, run_id=run_id, chunk_index=chunk_index)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=PARQUET_COMPRESSION)
    store.put_bytes(key, buffer.getvalue())
    logger.info("wrote shard %s (%d rows)", key, table.num_rows)
    return key


def read_held(store: Store, *, platform: str, engine: str, backend: str, dtype: str) -> pa.Table:
    """What the store already holds for one partition: HELD_COLUMNS of every readable shard.

    Only those columns are read (footer plus their column chunks); an OPTIONAL_COLUMNS column a
    shard predates reads as nulls. A corrupt shard or one of another schema is skipped with a
    warning: the merge job quarantines it, the planner just re-measures.
    """
    columns = list(HELD_COLUMNS)
    tables = []
    for key in store.list_keys(partition_prefix(platform, engine, backend, dtype)):
        if not key.endswith(SHARD_SUFFIX):
            continue
        try:
            with store.open_binary(key) as handle:
                parquet = pq.ParquetFile(handle)
                problem = schema_problem(parquet.schema_arrow)
                if problem:
                    raise ValueError(problem)
                present = set(parquet.schema_arrow.names)
                tables.append(_with_optional_columns(parquet.read(columns=[c for c in columns if c in present]),
                                                     columns))
        except (OSError, ValueError, pa.ArrowException) as exc:
            logger.warning("skipping unreadable shard %s: %s", key, exc)
    if not tables:
        return SHARD_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)


def _with_optional_columns(table: pa.Table, columns: list[str]) -> pa.Table:
    """`table` with the OPTIONAL_COLUMNS among `columns` it lacks added as nulls, in `columns` order:
    shards that predate a column concatenate with those that have it."""
    for name in OPTIONAL_COLUMNS:
        if name in columns and name not in table.column_names:
            field = SHARD_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(columns)
