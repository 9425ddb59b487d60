"""Fit latency models on a snapshot, persist them beside it, load them back as a Predictor.

One model set per (platform, engine, backend, dtype) group. Inside a group:
- every profiled signature gets its own model (a one-variable curve over its measured sizes, see
  curves.py; a local non-negative linear model; for attention that model times a tabulated tree
  correction) which reproduces what was measured;
- every operation class gets a cross-signature regressor over config dims + request variables,
  used for signatures never profiled (a new hidden size) and flagged `unseen` when used.

Errors are measured, not assumed: k-fold within each signature's points for the first kind
(repeated over several random fold assignments; anything a model chooses from data is chosen on
its training folds only), k-fold grouped by signature for the second (so held-out signatures are
truly unseen), and a leave-one-model-out check that removes every signature of one model (from
its inventory) and predicts them from the rest. docs/fit.md states the protocol.

Store layout, next to the snapshot:
    models/gen-<NNNNNN>/<group>.joblib   one GroupModel per platform/engine/backend/dtype
    models/gen-<NNNNNN>/meta.json        versions, generation, per-class errors (written last)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform as platform_module
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from dooly import SCHEMA_VERSION, __version__
from dooly.errors import DoolyError
from dooly.fit.curves import alignment_candidates, fit_curve
from dooly.fit.features import (
    FAMILY_ATTENTION,
    FAMILY_MATMUL,
    N_TERMS,
    TERM_INDEX,
    StaticFeatures,
    check_request_vars,
    config_vector,
    family_of,
    local_terms,
    log_design,
    parse_point,
    physical_design,
    regime_of,
    request_from_rows,
    sm_count,
    static_features,
    term_matrix,
    var_mask_of,
    work_units,
)
from dooly.fit.regressors import (
    ATTENTION_UNSEEN_METHODS,
    LINEAR_METHODS,
    METHOD_NNLS,
    MIN_SECONDS,
    SEEN_INTERP,
    SEEN_LINEAR,
    SEEN_REGIME,
    SEEN_SCALED,
    SEEN_TREES,
    SEEN_WAVE_TREES,
    TREE_BASE_TERMS,
    UNSEEN_METHODS,
    WAVE_TREE_BASE_TERMS,
    BoundClassModel,
    ClassModel,
    CorrectedLinearModel,
    InterpModel,
    LinearModel,
    OpModel,
    RegimeLinearModel,
    fit_class_regressor,
    fit_corrected_linear,
    fit_local_linear,
    fit_regime_linear,
)
from dooly.profile.provenance import COMM_ENGINES, SHARED_BACKEND

if TYPE_CHECKING:
    import polars as pl

    from dooly.fit.predictor import Predictor
    from dooly.store.backends import Store

logger = logging.getLogger(__name__)

GROUP_COLUMNS = ("platform", "engine", "backend", "dtype")
MODELS_PREFIX = "models/"
INVENTORY_PREFIX = "inventories/"
META_NAME = "meta.json"
MODEL_SUFFIX = ".joblib"
GENERATION_DIGITS = 6
GENERATION_RE = re.compile(r"^models/gen-(\d+)/meta\.json$")
# Bumped when the persisted objects change shape; older files then fail to load with one line.
MODEL_FORMAT_VERSION = 3
STATUS_OK = "ok"
DEFAULT_FOLDS = 5
# The seen check is repeated over this many random fold assignments: one assignment moves the
# median over signatures by a few tenths of a percent (which neighbours a held-out point loses).
DEFAULT_REPEATS = 3
# A signature needs this many points for its own held-out check (k-fold leaves >= 2 to fit).
MIN_CV_POINTS = 3
# Below this many points a local linear model is not trusted; the class model is scaled instead.
MIN_LINEAR_POINTS = 3
# Per-signature trees need this many points; below, the signature's linear model is used.
MIN_LOCAL_TREE_POINTS = 30
# Tree-based candidates need enough rows to learn anything; below, they are not tried.
MIN_TREE_ROWS = 40
PERCENTILE_P90 = 90
# Relative margin within which a simpler method is preferred to a better-scoring complex one.
TIE_MARGIN = 0.05
PERCENT = 100.0
SLUG_HASH_CHARS = 8
# Request points kept per class for the step predictor's linear surrogates.
REFERENCE_POINTS = 512
SEED = 0


def _generation_prefix(generation: int) -> str:
    return f"{MODELS_PREFIX}gen-{generation:0{GENERATION_DIGITS}d}/"


def library_versions() -> dict[str, str]:
    """Versions a persisted model depends on; checked again when loading."""
    import joblib
    import sklearn

    return {
        "dooly": __version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "joblib": joblib.__version__,
        "python": platform_module.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# Training data


@dataclass
class SignatureInfo:
    signature: str
    op: str
    op_class: str
    family: str
    config_dims: dict[str, int]
    request_vars: tuple[str, ...]
    static: StaticFeatures
    units: dict[str, int] = field(default_factory=dict)  # elements per unit of each request var


@dataclass
class GroupData:
    """One group's training rows as arrays: which signature, request terms, measured seconds."""

    key: tuple[str, str, str, str]
    infos: list[SignatureInfo]
    row_sig: np.ndarray
    terms: np.ndarray
    seconds: np.ndarray
    point_keys: list[str] = field(default_factory=list)

    @property
    def row_class(self) -> np.ndarray:
        classes = np.array([info.op_class for info in self.infos], dtype=object)
        return classes[self.row_sig]


def training_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows a fit learns from: status ok, a positive median, one row per point (newest wins)."""
    import polars as pl

    if frame.height == 0:
        raise DoolyError("the snapshot holds no rows: profile something, then `dooly merge`")
    if "schema_version" in frame.columns:
        versions = sorted(set(frame.get_column("schema_version").unique().to_list()))
        if versions != [SCHEMA_VERSION]:
            raise DoolyError(
                f"the snapshot holds rows of schema version(s) {versions}; this Dooly reads "
                f"version {SCHEMA_VERSION}"
            )
    ok = frame.filter(
        (pl.col("status") == STATUS_OK)
        & pl.col("latency_median_s").is_not_null()
        & (pl.col("latency_median_s") > 0)
    )
    if ok.height == 0:
        raise DoolyError(f"the snapshot holds {frame.height} rows but none with status 'ok' to fit on")
    if "created_at" in ok.columns:
        ok = ok.sort("created_at")
    return ok.unique(subset=[*GROUP_COLUMNS, "signature", "point_key"], keep="last", maintain_order=True)


def _signature_info(
    signature: str, op: str, op_class: str, config_json: str, vars_json: str, signature_json: str = "",
    *, sms: int = 0,
) -> SignatureInfo:
    config = {str(k): int(v) for k, v in json.loads(config_json or "{}").items() if v is not None}
    request_vars = tuple(json.loads(vars_json or "[]"))
    check_request_vars(request_vars, f"signature {signature}")
    family = family_of(op_class, op)
    return SignatureInfo(
        signature=signature,
        op=op,
        op_class=op_class,
        family=family,
        config_dims=config,
        request_vars=request_vars,
        static=static_features(family, op, config, request_vars, sms),
        units=work_units(signature_json, request_vars),
    )


def group_data(frame: pl.DataFrame) -> list[GroupData]:
    """Split training rows into groups and turn each into arrays."""
    out: list[GroupData] = []
    for key, part in frame.group_by(list(GROUP_COLUMNS), maintain_order=True):
        sigs = part.unique("signature", keep="first", maintain_order=True)
        columns = ["signature", "op", "op_class", "config_dims", "request_vars"]
        if "signature_json" in sigs.columns:
            columns.append("signature_json")
        sms = sm_count(str(key[GROUP_COLUMNS.index("platform")]))
        infos = [_signature_info(*row, sms=sms) for row in sigs.select(columns).iter_rows()]
        position = {info.signature: i for i, info in enumerate(infos)}
        row_sig = np.array([position[s] for s in part.get_column("signature").to_list()], dtype=np.int64)
        windows = np.array([infos[i].static.window for i in row_sig], dtype=np.int64)
        wave_tiles = np.array([infos[i].static.wave_tiles for i in row_sig], dtype=np.float64)
        columns = {v: part.get_column(v).to_numpy() for v in ("T", "B", "K", "D")}
        request = request_from_rows(columns, part.get_column("point_key").to_list(), windows, wave_tiles)
        out.append(
            GroupData(
                key=tuple(str(k) for k in key),
                infos=infos,
                row_sig=row_sig,
                terms=term_matrix(request, part.height),
                seconds=part.get_column("latency_median_s").to_numpy().astype(np.float64),
                point_keys=part.get_column("point_key").to_list(),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Class designs and cross-validation


@dataclass
class ClassDesign:
    """Rows of one operation class with their physical and log features."""

    op_class: str
    family: str
    config_names: tuple[str, ...]
    request_vars: tuple[str, ...]
    rows: np.ndarray  # indices into the group's rows
    sig_ids: np.ndarray  # group signature index per row
    physical: np.ndarray
    logx: np.ndarray
    seconds: np.ndarray
    regimes: np.ndarray


def class_design(data: GroupData, op_class: str, rows: np.ndarray) -> ClassDesign:
    sig_ids = data.row_sig[rows]
    members = sorted(set(sig_ids.tolist()))
    infos = {i: data.infos[i] for i in members}
    names = tuple(sorted({name for info in infos.values() for name in info.config_dims}))
    vars_count = Counter(infos[i].request_vars for i in sig_ids.tolist())
    local = {i: k for k, i in enumerate(members)}
    member_idx = np.array([local[i] for i in sig_ids.tolist()], dtype=np.int64)
    term_index = np.stack([infos[i].static.term_index for i in members])[member_idx]
    multiplier = np.stack([infos[i].static.multiplier for i in members])[member_idx]
    config = np.stack([config_vector(infos[i].config_dims, names) for i in members])[member_idx]
    masks = np.stack([var_mask_of(infos[i].request_vars) for i in members])[member_idx]
    terms = data.terms[rows]
    physical = physical_design(terms, term_index, multiplier)
    return ClassDesign(
        op_class=op_class,
        family=infos[members[0]].family,
        config_names=names,
        request_vars=vars_count.most_common(1)[0][0],
        rows=rows,
        sig_ids=sig_ids,
        physical=physical,
        logx=log_design(terms, physical, config, masks),
        seconds=data.seconds[rows],
        regimes=regime_of(terms),
    )


def per_op_mape(sig_ids: np.ndarray, predicted: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Mean absolute percentage error per signature (NaN predictions are skipped)."""
    valid = np.isfinite(predicted)
    err = np.abs(predicted[valid] - seconds[valid]) / seconds[valid]
    ids = sig_ids[valid]
    if len(ids) == 0:
        return np.zeros(0)
    unique, inverse = np.unique(ids, return_inverse=True)
    return np.bincount(inverse, weights=err) / np.bincount(inverse) * PERCENT


def _summary(mape: np.ndarray) -> tuple[float | None, float | None]:
    if len(mape) == 0:
        return None, None
    return float(np.median(mape)), float(np.percentile(mape, PERCENTILE_P90))


def candidate_methods(design: ClassDesign) -> tuple[str, ...]:
    methods = ATTENTION_UNSEEN_METHODS if design.family == FAMILY_ATTENTION else UNSEEN_METHODS
    if len(design.seconds) < MIN_TREE_ROWS:
        return tuple(m for m in methods if m in LINEAR_METHODS)
    return methods


def grouped_cv(design: ClassDesign, method: str, folds: int) -> np.ndarray:
    """Held-out predictions, k-fold grouped by signature: each row predicted without its signature."""
    from sklearn.model_selection import GroupKFold

    predicted = np.full(len(design.seconds), np.nan)
    n_groups = len(np.unique(design.sig_ids))
    splitter = GroupKFold(n_splits=min(folds, n_groups))
    for train, test in splitter.split(design.physical, groups=design.sig_ids):
        model = fit_class_regressor(
            method, design.physical[train], design.logx[train], design.seconds[train], design.regimes[train]
        )
        predicted[test] = model.predict(design.physical[test], design.logx[test], design.regimes[test])
    return predicted


def _fold_ids(n: int, folds: int, repeat: int = 0) -> np.ndarray:
    """Fold of each of n points: a random permutation (seeded by the repeat) dealt into folds."""
    rng = np.random.default_rng(SEED + repeat)
    return rng.permutation(n) % min(folds, n)


def interp_method(variable: str) -> str:
    """The method name of a curve over one of a multi-variable operation's variables."""
    return f"{SEEN_INTERP}:{variable}"


def fit_seen(method: str, info: SignatureInfo, terms: np.ndarray, seconds: np.ndarray) -> OpModel | None:
    """A signature's own model from its points, or None when the points do not support `method`."""
    common = dict(
        signature=info.signature,
        op=info.op,
        op_class=info.op_class,
        family=info.family,
        request_vars=info.request_vars,
        window=info.static.window,
        wave_tiles=info.static.wave_tiles,
    )
    if method.startswith(SEEN_INTERP) and not (method.partition(":")[2] or info.request_vars):
        # Nothing of the request changes its work (a fixed-size op): a constant, the linear
        # model's intercept.
        method = SEEN_LINEAR
    if method.startswith(SEEN_INTERP):
        variable = method.partition(":")[2] or info.request_vars[0]
        candidates = alignment_candidates(info.units.get(variable, 1), info.family == FAMILY_MATMUL)
        curve = fit_curve(terms[:, TERM_INDEX[variable]], seconds, candidates)
        if curve is None:
            return None
        return InterpModel(method=method, variable=variable, curve=curve, **common)
    if len(seconds) < MIN_LINEAR_POINTS:
        return None
    names = local_terms(info.family, info.request_vars)
    if method == SEEN_REGIME:
        return RegimeLinearModel(
            method=SEEN_REGIME, regime_coef=fit_regime_linear(terms, seconds, names), **common
        )
    if method in (SEEN_TREES, SEEN_WAVE_TREES) and len(seconds) >= MIN_LOCAL_TREE_POINTS:
        base = TREE_BASE_TERMS if method == SEEN_TREES else WAVE_TREE_BASE_TERMS
        coef, tables = fit_corrected_linear(terms, seconds, base)
        return CorrectedLinearModel(method=method, coef=coef, tables=tables, **common)
    return LinearModel(method=SEEN_LINEAR, coef=fit_local_linear(terms, seconds, names), **common)


def seen_methods(info: SignatureInfo) -> tuple[str, ...]:
    """Candidates for a profiled signature, simplest first."""
    if info.family == FAMILY_ATTENTION:
        return (SEEN_LINEAR, SEEN_REGIME, SEEN_TREES, SEEN_WAVE_TREES)
    if len(info.request_vars) == 1:
        return (SEEN_INTERP, SEEN_LINEAR)
    return (SEEN_LINEAR, *(interp_method(v) for v in info.request_vars))


def seen_cv(
    method: str, info: SignatureInfo, terms: np.ndarray, seconds: np.ndarray, folds: int, repeats: int = 1
) -> np.ndarray:
    """Held-out predictions for one signature's points, k-fold within the signature, `repeats`
    times over different random folds: shape (repeats, points). A point is never used to fit its
    own prediction (nor to choose anything that predicts it: see fit_curve)."""
    predicted = np.full((repeats, len(seconds)), np.nan)
    if len(seconds) < MIN_CV_POINTS:
        return predicted
    for repeat in range(repeats):
        fold_of = _fold_ids(len(seconds), folds, repeat)
        for fold in np.unique(fold_of):
            test = fold_of == fold
            model = fit_seen(method, info, terms[~test], seconds[~test])
            if model is not None:
                predicted[repeat, test] = model.predict_terms(terms[test])
    return predicted


# ---------------------------------------------------------------------------------------------
# Fitting one group


@dataclass
class GroupModel:
    """Everything a Predictor needs for one platform/engine/backend/dtype."""

    platform: str
    engine: str
    backend: str
    dtype: str
    generation: int
    classes: dict[str, ClassModel]
    signatures: dict[str, OpModel]
    reports: list[dict[str, Any]] = field(default_factory=list)


def bind_class_model(
    cm: ClassModel, info: SignatureInfo, factor: float = 1.0, method: str = ""
) -> BoundClassModel:
    return BoundClassModel(
        signature=info.signature,
        op=info.op,
        op_class=info.op_class,
        family=info.family,
        request_vars=info.request_vars,
        window=info.static.window,
        wave_tiles=info.static.wave_tiles,
        method=method or cm.regressor.method,
        model=cm,
        static=info.static,
        config=config_vector(info.config_dims, cm.config_names),
        var_mask=var_mask_of(info.request_vars),
        factor=factor,
    )


def _preferred(scores: dict[str, float | None]) -> str:
    """The first method (in order of preference: simpler, faster first) whose held-out median is
    within TIE_MARGIN of the best; differences smaller than that are noise, not skill."""
    valid = {m: v for m, v in scores.items() if v is not None and np.isfinite(v)}
    if not valid:
        return next(iter(scores))
    best = min(valid.values())
    return next(m for m, v in valid.items() if v <= best * (1.0 + TIE_MARGIN))


def reference_points(data: GroupData, design: ClassDesign) -> tuple[list, np.ndarray]:
    """The class's distinct measured request points (evenly thinned to REFERENCE_POINTS): the
    per-sequence batches for attention (terms depend on each op's window), else request terms.
    A step predictor fits fast linear surrogates of non-linear class models on them."""
    keys: dict[str, int] = {}
    for row in design.rows.tolist():
        keys.setdefault(data.point_keys[row], row)
    chosen = list(keys.items())
    if len(chosen) > REFERENCE_POINTS:
        chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, REFERENCE_POINTS).astype(int)]
    if design.family == FAMILY_ATTENTION:
        seqs = [parse_point(key).get("seqs") for key, _ in chosen]
        return [s for s in seqs if s], np.zeros((0, N_TERMS))
    return [], data.terms[[row for _, row in chosen]]


def fit_class(design: ClassDesign, method: str, data: GroupData | None = None) -> ClassModel:
    regressor = fit_class_regressor(method, design.physical, design.logx, design.seconds, design.regimes)
    seqs, terms = reference_points(data, design) if data is not None else ([], np.zeros((0, N_TERMS)))
    return ClassModel(
        op_class=design.op_class,
        family=design.family,
        config_names=design.config_names,
        request_vars=design.request_vars,
        regressor=regressor,
        reference_seqs=seqs,
        reference_terms=terms,
    )


def heldout_pct(predicted: np.ndarray, seconds: np.ndarray) -> float:
    """Mean absolute percentage error of an op's held-out predictions (any shape whose last axis
    is its points; NaN entries, never predicted, are skipped); NaN when none was predicted."""
    error = np.abs(predicted / seconds - 1.0)
    valid = np.isfinite(error)
    return float(np.mean(error[valid]) * PERCENT) if valid.any() else float("nan")


def _finite_median(values: np.ndarray) -> float | None:
    valid = values[np.isfinite(values)]
    return float(np.median(valid)) if len(valid) else None


def validation_text(folds: int, repeats: int) -> str:
    """The held-out protocol, as reports state it."""
    again = f", repeated {repeats} times over different random folds" if repeats > 1 else ""
    return (
        f"{folds}-fold cross-validation{again} (seen: folds of each signature's points; unseen: "
        f"folds of whole signatures)"
    )


def choose_seen_method(
    data: GroupData, by_sig: dict[int, np.ndarray], folds: int, repeats: int
) -> tuple[str, dict[str, np.ndarray]]:
    """The per-signature method of one class (the candidate with the lowest held-out median over
    its signatures, simpler ones preferred on ties) and every candidate's held-out per-op MAPE,
    one value per signature of `by_sig` (its index -> its rows), NaN where not evaluated."""
    options = seen_methods(data.infos[next(iter(by_sig))])
    scores = {
        method: np.array(
            [
                heldout_pct(
                    seen_cv(method, data.infos[i], data.terms[r], data.seconds[r], folds, repeats),
                    data.seconds[r],
                )
                for i, r in by_sig.items()
            ]
        )
        for method in options
    }
    return _preferred({m: _finite_median(v) for m, v in scores.items()}), scores


def fit_group(data: GroupData, *, folds: int, generation: int, repeats: int = DEFAULT_REPEATS) -> GroupModel:
    """Class regressors (method chosen by grouped k-fold) and per-signature models for one group."""
    platform_name, engine, backend, dtype = data.key
    row_class = data.row_class
    classes: dict[str, ClassModel] = {}
    signatures: dict[str, OpModel] = {}
    reports: list[dict[str, Any]] = []
    for op_class in sorted(set(row_class.tolist())):
        rows = np.flatnonzero(row_class == op_class)
        design = class_design(data, op_class, rows)
        n_sigs = len(np.unique(design.sig_ids))
        # Cross-signature regressor: pick the candidate with the lowest grouped k-fold median.
        scores: dict[str, dict[str, float | None]] = {}
        unseen_method = METHOD_NNLS
        unseen_summary: tuple[float | None, float | None] = (None, None)
        if n_sigs >= 2:
            for method in candidate_methods(design):
                mape = per_op_mape(design.sig_ids, grouped_cv(design, method, folds), design.seconds)
                median, p90 = _summary(mape)
                scores[method] = {"median_pct": median, "p90_pct": p90}
            unseen_method = _preferred({m: v["median_pct"] for m, v in scores.items()})
            unseen_summary = (scores[unseen_method]["median_pct"], scores[unseen_method]["p90_pct"])
        class_model = fit_class(design, unseen_method, data)
        classes[op_class] = class_model
        # Per-signature models: pick the method with the lowest within-signature k-fold median.
        members = sorted(set(design.sig_ids.tolist()))
        by_sig = {i: rows[design.sig_ids == i] for i in members}
        seen_method, seen_scores = choose_seen_method(data, by_sig, folds, repeats)
        scaled = 0
        for i, r in by_sig.items():
            info = data.infos[i]
            model = fit_seen(seen_method, info, data.terms[r], data.seconds[r])
            if model is None:
                bound = bind_class_model(class_model, info)
                ratio = data.seconds[r] / np.maximum(bound.predict_terms(data.terms[r]), MIN_SECONDS)
                model = bind_class_model(
                    class_model, info, float(np.exp(np.median(np.log(ratio)))), SEEN_SCALED
                )
                scaled += 1
            signatures[info.signature] = model
        chosen = seen_scores[seen_method]
        evaluated = np.isfinite(chosen)
        seen_median, seen_p90 = _summary(chosen[evaluated])
        reports.append(
            {
                "op_class": op_class,
                "family": design.family,
                "points": int(len(rows)),
                "signatures": n_sigs,
                "seen_method": seen_method,
                "seen_mape_median_pct": seen_median,
                "seen_mape_p90_pct": seen_p90,
                "seen_evaluated": int(evaluated.sum()),
                "seen_scaled": scaled,
                "seen_candidates": {m: _finite_median(v) for m, v in seen_scores.items()},
                "seen_mape_by_signature": {
                    data.infos[i].signature: float(v)
                    for i, v in zip(members, chosen, strict=True)
                    if np.isfinite(v)
                },
                "unseen_method": unseen_method,
                "unseen_mape_median_pct": unseen_summary[0],
                "unseen_mape_p90_pct": unseen_summary[1],
                "unseen_candidates": scores,
                "validation": validation_text(folds, repeats),
            }
        )
        logger.info(
            "fitted %s / %s: %d points, %d signatures", "/".join(data.key), op_class, len(rows), n_sigs
        )
    return GroupModel(
        platform=platform_name,
        engine=engine,
        backend=backend,
        dtype=dtype,
        generation=generation,
        classes=classes,
        signatures=signatures,
        reports=reports,
    )


# ---------------------------------------------------------------------------------------------
# Leave one model out


def leave_one_model_out(
    datas: list[GroupData], models: dict[tuple[str, ...], GroupModel], inventories: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """For each model (inventory): drop its signatures, refit the class regressors on the rest
    with the methods chosen for the full fit, predict its measured points; report per-op MAPE
    beside the in-sample MAPE of the same regressors fitted with the model's data included."""
    out: list[dict[str, Any]] = []
    for model_key, inventory in sorted(inventories_by_model(inventories).items()):
        held = {op["signature"] for op in inventory.get("operations", [])}
        for data in datas:
            held_ids = np.array(
                [i for i, info in enumerate(data.infos) if info.signature in held], dtype=np.int64
            )
            if len(held_ids) == 0:
                continue
            group = models[data.key]
            row_held = np.isin(data.row_sig, held_ids)
            row_class = data.row_class
            lomo_parts: list[np.ndarray] = []
            insample_parts: list[np.ndarray] = []
            uncovered: set[str] = set()
            points = 0
            for op_class in sorted(set(row_class[row_held].tolist())):
                rows = np.flatnonzero(row_class == op_class)
                design = class_design(data, op_class, rows)
                test = row_held[rows]
                points += int(test.sum())
                class_model = group.classes[op_class]
                insample = class_model.regressor.predict(
                    design.physical[test], design.logx[test], design.regimes[test]
                )
                insample_parts.append(per_op_mape(design.sig_ids[test], insample, design.seconds[test]))
                if test.all():
                    uncovered.update(data.infos[i].signature for i in np.unique(design.sig_ids))
                    continue
                method = class_model.regressor.method
                if (~test).sum() < MIN_TREE_ROWS and method not in LINEAR_METHODS:
                    method = METHOD_NNLS
                train = ~test
                regressor = fit_class_regressor(
                    method,
                    design.physical[train],
                    design.logx[train],
                    design.seconds[train],
                    design.regimes[train],
                )
                predicted = regressor.predict(design.physical[test], design.logx[test], design.regimes[test])
                lomo_parts.append(per_op_mape(design.sig_ids[test], predicted, design.seconds[test]))
            lomo = np.concatenate(lomo_parts) if lomo_parts else np.zeros(0)
            insample_all = np.concatenate(insample_parts) if insample_parts else np.zeros(0)
            lomo_median, lomo_p90 = _summary(lomo)
            insample_median, insample_p90 = _summary(insample_all)
            out.append(
                {
                    "model_key": model_key,
                    "model_id": inventory.get("model_id", model_key),
                    **dict(zip(GROUP_COLUMNS, data.key, strict=True)),
                    "ops_measured": int(len(held_ids)),
                    "ops_predicted": int(len(lomo)),
                    "ops_uncovered": len(uncovered),
                    "points": points,
                    "lomo_mape_median_pct": lomo_median,
                    "lomo_mape_p90_pct": lomo_p90,
                    "in_sample_mape_median_pct": insample_median,
                    "in_sample_mape_p90_pct": insample_p90,
                }
            )
    return sorted(out, key=lambda row: (str(row["model_id"]), *(row[c] for c in GROUP_COLUMNS)))


# ---------------------------------------------------------------------------------------------
# Whole snapshot


@dataclass
class FitReport:
    """What `dooly fit` did: per-group, per-class errors, the error over every profiled
    signature, and the leave-one-model-out check."""

    generation: int
    folds: int
    groups: list[dict[str, Any]]
    lomo: list[dict[str, Any]]
    versions: dict[str, str]
    repeats: int = DEFAULT_REPEATS
    meta_key: str = ""

    @property
    def overall(self) -> dict[str, Any]:
        """Held-out per-op MAPE over every profiled signature of every group (each counted once:
        backend-independent ops live in the shared group), with the seen models fitted."""
        errors = np.array(
            [
                value
                for group in self.groups
                for row in group["classes"]
                for value in row.get("seen_mape_by_signature", {}).values()
            ]
        )
        median, p90 = _summary(errors)
        return {"signatures": int(len(errors)), "seen_mape_median_pct": median, "seen_mape_p90_pct": p90}

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "folds": self.folds,
            "repeats": self.repeats,
            "validation": validation_text(self.folds, self.repeats),
            "overall": self.overall,
            "groups": self.groups,
            "leave_one_model_out": self.lomo,
            "versions": self.versions,
            "meta_key": self.meta_key,
        }


def fit_frame(
    frame: pl.DataFrame,
    *,
    generation: int,
    inventories: dict[str, dict[str, Any]] | None = None,
    folds: int = DEFAULT_FOLDS,
    repeats: int = DEFAULT_REPEATS,
) -> tuple[dict[tuple[str, ...], GroupModel], FitReport]:
    """Fit every group of a snapshot frame (no store involved: the testable core of `fit_store`)."""
    if folds < 2:
        raise DoolyError(f"--folds must be at least 2 (got {folds})")
    if repeats < 1:
        raise DoolyError(f"--repeats must be at least 1 (got {repeats})")
    datas = group_data(training_rows(frame))
    models = {
        data.key: fit_group(data, folds=folds, generation=generation, repeats=repeats) for data in datas
    }
    lomo = leave_one_model_out(datas, models, inventories or {})
    groups = [
        {**dict(zip(GROUP_COLUMNS, key, strict=True)), "classes": model.reports}
        for key, model in models.items()
    ]
    return models, FitReport(
        generation=generation,
        folds=folds,
        groups=groups,
        lomo=lomo,
        versions=library_versions(),
        repeats=repeats,
    )


def group_slug(key: tuple[str, ...]) -> str:
    """A readable, collision-free object name for a group (backends hold "|", platforms spaces)."""
    readable = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part) for part in key)
    digest = hashlib.sha256("\x00".join(key).encode()).hexdigest()[:SLUG_HASH_CHARS]
    return f"{readable}-{digest}"


def serialize_group(model: GroupModel, versions: dict[str, str]) -> bytes:
    import joblib

    buffer = io.BytesIO()
    joblib.dump({"format": MODEL_FORMAT_VERSION, "versions": versions, "group": model}, buffer)
    return buffer.getvalue()


def read_inventories(store: Store) -> dict[str, dict[str, Any]]:
    """Every inventory document of the store (inventories/<model_key>[/<backend>].json), by key."""
    from dooly.store.shards import read_json

    found: dict[str, dict[str, Any]] = {}
    for key in store.list_keys(INVENTORY_PREFIX):
        if not key.endswith(".json"):
            continue
        payload = read_json(store, key)
        if isinstance(payload, dict) and isinstance(payload.get("operations"), list):
            found[key[len(INVENTORY_PREFIX) : -len(".json")]] = payload
    return found


def inventories_by_model(inventories: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per model: the union of the operations of its inventories (one per backend)."""
    merged: dict[str, dict[str, Any]] = {}
    for key, inventory in sorted(inventories.items()):
        model = str(inventory.get("model_key") or inventory.get("model_id") or key)
        entry = merged.setdefault(model, {"model_id": inventory.get("model_id", model), "operations": []})
        entry["operations"] = entry["operations"] + list(inventory.get("operations", []))
    return merged


def fit_store(store: Store, *, folds: int = DEFAULT_FOLDS, repeats: int = DEFAULT_REPEATS) -> FitReport:
    """Fit the store's current snapshot and persist the models under models/gen-<generation>/.

    All model files are serialised before anything is written, and meta.json (what readers look
    for) is written last; a failure while writing removes what this call wrote.
    """
    from dooly.store.merge import read_snapshot
    from dooly.store.shards import write_json

    frame, manifest = read_snapshot(store)
    manifest_version = manifest.get("schema_version", SCHEMA_VERSION)
    if manifest_version != SCHEMA_VERSION:
        raise DoolyError(
            f"store {store.uri}: snapshot of schema version {manifest_version}; this Dooly reads "
            f"version {SCHEMA_VERSION}"
        )
    generation = int(manifest["generation"])
    inventories = read_inventories(store)
    models, report = fit_frame(
        frame, generation=generation, inventories=inventories, folds=folds, repeats=repeats
    )
    prefix = _generation_prefix(generation)
    blobs = {
        f"{prefix}{group_slug(key)}{MODEL_SUFFIX}": serialize_group(m, report.versions)
        for key, m in models.items()
    }
    meta_key = f"{prefix}{META_NAME}"
    meta = {
        "format": MODEL_FORMAT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "generation": generation,
        "created_at": datetime.now(UTC).isoformat(),
        "versions": report.versions,
        "folds": folds,
        "repeats": repeats,
        "overall": report.overall,
        "inventories": sorted(inventories),
        "groups": [{**g, "key": key} for g, key in zip(report.groups, blobs, strict=True)],
        "leave_one_model_out": report.lomo,
    }
    written: list[str] = []
    try:
        if store.exists(meta_key):
            store.delete(meta_key)
        for key, blob in blobs.items():
            store.put_bytes(key, blob)
            written.append(key)
        write_json(store, meta_key, meta)
    except BaseException:
        for key in written:
            store.delete(key)
        raise
    report.meta_key = meta_key
    return report


# ---------------------------------------------------------------------------------------------
# Loading


def latest_meta_key(store: Store) -> str:
    keys = [k for k in store.list_keys(MODELS_PREFIX) if GENERATION_RE.match(k)]
    if not keys:
        raise DoolyError(
            f"store {store.uri} holds no fitted models: run `dooly fit --store {store.uri}` first"
        )
    return max(keys, key=lambda k: int(GENERATION_RE.match(k).group(1)))


def check_versions(meta: dict[str, Any], where: str) -> None:
    """Refuse models persisted by another scikit-learn (pickles are not portable across versions)
    or another model format; one line that says how to fix it."""
    import sklearn

    if meta.get("format") != MODEL_FORMAT_VERSION:
        raise DoolyError(
            f"{where}: model format {meta.get('format')}, this Dooly reads {MODEL_FORMAT_VERSION}: "
            f"run `dooly fit` again"
        )
    fitted_with = meta.get("versions", {}).get("scikit-learn")
    if fitted_with != sklearn.__version__:
        raise DoolyError(
            f"{where}: fitted with scikit-learn {fitted_with}, this is scikit-learn "
            f"{sklearn.__version__}: run `dooly fit` again with this one"
        )


def load_group(
    store: Store, *, platform: str, engine: str, backend: str, dtype: str
) -> tuple[GroupModel, dict[str, Any]]:
    import joblib

    from dooly.store.shards import read_json

    meta_key = latest_meta_key(store)
    meta = read_json(store, meta_key)
    if not isinstance(meta, dict):
        raise DoolyError(f"store {store.uri}: {meta_key} is unreadable")
    check_versions(meta, f"models in {store.uri}/{meta_key}")
    wanted = {"platform": platform, "engine": engine, "backend": backend, "dtype": dtype}
    for entry in meta.get("groups", []):
        if all(entry.get(k) == v for k, v in wanted.items()):
            try:
                payload = joblib.load(io.BytesIO(store.get_bytes(entry["key"])))
            except FileNotFoundError as exc:
                raise DoolyError(
                    f"store {store.uri}: {entry['key']} listed in {meta_key} is missing"
                ) from exc
            except Exception as exc:
                raise DoolyError(f"store {store.uri}: cannot load {entry['key']}: {exc}") from exc
            check_versions(
                {"format": payload.get("format"), "versions": payload.get("versions", {})}, entry["key"]
            )
            return payload["group"], meta
    fitted = sorted({"/".join(str(e.get(k)) for k in GROUP_COLUMNS) for e in meta.get("groups", [])})
    for name, value in wanted.items():
        known = sorted({str(e.get(name)) for e in meta.get("groups", [])})
        if value not in known:
            raise DoolyError(
                f"no fitted models for {name} {value!r} in {store.uri}; known: {', '.join(known)}"
            )
    raise DoolyError(
        f"no fitted models for {platform}/{engine}/{backend}/{dtype} in {store.uri}; "
        f"fitted: {', '.join(fitted)}"
    )


def load_predictor(
    store: Store, *, platform: str, engine: str, backend: str, dtype: str, interconnect: str | None = None
) -> Predictor:
    """The newest fitted models of one platform/engine/backend/dtype, ready to predict.

    The backend-independent ops (backend "any") and the collectives measured on this platform
    (engine nccl or gloo, backend = interconnect topology label) are merged in; `interconnect`
    picks the topology where the store holds several."""
    from dooly.fit.predictor import Predictor

    group, meta = load_group(store, platform=platform, engine=engine, backend=backend, dtype=dtype)
    if backend != SHARED_BACKEND:
        try:
            shared, _ = load_group(store, platform=platform, engine=engine, backend=SHARED_BACKEND, dtype=dtype)
        except DoolyError:
            shared = None
        if shared is not None:
            group = with_shared_ops(group, shared)
    comm = _collective_group(meta, platform=platform, dtype=dtype, interconnect=interconnect)
    if comm is not None:
        collectives, _ = load_group(store, platform=platform, engine=comm[0], backend=comm[1], dtype=dtype)
        group = with_shared_ops(group, collectives)
    return Predictor(group, meta)


def collective_groups(meta: dict[str, Any], *, platform: str, dtype: str) -> list[tuple[str, str]]:
    """(communication engine, interconnect label) of the collective groups fitted for a platform."""
    return sorted(
        {
            (str(entry.get("engine")), str(entry.get("backend")))
            for entry in meta.get("groups", [])
            if entry.get("engine") in COMM_ENGINES and entry.get("platform") == platform and entry.get("dtype") == dtype
        }
    )


def _collective_group(
    meta: dict[str, Any], *, platform: str, dtype: str, interconnect: str | None
) -> tuple[str, str] | None:
    found = collective_groups(meta, platform=platform, dtype=dtype)
    if interconnect:
        chosen = [g for g in found if g[1] == interconnect]
        if not chosen:
            known = ", ".join(label for _, label in found) or "none"
            raise DoolyError(
                f"no collectives fitted for interconnect {interconnect!r} on {platform}/{dtype}; known: {known}"
            )
        return chosen[0]
    if len(found) > 1:
        labels = ", ".join(f"{label} ({engine})" for engine, label in found)
        raise DoolyError(
            f"collectives of several interconnects are fitted for {platform}/{dtype}: {labels}; "
            f"choose one with --interconnect"
        )
    return found[0] if found else None


def with_shared_ops(group: GroupModel, shared: GroupModel) -> GroupModel:
    """A backend's models plus the backend-independent ones: the profiler stores every op but
    attention once per platform, under the backend "any" (profile/provenance.py)."""
    return GroupModel(
        platform=group.platform,
        engine=group.engine,
        backend=group.backend,
        dtype=group.dtype,
        generation=group.generation,
        classes={**shared.classes, **group.classes},
        signatures={**shared.signatures, **group.signatures},
        reports=shared.reports + group.reports,
    )
