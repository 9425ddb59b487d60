"""One-variable latency curves: what a profiled operation costs between its measured sizes.

Nearly every operation depends on one request variable (tokens T, or sequences B). Swept on a
GPU, its latency follows a roofline (launch floor, then bandwidth- or compute-bound growth, with a
bend where the working set leaves L2), broken by kernel effects that no smooth law predicts:
- kernel switches: another kernel above some size (the embedding gather between 16 and 24
  tokens is faster than below); the curve is not forced to be monotone;
- isolated outliers: one size where a library heuristic picks a poor kernel (a GEMM at 192 rows
  takes twice its neighbours); one point must not bend the curve between its neighbours;
- a partial-block penalty: elementwise kernels work in blocks of a fixed number of elements and
  finish a partial last block on a slower path, so sizes that are not a multiple of the block
  cost a little more: a sawtooth in the exact integer size, visible at small sizes.

A Curve is a shape-preserving cubic (PCHIP) in log-log through the measured sizes, an isolated
outlier replaced by the line through its neighbours (it must not move them) and small wiggles
flattened by a median of three (kernel switches kept), extrapolated flat below the
smallest size (the launch floor) and at most linearly above the largest, plus, where
the held-out points of the signature's own training data show that it pays, a constant time for
sizes that leave a partial block. Measured sizes are reproduced exactly.

Fitting and evaluation are plain numpy; nothing here imports scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Beyond the largest measured size: the last segment's log-log slope, clamped to [0, 1]. Latency
# never falls with more work, and a one-variable operation does work linear in its variable: a
# steeper last segment is a transition (the working set leaving L2), not a trend.
MAX_EXTRAPOLATION_SLOPE = 1.0
# Kernel block sizes (elements) whose partial last block is tried as an alignment effect; the
# vectorised elementwise kernels of PyTorch work on 512-2048 elements per block of threads.
ELEMENT_GRANULES = (512, 1024, 2048)
# Matrix products: row counts that are not a multiple of the tensor-core tile rows.
ROW_GRANULES = (8, 16)
# An alignment effect is fitted only with this many distinct aligned sizes to fit the base on.
MIN_ALIGNED_KNOTS = 3
# A knot further than this from the lines through its neighbours on both sides is an outlier
# (log seconds: 0.3 is 35%; kernel-choice wiggles and partial-block sawtooths stay below).
OUTLIER_LOG_TOLERANCE = 0.3
# A jump larger than this to a neighbour (log seconds: 0.5 is 65%) is a kernel switch, not a wiggle.
EDGE_LOG_JUMP = 0.5
# Folds of the inner cross-validation that decides, on a signature's training points only,
# whether an alignment effect is used and which.
INNER_FOLDS = 4
INNER_SEED = 1
# An alignment candidate must beat the plain curve's inner held-out error by this fraction.
ALIGNMENT_MARGIN = 0.02


@dataclass(frozen=True)
class Alignment:
    """Work of `unit` elements per unit of the variable, processed in blocks of `granule`."""

    unit: int
    granule: int

    def partial(self, values: np.ndarray) -> np.ndarray:
        """True where the work leaves a partial last block."""
        work = np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64) * self.unit
        return work % self.granule != 0


@dataclass
class Curve:
    """A fitted one-variable latency curve (see the module docstring)."""

    knot_x: np.ndarray  # measured sizes, ascending and distinct
    knot_log_y: np.ndarray  # smoothed log seconds at the knots, partial-block time removed
    knot_slope: np.ndarray  # d log(seconds) / d log(size) of the cubic at each knot
    measured_log_y: np.ndarray  # mean log seconds measured at each knot (reproduced exactly)
    high_slope: float
    alignment: Alignment | None = None
    partial_s: float = 0.0  # seconds added where alignment.partial

    def predict(self, values: np.ndarray) -> np.ndarray:
        """Seconds at `values` (0 where the value is not positive: the operation does not run)."""
        values = np.asarray(values, dtype=np.float64)
        positive = values > 0
        safe = np.where(positive, values, self.knot_x[0])
        out = np.exp(self._log_smooth(np.log(safe)))
        if self.alignment is not None and self.partial_s > 0:
            out = out + self.partial_s * self.alignment.partial(safe)
        index = np.minimum(np.searchsorted(self.knot_x, safe), len(self.knot_x) - 1)
        measured = self.knot_x[index] == safe
        out = np.where(measured, np.exp(self.measured_log_y[index]), out)
        return np.where(positive, out, 0.0)

    def _log_smooth(self, log_x: np.ndarray) -> np.ndarray:
        knots = np.log(self.knot_x)
        y = self.knot_log_y
        i = np.clip(np.searchsorted(knots, log_x, side="right") - 1, 0, len(knots) - 2)
        h = knots[i + 1] - knots[i]
        t = (log_x - knots[i]) / h
        t2 = t * t
        t3 = t2 * t
        inside = (
            (2 * t3 - 3 * t2 + 1) * y[i]
            + (t3 - 2 * t2 + t) * h * self.knot_slope[i]
            + (3 * t2 - 2 * t3) * y[i + 1]
            + (t3 - t2) * h * self.knot_slope[i + 1]
        )
        inside = np.where(log_x < knots[0], y[0], inside)
        return np.where(log_x > knots[-1], y[-1] + self.high_slope * (log_x - knots[-1]), inside)


def smooth_knots(log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """Knot values the curve goes through: isolated outliers replaced, small wiggles flattened,
    kernel switches kept (see `without_outliers` and `median_of_three`)."""
    return median_of_three(without_outliers(log_x, log_y))


def without_outliers(log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """The knots with isolated outliers replaced by the line through their two neighbours.

    An interior knot is an outlier when it lies further than OUTLIER_LOG_TOLERANCE, on the same
    side, from all of: the line through its two neighbours and the lines through the two knots on
    its left and the two on its right (where they exist). A kernel switch agrees with one side and
    is kept; a point unlike both sides is no trend to follow between its neighbours. The ends
    are kept (one side only)."""
    n = len(log_y)
    if n < 3:
        return log_y.copy()
    inner = np.arange(1, n - 1)
    between = _line(log_x, log_y, inner - 1, inner + 1, inner)
    gaps = [log_y[inner] - between]
    for first, second in ((inner - 2, inner - 1), (inner + 1, inner + 2)):
        exists = (first >= 0) & (second <= n - 1)
        guess = _line(log_x, log_y, np.clip(first, 0, n - 1), np.clip(second, 0, n - 1), inner)
        gaps.append(np.where(exists, log_y[inner] - guess, gaps[0]))
    gaps_arr = np.stack(gaps)
    above = np.all(gaps_arr > OUTLIER_LOG_TOLERANCE, axis=0)
    outlier = above | np.all(gaps_arr < -OUTLIER_LOG_TOLERANCE, axis=0)
    out = log_y.copy()
    out[inner[outlier]] = between[outlier]
    return out


def _line(log_x: np.ndarray, log_y: np.ndarray, a: np.ndarray, b: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The lines through knots a and b, evaluated at knots `at` (flat where a is b)."""
    run = log_x[b] - log_x[a]
    slope = (log_y[b] - log_y[a]) / np.where(run == 0, 1.0, run)
    return log_y[a] + slope * (log_x[at] - log_x[a])


def median_of_three(values: np.ndarray) -> np.ndarray:
    """Each interior value replaced by the median of itself and its two neighbours, where both
    neighbours lie within EDGE_LOG_JUMP of it: a local extremum among close neighbours is a
    wiggle of kernel choice or noise; next to a larger jump it is the edge of a kernel switch
    (the last size before a faster kernel) and is kept. The ends are kept."""
    out = values.copy()
    if len(values) >= 3:
        left, mid, right = values[:-2], values[1:-1], values[2:]
        # The median of three is their sum less the largest and the smallest.
        median = left + mid + right - np.maximum(np.maximum(left, mid), right) - np.minimum(
            np.minimum(left, mid), right
        )
        close = np.maximum(np.abs(mid - left), np.abs(mid - right)) <= EDGE_LOG_JUMP
        out[1:-1] = np.where(close, median, mid)
    return out


def pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Knot derivatives of a shape-preserving piecewise cubic through (x, y) (Fritsch and Carlson):
    no overshoot between knots, flat where the data turn, so a kernel switch does not ring."""
    h = np.diff(x)
    delta = np.diff(y) / h
    n = len(x)
    slopes = np.zeros(n)
    if n == 2:
        return np.full(2, delta[0])
    left, right = delta[:-1], delta[1:]
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same_sign = (left * right) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = (w1 + w2) / (w1 / left + w2 / right)
    slopes[1:-1] = np.where(same_sign, harmonic, 0.0)
    slopes[0] = _end_slope(h[0], h[1], delta[0], delta[1])
    slopes[-1] = _end_slope(h[-1], h[-2], delta[-1], delta[-2])
    return slopes


def _end_slope(h0: float, h1: float, d0: float, d1: float) -> float:
    """One-sided three-point derivative at an end knot, kept shape-preserving."""
    slope = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
    if np.sign(slope) != np.sign(d0):
        return 0.0
    if np.sign(d0) != np.sign(d1) and abs(slope) > abs(3 * d0):
        return 3 * d0
    return float(slope)


def _knot_means(x: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sizes (ascending) and the mean log seconds measured at each."""
    knots, inverse = np.unique(x, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    return knots, np.bincount(inverse, weights=np.log(seconds)) / counts


def _plain_curve(x: np.ndarray, seconds: np.ndarray) -> Curve:
    """The smooth curve through the measured sizes (at least two distinct ones)."""
    knots, measured = _knot_means(x, seconds)
    log_knots = np.log(knots)
    smooth = smooth_knots(log_knots, measured)
    last = (smooth[-1] - smooth[-2]) / (log_knots[-1] - log_knots[-2])
    return Curve(
        knot_x=knots,
        knot_log_y=smooth,
        knot_slope=pchip_slopes(log_knots, smooth),
        measured_log_y=measured,
        high_slope=float(np.clip(last, 0.0, MAX_EXTRAPOLATION_SLOPE)),
    )


def _aligned_curve(x: np.ndarray, seconds: np.ndarray, alignment: Alignment) -> Curve | None:
    """The curve with a partial-block time, or None when the data do not support one: too few
    aligned sizes to fit the base on, no partial sizes, or no positive extra time."""
    partial = alignment.partial(x)
    if not partial.any() or len(np.unique(x[~partial])) < MIN_ALIGNED_KNOTS:
        return None
    base = _plain_curve(x[~partial], seconds[~partial])
    extra = float(np.median(seconds[partial] - base.predict(x[partial])))
    adjusted = seconds - extra * partial
    if extra <= 0 or np.any(adjusted <= 0):
        return None
    curve = _plain_curve(x, adjusted)
    curve.alignment = alignment
    curve.partial_s = extra
    curve.measured_log_y = _knot_means(x, seconds)[1]
    return curve


def _fit_with(x: np.ndarray, seconds: np.ndarray, alignment: Alignment | None) -> Curve:
    """The curve with `alignment` where the data support it, else the plain one."""
    if alignment is not None:
        curve = _aligned_curve(x, seconds, alignment)
        if curve is not None:
            return curve
    return _plain_curve(x, seconds)


def _inner_error(x: np.ndarray, seconds: np.ndarray, alignment: Alignment | None) -> float:
    """Mean relative held-out error of curves fitted without each inner fold's points."""
    folds = np.random.default_rng(INNER_SEED).permutation(len(x)) % min(INNER_FOLDS, len(x))
    errors = []
    for fold in range(folds.max() + 1):
        test = folds == fold
        if len(np.unique(x[~test])) < 2:
            return np.inf
        curve = _fit_with(x[~test], seconds[~test], alignment)
        errors.append(np.abs(curve.predict(x[test]) / seconds[test] - 1.0))
    return float(np.mean(np.concatenate(errors)))


def fit_curve(values: np.ndarray, seconds: np.ndarray, candidates: Sequence[Alignment] = ()) -> Curve | None:
    """A Curve through the points, or None with fewer than two distinct positive sizes.

    Each alignment candidate is tried by an inner k-fold cross-validation on these points alone
    and kept only when it lowers their held-out error by ALIGNMENT_MARGIN: a caller that holds
    points out never lets them decide.
    """
    keep = (np.asarray(values) > 0) & (np.asarray(seconds) > 0)
    x = np.asarray(values, dtype=np.float64)[keep]
    y = np.asarray(seconds, dtype=np.float64)[keep]
    if len(np.unique(x)) < 2:
        return None
    chosen: Alignment | None = None
    if candidates:
        best = _inner_error(x, y, None)
        for alignment in _distinct_candidates(x, candidates):
            error = _inner_error(x, y, alignment)
            if error < best * (1.0 - ALIGNMENT_MARGIN):
                best, chosen = error, alignment
    return _fit_with(x, y, chosen)


def _distinct_candidates(x: np.ndarray, candidates: Sequence[Alignment]) -> list[Alignment]:
    """The candidates whose inner error can differ from the plain curve's and from an earlier
    candidate's, so skipping the others changes nothing that `fit_curve` chooses.

    A candidate enters a curve only through its partial-block mask on the fitted points, and
    every inner fold fits a subset of `x`: with no partial size in `x`, or fewer than
    MIN_ALIGNED_KNOTS aligned sizes, every inner fit is the plain curve (its error equals the
    plain error, which never beats the best by ALIGNMENT_MARGIN); with the same mask on `x` as an
    earlier candidate, every inner fit and prediction is that candidate's (an equal error never
    beats it either). Elementwise ops of a large hidden size leave no partial block at all: this
    halves the inner cross-validations of an H100 fit."""
    kept: list[Alignment] = []
    masks: list[np.ndarray] = []
    for alignment in candidates:
        partial = alignment.partial(x)
        if not partial.any() or len(np.unique(x[~partial])) < MIN_ALIGNED_KNOTS:
            continue
        if any(np.array_equal(partial, mask) for mask in masks):
            continue
        kept.append(alignment)
        masks.append(partial)
    return kept


def alignment_candidates(unit: int, matmul: bool) -> tuple[Alignment, ...]:
    """Partial-block effects worth trying for an operation with `unit` elements per unit of its
    variable: element blocks for elementwise kernels, row tiles for matrix products."""
    if matmul:
        return tuple(Alignment(1, granule) for granule in ROW_GRANULES)
    return tuple(Alignment(max(int(unit), 1), granule) for granule in ELEMENT_GRANULES)
