"""The request points a signature is measured at.

Vidur's ranges are the reference: tokens from 1 up to the maximum batch tokens, sequences from 1
up to the maximum batch size, context lengths up to the model's serving length. Points are spaced
geometrically (about sqrt(2) apart), dense where latency bends (small batches are launch- and
bandwidth-bound) and sparse where it is linear; the fitter interpolates between them in log space.

Attention is measured on whole batch compositions, because its cost depends on how the KV lengths
split across sequences, not only on their sums: prefill, chunked prefill, decode and mixed batches,
with non-uniform context lengths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dooly.engines.base import Batch, SeqShape
from dooly.trace.schema import KIND_ATTENTION, Operation

# Geometric ladder, ~sqrt(2) apart: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ...
LADDER = tuple(sorted({int(round(m * 2**e)) for e in range(0, 18) for m in (1, 1.5)}))
DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_SEQS = 256
DEFAULT_MAX_KV = 262144
DEFAULT_MAX_CONTEXT = 8192
# Adaptive refinement of one-variable sweeps (see refinement_points).
REFINE_TOLERANCE = 0.05
REFINE_MIN_POINTS = 3
# Attention batch shapes (the full design; `AttentionShapes` holds one design).
PREFILL_SEQ_COUNTS = (2, 4, 8)
PREFILL_SEQ_LENGTHS = (64, 256, 1024)
CHUNK_LENGTHS = (64, 256, 1024, 2048)
CHUNK_CONTEXTS = (512, 2048, 8192)
DECODE_SEQ_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_CONTEXTS = (128, 512, 1024, 2048, 4096, 8192)
# Heavy-load mixed steps of a 2048-token budget carry a full-budget chunk beside ~50 decodes of
# 2-8K context: 2048-token chunks, 32 decodes and 8192-token contexts keep them inside the grid.
MIXED_CHUNKS = (64, 256, 1024, 2048)
MIXED_CHUNK_CONTEXTS = (0, 1024)
MIXED_DECODES = (4, 16, 32, 64)
MIXED_DECODE_CONTEXTS = (1024, 4096, 8192)
# A loaded engine fills its token budget: its mixed steps hold exactly that many query tokens
# (under CUDA graphs, padded to it), a multiple of the flash kernels' 128-row tile, where the
# points above hold a few more and run one wave of thread blocks longer. Mixed points whose chunk
# fills these budgets beside the decodes hold the steps the engine runs at its usual budgets.
MIXED_BUDGETS = (512, 2048)
# A budget-filling mixed batch needs room for a chunk and a decode of one token each.
MIN_BUDGET_TOKENS = 2
# Attention that materialises the scores (eager) multiplies [T, d] by [d, K] in cuBLAS, which picks
# its kernel by how K is aligned: on the H100 an odd K runs an sm75 `align1` GEMM about 3.3x slower
# than a K that is a multiple of 8 does, and K = 2 or 4 (mod 8) an sm80 one about 1.7x slower
# (lab/engine_step_profile.py on Llama-3.2-3B's eager heavy steps). A loaded engine's K is
# whatever its batch holds; the points above are mostly multiples of 16. Each (modulus, residue)
# adds a copy of the unaligned-base points whose last context is raised until K = residue (mod
# modulus): K odd, and K = 2 (mod 4).
UNALIGNED_KV = ((2, 1), (4, 2))
# The points that get unaligned copies: decodes of these counts at these contexts and up, and the
# budget-filling mixed points whose chunk starts a sequence.
UNALIGNED_DECODE_COUNTS = (8, 32, 128)
UNALIGNED_MIN_CONTEXT = 1024
UNALIGNED_CHUNK_CONTEXT = 0
# Backends whose attention materialises the scores (the part after `|` in `paged|eager`).
SCORE_MATERIALISING_BACKENDS = ("eager",)
# Non-uniform decode lengths: sequence i of n gets context * (SPREAD_LOW + SPREAD_WIDTH * i/(n-1)),
# so the batch's mean context is the nominal one while lengths differ by 3x end to end.
SPREAD_LOW = 0.5
SPREAD_WIDTH = 1.0
# Batch regimes by name, by `dooly.fit.features.regime_of`'s rule: no sequence decodes (prefill),
# every one does (decode), or some do (mixed).
REGIME_PREFILL = "prefill"
REGIME_DECODE = "decode"
REGIME_MIXED = "mixed"
REGIMES = (REGIME_PREFILL, REGIME_DECODE, REGIME_MIXED)
# A max_kv no batch reaches: the grid's batches with the KV limit lifted.
UNBOUNDED_KV = sys.maxsize


@dataclass(frozen=True)
class AttentionShapes:
    """The batch compositions attention is measured on: which lengths, counts and contexts each
    kind of batch takes (`attention_batches` clips them to the grid's maxima)."""

    prefill_rung_step: int = 1  # every n-th rung of the token ladder for one-sequence prefills
    prefill_seq_counts: tuple[int, ...] = PREFILL_SEQ_COUNTS
    prefill_seq_lengths: tuple[int, ...] = PREFILL_SEQ_LENGTHS
    chunk_lengths: tuple[int, ...] = CHUNK_LENGTHS
    chunk_contexts: tuple[int, ...] = CHUNK_CONTEXTS
    decode_seq_counts: tuple[int, ...] = DECODE_SEQ_COUNTS
    decode_contexts: tuple[int, ...] = DECODE_CONTEXTS
    mixed_chunks: tuple[int, ...] = MIXED_CHUNKS
    mixed_chunk_contexts: tuple[int, ...] = MIXED_CHUNK_CONTEXTS
    mixed_decodes: tuple[int, ...] = MIXED_DECODES
    mixed_decode_contexts: tuple[int, ...] = MIXED_DECODE_CONTEXTS
    mixed_budgets: tuple[int, ...] = MIXED_BUDGETS
    unaligned_kv: tuple[tuple[int, int], ...] = UNALIGNED_KV
    unaligned_decode_counts: tuple[int, ...] = UNALIGNED_DECODE_COUNTS


FULL_ATTENTION = AttentionShapes()
# Thinner designs for an attention layout the store has never measured: the same points, fewer of
# them (every point of a thin design is a point of the full one, so a later full plan measures only
# the rest). Mixed batches are 54-75% of attention's device time; `thin-mixed` keeps two values of
# each of their axes, `thin-all` also every other prefill rung and fewer decode counts and contexts.
# What each costs and how well it predicts: docs/unseen.md, "A thin attention grid".
THIN_MIXED_ATTENTION = AttentionShapes(
    prefill_seq_counts=(2, 8), prefill_seq_lengths=(64, 1024), mixed_chunks=(256, 2048), mixed_decodes=(4, 32),
    mixed_decode_contexts=(1024, 8192))
THIN_ALL_ATTENTION = AttentionShapes(
    prefill_rung_step=2, prefill_seq_counts=(2, 8), prefill_seq_lengths=(64, 1024), chunk_contexts=(512, 8192),
    decode_seq_counts=(1, 4, 16, 64, 256), decode_contexts=(128, 1024, 4096, 8192), mixed_chunks=(256, 2048),
    mixed_decodes=(4, 32), mixed_decode_contexts=(1024, 8192))
ATTENTION_DESIGNS = {"full": FULL_ATTENTION, "thin-mixed": THIN_MIXED_ATTENTION, "thin-all": THIN_ALL_ATTENTION}


@dataclass(frozen=True)
class GridSpec:
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_seqs: int = DEFAULT_MAX_SEQS
    max_kv: int = DEFAULT_MAX_KV
    max_context: int = DEFAULT_MAX_CONTEXT
    attention: AttentionShapes = FULL_ATTENTION

    def tokens(self) -> list[int]:
        return [v for v in LADDER if v <= self.max_tokens]

    def seqs(self) -> list[int]:
        return [v for v in LADDER if v <= self.max_seqs]

    def kv(self) -> list[int]:
        return [v for v in LADDER if v <= self.max_kv]


@dataclass(frozen=True)
class Point:
    """One request point: the request variables, and for attention the batch composition."""

    values: tuple[tuple[str, int], ...]
    batch: Batch | None = field(default=None, compare=False)

    @property
    def as_dict(self) -> dict[str, int]:
        return dict(self.values)

    @property
    def key(self) -> str:
        if self.batch is not None:
            payload: dict = self.batch.point_key_payload()
        else:
            payload = dict(self.values)
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def widen(grid: GridSpec, token_budgets: Iterable[int] = (), contexts: Iterable[int] = ()) -> GridSpec:
    """GRID with the points an engine's token budgets and its requests' context lengths need.

    A loaded engine's steps hold exactly its token budget: each budget raises the token sweep to
    it and adds chunked prefills of that many tokens and mixed batches that fill it. Long prompts
    reach contexts past the fixed ladders (which `--max-context` only caps): each context is added
    to the chunked-prefill, decode and mixed-decode contexts, and max_context is raised so the
    spread decode batches of that mean context fit. The ladders are first clipped to GRID's
    limits, so a raised max_context keeps every point GRID had and adds only those at the new
    contexts (and, for a backend that materialises the scores, the unaligned copies of GRID's
    top-context points, whose last context passed its max_context by a token or two). max_kv is
    left alone (`kv_limit_reaching` says what a given KV total needs)."""
    shapes = grid.attention
    max_tokens, max_context = grid.max_tokens, grid.max_context
    budgets = sorted(set(token_budgets))
    if budgets:
        shapes = dataclasses.replace(
            shapes,
            mixed_budgets=tuple(sorted({*shapes.mixed_budgets, *budgets})),
            chunk_lengths=tuple(sorted({*shapes.chunk_lengths, *budgets})),
        )
        max_tokens = max(max_tokens, budgets[-1])
    added = sorted(set(contexts))
    if added:
        spread_limit = _spread_limit(max_context)

        def clipped(values: tuple[int, ...], limit: int) -> tuple[int, ...]:
            return tuple(sorted({*(min(v, limit) for v in values), *added}))

        shapes = dataclasses.replace(
            shapes,
            chunk_contexts=clipped(shapes.chunk_contexts, max_context),
            mixed_chunk_contexts=tuple(sorted({min(v, max_context) for v in shapes.mixed_chunk_contexts})),
            decode_contexts=clipped(shapes.decode_contexts, spread_limit),
            mixed_decode_contexts=clipped(shapes.mixed_decode_contexts, spread_limit),
        )
        max_context = max(max_context, math.ceil(added[-1] * (SPREAD_LOW + SPREAD_WIDTH)))
    return dataclasses.replace(grid, max_tokens=max_tokens, max_context=max_context, attention=shapes)


def batch_regime(batch: Batch) -> str:
    """The batch's regime (REGIMES), by the rule the fit keeps attention's maxima by."""
    if batch.decode_seqs <= 0:
        return REGIME_PREFILL
    return REGIME_DECODE if batch.decode_seqs >= batch.num_seqs else REGIME_MIXED


def kv_limit_reaching(needed: int, regime: str | None, grid: GridSpec) -> int | None:
    """The smallest max_kv at which GRID (its other limits kept) holds an attention batch of
    REGIME (REGIMES; None: any) whose KV total is at least NEEDED; None when none does at any max_kv.

    A step read more KV than any measured batch of its regime: the answer is the `--max-kv` that
    measures one that reads as much. Only max_kv filters batches by their KV total, so it is the
    smallest such total among the batches with that limit lifted (the plain points; a
    score-materialising backend's unaligned copies add a few tokens to some of them)."""
    reaching = [b.kv_tokens for b in _of_regime(dataclasses.replace(grid, max_kv=UNBOUNDED_KV), regime)
                if b.kv_tokens >= needed]
    return min(reaching) if reaching else None


def longest_kv(grid: GridSpec, regime: str | None) -> int:
    """The longest sequence's KV (context plus new tokens) among GRID's attention batches of
    REGIME (None: any), 0 where it has none: how long a step's sequences may get inside the grid."""
    return max((s.kv for b in _of_regime(grid, regime) for s in b.seqs), default=0)


def _of_regime(grid: GridSpec, regime: str | None) -> list[Batch]:
    if regime is not None and regime not in REGIMES:
        raise ValueError(f"unknown batch regime {regime!r}, expected one of {', '.join(REGIMES)}")
    return [b for b in attention_batches(grid) if regime is None or batch_regime(b) == regime]


def variable_points(variables: list[str], grid: GridSpec) -> list[Point]:
    """Points for an op whose sizes depend on these request variables only."""
    if not variables:
        return [Point(values=())]
    axes: dict[str, list[int]] = {"T": grid.tokens(), "B": grid.seqs(), "K": grid.kv(), "S": grid.kv()}
    if len(variables) > 1:  # several variables: every other rung, to keep the product small
        axes = {name: values[::2] + ([values[-1]] if len(values) % 2 == 0 else []) for name, values in axes.items()}
    points: list[dict[str, int]] = [{}]
    for name in variables:
        points = [{**p, name: v} for p in points for v in axes[name]]
    return [Point(values=tuple(sorted(p.items()))) for p in points if _consistent(p)]


def _consistent(values: dict[str, int]) -> bool:
    """A step reads at least the tokens it writes and has at most one sequence per token."""
    tokens = values.get("T")
    if tokens is not None and values.get("B", 0) > tokens:
        return False
    return not (tokens is not None and (values.get("K", tokens) < tokens or values.get("S", tokens) < tokens))


def materialises_scores(backend: str) -> bool:
    """Whether this attention backend multiplies out the [T, K] scores (see UNALIGNED_KV)."""
    return backend.rsplit("|", 1)[-1] in SCORE_MATERIALISING_BACKENDS


def attention_batches(grid: GridSpec, unaligned: bool = False) -> list[Batch]:
    """Lengths are clipped to the grid's maxima (not dropped), so a small grid still covers every kind.

    `unaligned` adds the copies with unaligned KV totals (UNALIGNED_KV) that a backend which
    materialises the scores needs."""
    def lengths(values: tuple[int, ...], limit: int) -> list[int]:
        return sorted({min(v, limit) for v in values})

    shapes = grid.attention
    half_tokens = max(grid.max_tokens // 2, 1)
    # Spread contexts reach (SPREAD_LOW + SPREAD_WIDTH) x the nominal one: keep them within max_context.
    spread_limit = _spread_limit(grid.max_context)
    tokens = grid.tokens()
    rungs = tokens[:: shapes.prefill_rung_step]
    if rungs[-1] != tokens[-1]:
        rungs.append(tokens[-1])
    batches: list[Batch] = [Batch.of(prefill=[(q, 0)]) for q in rungs]
    for count in shapes.prefill_seq_counts:
        for length in lengths(shapes.prefill_seq_lengths, max(grid.max_tokens // count, 1)):
            batches.append(Batch.of(prefill=[(length, 0)] * count))
    for length in lengths(shapes.chunk_lengths, grid.max_tokens):
        for context in lengths(shapes.chunk_contexts, grid.max_context):
            batches.append(Batch.of(prefill=[(length, context)]))
    unaligned_bases: list[Batch] = []
    for count in shapes.decode_seq_counts:
        for context in lengths(shapes.decode_contexts, spread_limit):
            batches.append(Batch.of(decode_ctx=spread(context, count)))
            if count in shapes.unaligned_decode_counts and context >= UNALIGNED_MIN_CONTEXT:
                unaligned_bases.append(batches[-1])
    for chunk in lengths(shapes.mixed_chunks, half_tokens):
        for chunk_context in lengths(shapes.mixed_chunk_contexts, grid.max_context):
            for decodes in lengths(shapes.mixed_decodes, max(min(half_tokens, grid.max_seqs - 1), 1)):
                for context in lengths(shapes.mixed_decode_contexts, spread_limit):
                    batches.append(Batch.of(prefill=[(chunk, chunk_context)], decode_ctx=spread(context, decodes)))
    for budget in lengths(shapes.mixed_budgets, grid.max_tokens):
        if budget < MIN_BUDGET_TOKENS:
            continue
        for chunk_context in lengths(shapes.mixed_chunk_contexts, grid.max_context):
            # The chunk keeps at least half the budget.
            for decodes in lengths(shapes.mixed_decodes, max(min(budget // 2, grid.max_seqs - 1), 1)):
                for context in lengths(shapes.mixed_decode_contexts, spread_limit):
                    batches.append(Batch.of(prefill=[(budget - decodes, chunk_context)], decode_ctx=spread(context, decodes)))
                    if chunk_context == UNALIGNED_CHUNK_CONTEXT:
                        unaligned_bases.append(batches[-1])
    if unaligned:
        batches += [kv_aligned_to(base, modulus, residue) for base in unaligned_bases for modulus, residue in shapes.unaligned_kv]
    unique = {tuple(b.seqs): b for b in batches if _fits(b, grid)}
    return list(unique.values())


def kv_aligned_to(batch: Batch, modulus: int, residue: int) -> Batch:
    """`batch` with its last sequence's context raised (by less than `modulus`, at least 1) until
    its KV total is `residue` modulo `modulus`."""
    raise_by = (residue - batch.kv_tokens) % modulus or modulus
    last = batch.seqs[-1]
    return Batch(batch.seqs[:-1] + (SeqShape(last.query, last.context + raise_by),))


def attention_points(grid: GridSpec, window: int | None = None, unaligned: bool = False) -> list[Point]:
    return [batch_point(b, window) for b in attention_batches(grid, unaligned)]


def batch_point(batch: Batch, window: int | None = None) -> Point:
    values = {"T": batch.tokens, "B": batch.num_seqs, "K": batch.kv_tokens, "D": batch.decode_seqs}
    if window:
        values["S"] = sum(s.query + min(s.context, window - 1) for s in batch.seqs)
    return Point(values=tuple(sorted(values.items())), batch=batch)


def _spread_limit(max_context: int) -> int:
    """The largest nominal decode context whose spread lengths stay within max_context."""
    return max(int(max_context / (SPREAD_LOW + SPREAD_WIDTH)), 1)


def spread(context: int, count: int) -> list[int]:
    if count == 1:
        return [context]
    return [max(1, round(context * (SPREAD_LOW + SPREAD_WIDTH * i / (count - 1)))) for i in range(count)]


def _fits(batch: Batch, grid: GridSpec) -> bool:
    return (
        batch.tokens <= grid.max_tokens
        and batch.num_seqs <= grid.max_seqs
        and batch.kv_tokens <= grid.max_kv
        and all(s.kv <= grid.max_context + max(grid.attention.chunk_lengths) for s in batch.seqs)
        and all(s.context <= grid.max_context for s in batch.seqs)
    )


def refinement_points(op: Operation, rows: list[dict[str, Any]]) -> list[Point]:
    """Where a one-variable op's latency bends (a kernel switch, a tile boundary), measure more.

    The ladder is about sqrt(2) apart; wherever a measured point is off by more than
    REFINE_TOLERANCE from the log-log line through its two neighbours, the geometric midpoints on
    either side are measured too (one round, so the cost stays bounded). The fitter interpolates
    between points, so a denser grid at a kink is what keeps its error small there. Takes the
    operation and its measured rows only, so the in-process profiler and the collective ranks share it."""
    variables = op.request_vars()
    if op.kind == KIND_ATTENTION or len(variables) != 1 or len(rows) < REFINE_MIN_POINTS:
        return []
    name = variables[0]
    measured = sorted(
        (row[name], row["latency_median_s"]) for row in rows if row["status"] == "ok" and row["latency_median_s"]
    )
    have = {x for x, _ in measured}
    extra: set[int] = set()
    for (x0, y0), (x1, y1), (x2, y2) in zip(measured, measured[1:], measured[2:]):
        if min(y0, y1, y2) <= 0:
            continue
        weight = math.log(x1 / x0) / math.log(x2 / x0)
        expected = math.exp(math.log(y0) + weight * (math.log(y2) - math.log(y0)))
        if abs(expected - y1) / y1 > REFINE_TOLERANCE:
            for low, high in ((x0, x1), (x1, x2)):
                middle = round(math.sqrt(low * high))
                if low < middle < high and middle not in have:
                    extra.add(middle)
    return [Point(values=((name, value),)) for value in sorted(extra)]
