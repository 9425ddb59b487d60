"""Small JSON documents of a store (model inventories, fitted-model metadata).

Kept apart from `dooly.store.shards` so that readers of documents, such as `dooly simulate`
loading a model's inventory, do not import pyarrow (~0.2 s of start-up) for a JSON file.
"""

from __future__ import annotations

import json
from typing import Any

from dooly.store.backends import Store


def write_json(store: Store, key: str, payload: dict[str, Any]) -> None:
    """A small JSON document (model inventories live under "inventories/<model_key>.json")."""
    store.put_bytes(key, json.dumps(payload, indent=2, sort_keys=True).encode())


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    """The document at `key`, or None when there is none."""
    try:
        return json.loads(store.get_bytes(key))
    except FileNotFoundError:
        return None
