"""What measuring a point costs on a platform, and how often it fails: learned from the store's rows.

`dooly plan` prices its work with these (`PointCosts`); `dooly profile` then spends it. Kept apart
from the plan itself (which points are missing) because the two change for different reasons: a
new failure mode or cost term touches only this file.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dooly.profile.grid import LADDER
from dooly.trace.schema import KIND_ATTENTION

HELD_STATUSES = ("ok", "oom")
# A point whose measurement ran out of device memory: held (the point is known not to fit), cheap.
OOM_STATUS = "oom"
# A measurement that raised (`measure.STATUS_ERROR`): not held, so every later run attempts the point again.
FAILED_STATUS = "error"
# Device-seconds per point assumed when the store has no measurement on this platform to learn
# from: an order of magnitude, not an estimate (the plan says so).
DEFAULT_POINT_SECONDS = {"cuda": 0.05, "cpu": 0.02}
# What one row's device_seconds spans (dooly.profile.measure.Timer.measure): every phase of its
# measurement. Process start, tracing, model/engine start-up outside a measurement and shard
# writes are not in it, and not in the estimate.
ESTIMATE_PHASES = ("build", "warmup", "calibrate", "capture", "samples", "failed")
# Fewer held rows than this in an op class: its cost comes from the pooled rows of its kind. The
# same floor holds for failures: the failed attempts a class's failure cost is the mean of, the
# first attempts or retries its failure shares are counted on, and the attempts (none held) that
# mark a signature feature as one that fails (`FailureRates`).
MIN_CLASS_ROWS = 8
# A profile run's first attention measurement of a backend builds what every later one reuses (the
# attention path's kernels, plans and caches): on the H100 store it cost 4.2-11.6 s against
# 0.2 s for an ordinary point. Rows carry no order, so a run's start-up row is its costliest
# attention row of the class; its excess over the run's median row is the start-up, priced once
# per class a plan measures, where at least this many runs measured two points or more of it.
MIN_STARTUP_RUNS = 3
# Refinement points (`run.refinement_points`) per grid point of a one-variable op, where the
# store has no one-variable rows on the platform to count them from: the share measured on the
# CPU for a tiny Llama and Qwen2.5-0.5B (docs/profile.md).
DEFAULT_REFINEMENT_RATE = 0.1
PERCENT = 100.0
# Where the plan knows a point's kernel latency (`dooly.profile.latency`: the store's fitted
# database predicts it), a point costs a fixed part plus a multiple of that latency (the warm-up,
# calibration and samples run the kernel again and again): the two are fitted per op class on the
# held rows' measured latencies, by least squares, with this many rows at least (else per kind).
MIN_LATENCY_ROWS = MIN_CLASS_ROWS
# A point predicted to run longer than its class's memory wall on the platform is expected to run
# out of memory (an eager score tensor grows with the kernel's work): the wall is learned where the
# class has at least this many out-of-memory rows whose latency the fitted models predict.
MIN_OOM_ROWS = MIN_CLASS_ROWS
# Building a point's call generates its inputs, and those whose every dim the config fixes (the
# weights) only at a signature's first point in a run (`measure.build_aten_call` keeps them for the
# next): that point costs more in proportion to their elements (randomly drawn: 2.4 s for
# Qwen2.5-1.5B's 233M-element embedding table on a 2-core CPU, where each later point cost 1 ms). The
# per-signature term is learned from this many (run, signature) groups of two points or more at least.
MIN_BUILD_GROUPS = MIN_CLASS_ROWS
# Which row of a group paid its build is chosen again on lines fitted without the rows chosen so
# far, until the choice settles or this many times (on the CPU, H100 and H200 stores: in 2-3).
BUILD_ROW_PASSES = 5
# The most common causes (`failure_cause`) of a class's failed rows that the plan names.
CAUSES_SHOWN = 3
# A cause is the first line of a failed row's error text, this long at most once normalised.
CAUSE_CHARS = 160
# What varies between failures of one cause and is replaced so they group: memory addresses, then
# numbers standing alone (sizes, indices, versions; not the digits of a name such as bf16).
ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
ADDRESS_MARK = "<addr>"
NUMBER = re.compile(r"\b\d+(?:\.\d+)*\b")
NUMBER_MARK = "<n>"


@dataclass
class FailureRates:
    """How often a point's measurement fails on one platform, and what a failed attempt costs,
    learned from the store's own failed rows there (status `error`: not held, so every later run
    attempts the point again and pays for it again).

    A failed attempt costs the mean device-seconds of its op class's failed rows where there are
    at least MIN_CLASS_ROWS of them, else what a held point of the class costs (not another
    class's failures: where a measurement fails, and so what it spent first, differs by backend).
    Whether a planned point fails, three rules from the rows, first match wins:
    - its signature sets a feature (`failure_features`: a scalar such as soft-capping, in its op
      class) that at least MIN_CLASS_ROWS attempts on the platform set and none of them was held:
      it fails (the H100 store's flex signatures with gemma-2's soft-cap score_mod, which torch
      2.11's inductor does not compile: 1,196 attempts at 420 points over four runs, none held);
    - it failed before on this stack: it fails again at the share of its class's retries that
      failed (retries: the attempts after a point's first failure), or surely where the class
      has fewer than MIN_CLASS_ROWS retries to count (its last attempt failed, nothing says a
      retry differs);
    - otherwise at the share of its class's first attempts that failed (points of the first rule
      left out): failures no shape rule foresees (on the H100, flex's mixed batches of a 64-token
      chunk failed on four signatures and ran on four others with the same shapes)."""

    never_held: dict[str, int] = field(default_factory=dict)  # failure feature -> attempts, none held
    first_rates: dict[str, float] = field(default_factory=dict)  # op class -> failed share of first attempts
    retry_rates: dict[str, float] = field(default_factory=dict)  # op class -> failed share of retries
    failed_seconds: dict[str, float] = field(default_factory=dict)  # op class -> mean of a failed attempt
    source: str = "no failed measurements in the store"
    failed_attempts: dict[str, int] = field(default_factory=dict)  # op class -> its failed rows
    # op class -> its most common causes (`failure_cause`), with how many failed rows each: only
    # rows that carry error text count (shards written before the `error` column carry none).
    causes: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    @classmethod
    def fit(cls, rows: list[dict[str, Any]], platform: str) -> FailureRates:
        """Rows of any status on one platform. A held point is never attempted again on its stack,
        so a point's failures all came before its one held row, if any: its first attempt failed
        where it has a failed row, and its other attempts are retries."""
        features = _row_features(rows)
        attempts: dict[tuple[Any, ...], list[int]] = {}  # (stack, signature, point) -> [attempts, failures]
        point_class: dict[tuple[Any, ...], str] = {}
        by_feature: dict[str, list[int]] = {}  # failure feature -> [attempts, held]
        failed_totals: dict[str, list[float]] = {}  # op class -> [seconds, failed attempts]
        causes: dict[str, Counter[str]] = {}  # op class -> failed rows by cause
        for row in rows:
            failure = row["status"] == FAILED_STATUS
            op_class = str(row.get("op_class") or "")
            point = (tuple(row.get(c) for c in ATTEMPT_STACK), row["signature"], row["point_key"])
            counts = attempts.setdefault(point, [0, 0])
            counts[0] += 1
            counts[1] += failure
            point_class[point] = op_class
            for feature in features[row["signature"]]:
                feature_counts = by_feature.setdefault(feature, [0, 0])
                feature_counts[0] += 1
                feature_counts[1] += not failure
            if failure:
                total = failed_totals.setdefault(op_class, [0.0, 0.0])
                total[0] += float(row["device_seconds"] or 0.0)
                total[1] += 1
                cause = failure_cause(row.get("error"))
                if cause:
                    causes.setdefault(op_class, Counter())[cause] += 1
        never_held = {feature: n for feature, (n, held) in by_feature.items() if n >= MIN_CLASS_ROWS and not held}
        first: dict[str, list[int]] = {}  # op class -> [first attempts, failed]
        retries: dict[str, list[int]] = {}  # op class -> [retries, failed]
        for point, (n, failures) in attempts.items():
            if features[point[1]] & never_held.keys():
                continue
            op_class = point_class[point]
            tally = first.setdefault(op_class, [0, 0])
            tally[0] += 1
            tally[1] += failures > 0
            if failures and n > 1:
                tally = retries.setdefault(op_class, [0, 0])
                tally[0] += n - 1
                tally[1] += failures - 1
        failed_attempts = int(sum(n for _, n in failed_totals.values()))
        source = (f"{failed_attempts} failed attempts among the store's {len(rows)} on {platform}" if failed_attempts
                  else f"no failed measurements on {platform}")
        return cls(
            never_held=never_held,
            first_rates={c: failed / n for c, (n, failed) in first.items() if n >= MIN_CLASS_ROWS},
            retry_rates={c: failed / n for c, (n, failed) in retries.items() if n >= MIN_CLASS_ROWS},
            failed_seconds={c: spent / n for c, (spent, n) in failed_totals.items() if n >= MIN_CLASS_ROWS},
            source=source,
            failed_attempts={c: int(n) for c, (_, n) in failed_totals.items()},
            causes={c: counter.most_common(CAUSES_SHOWN) for c, counter in causes.items()},
        )

    def dooms(self, op_class: str, scalars: dict[str, Any]) -> bool:
        """Whether a signature sets a feature no attempt on the platform ever got held (rule one)."""
        return bool(failure_features(op_class, scalars) & self.never_held.keys())

    def chance(self, op_class: str, doomed: bool, failed_before: bool) -> float:
        """How likely one attempt at a point fails (the class docstring's three rules)."""
        if doomed:
            return 1.0
        if failed_before:
            return self.retry_rates.get(op_class, 1.0)
        return self.first_rates.get(op_class, 0.0)

    def describe(self) -> str:
        """The fitted rules, for the plan's text: what fails, how often, and what it costs."""
        if not self.failed_seconds:
            return self.source
        parts = [self.source]
        parts += [f"{feature} never held in {n} attempts" for feature, n in sorted(self.never_held.items())]
        parts += [f"{c}: {PERCENT * rate:.0f}% of retries fail again" for c, rate in sorted(self.retry_rates.items())]
        parts += [f"{c}: {PERCENT * rate:.1f}% of first attempts fail" for c, rate in sorted(self.first_rates.items())
                  if rate]
        parts += [f"a failed {c} attempt costs {seconds:.2f} s" for c, seconds in sorted(self.failed_seconds.items())]
        return "; ".join(parts)


def failure_cause(error: str | None) -> str:
    """What a failed row's error text says went wrong, in a form that groups: its first non-empty
    line with addresses and stand-alone numbers replaced (so one cause met at many shapes counts
    once), at most CAUSE_CHARS long; "" where the row carries no text."""
    line = next((line.strip() for line in (error or "").splitlines() if line.strip()), "")
    line = NUMBER.sub(NUMBER_MARK, ADDRESS.sub(ADDRESS_MARK, line))
    return " ".join(line.split())[:CAUSE_CHARS]


# What tells two attempts at one point apart from two points (the row's stack; absent columns are None).
ATTEMPT_STACK = ("platform", "engine", "engine_version", "backend", "dtype", "kv_dtype", "block_size",
                 "torch_version", "cuda_version")


def failure_features(op_class: str, scalars: dict[str, Any]) -> set[str]:
    """What failure rules are learned on: each scalar a signature sets (soft-capping, a sliding
    window: what changes the compiled kernel, not the shapes), within its op class, one feature
    each so that a feature no attempt survived implicates every signature that sets it."""
    return {f"{op_class}[{name}]" for name, value in scalars.items() if value not in (None, False, 0)}


def _row_features(rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    """signature -> its failure features, from the rows' readable signatures (none without one)."""
    features: dict[str, set[str]] = {}
    for row in rows:
        signature = row["signature"]
        if signature in features:
            continue
        text = row.get("signature_json")
        try:
            scalars = json.loads(text).get("scalars", {}) if text else {}
        except ValueError:
            scalars = {}
        features[signature] = failure_features(str(row.get("op_class") or ""),
                                               scalars if isinstance(scalars, dict) else {})
    return features


@dataclass
class PointCosts:
    """Device-seconds a point costs on one platform, learned from the store's own rows there.

    A row's device_seconds is its whole measurement (ESTIMATE_PHASES). The estimate is the mean
    per point of the op's class on the platform (each attention backend is a class); classes with
    fewer than MIN_CLASS_ROWS rows take their kind's mean (attention or not), and a platform with
    no rows the DEFAULT_POINT_SECONDS guess. A mean, not the median: costs are skewed (on the
    H100 store the median point cost a tenth of the mean), and a plan sums them. Attention
    points there cost about the same whatever the model (0.28-0.43 s per eager point: building,
    warming up and calibrating dominate), which is why size does not enter (bench/plan_estimate.py).
    One-variable ops are measured again where their latency bends (`run.refinement_points`):
    the expected count is the share of off-ladder points among the platform's one-variable rows.
    Those means are of held rows; a point expected to fail (`FailureRates`) is priced at what a
    failed attempt costs instead, in proportion to its chance of failing.
    A point whose kernel latency the plan knows (`dooly.profile.latency`, predicted by the store's
    fitted database) is priced by `latency_terms` instead of the mean: a fixed part plus a multiple
    of its latency, fitted on the class's held rows (their measured latencies). The mean prices a new
    model's points as if its kernels ran as long as those of the models measured before it; where
    they run twice as long, so does most of their measurement on the CPU (the samples are the cost)
    and on the GPU for its longer kernels (about 25 times their latency past 10 ms).
    An attention class also costs a start-up once per run (`startups`, MIN_STARTUP_RUNS): its
    start-up rows are left out of its mean, so a run of 26 points is not priced as a 1/98th share
    of one (the H100 8B's 8192-token top-up: 4.3 s of its 18.2 s was the start-up).
    Any other signature costs a build once per run (`build_terms`, `fit_build_terms`): its first
    point draws the weights, in proportion to their elements; those rows are left out of the
    means and the lines, so a model with twice the weights is not priced as if it had the same."""

    means: dict[str, float] = field(default_factory=dict)  # op class or kind -> mean seconds per point
    # op class or kind -> (fixed seconds per point, seconds per second of kernel latency)
    latency_terms: dict[str, tuple[float, float]] = field(default_factory=dict)
    # op class -> the predicted latency at and past which a point runs out of memory (`fit_memory_walls`)
    memory_walls: dict[str, float] = field(default_factory=dict)
    oom_seconds: dict[str, float] = field(default_factory=dict)  # op class -> mean cost of an out-of-memory point
    startups: dict[str, float] = field(default_factory=dict)  # attention class or kind -> seconds per run
    # (seconds, seconds per fixed input element) a non-attention signature's first point in a run adds
    build_terms: tuple[float, float] | None = None
    refinement_rates: dict[str, float] = field(default_factory=dict)  # op class -> extra per grid point
    default_seconds: float = DEFAULT_POINT_SECONDS["cpu"]
    default_refinement_rate: float = DEFAULT_REFINEMENT_RATE
    source: str = ""
    failures: FailureRates = field(default_factory=FailureRates)

    @classmethod
    def fit(cls, rows: list[dict[str, Any]], default_seconds: float, platform: str,
            predict: Callable[[list[dict[str, Any]]], list[float | None]] | None = None) -> PointCosts:
        """Rows of the platform, held (`HELD_STATUSES`) and failed (`FAILED_STATUS`); others are ignored.
        `predict` (`dooly.profile.latency.row_latencies` on the store's fitted models) gives the
        latencies of its out-of-memory rows, which place each class's memory wall."""
        totals: dict[str, list[float]] = {}
        on_ladder: dict[str, int] = {}
        off_ladder: dict[str, int] = {}
        held_rows = [row for row in rows if row["status"] in HELD_STATUSES]
        startup_rows, startups = startups_of(held_rows)
        # A row that carried a run's start-up, where one is priced for its class, is left out of
        # the class's point cost (its mean and its line in latency); so is a row that built a
        # signature's weights, where the builds are priced (`fit_build_terms`).
        point_rows = [row for row in held_rows
                      if not (id(row) in startup_rows and _startup_of(startups, str(row.get("op_class") or "")))]
        build_terms, build_rows = fit_build_terms(point_rows)
        point_rows = [row for row in point_rows if id(row) not in build_rows]
        for row in point_rows:
            op_class = str(row.get("op_class") or "")
            attention = _is_attention(op_class)
            for key in (op_class, _kind_key(attention)):
                total = totals.setdefault(key, [0.0, 0.0])
                total[0] += float(row["device_seconds"] or 0.0)
                total[1] += 1
            values = _point_values(row["point_key"])
            if not attention and len(values) == 1:
                (value,) = values.values()
                counter = on_ladder if value in LADDER else off_ladder
                counter[op_class] = counter.get(op_class, 0) + 1
        means = {key: spent / count for key, (spent, count) in totals.items()
                 if count >= MIN_CLASS_ROWS or key.startswith("kind:")}
        latency_terms = fit_latency_terms(point_rows)
        oom_rows = [row for row in held_rows if row["status"] == OOM_STATUS]
        walls = fit_memory_walls(held_rows, oom_rows, predict(oom_rows)) if predict is not None and oom_rows else {}
        oom_totals: dict[str, list[float]] = {}
        for row in oom_rows:
            oom_totals.setdefault(str(row.get("op_class") or ""), []).append(float(row["device_seconds"] or 0.0))
        oom_seconds = {c: statistics.fmean(values) for c, values in oom_totals.items() if len(values) >= MIN_OOM_ROWS}
        rates = {c: off_ladder.get(c, 0) / n for c, n in on_ladder.items() if n}
        total_on = sum(on_ladder.values())
        default_rate = sum(off_ladder.values()) / total_on if total_on else DEFAULT_REFINEMENT_RATE
        source = (f"the mean cost per point of each op class among the store's {len(held_rows)} points on {platform}, "
                  f"or its line in the kernel's latency (fixed part plus a multiple) where that is predicted"
                  if held_rows else f"no points measured on {platform} yet: {default_seconds:g} s per point assumed")
        failures = FailureRates.fit([row for row in rows if row["status"] in (*HELD_STATUSES, FAILED_STATUS)],
                                    platform)
        return cls(means, latency_terms, walls, oom_seconds, startups, build_terms, rates, default_seconds,
                   default_rate, source, failures)

    def seconds(self, op_class: str, latency: float | None = None) -> float:
        """What measuring one point of an op of this class costs: by its kernel's latency where
        that is known and the class (or its kind) has latency terms, else the class's mean."""
        if latency is not None and self.expects_oom(op_class, latency):
            return self.oom_seconds.get(op_class, self.seconds(op_class))
        if latency is not None:
            terms = _class_or_kind(self.latency_terms, op_class)
            if terms is not None:
                fixed, per_second = terms
                return fixed + per_second * latency
        mean = _class_or_kind(self.means, op_class)
        return self.default_seconds if mean is None else mean

    def expects_oom(self, op_class: str, latency: float | None) -> bool:
        """Whether a point of this predicted latency lies past its class's memory wall."""
        wall = self.memory_walls.get(op_class)
        return wall is not None and latency is not None and latency >= wall

    def startup_seconds(self, op_class: str) -> float:
        """What a run's first measurement of this class costs beyond an ordinary point (0 for an
        op that is not attention, or where the store has too few runs to tell)."""
        return _startup_of(self.startups, op_class)

    def build_seconds(self, op_class: str, signature: dict[str, Any]) -> float:
        """What a run's first point of this signature (`Operation.signature_payload()`) costs
        beyond an ordinary one: drawing its weights (0 for attention, which the engine builds once
        per run: `startup_seconds`, or where the store has too few groups to tell)."""
        if self.build_terms is None or _is_attention(op_class):
            return 0.0
        fixed, per_element = self.build_terms
        return fixed + per_element * fixed_elements(signature)

    def run_startups(self, items: list[Any]) -> dict[str, float]:
        """Attention class -> the start-up one run of these work items pays for it: once for each
        class whose points it measures (none where the store cannot tell one)."""
        classes = sorted({item.op.op_class() for item in items if item.missing})
        return {c: seconds for c in classes if (seconds := self.startup_seconds(c))}

    def run_seconds(self, items: list[Any]) -> float:
        """One run's work items: their points (`item_seconds`) and its start-ups (`run_startups`)."""
        return sum(self.item_seconds(item) for item in items) + sum(self.run_startups(items).values())

    def failed_seconds(self, op_class: str) -> float:
        """What a failed attempt at a point of this class costs (FailureRates' docstring)."""
        mean = self.failures.failed_seconds.get(op_class)
        return self.seconds(op_class) if mean is None else mean

    def attempt(self, op_class: str, doomed: bool, failed_before: bool,
                latency: float | None = None) -> tuple[float, float]:
        """One attempt at a point (of this kernel latency, where known): (chance it fails,
        expected device-seconds)."""
        chance = self.failures.chance(op_class, doomed, failed_before)
        return chance, chance * self.failed_seconds(op_class) + (1.0 - chance) * self.seconds(op_class, latency)

    def refinements(self, item: Any) -> float:
        """Expected refinement points of a work item (one-variable ops only)."""
        if item.op.kind == KIND_ATTENTION or len(item.op.request_vars()) != 1:
            return 0.0
        return self.refinement_rates.get(item.op.op_class(), self.default_refinement_rate) * len(item.missing)

    def item_seconds(self, item: Any) -> float:
        """The missing points' cost (each at its chance of failing and its predicted latency, where
        the plan has one: `item.latencies`), plus the expected refinements' (each at the mean cost
        of the item's points: a refinement sits between two of them), plus its build
        (`build_seconds`) where it has missing points."""
        op_class = item.op.op_class()
        doomed = self.failures.dooms(op_class, item.op.scalars)
        latencies = item.latencies or [None] * len(item.missing)
        missing = sum(self.attempt(op_class, doomed, point.key in item.failed, latency)[1]
                      for point, latency in zip(item.missing, latencies, strict=True))
        priced = [self.seconds(op_class, latency) for latency in latencies if latency is not None]
        refinement = sum(priced) / len(priced) if priced else self.seconds(op_class)
        return missing + self.refinements(item) * refinement + self.item_build_seconds(item)

    def item_build_seconds(self, item: Any) -> float:
        """A work item's weight build (`build_seconds`), where it has points to measure."""
        if not item.missing or self.build_terms is None:
            return 0.0
        return self.build_seconds(item.op.op_class(), item.op.signature_payload())

    def item_failures(self, item: Any) -> tuple[float, float]:
        """A work item's expected failed points and the device-seconds those attempts cost."""
        op_class = item.op.op_class()
        doomed = self.failures.dooms(op_class, item.op.scalars)
        expected = sum(self.failures.chance(op_class, doomed, point.key in item.failed) for point in item.missing)
        return expected, expected * self.failed_seconds(op_class)


def fit_latency_terms(held_rows: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Op class (and kind) -> (fixed seconds, seconds per kernel-second) of a point's measurement,
    least squares over the held rows with a measured latency, MIN_LATENCY_ROWS of them at least.
    Both terms are kept non-negative: where the free fit's fixed part comes out below zero the line
    goes through the origin, and where its slope does, the class's points cost their mean whatever
    their latency."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in held_rows:
        latency = row.get("latency_median_s")
        if not latency or latency <= 0:
            continue
        op_class = str(row.get("op_class") or "")
        point = (float(latency), float(row["device_seconds"] or 0.0))
        for key in (op_class, _kind_key(_is_attention(op_class))):
            points.setdefault(key, []).append(point)
    terms = {}
    for key, values in points.items():
        if len(values) < MIN_LATENCY_ROWS:
            continue
        latency, seconds = np.array(values).T
        terms[key] = _non_negative_line(latency, seconds)
    return terms


def fit_build_terms(point_rows: list[dict[str, Any]]) -> tuple[tuple[float, float] | None, set[int]]:
    """(seconds, seconds per fixed input element) that a non-attention signature's first point in a
    run adds, and the rows (by `id()`) that paid it, learned over the platform's (run, signature)
    groups of two held points or more (MIN_BUILD_GROUPS). Rows carry no order, so a group's build
    row is the one that cost most beyond its class's line in latency (else beyond the group's
    others), the lines fitted again without the build rows so far (a large build raises them past
    a small one) until the choice settles, BUILD_ROW_PASSES at most; its build is that excess over
    the group's median excess; the terms are the non-negative line of builds against the
    signatures' fixed input elements (`fixed_elements`)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in point_rows:
        op_class = str(row.get("op_class") or "")
        if row.get("run_id") and row["status"] != OOM_STATUS and not _is_attention(op_class):
            groups.setdefault((str(row["run_id"]), str(row["signature"])), []).append(row)
    groups = {key: group for key, group in groups.items() if len(group) >= 2}
    if len(groups) < MIN_BUILD_GROUPS:
        return None, set()
    build_rows: set[int] = set()
    for _ in range(BUILD_ROW_PASSES):
        lines = fit_latency_terms([row for row in point_rows if id(row) not in build_rows])
        firsts = [group[int(np.argmax([_excess(lines, row) for row in group]))] for group in groups.values()]
        if {id(row) for row in firsts} == build_rows:
            break  # `lines` were fitted without these very rows
        build_rows = {id(row) for row in firsts}
    else:
        lines = fit_latency_terms([row for row in point_rows if id(row) not in build_rows])
    builds = []
    for first, group in zip(firsts, groups.values(), strict=True):
        signature = json.loads(first.get("signature_json") or "{}")
        builds.append((float(fixed_elements(signature)),
                       _excess(lines, first) - statistics.median(_excess(lines, row) for row in group)))
    elements, seconds = np.array(builds).T
    return _non_negative_line(elements, seconds), build_rows


def _excess(lines: dict[str, tuple[float, float]], row: dict[str, Any]) -> float:
    """A held row's cost beyond its class's (else its kind's) line in latency; all of it without a
    latency or a line."""
    seconds = float(row["device_seconds"] or 0.0)
    latency = row.get("latency_median_s")
    terms = _class_or_kind(lines, str(row.get("op_class") or ""))
    if not latency or terms is None:
        return seconds
    return seconds - terms[0] - terms[1] * float(latency)


def fixed_elements(signature: dict[str, Any]) -> int:
    """Elements of a signature's inputs whose every dim the config fixes (the weights: what a run
    draws once per signature), from its readable form (`Operation.signature_payload()`: a request
    dim is an expression, a config dim a number)."""
    total = 0
    for _, dims in signature.get("inputs", []):
        if all(isinstance(dim, int) for dim in dims):
            total += math.prod(dims)
    return total


def fit_memory_walls(held_rows: list[dict[str, Any]], oom_rows: list[dict[str, Any]],
                     oom_latencies: list[float | None]) -> dict[str, float]:
    """Op class -> the latency at and past which its points run out of memory on the platform: the
    threshold that misplaces the fewest of its rows, held rows by their measured latency (below it)
    and out-of-memory rows by the latency the fitted models predict for them (at or past it), where
    MIN_OOM_ROWS of the latter are predicted. On the H100 store eager attention's 156 such rows are
    predicted at 74 ms and more but one, while 31 of its 2,364 held kernels ran 80 ms or more: whatever
    the model, the score tensor a point builds grows as its kernel's work does."""
    predicted: dict[str, list[float]] = {}
    for row, latency in zip(oom_rows, oom_latencies, strict=True):
        if latency is not None:
            predicted.setdefault(str(row.get("op_class") or ""), []).append(latency)
    walls = {}
    for op_class, oom in predicted.items():
        if len(oom) < MIN_OOM_ROWS:
            continue
        held = np.sort([float(row["latency_median_s"]) for row in held_rows
                        if row["status"] != OOM_STATUS and row.get("op_class") == op_class and row.get("latency_median_s")])
        candidates = np.sort(np.array(oom))
        held_past = len(held) - np.searchsorted(held, candidates, side="left")
        oom_short = np.searchsorted(candidates, candidates, side="left")
        walls[op_class] = float(candidates[int(np.argmin(held_past + oom_short))])
    return walls


def _non_negative_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of y on x, both at least zero (`fit_latency_terms`)."""
    if np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        if intercept >= 0 and slope >= 0:
            return float(intercept), float(slope)
        if slope > 0:
            return 0.0, float(np.dot(x, y) / np.dot(x, x))
    return float(np.mean(y)), 0.0


def startups_of(held_rows: list[dict[str, Any]]) -> tuple[set[int], dict[str, float]]:
    """The rows (by `id()`) that carried a run's attention start-up (left out of a class's point
    mean where a start-up is priced for it), and the start-up per attention class and for the
    kind: the median over runs of the costliest row's excess over the run's median row, from runs
    that measured at least two points of the class (MIN_STARTUP_RUNS)."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in held_rows:
        op_class = str(row.get("op_class") or "")
        if _is_attention(op_class) and row.get("run_id"):
            runs.setdefault((str(row["run_id"]), op_class), []).append(row)
    startup_rows: set[int] = set()
    excess: dict[str, list[float]] = {}
    for (_, op_class), run_rows in runs.items():
        if len(run_rows) < 2:
            continue
        ordered = sorted(run_rows, key=lambda r: float(r["device_seconds"] or 0.0))
        costliest, median = ordered[-1], ordered[len(ordered) // 2]
        startup_rows.add(id(costliest))
        excess.setdefault(op_class, []).append(float(costliest["device_seconds"] or 0.0)
                                               - float(median["device_seconds"] or 0.0))
    pooled = [e for values in excess.values() for e in values]
    if pooled:
        excess[_kind_key(True)] = pooled
    startups = {key: statistics.median(values) for key, values in excess.items() if len(values) >= MIN_STARTUP_RUNS}
    return startup_rows, startups


def _startup_of(startups: dict[str, float], op_class: str) -> float:
    """An op class's start-up: its own, else attention's pooled one; none for other ops."""
    if not _is_attention(op_class):
        return 0.0
    return startups.get(op_class, startups.get(_kind_key(True), 0.0))


def _is_attention(op_class: str) -> bool:
    return op_class.startswith(f"{KIND_ATTENTION}:")


def _kind_key(attention: bool) -> str:
    return "kind:attention" if attention else "kind:other"


def _class_or_kind(table: dict[str, Any], op_class: str) -> Any:
    """An op class's entry in a table of classes and kinds (means, latency lines), else its kind's."""
    value = table.get(op_class)
    return value if value is not None else table.get(_kind_key(_is_attention(op_class)))


def _point_values(point_key: str) -> dict[str, int]:
    """The request values a point key holds (an attention key holds its batch: summed here)."""
    try:
        payload = json.loads(point_key)
    except ValueError:
        return {}
    if isinstance(payload, dict) and "seqs" in payload:
        seqs = payload["seqs"]
        decodes = sum(1 for q, _ in seqs if q == 1)
        return {"T": sum(q for q, _ in seqs), "B": len(seqs), "K": sum(q + c for q, c in seqs), "D": decodes}
    return {str(k): int(v) for k, v in payload.items()} if isinstance(payload, dict) else {}


