"""Fitting a synthetic snapshot whose latencies follow known laws (with 1% noise)."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from dooly import SCHEMA_VERSION
from dooly.errors import DoolyError
from dooly.fit import synthetic as syn
from dooly.fit.predictor import Predictor
from dooly.fit.selection import fit_frame
from dooly.fit.training import training_rows

# 1% log-normal noise gives a floor of ~0.8% MAPE; these bounds leave room for interpolation.
SEEN_HELDOUT_MAX_PCT = 3.0
UNSEEN_HELDOUT_MAX_PCT = 6.0
SEEN_TRUTH_TOLERANCE = 0.03
# Between grid points the tile-quantised staircase is invisible to any interpolation.
SEEN_TRUTH_WORST = 0.05
UNSEEN_TRUTH_TOLERANCE = 0.10
STEP_TOLERANCE = 0.03
# Seconds per (query, key) pair and per key of a step with an odd / unaligned KV total, forced
# into fitted attention models to exercise those terms.
ALIGNMENT_COSTS = (3e-13, 1e-13, 2e-10, 1e-10)


def test_heldout_errors_per_class(fitted):
    _, report = fitted
    (group,) = report.groups
    classes = {c["op_class"]: c for c in group["classes"]}
    assert set(classes) == {syn.MM, syn.MUL, syn.SILU, syn.ATTENTION_CLASS}
    for row in classes.values():
        assert row["seen_mape_median_pct"] < SEEN_HELDOUT_MAX_PCT, row
        assert row["unseen_mape_median_pct"] < UNSEEN_HELDOUT_MAX_PCT, row
        assert row["seen_evaluated"] == row["signatures"]
        assert "fold" in row["validation"]
    # The matrix products follow a roofline with tile quantisation, which a straight line in the
    # request terms cannot follow; interpolation on the measured grid must have been chosen.
    assert classes[syn.MM]["seen_method"] == "interp-loglog"
    assert classes[syn.MM]["seen_candidates"]["local-nnls"] > classes[syn.MM]["seen_mape_median_pct"]


def test_seen_signatures_reproduce_the_law(predictor):
    tokens = np.array([1, 5, 48, 100, 700, 2500, 4000])
    for op in syn.inventory(syn.TOY_MODELS[1])["operations"]:
        if op["op"] == "attention":
            continue
        n = len(tokens)
        request = {"T": tokens, "B": np.minimum(tokens, 256)}
        got, unseen = predictor.predict_ops(
            [op["signature"]] * n, [op["op_class"]] * n, [op["config_dims"]] * n, request, return_unseen=True
        )
        truth = syn.true_seconds(op, request)
        assert not unseen.any()
        error = np.abs(got / truth - 1)
        assert np.mean(error) < SEEN_TRUTH_TOLERANCE, (op["config_dims"], got / truth)
        assert np.max(error) < SEEN_TRUTH_WORST, (op["config_dims"], got / truth)


def test_never_profiled_model_is_predicted_from_config_dims(predictor):
    seqs = [[[300, 0]], [[1, 900]] * 12, [[128, 512], [1, 300], [1, 2000]]]
    for op in syn.inventory(syn.UNSEEN_MODEL)["operations"]:
        if op["op"] == "attention":
            agg_request = {"seqs": seqs, "T": [300, 12, 130], "B": [1, 12, 3], "K": [300, 10812, 2944]}
        else:
            # Off the profiled grid, but on tile multiples (see the step-latency test).
            values = (
                np.array([2, 40, 320, 1536, 4032])
                if op["request_vars"] == ["T"]
                else np.array([1, 8, 100, 250])
            )
            agg_request = {"T": values, "B": values}
        n = len(agg_request["T"])
        got, unseen = predictor.predict_ops(
            [op["signature"]] * n,
            [op["op_class"]] * n,
            [op["config_dims"]] * n,
            agg_request,
            request_vars=[op["request_vars"]] * n,
            ops=[op["op"]] * n,
            return_unseen=True,
        )
        assert unseen.all()
        truth = syn.true_seconds(op, agg_request)
        assert np.max(np.abs(got / truth - 1)) < UNSEEN_TRUTH_TOLERANCE, (
            op["op_class"],
            op["config_dims"],
            got / truth,
        )


def test_leave_one_model_out_report(fitted):
    _, report = fitted
    by_model = {row["model_id"]: row for row in report.lomo}
    assert set(by_model) == {m.model_id for m in syn.TOY_MODELS}  # the unseen model has no data
    for row in by_model.values():
        assert row["ops_predicted"] == row["ops_measured"] > 0
        assert row["ops_uncovered"] == 0
        assert 0 < row["in_sample_mape_median_pct"] < UNSEEN_HELDOUT_MAX_PCT
        assert 0 < row["lomo_mape_median_pct"] < UNSEEN_TRUTH_TOLERANCE * 100


def test_step_latency_is_the_count_weighted_sum_of_op_laws(predictor):
    inventory = syn.inventory(syn.TOY_MODELS[2])
    step = predictor.step_predictor(inventory)
    assert step.unseen_count == 0
    # Token counts on the synthetic kernels' tile boundaries (multiples of 64): in between, the
    # staircase of tile quantisation is finer than the profiled grid (see the seen-law test).
    for prefill, decode in (([(512, 0)], []), ([], [700] * 64), ([(256, 1024)], [100] * 62 + [4000, 50])):
        seqs = [[q, c] for q, c in prefill] + [[1, c] for c in decode]
        tokens = sum(q for q, _ in seqs)
        request = {"T": np.array([tokens]), "B": np.array([len(seqs)]), "seqs": [seqs]}
        truth = sum(op["count"] * float(syn.true_seconds(op, request)[0]) for op in inventory["operations"])
        got = step.step_seconds(prefill, decode)
        assert abs(got / truth - 1) < STEP_TOLERANCE, (prefill, decode, got, truth)
        breakdown = step.breakdown(prefill, decode)
        assert set(breakdown) == {syn.MM, syn.MUL, syn.SILU, syn.ATTENTION_CLASS}
        assert sum(breakdown.values()) == pytest.approx(got, rel=1e-9)
        per_op = step.op_seconds(prefill, decode)
        assert sum(o["seconds"] * o["count"] for o in per_op) == pytest.approx(got, rel=1e-9)


def test_scalar_and_batched_step_paths_agree(predictor):
    rng = np.random.default_rng(11)
    steps = []
    for _ in range(300):
        prefill = [
            (int(rng.integers(1, 3000)), int(rng.integers(0, 30000))) for _ in range(int(rng.integers(0, 3)))
        ]
        decode = rng.integers(1, 40000, size=int(rng.integers(0 if prefill else 1, 300))).tolist()
        steps.append((prefill, decode))
    # A sliding-window model (never profiled): its attention and S terms take the windowed path.
    windowed = syn.inventory(syn.UNSEEN_MODEL)
    for op in windowed["operations"]:
        if op["op"] == "attention":
            op["config_dims"] = {**op["config_dims"], "sliding_window": 512}
    for inventory in (syn.inventory(syn.TOY_MODELS[0]), windowed):
        step = predictor.step_predictor(inventory)
        scalar = np.array([step.step_seconds(p, d) for p, d in steps])
        np.testing.assert_allclose(step.step_seconds_many(steps), scalar, rtol=1e-9)
        assert np.all(scalar > 0)
        # A padded CUDA-graph read: every layer reads all KV tokens, its window notwithstanding.
        full = np.array([step.step_seconds(p, d, full_reads=True) for p, d in steps[:40]])
        by_class = [sum(step.breakdown(p, d, full_reads=True).values()) for p, d in steps[:40]]
        np.testing.assert_allclose(by_class, full, rtol=1e-9)
        if inventory is windowed:
            assert np.all(full >= scalar[:40] * (1 - 1e-12)) and np.any(full > scalar[:40] * 1.01)
        else:
            np.testing.assert_allclose(full, scalar[:40], rtol=1e-12)
    plain = predictor.step_predictor(syn.inventory(syn.UNSEEN_MODEL))
    long_context = ([(64, 20000)], [30000] * 8)
    windowed_step = predictor.step_predictor(windowed)
    assert (
        windowed_step.breakdown(*long_context)[syn.ATTENTION_CLASS]
        < plain.breakdown(*long_context)[syn.ATTENTION_CLASS]
    )


def test_unknown_op_class_is_a_clear_error(predictor):
    inventory = {
        "model_id": "x",
        "operations": [
            {
                "signature": "f" * 32,
                "op": "aten.cumsum.default",
                "op_class": "aten.cumsum.default",
                "config_dims": {},
                "request_vars": ["T"],
                "count": 1,
            }
        ],
    }
    with pytest.raises(DoolyError, match="aten.cumsum.default"):
        predictor.step_predictor(inventory)


def test_training_rows_refuse_bad_snapshots():
    frame = syn.snapshot_frame([syn.TOY_MODELS[0]])
    with pytest.raises(DoolyError, match="schema version"):
        training_rows(frame.with_columns(pl.lit(SCHEMA_VERSION + 1).alias("schema_version")))
    with pytest.raises(DoolyError, match="none with status 'ok'"):
        training_rows(frame.with_columns(pl.lit("oom").alias("status")))
    with pytest.raises(DoolyError, match="no rows"):
        training_rows(frame.head(0))
    with pytest.raises(DoolyError, match="folds"):
        fit_frame(frame, generation=1, folds=1)
    with pytest.raises(DoolyError, match="repeats"):
        fit_frame(frame, generation=1, repeats=0)


def test_oom_rows_and_duplicates_are_not_training_data():
    frame = syn.snapshot_frame([syn.TOY_MODELS[0]])
    oom = frame.head(5).with_columns(
        pl.lit("oom").alias("status"), pl.lit(None, dtype=pl.Float64).alias("latency_median_s")
    )
    kept = training_rows(pl.concat([frame, oom]))
    assert kept.height == frame.height
    assert (kept.get_column("status") == "ok").all()


def test_linear_surrogate_of_a_tree_corrected_attention_model(predictor):
    """A never-profiled attention op whose class model is tree-corrected gets a linear stand-in in
    the step predictor: it agrees with the exact (slow) evaluation on the measured kind of batches
    and, being linear in the work terms, extrapolates beyond them better than the trees do."""
    import copy

    from dooly.fit.regressors import METHOD_NNLS_GBT, fit_class_regressor
    from dooly.fit.training import class_design, group_data

    group = copy.deepcopy(predictor.group)
    data = group_data(training_rows(syn.snapshot_frame()))[0]
    design = class_design(data, syn.ATTENTION_CLASS, np.flatnonzero(data.row_class == syn.ATTENTION_CLASS))
    group.classes[syn.ATTENTION_CLASS].regressor = fit_class_regressor(
        METHOD_NNLS_GBT, design.physical, design.logx, design.seconds, design.regimes
    )
    # The class regressor's path: without the measured layouts, the unseen layout's query-head peers
    # would serve it instead (tests/fit/test_heads_affine.py).
    group.classes[syn.ATTENTION_CLASS].layouts = {}
    tree_predictor = type(predictor)(group)
    inventory = syn.inventory(syn.UNSEEN_MODEL)
    (attention,) = [op for op in inventory["operations"] if op["op"] == "attention"]
    fast = tree_predictor.step_predictor(inventory)
    exact = tree_predictor.step_predictor(inventory, exact=True)
    methods = {o["op_class"]: o["method"] for o in fast.op_seconds([(64, 0)], [10])}
    assert methods[syn.ATTENTION_CLASS] == f"surrogate({METHOD_NNLS_GBT})"
    assert len(fast.surrogate_error_pct) == 1 and next(iter(fast.surrogate_error_pct.values())) < 2.0
    on_grid = (([(512, 0)], []), ([], [700] * 48), ([(256, 1024)], [400] * 30))
    beyond = (([(256, 20000)], [100] * 30 + [9000]), ([(3000, 0)], [50000] * 4))
    for prefill, decode in on_grid + beyond:
        seqs = [[q, c] for q, c in prefill] + [[1, c] for c in decode]
        truth = attention["count"] * float(syn.true_seconds(attention, {"seqs": [seqs]})[0])
        got = fast.breakdown(prefill, decode)[syn.ATTENTION_CLASS]
        assert abs(got / truth - 1) < 0.03, (prefill, len(decode), got, truth)
        if (prefill, decode) in on_grid:
            want = exact.breakdown(prefill, decode)[syn.ATTENTION_CLASS]
            assert abs(got / want - 1) < 0.03, (prefill, len(decode), got, want)


def test_tree_corrected_attention_takes_an_exact_fast_path(predictor):
    """Per-signature attention models of linear work times tabulated trees: the step predictor's
    scalar and batched paths and the per-op evaluation give the same seconds."""
    import copy

    from dooly.fit.features import KV_ALIGNMENT_TERMS, TERM_INDEX
    from dooly.fit.regressors import SEEN_TREES
    from dooly.fit.selection import fit_seen
    from dooly.fit.training import group_data

    group = copy.deepcopy(predictor.group)
    data = group_data(training_rows(syn.snapshot_frame()))[0]
    replaced = 0
    for i, info in enumerate(data.infos):
        if info.op_class == syn.ATTENTION_CLASS:
            rows = data.row_sig == i
            model = fit_seen(SEEN_TREES, info, data.terms[rows], data.seconds[rows])
            # Unaligned KV totals priced (the synthetic kernels have no such cost): the scalar
            # path's hand-built alignment terms must match the batched path's.
            for name, per_unit in zip(KV_ALIGNMENT_TERMS, ALIGNMENT_COSTS):
                model.coef[TERM_INDEX[name]] = per_unit
            group.signatures[info.signature] = model
            replaced += 1
    assert replaced > 0
    step = type(predictor)(group).step_predictor(syn.inventory(syn.TOY_MODELS[1]))
    methods = {o["op_class"]: o["method"] for o in step.op_seconds([(64, 0)], [10])}
    assert methods[syn.ATTENTION_CLASS] == SEEN_TREES
    rng = np.random.default_rng(4)
    steps = []
    for _ in range(200):
        chunks = int(rng.integers(0, 3))
        prefill = [(int(rng.integers(1, 3000)), int(rng.integers(0, 20000))) for _ in range(chunks)]
        decode = rng.integers(1, 30000, size=int(rng.integers(0 if prefill else 1, 200))).tolist()
        steps.append((prefill, decode))
    steps.append(([], [500]))  # a single-sequence decode
    scalar = np.array([step.step_seconds(p, d) for p, d in steps])
    np.testing.assert_allclose(step.step_seconds_many(steps), scalar, rtol=1e-9)
    for prefill, decode in steps[:20] + steps[-1:]:
        per_op = sum(o["seconds"] * o["count"] for o in step.op_seconds(prefill, decode))
        assert per_op == pytest.approx(step.step_seconds(prefill, decode), rel=1e-9)
        assert sum(step.breakdown(prefill, decode).values()) == pytest.approx(per_op, rel=1e-9)


def test_report_pools_every_profiled_signature(fitted):
    _, report = fitted
    per_signature = [
        value
        for group in report.groups
        for row in group["classes"]
        for value in row["seen_mape_by_signature"].values()
    ]
    overall = report.to_dict()["overall"]
    assert overall["signatures"] == len(per_signature) == sum(
        row["signatures"] for group in report.groups for row in group["classes"]
    )
    assert overall["seen_mape_median_pct"] == pytest.approx(float(np.median(per_signature)))
    assert "repeated" not in report.to_dict()["validation"]


def test_cli_defaults_match_the_fit():
    from dooly.fit import commands, selection

    assert commands.DEFAULT_FOLDS == selection.DEFAULT_FOLDS
    assert commands.DEFAULT_REPEATS == selection.DEFAULT_REPEATS


H100 = "NVIDIA-H100-80GB-HBM3"
# A packed dense-mask attention call on a GPU of 132 SMs: whole waves of 128-row query tiles per
# head, each wave as long as one tile's pass over the keys.
WAVE_SMS = 132
WAVE_TILE_ROWS = 128
WAVE_KEY_S = 2e-9


def _wave_law(seqs: list[list[int]], heads: int) -> float:
    tokens = sum(q for q, _ in seqs)
    keys = sum(q + c for q, c in seqs)
    waves = math.ceil(math.ceil(tokens / WAVE_TILE_ROWS) * heads / WAVE_SMS)
    return syn.LAUNCH_S + WAVE_KEY_S * waves * keys


def test_attention_that_runs_in_waves_is_learned_where_the_sm_count_is_known():
    """On the H100 the fit sees the kernel's waves (features.QUERY_TILE): a chunk of 520 tokens
    needs a second wave that one of 512 does not, and the fitted model says so. The same
    measurements under a platform name without an SM count cannot tell the two apart."""
    model = syn.TOY_MODELS[2]
    rng = np.random.default_rng(7)
    errors = {}
    for platform in (H100, syn.PLATFORM):
        rows = syn.snapshot_rows([model], platform=platform)
        for row in rows:
            if row["op"] == "attention":
                seqs = json.loads(row["point_key"])["seqs"]
                row["latency_median_s"] = _wave_law(seqs, model.heads) * math.exp(rng.normal(0.0, syn.NOISE_SIGMA))
        inventory = syn.inventory(model)
        models, _ = fit_frame(pl.DataFrame(rows), generation=1, inventories={syn.inventory_store_key(model): inventory},
                              folds=3, repeats=1)
        predictor = Predictor(models[(platform, syn.ENGINE, syn.BACKEND, syn.DTYPE)])
        (op,) = [o for o in inventory["operations"] if o["op"] == "attention"]
        chunks = [[[512, 4096]], [[520, 4096]], [[1024, 2048]], [[1056, 2048]]]
        got = predictor.predict_ops([op["signature"]] * 4, [op["op_class"]] * 4, [op["config_dims"]] * 4,
                                    {"seqs": chunks, "T": [512, 520, 1024, 1056], "B": [1] * 4,
                                     "K": [4608, 4616, 3072, 3104]})
        truth = np.array([_wave_law(s, model.heads) for s in chunks])
        errors[platform] = np.abs(got / truth - 1)
        step = predictor.step_predictor(inventory)
        steps = [([(520, 4096)], [100, 2000]), ([], [300] * 40), ([(2048, 0)], [5000] * 3), ([(512, 0)], [])]
        scalar = [step.step_seconds(p, d) for p, d in steps]
        np.testing.assert_allclose(step.step_seconds_many(steps), scalar, rtol=1e-9)
    assert errors[H100].max() < SEEN_TRUTH_WORST, errors
    assert errors[syn.PLATFORM].max() > 3 * SEEN_TRUTH_WORST, errors
