"""The attention grid: which batch compositions attention is measured on."""

from __future__ import annotations

from dooly.profile.grid import (
    MIXED_BUDGETS,
    AttentionShapes,
    GridSpec,
    attention_batches,
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
    from dooly.engines.base import Batch
    from dooly.profile.grid import UNALIGNED_KV, kv_aligned_to, materialises_scores

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
