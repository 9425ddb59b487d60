"""How far each measured signature was measured, so that coverage can say when a step lies beyond.

A measured signature's own model reproduces its measured sizes and interpolates between them;
past the largest one it extrapolates (a curve at most linearly, a linear model along its terms,
tree corrections flat), and nothing checks that guess. Coverage's measured share counts such an
operation as measured all the same, so the fit records per signature the largest value of each
request variable over the rows it was fitted on, and coverage reports the device time of the
steps (per operation) whose variables exceed them ("extrapolated").

Attention's cost follows the batch's kind as much as its sizes (the grid measures prefill batches
up to the token ladder's top but mixed batches only up to the budgets it fills), so an attention
signature's maxima are kept per batch regime (`features.regime_of`), with the longest sequence's
KV (`L`, context plus new tokens) beside the sums. Other operations' cost follows their own
request variables whatever the batch, so theirs are kept once, for those variables only.

The maxima bound each variable on its own (a box): a step inside every maximum may still combine
them as no measured point did. Nothing here imports scikit-learn.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dooly.fit.features import (
    FAMILY_ATTENTION,
    REGIME_DECODE,
    REGIME_MIXED,
    REGIME_PREFILL,
    REQUEST_VARS,
    TERM_INDEX,
    parse_point,
    regime_of,
)

# The longest sequence's KV tokens in a batch (its cached context plus its new tokens): what a
# kernel's per-sequence tiling sees, which the sums T and K do not bound.
LONGEST_KV = "L"
# Regimes by name, in `features.regime_of`'s numbering; ANY_REGIME: an operation whose cost does
# not depend on the batch's kind.
REGIME_NAMES = {REGIME_PREFILL: "prefill", REGIME_DECODE: "decode", REGIME_MIXED: "mixed"}
ANY_REGIME = "any"
# The variables an attention signature is checked on: without a sliding window the KV it reads
# (K, L); with one, the windowed reads S (a longer context adds no reads past the window).
ATTENTION_FULL_VARS = ("T", "B", "D", "K", LONGEST_KV)
ATTENTION_WINDOWED_VARS = ("T", "B", "D", "S")


@dataclass(frozen=True)
class MeasuredExtent:
    """The largest value of each variable a signature was measured at: by regime name
    (REGIME_NAMES) for attention, under ANY_REGIME for other operations."""

    maxima: Mapping[str, Mapping[str, int]]

    def limits(self, variables: Sequence[str]) -> dict[str, np.ndarray]:
        """Per variable recorded (one a fit did not record cannot be checked, and is left out),
        its limit in each regime, indexed by `regime_of`'s numbers. A regime the signature was
        never measured in takes the largest over those it was: sizes are checked here, not kinds."""
        out: dict[str, np.ndarray] = {}
        for var in variables:
            recorded = [m[var] for m in self.maxima.values() if var in m]
            if not recorded:
                continue
            limit = np.full(len(REGIME_NAMES), float(max(recorded)))
            for regime, name in REGIME_NAMES.items():
                own = self.maxima.get(name, self.maxima.get(ANY_REGIME, {}))
                if var in own:
                    limit[regime] = own[var]
            out[var] = limit
        return out

    def to_json(self) -> dict[str, dict[str, int]]:
        return {regime: {var: int(value) for var, value in sorted(m.items())} for regime, m in sorted(self.maxima.items())}


def checked_variables(family: str, request_vars: Iterable[str], window: int) -> tuple[str, ...]:
    """What an operation's extent is checked on (see ATTENTION_FULL_VARS)."""
    if family == FAMILY_ATTENTION:
        return ATTENTION_WINDOWED_VARS if window > 0 else ATTENTION_FULL_VARS
    return tuple(var for var in REQUEST_VARS if var in set(request_vars))


def signature_extent(
    family: str, request_vars: Sequence[str], terms: np.ndarray, point_keys: Sequence[str]
) -> MeasuredExtent:
    """The extent of one signature from the rows it is fitted on: its request terms (rows x
    TERMS) and point keys (an attention point's `seqs` give L)."""
    if family != FAMILY_ATTENTION:
        return MeasuredExtent({ANY_REGIME: _maxima(terms, [v for v in REQUEST_VARS if v in request_vars])})
    longest = np.array([_longest_kv(key) for key in point_keys], dtype=np.int64)
    regimes = regime_of(terms)
    maxima: dict[str, dict[str, int]] = {}
    for regime, name in REGIME_NAMES.items():
        rows = regimes == regime
        if not rows.any():
            continue
        maxima[name] = _maxima(terms[rows], REQUEST_VARS)
        if (longest[rows] >= 0).all():
            maxima[name][LONGEST_KV] = int(longest[rows].max())
    return MeasuredExtent(maxima)


def _maxima(terms: np.ndarray, variables: Sequence[str]) -> dict[str, int]:
    return {var: int(round(float(terms[:, TERM_INDEX[var]].max()))) for var in variables} if len(terms) else {}


def _longest_kv(point_key: str) -> int:
    """The longest sequence's KV of an attention point, -1 where the point lists no sequences."""
    seqs = parse_point(point_key).get("seqs")
    return max(int(q) + int(ctx) for q, ctx in seqs) if seqs else -1
