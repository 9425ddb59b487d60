"""Store keys that readers build without pyarrow: escaped partition values and inventory keys.

`dooly simulate` and `dooly predict` look an inventory up by key; keeping these helpers apart from
`dooly.store.shards` (which imports pyarrow) and `dooly.profile.run` (which imports torch) keeps
those imports off their start-up path.
"""

from __future__ import annotations

INVENTORY_PREFIX = "inventories/"
# The document beside a model's inventories holding the config it was traced from. No inventory
# can take this name: an inventory's file is named by an attention backend, which an engine
# declares ("paged|sdpa", "CPU_ATTN"), never "config".
MODEL_CONFIG_NAME = "config.json"
# Characters kept as they are in partition values and file names; every other byte is escaped.
SAFE_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
ESCAPE = "~"


def escape_value(value: str) -> str:
    """Path-safe, reversible form of a partition value or run id."""
    if not value:
        raise ValueError("partition values and run ids must not be empty")
    return "".join(
        char if char in SAFE_CHARACTERS else "".join(f"{ESCAPE}{b:02X}" for b in char.encode())
        for char in value
    )


def unescape_value(text: str) -> str:
    """Inverse of `escape_value`."""
    out = bytearray()
    index = 0
    while index < len(text):
        if text[index] == ESCAPE:
            out.append(int(text[index + 1 : index + 3], 16))
            index += 3
        else:
            out.extend(text[index].encode())
            index += 1
    return out.decode()


def inventory_key(model_key: str, backend: str, tp: int = 1) -> str:
    """inventories/<model_key>/<backend>.json, with `.tp<N>` before `.json` for one rank of N."""
    suffix = f".tp{tp}" if tp > 1 else ""
    return f"{INVENTORY_PREFIX}{model_key}/{escape_value(backend)}{suffix}.json"


def model_config_key(model_key: str) -> str:
    """inventories/<model_key>/config.json: the config `dooly profile` traced the model from."""
    return f"{INVENTORY_PREFIX}{model_key}/{MODEL_CONFIG_NAME}"
