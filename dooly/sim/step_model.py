"""Step latency: how long one engine step takes for an exact batch composition.

A step is described by its prefill chunks `(query tokens, context tokens before the chunk)` and the
context lengths of its decode sequences (tokens already in the KV cache; each decode adds 1 query
token). Two models add up to the step time:

- a `StepLatencyModel` (device time of the forward pass). The fitted regressors of `dooly fit`
  provide one; `AnalyticStepModel` here is a roofline sketch for tests and benchmarks only.
  A model whose `step_seconds` also accepts a keyword `path` is told which execution path the
  engine takes (decode-only / prefill / mixed, CUDA graph or not, padded token count);
- a `CpuOverheadModel` (host time per step: scheduling, input preparation, sampling, output
  handling): constant + per-sequence + per-token + per-KV-token terms, one set per path,
  with coefficients measured on the real engine and loaded from JSON.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dooly.errors import DoolyError
from dooly.jsonfile import read_json

CPU_OVERHEAD_SCHEMA = "dooly.cpu_overhead/1"
# Overhead keys of steps replayed as CUDA graphs end with this.
GRAPH_SUFFIX = "_graph"


class StepKind(str, Enum):
    """What a step holds: only decodes, only prefill chunks, or both."""

    DECODE = "decode"
    PREFILL = "prefill"
    MIXED = "mixed"

    @classmethod
    def of(cls, prefill: Sequence[Any], decode_ctx: Sequence[Any]) -> StepKind:
        """The kind of a step holding these prefill chunks and decodes."""
        if not prefill:
            return cls.DECODE
        return cls.MIXED if decode_ctx else cls.PREFILL


# (engine path, padded query tokens, padded KV read, padded longest sequence, IO pair): a captured
# graph's key. The IO pair is 0 for a synchronous engine; transformers' async batching alternates
# two pairs of static input/output buffers, each with its own graphs, so a shape is captured once
# per pair (measured: bench/async_batching.py).
GraphShape = tuple[str, int, int, int, int]
# The leading fields of a GraphShape that shape the step's kernels (`CpuOverheadModel.attention_shape`).
ATTENTION_SHAPE_FIELDS = 3


@dataclass(frozen=True, slots=True)
class StepPath:
    """The execution path the engine takes for a step.

    `engine_path` is the engine's own name for it (transformers: `varlen` or `decode_fast_path`;
    vLLM: `full_graph`, `piecewise_graph` or `eager`); `padded_tokens` is the query-token count
    the kernels actually run over (CUDA graphs pad to a captured size), equal to the real count
    when nothing is padded; `padded_kv` likewise for the KV tokens attention reads (transformers
    pads its read index to `kv_padding_interval_size` under CUDA graphs), 0 when not padded;
    `padded_seqlen_k` the longest sequence's KV length as the engine pads it for a captured graph
    (a power of two), part of the graph's key and nothing else, 0 when not padded.
    """

    kind: StepKind
    cuda_graph: bool = False
    padded_tokens: int = 0
    engine_path: str = ""
    padded_kv: int = 0
    padded_seqlen_k: int = 0

    @property
    def overhead_key(self) -> str:
        """Key into `CpuOverheadModel.terms`: the kind, suffixed `_graph` when replayed as a graph.
        (`_value_` is what `.value` returns, without the enum property's call: this runs every step.)"""
        kind = self.kind._value_
        return f"{kind}{GRAPH_SUFFIX}" if self.cuda_graph else kind


@runtime_checkable
class StepLatencyModel(Protocol):
    """Predicts the device time of one forward step, in seconds.

    `prefill`: one `(chunk query tokens, context tokens before the chunk)` per prefilling sequence;
    `decode_ctx`: per decoding sequence, the tokens already in its KV cache.
    """

    def step_seconds(self, prefill: list[tuple[int, int]], decode_ctx: list[int]) -> float: ...


def padded_composition(
    prefill: list[tuple[int, int]], decode_ctx: list[int], path: StepPath
) -> tuple[list[tuple[int, int]], list[int]]:
    """The batch as the kernels see it when the engine pads its inputs, for step models that
    take compositions only.

    Padded query tokens become one extra prefill chunk with no context; padded KV tokens extend
    the context of the first sequence. Dense-masked attention (`paged|sdpa`, `paged|eager`) costs
    what its query and KV extents say, so the totals T and K are what matter; token-wise ops see
    the padded T, as they do on the device."""
    prefill = list(prefill)
    decode_ctx = list(decode_ctx)
    tokens = sum(q for q, _ in prefill) + len(decode_ctx)
    extra_q = path.padded_tokens - tokens
    if extra_q > 0:
        prefill.append((extra_q, 0))
    kv = sum(q + c for q, c in prefill) + sum(decode_ctx) + len(decode_ctx)
    extra_kv = path.padded_kv - kv
    if extra_kv > 0:
        if decode_ctx:
            decode_ctx[0] += extra_kv
        else:
            q, c = prefill[0]
            prefill[0] = (q, c + extra_kv)
    return prefill, decode_ctx


# Keywords a step model's `step_seconds` may take: the step's path (a path-aware model pads the
# batch itself), or `full_reads` (every attention layer reads all KV tokens, its sliding window
# notwithstanding: transformers' padded read index spans every layer group).
PATH_KEYWORD = "path"
FULL_READS_KEYWORD = "full_reads"


def device_seconds(
    model: StepLatencyModel,
    prefill: list[tuple[int, int]],
    decode_ctx: list[int],
    path: StepPath,
    keywords: frozenset[str],
) -> float:
    """Device time of one step: the path goes to a path-aware model, otherwise the padded
    composition does (with `full_reads` where the KV read is padded and the model takes it).
    `keywords` says which of those the model's step_seconds accepts (read off its signature), so
    it is called as a plain callable here: the protocol states only the keywords every model takes."""
    step_seconds: Callable[..., float] = model.step_seconds
    if PATH_KEYWORD in keywords:
        return step_seconds(prefill, decode_ctx, path=path)
    if path.padded_kv or path.padded_tokens > len(decode_ctx) + sum(q for q, _ in prefill):
        # (Most paths pad nothing: their padded_tokens is the step's own count, and copying the
        # composition to find that out cost a tenth of a fitted simulation.)
        prefill, decode_ctx = padded_composition(prefill, decode_ctx, path)
        if path.padded_kv and FULL_READS_KEYWORD in keywords:
            return step_seconds(prefill, decode_ctx, full_reads=True)
    return step_seconds(prefill, decode_ctx)


def decode_steps(
    model: StepLatencyModel, decode_ctx: list[int], path: StepPath, keywords: frozenset[str]
) -> Callable[[int], float] | None:
    """Device seconds of the decode-only steps of a decode window, as a function of the step's
    offset i (step i holds every context of `decode_ctx` plus i), each exactly what
    `device_seconds` gives for that step; None where the model cannot price them without each
    step's contexts (then price each step with `device_seconds`).

    A window's steps differ only in their contexts, each one token longer than the step before,
    so a model that offers `decode_steps` works out what stays the same once per window instead
    of building and scanning every step's contexts (most of a loaded replica's steps are such)."""
    method: Callable[..., Callable[[int], float] | None] | None = getattr(model, "decode_steps", None)
    if method is None:
        return None
    if PATH_KEYWORD in keywords:
        return method(decode_ctx, path=path)
    if path.padded_kv or path.padded_tokens > len(decode_ctx):
        return None
    return method(decode_ctx)


def step_keywords(model: StepLatencyModel) -> frozenset[str]:
    """Which of the optional keywords `model.step_seconds` takes (checked once per simulation)."""
    try:
        params = inspect.signature(model.step_seconds).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({PATH_KEYWORD})
    return frozenset(name for name in (PATH_KEYWORD, FULL_READS_KEYWORD) if name in params)


@dataclass(frozen=True)
class OverheadTerms:
    """Host seconds of one step: constant + per sequence + per query token + per KV token read."""

    constant_s: float = 0.0
    per_sequence_s: float = 0.0
    per_token_s: float = 0.0
    per_kv_token_s: float = 0.0

    def seconds(self, num_seqs: int, num_tokens: int, kv_tokens: int) -> float:
        return (
            self.constant_s
            + self.per_sequence_s * num_seqs
            + self.per_token_s * num_tokens
            + self.per_kv_token_s * kv_tokens
        )


OVERHEAD_KEYS = ("decode", "decode_graph", "prefill", "prefill_graph", "mixed", "mixed_graph")
# Fewer measured steps than this do not pin down four terms with any confidence.
MIN_FIT_SAMPLES = 8


@dataclass
class CpuOverheadModel:
    """Per-step host overhead of a serving engine, one `OverheadTerms` per path.

    Lookup for a step: its exact key (`decode_graph`, `mixed`, ...), else the key without
    `_graph`, else `default`, else zero. JSON form (`save`/`load`):

        {"schema": "dooly.cpu_overhead/1", "engine": "transformers", "platform": "...",
         "source": "how it was measured",
         "terms": {"decode_graph": {"constant_s": 0.0021, "per_sequence_s": 1.1e-05,
                                    "per_token_s": 0.0, "per_kv_token_s": 0.0},
                   "mixed": {...}, "default": {...}}}
    """

    terms: dict[str, OverheadTerms] = field(default_factory=dict)
    engine: str = ""
    platform: str = ""
    source: str = ""
    # One-off host cost the first time a CUDA-graph path meets a padded shape: the engine
    # captures a graph for it (`graph_shape`), then replays it on every later step.
    graph_capture_s: float = 0.0
    # Async batching only: extra device time of the step launched right after a capture beyond
    # its input copy (the H100 runs' 20 ms, fitted before the copy was modelled, was the copy).
    post_capture_device_s: float = 0.0
    # Async batching only: the host-to-device copy of a launch's inputs (transformers copies the
    # whole attention mask, max_batch_tokens x cache tokens, at every launch), measured at
    # `input_copy_bytes` of inputs; 0 bytes: applied as it is, whatever the engine copies.
    input_copy_s: float = 0.0
    input_copy_bytes: int = 0
    # The host's time from a capture's launch to the start of its eager run's kernels when the
    # step's attention shape (`attention_shape`) was never run in the process: the engine's
    # first-shape work (~60-80 ms on the H200 runs). With async batching it overlaps the device's
    # work in flight and the input copy but not the eager run's own device time (lab/async_ttft.py,
    # lab/async_captures_lease_d.py); a synchronous loop has nothing in flight, so there it adds
    # to the capture (`sync_capture_seconds`; lab/capture_cost.py).
    new_shape_eager_s: float = 0.0
    # Behind an HTTP server only (`dooly.sim.server_capture_term`): a capture's extra seconds per
    # sequence in its step, the server's event loop streaming them while the engine records.
    graph_capture_per_seq_s: float = 0.0

    def seconds(self, path: StepPath, num_seqs: int, num_tokens: int, kv_tokens: int) -> float:
        terms = self._terms_of(path)
        if terms is None:
            return 0.0
        return terms.seconds(num_seqs, num_tokens, kv_tokens)

    def kv_terms(self, path: StepPath, num_seqs: int, num_tokens: int) -> tuple[float, float]:
        """(seconds apart from the KV tokens, seconds per KV token) of a step on `path`: `seconds`
        is the first plus the second times the KV tokens, to the last bit (the same additions in
        the same order), for steps that differ in their KV tokens only (a decode window's)."""
        terms = self._terms_of(path)
        if terms is None:
            return 0.0, 0.0
        return terms.constant_s + terms.per_sequence_s * num_seqs + terms.per_token_s * num_tokens, terms.per_kv_token_s

    def _terms_of(self, path: StepPath) -> OverheadTerms | None:
        """The terms a step on `path` pays (see the class docstring), None for none."""
        if not self.terms:  # no host overhead (the analytic model's default): nothing to look up
            return None
        return self.terms.get(path.overhead_key) or self.terms.get(path.kind.value) or self.terms.get("default")

    @staticmethod
    def graph_shape(path: StepPath, io_pair: int = 0) -> GraphShape | None:
        """The key under which the engine caches a captured graph (in IO pair `io_pair`); None
        off the graph paths."""
        if not path.cuda_graph:
            return None
        return (path.engine_path, path.padded_tokens, path.padded_kv, path.padded_seqlen_k, io_pair)

    def capture_seconds(self, path: StepPath, captured: set[GraphShape], io_pair: int = 0, num_seqs: int = 0) -> float:
        """`graph_capture_s` (plus `graph_capture_per_seq_s` per sequence of the step) the first
        time `path`'s graph shape is met in IO pair `io_pair` (recorded in `captured`, the
        caller's engine-lifetime set), else 0."""
        shape = self.graph_shape(path, io_pair)
        if shape is None or shape in captured:
            return 0.0
        captured.add(shape)
        return self.graph_capture_s + self.graph_capture_per_seq_s * num_seqs

    def sync_capture_seconds(self, path: StepPath, captured: set[GraphShape], num_seqs: int = 0) -> float:
        """A synchronous loop's capture: `capture_seconds`, plus `new_shape_eager_s` when no graph
        in `captured` holds the step's attention shape (the engine's first run of that shape; a
        capture at a known attention shape, the same padded query and KV tokens under another
        longest-sequence key, pays `graph_capture_s` alone)."""
        new_shape = self.new_shape_eager_s > 0 and path.cuda_graph and self.new_attention_shape(path, captured)
        capture = self.capture_seconds(path, captured, num_seqs=num_seqs)
        return capture + self.new_shape_eager_s if new_shape else capture

    @staticmethod
    def attention_shape(path: StepPath) -> tuple[str, int, int]:
        """What a step's eager kernels are shaped by: its engine path and padded query and KV
        tokens (a graph shape without its IO pair and longest-sequence key)."""
        return (path.engine_path, path.padded_tokens, path.padded_kv)

    @classmethod
    def new_attention_shape(cls, path: StepPath, captured: set[GraphShape]) -> bool:
        """Whether no graph in `captured` was recorded at `path`'s attention shape (in any IO
        pair, at any longest-sequence key): the engine never ran a step of that shape. Ask before
        `capture_seconds` records the step's own graph."""
        shape = cls.attention_shape(path)
        return not any(graph[:ATTENTION_SHAPE_FIELDS] == shape for graph in captured)

    def input_copy_seconds(self, input_bytes: int) -> float:
        """The input copy of a launch that copies `input_bytes` (`Scheduler.async_input_bytes`):
        `input_copy_s` scaled by the bytes where both sizes are known (a copy at the host-to-device
        bandwidth lasts in proportion to its bytes), else `input_copy_s` as it is."""
        if self.input_copy_bytes > 0 and input_bytes > 0:
            return self.input_copy_s * input_bytes / self.input_copy_bytes
        return self.input_copy_s

    @classmethod
    def zero(cls) -> CpuOverheadModel:
        return cls(source="none: host overhead not modelled")

    @classmethod
    def fit(
        cls,
        samples: Iterable[tuple[str, int, int, int, float]],
        *,
        engine: str = "",
        platform: str = "",
        source: str = "",
    ) -> CpuOverheadModel:
        """Non-negative least-squares terms from measured steps.

        `samples`: `(key, num_seqs, num_tokens, kv_tokens, host_seconds)` per step, `key` one of
        OVERHEAD_KEYS (`StepPath.overhead_key`). Every key with at least MIN_FIT_SAMPLES rows gets
        its own terms; `default` is fitted on all rows.

        The CUDA-graph paths share their per-sequence, per-token and per-KV-token terms, each
        keeping its own constant. A replayed step's host time is the engine building that step's
        inputs (index lists as long as the KV tokens read), the same code whatever the step
        holds; a calibration run has few mixed steps, over a narrow KV range, and a fit of their
        own mistakes that growth for a constant or a per-token cost (Llama-3.2-3B warm: 6 ms
        predicted against 13 ms measured for mixed heavy-load steps). Without graphs a step's
        residual also holds launch time not hidden by the device's, which differs by path."""
        import numpy as np
        from scipy.optimize import nnls

        rows = [(str(k), float(b), float(t), float(kv), float(sec)) for k, b, t, kv, sec in samples]
        unknown = sorted({k for k, *_ in rows} - set(OVERHEAD_KEYS))
        if unknown:
            raise DoolyError(f"CPU overhead samples have unknown path key(s) {', '.join(unknown)}")
        if len(rows) < MIN_FIT_SAMPLES:
            raise DoolyError(f"fitting a CPU overhead model needs at least {MIN_FIT_SAMPLES} steps, got {len(rows)}")

        def nonnegative(design: np.ndarray, target: np.ndarray) -> np.ndarray:
            # Scale columns so that NNLS is well conditioned whatever the units, then undo it.
            scale = np.maximum(np.abs(design).max(axis=0), 1.0)
            coef, _ = nnls(design / scale, target)
            return coef / scale

        def solve(subset: list[tuple[str, float, float, float, float]]) -> OverheadTerms:
            coef = nonnegative(np.array([[1.0, b, t, kv] for _, b, t, kv, _ in subset]), np.array([r[4] for r in subset]))
            return OverheadTerms(*(float(c) for c in coef))

        def solve_shared(keys: list[str]) -> dict[str, OverheadTerms]:
            """One constant per key, the other terms common to all of them."""
            subset = [r for r in rows if r[0] in keys]
            design = np.array([[1.0 if k == key else 0.0 for key in keys] + [b, t, kv] for k, b, t, kv, _ in subset])
            coef = nonnegative(design, np.array([r[4] for r in subset]))
            slopes = tuple(float(c) for c in coef[len(keys):])
            return {key: OverheadTerms(float(coef[i]), *slopes) for i, key in enumerate(keys)}

        terms = {"default": solve(rows)}
        fitted = [key for key in OVERHEAD_KEYS if sum(1 for r in rows if r[0] == key) >= MIN_FIT_SAMPLES]
        graph_keys = [key for key in fitted if key.endswith(GRAPH_SUFFIX)]
        if graph_keys:
            terms.update(solve_shared(graph_keys))
        for key in fitted:
            if key not in graph_keys:
                terms[key] = solve([r for r in rows if r[0] == key])
        return cls(terms=terms, engine=engine, platform=platform, source=source or f"fitted on {len(rows)} steps")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CPU_OVERHEAD_SCHEMA,
            "engine": self.engine,
            "platform": self.platform,
            "source": self.source,
            "graph_capture_s": self.graph_capture_s,
            "post_capture_device_s": self.post_capture_device_s,
            "input_copy_s": self.input_copy_s,
            "input_copy_bytes": self.input_copy_bytes,
            "new_shape_eager_s": self.new_shape_eager_s,
            "graph_capture_per_seq_s": self.graph_capture_per_seq_s,
            "terms": {key: asdict(value) for key, value in sorted(self.terms.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CpuOverheadModel:
        if not isinstance(data, dict):
            raise DoolyError("a CPU overhead model is a JSON object")
        schema = data.get("schema", CPU_OVERHEAD_SCHEMA)
        if schema != CPU_OVERHEAD_SCHEMA:
            raise DoolyError(f"CPU overhead schema {schema!r} is not supported (expected {CPU_OVERHEAD_SCHEMA})")
        raw_terms = data.get("terms", {})
        if not isinstance(raw_terms, dict):
            raise DoolyError("CPU overhead `terms` must be an object keyed by path")
        allowed = set(OVERHEAD_KEYS) | {"default"}
        term_names = {f.name for f in fields(OverheadTerms)}
        terms: dict[str, OverheadTerms] = {}
        for key, values in raw_terms.items():
            if key not in allowed:
                raise DoolyError(f"CPU overhead path {key!r} is not one of {sorted(allowed)}")
            if not isinstance(values, dict) or set(values) - term_names:
                raise DoolyError(f"CPU overhead terms for {key!r} must be an object with keys {sorted(term_names)}")
            try:
                parsed = OverheadTerms(**{k: float(v) for k, v in values.items()})
            except (TypeError, ValueError):
                raise DoolyError(f"CPU overhead terms for {key!r} must be numbers") from None
            if any(not math.isfinite(v) or v < 0 for v in asdict(parsed).values()):
                raise DoolyError(f"CPU overhead terms for {key!r} must be finite and >= 0")
            terms[key] = parsed
        capture, post_capture, copy, new_shape, capture_per_seq = (
            _nonnegative(data, name) for name in ("graph_capture_s", "post_capture_device_s", "input_copy_s",
                                                  "new_shape_eager_s", "graph_capture_per_seq_s"))
        copy_bytes = _nonnegative(data, "input_copy_bytes")
        if not copy_bytes.is_integer():
            raise DoolyError("CPU overhead `input_copy_bytes` must be a whole number of bytes")
        return cls(
            terms=terms,
            engine=str(data.get("engine", "")),
            platform=str(data.get("platform", "")),
            source=str(data.get("source", "")),
            graph_capture_s=capture,
            post_capture_device_s=post_capture,
            input_copy_s=copy,
            input_copy_bytes=int(copy_bytes),
            new_shape_eager_s=new_shape,
            graph_capture_per_seq_s=capture_per_seq,
        )

    @classmethod
    def load(cls, path: str | Path) -> CpuOverheadModel:
        return cls.from_dict(read_json(path, "CPU overhead"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Analytic model: for tests and benchmarks only. It is a roofline sketch (each operation takes
# max(FLOPs / peak, bytes / bandwidth) plus a launch cost), not a prediction anyone should quote.
# ---------------------------------------------------------------------------------------------

BYTES_PER_BF16 = 2
# Rough H100 SXM figures: dense bf16 tensor-core peak and HBM3 bandwidth, derated to what large
# GEMMs and streaming reads reach in practice.
H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12
ACHIEVABLE_FRACTION = 0.6
KERNEL_LAUNCH_S = 4e-6
KERNELS_PER_LAYER = 12
CUDA_GRAPH_LAUNCH_FRACTION = 0.1
# Tensor parallelism: NVLink 4 moves about 450 GB/s per direction per GPU; a ring step costs a
# few microseconds of latency. Two all_reduces per layer (attention output, MLP output) and one
# all_gather of the logits per step, as transformers' TP plan issues them.
NVLINK_BYTES_PER_S = 450e9
COLLECTIVE_HOP_S = 5e-6
ALL_REDUCES_PER_LAYER = 2


@dataclass(frozen=True)
class ModelDims:
    """The config facts the analytic model and the Vidur exporter need."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool = True
    name: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "") -> ModelDims:
        """From a Hugging Face `config.json` dict (dense decoder models)."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
                num_layers=int(config["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                gated_mlp=str(config.get("model_type", "")) not in UNGATED_MODEL_TYPES,
                name=name or str(config.get("_name_or_path", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DoolyError(f"model config {name or ''} lacks a dense-decoder field: {exc}") from None


def rank_dims(dims: ModelDims, tp: int) -> ModelDims:
    """What one tensor-parallel rank computes: heads, KV heads (at least one), MLP width and
    vocabulary divided by `tp`, as transformers' TP plan shards them."""
    if tp < 1:
        raise DoolyError(f"tensor-parallel degree must be >= 1, got {tp}")
    for name in ("num_heads", "intermediate_size", "vocab_size"):
        if getattr(dims, name) % tp:
            raise DoolyError(f"--tp {tp} does not divide {name}={getattr(dims, name)}")
    return ModelDims(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size // tp,
        num_heads=dims.num_heads // tp,
        num_kv_heads=max(dims.num_kv_heads // tp, 1),
        head_dim=dims.head_dim,
        vocab_size=dims.vocab_size // tp,
        gated_mlp=dims.gated_mlp,
        name=dims.name,
    )


# Hugging Face model types whose MLP is a plain up/down projection; every other decoder family in
# the registry (Llama, Mistral, Qwen2, Gemma, Phi-3, Cohere) gates its MLP (up * act(gate)).
UNGATED_MODEL_TYPES = frozenset({"gpt2", "gpt_neox", "gpt_bigcode", "phi", "opt", "falcon", "bloom", "starcoder2"})

LLAMA_3_8B = ModelDims(
    num_layers=32,
    hidden_size=4096,
    intermediate_size=14336,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=128256,
    name="meta-llama/Llama-3.1-8B",
)


@dataclass
class AnalyticStepModel:
    """Roofline step model (tests and benchmarks only; see the section comment above)."""

    dims: ModelDims = LLAMA_3_8B
    peak_flops: float = H100_BF16_FLOPS * ACHIEVABLE_FRACTION
    bytes_per_s: float = H100_HBM_BYTES_PER_S * ACHIEVABLE_FRACTION
    bytes_per_param: int = BYTES_PER_BF16
    launch_s: float = KERNEL_LAUNCH_S
    tp: int = 1
    link_bytes_per_s: float = NVLINK_BYTES_PER_S
    full_dims: ModelDims | None = field(default=None, init=False)  # the whole model; `dims` is one rank

    def __post_init__(self) -> None:
        self.full_dims = self.dims
        if self.tp > 1:
            self.dims = rank_dims(self.dims, self.tp)
        # What a step's cost does not depend on, worked out once: a simulation prices tens of
        # thousands of steps (issue #25). Each is a product step_seconds formed per step, in the
        # same order, so every step costs exactly the seconds it did.
        d = self.dims
        kv_width = d.num_kv_heads * d.head_dim
        q_width = d.num_heads * d.head_dim
        mlp_mats = 3 if d.gated_mlp else 2
        layer_params = d.hidden_size * (q_width + 2 * kv_width) + q_width * d.hidden_size
        layer_params += mlp_mats * d.hidden_size * d.intermediate_size
        self._layer_params = layer_params
        self._attn_flops_per_token = 4 * q_width
        self._kv_bytes_per_token = 2 * kv_width
        self._linear_bytes_s = layer_params * self.bytes_per_param / self.bytes_per_s
        self._lm_flops_per_row = 2 * d.hidden_size * d.vocab_size
        self._lm_bytes_s = d.hidden_size * d.vocab_size * self.bytes_per_param / self.bytes_per_s
        # `_fixed_terms` of the decode windows' shapes (a run meets few: one per batch size).
        self._fixed_by_shape: dict[tuple[int, int, bool], tuple[float, float, float]] = {}

    def collective_seconds(self, kind: str, elements: int) -> float:
        """Ring estimate of one collective of `elements` per rank (0 on one rank)."""
        n = self.tp
        if n <= 1 or elements <= 0:
            return 0.0
        factors = {"all_reduce": 2.0 * (n - 1) / n, "all_gather": float(n - 1), "send_recv": 1.0}
        if kind not in factors:
            raise DoolyError(f"no analytic estimate for collective {kind!r}")
        hops = 2 * (n - 1) if kind == "all_reduce" else n - 1
        return hops * COLLECTIVE_HOP_S + factors[kind] * elements * self.bytes_per_param / self.link_bytes_per_s

    def step_seconds(
        self,
        prefill: list[tuple[int, int]],
        decode_ctx: list[int],
        *,
        path: StepPath | None = None,
    ) -> float:
        num_decode = len(decode_ctx)
        num_tokens = num_decode
        for q, _ in prefill:
            num_tokens += q
        if path is not None and path.padded_tokens > num_tokens:
            num_tokens = path.padded_tokens
        if num_tokens == 0:
            return 0.0
        # Attention: score and value products over the visible context (4 x q_width per pair);
        # the KV cache (2 x kv_width per token) is read once.
        attn_per_token = self._attn_flops_per_token
        attn_flops = 0.0
        kv_read = 0
        for q, ctx in prefill:
            attn_flops += attn_per_token * q * (ctx + (q + 1) / 2)
            kv_read += ctx + q
        decode_total = sum(decode_ctx) + num_decode
        attn_flops += attn_per_token * decode_total
        kv_read += decode_total
        rows = len(prefill) + num_decode  # logits_rows
        linear, launches, lm_head = self._fixed_terms(num_tokens, rows, path)
        return self._total(linear + self._attention(attn_flops, kv_read), launches, lm_head, num_tokens, rows)

    def decode_steps(self, decode_ctx: list[int], *, path: StepPath | None = None) -> Callable[[int], float] | None:
        """`step_seconds` of a decode window's steps (`dooly.sim.step_model.decode_steps`): step i
        holds every context plus i, so only its attention changes; the rest is worked out once."""
        num_decode = len(decode_ctx)
        num_tokens = num_decode
        if path is not None and path.padded_tokens > num_tokens:
            num_tokens = path.padded_tokens
        if num_tokens == 0:
            return None
        first_total = sum(decode_ctx) + num_decode
        attn_per_token = self._attn_flops_per_token
        shape = (num_tokens, num_decode, path is not None and path.cuda_graph)
        fixed = self._fixed_by_shape.get(shape)
        if fixed is None:
            fixed = self._fixed_by_shape[shape] = self._fixed_terms(num_tokens, num_decode, path)
        linear, launches, lm_head = fixed
        attention, total = self._attention, self._total
        if self.tp > 1:

            def seconds(step: int) -> float:
                decode_total = first_total + num_decode * step
                return total(linear + attention(0.0 + attn_per_token * decode_total, decode_total), launches, lm_head,
                             num_tokens, num_decode)

            return seconds
        # One rank: `_attention` and `_total` spelled out (a window prices tens of thousands of
        # steps; the calls were a third of each), the same operations in the same order.
        peak, bytes_per_s = self.peak_flops, self.bytes_per_s
        kv_bytes = self._kv_bytes_per_token
        bytes_per_param = self.bytes_per_param
        layers = self.dims.num_layers

        def one_rank_seconds(step: int) -> float:
            decode_total = first_total + num_decode * step
            flops_s = (0.0 + attn_per_token * decode_total) / peak
            bytes_s = kv_bytes * decode_total * bytes_per_param / bytes_per_s
            return layers * (linear + (bytes_s if bytes_s > flops_s else flops_s) + launches) + lm_head

        return one_rank_seconds

    def _fixed_terms(self, num_tokens: int, rows: int, path: StepPath | None) -> tuple[float, float, float]:
        """(linear layers' seconds per layer, launches per layer, LM head) of a step of
        `num_tokens` (padded) tokens and `rows` logits rows: what its attention does not change."""
        peak = self.peak_flops
        # Linear layers: 2 x tokens x layer params FLOPs; the weights are read once.
        linear_s = 2 * num_tokens * self._layer_params / peak
        # max(a, b), spelled out (a call per term was a tenth of a step): b only where b > a.
        linear = self._linear_bytes_s if self._linear_bytes_s > linear_s else linear_s
        launches = KERNELS_PER_LAYER * self.launch_s
        if path is not None and path.cuda_graph:
            launches *= CUDA_GRAPH_LAUNCH_FRACTION
        lm_flops_s = self._lm_flops_per_row * rows / peak
        lm_head = self._lm_bytes_s if self._lm_bytes_s > lm_flops_s else lm_flops_s
        return linear, launches, lm_head

    def _attention(self, attn_flops: float, kv_read: int) -> float:
        """One layer's attention seconds: its FLOPs or its KV-cache read, whichever takes longer."""
        attn_flops_s = attn_flops / self.peak_flops
        attn_bytes_s = self._kv_bytes_per_token * kv_read * self.bytes_per_param / self.bytes_per_s
        return attn_bytes_s if attn_bytes_s > attn_flops_s else attn_flops_s

    def _total(self, per_layer: float, launches: float, lm_head: float, num_tokens: int, rows: int) -> float:
        """A step's seconds from its per-layer seconds, launches and LM head (plus collectives
        across tensor-parallel ranks)."""
        d = self.dims
        if self.tp <= 1:  # no collectives on one rank (adding their 0.0 would change nothing)
            return d.num_layers * (per_layer + launches) + lm_head
        comm = d.num_layers * ALL_REDUCES_PER_LAYER * self.collective_seconds("all_reduce", num_tokens * d.hidden_size)
        comm += self.collective_seconds("all_gather", rows * d.vocab_size)
        return d.num_layers * (per_layer + launches) + lm_head + comm

    @staticmethod
    def logits_rows(prefill: list[tuple[int, int]], decode_ctx: list[int]) -> int:
        return len(prefill) + len(decode_ctx)


def _nonnegative(data: dict[str, Any], name: str) -> float:
    """An optional seconds field of a CPU overhead document (0 when absent)."""
    try:
        value = float(data.get(name, 0.0))
    except (TypeError, ValueError):
        raise DoolyError(f"CPU overhead `{name}` must be a number") from None
    if not math.isfinite(value) or value < 0:
        raise DoolyError(f"CPU overhead `{name}` must be finite and >= 0")
    return value
