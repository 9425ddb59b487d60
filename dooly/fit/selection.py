"""Fitting one group and measuring its errors: held-out checks, the choice of method, the models.

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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dooly.errors import DoolyError
from dooly.fit.curves import alignment_candidates, fit_curve
from dooly.fit.extent import MeasuredExtent, signature_extent
from dooly.fit.features import (
    FAMILY_ATTENTION,
    FAMILY_MATMUL,
    N_TERMS,
    TERM_INDEX,
    local_terms,
    parse_point,
)
from dooly.fit.group import GroupModel, bind_class_model
from dooly.fit.parallel import TaskRunner
from dooly.fit.regressors import (
    ATTENTION_UNSEEN_METHODS,
    LINEAR_METHODS,
    METHOD_GBT,
    METHOD_NNLS,
    METHOD_NNLS_GBT,
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
    ClassModel,
    ClassRegressor,
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
from dooly.fit.report import FitReport, library_versions, summarize, validation_text
from dooly.fit.training import (
    GROUP_COLUMNS,
    ClassDesign,
    GroupData,
    SignatureInfo,
    class_design,
    group_data,
    training_rows,
)

if TYPE_CHECKING:
    import polars as pl

logger = logging.getLogger(__name__)

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
# Relative margin within which a simpler method is preferred to a better-scoring complex one.
TIE_MARGIN = 0.05
PERCENT = 100.0
# Request points kept per class for the step predictor's linear surrogates.
REFERENCE_POINTS = 512
SEED = 0
# Per point and fit, trees cost about this many times a curve or a linear model (a guess from an
# H100 profile, used only to hand the largest pieces of work out first).
TREE_COST_FACTOR = 4.0


def per_op_mape(sig_ids: np.ndarray, predicted: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Mean absolute percentage error per signature (NaN predictions are skipped)."""
    valid = np.isfinite(predicted)
    err = np.abs(predicted[valid] - seconds[valid]) / seconds[valid]
    ids = sig_ids[valid]
    if len(ids) == 0:
        return np.zeros(0)
    unique, inverse = np.unique(ids, return_inverse=True)
    return np.bincount(inverse, weights=err) / np.bincount(inverse) * PERCENT


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
    common = info.model_fields()
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
    return class_model_of(design, regressor, data)


def class_model_of(design: ClassDesign, regressor: ClassRegressor, data: GroupData | None = None) -> ClassModel:
    """A class's fitted regressor with what it needs to bind any signature of the class."""
    seqs, terms = reference_points(data, design) if data is not None else ([], np.zeros((0, N_TERMS)))
    layouts = {}
    if data is not None and design.family == FAMILY_ATTENTION:
        layouts = {data.infos[i].signature: dict(data.infos[i].config_dims) for i in sorted(set(design.sig_ids.tolist()))}
    return ClassModel(
        op_class=design.op_class,
        family=design.family,
        config_names=design.config_names,
        request_vars=design.request_vars,
        regressor=regressor,
        reference_seqs=seqs,
        reference_terms=terms,
        layouts=layouts,
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


def seen_heldout_pct(
    method: str, info: SignatureInfo, terms: np.ndarray, seconds: np.ndarray, folds: int, repeats: int
) -> float:
    """One signature's held-out MAPE under `method` (see seen_cv): one piece of a fit's work."""
    return heldout_pct(seen_cv(method, info, terms, seconds, folds, repeats), seconds)


def unseen_heldout_mape(design: ClassDesign, method: str, folds: int) -> np.ndarray:
    """Per-op MAPE of a class regressor `method` under the grouped k-fold (see grouped_cv)."""
    return per_op_mape(design.sig_ids, grouped_cv(design, method, folds), design.seconds)


def _piece_cost(method: str, rows: int, fits: int) -> float:
    """A rough relative cost of `fits` fits of `method` on `rows` points, only to hand the
    largest pieces out first (TaskRunner): trees cost about TREE_COST_FACTOR times a curve or a
    linear fit per point."""
    tree = method in (SEEN_TREES, SEEN_WAVE_TREES, METHOD_NNLS_GBT, METHOD_GBT)
    return float(rows * fits) * (TREE_COST_FACTOR if tree else 1.0)


@dataclass
class _ClassPlan:
    """One class of one group: its design, its signatures' rows and the candidates to check."""

    group: int
    op_class: str
    rows: np.ndarray
    design: ClassDesign
    n_sigs: int
    unseen_candidates: tuple[str, ...]
    by_sig: dict[int, np.ndarray]
    seen_candidates: tuple[str, ...]


def _plan_group(index: int, data: GroupData) -> list[_ClassPlan]:
    row_class = data.row_class
    plans = []
    for op_class in sorted(set(row_class.tolist())):
        rows = np.flatnonzero(row_class == op_class)
        design = class_design(data, op_class, rows)
        members = sorted(set(design.sig_ids.tolist()))
        n_sigs = len(members)
        by_sig = {i: rows[design.sig_ids == i] for i in members}
        plans.append(
            _ClassPlan(
                group=index,
                op_class=op_class,
                rows=rows,
                design=design,
                n_sigs=n_sigs,
                unseen_candidates=candidate_methods(design) if n_sigs >= 2 else (),
                by_sig=by_sig,
                seen_candidates=seen_methods(data.infos[members[0]]),
            )
        )
    return plans


def choose_seen_method(
    data: GroupData, by_sig: dict[int, np.ndarray], folds: int, repeats: int, runner: TaskRunner | None = None
) -> tuple[str, dict[str, np.ndarray]]:
    """The per-signature method of one class (the candidate with the lowest held-out median over
    its signatures, simpler ones preferred on ties) and every candidate's held-out per-op MAPE,
    one value per signature of `by_sig` (its index -> its rows), NaN where not evaluated."""
    options = seen_methods(data.infos[next(iter(by_sig))])
    pieces = [
        (method, data.infos[i], data.terms[r], data.seconds[r], folds, repeats)
        for method in options
        for i, r in by_sig.items()
    ]
    values = (runner or TaskRunner()).map(seen_heldout_pct, pieces)
    return _seen_choice(options, len(by_sig), values)


def _seen_choice(
    options: tuple[str, ...], n_sigs: int, values: list[float]
) -> tuple[str, dict[str, np.ndarray]]:
    """choose_seen_method's answer from the held-out MAPEs, method-major (options x signatures)."""
    scores = {
        method: np.array(values[k * n_sigs : (k + 1) * n_sigs], dtype=np.float64)
        for k, method in enumerate(options)
    }
    return _preferred({m: _finite_median(v) for m, v in scores.items()}), scores


def fit_group(
    data: GroupData, *, folds: int, generation: int, repeats: int = DEFAULT_REPEATS, runner: TaskRunner | None = None
) -> GroupModel:
    """Class regressors (method chosen by grouped k-fold) and per-signature models for one group."""
    return fit_groups([data], folds=folds, generation=generation, repeats=repeats, runner=runner)[data.key]


def fit_groups(
    datas: list[GroupData],
    *,
    folds: int,
    generation: int,
    repeats: int = DEFAULT_REPEATS,
    runner: TaskRunner | None = None,
) -> dict[tuple[str, str, str, str], GroupModel]:
    """fit_group for every group, in two rounds of independent pieces handed to `runner`: every
    held-out check of every class and candidate (most of a fit's time), then, with the methods
    chosen, the final fits. The pieces, and so the models and reports, are those of a fit one
    class after another."""
    runner = runner or TaskRunner()
    plans = [plan for index, data in enumerate(datas) for plan in _plan_group(index, data)]
    # Round 1: held-out checks.
    unseen_pieces = [
        (plan.design, method, folds) for plan in plans for method in plan.unseen_candidates
    ]
    seen_pieces = [
        (method, datas[plan.group].infos[i], datas[plan.group].terms[r], datas[plan.group].seconds[r], folds, repeats)
        for plan in plans
        for method in plan.seen_candidates
        for i, r in plan.by_sig.items()
    ]
    checks = runner.map(
        _check_piece,
        [("unseen", piece) for piece in unseen_pieces] + [("seen", piece) for piece in seen_pieces],
        [_piece_cost(p[1], len(p[0].seconds), folds) for p in unseen_pieces]
        + [_piece_cost(p[0], len(p[3]), folds * repeats) for p in seen_pieces],
    )
    unseen_results = iter([np.asarray(mape) for mape in checks[: len(unseen_pieces)]])
    seen_results = iter([float(pct) for pct in checks[len(unseen_pieces) :]])
    chosen: list[tuple[str, dict[str, dict[str, float | None]], str, dict[str, np.ndarray]]] = []
    for plan in plans:
        scores: dict[str, dict[str, float | None]] = {}
        for method in plan.unseen_candidates:
            median, p90 = summarize(next(unseen_results))
            scores[method] = {"median_pct": median, "p90_pct": p90}
        unseen_method = _preferred({m: v["median_pct"] for m, v in scores.items()}) if scores else METHOD_NNLS
        values = [next(seen_results) for _ in range(len(plan.seen_candidates) * len(plan.by_sig))]
        seen_method, seen_scores = _seen_choice(plan.seen_candidates, len(plan.by_sig), values)
        chosen.append((unseen_method, scores, seen_method, seen_scores))
    # Round 2: final fits with the chosen methods.
    class_pieces = [
        (method, plan.design.physical, plan.design.logx, plan.design.seconds, plan.design.regimes)
        for plan, (method, _, _, _) in zip(plans, chosen, strict=True)
    ]
    final_pieces = [
        (seen_method, datas[plan.group].infos[i], datas[plan.group].terms[r], datas[plan.group].seconds[r])
        for plan, (_, _, seen_method, _) in zip(plans, chosen, strict=True)
        for i, r in plan.by_sig.items()
    ]
    finals = runner.map(
        _final_piece,
        [("class", piece) for piece in class_pieces] + [("seen", piece) for piece in final_pieces],
        [_piece_cost(p[0], len(p[3]), 1) for p in class_pieces] + [_piece_cost(p[0], len(p[3]), 1) for p in final_pieces],
    )
    regressors = iter(finals[: len(class_pieces)])
    seen_models = iter(finals[len(class_pieces) :])
    built: dict[int, tuple[dict[str, ClassModel], dict[str, OpModel], list[dict[str, Any]]]] = {
        index: ({}, {}, []) for index in range(len(datas))
    }
    extents: dict[int, dict[str, MeasuredExtent]] = {index: {} for index in range(len(datas))}
    for plan, (unseen_method, scores, seen_method, seen_scores) in zip(plans, chosen, strict=True):
        data = datas[plan.group]
        classes, signatures, reports = built[plan.group]
        regressor = next(regressors)
        assert isinstance(regressor, ClassRegressor)
        class_model = class_model_of(plan.design, regressor, data)
        classes[plan.op_class] = class_model
        scaled = 0
        for i, r in plan.by_sig.items():
            info = data.infos[i]
            model = next(seen_models)
            assert model is None or isinstance(model, OpModel)
            if model is None:
                bound = bind_class_model(class_model, info)
                ratio = data.seconds[r] / np.maximum(bound.predict_terms(data.terms[r]), MIN_SECONDS)
                model = bind_class_model(
                    class_model, info, float(np.exp(np.median(np.log(ratio)))), SEEN_SCALED
                )
                scaled += 1
            signatures[info.signature] = model
            extents[plan.group][info.signature] = signature_extent(
                info.family, info.request_vars, data.terms[r], [data.point_keys[j] for j in r.tolist()]
            )
        reports.append(
            _class_report(plan, data, folds, repeats, (unseen_method, scores), (seen_method, seen_scores), scaled)
        )
        logger.info(
            "fitted %s / %s: %d points, %d signatures", "/".join(data.key), plan.op_class, len(plan.rows), plan.n_sigs
        )
    models = {}
    for index, data in enumerate(datas):
        platform_name, engine, backend, dtype = data.key
        classes, signatures, reports = built[index]
        models[data.key] = GroupModel(
            platform=platform_name,
            engine=engine,
            backend=backend,
            dtype=dtype,
            generation=generation,
            classes=classes,
            signatures=signatures,
            reports=reports,
            extents=extents[index],
        )
    return models


def _check_piece(kind: str, piece: tuple[Any, ...]) -> float | np.ndarray:
    """One held-out check of fit_groups' first round (a top-level function: it runs in workers)."""
    return unseen_heldout_mape(*piece) if kind == "unseen" else seen_heldout_pct(*piece)


def _final_piece(kind: str, piece: tuple[Any, ...]) -> ClassRegressor | OpModel | None:
    """One final fit of fit_groups' second round: a class regressor or a signature's own model."""
    return fit_class_regressor(*piece) if kind == "class" else fit_seen(*piece)


def _class_report(
    plan: _ClassPlan,
    data: GroupData,
    folds: int,
    repeats: int,
    unseen: tuple[str, dict[str, dict[str, float | None]]],
    seen: tuple[str, dict[str, np.ndarray]],
    scaled: int,
) -> dict[str, Any]:
    unseen_method, scores = unseen
    seen_method, seen_scores = seen
    unseen_summary = (
        (scores[unseen_method]["median_pct"], scores[unseen_method]["p90_pct"]) if scores else (None, None)
    )
    chosen = seen_scores[seen_method]
    evaluated = np.isfinite(chosen)
    seen_median, seen_p90 = summarize(chosen[evaluated])
    return {
        "op_class": plan.op_class,
        "family": plan.design.family,
        "points": int(len(plan.rows)),
        "signatures": plan.n_sigs,
        "seen_method": seen_method,
        "seen_mape_median_pct": seen_median,
        "seen_mape_p90_pct": seen_p90,
        "seen_evaluated": int(evaluated.sum()),
        "seen_scaled": scaled,
        "seen_candidates": {m: _finite_median(v) for m, v in seen_scores.items()},
        "seen_mape_by_signature": {
            data.infos[i].signature: float(v)
            for i, v in zip(plan.by_sig, chosen, strict=True)
            if np.isfinite(v)
        },
        "unseen_method": unseen_method,
        "unseen_mape_median_pct": unseen_summary[0],
        "unseen_mape_p90_pct": unseen_summary[1],
        "unseen_candidates": scores,
        "validation": validation_text(folds, repeats),
    }


# ---------------------------------------------------------------------------------------------
# Leave one model out


def leave_one_model_out(
    datas: list[GroupData],
    models: dict[tuple[str, str, str, str], GroupModel],
    inventories: dict[str, dict[str, Any]],
    runner: TaskRunner | None = None,
) -> list[dict[str, Any]]:
    """For each model (inventory): drop its signatures, refit the class regressors on the rest
    with the methods chosen for the full fit, predict its measured points; report per-op MAPE
    beside the in-sample MAPE of the same regressors fitted with the model's data included.

    Models that share every signature of a class (a distilled model and its base) leave out the
    same rows: the refit of those rows is done once (on the H100 store, 167 refits instead of 283).
    The refits are independent pieces: a first pass finds them, `runner` computes them, a second
    pass reports."""
    # (group, op class, held-out signature ids) -> (design, held-out rows, method) of its refit.
    pieces: dict[tuple[tuple[str, ...], str, tuple[int, ...]], tuple[ClassDesign, np.ndarray, str]] = {}
    designs: dict[tuple[tuple[str, ...], str], ClassDesign] = {}
    _lomo_pass(datas, models, inventories, designs, pieces, None)
    plan = list(pieces)
    results = (runner or TaskRunner()).map(
        _refit_mape,
        [pieces[key] for key in plan],
        [_piece_cost(method, len(design.seconds), 1) for design, _, method in pieces.values()],
    )
    return _lomo_pass(datas, models, inventories, designs, pieces, dict(zip(plan, results, strict=True)))


def _lomo_pass(
    datas: list[GroupData],
    models: dict[tuple[str, str, str, str], GroupModel],
    inventories: dict[str, dict[str, Any]],
    designs: dict[tuple[tuple[str, ...], str], ClassDesign],
    pieces: dict[tuple[tuple[str, ...], str, tuple[int, ...]], tuple[ClassDesign, np.ndarray, str]],
    refits: dict[tuple[tuple[str, ...], str, tuple[int, ...]], np.ndarray] | None,
) -> list[dict[str, Any]]:
    """leave_one_model_out's walk over models, groups and classes: without `refits`, it records
    the refits needed in `pieces`; with them, it builds the report rows. A class's design does
    not depend on the model left out: it is built once, in `designs`."""
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
                if (data.key, op_class) not in designs:
                    designs[data.key, op_class] = class_design(data, op_class, np.flatnonzero(row_class == op_class))
                design = designs[data.key, op_class]
                test = row_held[design.rows]
                points += int(test.sum())
                class_model = group.classes[op_class]
                if test.all():
                    uncovered.update(data.infos[i].signature for i in np.unique(design.sig_ids))
                key = (data.key, op_class, tuple(np.unique(design.sig_ids[test]).tolist()))
                if refits is None:
                    if not test.all():
                        pieces.setdefault(key, (design, test, class_model.regressor.method))
                    continue
                insample = class_model.regressor.predict(
                    design.physical[test], design.logx[test], design.regimes[test]
                )
                insample_parts.append(per_op_mape(design.sig_ids[test], insample, design.seconds[test]))
                if not test.all():
                    lomo_parts.append(refits[key])
            if refits is None:
                continue
            lomo = np.concatenate(lomo_parts) if lomo_parts else np.zeros(0)
            insample_all = np.concatenate(insample_parts) if insample_parts else np.zeros(0)
            lomo_median, lomo_p90 = summarize(lomo)
            insample_median, insample_p90 = summarize(insample_all)
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


def _refit_mape(design: ClassDesign, test: np.ndarray, method: str) -> np.ndarray:
    """Per-op MAPE on the `test` rows of a class regressor refitted without them (`method`, or NNLS
    where too few rows remain for trees)."""
    if (~test).sum() < MIN_TREE_ROWS and method not in LINEAR_METHODS:
        method = METHOD_NNLS
    train = ~test
    regressor = fit_class_regressor(
        method, design.physical[train], design.logx[train], design.seconds[train], design.regimes[train]
    )
    predicted = regressor.predict(design.physical[test], design.logx[test], design.regimes[test])
    return per_op_mape(design.sig_ids[test], predicted, design.seconds[test])


def inventories_by_model(inventories: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per model: the union of the operations of its inventories (one per backend)."""
    merged: dict[str, dict[str, Any]] = {}
    for key, inventory in sorted(inventories.items()):
        model = str(inventory.get("model_key") or inventory.get("model_id") or key)
        entry = merged.setdefault(model, {"model_id": inventory.get("model_id", model), "operations": []})
        entry["operations"] = entry["operations"] + list(inventory.get("operations", []))
    return merged


def fit_frame(
    frame: pl.DataFrame,
    *,
    generation: int,
    inventories: dict[str, dict[str, Any]] | None = None,
    folds: int = DEFAULT_FOLDS,
    repeats: int = DEFAULT_REPEATS,
    jobs: int = 1,
) -> tuple[dict[tuple[str, str, str, str], GroupModel], FitReport]:
    """Fit every group of a snapshot frame (no store involved: the testable core of `fit_store`),
    its independent pieces on `jobs` processes (the same models and report on any number)."""
    if folds < 2:
        raise DoolyError(f"--folds must be at least 2 (got {folds})")
    if repeats < 1:
        raise DoolyError(f"--repeats must be at least 1 (got {repeats})")
    if jobs < 1:
        raise DoolyError(f"--jobs must be at least 1 (got {jobs})")
    datas = group_data(training_rows(frame))
    with TaskRunner(jobs) as runner:
        models = fit_groups(datas, folds=folds, generation=generation, repeats=repeats, runner=runner)
        lomo = leave_one_model_out(datas, models, inventories or {}, runner)
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

