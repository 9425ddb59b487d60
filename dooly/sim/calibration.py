"""The engine's host overhead as data of the platform: one calibration per (platform, engine,
engine version, attention backend, CUDA graphs on/off, async batching), fitted across every model's calibration
runs and stored beside the kernels, so a model that was never run needs no run of its own.

Why a model enters at all: without CUDA graphs the host launches every kernel of every layer, so a
step's host time grows with the layer count; with or without graphs it builds the step's inputs:
index lists as long as the KV tokens read, one per cache layer group (transformers' paged cache
keeps one block table per group: the full-attention groups read every KV token, a sliding group at
most its window per sequence). The calibration's terms per step path (`decode`, `mixed`, ... as
`StepPath.overhead_key`) are therefore

    host_s = constant_s + per_layer_s * L
           + per_sequence_s * B + per_token_s * T
           + per_kv_group_token_s * G + per_kv_sliding_token_s * S          (KV regressors `groups`)
           + per_kv_token_s * K + per_kv_token_layer_s * K * L              (KV regressors `tokens`)

for a model of L decoder layers and a step of B sequences, T query tokens and K KV tokens read;
G = the KV index entries summed over the model's cache layer groups (K per full-attention group,
plus min(KV of the sequence, window) per sequence per sliding group), S = the sliding groups' part
of G alone (`CacheGroups.kv_reads`). A calibration is fitted with one of the two KV forms: `groups`
(the default: on the committed H100 graph-path runs a left-out model's mean host time per step is
off by 14.4% on average against 27.0% with K, lab/host_kv_groups.py) or `tokens` (the form of
calibrations written before it, which load with zero group terms).
Each path keeps its own constant and per-layer term (launch gaps differ by path); the slopes in B,
T and K are shared by the paths of one family (graph-replayed paths; eager paths). A calibration run's mixed steps nearly all
hold `max_batch_tokens` query tokens, so a path of its own cannot tell a per-token cost from a
constant: non-negative least squares then moves the whole cost into either (4.6 ms one lease, 0 ms
the next for one cell). Shared slopes are pinned by the decode and prefill steps, whose sizes do
vary, and a small ridge on every scaled slope settles what the data still cannot separate.
`CpuOverheadModel.fit` (one model's own calibration, `dooly overhead`) keeps its earlier solver so
that committed per-model results reproduce; `bench/calibration_transfer.py` compares the two.

Store layout (docs/calibration.md): one JSON document per generation,

    calibrations/platform=<P>/engine=<E>/engine_version=<V>/backend=<B>/graphs=<on|off>/gen-<NNNNNN>.json
    calibrations/.../graphs=<on|off>/async=on/gen-<NNNNNN>.json   (async batching)

Async batching gets calibrations of its own: its host cycle (prepare, launch, update; measured
from the bench probe's split, `dooly.sim.validate.async_host_samples`) overlaps the device and is
not a wall-time residual, it captures each graph once per IO pair, every launch copies its inputs
to the device behind the previous launch's copy (`input_copy_s`, measured at `input_copy_bytes`:
transformers copies the whole attention mask), and the step after a capture pays any extra device
time beyond its copy (`post_capture_device_s`); a capture at an attention shape the engine never
ran holds the host from its launch for the eager run's first-shape work (`new_shape_eager_s`).
Values escaped as in shard keys. A generation is created with an atomic create-if-absent, so a
reader sees a whole document or none; the newest generation is the calibration.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from dooly.errors import DoolyError
from dooly.sim.step_model import GRAPH_SUFFIX, MIN_FIT_SAMPLES, OVERHEAD_KEYS, CpuOverheadModel, OverheadTerms

logger = logging.getLogger(__name__)

CALIBRATION_SCHEMA = "dooly.calibration/1"
CALIBRATIONS_PREFIX = "calibrations/"
GENERATION_PREFIX = "gen-"
GENERATION_DIGITS = 6
GENERATION_SUFFIX = ".json"
MAX_CREATE_ATTEMPTS = 8
GRAPHS_ON = "on"
GRAPHS_OFF = "off"
# The key segment of an async-batching calibration (synchronous ones have none, as before).
ASYNC_SEGMENT = "async=on"
DEFAULT_KEY = "default"
# Ridge weight on every slope column, relative to the data term after columns are scaled to a
# maximum of 1: small enough to move a well-determined slope by well under 1%, large enough to
# make collinear columns split the same way on every run instead of one of them taking all.
RIDGE = 1e-4
# Term names of one path of a calibration (seconds, per unit).
TERM_NAMES = ("constant_s", "per_layer_s", "per_sequence_s", "per_token_s", "per_kv_token_s", "per_kv_token_layer_s",
              "per_kv_group_token_s", "per_kv_sliding_token_s")
# Which terms each path keeps for itself; the rest are shared by every path of the calibration.
PATH_TERMS = ("constant_s", "per_layer_s")
# The KV regressor forms (`dooly calibrate --kv-regressors`): the KV index entries the engine builds
# per cache layer group, or the KV tokens read (and those times the layer count).
KV_GROUPS = "groups"
KV_TOKENS = "tokens"
KV_REGRESSORS = {
    KV_GROUPS: ("per_kv_group_token_s", "per_kv_sliding_token_s"),
    KV_TOKENS: ("per_kv_token_s", "per_kv_token_layer_s"),
}
DEFAULT_KV_REGRESSORS = KV_GROUPS
# Slopes every form shares (the KV ones are added by form).
BASE_SHARED_TERMS = ("per_sequence_s", "per_token_s")
# Layer counts (models) a calibration needs before per-layer terms are considered, and how much
# better (relative) they must predict a left-out model's host time to be kept.
MIN_MODELS_FOR_CHOICE = 4
LAYER_TERMS_MARGIN = 0.05
# Terms that need more than one layer count among the runs to be told apart from the others.
LAYER_TERMS = ("per_layer_s", "per_kv_token_layer_s")


@dataclass(frozen=True)
class CacheGroups:
    """A model's paged-cache layer groups, as the scheduler settings spell them
    (`full_attention_groups`, `sliding_attention_groups`, `sliding_window`): what the engine's
    per-step KV index work scales with, one block table per group."""

    full: int = 1
    sliding: int = 0
    window: int = 0

    @classmethod
    def from_settings(cls, settings: Any) -> CacheGroups:
        """From an object with the scheduler config's group fields (its defaults where absent:
        one full-attention group, as for an engine whose settings do not describe groups)."""
        sliding = int(getattr(settings, "sliding_attention_groups", 0) or 0)
        return cls(full=int(getattr(settings, "full_attention_groups", 1)), sliding=sliding,
                   window=int(getattr(settings, "sliding_window", 0) or 0) if sliding else 0)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> CacheGroups:
        """The groups a scheduler was built with (`with_model_groups` fills them per model)."""
        return cls.from_settings(getattr(scheduler, "config", None))

    def kv_reads(self, kv_per_sequence: Iterable[int]) -> tuple[int, int]:
        """(KV index entries over all groups, those of the sliding groups alone) for a step whose
        sequences read `kv_per_sequence` KV tokens each: a full-attention group indexes every KV
        token, a sliding group at most the window of each sequence."""
        kv = list(kv_per_sequence)
        sliding = self.sliding * sum(min(tokens, self.window) for tokens in kv)
        return self.full * sum(kv) + sliding, sliding

    def describe(self) -> str:
        sliding = f" + {self.sliding} sliding (window {self.window})" if self.sliding else ""
        return f"{self.full} full-attention{sliding} cache group(s)"


ONE_FULL_GROUP = CacheGroups()


@dataclass(frozen=True)
class HostSample:
    """One measured step's host time: wall time minus the device time the step model predicts.

    `kv_group_tokens` and `kv_sliding_tokens` are `CacheGroups.kv_reads` of the step; a sample
    built without them (None) stands for a model of one full-attention group."""

    key: str  # StepPath.overhead_key
    num_layers: int
    num_seqs: int
    num_tokens: int
    kv_tokens: int
    host_s: float
    model: str = ""
    kv_group_tokens: int | None = None
    kv_sliding_tokens: int = 0

    @property
    def group_tokens(self) -> int:
        """KV index entries over the model's cache groups (K for one full-attention group)."""
        return self.kv_tokens if self.kv_group_tokens is None else self.kv_group_tokens

    def regressors(self) -> dict[str, float]:
        """The value each term multiplies in this step (see the module docstring)."""
        return {"constant_s": 1.0, "per_layer_s": float(self.num_layers), "per_sequence_s": float(self.num_seqs),
                "per_token_s": float(self.num_tokens), "per_kv_token_s": float(self.kv_tokens),
                "per_kv_token_layer_s": float(self.kv_tokens) * self.num_layers,
                "per_kv_group_token_s": float(self.group_tokens), "per_kv_sliding_token_s": float(self.kv_sliding_tokens)}


@dataclass(frozen=True)
class CalibrationKey:
    """What a calibration serves: every model on this platform, engine build, backend and graph mode."""

    platform: str
    engine: str
    engine_version: str
    backend: str
    cuda_graphs: bool
    async_batching: bool = False

    def prefix(self, root: str = CALIBRATIONS_PREFIX) -> str:
        """The store folder of this key's generations under `root` (calibrations; the server-cost
        records of `dooly.sim.server_costs` use the same layout under their own root)."""
        from dooly.store.keys import escape_value

        values = (("platform", self.platform), ("engine", self.engine), ("engine_version", self.engine_version),
                  ("backend", self.backend), ("graphs", GRAPHS_ON if self.cuda_graphs else GRAPHS_OFF))
        what = "a calibration" if root == CALIBRATIONS_PREFIX else f"a {root.rstrip('/')} record"
        for name, value in values:
            if not value:
                raise DoolyError(f"{what} needs a {name}")
        async_part = ASYNC_SEGMENT + "/" if self.async_batching else ""
        return root + "".join(f"{name}={escape_value(value)}/" for name, value in values) + async_part

    def label(self) -> str:
        graphs = "graphs on" if self.cuda_graphs else "graphs off"
        batching = " / async batching" if self.async_batching else ""
        # A key of no particular version (the newest one a store holds) names the engine alone.
        engine = f"{self.engine} {self.engine_version}".strip()
        return f"{self.platform} / {engine} / {self.backend} / {graphs}{batching}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PathTerms:
    """One path's host terms (see the module docstring for the formula)."""

    constant_s: float = 0.0
    per_layer_s: float = 0.0
    per_sequence_s: float = 0.0
    per_token_s: float = 0.0
    per_kv_token_s: float = 0.0
    per_kv_token_layer_s: float = 0.0
    per_kv_group_token_s: float = 0.0
    per_kv_sliding_token_s: float = 0.0

    def for_layers(self, num_layers: int, groups: CacheGroups = ONE_FULL_GROUP) -> OverheadTerms:
        """The per-step terms of a model with `num_layers` layers and these cache groups (what the
        simulator adds). The simulator charges host time per KV token of the step, so a sliding
        group's entries count as the step's KV tokens: exact while no sequence reads more than the
        window, an overcharge of the sliding groups' part beyond it."""
        group_entries = groups.full + groups.sliding
        return OverheadTerms(
            constant_s=self.constant_s + self.per_layer_s * num_layers,
            per_sequence_s=self.per_sequence_s,
            per_token_s=self.per_token_s,
            per_kv_token_s=(self.per_kv_token_s + self.per_kv_token_layer_s * num_layers
                            + self.per_kv_group_token_s * group_entries + self.per_kv_sliding_token_s * groups.sliding),
        )

    def seconds(self, sample: HostSample) -> float:
        """Host seconds of a measured step, each sliding sequence capped at the window."""
        values = sample.regressors()
        return sum(getattr(self, name) * values[name] for name in TERM_NAMES)


@dataclass
class Calibration:
    """A platform's host-overhead calibration: terms per path, and what it was fitted on."""

    key: CalibrationKey
    terms: dict[str, PathTerms]
    graph_capture_s: float = 0.0
    graph_capture_per_layer_s: float = 0.0
    post_capture_device_s: float = 0.0  # async batching: extra device time of the step after a capture
    input_copy_s: float = 0.0  # async batching: a launch's host-to-device input copy ...
    input_copy_bytes: int = 0  # ... measured at this many bytes of inputs (0: not scaled)
    new_shape_eager_s: float = 0.0  # a capture's eager run at a never-run shape, from its launch
    inputs: list[dict[str, Any]] = field(default_factory=list)  # one per calibration run
    fit: dict[str, Any] = field(default_factory=dict)  # residual statistics per model
    created_at: str = ""
    generation: int = 0  # set when read from (or written to) a store

    def for_model(self, num_layers: int, model: str = "", groups: CacheGroups = ONE_FULL_GROUP) -> CpuOverheadModel:
        """The `CpuOverheadModel` the simulator adds for a model of `num_layers` layers and these
        cache layer groups (the scheduler settings' `CacheGroups.from_scheduler`)."""
        source = self.describe(model, num_layers)
        if model and self.fit.get("kv_regressors") == KV_GROUPS:
            source += f"; {groups.describe()}"
        return CpuOverheadModel(
            terms={key: value.for_layers(num_layers, groups) for key, value in self.terms.items()},
            engine=self.key.engine,
            platform=self.key.platform,
            source=source,
            graph_capture_s=self.graph_capture_s + self.graph_capture_per_layer_s * num_layers,
            post_capture_device_s=self.post_capture_device_s,
            input_copy_s=self.input_copy_s,
            input_copy_bytes=self.input_copy_bytes,
            new_shape_eager_s=self.new_shape_eager_s,
        )

    def describe(self, model: str = "", num_layers: int | None = None) -> str:
        models = sorted({str(run.get("model", "")) for run in self.inputs})
        target = f" for {model} ({num_layers} layers)" if model and num_layers is not None else ""
        generation = f" generation {self.generation}" if self.generation else ""
        return (f"store calibration{generation} {self.key.label()}{target}, fitted on {len(self.inputs)} run(s) "
                f"of {len(models)} model(s)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CALIBRATION_SCHEMA,
            "key": self.key.to_dict(),
            "terms": {key: asdict(value) for key, value in sorted(self.terms.items())},
            "graph_capture_s": self.graph_capture_s,
            "graph_capture_per_layer_s": self.graph_capture_per_layer_s,
            "post_capture_device_s": self.post_capture_device_s,
            "input_copy_s": self.input_copy_s,
            "input_copy_bytes": self.input_copy_bytes,
            "new_shape_eager_s": self.new_shape_eager_s,
            "inputs": self.inputs,
            "fit": self.fit,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Any, *, generation: int = 0) -> Calibration:
        if not isinstance(data, dict) or data.get("schema") != CALIBRATION_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DoolyError(f"calibration schema {found!r} is not supported (expected {CALIBRATION_SCHEMA})")
        try:
            raw_key = data["key"]
            key = CalibrationKey(platform=str(raw_key["platform"]), engine=str(raw_key["engine"]),
                                 engine_version=str(raw_key["engine_version"]), backend=str(raw_key["backend"]),
                                 cuda_graphs=bool(raw_key["cuda_graphs"]),
                                 async_batching=bool(raw_key.get("async_batching", False)))
            terms = {}
            for path, values in data["terms"].items():
                if path not in (*OVERHEAD_KEYS, DEFAULT_KEY):
                    raise DoolyError(f"calibration path {path!r} is not one of {sorted((*OVERHEAD_KEYS, DEFAULT_KEY))}")
                if set(values) - set(TERM_NAMES):
                    raise DoolyError(f"calibration terms of {path!r} must be among {list(TERM_NAMES)}")
                terms[path] = PathTerms(**{name: float(v) for name, v in values.items()})
            capture = float(data.get("graph_capture_s", 0.0))
            capture_layer = float(data.get("graph_capture_per_layer_s", 0.0))
            post_capture = float(data.get("post_capture_device_s", 0.0))
            copy = float(data.get("input_copy_s", 0.0))
            copy_bytes = float(data.get("input_copy_bytes", 0))
            new_shape = float(data.get("new_shape_eager_s", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DoolyError("a calibration document needs `key` (platform, engine, engine_version, backend, "
                             "cuda_graphs) and numeric `terms` per path") from None
        values = [capture, capture_layer, post_capture, copy, copy_bytes, new_shape,
                  *(v for t in terms.values() for v in asdict(t).values())]
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise DoolyError("calibration terms must be finite and >= 0")
        if not copy_bytes.is_integer():
            raise DoolyError("a calibration's `input_copy_bytes` must be a whole number of bytes")
        return cls(key=key, terms=terms, graph_capture_s=capture, graph_capture_per_layer_s=capture_layer,
                   post_capture_device_s=post_capture, input_copy_s=copy, input_copy_bytes=int(copy_bytes),
                   new_shape_eager_s=new_shape, inputs=list(data.get("inputs", [])), fit=dict(data.get("fit", {})),
                   created_at=str(data.get("created_at", "")), generation=generation)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


def fit_path_terms(samples: Sequence[HostSample], *, ridge: float = RIDGE, layer_terms: bool | None = None,
                   kv_regressors: str = DEFAULT_KV_REGRESSORS) -> dict[str, PathTerms]:
    """Terms per path from host samples of one or more models (non-negative, ridge-regularised).

    Every path with at least MIN_FIT_SAMPLES steps gets its own constant and per-layer term; the
    slopes are shared within a family (graph-replayed paths, eager paths); `default` (steps of a path the run never took) is the same
    fit with one constant for all steps. The per-layer terms are fitted only when the samples span
    more than one layer count (with one model they would be the constant again), and not when
    `layer_terms` is False. `kv_regressors` picks the KV slopes (KV_REGRESSORS)."""
    if kv_regressors not in KV_REGRESSORS:
        raise DoolyError(f"unknown KV regressors {kv_regressors!r}; choose {' or '.join(KV_REGRESSORS)}")
    if len(samples) < MIN_FIT_SAMPLES:
        raise DoolyError(f"fitting host overhead needs at least {MIN_FIT_SAMPLES} steps, got {len(samples)}")
    unknown = sorted({s.key for s in samples} - set(OVERHEAD_KEYS))
    if unknown:
        raise DoolyError(f"host samples have unknown path key(s) {', '.join(unknown)}")
    layered = len({s.num_layers for s in samples}) > 1 and layer_terms is not False
    counts = {key: sum(1 for s in samples if s.key == key) for key in OVERHEAD_KEYS}
    paths = [key for key in OVERHEAD_KEYS if counts[key] >= MIN_FIT_SAMPLES]
    shared_terms = BASE_SHARED_TERMS + KV_REGRESSORS[kv_regressors]
    terms = {DEFAULT_KEY: _solve(samples, [DEFAULT_KEY], lambda s: DEFAULT_KEY, layered, ridge, shared_terms)[DEFAULT_KEY]}
    if paths:
        kept = [s for s in samples if s.key in paths]
        terms.update(_solve(kept, paths, lambda s: s.key, layered, ridge, shared_terms))
    return terms


def _solve(samples: Sequence[HostSample], paths: list[str], path_of: Any, layered: bool, ridge: float,
           shared_terms: tuple[str, ...]) -> dict[str, PathTerms]:
    """One scaled, ridge-augmented NNLS: per-path constant (+ per-layer), shared slopes."""
    import numpy as np
    from scipy.optimize import nnls

    shared = [name for name in shared_terms if layered or name not in LAYER_TERMS]
    own = [name for name in PATH_TERMS if layered or name not in LAYER_TERMS]
    families = sorted({_family(path) for path in paths})
    columns = [(path, name) for path in paths for name in own] + [(family, name) for family in families for name in shared]
    design = np.zeros((len(samples), len(columns)))
    index = {column: i for i, column in enumerate(columns)}
    for row, s in enumerate(samples):
        path = path_of(s)
        values = s.regressors()
        for name in own:
            design[row, index[(path, name)]] = values[name]
        for name in shared:
            design[row, index[(_family(path), name)]] = values[name]
    target = np.array([s.host_s for s in samples])
    scale = np.maximum(np.abs(design).max(axis=0), 1e-12)
    scaled = design / scale
    # The ridge rows pull each scaled slope (not the constants) towards 0, with a weight
    # proportional to the data's own size so that it means the same for 20 steps or 20,000.
    penalised = [i for i, (_, name) in enumerate(columns) if name != "constant_s"]
    weight = math.sqrt(ridge * len(samples))
    augmented = np.zeros((len(penalised), len(columns)))
    for row, column in enumerate(penalised):
        augmented[row, column] = weight
    coef, _ = nnls(np.vstack([scaled, augmented]), np.concatenate([target, np.zeros(len(penalised))]))
    coef = coef / scale
    return {
        path: PathTerms(**{name: float(coef[index[(path, name)]]) for name in own},
                        **{name: float(coef[index[(_family(path), name)]]) for name in shared})
        for path in paths
    }


def _family(path: str) -> str:
    """Paths whose slopes are shared: the graph-replayed ones (the engine builds their inputs
    with one code path) and the eager ones (`default` counts as eager)."""
    return "graph" if path.endswith(GRAPH_SUFFIX) else "eager"


def fit_calibration(
    key: CalibrationKey,
    samples: Sequence[HostSample],
    captures: Sequence[tuple[HostSample, Any]] = (),
    *,
    inputs: Iterable[dict[str, Any]] = (),
    ridge: float = RIDGE,
    post_capture: Sequence[float] = (),
    kv_regressors: str = DEFAULT_KV_REGRESSORS,
    input_copies: Sequence[tuple[float, int]] = (),
    new_shapes: Sequence[tuple[int, float, float]] = (),
    capture_new: Sequence[bool] = (),
) -> Calibration:
    """A calibration from host samples of several models, and the first step of each CUDA-graph
    shape (sample, path): what it took beyond an ordinary step on its path is the capture cost,
    constant + per layer where the runs span several layer counts (a capture records every kernel).
    `post_capture` (async batching): the extra device time measured on each step launched right
    after a capture beyond its input copy; its median is kept. `input_copies` (async batching): each
    run's fitted input copy and the bytes its engine copies per launch (`pooled_input_copy`).
    `new_shapes` (async batching): each capture at an attention shape its engine never ran, as
    (layers, launch seconds less the eager run's device time, seconds until the device was free
    for the eager run), the capture cost for that layer count taken off the launch
    (`fit_new_shape_eager`). `capture_new` (synchronous loops): per capture, whether its attention
    shape was new to its engine (`CpuOverheadModel.new_attention_shape`); where the captures hold
    both kinds, the capture cost is fitted on the known-shape ones and `new_shape_eager_s` is the
    median extra of the new-shape ones over that line (`split_sync_captures`). `kv_regressors`: the
    KV slopes' form (KV_REGRESSORS; recorded in `fit`)."""
    import numpy as np

    layered, scores = choose_layer_terms(samples, ridge=ridge, kv_regressors=kv_regressors)
    terms = fit_path_terms(samples, ridge=ridge, layer_terms=layered, kv_regressors=kv_regressors)
    calibration = Calibration(key=key, terms=terms, inputs=list(inputs),
                              created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    excess = [(sample.num_layers, sample.host_s - _terms_for(terms, sample.key).seconds(sample)) for sample, _ in captures]
    split = split_sync_captures(excess, capture_new)
    if split is not None:
        calibration.graph_capture_s, calibration.graph_capture_per_layer_s, calibration.new_shape_eager_s = split
    elif excess:
        calibration.graph_capture_s, calibration.graph_capture_per_layer_s = capture_line(excess)
    if new_shapes:
        capture_s = [calibration.graph_capture_s + calibration.graph_capture_per_layer_s * layers
                     for layers, _, _ in new_shapes]
        calibration.new_shape_eager_s = fit_new_shape_eager(
            [(launch - capture, device) for (_, launch, device), capture in zip(new_shapes, capture_s, strict=True)])
    if post_capture:
        calibration.post_capture_device_s = max(float(np.median(post_capture)), 0.0)
    if input_copies:
        calibration.input_copy_s, calibration.input_copy_bytes = pooled_input_copy(input_copies)
    calibration.fit = {"kv_regressors": kv_regressors, "layer_terms": layered, "leave_one_model_out_host_error": scores,
                       "models": residual_stats(calibration, samples)}
    if split is not None:
        calibration.fit["captures"] = {"known_shape": sum(not new for new in capture_new),
                                       "new_shape": sum(bool(new) for new in capture_new)}
    return calibration


def capture_line(excess: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(constant, per layer) seconds of a capture from (layers, excess seconds) per capture: the
    median excess per layer count (a capture's host time has outliers), then a non-negative line
    through those medians where there are several layer counts."""
    import numpy as np
    from scipy.optimize import nnls

    by_layers: dict[int, list[float]] = {}
    for num_layers, seconds in excess:
        by_layers.setdefault(num_layers, []).append(seconds)
    layers = np.array(sorted(by_layers), dtype=float)
    medians = np.array([float(np.median(by_layers[int(n)])) for n in layers])
    if len(layers) > 1:
        coef, _ = nnls(np.column_stack([np.ones_like(layers), layers / layers.max()]), medians)
        return float(coef[0]), float(coef[1] / layers.max())
    return max(float(medians[0]), 0.0), 0.0


def split_sync_captures(excess: Sequence[tuple[int, float]], capture_new: Sequence[bool]
                        ) -> tuple[float, float, float] | None:
    """A synchronous loop's captures split by whether the engine had run their attention shape
    (lab/capture_cost.py): (constant, per layer, new-shape extra) seconds, the line fitted on the
    known-shape captures (`capture_line`) and the extra the median of the new-shape captures'
    excess over that line (at least 0). None where `capture_new` is not given for every capture or
    the captures are not of both kinds: one line over all of them then."""
    import numpy as np

    if len(capture_new) != len(excess) or all(capture_new) or not any(capture_new):
        return None
    constant, per_layer = capture_line([item for item, new in zip(excess, capture_new, strict=True) if not new])
    extra = [seconds - constant - per_layer * num_layers
             for (num_layers, seconds), new in zip(excess, capture_new, strict=True) if new]
    return constant, per_layer, max(float(np.median(extra)), 0.0)


# A capture's launch that ends within this of its eager run's device end was device-bound: the
# launch's own host work around the eager run (~1 ms on the committed runs) is not first-shape work.
HIDDEN_EAGER_TOLERANCE_S = 0.002


def fit_new_shape_eager(launches: Sequence[tuple[float, float]]) -> float:
    """The host time H from a capture's launch to the start of its eager run's kernels at an
    attention shape the engine never ran, from (seconds the launch held the host before the
    capture less the eager run's device time, seconds until the device was free for the eager
    run: the previous step and the input copy done) per such capture: the simulator starts the
    eager run at max(device free, H) and adds its device time, which the first-shape work does not
    hide (on the H200 grid a new-shape launch grows one for one with its eager run's device time,
    lab/async_captures_lease_d.py). A launch whose eager run started when the device was free
    (within HIDDEN_EAGER_TOLERANCE_S) only says H was no longer; so H is the value that minimises
    the absolute error of max(device free, H) over the others plus how far it passes those bounds
    (a median that takes bounds as bounds), the smallest such; 0 where nothing says it is more."""
    hidden = [device + HIDDEN_EAGER_TOLERANCE_S for launch, device in launches
              if launch <= device + HIDDEN_EAGER_TOLERANCE_S]
    exposed = [(launch, device) for launch, device in launches if launch > device + HIDDEN_EAGER_TOLERANCE_S]

    def error(host: float) -> float:
        return (sum(abs(launch - max(device, host)) for launch, device in exposed)
                + sum(max(host - bound, 0.0) for bound in hidden))

    return min(sorted({0.0, *(launch for launch, _ in exposed)}), key=error)


def pooled_input_copy(copies: Sequence[tuple[float, int]]) -> tuple[float, int]:
    """One input copy from each run's (seconds, bytes copied per launch): the median of the runs'
    copies scaled to the largest size among them (a copy at the host-to-device bandwidth lasts in
    proportion to its bytes), stored with that size. Where a run's size is unknown (0 bytes), the
    median unscaled, stored with 0 bytes (applied as it is). The committed H100 runs all copy one
    size (a 2048 x 264192 bfloat16 mask), so the scaling itself is not measured."""
    import numpy as np

    if not copies:
        raise DoolyError("pooling input copies needs at least one run's")
    if any(size <= 0 for _, size in copies):
        return max(float(np.median([seconds for seconds, _ in copies])), 0.0), 0
    reference = max(size for _, size in copies)
    return max(float(np.median([seconds * reference / size for seconds, size in copies])), 0.0), reference


def choose_layer_terms(samples: Sequence[HostSample], *, ridge: float = RIDGE,
                       kv_regressors: str = DEFAULT_KV_REGRESSORS) -> tuple[bool, dict[str, float]]:
    """Whether the per-layer terms earn their place: each model's host time predicted by a fit on
    the other models, with and without them (mean over models of |mean predicted - mean measured|
    / mean measured). On the committed H100 runs the host time per step differs between device
    leases by more than between models, and layer terms fitted on 4 models predicted the 5th worse
    than one pooled constant did; they are kept only when they predict an unseen model better by
    LAYER_TERMS_MARGIN. Needs MIN_MODELS_FOR_CHOICE layer counts; below that, no layer terms."""
    by_model: dict[int, list[HostSample]] = {}
    for s in samples:
        by_model.setdefault(s.num_layers, []).append(s)
    if len(by_model) < MIN_MODELS_FOR_CHOICE:
        return False, {}
    scores = {}
    for layered in (False, True):
        errors = []
        for layers, held_out in by_model.items():
            rest = [s for s in samples if s.num_layers != layers]
            try:
                terms = fit_path_terms(rest, ridge=ridge, layer_terms=layered, kv_regressors=kv_regressors)
            except DoolyError:
                continue
            predicted = sum(_terms_for(terms, s.key).seconds(s) for s in held_out) / len(held_out)
            measured = sum(s.host_s for s in held_out) / len(held_out)
            errors.append(abs(predicted - measured) / measured if measured > 0 else 0.0)
        scores["with_layer_terms" if layered else "pooled"] = round(sum(errors) / len(errors), 4) if errors else math.inf
    chosen = scores["with_layer_terms"] < (1 - LAYER_TERMS_MARGIN) * scores["pooled"]
    return chosen, scores


def _terms_for(terms: dict[str, PathTerms], key: str) -> PathTerms:
    base = key[: -len(GRAPH_SUFFIX)] if key.endswith(GRAPH_SUFFIX) else key
    return terms.get(key) or terms.get(base) or terms[DEFAULT_KEY]


def residual_stats(calibration: Calibration, samples: Sequence[HostSample]) -> dict[str, Any]:
    """Per model: steps, mean measured host ms and mean fitted-minus-measured ms (the bias a
    shared calibration leaves for that model)."""
    by_model: dict[str, list[HostSample]] = {}
    for s in samples:
        by_model.setdefault(s.model, []).append(s)
    out: dict[str, Any] = {}
    for model, part in sorted(by_model.items()):
        fitted = [_terms_for(calibration.terms, s.key).seconds(s) for s in part]
        measured = [s.host_s for s in part]
        out[model or "?"] = {
            "steps": len(part),
            "mean_host_ms": round(1e3 * sum(measured) / len(part), 4),
            "mean_error_ms": round(1e3 * sum(f - m for f, m in zip(fitted, measured, strict=True)) / len(part), 4),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------

_GENERATION_RE = re.compile(rf"^{GENERATION_PREFIX}(\d{{{GENERATION_DIGITS}}}){re.escape(GENERATION_SUFFIX)}$")


def _generations(store: Any, prefix: str) -> list[int]:
    found = []
    for key in store.list_keys(prefix):
        match = _GENERATION_RE.match(key[len(prefix):])
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def generation_key(key: CalibrationKey, generation: int, root: str = CALIBRATIONS_PREFIX) -> str:
    return f"{key.prefix(root)}{GENERATION_PREFIX}{generation:0{GENERATION_DIGITS}d}{GENERATION_SUFFIX}"


def write_generation(store: Any, key: CalibrationKey, document: dict[str, Any], root: str = CALIBRATIONS_PREFIX,
                     what: str = "calibration") -> tuple[str, int]:
    """Write `document` as the next generation of `key` under `root` (atomic create; a racing
    writer that takes the same generation makes this one try the next). Returns the object key
    and the generation."""
    payload = json.dumps(document, indent=2, sort_keys=True).encode()
    for _ in range(MAX_CREATE_ATTEMPTS):
        generations = _generations(store, key.prefix(root))
        generation = (generations[-1] if generations else 0) + 1
        object_key = generation_key(key, generation, root)
        if store.put_if_absent(object_key, payload):
            return object_key, generation
    raise DoolyError(f"store {store.uri}: could not claim a {what} generation under {key.prefix(root)} "
                     f"after {MAX_CREATE_ATTEMPTS} attempts (other writers racing)")


def read_newest_generation(store: Any, key: CalibrationKey, root: str = CALIBRATIONS_PREFIX
                           ) -> tuple[dict[str, Any], str, int] | None:
    """The newest generation of `key` under `root`: its document, object key and generation, or
    None when the store holds none."""
    generations = _generations(store, key.prefix(root))
    if not generations:
        return None
    object_key = generation_key(key, generations[-1], root)
    try:
        data = json.loads(store.get_bytes(object_key))
    except ValueError:
        raise DoolyError(f"store {store.uri}: {object_key} is not valid JSON") from None
    if not isinstance(data, dict):
        raise DoolyError(f"store {store.uri}: {object_key} is not a JSON object")
    return data, object_key, generations[-1]


def write_calibration(store: Any, calibration: Calibration) -> str:
    """Write the next generation of `calibration.key` (`write_generation`). Returns the object key."""
    object_key, calibration.generation = write_generation(store, calibration.key, calibration.to_dict())
    return object_key


def list_generation_keys(store: Any, root: str = CALIBRATIONS_PREFIX) -> list[CalibrationKey]:
    """Every key the store holds a generation of under `root` (calibrations by default)."""
    from dooly.store.keys import unescape_value

    keys = set()
    for object_key in store.list_keys(root):
        parts = object_key[len(root):].split("/")
        async_batching = len(parts) == 7 and parts[5] == ASYNC_SEGMENT
        if async_batching:
            del parts[5]
        if len(parts) != 6 or not _GENERATION_RE.match(parts[5]):
            continue
        values = {}
        for part in parts[:5]:
            name, _, value = part.partition("=")
            values[name] = unescape_value(value)
        if set(values) != {"platform", "engine", "engine_version", "backend", "graphs"}:
            continue
        keys.add(CalibrationKey(values["platform"], values["engine"], values["engine_version"], values["backend"],
                                values["graphs"] == GRAPHS_ON, async_batching))
    return sorted(keys, key=lambda k: (k.platform, k.engine, k.backend, k.cuda_graphs, k.async_batching, k.engine_version))


def list_calibrations(store: Any) -> list[CalibrationKey]:
    """Every calibration key the store holds (any generation)."""
    return list_generation_keys(store, CALIBRATIONS_PREFIX)


def read_calibration(store: Any, key: CalibrationKey) -> Calibration | None:
    """The newest generation of `key`, or None when the store holds none."""
    found = read_newest_generation(store, key)
    if found is None:
        return None
    data, _, generation = found
    return Calibration.from_dict(data, generation=generation)


def newest_version_key(store: Any, root: str, *, platform: str, engine: str, backend: str, cuda_graphs: bool,
                       engine_version: str | None = None, async_batching: bool = False) -> CalibrationKey | None:
    """The key under `root` for this platform, engine, backend, graph mode and loop: of
    `engine_version` when given, else of the newest engine version the store holds one for (None:
    none). A synchronous key never serves async batching, nor the reverse."""
    if engine_version:
        return CalibrationKey(platform, engine, engine_version, backend, cuda_graphs, async_batching)
    wanted = (platform, engine, backend, cuda_graphs, async_batching)
    candidates = [k for k in list_generation_keys(store, root)
                  if (k.platform, k.engine, k.backend, k.cuda_graphs, k.async_batching) == wanted]
    if not candidates:
        return None
    return max(candidates, key=lambda k: _version_rank(k.engine_version))


def find_calibration(store: Any, *, platform: str, engine: str, backend: str, cuda_graphs: bool,
                     engine_version: str | None = None, async_batching: bool = False) -> Calibration | None:
    """The store's calibration for this platform, engine, backend, graph mode and loop (async
    batching or not): of `engine_version` when given, else of the newest engine version the store
    has one for. A synchronous calibration never serves async batching, nor the reverse."""
    key = newest_version_key(store, CALIBRATIONS_PREFIX, platform=platform, engine=engine, backend=backend,
                             cuda_graphs=cuda_graphs, engine_version=engine_version, async_batching=async_batching)
    return None if key is None else read_calibration(store, key)


def missing_calibration(*, platform: str, engine: str, backend: str, cuda_graphs: bool, async_batching: bool,
                        file_flag: str) -> str:
    """Why a simulation has no host overhead, and what the user can do (FILE_FLAG: the command's
    option for a calibration file). A backend the engine does not serve has no run to calibrate
    from, so `dooly calibrate` is not offered for it."""
    from dooly.engines.registry import served_by

    path = (f"{platform} / {engine} / {backend} / graphs {'on' if cuda_graphs else 'off'}"
            f"{' / async batching' if async_batching else ''}")
    if not served_by(engine, backend):
        return (f"no host-overhead calibration in the store for {path}: {engine} does not serve {backend} "
                f"(profiled only), so no engine run can calibrate it; pass {file_flag} FILE (another backend's "
                "calibration) or --no-cpu-overhead to simulate it anyway")
    return (f"no host-overhead calibration in the store for {path}: run `dooly calibrate`, pass {file_flag} FILE, "
            "or --no-cpu-overhead to leave the host out")


def _version_rank(text: str) -> tuple[int, Any]:
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(text))
    except InvalidVersion:
        return (0, text)


def scheduler_uses_graphs(scheduler: Any) -> bool:
    """Whether the engine settings replay any step as a CUDA graph (the calibration's graph key)."""
    config = getattr(scheduler, "config", None)
    booleans = getattr(config, "cuda_graph_booleans", None)
    if booleans is not None:
        return any(booleans)
    mode = getattr(config, "cudagraph_mode", None)
    if mode is not None:
        return str(mode) != "none"
    return False


def scheduler_uses_async(scheduler: Any) -> bool:
    """Whether the engine settings run the asynchronous loop the simulator models (transformers
    async batching): the calibration's async key."""
    return bool(getattr(scheduler, "async_scheduling", False) and getattr(scheduler, "async_handoff_after_launch", False))


def term_names() -> tuple[str, ...]:
    """The term names of a calibration path, in the order the docs list them."""
    return tuple(f.name for f in fields(PathTerms))
