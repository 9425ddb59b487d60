"""Features: the vectorised aggregates agree with a token-by-token count, and the physical
features of a matrix product are its FLOPs and bytes."""

from __future__ import annotations

import numpy as np

from dooly.fit.features import (
    FAMILY_MATMUL,
    MATMUL_FEATURES,
    QUERY_TILE,
    TERM_INDEX,
    aggregates_from_seqs,
    family_of,
    kernel_waves,
    physical_design,
    sm_count,
    static_features,
    term_matrix,
)


def brute_force(seqs: list[list[int]], window: int) -> dict[str, float]:
    """Count attention work key by key, the slow and obvious way."""
    pairs = 0
    s = 0
    for q, ctx in seqs:
        for j in range(1, q + 1):
            visible = ctx + j
            pairs += min(visible, window) if window > 0 else visible
        s += (min(ctx, window - 1) if window > 0 else ctx) + q
    max_q = max(q for q, _ in seqs)
    max_kv = max(q + c for q, c in seqs)
    return {
        "T": sum(q for q, _ in seqs),
        "B": len(seqs),
        "K": sum(q + c for q, c in seqs),
        "D": sum(1 for q, c in seqs if q == 1 and c > 0),
        "S": s,
        "attn_pairs": pairs,
        "padded": len(seqs) * max_q * max_kv,
    }


def test_aggregates_match_token_by_token_count():
    rng = np.random.default_rng(7)
    points = []
    for _ in range(40):
        n = int(rng.integers(1, 6))
        points.append([[int(rng.integers(1, 40)), int(rng.integers(0, 90))] for _ in range(n)])
    for window in (0, 1, 16, 64):
        got = aggregates_from_seqs(points, window)
        for i, seqs in enumerate(points):
            expected = brute_force(seqs, window)
            for name, value in expected.items():
                assert got[name][i] == value, (name, seqs, window)


def test_matmul_features_are_flops_and_bytes():
    rng = np.random.default_rng(3)
    for _ in range(20):
        k, n = (int(v) for v in rng.integers(16, 20000, size=2))
        tokens = rng.integers(1, 5000, size=8).astype(float)
        static = static_features(
            FAMILY_MATMUL, "aten.mm.default", {"in0.1": k, "in1.0": k, "in1.1": n}, ["T"]
        )
        terms = term_matrix({"T": tokens}, len(tokens))
        design = physical_design(
            terms, np.tile(static.term_index, (8, 1)), np.tile(static.multiplier, (8, 1))
        )
        columns = dict(zip(MATMUL_FEATURES, design.T, strict=True))
        np.testing.assert_allclose(columns["flops"], tokens * k * n)
        np.testing.assert_allclose(
            columns["bytes_request"] + columns["bytes_static"], tokens * k + k * n + tokens * n
        )


def test_addmm_reads_its_matrices_from_inputs_one_and_two():
    static = static_features(
        FAMILY_MATMUL, "aten.addmm.default", {"in0.0": 300, "in1.1": 200, "in2.0": 200, "in2.1": 300}, ["T"]
    )
    flops = dict(zip(MATMUL_FEATURES, zip(static.term_index, static.multiplier, strict=True), strict=True))[
        "flops"
    ]
    assert flops == (TERM_INDEX["T"], 200.0 * 300.0)


def test_families():
    assert family_of("attention:paged|sdpa", "attention") == "attention"
    assert family_of("aten.bmm.default", "aten.bmm.default") == "matmul"
    assert family_of("aten.mul.Tensor", "aten.mul.Tensor") == "generic"


def test_tree_ensemble_matches_scikit_learn():
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    from dooly.fit.regressors import GBT_PARAMS, TreeEnsemble

    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 6))
    y = np.sin(x[:, 0]) + x[:, 1] * x[:, 2] + rng.normal(scale=0.1, size=500)
    probe = rng.normal(size=(9000, 6))  # more than one chunk of rows
    with threadpool_limits(limits=1, user_api="openmp"):  # OpenMP spin-waits on a busy 2-core box
        fitted = HistGradientBoostingRegressor(min_samples_leaf=5, **GBT_PARAMS).fit(x, y)
        expected = fitted.predict(probe)
    np.testing.assert_allclose(
        TreeEnsemble.from_hist_gbr(fitted).predict(probe), expected, rtol=1e-12, atol=1e-12
    )


H100 = "NVIDIA-H100-80GB-HBM3"


def test_waves_of_a_packed_attention_call_follow_the_sm_count():
    """Llama-3.1-8B's 32 heads on the H100's 132 SMs: 128-row query tiles x 32 heads fill four
    waves at T=2048 and need a fifth from T=2049 (lab/attention_engine_padding.py measured it)."""
    eight_b = {"in0.0": 1, "in0.1": 32, "in0.3": 128, "in1.1": 8}
    tiles = static_features("attention", "attention", eight_b, ("T", "B", "K", "D"), sm_count(H100)).wave_tiles
    assert tiles == 132 / 32
    waves = kernel_waves(np.array([1, 128, 512, 513, 2048, 2049, 2080, 4224, 4225]), tiles)
    np.testing.assert_array_equal(waves, [1, 1, 1, 2, 4, 5, 5, 8, 9])
    # Qwen2.5-7B's 28 heads: 33 tiles are exactly 7 waves, which floating point must not round up.
    assert kernel_waves(33 * QUERY_TILE, 132 / 28) == 7
    # An unknown platform: no SM count, no quantisation.
    assert sm_count("Synthetic-GPU-80GB") == 0
    assert static_features("attention", "attention", eight_b, ("T",), 0).wave_tiles == 0.0
    np.testing.assert_allclose(kernel_waves(np.array([2048, 2049]), 0.0), [16.0, 2049 / QUERY_TILE])


def test_waves_kv_is_the_waves_times_the_keys_each_layer_reads():
    seqs = [[[2048, 0], [1, 30000], [1, 500]], [[64, 100]]]  # T=2050: 17 tiles, 5 waves
    for window in (0, 4096):
        agg = aggregates_from_seqs(seqs, window, 132 / 32)
        expected = [5 * brute_force(seqs[0], window)["S"], 1 * brute_force(seqs[1], window)["S"]]
        np.testing.assert_allclose(agg["waves_kv"], expected)
    terms = term_matrix(aggregates_from_seqs(seqs, 0, 132 / 32), len(seqs))
    assert terms[0, TERM_INDEX["waves_kv"]] == 5 * terms[0, TERM_INDEX["K"]]


def test_kv_alignment_terms_price_the_pairs_of_unaligned_kv_totals_only():
    from dooly.fit.features import KV_ALIGNMENT_TERMS, uniform_aggregates

    seqs = [[[512, 0], [1, 1000]], [[512, 0], [1, 1001]], [[512, 0], [1, 1003]], [[512, 0], [1, 1007]]]
    agg = aggregates_from_seqs(seqs, 0)  # K = 1513 (odd), 1514 (2 mod 8), 1516 (4 mod 8), 1520 (aligned)
    pairs = agg["T"] * agg["K"]
    np.testing.assert_allclose(agg["pairs_odd_kv"], [pairs[0], 0, 0, 0])
    np.testing.assert_allclose(agg["pairs_unaligned_kv"], [0, pairs[1], pairs[2], 0])
    np.testing.assert_allclose(agg["odd_kv"], [agg["K"][0], 0, 0, 0])
    np.testing.assert_allclose(agg["unaligned_kv"], [0, agg["K"][1], agg["K"][2], 0])
    terms = term_matrix(agg, len(seqs))
    for name in KV_ALIGNMENT_TERMS:
        np.testing.assert_allclose(terms[:, TERM_INDEX[name]], agg[name])
    uniform = uniform_aggregates({"T": agg["T"], "B": agg["B"], "K": agg["K"]}, np.zeros(len(seqs)))
    np.testing.assert_allclose(uniform["pairs_odd_kv"], agg["pairs_odd_kv"])


def test_alignment_terms_enter_a_dense_fit_only_where_batches_of_their_class_were_measured():
    """A signature whose only odd KV totals are lone prefills or single decodes gets no odd-KV
    term (fitted on them alone it extrapolates to heavy steps wildly); one holding the grid's
    unaligned batch copies gets it, and the fit then prices an odd step's extra GEMM time."""
    from dooly.fit.regressors import (
        TREE_BASE_TERMS,
        fit_corrected_linear,
        measured_alignment_terms,
    )

    lone = [[[q, 0]] for q in (3, 5, 7, 9, 11)] + [[[1, c]] for c in (128, 512, 1024, 2048)]
    aligned = [[[512 - d, 0]] + [[1, c]] * d for d in (4, 16, 32, 64) for c in (1024, 4096, 8192)]
    odd = [seqs[:-1] + [[1, seqs[-1][1] + 1]] for seqs in aligned]
    assert not measured_alignment_terms(term_matrix(aggregates_from_seqs(lone + aligned, 0), len(lone + aligned)))
    seqs = lone + aligned + odd
    terms = term_matrix(aggregates_from_seqs(seqs, 0), len(seqs))
    assert measured_alignment_terms(terms) == ("pairs_odd_kv", "odd_kv")
    penalty = 1.0 + 0.25 * (terms[:, TERM_INDEX["pairs_odd_kv"]] > 0) * (terms[:, TERM_INDEX["D"]] > 0)
    seconds = (1e-5 + 4e-13 * terms[:, TERM_INDEX["T*K"]]) * penalty
    coef, _ = fit_corrected_linear(terms, seconds, TREE_BASE_TERMS)
    assert coef[TERM_INDEX["pairs_odd_kv"]] + coef[TERM_INDEX["odd_kv"]] > 0
    assert coef[TERM_INDEX["pairs_unaligned_kv"]] == coef[TERM_INDEX["unaligned_kv"]] == 0
    from dooly.fit.regressors import fit_local_linear

    rows = slice(len(lone) + len(aligned), None)
    without = fit_local_linear(terms, seconds, ("const", "T", "K", "T*K"))
    error = np.mean(np.abs(terms[rows] @ coef / seconds[rows] - 1.0))
    assert error < 0.5 * np.mean(np.abs(terms[rows] @ without / seconds[rows] - 1.0))
