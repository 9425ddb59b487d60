"""The fit's shortcuts change nothing: processes, skipped alignment candidates and the tree walks
give the models and errors of the plain computation, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from dooly.fit import curves
from dooly.fit import synthetic as syn
from dooly.fit.persist import serialize_group
from dooly.fit.regressors import (
    LOCAL_GBT_PARAMS,
    TREE_PAIRS,
    TREE_TERMS,
    PairTables,
    TreeEnsemble,
    _grid_predict,
)
from dooly.fit.selection import fit_frame

# The `fitted` fixture's folds and repeats (conftest's TEST_FOLDS, TEST_REPEATS; checked below).
TEST_FOLDS = 3
TEST_REPEATS = 1


def test_a_fit_on_two_processes_is_the_fit_on_one(fitted, inventories):
    models, report = fitted
    assert (report.folds, report.repeats) == (TEST_FOLDS, TEST_REPEATS)
    parallel_models, parallel_report = fit_frame(
        syn.snapshot_frame(), generation=1, inventories=inventories, folds=TEST_FOLDS, repeats=TEST_REPEATS, jobs=2
    )
    assert parallel_report.groups == report.groups
    assert parallel_report.lomo == report.lomo
    assert parallel_report.overall == report.overall
    assert set(parallel_models) == set(models)
    for key, model in models.items():
        assert serialize_group(parallel_models[key]) == serialize_group(model)


def test_jobs_must_be_positive():
    from dooly.errors import DoolyError

    with pytest.raises(DoolyError, match="jobs"):
        fit_frame(syn.snapshot_frame(), generation=1, jobs=0)


def _all_candidates_choice(x: np.ndarray, y: np.ndarray, candidates) -> curves.Alignment | None:
    """fit_curve's choice when every candidate's inner error is computed (no candidate skipped)."""
    best = curves._inner_error(x, y, None)
    chosen = None
    for alignment in candidates:
        error = curves._inner_error(x, y, alignment)
        if error < best * (1.0 - curves.ALIGNMENT_MARGIN):
            best, chosen = error, alignment
    return chosen


@pytest.mark.parametrize("unit", [1, 3, 64, 256, 4096])
@pytest.mark.parametrize("matmul", [False, True])
def test_skipped_alignment_candidates_never_change_the_choice(unit, matmul):
    rng = np.random.default_rng(unit)
    for sizes in (np.arange(1, 40), np.array([1, 2, 4, 8, 16, 24, 32, 64, 128, 256, 512, 1024]), np.arange(8, 400, 8)):
        partial_cost = 2e-6 * (sizes * unit % 512 != 0)
        seconds = (1e-5 + 1e-8 * sizes * unit) * rng.lognormal(0, 0.01, len(sizes)) + partial_cost
        candidates = curves.alignment_candidates(unit, matmul)
        curve = curves.fit_curve(sizes.astype(float), seconds, candidates)
        assert curve is not None
        assert curve.alignment == _all_candidates_choice(sizes.astype(float), seconds, candidates)


def _ensemble(seed: int) -> tuple[TreeEnsemble, np.ndarray, object]:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    x = np.log(rng.uniform(1, 5000, (300, len(TREE_TERMS))))
    y = np.sin(x[:, 0]) * x[:, 1] / 10 + (x[:, 2] > 2) * (x[:, 3] < 1) + rng.normal(scale=0.05, size=len(x))
    with threadpool_limits(limits=1, user_api="openmp"):
        fitted = HistGradientBoostingRegressor(interaction_cst=[list(p) for p in TREE_PAIRS], **LOCAL_GBT_PARAMS).fit(
            x, y
        )
    return TreeEnsemble.from_hist_gbr(fitted), x, fitted


def test_tree_walk_reproduces_scikit_learn_and_its_own_sum():
    ensemble, x, fitted = _ensemble(5)
    probe = np.vstack([x, x + 0.013])
    predicted = ensemble.predict(probe)
    np.testing.assert_allclose(predicted, fitted.predict(probe), rtol=1e-12, atol=1e-12)
    expected = np.full(len(probe), ensemble.baseline)
    expected += ensemble.leaf_values(probe).sum(axis=1)
    assert np.array_equal(predicted, expected)


def test_grid_walk_of_the_pair_tables_is_predict_bit_for_bit():
    ensemble, x, _ = _ensemble(7)
    anchor = x.min(axis=0) - 1.0
    used = ensemble.split_features()
    for pair in TREE_PAIRS:
        grid = np.tile(anchor, (len(x), 1))
        grid[:, list(pair)] = x[:, list(pair)]
        got = _grid_predict(ensemble, grid, ensemble.leaf_values(anchor[None, :]), used, pair)
        assert np.array_equal(got, ensemble.predict(grid))
    assert isinstance(PairTables.from_trees(ensemble, TREE_TERMS, TREE_PAIRS), PairTables)


def test_rows_sorted_in_every_feature_are_walked_once_per_run_bit_for_bit():
    """A table over one request variable (its log terms grow with it, config dims constant) is
    walked one row per run of rows no split separates; the result is the row-by-row walk's, bit
    for bit. Unsorted rows, or too few, take the row-by-row walk."""
    ensemble, x, fitted = _ensemble(11)
    # One variable's log, the split points themselves among its values (a row at a threshold goes
    # left), in every feature but one, which stays put as a config dim does.
    values = np.unique(np.concatenate([np.log(np.arange(1, 20000, dtype=np.float64)),
                                       ensemble.threshold[np.isfinite(ensemble.threshold)]]))
    table = np.column_stack([values, values, np.full(len(values), 3.0), values / 2])
    starts = ensemble.sorted_runs(table)
    assert starts is not None and 1 < len(starts) < len(table) / 10
    expected = ensemble.baseline + ensemble.leaf_values(table).sum(axis=1)
    assert np.array_equal(ensemble.predict(table), expected)
    np.testing.assert_allclose(ensemble.predict(table), fitted.predict(table), rtol=1e-12, atol=1e-12)
    assert ensemble.sorted_runs(table[::-1]) is None
    assert ensemble.sorted_runs(table[:10]) is None
    assert ensemble.sorted_runs(np.vstack([x, x])) is None
