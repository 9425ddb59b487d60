"""A cache of the models `dooly bench --client http` saves for its server, reused across runs.

The HTTP harness serves a random-weight model that it builds on the device and saves, with its
word-level tokenizer, where `transformers serve` loads it from (`http_bench.save_served_model`).
A campaign serves the same model (same config, dtype and seed) in many cells, and the build and
save take seconds for a 1B and 10-20 s for an 8B (16 GB written) each time. With a cache root
(`dooly bench --model-cache DIR`, or `DOOLY_MODEL_CACHE`), the saved directory is kept under
`ROOT/<entry>` and served again by every later run whose entry is the same.

An entry is keyed by what determines the saved bytes (`cache_inputs`): the model's config (its
`to_dict()`, less the `dtype` a build writes back into it: the dtype is its own field), the dtype,
the seed, the device kind the weights are drawn on (CPU and CUDA draw different numbers from the
same seed), the transformers and torch versions (the initializers and the serialization are
theirs), the tokenizer's vocabulary size and this layout's schema. The attention backend is not in
it: a saved config.json holds no attention implementation (transformers drops
`_attn_implementation_internal` when it serializes a config), the weights drawn are the same
whatever the backend, and the server is always given `--attn-implementation` explicitly, which its
model manager passes to `from_pretrained`.

An entry is built into a temporary directory inside the root, its marker (`MARKER_NAME`: the key's
inputs and every file's size) written last, then renamed into place: a directory under its entry
name is complete unless damaged, and one without a valid marker, or whose files are not the sizes
the marker lists, is rebuilt, never served. Runs building the same entry take a lock file beside it
(`flock`), so a second run waits for the first and reuses its entry instead of building it again;
whatever a crashed run left being built under that lock is removed.

The cache holds at most a cap of bytes (`--model-cache-max-gb`, or `DOOLY_MODEL_CACHE_MAX_GB`;
`DEFAULT_MAX_GB`), because a device's disk is a few entries of an 8B deep. An entry's last use is its
marker's modification time, set when it is saved and again on every reuse. Before a new entry is
built, the least recently used entries are evicted, whole, until those left and the new one (its
expected size, then its measured size once built) fit under the cap. A run holds its entry's use
lock (`USE_LOCK_SUFFIX`) shared from before it looks the entry up until its server has stopped, and
a run evicts an entry only when it takes that lock exclusively without waiting: an entry being built
or served by another run is never evicted (nor is any where the file system refuses locks). Builds,
with the evictions that make room for them, take the root's lock (`ROOT_LOCK_NAME`) one at a time,
so two runs never count on the same free room. A model that cannot fit, because it alone exceeds
the cap or because entries in use hold the rest, is not cached: it is saved for the run only and
removed after it (`UNCACHED`, with a warning). Only directories holding a marker are entries: nothing
else under the root is counted or removed. `dooly model-cache list|clear` shows and empties a root.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dooly.errors import DoolyError

log = logging.getLogger(__name__)

MODEL_CACHE_ENV = "DOOLY_MODEL_CACHE"
MODEL_CACHE_MAX_GB_ENV = "DOOLY_MODEL_CACHE_MAX_GB"
# Two 8B models in bfloat16 (16 GB each) fit and a third evicts the older: on a 64 GB device disk
# that leaves room for the image, the runs' own files and the other processes' scratch.
DEFAULT_MAX_GB = 40.0
# Decimal, as model sizes are quoted (an 8B in bfloat16 is 16 GB).
BYTES_PER_GB = 10**9
DEFAULT_MAX_BYTES = int(DEFAULT_MAX_GB * BYTES_PER_GB)
SIZE_UNITS = ((10**9, "GB"), (10**6, "MB"), (10**3, "kB"))
# Bump when `save_served_model` changes what it writes: older entries are then built again.
CACHE_SCHEMA = "dooly.served_model/1"
MARKER_NAME = "dooly_served_model.json"
BUILDING_PREFIX = ".building-"
DISCARDED_PREFIX = ".discarded-"
# Beside each entry: held exclusively by the run building it, and shared by the runs serving it.
LOCK_SUFFIX = ".lock"
USE_LOCK_SUFFIX = ".use.lock"
# In the root: held by a run while it evicts and builds, so the cap is counted by one run at a time.
ROOT_LOCK_NAME = "dooly_model_cache.lock"
DIGEST_CHARS = 16
# What a build writes back into the config object it is given: not an input of the saved bytes.
CONFIG_KEYS_NOT_KEYED = frozenset({"dtype", "torch_dtype"})
# How bench.json's engine_details.served_model_cache says where the served model came from.
HIT, MISS, OFF, UNCACHED = "hit", "miss", "off", "uncached"


@dataclass(frozen=True)
class CacheEntry:
    """An entry as eviction and `dooly model-cache list` see it: its bytes on disk and last use."""

    path: Path
    bytes: int
    last_used: float

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Eviction:
    """What a run evicted to make room, for its log line."""

    count: int = 0
    bytes: int = 0

    def __add__(self, other: Eviction) -> Eviction:
        return Eviction(self.count + other.count, self.bytes + other.bytes)

    def describe(self) -> str:
        if not self.count:
            return "evicted nothing"
        noun = "entry" if self.count == 1 else "entries"
        return f"evicted {self.count} least recently used {noun} ({format_bytes(self.bytes)})"


@dataclass(frozen=True)
class ServedModel:
    """The directory the server loads, where it came from (`HIT`, `MISS`, `UNCACHED`) and what its
    run evicted."""

    directory: Path
    status: str
    evicted: Eviction = Eviction()


def format_bytes(size: int) -> str:
    """A size as a person reads it: tiny test entries are kB, real ones GB."""
    for scale, unit in SIZE_UNITS:
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _plain(value: Any) -> Any:
    """JSON-plain, keys sorted: the form the key is hashed and the marker compared in."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _without_build_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_build_keys(v) for k, v in value.items() if k not in CONFIG_KEYS_NOT_KEYED}
    if isinstance(value, list):
        return [_without_build_keys(v) for v in value]
    return value


def cache_inputs(hf_config: Any, dtype: str, seed: int, device: str) -> dict[str, Any]:
    """What the saved model's bytes depend on: two runs with the same inputs save the same directory."""
    import torch
    import transformers

    return _plain({
        "schema": CACHE_SCHEMA,
        "config": _without_build_keys(hf_config.to_dict()),
        "dtype": str(dtype).removeprefix("torch."),
        "seed": int(seed),
        "device": torch.device(device).type,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizer_vocab_size": int(hf_config.get_text_config().vocab_size),
    })


def entry_name(inputs: dict[str, Any]) -> str:
    """The entry's directory name: readable (model type, dtype, device, seed) and the inputs' digest."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]
    model_type = re.sub(r"[^A-Za-z0-9_.]+", "_", str(inputs["config"].get("model_type") or "model"))
    return f"{model_type}-{inputs['dtype']}-{inputs['device']}-seed{inputs['seed']}-{digest}"


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER_NAME}


def _tree_bytes(directory: Path) -> int:
    """Every file's size under `directory`; files another run removes meanwhile count as 0."""
    total = 0
    for parent, _, names in os.walk(directory):
        for name in names:
            try:
                total += os.stat(os.path.join(parent, name), follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def entry_complete(entry: Path, inputs: dict[str, Any]) -> bool:
    """Whether `entry` is a whole saved model of these inputs: its marker holds them, and every file
    the marker lists is there at its size."""
    try:
        marker = json.loads((entry / MARKER_NAME).read_text())
        files = marker["files"]
        if marker.get("inputs") != inputs or not files:
            return False
        return all((entry / name).is_file() and (entry / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def marker_inputs(entry: Path) -> dict[str, Any] | None:
    """The inputs an entry's marker says it was saved from; None where the marker is unreadable."""
    try:
        inputs = json.loads((entry / MARKER_NAME).read_text())["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return inputs if isinstance(inputs, dict) else None


def _write_marker(directory: Path, inputs: dict[str, Any]) -> None:
    marker = {"inputs": inputs, "files": _file_sizes(directory)}
    (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True))


def _touch(entry: Path) -> None:
    """Mark the entry used now: its marker's modification time is what eviction orders by."""
    try:
        os.utime(entry / MARKER_NAME)
    except OSError as exc:
        log.debug("served model: cannot mark %s used (%s); it keeps its older last use", entry, exc)


def list_entries(root: Path) -> list[CacheEntry]:
    """The root's entries, least recently used first. A directory without a marker is not one: a
    cache root may sit in a directory that holds other things, which are never counted or removed."""
    entries = []
    for path in root.iterdir() if root.is_dir() else ():
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        try:
            last_used = (path / MARKER_NAME).stat().st_mtime
        except OSError:
            continue
        entries.append(CacheEntry(path, _tree_bytes(path), last_used))
    return sorted(entries, key=lambda e: (e.last_used, e.name))


def _flock(handle: IO[str], operation: int) -> bool:
    """Whether `operation` took the lock: False where another run holds it (with `LOCK_NB`) or where
    the file system refuses locks."""
    try:
        fcntl.flock(handle, operation)
    except BlockingIOError:
        return False
    except OSError as exc:
        log.debug("no lock on %s (%s)", handle.name, exc)
        return False
    return True


@contextmanager
def _locked(lock_path: Path) -> Iterator[bool]:
    """Held while an entry is checked, built and moved into place; yields whether it is held. Where
    the file system refuses locks, runs go on unlocked: the rename still keeps an entry whole (the
    first one wins)."""
    with lock_path.open("a") as handle:
        held = _flock(handle, fcntl.LOCK_EX)
        if not held:
            log.debug("building %s unlocked", lock_path)
        yield held


def _claim(claims: ExitStack, lock_path: Path) -> bool:
    """Take `lock_path` exclusively without waiting, held until `claims` closes: False while another
    run holds it (serving, or building, what it guards)."""
    handle = claims.enter_context(lock_path.open("a"))
    return _flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _use_lock(root: Path, name: str) -> Path:
    return root / f"{name}{USE_LOCK_SUFFIX}"


def _build_lock_of(building: Path) -> Path:
    """The build lock of the entry a `BUILDING_PREFIX` directory is being built for: mkdtemp's
    suffix holds no '-', so the entry's name is what precedes the last one."""
    name = building.name.removeprefix(BUILDING_PREFIX).rsplit("-", 1)[0]
    return building.parent / f"{name}{LOCK_SUFFIX}"


def entry_in_use(root: Path, name: str) -> bool:
    """Whether another run serves or builds entry `name` now (its use lock is held)."""
    with ExitStack() as claims:
        return not _claim(claims, _use_lock(root, name))


def _discard(path: Path) -> None:
    """Remove a damaged or evicted entry: renamed aside first (atomic), so no run sees it half deleted."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    aside = path.with_name(f"{DISCARDED_PREFIX}{path.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _evict(entries: list[CacheEntry], why: str) -> Eviction:
    """Discard claimed entries (their use locks held by the caller), one log line each."""
    for entry in entries:
        _discard(entry.path)
        log.info("served model cache: evicted %s (%s, %s)", entry.path, format_bytes(entry.bytes), why)
    return Eviction(len(entries), sum(e.bytes for e in entries))


def _make_room(root: Path, keep: str, incoming: int, max_bytes: int) -> Eviction | None:
    """Evict least recently used entries (never `keep`, never one in use) until the rest and
    `incoming` bytes fit under `max_bytes`. None, with nothing evicted, where they cannot: `incoming`
    alone exceeds the cap, or the entries other runs are using hold the rest. Called under the root
    lock."""
    others = [e for e in list_entries(root) if e.name != keep]
    excess = sum(e.bytes for e in others) + incoming - max_bytes
    if excess <= 0:
        return Eviction()
    if incoming > max_bytes:
        return None
    with ExitStack() as claims:
        chosen: list[CacheEntry] = []
        for candidate in others:
            if sum(e.bytes for e in chosen) >= excess:
                break
            if _claim(claims, _use_lock(root, candidate.name)):
                chosen.append(candidate)
        if sum(e.bytes for e in chosen) < excess:
            return None
        return _evict(chosen, "least recently used")


@contextmanager
def _root_locked(root: Path) -> Iterator[None]:
    """Held while a run evicts and builds. Where the file system refuses locks it is not held, but
    neither can any entry be claimed: nothing is evicted then."""
    with (root / ROOT_LOCK_NAME).open("a") as handle:
        _flock(handle, fcntl.LOCK_EX)
        yield


def _cache_bytes(root: Path) -> int:
    """What the root's entries take, for the log line of a save."""
    return sum(e.bytes for e in list_entries(root))


@contextmanager
def cached_model_dir(root: Path, inputs: dict[str, Any], build: Callable[[Path], None], *, scratch: Path,
                     max_bytes: int = DEFAULT_MAX_BYTES, expected_bytes: int = 0) -> Iterator[ServedModel]:
    """The saved model of `inputs` under `root` while the block runs: reused when complete (`HIT`),
    otherwise built with `build(directory)` and moved into place (`MISS`) after the least recently
    used entries are evicted to keep the cache under `max_bytes` (`expected_bytes`: what the build is
    expected to write, so the room is made before it writes). A model that cannot fit is built into
    `scratch` instead and removed when the block ends (`UNCACHED`). The entry is held in use until
    the block ends, so no other run evicts it while its server loads and serves it. Logs which, in
    one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DoolyError(f"--model-cache {root}: cannot create it ({exc.strerror})") from None
    entry = root / entry_name(inputs)
    with _use_lock(root, entry.name).open("a") as use:
        # Shared from before the lookup: an entry found complete cannot be evicted before it is served.
        _flock(use, fcntl.LOCK_SH)
        served = _served(root, entry, inputs, build, scratch, max_bytes, expected_bytes)
        try:
            yield served
        finally:
            if served.status == UNCACHED:
                shutil.rmtree(served.directory, ignore_errors=True)


def _reused(entry: Path) -> ServedModel:
    """A hit: its last use is now, so eviction takes the entries no run has served for longest."""
    _touch(entry)
    log.info("served model: reusing %s", entry)
    return ServedModel(entry, HIT)


def _served(root: Path, entry: Path, inputs: dict[str, Any], build: Callable[[Path], None], scratch: Path,
            max_bytes: int, expected_bytes: int) -> ServedModel:
    """Reuse, build, or (no room) build for this run only; called with the entry's use lock shared."""
    if entry_complete(entry, inputs):
        return _reused(entry)
    with _locked(root / f"{entry.name}{LOCK_SUFFIX}") as locked:
        # Another run may have saved it while this one waited for the lock.
        if entry_complete(entry, inputs):
            return _reused(entry)
        with _root_locked(root):
            evicted = _make_room(root, entry.name, expected_bytes, max_bytes)
            if evicted is not None:
                return _save(root, entry, inputs, build, locked, scratch, max_bytes, evicted)
            _warn_uncached(entry, expected_bytes, max_bytes, scratch, Eviction())
    # Built outside every lock: other runs of this model need not wait for a model that is not cached.
    build(scratch)
    return ServedModel(scratch, UNCACHED)


def _warn_uncached(entry: Path, size: int, max_bytes: int, scratch: Path, evicted: Eviction) -> None:
    """Say why a model is not cached: the user asked for a cache, and each such run builds it again."""
    if size > max_bytes:
        why = f"its {format_bytes(size)} exceed the {format_bytes(max_bytes)} cap"
    else:
        held = sum(e.bytes for e in list_entries(entry.parent) if e.name != entry.name
                   and entry_in_use(entry.parent, e.name))
        why = (f"entries other runs are using hold {format_bytes(held)} of the {format_bytes(max_bytes)} cap, "
               f"too little is left for its {format_bytes(size)}")
    log.warning("served model: not cached in %s: %s (--model-cache-max-gb); saved to %s for this run only%s",
                entry.parent, why, scratch, f" ({evicted.describe()} first)" if evicted.count else "")


def _save(root: Path, entry: Path, inputs: dict[str, Any], build: Callable[[Path], None], locked: bool,
          scratch: Path, max_bytes: int, evicted: Eviction) -> ServedModel:
    """Build the entry, make room for what it measures, and move it into place (under the entry's
    lock and the root's)."""
    # Under the lock no other run builds this entry: what is being built for it is a crashed run's.
    for stale in root.glob(f"{BUILDING_PREFIX}{entry.name}-*") if locked else ():
        shutil.rmtree(stale, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=f"{BUILDING_PREFIX}{entry.name}-", dir=root))
    try:
        build(building)
        _write_marker(building, inputs)
        size = _tree_bytes(building)
        more = _make_room(root, entry.name, size, max_bytes)
        if more is None:
            # Larger than expected, and the room is not there: served from the run's own directory.
            _warn_uncached(entry, size, max_bytes, scratch, evicted)
            shutil.move(building, scratch)
            return ServedModel(scratch, UNCACHED, evicted)
        evicted += more
        if entry.exists() or entry.is_symlink():
            log.warning("served model: %s is incomplete or damaged; saving it again", entry)
            _discard(entry)
        try:
            os.rename(building, entry)
        except OSError:
            # An unlocked run put its entry in place first: the first rename wins.
            if not entry_complete(entry, inputs):
                raise
            log.info("served model: reusing %s (another run saved it first)", entry)
            return ServedModel(entry, MISS, evicted)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log.info("served model: saved to %s (%s; the cache holds %s of its %s cap)", entry, evicted.describe(),
             format_bytes(_cache_bytes(root)), format_bytes(max_bytes))
    return ServedModel(entry, MISS, evicted)


@dataclass(frozen=True)
class Cleared:
    """What `clear` removed and what it left because other runs are using it."""

    evicted: list[CacheEntry]
    in_use: list[CacheEntry]
    leftover_bytes: int


def clear(root: Path) -> Cleared:
    """Evict every entry no run is using, and remove what crashed runs left being built or discarded.
    The empty lock files stay: a run may hold one open, waiting, and would lock a file no other run sees."""
    with _root_locked(root), ExitStack() as claims:
        evicted: list[CacheEntry] = []
        in_use: list[CacheEntry] = []
        for entry in list_entries(root):
            (evicted if _claim(claims, _use_lock(root, entry.name)) else in_use).append(entry)
        _evict(evicted, "cleared")
        leftover_bytes = 0
        for leftover in sorted(root.glob(f"{BUILDING_PREFIX}*")) + sorted(root.glob(f"{DISCARDED_PREFIX}*")):
            if leftover.name.startswith(BUILDING_PREFIX) and not _claim(claims, _build_lock_of(leftover)):
                continue
            leftover_bytes += _tree_bytes(leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        return Cleared(evicted, in_use, leftover_bytes)
