"""Predict operation and engine-step latencies from fitted models; the simulator's hot path.

`Predictor.predict_ops` answers arbitrary batches of operations (vectorised per signature).
`StepPredictor` is built once per (model inventory, predictor) and answers "how long does this
engine step take" for a batch composition, in a few microseconds:
- every non-attention operation with one request variable (nearly all of them: projections,
  norms, activations depend on T only) is folded, count-weighted, into one table per variable,
  exact for values below DENSE_LIMIT and log-interpolated above, so a step costs one lookup per
  variable however many operations the model has;
- attention and multi-variable operations with linear models collapse into one coefficient vector
  over request terms per sliding window and batch regime (see features.py);
- per-signature attention models that multiply linear work by a tree correction keep their
  coefficients and their correction tables (regressors.PairTables): a few binary searches and
  lookups per step, exactly what the model predicts;
- non-linear ones (tree-corrected class models of unseen attention ops) are replaced by linear
  surrogates fitted to them on the class's measured batches, or, with `exact=True`, evaluated
  per call (tens of microseconds).
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from dooly.errors import DoolyError
from dooly.fit.extent import LONGEST_KV, checked_variables
from dooly.fit.features import (
    FAMILY_ATTENTION,
    FAMILY_MATMUL,
    KV_ALIGNMENT,
    MATMUL_OPS,
    N_REGIMES,
    N_TERMS,
    QUERY_TILE,
    REGIME_DECODE,
    REGIME_MIXED,
    REGIME_PREFILL,
    REQUEST_VARS,
    SLIDING_WINDOW,
    TERM_INDEX,
    WAVE_ROUNDING,
    aggregates_from_seqs,
    check_request_vars,
    decode_sums_aggregates,
    group_max,
    local_terms,
    regime_of,
    regime_scalar,
    seqs_aggregates,
    sm_count,
    static_features,
    term_matrix,
    uniform_aggregates,
)
from dooly.fit.group import GroupModel, bind_class_model, heads_affine_model, layout_scaled_model
from dooly.fit.regressors import (
    MIN_SECONDS,
    HeadsAffineModel,
    InterpModel,
    OpModel,
    PairTables,
    RegimeLinearModel,
    fit_regime_linear,
)
from dooly.fit.training import SignatureInfo

# Tables: exact per integer value below DENSE_LIMIT, then PER_OCTAVE log-spaced points per
# doubling up to LOG_TABLE_MAX (K, the KV tokens of a step, reaches millions).
DENSE_LIMIT = 1 << 14
PER_OCTAVE = 64
LOG_TABLE_MAX = float(1 << 36)
LOG2_DENSE = math.log2(DENSE_LIMIT)
LOG_GRID = DENSE_LIMIT * np.exp2(
    np.arange(int((math.log2(LOG_TABLE_MAX) - LOG2_DENSE) * PER_OCTAVE) + 1) / PER_OCTAVE
)
LOG2_GRID = np.log2(LOG_GRID)
TABLE_GRID = np.concatenate([np.arange(DENSE_LIMIT, dtype=np.float64), LOG_GRID])
# A surrogate needs a few more points than its (at most ten) terms.
MIN_SURROGATE_POINTS = 12
PERCENT = 100.0
# predict_ops tabulates a one-variable model (then a row costs one gather) from this many rows on.
TABLE_MIN_ROWS = 4096
# (sliding window, query tiles per kernel wave): what an operation's request terms depend on
# beyond the batch itself.
Geometry = tuple[int, float]
# Where an operation's prediction comes from (coverage): its own measurements, the regressor of
# its op class over config dims (signature never measured), or the family fallback (op class never
# measured on this platform/engine/backend/dtype, dooly.fit.fallback).
SOURCE_MEASURED = "measured"
SOURCE_CLASS = "class-regressor"
SOURCE_FALLBACK = "fallback"
SOURCES = (SOURCE_MEASURED, SOURCE_CLASS, SOURCE_FALLBACK)
# How a StepPredictor groups its totals: by op class (breakdowns) or for coverage (each estimated op
# in a group of its own, named by its signature; so is each measured op whose measured extent the
# fit recorded, to tell which of its time lies beyond that extent; the other measured ops together).
LABEL_CLASS = "class"
LABEL_COVERAGE = "coverage"
# A step's phase (coverage is reported per phase): only prefill chunks, only decodes, or both.
PHASE_PREFILL = "prefill"
PHASE_DECODE = "decode"
PHASE_MIXED = "mixed"
# The request variables (indices into REQUEST_VARS: T, B, D) that are the batch size at every
# step of a decode window.
_DECODE_CONSTANT_VARS = frozenset(REQUEST_VARS.index(var) for var in ("T", "B", "D"))
# Many steps as flat per-sequence arrays (query length, context, step index) and the step count.
FlatSteps = tuple[np.ndarray, np.ndarray, np.ndarray, int]
# Steps' request variables and attention aggregates per geometry (`seqs_aggregates`).
Aggregates = dict[Geometry, dict[str, np.ndarray]]
# One variable of one measured op checked against its measured extent: the op's class index in
# the coverage view, the variable, the geometry its value is read at, its limit by batch regime.
ExtentCheck = tuple[int, str, Geometry, np.ndarray]


@dataclass(frozen=True)
class DecodeRuns:
    """Decode-only steps in runs (a simulation's decode windows): run r's step i decodes every
    context of `contexts[r]` plus i, for `steps[r]` steps. Its steps' coverage follows from their
    sums (`sums`) where the model has no sliding window, else from flat rows (`flat`)."""

    contexts: list[list[int]]
    steps: list[int]

    def flat(self) -> FlatSteps:
        """The steps as `flatten_steps` gives them."""
        chunks = [
            (np.asarray(ctx, dtype=np.int64)[None, :] + np.arange(steps, dtype=np.int64)[:, None]).ravel()
            for ctx, steps in zip(self.contexts, self.steps, strict=True)
        ]
        per_step = np.repeat(np.fromiter(map(len, self.contexts), dtype=np.int64, count=len(self.contexts)), self.steps)
        ctx = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        return np.ones(len(ctx), dtype=np.int64), ctx, np.repeat(np.arange(len(per_step)), per_step), len(per_step)

    def sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per step: decodes, KV tokens (contexts plus one each), longest KV, decodes with a
        context (a context of 0 is one only from the run's second step on)."""
        runs = len(self.contexts)
        steps = np.asarray(self.steps, dtype=np.int64)
        seqs = np.fromiter(map(len, self.contexts), dtype=np.int64, count=runs)
        first_kv = np.fromiter(map(sum, self.contexts), dtype=np.int64, count=runs) + seqs
        first_longest = np.fromiter(map(max, self.contexts), dtype=np.int64, count=runs) + 1
        empty = np.fromiter((ctx.count(0) for ctx in self.contexts), dtype=np.int64, count=runs)
        offset = np.arange(int(steps.sum()), dtype=np.int64) - np.repeat(np.cumsum(steps) - steps, steps)
        n = np.repeat(seqs, steps)
        kv = np.repeat(first_kv, steps) + n * offset
        longest = np.repeat(first_longest, steps) + offset
        reading = n - np.where(offset == 0, np.repeat(empty, steps), 0)
        return n, kv, longest, reading

logger = logging.getLogger(__name__)


def tabulate(model: OpModel) -> tuple[np.ndarray, np.ndarray]:
    """A one-variable model's seconds at 0..DENSE_LIMIT-1 and on LOG_GRID (0 where the variable is 0:
    an operation whose only request variable is 0 does not run)."""
    if isinstance(model, InterpModel):
        values = model.predict_values(TABLE_GRID)
    else:
        var = model.single_var
        if var is None:
            raise ValueError(f"{model.signature}: only a one-variable model can be tabulated")
        values = model.predict_terms(term_matrix({var: TABLE_GRID}, len(TABLE_GRID)))
    values[0] = 0.0
    return values[:DENSE_LIMIT], values[DENSE_LIMIT:]


def lookup_many(dense: np.ndarray, logs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Table values at integer points x (exact below DENSE_LIMIT, log-interpolated above)."""
    out = dense[np.clip(x, 0, DENSE_LIMIT - 1).astype(np.int64)]
    big = x >= DENSE_LIMIT
    if big.any():
        out[big] = np.interp(np.log2(x[big]), LOG2_GRID, logs)
    out[x <= 0] = 0.0
    return out


class Predictor:
    """Fitted models of one platform/engine/backend/dtype (see `dooly.fit.persist.load_predictor`)."""

    def __init__(
        self,
        group: GroupModel,
        meta: Mapping[str, Any] | None = None,
        inventories: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.group = group
        self.meta = dict(meta or {})
        self._tables: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        # Where the measured signatures' config dims come from when an op class was never measured
        # (the store's inventories, read only then); see dooly.fit.fallback.
        self.inventories = inventories
        self._fallback: Any = None

    def fallback(self) -> Any:
        """The family fallback of this group (dooly.fit.fallback), fitted on first use."""
        if self._fallback is None:
            from dooly.fit.fallback import fit_fallback, samples_from_inventories

            inventories = list(self.inventories()) if self.inventories is not None else []
            self._fallback = fit_fallback(
                self.group.signatures, samples_from_inventories(self.group.signatures, inventories)
            )
        return self._fallback

    def table(self, model: OpModel) -> tuple[np.ndarray, np.ndarray]:
        """The (cached) tabulation of a one-variable operation model, see `tabulate`."""
        key = (model.signature, model.single_var or "")
        found = self._tables.get(key)
        if found is None:
            found = self._tables[key] = tabulate(model)
        return found

    @property
    def generation(self) -> int:
        return self.group.generation

    def describe(self) -> str:
        g = self.group
        return f"{g.platform}/{g.engine}/{g.backend}/{g.dtype}"

    def is_seen(self, signatures: Sequence[str] | np.ndarray) -> np.ndarray:
        """True where the signature has measurements in the fitted snapshot."""
        known = self.group.signatures
        return np.fromiter((s in known for s in signatures), dtype=bool, count=len(signatures))

    def op_model(
        self,
        signature: str,
        op_class: str,
        config_dims: Mapping[str, int] | None,
        request_vars: Sequence[str] | None = None,
        op: str = "",
    ) -> tuple[OpModel, bool]:
        """The model for one operation and whether its signature is unseen (class model used)."""
        model, source = self.op_source(signature, op_class, config_dims, request_vars, op)
        return model, source != SOURCE_MEASURED

    def op_source(
        self,
        signature: str,
        op_class: str,
        config_dims: Mapping[str, int] | None,
        request_vars: Sequence[str] | None = None,
        op: str = "",
    ) -> tuple[OpModel, str]:
        """The model for one operation and where it comes from (one of SOURCES)."""
        seen = self.group.signatures.get(signature)
        if seen is not None:
            return seen, SOURCE_MEASURED
        class_model = self.group.classes.get(op_class)
        if class_model is None:
            return self._fallback_model(signature, op_class, config_dims, request_vars, op), SOURCE_FALLBACK
        variables = tuple(request_vars) if request_vars is not None else class_model.request_vars
        check_request_vars(variables, f"operation {signature}")
        op_name = op or op_class
        if class_model.family == FAMILY_MATMUL and op_name not in MATMUL_OPS:
            op_name = op_class
        config = {str(k): int(v) for k, v in (config_dims or {}).items() if v is not None}
        info = SignatureInfo(
            signature=signature,
            op=op_name,
            op_class=op_class,
            family=class_model.family,
            config_dims=config,
            request_vars=variables,
            static=static_features(class_model.family, op_name, config, variables, sm_count(self.group.platform)),
        )
        peers = heads_affine_model(class_model, info, self.group.signatures) or layout_scaled_model(
            class_model, info, self.group.signatures
        )
        return (peers if peers is not None else bind_class_model(class_model, info)), SOURCE_CLASS

    def _fallback_model(
        self,
        signature: str,
        op_class: str,
        config_dims: Mapping[str, int] | None,
        request_vars: Sequence[str] | None,
        op: str,
    ) -> OpModel:
        """An op class never measured here: the family fallback over its bytes / FLOPs."""
        from dooly.fit.fallback import is_attention

        if is_attention(op_class, op):
            raise DoolyError(
                f"attention class {op_class!r} has no fitted model for {self.describe()}: profile a model "
                f"with this backend, then merge and fit again"
            )
        variables = tuple(request_vars or ())
        check_request_vars(variables, f"operation {signature}")
        config = {str(k): int(v) for k, v in (config_dims or {}).items() if v is not None}
        model = self.fallback().model(signature, op, op_class, config, variables)
        if model is None:
            raise DoolyError(
                f"operation class {op_class!r} was never measured on {self.describe()} and no measured op of "
                f"its family is known to estimate it from: profile a model that uses it, then merge and fit again"
            )
        logger.debug("%s (%s): class never measured here, estimated by the family fallback", op_class, signature)
        return model

    def predict_ops(
        self,
        signatures: Sequence[str] | np.ndarray,
        op_classes: Sequence[str] | np.ndarray,
        config_dims: Sequence[Mapping[str, int]],
        request: Mapping[str, Any],
        *,
        request_vars: Sequence[Sequence[str]] | None = None,
        ops: Sequence[str] | None = None,
        return_unseen: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Seconds for each operation i at request point i (vectorised per distinct signature).

        `request` maps request variables (T, B, K, D, S) to arrays of length n. Attention
        operations also read `seqs` (a list of [[q, ctx], ...] per row) for exact per-sequence
        features, or `attn_pairs`/`padded` arrays, else a uniform-sequence approximation.
        With `return_unseen`, also a bool array: True where the signature was never profiled.
        """
        sigs = signatures.tolist() if isinstance(signatures, np.ndarray) else list(signatures)
        n = len(sigs)
        index = {s: i for i, s in enumerate(dict.fromkeys(sigs))}
        codes = np.fromiter(map(index.__getitem__, sigs), dtype=np.int64, count=n)
        _, first = np.unique(codes, return_index=True)
        numeric = {k: np.asarray(v, dtype=np.float64) for k, v in request.items() if k != "seqs"}
        seqs = request.get("seqs")
        out = np.empty(n)
        unseen = np.zeros(n, dtype=bool)
        if len(index) == 1:
            groups = [np.arange(n)]
        else:
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(len(index) + 1))
            groups = [order[bounds[c] : bounds[c + 1]] for c in range(len(index))]
        for code, rows in enumerate(groups):
            i = int(first[code])
            model, is_unseen = self.op_model(
                sigs[i],
                str(op_classes[i]),
                config_dims[i],
                request_vars[i] if request_vars is not None else None,
                ops[i] if ops is not None else "",
            )
            unseen[rows] = is_unseen
            for var in model.request_vars:
                if var not in numeric and not (var == "S" and "K" in numeric) and seqs is None:
                    raise DoolyError(f"request lacks variable {var!r} needed by {model.op_class} ({sigs[i]})")
            single = model.single_var
            if single is not None and single in numeric:
                x = numeric[single][rows]
                cached = (model.signature, single) in self._tables
                if (cached or len(rows) >= TABLE_MIN_ROWS) and np.array_equal(x, np.floor(x)):
                    out[rows] = lookup_many(*self.table(model), x)
                    continue
                if isinstance(model, InterpModel):
                    out[rows] = model.predict_values(x)
                    continue
            out[rows] = model.predict_terms(_row_terms(model, numeric, seqs, rows))
        return (out, unseen) if return_unseen else out

    def step_predictor(
        self, inventory: Mapping[str, Any], *, exact: bool = False, label_by: str = LABEL_CLASS
    ) -> StepPredictor:
        """Precompute a model inventory's per-op structure for fast step predictions.

        Non-linear class models of attention and multi-variable ops (tree-corrected, for unseen
        signatures) are replaced by linear surrogates fitted to them on the class's measured
        request points (see `StepPredictor.surrogate_error_pct`); `exact` keeps them, at tens of
        microseconds per step instead of a few.
        """
        return StepPredictor(self, inventory, exact=exact, label_by=label_by)


def _row_terms(model: OpModel, numeric: Mapping[str, np.ndarray], seqs: Any, rows: np.ndarray) -> np.ndarray:
    sub = {k: v[rows] for k, v in numeric.items()}
    if model.family == FAMILY_ATTENTION:
        if seqs is not None:
            sub.update(aggregates_from_seqs([seqs[i] for i in rows], model.window, model.wave_tiles))
        elif "attn_pairs" not in sub:
            sub.update(uniform_aggregates(sub, np.full(len(rows), model.window), model.wave_tiles))
    elif "S" not in sub and "K" in sub:
        sub["S"] = sub["K"]
    return term_matrix(sub, len(rows))


class StepPredictor:
    """Engine-step latency of one model on one platform/engine/backend/dtype (see module doc)."""

    def __init__(
        self, predictor: Predictor, inventory: Mapping[str, Any], *, exact: bool = False, label_by: str = LABEL_CLASS
    ) -> None:
        operations = inventory.get("operations")
        if not isinstance(operations, list) or not operations:
            raise DoolyError(f"inventory of {inventory.get('model_id', '?')} lists no operations")
        self.model_id = str(inventory.get("model_id", ""))
        self.describe = predictor.describe()
        self.generation = predictor.generation
        self._predictor = predictor
        self._inventory = inventory
        self._exact = exact
        self._label_by = label_by
        self._coverage_view: StepPredictor | None = None
        # Measured extents by signature (dooly.fit.extent): the coverage view checks steps against them.
        self._extents = predictor.group.extents if label_by == LABEL_COVERAGE else {}
        entries: list[tuple[OpModel, int, str]] = []
        for entry in operations:
            try:
                model, source = predictor.op_source(
                    entry["signature"],
                    entry["op_class"],
                    entry.get("config_dims", {}),
                    entry.get("request_vars"),
                    entry.get("op", ""),
                )
            except KeyError as exc:
                raise DoolyError(f"inventory of {self.model_id}: an operation lacks {exc}") from exc
            entries.append((model, int(entry.get("count", 1)), source))
        self.sources = {m.signature: src for m, _, src in entries}
        self.unseen = {sig: src != SOURCE_MEASURED for sig, src in self.sources.items()}
        self.classes = sorted({self._label(m, src) for m, _, src in entries})
        windows = [m.window for m, _, _ in entries if m.family == FAMILY_ATTENTION and m.window > 0]
        configured = int(inventory.get(SLIDING_WINDOW, 0) or 0)
        self.model_window = configured or (max(windows) if windows else 0)
        self.surrogate_error_pct: dict[str, float] = {}
        if not exact:
            entries = [(self._surrogate(m), c, u) for m, c, u in entries]
        self.entries = entries
        self._build(entries, predictor)
        self._extent_checks = self._build_extent_checks(entries)

    def _surrogate(self, model: OpModel) -> OpModel:
        """A linear stand-in for a non-linear multi-variable model (see Predictor.step_predictor),
        fitted on the class's reference points; its MAPE against the model is recorded."""
        if model.single_var is not None or model.regime_terms() is not None:
            return model
        class_model = getattr(model, "model", None)
        if class_model is None:
            return model
        if model.family == FAMILY_ATTENTION:
            if not class_model.reference_seqs:
                return model
            agg = aggregates_from_seqs(class_model.reference_seqs, model.window, model.wave_tiles)
            terms = term_matrix(agg, len(class_model.reference_seqs))
        else:
            terms = class_model.reference_terms
        if len(terms) < MIN_SURROGATE_POINTS:
            return model
        target = model.predict_terms(terms)
        surrogate = RegimeLinearModel(
            signature=model.signature,
            op=model.op,
            op_class=model.op_class,
            family=model.family,
            request_vars=model.request_vars,
            window=model.window,
            wave_tiles=model.wave_tiles,
            method=f"surrogate({model.method})",
            regime_coef=fit_regime_linear(terms, target, local_terms(model.family, model.request_vars)),
        )
        error = np.abs(surrogate.predict_terms(terms) / target - 1.0)
        self.surrogate_error_pct[model.signature] = float(np.mean(error) * PERCENT)
        return surrogate

    @property
    def op_count(self) -> int:
        return len(self.entries)

    @property
    def unseen_count(self) -> int:
        return sum(1 for _, _, src in self.entries if src != SOURCE_MEASURED)

    def _label(self, model: OpModel, source: str) -> str:
        """The group an operation's time is summed into (see LABEL_CLASS, LABEL_COVERAGE)."""
        if self._label_by == LABEL_COVERAGE:
            if source == SOURCE_MEASURED and model.signature not in self._extents:
                return SOURCE_MEASURED
            return model.signature
        return model.op_class

    # -- coverage ----------------------------------------------------------------------------

    def _coverage_steps(self) -> StepPredictor:
        """The same model with its totals grouped for coverage (built on first use)."""
        if self._label_by == LABEL_COVERAGE:
            return self
        if self._coverage_view is None:
            self._coverage_view = StepPredictor(
                self._predictor, self._inventory, exact=self._exact, label_by=LABEL_COVERAGE
            )
        return self._coverage_view

    def coverage(self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int]) -> Coverage:
        """Of one step's predicted device time, how much comes from measured signatures, class
        regressors and the family fallback, with every estimated op's share."""
        return self.coverage_many([(prefill, decode_ctx)])

    def coverage_many(self, steps: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int]]]) -> Coverage:
        """Coverage summed over many steps (each (prefill chunks, decode contexts))."""
        view = self._coverage_steps()
        if not steps:
            return view._coverage_of(np.zeros(len(view.classes)))
        return view._phase_coverage((*flatten_steps(steps), len(steps)))

    def coverage_by_phase(
        self, steps: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int]]]
    ) -> dict[str, Coverage]:
        """`coverage_many` for each phase (prefill, decode, mixed) the steps hold."""
        return self.coverage_of_phases(phase_arrays(steps))

    def coverage_of_phases(self, phases: Mapping[str, FlatSteps | DecodeRuns]) -> dict[str, Coverage]:
        """`coverage_by_phase` of steps already flattened per phase (`phase_arrays`), or of decode
        steps in runs (a simulation's `SimResult.batch_phases` builds them without a list per step)."""
        view = self._coverage_steps()
        return {phase: view._phase_coverage(steps) for phase, steps in phases.items()}

    def _phase_coverage(self, steps: FlatSteps | DecodeRuns) -> Coverage:
        """The coverage of one phase's steps: shares by source, and what lies beyond the extents."""
        seconds, aggregates, longest = self._phase_parts(steps)
        coverage = self._coverage_of(seconds.sum(axis=0))
        if self._extent_checks:
            self._add_extrapolated(coverage, seconds, aggregates, longest)
        return coverage

    def _phase_parts(self, steps: FlatSteps | DecodeRuns) -> tuple[np.ndarray, Aggregates, np.ndarray]:
        """(n_steps, n_classes) seconds of one phase's steps, their aggregates per geometry and
        each step's longest KV (a sequence's context plus its new tokens)."""
        if isinstance(steps, DecodeRuns) and not self._windowed_terms:
            n, kv, longest, reading = steps.sums()
            aggregates = {
                (window, tiles): decode_sums_aggregates(n, kv, longest, reading, tiles)
                for window, tiles in {(self.model_window, 0.0), *self._geometries}
            }
            return self._class_seconds_of(aggregates, len(n), True), aggregates, longest
        q, ctx, step, n_steps = steps.flat() if isinstance(steps, DecodeRuns) else steps
        aggregates = self._flat_aggregates(q, ctx, step, n_steps)
        longest = group_max(q + ctx, step, n_steps) if self._extent_checks else np.zeros(n_steps)
        return self._class_seconds_of(aggregates, n_steps, True), aggregates, longest

    def _add_extrapolated(
        self, coverage: Coverage, seconds: np.ndarray, aggregates: Aggregates, longest: np.ndarray
    ) -> None:
        """Fill in `coverage.extrapolated`: per measured op, its device time in the steps where a
        variable it is checked on exceeds the largest the op was measured at (in the step's
        regime), named by the variable exceeded furthest (needed / measured)."""
        base = aggregates[(self.model_window, 0.0)]
        regime = np.where(
            base["D"] <= 0, REGIME_PREFILL, np.where(base["D"] >= base["B"], REGIME_DECODE, REGIME_MIXED)
        )
        beyond = np.zeros(seconds.shape, dtype=bool)
        worst: dict[int, tuple[float, str, int, int]] = {}
        # Checks of the same variable against the same limits give the same answer (every T-only
        # op measured on the same ladder): each is worked out once.
        answers: dict[tuple[str, Geometry, bytes], tuple[np.ndarray, int, int] | None] = {}
        for ci, var, geometry, limits in self._extent_checks:
            key = (var, geometry, limits.tobytes())
            if key not in answers:
                values = longest if var == LONGEST_KV else aggregates.get(geometry, base)[var]
                limit = limits[regime]
                over = values > limit
                if over.any():
                    at = int(np.argmax(np.where(over, values, -np.inf)))
                    answers[key] = (over, int(round(float(values[at]))), int(round(float(limit[at]))))
                else:
                    answers[key] = None
            answer = answers[key]
            if answer is None:
                continue
            over, needed, measured = answer
            beyond[:, ci] |= over
            ratio = needed / measured if measured > 0 else math.inf
            if ci not in worst or ratio > worst[ci][0]:
                worst[ci] = (ratio, var, measured, needed)
        if not worst:
            return
        extrapolated_seconds = np.where(beyond, seconds, 0.0).sum(axis=0)
        operations = {m.signature: m for m, _, _ in self.entries}
        found = []
        for ci, (_, var, measured, needed) in worst.items():
            model = operations[self.classes[ci]]
            found.append(ExtrapolatedOp(signature=model.signature, op=model.op, op_class=model.op_class, variable=var,
                                        measured_max=measured, needed_max=needed,
                                        seconds=float(extrapolated_seconds[ci])))
        found.sort(key=lambda e: (-e.seconds, e.signature))
        coverage.extrapolated = found
        coverage.token_budget_needed = _largest_needed(answers, "T")
        coverage.context_needed = _largest_needed(answers, LONGEST_KV)
        coverage.kv_needed = _largest_needed(answers, "K")

    def _coverage_of(self, totals: np.ndarray) -> Coverage:
        by_source = dict.fromkeys(SOURCES, 0.0)
        estimated = []
        unchecked = 0.0
        operations = {m.signature: (m, src) for m, _, src in self.entries}
        for label, seconds in zip(self.classes, totals.tolist(), strict=True):
            if label == SOURCE_MEASURED:
                by_source[SOURCE_MEASURED] += seconds
                unchecked += seconds
                continue
            model, source = operations[label]
            by_source[source] += seconds
            if source == SOURCE_MEASURED:
                continue
            estimated.append(EstimatedOp(signature=label, op=model.op, op_class=model.op_class, source=source,
                                         method=model.method, seconds=seconds))
        estimated.sort(key=lambda e: -e.seconds)
        return Coverage(seconds_by_source=by_source, estimated=estimated, unchecked_seconds=unchecked)

    # -- construction ------------------------------------------------------------------------

    def _build_extent_checks(self, entries: list[tuple[OpModel, int, str]]) -> list[ExtentCheck]:
        """(class index, variable, geometry its value is read at, limits by regime) for every
        variable of every measured op whose extent is known (none outside the coverage view)."""
        checks: dict[tuple[int, str], ExtentCheck] = {}
        cls_of = {c: i for i, c in enumerate(self.classes)}
        for model, _, source in entries:
            extent = self._extents.get(model.signature)
            if source != SOURCE_MEASURED or extent is None:
                continue
            ci = cls_of[model.signature]
            variables = checked_variables(model.family, model.request_vars, model.window)
            for var, limits in extent.limits(variables).items():
                geometry = self._geometry(model) if var == "S" else (self.model_window, 0.0)
                checks[(ci, var)] = (ci, var, geometry, limits)
        return list(checks.values())

    def _build(self, entries: list[tuple[OpModel, int, str]], predictor: Predictor) -> None:
        n_cls = len(self.classes)
        cls_of = {c: i for i, c in enumerate(self.classes)}
        self._dense: dict[str, np.ndarray] = {}
        self._log: dict[str, np.ndarray] = {}
        linear: dict[Geometry, np.ndarray] = {}
        self._nonlinear: list[tuple[int, float, OpModel, Geometry]] = []
        # Linear work times tabulated tree corrections (per-signature attention models).
        self._corrected: list[tuple[int, float, Geometry, np.ndarray, PairTables]] = []
        for model, count, label in self._expanded(entries):
            ci = cls_of[label]
            var = model.single_var
            if var is not None:
                if var not in self._dense:
                    self._dense[var] = np.zeros((n_cls, DENSE_LIMIT))
                    self._log[var] = np.zeros((n_cls, len(LOG_GRID)))
                dense, logs = predictor.table(model)
                self._dense[var][ci] += count * dense
                self._log[var][ci] += count * logs
                continue
            geometry = self._geometry(model)
            corrected = model.corrected_terms()
            if corrected is not None:
                self._corrected.append((ci, count, geometry, *corrected))
                continue
            coef = model.regime_terms()
            if coef is None:
                self._nonlinear.append((ci, count, model, geometry))
                continue
            linear.setdefault(geometry, np.zeros((n_cls, N_REGIMES, N_TERMS)))[ci] += count * coef
        self._linear = linear
        self._linear_total = {w: m.sum(axis=0) for w, m in linear.items()}
        self._geometries = sorted(
            {*linear, *(w for *_, w in self._nonlinear), *(entry[2] for entry in self._corrected)}
        )
        # A sliding window anywhere: a step's S then needs each context (no `decode_steps`).
        self._windowed_terms = self.model_window > 0 or any(window > 0 for window, _ in self._geometries)
        self._decode_fixed: dict[int, tuple[float, list, list]] = {}
        self._dense_total = {var: table.sum(axis=0) for var, table in self._dense.items()}
        self._log_total = {var: table.sum(axis=0) for var, table in self._log.items()}
        # Scalar hot path: Python lists are faster to index than numpy arrays.
        self._scalar_tables = [
            (REQUEST_VARS.index(var), self._dense_total[var].tolist(), self._log_total[var].tolist())
            for var in self._dense
        ]
        linear_rows = {
            w: [[(int(i), float(c)) for i, c in enumerate(row) if c != 0.0] for row in total]
            for w, total in self._linear_total.items()
        }
        corrected_rows: dict[Geometry, list] = {}
        for _, count, geometry, coef, tables in self._corrected:
            corrected_rows.setdefault(geometry, []).append(
                (
                    float(count),
                    [(int(i), float(c)) for i, c in enumerate(coef) if c != 0.0],
                    [
                        (
                            TERM_INDEX[tables.names[a]],
                            tables.splits[a].tolist(),
                            TERM_INDEX[tables.names[b]],
                            tables.splits[b].tolist(),
                            table.tolist(),
                        )
                        for (a, b), table in zip(tables.pairs, tables.factors, strict=True)
                    ],
                )
            )
        # Per geometry: its request terms are built once per step and serve every model on it.
        self._scalar_geometries = [
            (
                geometry,
                linear_rows.get(geometry),
                corrected_rows.get(geometry, []),
                [(count, model) for _, count, model, g in self._nonlinear if g == geometry],
            )
            for geometry in self._geometries
        ]

    def _expanded(self, entries: list[tuple[OpModel, int, str]]) -> list[tuple[OpModel, float, str]]:
        """(model, count, label) per entry, every HeadsAffineModel replaced by its weighted members,
        each at its own geometry and labelled as the layout it stands for: the combination is
        linear in them, so the fast paths serve them as they serve measured ops."""
        out: list[tuple[OpModel, float, str]] = []
        for model, count, source in entries:
            label = self._label(model, source)
            if not isinstance(model, HeadsAffineModel):
                out.append((model, count, label))
                continue
            for weight, member in model.members:
                out.append((member if self._exact else self._surrogate(member), count * weight, label))
        return out

    def _geometry(self, model: OpModel) -> Geometry:
        """What an operation's request terms depend on beyond the batch: an attention op's own
        window and wave size, the model's window for everything else."""
        if model.family == FAMILY_ATTENTION:
            return (model.window, model.wave_tiles)
        return (self.model_window, 0.0)

    # -- scalar path -------------------------------------------------------------------------

    @staticmethod
    def _scan(prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int]) -> tuple:
        nd = len(decode_ctx)
        t = nd
        kv = 0
        pairs = 0
        d = 0
        max_q = 1 if nd else 0
        max_kv = 0
        for q, c in prefill:
            t += q
            kv += q + c
            pairs += q * c + q * (q + 1) // 2
            if q > max_q:
                max_q = q
            if q + c > max_kv:
                max_kv = q + c
            if q == 1 and c > 0:
                d += 1
        if nd:
            kd = sum(decode_ctx) + nd
            top = max(decode_ctx) + 1
            if top > max_kv:
                max_kv = top
            zeros = (
                decode_ctx.count(0)
                if isinstance(decode_ctx, (list, tuple))
                else int(np.sum(np.asarray(decode_ctx) == 0))
            )
            d += nd - zeros
        else:
            kd = 0
            top = 0
        b = len(prefill) + nd
        return t, b, kv + kd, d, pairs + kd, b * max_q * max_kv, top

    @staticmethod
    def _windowed(
        prefill, decode_ctx, window: int, k: int, pairs: int, decode_top: int
    ) -> tuple[float, float]:
        """S and causal pairs under a sliding window (K and the full pairs when there is none)."""
        if window <= 0:
            return k, pairs
        s = 0
        wp = 0.0
        for q, c in prefill:
            s += min(c, window - 1) + q
            first = min(max(window - c, 0), q)
            wp += first * c + first * (first + 1) / 2 + (q - first) * window
        if decode_top <= window:
            dec = sum(decode_ctx) + len(decode_ctx)
        else:
            dec = sum(min(c + 1, window) for c in decode_ctx)
        return s + dec, wp + dec

    @staticmethod
    def _term_list(t, b, k, d, s, pairs, padded, wave_tiles) -> list[float]:
        """The request terms in TERMS order, built by hand (a test checks it against term_matrix)."""
        if wave_tiles > 0:
            waves = math.ceil(math.ceil(t / QUERY_TILE) / wave_tiles - WAVE_ROUNDING)
        else:
            waves = t / QUERY_TILE
        length = round(s)
        odd = length % 2 == 1
        unaligned = not odd and length % KV_ALIGNMENT != 0
        return [
            0.0, 1.0, t, b, k, d, s,
            t * b, t * k, t * d, t * s, b * k, b * d, b * s, k * d, k * s, d * s,
            pairs, padded, waves * s,
            t * s if odd else 0.0, t * s if unaligned else 0.0, s if odd else 0.0, s if unaligned else 0.0,
        ]  # fmt: skip

    @staticmethod
    def _lookup(dense: list[float], logs: list[float], x: float) -> float:
        if x < DENSE_LIMIT:
            return dense[int(x)]
        pos = (math.log2(x) - LOG2_DENSE) * PER_OCTAVE
        i = min(int(pos), len(logs) - 2)
        return logs[i] + (logs[i + 1] - logs[i]) * (pos - i)

    def step_seconds(
        self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int], full_reads: bool = False
    ) -> float:
        """Latency of one engine step: prefill chunks (new tokens, cached context) + decodes (context).

        `full_reads`: every attention layer reads all of the step's KV tokens, its sliding window
        notwithstanding. transformers' CUDA-graph path pads one read index and one mask width for
        every layer group, so there a sliding layer runs over the padded KV like a full one
        (bench/attention_engine_padding.py: gemma-2-9b's sliding layers cost what its full ones do)."""
        t, b, k, d, pairs, padded, top = self._scan(prefill, decode_ctx)
        return self._seconds(prefill, decode_ctx, full_reads, t, b, k, d, pairs, padded, top)

    def decode_steps(self, decode_ctx: Sequence[int]) -> Callable[[int], float] | None:
        """`step_seconds` of a decode window's steps (`dooly.sim.step_model.decode_steps`): step i
        holds every context plus i, so its aggregates follow from the first step's sums without
        scanning its contexts. None for a model with a sliding window (its S needs each context)
        and for a context of 0 (a decode that reads nothing)."""
        n = len(decode_ctx)
        if not n or self._windowed_terms or 0 in decode_ctx:
            return None
        first_k = sum(decode_ctx) + n
        first_top = max(decode_ctx) + 1
        fixed = self._decode_fixed.get(n)
        if fixed is None:
            fixed = self._decode_fixed[n] = self._decode_fixed_terms(n)
        constant, varying, geometries = fixed
        lookup, term_list, add_terms = self._lookup, self._term_list, self._add_terms

        def seconds(step: int) -> float:
            k = first_k + n * step
            total = constant
            if varying:
                values = (n, n, k, n, k)
                for var_i, dense, logs in varying:
                    x = values[var_i]
                    if x > 0:
                        total += lookup(dense, logs, x)
            padded = n * (first_top + step)
            for wave_tiles, linear, corrected, nonlinear in geometries:
                total = add_terms(total, term_list(n, n, k, n, k, k, padded, wave_tiles), linear, corrected, nonlinear)
            return total

        return seconds

    def _decode_fixed_terms(self, n: int) -> tuple[float, list, list]:
        """What a decode step of n requests costs whatever its contexts: T, B and D are n, so the
        tables of those that come first add the same seconds each step (in the same order, so
        the sum is the same to the last bit), and the regime is the same. (constant seconds, the
        tables left, per geometry (wave tiles, the regime's linear rows, corrected, non-linear))."""
        tables = self._scalar_tables
        constant = 0.0
        held = 0
        while held < len(tables) and tables[held][0] in _DECODE_CONSTANT_VARS:
            constant += self._lookup(tables[held][1], tables[held][2], n)
            held += 1
        regime = regime_scalar(n, n)
        geometries = [
            (wave_tiles, None if by_regime is None else by_regime[regime], corrected, nonlinear)
            for (_, wave_tiles), by_regime, corrected, nonlinear in self._scalar_geometries
        ]
        return constant, tables[held:], geometries

    def _seconds(
        self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int], full_reads: bool,
        t: int, b: int, k: int, d: int, pairs: int, padded: int, top: int,
    ) -> float:
        """`step_seconds` from a step's aggregates (`_scan`); the contexts serve sliding windows only."""
        mw = 0 if full_reads else self.model_window
        s_model = self._windowed(prefill, decode_ctx, mw, k, pairs, top)[0] if mw > 0 else k
        values = (t, b, k, d, s_model)
        lookup = self._lookup
        total = 0.0
        for var_i, dense, logs in self._scalar_tables:
            x = values[var_i]
            if x > 0:
                total += lookup(dense, logs, x)
        if self._scalar_geometries:
            regime = regime_scalar(d, b)
            for (window, wave_tiles), by_regime, corrected, nonlinear in self._scalar_geometries:
                if full_reads:
                    window = 0
                s, wp = (
                    self._windowed(prefill, decode_ctx, window, k, pairs, top) if window > 0 else (k, pairs)
                )
                terms = self._term_list(t, b, k, d, s, wp, padded, wave_tiles)
                total = self._add_terms(total, terms, None if by_regime is None else by_regime[regime], corrected, nonlinear)
        return total

    @staticmethod
    def _add_terms(
        total: float, terms: list[float], linear: list[tuple[int, float]] | None, corrected: list, nonlinear: list
    ) -> float:
        """`total` plus one geometry's models at its request terms: the linear ones (the step's
        regime's coefficients), the tree-corrected and the non-linear ones, in that order."""
        if linear is not None:
            for i, c in linear:
                total += c * terms[i]
        for count, coef, tables in corrected:
            base = 0.0
            for i, c in coef:
                base += c * terms[i]
            factor = 1.0
            for i, split_i, j, split_j, table in tables:
                factor *= table[bisect_left(split_i, terms[i])][bisect_left(split_j, terms[j])]
            total += count * max(base, MIN_SECONDS) * factor
        for count, model in nonlinear:
            total += count * float(model.predict_terms(np.array([terms]))[0])
        return total

    # -- array path --------------------------------------------------------------------------

    def _class_seconds(
        self, q: np.ndarray, ctx: np.ndarray, step: np.ndarray, n_steps: int, per_class: bool,
        full_reads: bool = False,
    ) -> np.ndarray:
        """(n_steps,) totals, or (n_steps, n_classes) when per_class; `full_reads` as in step_seconds."""
        return self._class_seconds_of(self._flat_aggregates(q, ctx, step, n_steps, full_reads), n_steps, per_class)

    def _flat_aggregates(
        self, q: np.ndarray, ctx: np.ndarray, step: np.ndarray, n_steps: int, full_reads: bool = False
    ) -> Aggregates:
        """The steps' aggregates at every geometry the model's operations read them at."""
        return {
            (w, tiles): seqs_aggregates(
                q, ctx, step, n_steps, np.full(len(q), 0 if full_reads else w, dtype=np.int64), tiles
            )
            for w, tiles in {(self.model_window, 0.0), *self._geometries}
        }

    def _class_seconds_of(self, aggregates: Aggregates, n_steps: int, per_class: bool) -> np.ndarray:
        """`_class_seconds` from the steps' aggregates per geometry (`seqs_aggregates`)."""
        n_cls = len(self.classes)
        out = np.zeros((n_steps, n_cls)) if per_class else np.zeros(n_steps)
        base = aggregates[(self.model_window, 0.0)]
        for var in self._dense:
            x = base[var]
            if per_class:
                vals = np.stack(
                    [lookup_many(self._dense[var][ci], self._log[var][ci], x) for ci in range(n_cls)], axis=1
                )
            else:
                vals = lookup_many(self._dense_total[var], self._log_total[var], x)
            out += vals
        for geometry in self._geometries:
            terms = term_matrix(aggregates[geometry], n_steps)
            if geometry in self._linear:
                regime = regime_of(terms)
                if per_class:
                    out += np.einsum("nj,cnj->nc", terms, self._linear[geometry][:, regime, :])
                else:
                    out += np.einsum("nj,nj->n", terms, self._linear_total[geometry][regime])
            for ci, count, model, g in self._nonlinear:
                if g == geometry:
                    vals = count * model.predict_terms(terms)
                    if per_class:
                        out[:, ci] += vals
                    else:
                        out += vals
            for ci, count, g, coef, tables in self._corrected:
                if g == geometry:
                    vals = count * np.maximum(terms @ coef, MIN_SECONDS) * tables.factor(terms)
                    if per_class:
                        out[:, ci] += vals
                    else:
                        out += vals
        return out

    def step_seconds_arrays(
        self, q: np.ndarray, ctx: np.ndarray, step: np.ndarray, n_steps: int
    ) -> np.ndarray:
        """Many steps at once from flat per-sequence arrays: query length, context, step index."""
        return self._class_seconds(
            np.asarray(q, dtype=np.int64),
            np.asarray(ctx, dtype=np.int64),
            np.asarray(step, dtype=np.int64),
            n_steps,
            False,
        )

    def step_seconds_many(
        self, steps: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int]]]
    ) -> np.ndarray:
        """Latency of many steps, each (prefill chunks, decode contexts)."""
        q, ctx, step = flatten_steps(steps)
        return self.step_seconds_arrays(q, ctx, step, len(steps))

    def breakdown(
        self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int], full_reads: bool = False
    ) -> dict[str, float]:
        """One step's latency by operation class (sums to `step_seconds`)."""
        q, ctx, step = flatten_steps([(prefill, decode_ctx)])
        row = self._class_seconds(q, ctx, step, 1, True, full_reads)[0]
        return {c: float(v) for c, v in zip(self.classes, row, strict=True)}

    def op_seconds(
        self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int]
    ) -> list[dict[str, Any]]:
        """Per inventory operation: seconds per execution, count, and whether it was unseen."""
        q, ctx, step = flatten_steps([(prefill, decode_ctx)])
        rows = []
        for model, count, source in self.entries:
            window, wave_tiles = self._geometry(model)
            terms = term_matrix(
                seqs_aggregates(q, ctx, step, 1, np.full(len(q), window, dtype=np.int64), wave_tiles), 1
            )
            only = model.single_var
            seconds = (
                float(model.predict_terms(terms)[0])
                if only is None or terms[0, TERM_INDEX[only]] > 0
                else 0.0
            )
            rows.append(
                {
                    "signature": model.signature,
                    "op": model.op,
                    "op_class": model.op_class,
                    "count": count,
                    "seconds": seconds,
                    "method": model.method,
                    "unseen": source != SOURCE_MEASURED,
                    "source": source,
                }
            )
        return rows


def _largest_needed(
    answers: Mapping[tuple[str, Geometry, bytes], tuple[np.ndarray, int, int] | None], var: str
) -> int | None:
    """The largest value of VAR that exceeded a measured one over the checks answered
    (`StepPredictor._add_extrapolated`), None where none did: what a plan must reach."""
    needed = [answer[1] for (checked, _, _), answer in answers.items() if checked == var and answer is not None]
    return max(needed) if needed else None


def step_phase(prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int]) -> str:
    """A step's phase: only prefill chunks, only decodes, or both."""
    if prefill and decode_ctx:
        return PHASE_MIXED
    return PHASE_PREFILL if prefill else PHASE_DECODE


@dataclass(frozen=True)
class EstimatedOp:
    """An operation predicted without its own measurements, and its predicted device time."""

    signature: str
    op: str
    op_class: str
    source: str
    method: str
    seconds: float


@dataclass(frozen=True)
class ExtrapolatedOp:
    """A measured operation priced beyond the sizes it was measured at: its device time in the
    steps where it is, and the variable exceeded furthest (its largest measured value in the
    step's regime, and the largest value the steps needed)."""

    signature: str
    op: str
    op_class: str
    variable: str
    measured_max: int
    needed_max: int
    seconds: float


@dataclass
class Coverage:
    """How much of a prediction is measured: predicted device seconds by source (SOURCES) and the
    estimated operations, largest first; apart from that, the measured operations priced beyond
    the sizes they were measured at (`extrapolated`, largest first), `unchecked_seconds` of
    measured time whose extent the fit did not record (models fitted before it was), and the
    largest step token count, longest sequence's KV (L) and KV total (K) that exceeded a measured
    one (None: none did), which say what a plan must measure to close the gap."""

    seconds_by_source: dict[str, float]
    estimated: list[EstimatedOp] = field(default_factory=list)
    extrapolated: list[ExtrapolatedOp] = field(default_factory=list)
    unchecked_seconds: float = 0.0
    token_budget_needed: int | None = None
    context_needed: int | None = None
    kv_needed: int | None = None

    @property
    def seconds(self) -> float:
        return float(sum(self.seconds_by_source.values()))

    def share(self, source: str) -> float:
        total = self.seconds
        return self.seconds_by_source.get(source, 0.0) / total if total > 0 else 0.0

    @property
    def measured_share(self) -> float:
        return self.share(SOURCE_MEASURED) if self.seconds > 0 else 1.0

    @property
    def extrapolated_share(self) -> float | None:
        """The share of device time priced beyond measured sizes; None when no measured time could
        be checked (every measured op's extent unknown: a fit from before extents were recorded)."""
        total = self.seconds
        checked = self.seconds_by_source.get(SOURCE_MEASURED, 0.0) - self.unchecked_seconds
        if total > 0 and checked <= 0 < self.unchecked_seconds:
            return None
        return sum(e.seconds for e in self.extrapolated) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        total = self.seconds

        def share(seconds: float) -> float:
            return seconds / total if total > 0 else 0.0

        return {
            "device_seconds": total,
            "measured_share": self.measured_share,
            "class_regressor_share": self.share(SOURCE_CLASS),
            "fallback_share": self.share(SOURCE_FALLBACK),
            "estimated": [
                {"signature": e.signature, "op": e.op, "op_class": e.op_class, "source": e.source,
                 "method": e.method, "device_seconds": e.seconds, "share": share(e.seconds)}
                for e in self.estimated
            ],
            "extrapolated_share": self.extrapolated_share,
            "unchecked_share": share(self.unchecked_seconds),
            "token_budget_needed": self.token_budget_needed,
            "context_needed": self.context_needed,
            "kv_needed": self.kv_needed,
            "extrapolated": [
                {"signature": e.signature, "op": e.op, "op_class": e.op_class, "variable": e.variable,
                 "measured_max": e.measured_max, "needed_max": e.needed_max, "device_seconds": e.seconds,
                 "share": share(e.seconds)}
                for e in self.extrapolated
            ],
        }


def phase_arrays(steps: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int]]]) -> dict[str, FlatSteps]:
    """The steps grouped by phase (`step_phase`, phases in name order, steps in their order),
    each group flattened (`flatten_steps`)."""
    phases: dict[str, list[tuple[Sequence[tuple[int, int]], Sequence[int]]]] = {}
    for prefill, decode_ctx in steps:
        phases.setdefault(step_phase(prefill, decode_ctx), []).append((prefill, decode_ctx))
    return {phase: (*flatten_steps(chosen), len(chosen)) for phase, chosen in sorted(phases.items())}


def flatten_steps(
    steps: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int]]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat per-sequence arrays (query length, context, step index) of many steps: each step's
    prefill chunks, then its decodes. Every sequence is placed at its position directly (a
    simulation's coverage flattens hundreds of thousands of them; sorting them by step cost more
    than the rest of its coverage)."""
    n_steps = len(steps)
    n_prefill = np.fromiter((len(p) for p, _ in steps), dtype=np.int64, count=n_steps)
    n_decode = np.fromiter((len(d) for _, d in steps), dtype=np.int64, count=n_steps)
    pairs = np.fromiter(
        chain.from_iterable(pair for prefill, _ in steps for pair in prefill), dtype=np.int64, count=2 * int(n_prefill.sum())
    ).reshape(-1, 2)
    decode = np.fromiter(chain.from_iterable(d for _, d in steps), dtype=np.int64, count=int(n_decode.sum()))
    sizes = n_prefill + n_decode
    starts = np.cumsum(sizes) - sizes
    prefill_at = np.repeat(starts - (np.cumsum(n_prefill) - n_prefill), n_prefill) + np.arange(len(pairs))
    decode_at = np.repeat(starts + n_prefill - (np.cumsum(n_decode) - n_decode), n_decode) + np.arange(len(decode))
    q = np.empty(int(sizes.sum()), dtype=np.int64)
    ctx = np.empty_like(q)
    q[prefill_at] = pairs[:, 0]
    ctx[prefill_at] = pairs[:, 1]
    q[decode_at] = 1
    ctx[decode_at] = decode
    return q, ctx, np.repeat(np.arange(n_steps), sizes)
