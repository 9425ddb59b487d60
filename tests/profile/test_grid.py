"""The attention grid: which batch compositions attention is measured on."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dooly.engines.base import Batch, SeqShape
from dooly.profile.grid import (
    ATTENTION_DESIGNS,
    CHUNK_LENGTHS,
    DECODE_SEQ_COUNTS,
    MIXED_BUDGETS,
    REGIME_DECODE,
    REGIME_PREFILL,
    REGIMES,
    SPREAD_LOW,
    SPREAD_WIDTH,
    UNALIGNED_KV,
    UNBOUNDED_KV,
    AttentionShapes,
    GridSpec,
    attention_batches,
    batch_regime,
    kv_limit_reaching,
    longest_kv,
    spread,
    widen,
)


def budget_filling(batches, budget: int) -> list:
    return [b for b in batches if b.decode_seqs and b.decode_seqs < b.num_seqs and b.tokens == budget]


def test_mixed_points_fill_each_token_budget_exactly():
    """A loaded engine's mixed steps hold exactly its token budget; the grid holds such steps at
    every budget, beside every decode count, and points a few tokens past the budget as well."""
    batches = attention_batches(GridSpec())
    for budget in MIXED_BUDGETS:
        filling = budget_filling(batches, budget)
        assert {b.decode_seqs for b in filling} == {4, 16, 32, 64}
        assert all(b.seqs[0].query == budget - b.decode_seqs for b in filling)
    assert any(b.tokens > max(MIXED_BUDGETS) and b.decode_seqs for b in batches)


def test_budgets_are_clipped_to_the_grid_and_every_point_fits():
    grid = GridSpec(max_tokens=256, max_seqs=8, max_kv=8192, max_context=2048)
    batches = attention_batches(grid)
    assert budget_filling(batches, 256) and not budget_filling(batches, max(MIXED_BUDGETS))
    assert all(b.tokens <= grid.max_tokens and b.num_seqs <= grid.max_seqs and b.kv_tokens <= grid.max_kv for b in batches)
    assert len({tuple(b.seqs) for b in batches}) == len(batches)


def test_a_design_without_budgets_or_with_sparser_rungs_is_a_subset():
    full = {tuple(b.seqs) for b in attention_batches(GridSpec())}
    for shapes in (AttentionShapes(mixed_budgets=()), AttentionShapes(prefill_rung_step=2, decode_seq_counts=(1, 16, 256))):
        thinner = {tuple(b.seqs) for b in attention_batches(GridSpec(attention=shapes))}
        assert thinner < full
    rungs = [b.tokens for b in attention_batches(GridSpec(attention=AttentionShapes(prefill_rung_step=2)))
             if b.num_seqs == 1 and not b.decode_seqs and b.kv_tokens == b.tokens]
    assert max(rungs) == GridSpec().max_tokens  # the largest rung is kept whatever the step


def test_every_budget_filling_batch_keeps_a_chunk_of_half_the_budget_or_more():
    for max_tokens in (1, 2, 3, 64):
        grid = GridSpec(max_tokens=max_tokens, max_kv=4096, max_context=1024)
        batches = attention_batches(grid)
        assert all(s.query >= 1 for b in batches for s in b.seqs)
        for b in budget_filling(batches, max_tokens):
            assert b.seqs[0].query >= max_tokens // 2


def test_score_materialising_backends_get_copies_with_unaligned_kv_totals():
    """Eager attention's GEMMs slow down when the KV total is not a multiple of 8, and the engine's
    totals are whatever its batches hold: the grid gives such backends copies of its decode and
    budget-filling points whose KV total is odd, or 2 mod 4, and gives the others none."""
    from dooly.profile.grid import kv_aligned_to, materialises_scores

    assert materialises_scores("paged|eager") and not materialises_scores("paged|sdpa")
    plain = attention_batches(GridSpec())
    with_copies = attention_batches(GridSpec(), unaligned=True)
    added = [b for b in with_copies if b not in set(plain)]
    assert set(plain) < set(with_copies) and added
    assert {b.kv_tokens % 4 for b in added} >= {1, 2} and all(b.kv_tokens % 8 for b in added)
    for modulus, residue in UNALIGNED_KV:
        assert any(b.kv_tokens % modulus == residue and b.decode_seqs == b.num_seqs for b in added)
        assert any(b.kv_tokens % modulus == residue and b.decode_seqs < b.num_seqs for b in added)
    base = Batch.of(prefill=[(500, 0)], decode_ctx=[1000, 2000])  # K = 3502, already 2 mod 4
    odd, two = kv_aligned_to(base, 2, 1), kv_aligned_to(base, 4, 2)
    assert (odd.kv_tokens, two.kv_tokens) == (3503, 3506)
    assert odd.seqs[:-1] == base.seqs[:-1] and odd.tokens == base.tokens


LONG_CONTEXT = 16384


def test_a_context_adds_only_points_at_that_context_and_keeps_every_other():
    """Long prompts reach contexts past the fixed ladders: `--context N` adds chunked prefills,
    decodes and mixed batches at context N (decodes spread around it), raises max_context so they
    fit, and keeps every point the grid had, also those its ladders had clipped to its limits.
    The one exception: the unaligned copies of the grid's top-context points, whose last context
    passes the grid's max_context by a token or two (which drops them), fit the raised one."""
    small = GridSpec(max_tokens=256, max_seqs=8, max_kv=65536, max_context=2048)
    largest_modulus = max(modulus for modulus, _ in UNALIGNED_KV)
    for grid, unaligned in ((GridSpec(), False), (GridSpec(), True), (small, False),
                            (GridSpec(attention=ATTENTION_DESIGNS["thin-all"]), False)):
        widened = widen(grid, contexts=(LONG_CONTEXT,))
        assert widened.max_context == math.ceil(LONG_CONTEXT * (SPREAD_LOW + SPREAD_WIDTH))
        assert widened.max_kv == grid.max_kv and widened.max_tokens == grid.max_tokens
        before, after = set(attention_batches(grid, unaligned)), set(attention_batches(widened, unaligned))
        added = after - before
        assert before < after
        for batch in added:
            decodes = [s.context for s in batch.seqs if s.query == 1]
            chunk_at_context = any(s.query > 1 and s.context == LONG_CONTEXT for s in batch.seqs)
            spread_at_context = bool(decodes) and decodes[:-1] == spread(LONG_CONTEXT, len(decodes))[:-1]
            last = batch.seqs[-1]
            dropped_copy = unaligned and last.context > grid.max_context and any(
                Batch(batch.seqs[:-1] + (SeqShape(last.query, last.context - by),)) in set(attention_batches(grid))
                for by in range(1, largest_modulus + 1))
            assert chunk_at_context or spread_at_context or dropped_copy, batch
    widened = widen(GridSpec(), contexts=(LONG_CONTEXT,))
    added = set(attention_batches(widened)) - set(attention_batches(GridSpec()))
    chunks = {b for b in added if b.num_seqs == 1 and b.tokens > 1}
    assert chunks == {Batch.of(prefill=[(length, LONG_CONTEXT)]) for length in CHUNK_LENGTHS}
    decodes = {b for b in added if b.decode_seqs == b.num_seqs}
    assert decodes == {Batch.of(decode_ctx=spread(LONG_CONTEXT, count)) for count in DECODE_SEQ_COUNTS
                       if Batch.of(decode_ctx=spread(LONG_CONTEXT, count)).kv_tokens <= widened.max_kv}
    assert any(0 < b.decode_seqs < b.num_seqs for b in added)
    # A budget and a context together: the budget's points as it alone adds them, then the context's.
    both = widen(GridSpec(), token_budgets=(8192,), contexts=(LONG_CONTEXT,))
    budget = widen(GridSpec(), token_budgets=(8192,))
    assert set(attention_batches(budget)) < set(attention_batches(both))
    assert budget.max_tokens == both.max_tokens == 8192
    assert 8192 in budget.attention.mixed_budgets and 8192 in budget.attention.chunk_lengths


def test_the_batch_regime_is_the_fit_s():
    from dooly.fit.extent import REGIME_NAMES
    from dooly.fit.features import regime_scalar
    from dooly.fit.predictor import PHASE_DECODE, PHASE_MIXED, PHASE_PREFILL

    # Coverage names a phase's batches by the phase's own name (`coverage.plan_flags`).
    assert {PHASE_PREFILL, PHASE_DECODE, PHASE_MIXED} == set(REGIMES)
    batches = attention_batches(widen(GridSpec(), contexts=(LONG_CONTEXT,)), unaligned=True)
    assert {batch_regime(b) for b in batches} == set(REGIMES)
    for b in batches:
        assert batch_regime(b) == REGIME_NAMES[regime_scalar(b.decode_seqs, b.num_seqs)]


def test_the_kv_limit_reaching_a_total_is_the_smallest_that_holds_one():
    """`kv_limit_reaching` names the --max-kv at which the grid holds a batch of the regime reading
    at least that much KV: at that limit it does, one token less it does not; past every batch of
    the regime there is none."""
    grid = widen(GridSpec(), contexts=(LONG_CONTEXT,))

    def reaching(limit: int, regime: str, needed: int) -> bool:
        return any(batch_regime(b) == regime and b.kv_tokens >= needed
                   for b in attention_batches(dataclasses.replace(grid, max_kv=limit)))

    for regime in REGIMES:
        largest = max(b.kv_tokens for b in attention_batches(dataclasses.replace(grid, max_kv=UNBOUNDED_KV))
                      if batch_regime(b) == regime)
        for needed in (1000, 100_000, 486_145, largest):
            limit = kv_limit_reaching(needed, regime, grid)
            if needed > largest:
                assert limit is None
                continue
            assert limit is not None and limit >= needed
            assert reaching(limit, regime, needed) and not reaching(limit - 1, regime, needed), (regime, needed)
        assert kv_limit_reaching(largest, regime, grid) == largest
        assert kv_limit_reaching(largest + 1, regime, grid) is None
    decode = kv_limit_reaching(486_145, REGIME_DECODE, grid)
    assert decode is not None and decode > grid.max_kv  # past the default limit: the flag is needed
    assert kv_limit_reaching(1000, None, grid) == min(
        b.kv_tokens for b in attention_batches(grid) if b.kv_tokens >= 1000)
    with pytest.raises(ValueError, match="unknown batch regime"):
        kv_limit_reaching(1000, "all", grid)


def test_the_longest_sequence_of_a_regime():
    grid = GridSpec()
    assert longest_kv(grid, REGIME_DECODE) == round(spread_limit_of(grid) * (SPREAD_LOW + SPREAD_WIDTH)) + 1
    assert longest_kv(widen(grid, contexts=(LONG_CONTEXT,)), REGIME_PREFILL) == LONG_CONTEXT + max(CHUNK_LENGTHS)
    assert longest_kv(grid, None) == max(longest_kv(grid, regime) for regime in REGIMES)


def spread_limit_of(grid: GridSpec) -> int:
    """The largest nominal decode context the grid measures."""
    return max(b.seqs[0].context for b in attention_batches(grid) if b.num_seqs == 1 and b.decode_seqs == 1)
