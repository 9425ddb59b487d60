"""The small regressors behind the predictor, and how each is fitted.

Two kinds, on purpose:
- per-signature models for operations the database holds: a one-variable curve over the measured
  sizes (dooly.fit.curves: shape-preserving cubic in log-log, kernel switches and partial-block
  effects kept), a non-negative linear model over request terms, or for attention that linear
  model times a correction learned by trees on the log residual, tabulated exactly (PairTables).
  They reproduce the measurements and interpolate between them.
- per-class models over config dims + request variables, for signatures never profiled: a
  non-negative linear model on physical features (FLOPs, bytes moved), optionally corrected by a
  small gradient-boosted tree on logs, or a tree / power law alone. Which one wins is measured by
  grouped k-fold cross-validation per operation class.

Fitting uses scikit-learn (trees, ridge) and SciPy (NNLS); evaluation is plain numpy on stored
arrays (coefficients, flattened trees), so a persisted model holds no scikit-learn object
(codec.py stores them as JSON) and predicting never starts a thread.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dooly.fit.curves import Curve
from dooly.fit.features import (
    FAMILY_ATTENTION,
    KV_ALIGNMENT_TERMS,
    N_REGIMES,
    N_TERMS,
    REGIME_DECODE,
    REGIME_MIXED,
    REGIME_PREFILL,
    TERM_INDEX,
    StaticFeatures,
    log_design,
    regime_of,
    with_wave_tiles,
)

# Candidate methods for signatures the database does not hold, in order of preference on ties.
METHOD_NNLS = "nnls"
METHOD_NNLS_GBT = "nnls+gbt"
METHOD_GBT = "gbt-log"
METHOD_RIDGE = "ridge-log"
METHOD_REGIME = "regime-nnls"
# An unseen attention layout that differs from measured ones in query heads only: their own models
# combined affinely in the heads (HeadsAffineModel).
METHOD_HEADS_AFFINE = "heads-affine"
# One such layout only, on a backend whose attention materialises per-head scores (eager): its own
# model scaled by the ratio of the query heads (a HeadsAffineModel of one member).
METHOD_HEADS_PROPORTIONAL = "heads-proportional"
# One such layout only, on a backend whose kernels read the KV once for a group of query heads
# (sdpa): the peer's own work split into the part the heads do not scale and the part they do, the
# latter times the ratio of the heads (a HeadsAffineModel of two members per peer, group.heads_shared_members).
METHOD_HEADS_SHARED = "heads-shared"
# A layout with no query-head peer (other KV heads or head dim), on eager attention: the nearest
# measured layout's own work, each part scaled by what sizes it in the layout (a HeadsAffineModel of
# one member per part, group.layout_scaled_model).
METHOD_LAYOUT_SCALED = "layout-scaled"
UNSEEN_METHODS = (METHOD_NNLS, METHOD_NNLS_GBT, METHOD_GBT, METHOD_RIDGE)
# Attention kernels change paths between batch regimes: one more candidate there.
ATTENTION_UNSEEN_METHODS = (METHOD_NNLS, METHOD_REGIME, METHOD_NNLS_GBT, METHOD_GBT, METHOD_RIDGE)
# Methods whose bound form is linear in the request terms (per regime): the fast path.
LINEAR_METHODS = (METHOD_NNLS, METHOD_REGIME)

# Methods for signatures the database holds.
SEEN_INTERP = "interp-loglog"
SEEN_LINEAR = "local-nnls"
SEEN_REGIME = METHOD_REGIME
SEEN_SCALED = "scaled-class"
SEEN_TREES = "local-nnls+trees"
SEEN_WAVE_TREES = "local-nnls+waves+trees"
# Per-signature attention models: NNLS on the work terms, then trees on the log residual over the
# batch's tokens, KV tokens, sequences and decodes, splitting on (T, K) and (B, D) separately.
# Two hypotheses of the work, chosen per class by held-out error: a kernel that touches every
# (query, key) pair of the packed batch (T*K: eager materialises the scores), or a flash kernel
# that runs in waves of query tiles (`waves_kv`, features.QUERY_TILE). Both fit a grid alike, whose
# mixed points sit where the two agree; only the second predicts a step at exactly 2048 tokens,
# where the engine's padded heavy steps are (H100: T*K over-predicted them by 8-30%).
TREE_BASE_TERMS = ("const", "T", "K", "T*K", *KV_ALIGNMENT_TERMS)
# An alignment class's terms enter a signature's dense model only where that many of its points
# are batches of that class holding decodes and more than one query row (the grid's unaligned
# copies): a single decode or a lone prefill with an odd length runs other kernels, and terms fitted
# on them alone extrapolate to heavy steps by orders of magnitude (seen on an H200 store without
# the copies).
MIN_ALIGNMENT_POINTS = 4
ALIGNMENT_CLASSES = (("pairs_odd_kv", "odd_kv"), ("pairs_unaligned_kv", "unaligned_kv"))
WAVE_TREE_BASE_TERMS = ("const", "T", "K", "waves_kv")
TREE_TERMS = ("T", "K", "B", "D")
TREE_PAIRS = ((0, 1), (2, 3))

# Latencies are positive; this floor keeps logs finite when a linear fit predicts zero.
MIN_SECONDS = 1e-9

# Small trees: fast to fit on a CPU, fast to evaluate, hard to over-fit with few signatures.
GBT_PARAMS: dict[str, Any] = {
    "max_iter": 80,
    "learning_rate": 0.15,
    "max_leaf_nodes": 15,
    "early_stopping": False,
    "random_state": 0,
}
# Per-signature trees see ~100 points: small trees, leaves of a few points (a single-sequence
# decode is its own kernel path, with only a handful of measured points).
LOCAL_GBT_PARAMS: dict[str, Any] = {**GBT_PARAMS, "max_leaf_nodes": 8, "min_samples_leaf": 2}
GBT_MIN_LEAF_FRACTION = 0.05
GBT_MAX_MIN_LEAF = 20
RIDGE_ALPHA = 1e-3
# A batch regime gets its own coefficients from this many points on (else the joint fit's).
MIN_REGIME_POINTS = 8
# Where a regime with too few points of its own borrows them, in order of preference.
REGIME_POOLS = {
    REGIME_PREFILL: ((REGIME_PREFILL,), (REGIME_PREFILL, REGIME_MIXED)),
    REGIME_DECODE: ((REGIME_DECODE,),),
    REGIME_MIXED: ((REGIME_MIXED,), (REGIME_PREFILL, REGIME_MIXED)),
}
# Rows evaluated at once by the tree ensemble (rows x trees node indices stay small).
TREE_CHUNK_ROWS = 8192
# Rows sorted in every feature (a table over one request variable) are walked once per run of rows
# that no split separates, when there are at least this many rows and runs are at most this share
# of them: below that, finding the runs costs about what walking every row does.
SORTED_RUN_MIN_ROWS = 256
SORTED_RUN_MAX_SHARE = 0.25


@functools.cache
def _threadpools() -> Any:
    """One threadpoolctl controller for the process: `threadpool_limits` builds a new one per call,
    which scans the loaded libraries (/proc/self/maps) each time, 12 s of an H100 fit's ~1,500
    small fits. Built after scikit-learn's tree module is imported, so its OpenMP runtime is known."""
    import sklearn.ensemble  # noqa: F401  (loads the OpenMP runtime the controller must see)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_openmp_thread() -> Any:
    """A context in which OpenMP runs one thread (see `fit_class_regressor` for why)."""
    return _threadpools().limit(limits=1, user_api="openmp")


def relative_nnls(design: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error: minimise sum((x.c - y) / y)^2, c >= 0.

    Relative, because the target is MAPE; non-negative, because every feature is work that can
    only add time, which keeps extrapolation to bigger shapes sane.

    SciPy's NNLS solver is called directly: it is what scikit-learn's
    LinearRegression(positive=True, fit_intercept=False) runs (same coefficients, bit for bit),
    without its input validation, which dominated the cost of the many small fits of the held-out
    checks, and without scikit-learn, so a step predictor that fits a linear surrogate (see
    predictor.StepPredictor) runs where only the fitted models are.
    """
    from scipy.optimize import nnls

    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    scaled = design / scale / seconds[:, None]
    return nnls(scaled, np.ones(len(seconds)))[0] / scale


# ---------------------------------------------------------------------------------------------
# Per-signature models


@dataclass
class OpModel:
    """A latency model of one operation (signature), evaluated on request terms."""

    signature: str
    op: str
    op_class: str
    family: str
    request_vars: tuple[str, ...]
    window: int
    method: str
    # Query tiles per wave of its kernel (attention on a known platform; features.QUERY_TILE).
    wave_tiles: float

    def predict_terms(self, terms: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def linear_terms(self) -> np.ndarray | None:
        """Coefficients over TERMS when the model is linear in them (the fast path), else None."""
        return None

    def regime_terms(self) -> np.ndarray | None:
        """(N_REGIMES, N_TERMS) coefficients when the model is linear in the terms within each
        batch regime (the fast path too), else None."""
        coef = self.linear_terms()
        return None if coef is None else np.tile(coef, (N_REGIMES, 1))

    def corrected_terms(self) -> tuple[np.ndarray, PairTables] | None:
        """(coefficients over TERMS, correction tables) when the model is linear work times a
        tabulated tree correction (the step predictor's tree-aware fast path), else None."""
        return None

    @property
    def single_var(self) -> str | None:
        """The one request variable of a non-attention op (tabulated by the step predictor)."""
        if self.family != FAMILY_ATTENTION and len(self.request_vars) == 1:
            return self.request_vars[0]
        return None


@dataclass
class InterpModel(OpModel):
    """A one-variable latency curve over `variable` (see dooly.fit.curves): interpolation between
    the measured sizes, exact at them. A multi-variable operation whose latency follows one of its
    variables only (a gather of B rows out of T) uses it too."""

    variable: str = ""
    curve: Curve | None = None

    def predict_values(self, values: np.ndarray) -> np.ndarray:
        assert self.curve is not None, "InterpModel without a fitted curve"
        return self.curve.predict(values)

    def predict_terms(self, terms: np.ndarray) -> np.ndarray:
        return self.predict_values(terms[:, TERM_INDEX[self.variable]])

    @property
    def single_var(self) -> str | None:
        return self.variable if self.family != FAMILY_ATTENTION else None


@dataclass
class LinearModel(OpModel):
    """seconds = sum_j coef_j * term_j over a few request terms (non-negative coefficients)."""

    coef: np.ndarray = field(default_factory=lambda: np.zeros(N_TERMS))

    def predict_terms(self, terms: np.ndarray) -> np.ndarray:
        return terms @ self.coef

    def linear_terms(self) -> np.ndarray | None:
        return self.coef


def fit_local_linear(terms: np.ndarray, seconds: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Coefficients over all TERMS (zeros outside `names`) of a relative NNLS fit."""
    cols = [TERM_INDEX[n] for n in names]
    coef = np.zeros(N_TERMS)
    coef[cols] = relative_nnls(terms[:, cols], seconds)
    return coef


@dataclass
class RegimeLinearModel(OpModel):
    """One LinearModel per batch regime (prefill-only, decode-only, mixed): kernels often switch
    code paths between them, which one set of coefficients cannot follow."""

    regime_coef: np.ndarray = field(default_factory=lambda: np.zeros((N_REGIMES, N_TERMS)))

    def predict_terms(self, terms: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", terms, self.regime_coef[regime_of(terms)])

    def regime_terms(self) -> np.ndarray | None:
        return self.regime_coef


def fit_regime_linear(terms: np.ndarray, seconds: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Per-regime coefficients over TERMS (see `regime_nnls`)."""
    cols = [TERM_INDEX[n] for n in names]
    coef = np.zeros((N_REGIMES, N_TERMS))
    coef[:, cols] = regime_nnls(terms[:, cols], seconds, regime_of(terms))
    return coef


def regime_nnls(design: np.ndarray, seconds: np.ndarray, regimes: np.ndarray) -> np.ndarray:
    """(N_REGIMES, F) relative NNLS coefficients, one row per batch regime. A regime with too
    few points borrows from its neighbour: mixed batches run the prefill path in the kernels we
    know (varlen prefill kernels take the decodes along), so prefill and mixed pool together;
    else the joint fit over all points."""
    joint = relative_nnls(design, seconds)
    coef = np.tile(joint, (N_REGIMES, 1))
    enough = max(MIN_REGIME_POINTS, design.shape[1])
    for regime in range(N_REGIMES):
        for pool in REGIME_POOLS[regime]:
            rows = np.isin(regimes, pool)
            if rows.sum() >= enough:
                coef[regime] = relative_nnls(design[rows], seconds[rows])
                break
    return coef


# ---------------------------------------------------------------------------------------------
# Per-class (cross-signature) models


@dataclass
class TreeEnsemble:
    """A fitted gradient-boosted tree ensemble as flat numpy arrays, evaluated without
    scikit-learn: its predict uses OpenMP threads, and on a busy shared machine one call for one
    row can take tens of milliseconds spinning; a step predictor cannot wait for that."""

    baseline: float
    feature: np.ndarray  # per node (0 for leaves)
    threshold: np.ndarray  # per node: go left when x[feature] <= threshold (+inf for leaves)
    left: np.ndarray  # per node, global node index (a leaf points to itself)
    right: np.ndarray
    value: np.ndarray  # per node: the leaf value (shrinkage applied)
    roots: np.ndarray  # first node of each tree
    depth: int

    @classmethod
    def from_hist_gbr(cls, estimator: Any) -> TreeEnsemble:
        """Copy the trees of a fitted HistGradientBoostingRegressor (one output, no categorical
        features, no missing values: what this package fits)."""
        features, thresholds, lefts, rights, values, roots = [], [], [], [], [], []
        offset = 0
        depth = 0
        for (tree,) in estimator._predictors:
            nodes = tree.nodes
            leaf = nodes["is_leaf"].astype(bool)
            own = np.arange(len(nodes)) + offset
            features.append(np.where(leaf, 0, nodes["feature_idx"]).astype(np.int64))
            thresholds.append(np.where(leaf, np.inf, nodes["num_threshold"]))
            lefts.append(np.where(leaf, own, nodes["left"].astype(np.int64) + offset))
            rights.append(np.where(leaf, own, nodes["right"].astype(np.int64) + offset))
            values.append(np.where(leaf, nodes["value"], 0.0))
            roots.append(offset)
            depth = max(depth, int(nodes["depth"].max()))
            offset += len(nodes)
        return cls(
            baseline=float(np.ravel(estimator._baseline_prediction)[0]),
            feature=np.concatenate(features),
            threshold=np.concatenate(thresholds),
            left=np.concatenate(lefts),
            right=np.concatenate(rights),
            value=np.concatenate(values),
            roots=np.array(roots, dtype=np.int64),
            depth=depth,
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        starts = self.sorted_runs(x)
        if starts is not None:
            sums = self.baseline + self.leaf_values(x[starts]).sum(axis=1)
            return np.repeat(sums, np.diff(np.append(starts, len(x))))
        out = np.full(len(x), self.baseline)
        for start in range(0, len(x), TREE_CHUNK_ROWS):
            leaves = self.leaf_values(x[start : start + TREE_CHUNK_ROWS])
            out[start : start + TREE_CHUNK_ROWS] += leaves.sum(axis=1)
        return out

    def sorted_runs(self, x: np.ndarray) -> np.ndarray | None:
        """Where X's rows are non-decreasing in every feature (a step model's table over one request
        variable: its log terms grow with it, its config dims stay put), the first row of each run
        of rows that fall on the same side of every split: such rows reach the same leaf in every
        tree, so `predict` walks one row per run and repeats its sum, bit for bit what walking each
        row gives. None where the rows are not so sorted, or runs would save too little.

        A split (feature j, threshold t) sends a row left while x[j] <= t; in rows sorted in j, the
        first row past it is `searchsorted(x[:, j], t, side="right")`, and those boundaries over
        every split cut the rows into the runs."""
        if len(x) < SORTED_RUN_MIN_ROWS or x.ndim != 2:
            return None
        if not (np.diff(x, axis=0) >= 0).all():  # NaN compares False: never taken as sorted
            return None
        splits = np.isfinite(self.threshold)
        features, thresholds = self.feature[splits], self.threshold[splits]
        cuts = [np.searchsorted(x[:, j], thresholds[features == j], side="right") for j in np.unique(features)]
        starts = np.unique(np.concatenate([np.zeros(1, dtype=np.int64), *cuts]))
        starts = starts[starts < len(x)]
        return starts if len(starts) <= SORTED_RUN_MAX_SHARE * len(x) else None

    def leaf_values(self, x: np.ndarray, trees: np.ndarray | None = None) -> np.ndarray:
        """(rows, trees) value of the leaf each row reaches in each tree (of `trees`, indices into
        `roots`; all by default). Summed along a row in tree order, it is what `predict` adds to
        the baseline, bit for bit (PairTables.from_trees builds the same matrix piecewise).

        Flat `take`s instead of two-axis fancy indexing and one interleaved child array instead of
        a `where` over both children: the same nodes, at about half the cost (tabulating the
        per-signature trees of every held-out fold calls this thousands of times)."""
        roots = self.roots if trees is None else self.roots[trees]
        flat = np.ascontiguousarray(x, dtype=np.float64).ravel()
        offset = (np.arange(len(x)) * x.shape[1])[:, None]
        # children[2 * node + 1] is the left child (go left: x <= threshold), [2 * node] the right.
        children = np.empty(2 * len(self.left), dtype=np.int64)
        children[0::2] = self.right
        children[1::2] = self.left
        node = np.broadcast_to(roots, (len(x), len(roots))).astype(np.int64)
        for _ in range(self.depth):
            go_left = flat.take(offset + self.feature.take(node)) <= self.threshold.take(node)
            child = children.take(2 * node + go_left)
            if np.array_equal(child, node):
                break  # every row is at a leaf (a leaf is its own child): shallower trees than `depth`
            node = child
        return self.value.take(node)

    def split_features(self) -> list[set[int]]:
        """Per tree, the features it splits on (empty for a single leaf)."""
        ends = [*self.roots[1:].tolist(), len(self.feature)]
        return [
            set(self.feature[start:end][np.isfinite(self.threshold[start:end])].tolist())
            for start, end in zip(self.roots.tolist(), ends, strict=True)
        ]


def tree_features(terms: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Log request terms for per-signature trees (trees only compare: any monotone transform would
    do; logs put a split between two measured sizes at their geometric mean). Terms below 1 count
    as 1: every split point is then above 1, and a term of 0 or 1 falls in the first cell."""
    return np.log(np.maximum(terms[:, [TERM_INDEX[n] for n in names]], 1.0))


@dataclass
class PairTables:
    """exp(tree ensemble) for an ensemble whose every tree splits on one pair of its features only:
    the ensemble is then a sum of functions of two features, each constant between consecutive
    split points, so a small table per pair reproduces it exactly and a prediction costs one
    binary search per feature and one lookup per pair (the step predictor's fast path).

    Split points are stored in the terms' own units: a term's cell is the number of split points
    below it, the same in every path that evaluates the tables."""

    names: tuple[str, ...]  # request terms the trees split on
    splits: tuple[np.ndarray, ...]  # per term: ascending split points, in the term's units
    pairs: tuple[tuple[int, int], ...]  # indices into names; every name in exactly one pair
    factors: tuple[np.ndarray, ...]  # per pair: exp of its part of the ensemble, per cell

    @classmethod
    def from_trees(
        cls, ensemble: TreeEnsemble, names: Sequence[str], pairs: Sequence[tuple[int, int]]
    ) -> PairTables:
        """Tabulate `ensemble`, fitted on tree_features(terms, names), whose trees each split on
        the two features of one of `pairs` only."""
        log_splits = []
        for index in range(len(names)):
            chosen = (ensemble.feature == index) & np.isfinite(ensemble.threshold)
            log_splits.append(np.unique(ensemble.threshold[chosen]))
        # One point strictly inside every cell: below the first split, between splits, above the last.
        inside = [
            np.concatenate([s[:1] - 1.0, (s[:-1] + s[1:]) / 2.0, s[-1:] + 1.0]) if len(s) else np.zeros(1)
            for s in log_splits
        ]
        anchor = np.array([points[0] for points in inside])
        at_anchor = float(ensemble.predict(anchor[None, :])[0])
        anchor_leaves = ensemble.leaf_values(anchor[None, :])
        used = ensemble.split_features()
        factors = []
        for number, (a, b) in enumerate(pairs):
            grid_a, grid_b = np.meshgrid(inside[a], inside[b], indexing="ij")
            x = np.tile(anchor, (grid_a.size, 1))
            x[:, a] = grid_a.ravel()
            x[:, b] = grid_b.ravel()
            log_part = _grid_predict(ensemble, x, anchor_leaves, used, (a, b)).reshape(grid_a.shape)
            # The other pairs' functions are constant here (at the anchor): count them once.
            factors.append(np.exp(log_part if number == 0 else log_part - at_anchor))
        return cls(
            names=tuple(names),
            splits=tuple(np.exp(s) for s in log_splits),
            pairs=tuple(pairs),
            factors=tuple(factors),
        )

    def factor(self, terms: np.ndarray) -> np.ndarray:
        cells = [
            np.searchsorted(split, terms[:, TERM_INDEX[name]], side="left")
            for name, split in zip(self.names, self.splits, strict=True)
        ]
        out = np.ones(len(terms))
        for (a, b), table in zip(self.pairs, self.factors, strict=True):
            out *= table[cells[a], cells[b]]
        return out


def _grid_predict(
    ensemble: TreeEnsemble, x: np.ndarray, anchor_leaves: np.ndarray, used: list[set[int]], varied: tuple[int, int]
) -> np.ndarray:
    """ensemble.predict(x), bit for bit, for rows that differ from the anchor only in the features
    `varied`: a tree that splits on neither gives every row its leaf at the anchor, so only the
    trees that split on them are walked (about half: the trees of the other pair). The leaf matrix
    is summed in the same order as `predict` sums it."""
    walked = np.array([i for i, features in enumerate(used) if features & set(varied)], dtype=np.int64)
    out = np.full(len(x), ensemble.baseline)
    for start in range(0, len(x), TREE_CHUNK_ROWS):
        chunk = x[start : start + TREE_CHUNK_ROWS]
        leaves = np.repeat(anchor_leaves, len(chunk), axis=0)
        if len(walked):
            leaves[:, walked] = ensemble.leaf_values(chunk, walked)
        out[start : start + TREE_CHUNK_ROWS] += leaves.sum(axis=1)
    return out


@dataclass
class CorrectedLinearModel(OpModel):
    """seconds = max(terms . coef, MIN_SECONDS) * tables.factor(terms): a linear model of the work
    (attention: T, K, T*K) times what the kernels do differently by shape and batch mix, learned by
    trees on the log residual. Per signature: it reproduces that signature's measurements."""

    coef: np.ndarray = field(default_factory=lambda: np.zeros(N_TERMS))
    tables: PairTables | None = None

    def predict_terms(self, terms: np.ndarray) -> np.ndarray:
        assert self.tables is not None, "CorrectedLinearModel without fitted tables"
        return np.maximum(terms @ self.coef, MIN_SECONDS) * self.tables.factor(terms)

    def corrected_terms(self) -> tuple[np.ndarray, PairTables]:
        assert self.tables is not None, "CorrectedLinearModel without fitted tables"
        return self.coef, self.tables


def measured_alignment_terms(terms: np.ndarray) -> tuple[str, ...]:
    """The KV_ALIGNMENT_TERMS whose class these points measure (see MIN_ALIGNMENT_POINTS)."""
    batches = (terms[:, TERM_INDEX["D"]] > 0) & (terms[:, TERM_INDEX["T"]] > 1)
    return tuple(
        name for pair, keys in ALIGNMENT_CLASSES
        if np.count_nonzero(batches & (terms[:, TERM_INDEX[pair]] > 0)) >= MIN_ALIGNMENT_POINTS
        for name in (pair, keys)
    )


def fit_corrected_linear(
    terms: np.ndarray, seconds: np.ndarray, base_names: Sequence[str]
) -> tuple[np.ndarray, PairTables]:
    """Relative NNLS over `base_names` (alignment terms only where measured), then
    pair-constrained boosted trees on the log residual."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    measured = set(measured_alignment_terms(terms))
    names = tuple(n for n in base_names if n not in KV_ALIGNMENT_TERMS or n in measured)
    coef = fit_local_linear(terms, seconds, names)
    base = np.maximum(terms @ coef, MIN_SECONDS)
    model = HistGradientBoostingRegressor(interaction_cst=[list(p) for p in TREE_PAIRS], **LOCAL_GBT_PARAMS)
    with one_openmp_thread():
        model.fit(tree_features(terms, TREE_TERMS), np.log(seconds / base))
    return coef, PairTables.from_trees(TreeEnsemble.from_hist_gbr(model), TREE_TERMS, TREE_PAIRS)


@dataclass
class ClassRegressor:
    """One operation class's cross-signature regressor (see module docstring for the methods).

    Everything is stored as numpy arrays: evaluation needs no scikit-learn."""

    method: str
    coef: np.ndarray | None = None  # over the family's physical features (nnls, nnls+gbt)
    regime_coef: np.ndarray | None = None  # regime-nnls: (N_REGIMES, features)
    trees: TreeEnsemble | None = None  # on log features (nnls+gbt: log residual; gbt-log: log y)
    log_coef: np.ndarray | None = None  # ridge-log: log y = logx @ log_coef + log_intercept
    log_intercept: float = 0.0

    @property
    def needs_logx(self) -> bool:
        return self.method not in LINEAR_METHODS

    def predict(self, physical: np.ndarray, logx: np.ndarray, regimes: np.ndarray) -> np.ndarray:
        if self.method == METHOD_REGIME:
            assert self.regime_coef is not None
            return np.maximum(np.einsum("ij,ij->i", physical, self.regime_coef[regimes]), MIN_SECONDS)
        if self.method in (METHOD_NNLS, METHOD_NNLS_GBT):
            assert self.coef is not None
            base = np.maximum(physical @ self.coef, MIN_SECONDS)
            if self.method == METHOD_NNLS_GBT:
                assert self.trees is not None
                base = base * np.exp(self.trees.predict(logx))
            return base
        if self.method == METHOD_GBT:
            assert self.trees is not None
            return np.exp(self.trees.predict(logx))
        return np.exp(logx @ self.log_coef + self.log_intercept)


def fit_class_regressor(
    method: str, physical: np.ndarray, logx: np.ndarray, seconds: np.ndarray, regimes: np.ndarray
) -> ClassRegressor:
    """Fit one candidate. Trees are grown on one thread: they are small, and OpenMP threads that
    spin-wait on a shared, busy machine make a 0.1 s fit take seconds."""
    with one_openmp_thread():
        return _fit_class_regressor(method, physical, logx, seconds, regimes)


def _fit_class_regressor(
    method: str, physical: np.ndarray, logx: np.ndarray, seconds: np.ndarray, regimes: np.ndarray
) -> ClassRegressor:
    if method == METHOD_NNLS:
        return ClassRegressor(method, coef=relative_nnls(physical, seconds))
    if method == METHOD_REGIME:
        return ClassRegressor(method, regime_coef=regime_nnls(physical, seconds, regimes))
    if method == METHOD_NNLS_GBT:
        coef = relative_nnls(physical, seconds)
        base = np.maximum(physical @ coef, MIN_SECONDS)
        tree = _gbt(len(seconds)).fit(logx, np.log(seconds / base))
        return ClassRegressor(method, coef=coef, trees=TreeEnsemble.from_hist_gbr(tree))
    if method == METHOD_GBT:
        tree = _gbt(len(seconds)).fit(logx, np.log(seconds))
        return ClassRegressor(method, trees=TreeEnsemble.from_hist_gbr(tree))
    if method == METHOD_RIDGE:
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(logx)
        ridge = Ridge(alpha=RIDGE_ALPHA).fit(scaler.transform(logx), np.log(seconds))
        log_coef = ridge.coef_ / scaler.scale_
        intercept = float(ridge.intercept_ - scaler.mean_ @ log_coef)
        return ClassRegressor(method, log_coef=log_coef, log_intercept=intercept)
    raise ValueError(f"unknown method {method}")


def _gbt(n_rows: int):
    from sklearn.ensemble import HistGradientBoostingRegressor

    min_leaf = int(min(GBT_MAX_MIN_LEAF, max(1, n_rows * GBT_MIN_LEAF_FRACTION)))
    return HistGradientBoostingRegressor(min_samples_leaf=min_leaf, **GBT_PARAMS)


@dataclass
class ClassModel:
    """A fitted class regressor plus what it needs to build features of any signature."""

    op_class: str
    family: str
    config_names: tuple[str, ...]
    request_vars: tuple[str, ...]  # the most common request variables of the class
    regressor: ClassRegressor
    reference_seqs: list = field(default_factory=list)  # attention: measured batches
    reference_terms: np.ndarray = field(default_factory=lambda: np.zeros((0, N_TERMS)))  # others
    # Attention: the config dims of each measured signature of the class, by signature (what
    # `group.heads_affine_model` finds a new layout's query-head peers in; empty in stores fitted
    # before it, which then use the regressor alone).
    layouts: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class BoundClassModel(OpModel):
    """A class model applied to one signature (possibly never profiled), times a factor."""

    model: ClassModel | None = None
    static: StaticFeatures | None = None
    config: np.ndarray = field(default_factory=lambda: np.zeros(0))
    var_mask: np.ndarray = field(default_factory=lambda: np.zeros(0))
    factor: float = 1.0

    def _bound(self) -> tuple[ClassModel, StaticFeatures]:
        """The class model and static features, which every bound model carries once built."""
        assert self.model is not None and self.static is not None, "BoundClassModel not bound"
        return self.model, self.static

    def predict_terms(self, terms: np.ndarray) -> np.ndarray:
        model, static = self._bound()
        n = terms.shape[0]
        physical = terms[:, static.term_index] * static.multiplier
        logx = np.empty((n, 0))
        if model.regressor.needs_logx:
            logx = log_design(
                terms, physical, np.broadcast_to(self.config, (n, len(self.config))), self.var_mask
            )
        return self.factor * model.regressor.predict(physical, logx, regime_of(terms))

    def linear_terms(self) -> np.ndarray | None:
        regressor = self._bound()[0].regressor
        if regressor.method != METHOD_NNLS:
            return None
        assert regressor.coef is not None
        return self.factor * self._to_terms(regressor.coef)

    def regime_terms(self) -> np.ndarray | None:
        regressor = self._bound()[0].regressor
        if regressor.method == METHOD_REGIME:
            assert regressor.regime_coef is not None
            return self.factor * np.stack([self._to_terms(row) for row in regressor.regime_coef])
        return super().regime_terms()

    def _to_terms(self, feature_coef: np.ndarray) -> np.ndarray:
        """Coefficients over physical features -> over request terms, for this signature."""
        static = self._bound()[1]
        coef = np.zeros(N_TERMS)
        np.add.at(coef, static.term_index, feature_coef * static.multiplier)
        return coef


@dataclass
class HeadsAffineModel(OpModel):
    """An attention layout never profiled, predicted as a fixed combination of the own models of
    measured layouts that differ from it in query heads only: per batch, time affine in the heads
    (least squares through the peers, `weights` = [1, heads] times its pseudo-inverse, summing to 1).

    Why: at one batch the kernel's work is linear in the query heads (scores, FLOPs, Q/O bytes; KV
    reads and launches are shared), so the peers' measured times carry every batch effect the
    class regressor misses (waves, single-sequence decodes, mixed batches). Held out on the H100
    grid, Llama-3.2-3B's 24/8/128 attention from 32, 40 and 64 heads: 4.5% sdpa and 3.0% eager
    MAPE, against the class regressor's 21.0% and 10.3% (bench/attention_layouts.py).

    Each peer is evaluated at its own wave size (`with_wave_tiles`); the window and every other
    config dim are the same, so are the other request terms.

    The same form serves METHOD_HEADS_PROPORTIONAL: one head count among the peers, each weighted
    heads / its heads over their number (group.heads_affine_model); METHOD_HEADS_SHARED: per
    peer its model weighted r = heads / its heads plus the same model restricted to the work the
    heads do not scale weighted 1 - r (group.heads_shared_members); and METHOD_LAYOUT_SCALED: the
    nearest layout's model restricted to each part of its work, weighted by that part's layout
    ratio (group.layout_scaled_model)."""

    members: tuple[tuple[float, OpModel], ...] = ()

    def predict_terms(self, terms: np.ndarray) -> np.ndarray:
        out = np.zeros(len(terms))
        for weight, member in self.members:
            out += weight * member.predict_terms(with_wave_tiles(terms, member.wave_tiles))
        return out
