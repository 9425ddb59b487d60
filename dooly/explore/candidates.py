"""The candidates of an exploration: what the store can predict, crossed with the engine settings.

A candidate is one serving configuration: model, platform, engine, attention backend, dtype,
tensor-parallel degree and engine settings. The space is the cross product of what the fitted
groups of the store hold (narrowed by --platform/--backend/--engine/--dtype; a value asked for
that the store lacks stays in the space) and the settings given. Every candidate is kept: those the
store cannot predict carry the reason, so a planner sees what was not considered and why.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dooly.engines.registry import served_by
from dooly.errors import DoolyError
from dooly.fit.source import FittedSource
from dooly.profile.provenance import COMM_ENGINES, SHARED_BACKEND

SETTING_SEPARATOR = ","


@dataclass(frozen=True)
class Candidate:
    """One serving configuration to search the capacity of."""

    model: str
    platform: str
    engine: str
    backend: str
    dtype: str
    tp: int
    settings_json: str = "{}"  # canonical JSON of the engine settings (hashable; values may be lists)

    @property
    def settings(self) -> dict[str, Any]:
        """The candidate's engine settings over what its engine resolves on its backend's platform
        (`dooly.sim.engine_settings.platform_defaults`: vLLM on a CPU runs without CUDA graphs)."""
        from dooly.sim.engine_settings import platform_defaults

        return {**platform_defaults(self.engine, self.backend), **json.loads(self.settings_json)}

    def source(self, store: str) -> FittedSource:
        return FittedSource(store=store, platform=self.platform, backend=self.backend, engine=self.engine,
                            dtype=self.dtype, tp=self.tp)

    def source_key(self) -> tuple[str, str, str, str, str, int]:
        """Candidates with the same key run on the same step model (opened once per process)."""
        return (self.model, self.platform, self.engine, self.backend, self.dtype, self.tp)

    def predictor_key(self) -> tuple[str, str, str, str]:
        """Candidates with the same key read the same fitted regressors (whatever the model or TP)."""
        return (self.platform, self.engine, self.backend, self.dtype)

    def settings_label(self) -> str:
        settings = self.settings
        return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(settings.items())) or "defaults"

    def label(self) -> str:
        short_model = self.model.rsplit("/", 1)[-1]
        return f"{short_model} {self.platform} {self.backend} tp{self.tp} {self.settings_label()}"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "platform": self.platform, "engine": self.engine, "backend": self.backend,
                "dtype": self.dtype, "tp": self.tp, "settings": self.settings}


@dataclass
class CandidateSpace:
    """Candidates to simulate, and those the store cannot predict with the reason."""

    runnable: list[Candidate] = field(default_factory=list)
    unpredictable: list[tuple[Candidate, str]] = field(default_factory=list)
    notes: dict[Candidate, str] = field(default_factory=dict)  # e.g. simulated but not servable


def split_values(text: str) -> list[str]:
    """`a,b,[c,d]` -> ['a', 'b', '[c,d]']: commas inside brackets or braces belong to the value."""
    values: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == SETTING_SEPARATOR and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(char)
    values.append("".join(current))
    return [v.strip() for v in values]


def parse_setting_grid(items: Sequence[str]) -> list[dict[str, Any]]:
    """`--set KEY=V1,V2` flags -> every combination of the values (one empty dict when none)."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise DoolyError(f"--set expects KEY=V1,V2,..., got {item!r}")
        values = []
        for text in split_values(raw):
            if not text:
                raise DoolyError(f"--set {item!r} has an empty value")
            try:
                values.append(json.loads(text))
            except json.JSONDecodeError:
                values.append(text)
        axes.setdefault(key, [])
        axes[key] += [v for v in values if v not in axes[key]]
    keys = sorted(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def parse_tp(text: str) -> list[int]:
    try:
        degrees = sorted({int(v) for v in split_values(text)})
    except ValueError:
        raise DoolyError(f"--tp expects comma-separated integers, got {text!r}") from None
    if not degrees or degrees[0] < 1:
        raise DoolyError(f"--tp degrees must be >= 1, got {text!r}")
    return degrees


@dataclass(frozen=True)
class StoreFacts:
    """What the store's newest fitted generation holds, read once."""

    generation: int
    groups: tuple[tuple[str, str, str, str], ...]  # (platform, engine, backend, dtype) of kernel groups
    collectives: dict[tuple[str, str], tuple[str, ...]]  # (platform, dtype) -> interconnect labels
    inventories: dict[str, tuple[tuple[int, str], ...]]  # model id (lower case), short name -> (tp, backend) traced


def read_store_facts(store_uri: str) -> StoreFacts:
    from dooly.fit.persist import latest_meta_key, read_inventories
    from dooly.store.backends import open_store
    from dooly.store.documents import read_json

    store = open_store(store_uri, create=False)
    meta_key = latest_meta_key(store)
    meta = read_json(store, meta_key)
    if not isinstance(meta, dict):
        raise DoolyError(f"store {store_uri}: {meta_key} is unreadable")
    groups: list[tuple[str, ...]] = []
    collectives: dict[tuple[str, str], list[str]] = {}
    for entry in meta.get("groups", []):
        key = tuple(str(entry.get(k)) for k in ("platform", "engine", "backend", "dtype"))
        if key[1] in COMM_ENGINES:
            collectives.setdefault((key[0], key[3]), []).append(key[2])
        elif key[2] != SHARED_BACKEND:
            groups.append(key)
    inventories: dict[str, set[tuple[int, str]]] = {}
    for inventory in read_inventories(store).values():
        model_id = str(inventory.get("model_id", "")).lower()
        for name in {model_id, model_id.rsplit("/", 1)[-1], str(inventory.get("model_key", "")).lower()}:
            if name:
                inventories.setdefault(name, set()).add((int(inventory.get("tp", 1) or 1), str(inventory.get("backend", ""))))
    return StoreFacts(
        generation=int(meta.get("generation", 0)),
        groups=tuple(sorted(set(groups))),  # type: ignore[arg-type]
        collectives={k: tuple(sorted(v)) for k, v in collectives.items()},
        inventories={k: tuple(sorted(v)) for k, v in inventories.items()},
    )


def _axis(asked: Sequence[str], held: Iterable[str]) -> list[str]:
    """The values asked for (in the order given), else every value the store holds."""
    return list(dict.fromkeys(asked)) if asked else sorted(set(held))


def build_space(
    facts: StoreFacts,
    models: Sequence[str],
    *,
    platforms: Sequence[str] = (),
    engines: Sequence[str] = (),
    backends: Sequence[str] = (),
    dtypes: Sequence[str] = (),
    tps: Sequence[int] = (1,),
    settings: Sequence[dict[str, Any]] = ({},),
) -> CandidateSpace:
    """Cross product of the axes; each candidate checked against what the store can predict."""
    space = CandidateSpace()
    held = set(facts.groups)
    axes = (
        _axis(platforms, (g[0] for g in held)),
        _axis(engines, (g[1] for g in held)),
        _axis(backends, (g[2] for g in held)),
        _axis(dtypes, (g[3] for g in held)),
    )
    for model in models:
        for platform, engine, backend, dtype in itertools.product(*axes):
            for tp in tps:
                for setting in settings:
                    candidate = Candidate(model, platform, engine, backend, dtype, tp,
                                          json.dumps(setting, sort_keys=True, separators=(",", ":")))
                    reason = _unpredictable(facts, held, candidate)
                    if reason:
                        space.unpredictable.append((candidate, reason))
                        continue
                    if not served_by(engine, backend):
                        space.notes[candidate] = (f"{engine} does not serve {backend} (profile-only backend): "
                                                  f"simulated with its scheduler, not a deployable choice")
                    space.runnable.append(candidate)
    return space


def _unpredictable(facts: StoreFacts, held: set[tuple[str, str, str, str]], c: Candidate) -> str | None:
    """Why the store cannot predict C, from its facts alone (None when it may).

    A model the store holds no inventory of is not a reason: the resolver traces it on the CPU
    when its step model is opened (`dooly.fit.resolve`), and a model it cannot trace is reported
    then, with the resolver's error."""
    group = (c.platform, c.engine, c.backend, c.dtype)
    if group not in held:
        return f"no fitted models for {'/'.join(group)} in generation {facts.generation}"
    if c.tp > 1:
        labels = facts.collectives.get((c.platform, c.dtype), ())
        if not labels:
            return f"tp{c.tp}: no collectives measured on {c.platform}/{c.dtype}"
        if len(labels) > 1:
            return f"tp{c.tp}: collectives of several interconnects ({', '.join(labels)}); not chosen automatically"
    return None
