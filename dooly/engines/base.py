"""The small interface every serving-engine adapter implements.

The tracer and the profiler only talk to an engine through this interface, so a third engine
(SGLang, ...) is a new module, not edits everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dooly.errors import DoolyError


@dataclass(frozen=True)
class SeqShape:
    """One sequence of an engine step: `query` new tokens after `context` tokens already cached."""

    query: int
    context: int

    @property
    def kv(self) -> int:
        return self.query + self.context


@dataclass(frozen=True)
class Batch:
    """A step's batch composition: what the engine's scheduler hands its model runner."""

    seqs: tuple[SeqShape, ...]

    @classmethod
    def of(cls, prefill: list[tuple[int, int]] = (), decode_ctx: list[int] = ()) -> "Batch":
        seqs = [SeqShape(q, c) for q, c in prefill] + [SeqShape(1, c) for c in decode_ctx]
        return cls(tuple(seqs))

    @property
    def tokens(self) -> int:
        return sum(s.query for s in self.seqs)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def kv_tokens(self) -> int:
        return sum(s.kv for s in self.seqs)

    @property
    def decode_seqs(self) -> int:
        return sum(1 for s in self.seqs if s.query == 1 and s.context > 0)

    def point_key_payload(self) -> dict[str, Any]:
        return {"seqs": [[s.query, s.context] for s in self.seqs]}


class Engine(Protocol):
    """A serving engine, seen from the tracer and the profiler."""

    name: str

    def version(self) -> str:
        """The engine's version string, recorded as provenance on every row."""

    def build_model(self) -> Any:
        """The engine's model for the configured architecture, built with the engine's own code."""

    def step_inputs(self, batch: Batch) -> dict[str, Any]:
        """The keyword arguments of the engine's model forward for this batch (KV cache included)."""

    def release(self) -> None:
        """Free the cache blocks the last `step_inputs` allocated."""


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object; any other content is a one-line DoolyError."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DoolyError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise DoolyError(f"{what} file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DoolyError(f"{what} file {path} must hold a JSON object")
    return data


def parse_engine_settings(engine_config: str | None, settings: tuple[str, ...]) -> dict[str, Any]:
    """Engine settings from `--engine-config FILE` and `--set KEY=VALUE` flags (later wins).

    Values are read as JSON where they parse (`num_blocks=512`, `use_cuda_graph=true`,
    `use_cuda_graph=[false,true]`), else kept as strings (`scheduler_type=fifo`)."""
    values: dict[str, Any] = {}
    if engine_config:
        values.update(read_json_object(Path(engine_config), "engine config"))
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DoolyError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values
