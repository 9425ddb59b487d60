"""The small interface every serving-engine adapter implements.

The tracer and the profiler only talk to an engine through this interface, so a third engine
(SGLang, ...) is a new module, not edits everywhere.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dooly.errors import DoolyError
from dooly.jsonfile import read_json_object


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
    def of(cls, prefill: Sequence[tuple[int, int]] = (), decode_ctx: Sequence[int] = ()) -> Batch:
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
    """One engine instance for one model config, built with the engine's own code."""

    name: str

    def version(self) -> str:
        """The engine's version string, recorded as provenance on every row."""

    def build_model(self) -> Any:
        """The engine's model for the configured architecture, built with the engine's own code."""

    def step_inputs(self, batch: Batch) -> Any:
        """What the engine's scheduler hands its model runner for this batch (KV blocks allocated)."""

    def run_step(self, inputs: Any) -> Any:
        """One engine step through the engine's own model runner: forward, logits, sampling."""

    def release(self) -> None:
        """Free the cache blocks the last `step_inputs` allocated."""


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


class Symbolizer(Protocol):
    """Turns the sizes a batch decides into the tracer's request symbols (T, B, ...)."""

    def size(self, value: int) -> Any:
        """The symbol for a request size (a SymInt), or the int itself when it is not one."""

    def tensor(self, value: Any, dims: tuple[int, ...] | None = None) -> Any:
        """An empty tensor like `value` whose request-sized dims (all, or only `dims`) are symbolic."""

    def tree(self, value: Any) -> Any:
        """`tensor` applied to every tensor of a nested dict/list of inputs."""


def shape_only_mode(shape_env: Any) -> Any:
    """The FakeTensorMode a traced step runs in (shapes only, sizes symbolic in `shape_env`), with
    its dispatch cache off.

    The cache memoises each op's output metadata by its input metadata, a gain when one mode sees
    the same op on the same shapes many times (a compiler's repeated passes). A trace runs each op
    of one layer period once, in a fresh ShapeEnv per pass, so nearly every lookup misses and pays
    for building an entry whose symbolic output sizes are rebuilt through SymInt arithmetic: with
    it off, a trace pass takes about 35% less time (0.65 s -> 0.42 s per phase for Llama-3.1-8B
    on a 2-core CPU). The ops and their shapes are the same either way, which is what the cache
    promises (torch can cross-check it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    mode.cache_enabled = False
    return mode


@dataclass
class TraceStep:
    """One engine step ready to be traced: built by the engine's own code inside the tracer's
    FakeTensorMode (or, for engines whose init needs real memory, built for real and entered into
    fake mode for the step alone).

    `prepare(symbolizer)` makes the step's inputs with their request-sized dims symbolic (outside the
    recorder: building inputs is not part of the step); `run(inputs)` runs the step. The engine's
    attention call is recorded as one operation: through the transformers attention registry when
    `attention_modules` is None, else by hooking these modules (vLLM's `Attention` layers), whose
    metadata tensors `attention_metadata(module)` names."""

    model: Any
    prepare: Callable[[Symbolizer], Any]
    run: Callable[[Any], None]
    attention_modules: list[Any] | None = None
    attention_metadata: Callable[[Any], list[Any]] = field(default=lambda module: [])
    attention_scalars: Callable[[Any], dict[str, Any]] = field(default=lambda module: {})


class EngineKind(Protocol):
    """A serving engine as the tracer and the profiler see it: one object per engine module, so a
    third engine (SGLang, ...) is a new module registered in `dooly.engines.registry`."""

    name: str
    default_backend: str
    block_size: int

    def version(self) -> str:
        """The installed engine's version (provenance on every row)."""

    def backends(self) -> tuple[str, ...]:
        """Attention backends this engine can be traced and profiled with."""

    def request_values(self, phase: str, batch: Batch, window: int | None) -> dict[str, int]:
        """The request variables the engine's step inputs are sized by, at this batch."""

    def geometry(self, batch: Batch, probe: bool) -> dict[str, int]:
        """The engine fields (engine.block_size, ...) the step is built with, real or probe values."""

    def probe_overrides(self, overrides: dict[str, int], config: dict[str, Any]) -> dict[str, int]:
        """Adjust the probe config's values to what the engine accepts (supported head sizes...)."""

    def trace_session(self, config: Any, *, backend: str, dtype: Any, batch: Batch,
                      geometry: dict[str, int], shape_env: Any) -> contextlib.AbstractContextManager[TraceStep]:
        """Build the engine for `config` and `batch`; yield the step inside a FakeTensorMode."""

    def attention_runner(self, hf_config: Any, *, backend: str, dtype: Any, device: str, max_tokens: int,
                         max_kv: int, max_seqs: int, period: int) -> Any:
        """An object whose `call_for(batch, sliding)` is the engine's own attention call for a batch."""
