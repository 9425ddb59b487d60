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
whatever a crashed run left being built under that lock is removed. An entry is never deleted by
the runs that serve it: clear the root by hand.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dooly.errors import DoolyError

log = logging.getLogger(__name__)

MODEL_CACHE_ENV = "DOOLY_MODEL_CACHE"
# Bump when `save_served_model` changes what it writes: older entries are then built again.
CACHE_SCHEMA = "dooly.served_model/1"
MARKER_NAME = "dooly_served_model.json"
BUILDING_PREFIX = ".building-"
DISCARDED_PREFIX = ".discarded-"
LOCK_SUFFIX = ".lock"
DIGEST_CHARS = 16
# What a build writes back into the config object it is given: not an input of the saved bytes.
CONFIG_KEYS_NOT_KEYED = frozenset({"dtype", "torch_dtype"})
# How bench.json's engine_details.served_model_cache says where the served model came from.
HIT, MISS, OFF = "hit", "miss", "off"


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


def _write_marker(directory: Path, inputs: dict[str, Any]) -> None:
    marker = {"inputs": inputs, "files": _file_sizes(directory)}
    (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True))


@contextmanager
def _locked(lock_path: Path) -> Iterator[bool]:
    """Held while an entry is checked, built and moved into place; yields whether it is held. Where
    the file system refuses locks, runs go on unlocked: the rename still keeps an entry whole (the
    first one wins)."""
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            log.debug("no lock on %s (%s): building unlocked", lock_path, exc)
            yield False
        else:
            yield True


def _discard(path: Path) -> None:
    """Remove a damaged entry: renamed aside first (atomic), so no run sees it half deleted."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    aside = path.with_name(f"{DISCARDED_PREFIX}{path.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def cached_model_dir(root: Path, inputs: dict[str, Any], build: Callable[[Path], None]) -> tuple[Path, str]:
    """The saved model of `inputs` under `root`: reused when complete (`HIT`), otherwise built with
    `build(directory)` and moved into place (`MISS`). Logs which, in one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DoolyError(f"--model-cache {root}: cannot create it ({exc.strerror})") from None
    entry = root / entry_name(inputs)
    if entry_complete(entry, inputs):
        log.info("served model: reusing %s", entry)
        return entry, HIT
    with _locked(root / f"{entry.name}{LOCK_SUFFIX}") as locked:
        # Another run may have saved it while this one waited for the lock.
        if entry_complete(entry, inputs):
            log.info("served model: reusing %s", entry)
            return entry, HIT
        # Under the lock no other run builds this entry: what is being built for it is a crashed run's.
        for stale in root.glob(f"{BUILDING_PREFIX}{entry.name}-*") if locked else ():
            shutil.rmtree(stale, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f"{BUILDING_PREFIX}{entry.name}-", dir=root))
        try:
            build(building)
            _write_marker(building, inputs)
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
                return entry, MISS
        finally:
            shutil.rmtree(building, ignore_errors=True)
    log.info("served model: saved to %s", entry)
    return entry, MISS
