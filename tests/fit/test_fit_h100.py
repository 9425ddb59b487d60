"""The accuracy target on real data: the H100 shards in data/h100/db (CUDA-graph timings of six
models, two attention backends). Held-out per-op MAPE of the per-signature models, k-fold within
each signature, median over every profiled signature: at most 3% (issue #4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from dooly.fit.regressors import SEEN_TREES, SEEN_WAVE_TREES
from dooly.fit.selection import DEFAULT_FOLDS, choose_seen_method
from dooly.fit.training import group_data, training_rows

H100_STORE = Path(__file__).resolve().parents[2] / "data" / "h100" / "db"
TARGET_MEDIAN_PCT = 3.0
# Before the curves and the attention trees: 3.5% median, attention 6.0% (sdpa) and 7.9% (eager).
ATTENTION_TARGET_PCT = 5.0
# The profile-only flex backend misses that target (its 128-token mask blocks make latency
# step-shaped in the batch's per-sequence layout, which the T/K features do not see): this only
# keeps it from getting worse than measured (14.7-16.3% across fold draws).
PROFILE_ONLY_ATTENTION = {"attention:paged|flex_attention": 20.0}
# What the shards held when this was written (six models x two attention backends).
MIN_SIGNATURES = 124
MIN_ATTENTION_BACKENDS = 2
# At most this share of signatures may lack a held-out error of their own.
MAX_UNEVALUABLE_SHARE = 0.05
# Which work hypothesis wins held out (regressors.WAVE_TREE_BASE_TERMS): cuDNN's flash kernel runs
# in waves of query tiles, eager attention touches every (query, key) pair of the packed batch.
EXPECTED_ATTENTION_METHODS = {"attention:paged|sdpa": SEEN_WAVE_TREES, "attention:paged|eager": SEEN_TREES}


def test_h100_heldout_median_per_op_mape_within_target(tmp_path):
    from dooly.store.backends import open_store
    from dooly.store.merge import merge_store, read_snapshot

    root = tmp_path / "db"
    shutil.copytree(H100_STORE, root)
    store = open_store(str(root))
    merge_store(store)
    frame, _ = read_snapshot(store)
    errors: list[float] = []
    unevaluable = 0
    attention: dict[str, float] = {}
    methods: dict[str, str] = {}
    datas = group_data(training_rows(frame))
    for data in datas:
        row_class = data.row_class
        for op_class in sorted(set(row_class.tolist())):
            rows = np.flatnonzero(row_class == op_class)
            by_sig = {int(i): rows[data.row_sig[rows] == i] for i in np.unique(data.row_sig[rows])}
            method, scores = choose_seen_method(data, by_sig, DEFAULT_FOLDS, repeats=1)
            chosen = scores[method]
            # A signature the class's method cannot fit (too few points for k-fold, or a curve
            # over a variable it lacks) falls back to the scaled class model and has no held-out
            # error of its own: counted apart and bounded, not dropped silently.
            unevaluable += int((~np.isfinite(chosen)).sum())
            errors += chosen[np.isfinite(chosen)].tolist()
            if op_class.startswith("attention"):
                attention[op_class] = float(np.median(chosen))
                methods[op_class] = method
    assert len(errors) + unevaluable == sum(len(data.infos) for data in datas)
    assert len(errors) >= MIN_SIGNATURES
    assert unevaluable <= MAX_UNEVALUABLE_SHARE * (len(errors) + unevaluable), unevaluable
    assert np.median(errors) <= TARGET_MEDIAN_PCT, np.median(errors)
    assert len(attention) >= MIN_ATTENTION_BACKENDS, attention
    for op_class, median in attention.items():
        assert median < PROFILE_ONLY_ATTENTION.get(op_class, ATTENTION_TARGET_PCT), attention
    for op_class, method in EXPECTED_ATTENTION_METHODS.items():
        assert methods[op_class] == method, methods
