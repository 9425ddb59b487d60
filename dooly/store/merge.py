"""Merge: compact every shard of a store into one deduplicated snapshot generation.

Deduplication. Rows are the same measurement when they agree on
(platform, engine, backend, dtype, signature, point_key). Of each such group one row wins, by:
  1. the newest software stack: engine_version, then torch_version, then cuda_version, each
     compared as a version (PEP 440: "5.17.0" > "5.17.0rc1" > "5.16.1"; a string that is not a
     version sorts below every version, and among such strings by byte order);
  2. then the most samples (n_samples);
  3. then the latest created_at;
  4. then the greatest run_id (byte order);
  5. then the first in shard-key order, and within a shard the first row.
The rule is a total order, so the same shards always give the same snapshot.

Generations. A merge claims generation N by creating snapshots/gen-N/claim.json with an atomic
create; a merge that loses the claim to a racing merge tries N+1 (a few times, then gives up with
one line). The claimer writes snapshots/gen-N/data.parquet (atomic), then
snapshots/gen-N/manifest.json (atomic create). A generation is complete when its manifest exists:
readers take the newest complete generation, so they see a whole generation or the previous one.
A merge that fails removes its claim and data; one killed at any point leaves at most a claim and a
data file without a manifest, which readers ignore and later merges skip and, once stale, delete.

Shards that cannot be read or do not match the shard schema are moved under quarantine/ (same key
below it) and named in the report; the merge goes on without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from packaging.version import InvalidVersion, Version

from dooly import SCHEMA_VERSION, __version__
from dooly.errors import DoolyError, ShrinkRefused
from dooly.output import progress as progress_bar
from dooly.store.backends import Store
from dooly.store.schema import SHARD_SCHEMA, STACK_COLUMNS
from dooly.store.shards import PARTITION_COLUMNS, list_shards, schema_problem

logger = logging.getLogger(__name__)

SNAPSHOTS_PREFIX = "snapshots/"
QUARANTINE_PREFIX = "quarantine/"
DATA_NAME = "data.parquet"
MANIFEST_NAME = "manifest.json"
CLAIM_NAME = "claim.json"
GENERATION_DIGITS = 6
DEDUP_KEY = (*PARTITION_COLUMNS, "signature", "point_key")
VERSION_COLUMNS = ("engine_version", "torch_version", "cuda_version")
# Complete generations kept after a merge (older ones are deleted), so a reader that picked a
# generation a moment ago still finds its data.
KEEP_GENERATIONS = 3
# A claim this old without a manifest belongs to a merge that died (a merge takes about a minute).
STALE_CLAIM_S = 3600.0
MAX_CLAIM_ATTEMPTS = 8
# Parallel footer reads: I/O bound (an S3 round trip each), so more threads than cores.
FOOTER_READERS = 8
SNAPSHOT_COMPRESSION: Final = "zstd"
# Helper columns of the merge (never written to the snapshot).
ROW_INDEX = "__dooly_row"
PART = "__dooly_partition"
STACK = "__dooly_stack_rank"
HASH = "__dooly_key_hash"
HASH_MASK = 2**64 - 1
# Constant within a shard (one software stack, one run): read from footers, not rows.
SHARD_CONSTANT_COLUMNS = (*STACK_COLUMNS, "run_id")
# What every shard is scanned as: a shard written before an OPTIONAL_COLUMNS column existed gets it
# as nulls (polars would otherwise take the first file's columns and refuse every other shape).
SCAN_SCHEMA = pl.DataFrame(SHARD_SCHEMA.empty_table()).schema


@dataclass
class MergeReport:
    """What one merge did (or found, when nothing had changed since the last generation)."""

    generation: int
    shards_consumed: int
    rows_in: int
    rows_out: int
    duplicates_dropped: int
    quarantined: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unchanged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generation_key(generation: int, name: str) -> str:
    """The key of one file of a snapshot generation."""
    return f"{SNAPSHOTS_PREFIX}gen-{generation:0{GENERATION_DIGITS}d}/{name}"


def _generations(store: Store) -> dict[int, set[str]]:
    """Every generation directory in the store and the file names it holds."""
    found: dict[int, set[str]] = {}
    for key in store.list_keys(SNAPSHOTS_PREFIX):
        parts = key[len(SNAPSHOTS_PREFIX) :].split("/")
        if len(parts) == 2 and parts[0].startswith("gen-") and parts[0][len("gen-") :].isdigit():
            found.setdefault(int(parts[0][len("gen-") :]), set()).add(parts[1])
    return found


def _complete(generations: dict[int, set[str]]) -> list[int]:
    return sorted(g for g, names in generations.items() if MANIFEST_NAME in names)


def _read_manifest(store: Store, generation: int) -> dict[str, Any]:
    key = generation_key(generation, MANIFEST_NAME)
    try:
        manifest = json.loads(store.get_bytes(key))
    except ValueError as exc:
        raise DoolyError(f"store {store.uri}: {key} is not valid JSON") from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DoolyError(
            f"store {store.uri} holds snapshots of schema version {version}; this Dooly reads "
            f"version {SCHEMA_VERSION}"
        )
    return manifest


def _latest(store: Store) -> tuple[int, dict[str, Any]] | None:
    complete = _complete(_generations(store))
    if not complete:
        return None
    return complete[-1], _read_manifest(store, complete[-1])


def snapshot_generation(store: Store) -> int | None:
    """The newest complete generation, or None before the first merge."""
    complete = _complete(_generations(store))
    return complete[-1] if complete else None


def scan_snapshot(store: Store) -> tuple[pl.LazyFrame, dict[str, Any]]:
    """A lazy scan of the newest complete generation and its manifest (filters push down)."""
    latest = _latest(store)
    if latest is None:
        raise DoolyError(
            f"store {store.uri} has no snapshot yet: run `dooly merge --store {store.uri}`"
        )
    _generation, manifest = latest
    frame = pl.scan_parquet(
        store.url_for(manifest["data_key"]),
        storage_options=store.storage_options() or None,
        hive_partitioning=False,
        glob=False,
    )
    return frame, manifest


def read_snapshot(store: Store) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The newest complete generation, loaded, and its manifest."""
    frame, manifest = scan_snapshot(store)
    return frame.collect(), manifest


@dataclass
class _Shard:
    """One shard as its footer describes it; `problem` says why it cannot be merged."""

    key: str
    rows: int = 0
    problem: str | None = None
    vanished: bool = False
    stack: dict[str, Any] = field(default_factory=dict)

    @property
    def partition(self) -> tuple[str, ...]:
        return tuple(self.stack[c] for c in PARTITION_COLUMNS)

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(self.stack[c] for c in VERSION_COLUMNS)


def _constant_columns(parquet: pq.ParquetFile, names: tuple[str, ...]) -> dict[str, Any]:
    """The single value each column holds, from the footer statistics when every row group has
    them (pyarrow writes exact min/max), else by reading the columns. ValueError if not constant."""
    metadata = parquet.metadata
    positions = {name: parquet.schema_arrow.get_field_index(name) for name in names}
    values: dict[str, Any] = {}
    for name, position in positions.items():
        seen: set[Any] = set()
        from_footer = True
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(position).statistics
            if stats is None or not stats.has_min_max:
                from_footer = False
                break
            seen.update((stats.min, stats.max))
        if not from_footer:
            seen = set(parquet.read(columns=[name]).column(name).unique().to_pylist())
        if len(seen) != 1:
            raise ValueError(f"column {name} is not constant: a shard holds one software stack")
        values[name] = seen.pop()
    return values


def _inspect(store: Store, key: str) -> _Shard:
    """Read one shard's footer: its row count and stack, or why it cannot be merged."""
    try:
        with store.open_binary(key) as handle:
            parquet = pq.ParquetFile(handle)
            problem = schema_problem(parquet.schema_arrow)
            if problem:
                return _Shard(key, problem=problem)
            if parquet.metadata.num_rows == 0:
                return _Shard(key, problem="holds no rows")
            stack = _constant_columns(parquet, SHARD_CONSTANT_COLUMNS)
            return _Shard(key, parquet.metadata.num_rows, stack=stack)
    except FileNotFoundError:
        return _Shard(key, vanished=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return _Shard(key, problem=f"unreadable ({type(exc).__name__}: {exc})")


def _inspect_all(store: Store, keys: list[str], *, show: bool) -> list[_Shard]:
    with ThreadPoolExecutor(FOOTER_READERS) as pool, _bar(show, len(keys), "reading shards") as bar:
        results = []
        for shard in pool.map(lambda k: _inspect(store, k), keys):
            results.append(shard)
            bar.update(1)
    return results


def _find_corrupt(store: Store, shards: list[_Shard]) -> list[_Shard]:
    """The shards whose data (not only footer) cannot be decoded: read each one in full."""
    corrupt = []
    for shard in shards:
        try:
            with store.open_binary(shard.key) as handle:
                pq.read_table(handle)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, pa.ArrowException) as exc:
            shard.problem = f"corrupt data ({type(exc).__name__}: {exc})"
            corrupt.append(shard)
    return corrupt


class _NoBar:
    def update(self, _steps: int) -> None:
        return None


@contextmanager
def _bar(show: bool, length: int, label: str) -> Iterator[Any]:
    if not show:
        yield _NoBar()
        return
    with progress_bar(range(length), length=length, label=label) as bar:
        yield bar


def _quarantine(store: Store, problems: Iterable[_Shard]) -> list[str]:
    moved = []
    for shard in problems:
        logger.warning("quarantining shard %s: %s", shard.key, shard.problem)
        try:
            store.move(shard.key, QUARANTINE_PREFIX + shard.key)
        except FileNotFoundError:
            continue
        moved.append(shard.key)
    return moved


def _version_order(text: str) -> tuple:
    try:
        return (1, Version(text), text)
    except InvalidVersion:
        return (0, text)


def _scan_order(shards: list[_Shard]) -> list[_Shard]:
    """Partition, then greatest run_id, then shard key: the global row index of a scan in this
    order is then the rule's last tiebreaks (run_id, shard key, row in shard) in one number."""
    ordered = sorted(shards, key=lambda s: s.key)
    ordered.sort(key=lambda s: s.stack["run_id"], reverse=True)
    ordered.sort(key=lambda s: s.partition)
    return ordered


def _key_frame(store: Store, shards: list[_Shard]) -> pl.DataFrame:
    """Pass one: only what deciding the winners needs, one row per shard row, in scan order.

    Per-shard constants (partition, stack) come from the footers and are spread over the rows
    here rather than read (and decoded) ten million times.
    """
    frame = (
        _scan(store, [s.key for s in shards])
        .select(ROW_INDEX, "signature", "point_key", "n_samples", "created_at")
        .collect()
    )
    rows = np.array([s.rows for s in shards], dtype=np.int64)
    if frame.height != int(rows.sum()):
        raise DoolyError(
            f"store {store.uri}: shards changed while the merge read them; run the merge again"
        )
    partitions = {p: i for i, p in enumerate(sorted({s.partition for s in shards}))}
    versions = sorted(
        {s.versions for s in shards}, key=lambda v: tuple(_version_order(x) for x in v)
    )
    stack_rank = {v: i for i, v in enumerate(versions)}
    return frame.with_columns(
        pl.Series(PART, np.repeat([partitions[s.partition] for s in shards], rows), pl.UInt32),
        pl.Series(STACK, np.repeat([stack_rank[s.versions] for s in shards], rows), pl.UInt32),
    )


def _select_winners(frame: pl.DataFrame, *, hash_mask: int = HASH_MASK) -> pl.Series:
    """The ROW_INDEX of each key's winner, ascending.

    Rows are grouped by a 64-bit hash of the key and sorted by (hash, rule): numbers only, which is
    several times faster than sorting strings. Two different keys sharing a hash are caught by
    comparing neighbours after the sort, and those hash groups alone are then settled on the exact
    key columns, so the result is exact whatever the hash does.
    """
    rule = [STACK, "n_samples", "created_at", ROW_INDEX]
    descending = [True, True, True, False]
    exact_key = [PART, "signature", "point_key"]
    ordered = frame.with_columns((pl.struct(exact_key).hash() & hash_mask).alias(HASH)).sort(
        [HASH, *rule], descending=[False, *descending]
    )
    new_hash = pl.col(HASH) != pl.col(HASH).shift(1)
    new_key = pl.any_horizontal([pl.col(c) != pl.col(c).shift(1) for c in exact_key])
    flags = ordered.select(
        new_hash.fill_null(True).alias("new_hash"), new_key.fill_null(True).alias("new_key")
    )
    collided = ordered.filter(~flags["new_hash"] & flags["new_key"])[HASH].unique()
    if collided.is_empty():
        winners = ordered.filter(flags["new_hash"])[ROW_INDEX]
    else:
        logger.info("%d key hash collisions; settling them on the exact key", collided.len())
        clean = ordered.filter(flags["new_hash"] & ~pl.col(HASH).is_in(collided.implode()))
        exact = (
            ordered.filter(pl.col(HASH).is_in(collided.implode()))
            .sort([*exact_key, *rule], descending=[False] * len(exact_key) + descending)
            .unique(subset=exact_key, keep="first", maintain_order=True)
        )
        winners = pl.concat([clean[ROW_INDEX], exact[ROW_INDEX]])
    return winners.sort()


def _scan(store: Store, keys: list[str]) -> pl.LazyFrame:
    return pl.scan_parquet(
        [store.url_for(k) for k in keys],
        storage_options=store.storage_options() or None,
        hive_partitioning=False,
        glob=False,
        row_index_name=ROW_INDEX,
        schema=SCAN_SCHEMA,
        missing_columns="insert",
    )


def _write_snapshot(store: Store, shards: list[_Shard], path: str) -> int:
    """Write the winning rows of `shards` to the Parquet file `path`; returns the row count.

    Pass two streams every column of every shard once, keeps the winners and writes them, so
    memory holds the winners' row numbers, not the table.
    """
    ordered = _scan_order(shards)
    winners = _select_winners(_key_frame(store, ordered))
    (
        _scan(store, [s.key for s in ordered])
        .filter(pl.col(ROW_INDEX).is_in(winners.implode()))
        .drop(ROW_INDEX)
        .sink_parquet(path, compression=SNAPSHOT_COMPRESSION)
    )
    return winners.len()


def _claim(store: Store, first: int, merge_id: str) -> int:
    payload = json.dumps(
        {
            "merge_id": merge_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": datetime.now(UTC).isoformat(),
        },
        indent=2,
    ).encode()
    for generation in range(first, first + MAX_CLAIM_ATTEMPTS):
        if store.put_if_absent(generation_key(generation, CLAIM_NAME), payload):
            return generation
        logger.info("generation %d was claimed by another merge; trying the next", generation)
    raise DoolyError(
        f"store {store.uri}: {MAX_CLAIM_ATTEMPTS} racing merges took every generation from "
        f"{first}; run the merge again"
    )


def _prune(store: Store, committed: int) -> None:
    """Delete complete generations beyond the newest KEEP_GENERATIONS, and stale dead claims."""
    generations = _generations(store)
    complete = _complete(generations)
    doomed = [g for g in complete[:-KEEP_GENERATIONS] if g < committed]
    now = time.time()
    for generation, names in generations.items():
        if MANIFEST_NAME in names or generation >= committed or CLAIM_NAME not in names:
            continue
        try:
            claim = json.loads(store.get_bytes(generation_key(generation, CLAIM_NAME)))
            claimed = datetime.fromisoformat(claim["claimed_at"]).timestamp()
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue
        if now - claimed > STALE_CLAIM_S:
            doomed.append(generation)
    for generation in sorted(doomed):
        # Manifest first, so a generation stops being complete before its data goes.
        for name in (MANIFEST_NAME, DATA_NAME, CLAIM_NAME):
            store.delete(generation_key(generation, name))
        logger.info("deleted snapshot generation %d", generation)


def _build_generation(
    store: Store, good: list[_Shard], generation: int, progress: bool
) -> tuple[list[_Shard], int, list[_Shard]]:
    """Write generation's data file; returns the shards used, the rows out and any shard found
    corrupt only when its pages were decoded (the merge is redone without it; the caller moves it
    to quarantine once the generation is published)."""
    corrupt: list[_Shard] = []
    with tempfile.TemporaryDirectory(prefix="dooly-merge-") as scratch:
        path = os.path.join(scratch, DATA_NAME)
        with _bar(progress, 1, f"merging {sum(s.rows for s in good):,} rows") as bar:
            try:
                rows_out = _write_snapshot(store, good, path)
            except pl.exceptions.PolarsError as exc:
                corrupt = _find_corrupt(store, good)
                if not corrupt:
                    raise DoolyError(f"store {store.uri}: merge failed: {exc}") from exc
                good = [s for s in good if not s.problem]
                if not good:
                    raise DoolyError(f"store {store.uri} holds no readable shards") from exc
                rows_out = _write_snapshot(store, good, path)
            bar.update(1)
        store.put_file(generation_key(generation, DATA_NAME), path)
    return good, rows_out, corrupt


# How many lost shard keys a refused merge names (the count is always given).
SHRINK_KEYS_SHOWN = 5


def _shrink_message(
    store: Store, latest: tuple[int, dict[str, Any]], rows_out: int, good_keys: list[str], quarantined: list[str]
) -> str:
    """One line: the two row counts, the shards quarantined now and those the newest generation
    held that are gone, and how to publish anyway."""
    generation, manifest = latest
    lost = sorted(set(manifest["shards"]) - set(good_keys))
    shown = ", ".join(lost[:SHRINK_KEYS_SHOWN]) + (", ..." if len(lost) > SHRINK_KEYS_SHOWN else "")
    return (
        f"store {store.uri}: the merge would hold {rows_out} rows, fewer than generation {generation}'s "
        f"{manifest['rows_out']}; not published. Unreadable shards, to be quarantined ({len(quarantined)}): "
        f"{', '.join(quarantined) or 'none'}; shards of generation {generation} now missing ({len(lost)}): "
        f"{shown or 'none'}. Pass --allow-shrink to publish it anyway"
    )


def merge_store(
    store: Store, *, progress: bool = False, force: bool = False, allow_shrink: bool = False
) -> MergeReport:
    """Merge every readable shard into a new snapshot generation; see the module docstring.

    When the shards are exactly those of the newest generation (and none had to be quarantined),
    nothing is written and the report says `unchanged`, unless `force`. A generation that would
    hold fewer rows than the newest one (shards quarantined or lost since) is not published:
    ShrinkRefused (exit 65) names the counts and the shards, unless `allow_shrink`.
    """
    started = time.perf_counter()
    keys = list_shards(store)
    latest = _latest(store)
    if not keys:
        raise DoolyError(f"store {store.uri} holds no shards to merge")
    shards = _inspect_all(store, keys, show=progress)
    # Bad shards move to quarantine only when a generation is published: a merge that fails or is
    # refused leaves the store as it found it.
    problems = [s for s in shards if s.problem]
    good = [s for s in shards if not s.problem and not s.vanished]
    if not good:
        raise DoolyError(
            f"store {store.uri} holds no readable shards ({len(problems)} unreadable: "
            f"{', '.join(s.key for s in problems)})"
        )
    good_keys = [s.key for s in good]
    if latest is not None and not force and not problems and latest[1]["shards"] == good_keys:
        generation, manifest = latest
        return MergeReport(
            generation=generation,
            shards_consumed=len(good_keys),
            rows_in=manifest["rows_in"],
            rows_out=manifest["rows_out"],
            duplicates_dropped=manifest["duplicates_dropped"],
            seconds=time.perf_counter() - started,
            unchanged=True,
        )
    merge_id = uuid.uuid4().hex
    generation = _claim(store, max(_generations(store), default=0) + 1, merge_id)
    try:
        good, rows_out, late_problems = _build_generation(store, good, generation, progress)
    except BaseException:
        # Leave nothing behind that a reader or the next merge would have to reason about; if the
        # store itself is failing, the original error is the one worth reporting.
        for name in (DATA_NAME, CLAIM_NAME):
            with contextlib.suppress(DoolyError, OSError):
                store.delete(generation_key(generation, name))
        raise
    problems += late_problems
    good_keys = [s.key for s in good]
    if latest is not None and not allow_shrink and rows_out < latest[1]["rows_out"]:
        for name in (DATA_NAME, CLAIM_NAME):
            with contextlib.suppress(DoolyError, OSError):
                store.delete(generation_key(generation, name))
        raise ShrinkRefused(_shrink_message(store, latest, rows_out, good_keys, [s.key for s in problems]))
    quarantined = _quarantine(store, problems)
    rows_in = sum(s.rows for s in good)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dooly_version": __version__,
        "generation": generation,
        "merge_id": merge_id,
        "created_at": datetime.now(UTC).isoformat(),
        "data_key": generation_key(generation, DATA_NAME),
        "shards": good_keys,
        "quarantined": quarantined,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "duplicates_dropped": rows_in - rows_out,
        "dedup_key": list(DEDUP_KEY),
    }
    body = json.dumps(manifest, indent=2).encode()
    if not store.put_if_absent(generation_key(generation, MANIFEST_NAME), body):
        raise DoolyError(
            f"store {store.uri}: generation {generation} gained a manifest from another writer "
            "although this merge held its claim"
        )
    _prune(store, generation)
    report = MergeReport(
        generation=generation,
        shards_consumed=len(good_keys),
        rows_in=rows_in,
        rows_out=rows_out,
        duplicates_dropped=rows_in - rows_out,
        quarantined=quarantined,
        seconds=time.perf_counter() - started,
    )
    logger.info("merged generation %d: %s", generation, report.to_dict())
    return report
