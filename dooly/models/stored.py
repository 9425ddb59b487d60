"""Model configs kept in a store: a model profiled once is then named by its id or model key alone.

`dooly profile` writes, beside a model's inventories, the config it traced the model from
(`inventories/<model_key>/config.json`, `write_model_config`). A name that is no config file and
no bundled id, but the id or model key of such a document, then resolves to that config in every
command given the store (`resolve_model_with_store`): `trace`, `plan`, `profile`, `bench` and
`measure-steps` can build the model again, the predicting commands (`explore` and `calibrate`
included) can trace it for a backend the store holds no inventory of and read its layer count,
KV groups and size, and a fleet can profile it by name. Stores written before configs were kept
hold inventories only: a name they know only that way is refused in one line (`NoStoredConfig`)
that says how to store its config.

Reading never writes: the commands that only read a store stay read-only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dooly.errors import DoolyError
from dooly.models.registry import MODEL_KEY_HEX_DIGITS, ModelSpec, model_key, resolve_model

if TYPE_CHECKING:
    from dooly.store.backends import Store

logger = logging.getLogger(__name__)

# What a stored config document says it is, and the layout of its fields.
CONFIG_SCHEMA = "dooly.model-config"
CONFIG_FORMAT = 1
# A name of this form may be a model key: its document is read directly, without a listing.
MODEL_KEY_RE = re.compile(rf"^[0-9a-f]{{{MODEL_KEY_HEX_DIGITS}}}$")
# What `find_stored_model` answered, by store URI and name, while `configs_read_once` holds; None
# outside it, where every lookup reads the store.
_REMEMBERED: dict[tuple[str, str], ModelSpec | None] | None = None


class NoStoredConfig(DoolyError):
    """The store knows a name by its inventories only: it holds no config to build the model from
    (a store written before `dooly profile` kept configs, or inventories written by hand)."""


def config_document(spec: ModelSpec) -> dict[str, Any]:
    """The stored form of SPEC: its config as `resolve_model` gave it, its id, key and source.

    Nothing time- or host-dependent goes in, so profiling the same config again writes the same
    bytes (the write is idempotent)."""
    return {
        "schema": CONFIG_SCHEMA,
        "format": CONFIG_FORMAT,
        "model_id": spec.model_id,
        "model_key": model_key(spec),
        "source": spec.source,
        "config": spec.config,
    }


def write_model_config(store: Store, spec: ModelSpec) -> str:
    """Store SPEC's config beside its inventories (an atomic write, like every store document), so
    that its id or model key names it later where no config file is at hand. Returns the key."""
    from dooly.store.documents import write_json
    from dooly.store.keys import model_config_key

    document = config_document(spec)
    key = model_config_key(document["model_key"])
    write_json(store, key, document)
    return key


def stored_configs(store: Store) -> dict[str, ModelSpec]:
    """Every config the store holds, by model key (documents that do not check out are skipped)."""
    from dooly.store.keys import INVENTORY_PREFIX, MODEL_CONFIG_NAME

    found: dict[str, ModelSpec] = {}
    for key in store.list_keys(INVENTORY_PREFIX):
        folder, _, name = key[len(INVENTORY_PREFIX):].rpartition("/")
        if name == MODEL_CONFIG_NAME and folder:
            spec = _read_config(store, folder)
            if spec is not None:
                found[folder] = spec
    return found


@contextmanager
def configs_read_once() -> Iterator[None]:
    """Within the block, `find_stored_model` reads each name's stored config once per store and
    remembers the answer (a config, or none), in this process and in those forked from it.

    A command that resolves the same model many times over one run that writes no config (`dooly
    explore`: its weights and KV-cache memory, KV block groups, inventory and layer count) would
    otherwise list and read the store's config documents at every use. Outside the block nothing
    is remembered: a long-lived process must see a config another command has stored since."""
    global _REMEMBERED
    outer = _REMEMBERED
    if outer is None:
        _REMEMBERED = {}
    try:
        yield
    finally:
        _REMEMBERED = outer


def find_stored_model(store: Store, name: str) -> ModelSpec | None:
    """The stored config NAME means: the one under that model key, else the one whose model id (or
    the id without its organisation) is NAME, case-insensitively; None when there is none. Read
    once per store and name within `configs_read_once`; a name of several configs raises each time."""
    wanted = name.strip().lower()
    if not wanted:
        return None
    if _REMEMBERED is None:
        return _lookup_stored_model(store, name, wanted)
    ident = (store.uri, wanted)
    if ident not in _REMEMBERED:
        _REMEMBERED[ident] = _lookup_stored_model(store, name, wanted)
    return _REMEMBERED[ident]


def _lookup_stored_model(store: Store, name: str, wanted: str) -> ModelSpec | None:
    """`find_stored_model` read from the store: WANTED is NAME normalised, NAME is what errors quote."""
    if MODEL_KEY_RE.match(wanted):
        spec = _read_config(store, wanted)
        if spec is not None:
            return spec
    matches = {key: spec for key, spec in stored_configs(store).items() if wanted in _spec_names(key, spec)}
    if len(matches) > 1:
        listed = ", ".join(f"{key} ({spec.model_id})" for key, spec in sorted(matches.items()))
        raise DoolyError(f"{name!r} names {len(matches)} configs in {store.uri}: {listed}; name one by its model key")
    return next(iter(matches.values()), None)


def resolve_model_with_store(name: str, store: Store | None) -> ModelSpec:
    """The model NAME means, as every command that takes a store reads it: a config.json, a
    directory holding one or a bundled id (`resolve_model`), else a config STORE holds under that
    id or model key. A name the store knows by its inventories only raises `NoStoredConfig`; a
    name nothing knows raises the resolver's own error."""
    try:
        return resolve_model(name)
    except DoolyError as unresolved:
        if store is None:
            raise
        spec = find_stored_model(store, name)
        if spec is not None:
            logger.info("%s: config from %s (model key %s)", spec.model_id, store.uri, model_key(spec))
            return spec
        if _known_by_inventories(store, name):
            raise NoStoredConfig(no_config_message(store, name)) from None
        raise unresolved


def no_config_message(store: Store, name: str) -> str:
    """What to do about a name the store knows by its inventories only."""
    return (
        f"{store.uri} holds inventories of {name!r} but no config to build it from (stored before "
        f"`dooly profile` kept configs): profile it once from its config.json "
        f"(`dooly profile CONFIG --store {store.uri}`) to store one, or name the config.json itself"
    )


def inventory_names(folder: str, inventory: dict[str, Any]) -> set[str]:
    """The names an inventory answers to: its model key (folder and field), its model id, and the
    id without its organisation, lower-cased."""
    model_id = str(inventory.get("model_id", "")).lower()
    return {folder.lower(), model_id, model_id.rsplit("/", 1)[-1], str(inventory.get("model_key", "")).lower()} - {""}


def _spec_names(key: str, spec: ModelSpec) -> set[str]:
    model_id = spec.model_id.lower()
    return {key.lower(), model_id, model_id.rsplit("/", 1)[-1]} - {""}


def _known_by_inventories(store: Store, name: str) -> bool:
    """Whether an inventory document of the store answers to NAME."""
    from dooly.fit.persist import read_inventories

    wanted = name.strip().lower()
    return any(wanted in inventory_names(key.split("/", 1)[0], inventory)
               for key, inventory in read_inventories(store).items())


def _read_config(store: Store, key: str) -> ModelSpec | None:
    """The config stored under model key KEY, or None when there is none or it does not check out
    (another schema, no config object, or facts that hash to another key: edited by hand)."""
    from dooly.store.documents import read_json
    from dooly.store.keys import model_config_key

    document = read_json(store, model_config_key(key))
    if document is None:
        return None
    config = document.get("config")
    if document.get("schema") != CONFIG_SCHEMA or not isinstance(config, dict):
        logger.warning("%s: not a %s document; ignored", model_config_key(key), CONFIG_SCHEMA)
        return None
    spec = ModelSpec(model_id=str(document.get("model_id") or key), config=config,
                     source=str(document.get("source") or store.uri))
    if model_key(spec) != key:
        logger.warning("%s: its config hashes to model key %s, not %s; ignored", model_config_key(key),
                       model_key(spec), key)
        return None
    return spec
