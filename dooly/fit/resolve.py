"""One model resolver for every command that predicts: which inventory a model name means.

A name may be a bundled id, a config.json, a directory holding one, or an id (or model key)
of a model the store holds (`dooly.models.stored.resolve_model_with_store`, the resolver
`trace`, `plan`, `profile` and `bench` share). A model is named in the store by its model key (a
hash of its config facts, `dooly.models.registry.model_key`), so a config file profiled under its
stem and then named by its path again finds the same inventory.

When the store holds no inventory of the model for the wanted engine, backend, dtype and tp,
the model is traced on the CPU (FakeTensorMode, seconds) from its config (the file, the bundled
facts, or the config the store keeps beside its inventories) and that trace is used: a model the
store has never run is the normal case (docs/unseen.md). Nothing is written to the store: the
commands that read are read-only. The trace is kept in a cache outside the store
(`dooly.fit.trace_cache`, `DOOLY_TRACE_CACHE`), so the next question about the same model, on
the same engine, backend, dtype and tp with the same code, reuses it instead of tracing again.
An inventory traced for one backend is never used for another (attention signatures and their
counts differ by backend). A name the store knows by its inventories only (a store written
before configs were kept) is served by exactly the inventory it asks for, or refused in one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dooly.errors import DoolyError

if TYPE_CHECKING:
    from dooly.fit.trace_cache import LoggedWarning
    from dooly.models.registry import ModelSpec
    from dooly.models.stored import NoStoredConfig

logger = logging.getLogger(__name__)

# Where an inventory came from.
ORIGIN_STORE = "store"
ORIGIN_TRACED = "traced on the CPU"
# Every inventory a profiled model gets is traced with the mixed phase (prefill + decode in one
# step): the ops of every phase with their request variables.
INVENTORY_PHASE = "mixed"


@dataclass(frozen=True)
class ResolvedInventory:
    """A model's inventory and where it came from (the store, or a CPU trace made now)."""

    model_id: str
    model_key: str
    inventory: dict[str, Any]
    origin: str


def _inventory_matches(inventory: dict[str, Any], engine: str, dtype: str) -> bool:
    """Whether a stored inventory was traced for ENGINE and DTYPE (old ones lack the fields)."""
    return inventory.get("engine", engine) == engine and inventory.get("dtype", dtype) == dtype


def resolve_inventory(
    store: Any, model: str, *, backend: str, engine: str = "transformers", dtype: str = "bfloat16", tp: int = 1
) -> ResolvedInventory:
    """The inventory of MODEL for one rank of TP on ENGINE/BACKEND/DTYPE: the store's, else a CPU
    trace of the model's config; a name the store knows by its inventories only (no config to
    trace it from) needs its inventory for exactly that backend and tp."""
    from dooly.models.registry import model_key
    from dooly.models.stored import NoStoredConfig, resolve_model_with_store
    from dooly.store.documents import read_json
    from dooly.store.keys import inventory_key

    try:
        spec = resolve_model_with_store(model, store)
    except NoStoredConfig as missing:
        return _stored_only(store, model, missing, backend=backend, engine=engine, dtype=dtype, tp=tp)
    key = model_key(spec)
    stored = read_json(store, inventory_key(key, backend, tp))
    if isinstance(stored, dict) and isinstance(stored.get("operations"), list) and _inventory_matches(stored, engine, dtype):
        return ResolvedInventory(model_id=spec.model_id, model_key=key, inventory=stored, origin=ORIGIN_STORE)
    return ResolvedInventory(
        model_id=spec.model_id,
        model_key=key,
        inventory=traced_inventory(spec, backend=backend, engine=engine, dtype=dtype, tp=tp),
        origin=ORIGIN_TRACED,
    )


def traced_inventory(model: str | ModelSpec, *, backend: str, engine: str, dtype: str, tp: int) -> dict[str, Any]:
    """The inventory `dooly profile` would write for MODEL (a name, or a config already
    resolved), from a CPU trace: one made now, or the same trace made by an earlier command and
    kept in the trace cache (`dooly.fit.trace_cache`; outside the store, which stays read-only)."""
    from dooly.fit import trace_cache
    from dooly.models.registry import ModelSpec, resolve_model

    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    directory = trace_cache.cache_directory()
    if directory is None:
        inventory, seconds, _ = _trace(spec, backend=backend, engine=engine, dtype=dtype, tp=tp)
        logger.info("%s: no inventory in the store for %s / %s / tp%d; traced on the CPU in %.1f s (trace cache off)",
                    spec.model_id, engine, backend, tp, seconds)
        return inventory
    key = trace_cache.trace_key(spec, engine=engine, backend=backend, dtype=dtype, tp=tp, phase=INVENTORY_PHASE)
    cached = trace_cache.read_entry(directory, key)
    if cached is not None:
        cached.replay_warnings()
        logger.info("%s: no inventory in the store for %s / %s / tp%d; trace of %s reused from the cache (%s)",
                    spec.model_id, engine, backend, tp, spec.model_id, cached.path)
        return cached.inventory
    inventory, seconds, warnings = _trace(spec, backend=backend, engine=engine, dtype=dtype, tp=tp)
    written = trace_cache.write_entry(directory, key, inventory, warnings)
    where = f"cached to {written}" if written is not None else "not cached"
    logger.info("%s: no inventory in the store for %s / %s / tp%d; traced on the CPU in %.1f s (%s)",
                spec.model_id, engine, backend, tp, seconds, where)
    return inventory


def _trace(
    spec: ModelSpec, *, backend: str, engine: str, dtype: str, tp: int
) -> tuple[dict[str, Any], float, tuple[LoggedWarning, ...]]:
    """SPEC's inventory from a CPU trace made now, the trace's seconds, and the warnings it logged
    (kept with a cache entry, to be logged again whenever the entry is served)."""
    from dooly.fit.trace_cache import recorded_warnings
    from dooly.profile.run import inventory
    from dooly.trace.tracer import trace_model

    with recorded_warnings() as warnings:
        trace = trace_model(spec, phase=INVENTORY_PHASE, backend=backend, tp=tp, dtype=dtype, engine=engine)
    return inventory(trace), trace.seconds, tuple(warnings)


def _stored_only(
    store: Any, model: str, missing: NoStoredConfig, *, backend: str, engine: str, dtype: str, tp: int
) -> ResolvedInventory:
    """MODEL names no config, in a file or in the store, but the store's inventories know it: the
    one for exactly this backend and tp, or one error line saying what to do."""
    from dooly.fit.persist import read_inventories
    from dooly.models.stored import inventory_names

    wanted = model.strip().lower()
    matches = {k: i for k, i in read_inventories(store).items()
               if wanted and wanted in inventory_names(k.split("/", 1)[0], i)}
    if not matches:
        raise missing
    for inventory in matches.values():
        if (inventory.get("backend") == backend and int(inventory.get("tp", 1) or 1) == tp
                and _inventory_matches(inventory, engine, dtype)):
            return ResolvedInventory(
                model_id=str(inventory.get("model_id", model)),
                model_key=str(inventory.get("model_key", "")),
                inventory=inventory,
                origin=ORIGIN_STORE,
            )
    held = ", ".join(sorted(f"{i.get('backend')} tp{i.get('tp', 1) or 1}" for i in matches.values()))
    raise DoolyError(f"no inventory of {model!r} for --tp {tp} and {backend} in {store.uri} (held: {held}); {missing}")
