"""`dooly trace-cache list|clear`: the CPU traces the predicting commands keep (dooly/fit/trace_cache.py).

The cache is found as those commands find it (`$DOOLY_TRACE_CACHE`, else the user cache
directory), so what is listed or cleared is what they would serve.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import click

from dooly.engines.served_model_cache import format_bytes
from dooly.errors import DoolyError
from dooly.fit.trace_cache import (
    BYTES_PER_MB,
    CACHE_OFF,
    DEFAULT_MAX_MB,
    MAX_MB_ENV,
    TRACE_CACHE_ENV,
    DescribedEntry,
    Removal,
    cache_directory,
    clear,
    describe,
    eviction_order,
    scan_entries,
)
from dooly.output import emit_json, format_table, output_option

CURRENT = "current"
STALE = "stale"
# What the text table shows for a fact an unreadable entry does not record.
UNKNOWN = "?"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def _entries(count: int, kind: str = "") -> str:
    return f"{count} {kind}{'entry' if count == 1 else 'entries'}"


def _off_line() -> str:
    return f"the trace cache is off ({TRACE_CACHE_ENV}={CACHE_OFF})"


def _existing(directory: Path) -> bool:
    """Whether DIRECTORY holds a cache: a missing one is an empty cache (nothing traced yet); a
    path that is something else is the user's mistake."""
    if not directory.exists():
        return False
    if not directory.is_dir():
        raise DoolyError(f"the trace cache {directory} ({TRACE_CACHE_ENV}) is not a directory")
    return True


def _unreadable(directory: Path, exc: OSError) -> DoolyError:
    return DoolyError(f"cannot read the trace cache {directory} ({exc.strerror or type(exc).__name__})")


def _finite_cap(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """click callback: a cap click's range accepts but no cap can be (inf, nan)."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of MB", ctx=ctx, param=param)
    return value


@click.group("trace-cache")
def trace_cache_group() -> None:
    """The trace cache of the predicting commands: list or clear it.

    `simulate`, `predict`, `validate`, `explore`, `overhead` and `export` trace a model the store
    holds no inventory of on the CPU once, and keep its inventory in $DOOLY_TRACE_CACHE (else
    $XDG_CACHE_HOME/dooly/traces, by default ~/.cache/dooly/traces; `off` turns it off). Each write
    keeps the cache under $DOOLY_TRACE_CACHE_MAX_MB (64 MB by default), removing the stale entries
    first (made by other code or package versions than this install's, or unreadable: never served
    again), then the least recently used.

    \b
    Examples:
      dooly trace-cache list
      dooly trace-cache clear --stale --output json
    """


@trace_cache_group.command("list")
@click.option("--max-mb", type=click.FloatRange(min=0, min_open=True), envvar=MAX_MB_ENV, show_envvar=True,
              default=DEFAULT_MAX_MB, show_default=True, metavar="MB", callback=_finite_cap,
              help="The cap the predicting commands keep the cache under, shown beside its total.")
@output_option
def trace_cache_list_command(max_mb: float, output_format: str) -> None:
    """List the cache's entries in the order the cap removes them: the stale first, then the least
    recently used. Each entry is one model traced for one engine, backend, dtype, tp and phase."""
    directory = cache_directory()
    max_bytes = round(max_mb * BYTES_PER_MB)
    described: list[DescribedEntry] = []
    if directory is not None and _existing(directory):
        try:
            described = eviction_order([describe(entry) for entry in scan_entries(directory)])
        except OSError as exc:
            raise _unreadable(directory, exc) from exc
    rows = [_row(d) for d in described]
    total = sum(row["bytes"] for row in rows)
    stale_bytes = sum(row["bytes"] for row in rows if row["state"] == STALE)
    if output_format == "json":
        emit_json({"directory": None if directory is None else str(directory), "enabled": directory is not None,
                   "exists": directory is not None and directory.is_dir(), "max_bytes": max_bytes,
                   "total_bytes": total, "stale_bytes": stale_bytes, "entries": rows})
        return
    if directory is None:
        click.echo(f"{_off_line()}: nothing is cached")
        return
    if not directory.is_dir():
        click.echo(f"no trace cache at {directory} yet: nothing is cached")
        return
    if rows:
        click.echo(format_table(
            ["model", "engine", "backend", "dtype", "tp", "phase", "size", "last used", "state"],
            [(_shown(r["model"]), _shown(r["engine"]), _shown(r["backend"]), _shown(r["dtype"]), _shown(r["tp"]),
              _shown(r["phase"]), format_bytes(r["bytes"]), r["last_used"], _state(r)) for r in rows]))
    stale_count = sum(row["state"] == STALE for row in rows)
    click.echo(f"{_entries(len(rows))}, {format_bytes(total)} of the {format_bytes(max_bytes)} cap in {directory}; "
               f"{stale_count} stale ({format_bytes(stale_bytes)})")


def _row(described: DescribedEntry) -> dict[str, Any]:
    key = described.key or {}
    entry = described.entry
    return {
        "path": str(entry.path),
        "model": key.get("model_id"),
        "model_key": key.get("model_key"),
        "engine": key.get("engine"),
        "backend": key.get("backend"),
        "dtype": key.get("dtype"),
        "tp": key.get("tp"),
        "phase": key.get("phase"),
        "bytes": entry.bytes,
        "last_used_unix": entry.last_used,
        "last_used": time.strftime(TIME_FORMAT, time.localtime(entry.last_used)),
        "state": STALE if described.stale else CURRENT,
        "stale_because": list(described.stale),
    }


def _shown(value: Any) -> str:
    return UNKNOWN if value is None else str(value)


def _state(row: dict[str, Any]) -> str:
    if row["state"] == CURRENT:
        return CURRENT
    return f"{STALE} ({', '.join(row['stale_because'])})"


@trace_cache_group.command("clear")
@click.option("--stale", "stale_only", is_flag=True,
              help="Remove only the stale entries (made by other code or package versions, or unreadable), "
                   "keeping those this install can serve.")
@output_option
def trace_cache_clear_command(stale_only: bool, output_format: str) -> None:
    """Remove the cache's entries, or only its stale ones. The next question about a removed model
    traces it again. An entry that cannot be removed is left, and the command exits 2 after
    reporting what it did."""
    directory = cache_directory()
    if directory is None:
        raise DoolyError(f"{_off_line()}: no directory to clear; unset {TRACE_CACHE_ENV} or set it to the "
                         "directory to clear")
    removal = Removal()
    if _existing(directory):
        try:
            removal = clear(directory, stale_only=stale_only)
        except OSError as exc:
            raise _unreadable(directory, exc) from exc
    kept_bytes = sum(entry.bytes for entry in removal.kept)
    if output_format == "json":
        emit_json({"directory": str(directory), "stale_only": stale_only,
                   "removed": [str(e.path) for e in removal.removed], "removed_bytes": removal.removed_bytes,
                   "kept": [str(e.path) for e in removal.kept], "kept_bytes": kept_bytes,
                   "failed": [{"path": str(e.path), "reason": reason} for e, reason in removal.failed],
                   "leftovers_removed": [str(e.path) for e in removal.leftovers],
                   "leftover_bytes": removal.leftover_bytes})
    elif not directory.is_dir():
        click.echo(f"no trace cache at {directory}: nothing to clear")
    else:
        kind = f"{STALE} " if stale_only else ""
        line = f"removed {_entries(len(removal.removed), kind)} ({format_bytes(removal.removed_bytes)}) from {directory}"
        if stale_only:
            line += f"; kept {_entries(len(removal.kept), f'{CURRENT} ')} ({format_bytes(kept_bytes)})"
        if removal.leftovers:
            line += (f"; removed {len(removal.leftovers)} temporary file(s) dead writers left "
                     f"({format_bytes(removal.leftover_bytes)})")
        click.echo(line)
    if removal.failed:
        entry, reason = removal.failed[0]
        raise DoolyError(f"could not remove {_entries(len(removal.failed))} of the trace cache {directory} "
                         f"({entry.path}: {reason})")
