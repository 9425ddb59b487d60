"""Per-signature models on known laws: what a monotone interpolation or a linear model cannot
follow (a kernel switch, a partial-block sawtooth, an isolated outlier, a single-sequence decode
path) is recovered at sizes never measured, and a held-out point never fits its own prediction."""

from __future__ import annotations

import numpy as np
import pytest

from dooly.fit.curves import (
    MAX_EXTRAPOLATION_SLOPE,
    Alignment,
    alignment_candidates,
    fit_curve,
)
from dooly.fit.features import FAMILY_ATTENTION, term_matrix, work_units
from dooly.fit.regressors import (
    SEEN_INTERP,
    SEEN_LINEAR,
    SEEN_TREES,
    TREE_PAIRS,
    TREE_TERMS,
    PairTables,
    TreeEnsemble,
    tree_features,
)
from dooly.fit.selection import fit_seen, heldout_pct, seen_cv
from dooly.fit.training import SignatureInfo

# The profiler's token grid, with the refinement points it adds where a sweep bends.
GRID = np.array(
    [1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768]
    + [1024, 1536, 2048, 3072, 4096],
    dtype=np.float64,
)
US = 1e-6
# CUDA-graph timings spread ~0.3% around their median.
NOISE = 0.003
TOLERANCE = 0.03
# What the old models miss by, at least, on the same queries.
OLD_MODEL_MISS = 0.06


def noisy(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    return truth * np.exp(np.random.default_rng(seed).normal(0.0, NOISE, size=len(truth)))


def measure(law, values: np.ndarray, seed: int = 0) -> np.ndarray:
    return noisy(law(values), seed)


def monotone_interpolation(values: np.ndarray, seconds: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The previous per-signature model, as a reference: log-log linear interpolation through an
    isotonic (non-decreasing) fit of the measurements."""
    from sklearn.isotonic import isotonic_regression

    log_y = isotonic_regression(np.log(seconds))
    return np.exp(np.interp(np.log(queries), np.log(values), log_y))


def worst_error(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.max(np.abs(predicted / truth - 1.0)))


def embedding_law(t: np.ndarray) -> np.ndarray:
    """A gather whose kernel switches above 16 tokens to a faster one (the H100 embedding)."""
    return np.where(t <= 16, 1.6 + 0.35 * t, 1.5 + 0.006 * t) * US


def test_kernel_switch_is_kept_not_flattened():
    # The profiler refines a sweep where it bends: here between 12 and 16, 24 and 32.
    grid = np.union1d(GRID, [14, 28])
    seconds = measure(embedding_law, grid)
    curve = fit_curve(grid, seconds)
    # Between 16 and 20 the switch happens at a size nothing measured; elsewhere it is known.
    queries = np.array([5, 7, 10, 13, 15, 22, 40, 80, 300, 1000, 3000], dtype=np.float64)
    truth = embedding_law(queries)
    assert worst_error(curve.predict(queries), truth) < TOLERANCE
    assert curve.predict(np.array([15.0]))[0] > 3 * curve.predict(np.array([22.0]))[0]
    assert worst_error(monotone_interpolation(grid, seconds, queries), truth) > OLD_MODEL_MISS


def sawtooth_law(t: np.ndarray) -> np.ndarray:
    """An elementwise kernel over 128 elements per token, in blocks of 1024 elements: sizes that
    leave a partial last block (tokens not a multiple of 8) take 0.2 us more."""
    partial = (np.rint(t).astype(np.int64) * 128) % 1024 != 0
    return (1.2 + 0.004 * t + 0.2 * partial) * US


def test_partial_block_time_is_recovered_by_inner_cross_validation():
    seconds = measure(sawtooth_law, GRID)
    curve = fit_curve(GRID, seconds, alignment_candidates(128, matmul=False))
    assert curve.alignment == Alignment(128, 1024)
    assert curve.partial_s == pytest.approx(0.2 * US, rel=0.2)
    queries = np.array([5, 7, 9, 13, 18, 30, 40, 44, 56, 72, 100, 200, 201, 1000], dtype=np.float64)
    truth = sawtooth_law(queries)
    assert worst_error(curve.predict(queries), truth) < TOLERANCE
    plain = fit_curve(GRID, seconds)
    assert plain.alignment is None
    assert worst_error(plain.predict(queries), truth) > OLD_MODEL_MISS
    assert worst_error(monotone_interpolation(GRID, seconds, queries), truth) > OLD_MODEL_MISS


@pytest.mark.parametrize("seed", range(4))
def test_no_partial_block_time_is_invented_on_a_smooth_law(seed):
    def law(t):
        return (1.5 + 0.01 * t) * US

    curve = fit_curve(GRID, measure(law, GRID, seed), alignment_candidates(128, matmul=False))
    assert curve.alignment is None and curve.partial_s == 0.0


def test_an_isolated_outlier_does_not_bend_its_neighbours():
    def law(t):
        return (2.0 + 0.01 * t) * US

    seconds = measure(law, GRID)
    spike = int(np.flatnonzero(GRID == 192)[0])
    seconds[spike] *= 2.0
    curve = fit_curve(GRID, seconds)
    queries = np.array([150, 170, 210, 230], dtype=np.float64)
    assert worst_error(curve.predict(queries), law(queries)) < TOLERANCE
    assert curve.predict(GRID[spike : spike + 1])[0] == pytest.approx(seconds[spike], rel=1e-12)
    straight = np.exp(np.interp(np.log(queries), np.log(GRID), np.log(seconds)))
    assert worst_error(straight, law(queries)) > OLD_MODEL_MISS


def test_beyond_the_grid_latency_grows_at_most_linearly():
    def cliff(t):
        """Four times slower per token once the working set leaves L2, at 2048 tokens."""
        return (1.0 + 0.01 * t + 0.03 * np.maximum(t - 2048, 0)) * US

    curve = fit_curve(GRID, measure(cliff, GRID))
    last = curve.predict(GRID[-1:])[0]
    beyond = curve.predict(np.array([2 * GRID[-1], 4 * GRID[-1]]))
    assert last < beyond[0] < beyond[1]
    assert beyond[1] <= last * 4**MAX_EXTRAPOLATION_SLOPE * (1 + 1e-12)
    assert curve.predict(np.array([0.0]))[0] == 0.0


def signature(
    family: str, request_vars: tuple[str, ...], units: dict[str, int] | None = None
) -> SignatureInfo:
    from dooly.fit.features import static_features

    op = "attention" if family == FAMILY_ATTENTION else "aten.add.Tensor"
    return SignatureInfo(
        signature="ab" * 16,
        op=op,
        op_class=f"{op}:test" if family == FAMILY_ATTENTION else op,
        family=family,
        config_dims={},
        request_vars=request_vars,
        static=static_features(family, op, {}, request_vars),
        units=units or {},
    )


def test_a_held_out_point_never_fits_its_own_prediction():
    def law(t):
        return (1.5 + 0.01 * t) * US

    info = signature("generic", ("T",), {"T": 128})
    terms = term_matrix({"T": GRID}, len(GRID))
    seconds = measure(law, GRID)
    wild = int(np.flatnonzero(GRID == 96)[0])
    seconds[wild] *= 1000.0
    repeats = 3
    held_out = seen_cv(SEEN_INTERP, info, terms, seconds, folds=5, repeats=repeats)
    assert held_out.shape == (repeats, len(GRID)) and np.isfinite(held_out).all()
    # Every fold assignment predicts the wild point from its neighbours, never from itself...
    assert np.all(held_out[:, wild] < 2 * law(GRID[wild]))
    # ...while the model fitted on every point reproduces what was measured there.
    full = fit_seen(SEEN_INTERP, info, terms, seconds)
    assert full.predict_terms(terms[wild : wild + 1])[0] == pytest.approx(seconds[wild], rel=1e-12)


def test_a_multi_variable_op_may_follow_one_variable():
    """A gather of B rows out of T (the logits rows) costs what B says, whatever T is."""

    def law(b):
        return np.where(b == 1, 4.3, 2.7 + 0.004 * b) * US

    b, t = np.meshgrid([1, 3, 6, 12, 24, 48, 96, 192, 256], [256, 512, 1024, 2048, 4096])
    b, t = b.ravel().astype(np.float64), t.ravel().astype(np.float64)
    terms = term_matrix({"T": t, "B": b}, len(b))
    seconds = measure(law, b)
    info = signature("generic", ("B", "T"))
    by_b = heldout_pct(seen_cv(f"{SEEN_INTERP}:B", info, terms, seconds, folds=5), seconds)
    linear = heldout_pct(seen_cv(SEEN_LINEAR, info, terms, seconds, folds=5), seconds)
    assert by_b < 1.0 < 5 * by_b < linear
    model = fit_seen(f"{SEEN_INTERP}:B", info, terms, seconds)
    assert model.single_var == "B"


def test_work_units_from_the_signature_shapes():
    two_inputs = '{"inputs":[["bfloat16",[1,32,"T",128]],["bfloat16",[1,1,"T",128]]]}'
    assert work_units(two_inputs, ["T"]) == {"T": 4096}
    scaled = '{"inputs":[["bfloat16",["8*T",64]],["int32",["B"]]]}'
    assert work_units(scaled, ["B", "T"]) == {"B": 1, "T": 512}
    assert work_units('{"op":"aten.mm.default"}', ["T"]) == {"T": 1}
    assert work_units("not json", ["T"]) == {"T": 1}


def test_pair_tables_reproduce_a_pair_constrained_ensemble_exactly():
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    from dooly.fit.regressors import LOCAL_GBT_PARAMS

    rng = np.random.default_rng(3)
    n = 400
    raw = {
        "T": rng.integers(1, 4096, n),
        "K": rng.integers(1, 50000, n),
        "B": rng.integers(1, 256, n),
        "D": rng.integers(0, 256, n),
    }
    terms = term_matrix(raw, n)
    x = tree_features(terms, TREE_TERMS)
    y = np.sin(x[:, 0]) * x[:, 1] / 10 + (x[:, 2] > 2) * (x[:, 3] < 1) + rng.normal(scale=0.05, size=n)
    with threadpool_limits(limits=1, user_api="openmp"):
        fitted = HistGradientBoostingRegressor(
            interaction_cst=[list(p) for p in TREE_PAIRS], **LOCAL_GBT_PARAMS
        ).fit(x, y)
    ensemble = TreeEnsemble.from_hist_gbr(fitted)
    tables = PairTables.from_trees(ensemble, TREE_TERMS, TREE_PAIRS)
    probe_raw = {
        "T": np.r_[rng.uniform(0.5, 9000, 3000), 0.0, 1.0],
        "K": np.r_[rng.uniform(0.5, 90000, 3000), 0.0, 1.0],
        "B": np.r_[rng.uniform(0.5, 400, 3000), 1.0, 0.0],
        "D": np.r_[rng.uniform(0.0, 400, 3000), 0.0, 1.0],
    }
    probe = term_matrix(probe_raw, len(probe_raw["T"]))
    np.testing.assert_allclose(
        np.log(tables.factor(probe)), ensemble.predict(tree_features(probe, TREE_TERMS)), rtol=1e-9, atol=1e-9
    )


def attention_points() -> dict[str, np.ndarray]:
    """Batches like the profiler's attention sweep: single prefills, decode batches, mixed ones."""
    rows = []
    for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        rows.append((t, 1, t, 0))
        for context in (512, 2048, 8192):
            if t >= 64:
                rows.append((t, 1, t + context, 0))
    for b in (1, 2, 4, 8, 16, 32, 64):
        for per_seq in (128, 512, 1024, 2048, 4096):
            rows.append((b, b, b * (per_seq + 1), b))
    for prefill in (64, 256, 1024):
        for decodes in (4, 16):
            for context in (0, 1024):
                rows.append((prefill + decodes, decodes + 1, prefill + context + decodes * 2000, decodes))
    tokens, seqs, keys, decode_seqs = (np.array(column, dtype=np.float64) for column in zip(*rows, strict=True))
    return {"T": tokens, "B": seqs, "K": keys, "D": decode_seqs}


def attention_law(request: dict[str, np.ndarray]) -> np.ndarray:
    """Dense masked attention over [T, K], whose single-query decode takes a kernel path 30%
    cheaper per key, and whose mixed batches pay 5 us for the ragged prefill."""
    t, b, k, d = request["T"], request["B"], request["K"], request["D"]
    single = (t == 1) & (d == 1)
    mixed = (d > 0) & (d < b)
    return (14.0 + 0.002 * t + np.where(single, 0.7, 1.0) * 0.03 * k + 2.2e-5 * t * k + 5.0 * mixed) * US


def test_attention_trees_follow_what_a_linear_model_cannot():
    request = attention_points()
    n = len(request["T"])
    terms = term_matrix(request, n)
    seconds = noisy(attention_law(request))
    info = signature(FAMILY_ATTENTION, ("K", "T"))
    trees = heldout_pct(seen_cv(SEEN_TREES, info, terms, seconds, folds=5, repeats=2), seconds)
    linear = heldout_pct(seen_cv(SEEN_LINEAR, info, terms, seconds, folds=5, repeats=2), seconds)
    assert trees < TOLERANCE * 100 < linear
    model = fit_seen(SEEN_TREES, info, terms, seconds)
    assert model.method == SEEN_TREES
    # A single-sequence decode at a context never measured, and a decode batch between sizes.
    unseen = {
        "T": np.array([1.0, 12.0]),
        "B": np.array([1.0, 12.0]),
        "K": np.array([3001.0, 12 * 1501.0]),
        "D": np.array([1.0, 12.0]),
    }
    predicted = model.predict_terms(term_matrix(unseen, 2))
    assert worst_error(predicted, attention_law(unseen)) < TOLERANCE
