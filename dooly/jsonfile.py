"""Reading the small JSON documents users hand to Dooly (workloads, engine settings, overhead
models, measured steps): any problem is one DoolyError line naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dooly.errors import DoolyError


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DoolyError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise DoolyError(f"{what} file {path} is not valid JSON: {exc}") from None


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise DoolyError(f"{what} file {path} must hold a JSON object")
    return data
