"""What is missing: trace the models, look their signatures up in the store, list the work.

A signature is held for a point when the store has a row for (signature, point) measured on the
same stack (every STACK_COLUMNS value equal) with status ok or oom. Rows of another stack are
reported as stale and re-measured, never silently reused. Within and across the listed models each
signature is planned once, for the first model that needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from dooly.errors import DoolyError
from dooly.profile.grid import LADDER, GridSpec, Point, attention_points, materialises_scores, variable_points
from dooly.profile.provenance import SHARED_BACKEND, Stack
from dooly.trace.schema import KIND_ATTENTION, KIND_COLLECTIVE, KIND_KERNEL, Operation, Trace

log = logging.getLogger(__name__)

HELD_STATUSES = ("ok", "oom")
# A measurement that raised (`measure.STATUS_ERROR`): not held, so every later run attempts the point again.
FAILED_STATUS = "error"
# Device-seconds per point assumed when the store has no measurement on this platform to learn
# from: an order of magnitude, not an estimate (the plan says so).
DEFAULT_POINT_SECONDS = {"cuda": 0.05, "cpu": 0.02}
PROFILED_KINDS = (KIND_KERNEL, KIND_ATTENTION, KIND_COLLECTIVE)
# What one row's device_seconds spans (dooly.profile.measure.Timer.measure): every phase of its
# measurement. Process start, tracing, model/engine start-up outside a measurement and shard
# writes are not in it, and not in the estimate.
ESTIMATE_PHASES = ("build", "warmup", "calibrate", "capture", "samples", "failed")
# Fewer held rows than this in an op class: its cost comes from the pooled rows of its kind. The
# same floor holds for failures: the failed attempts a class's failure cost is the mean of, the
# first attempts or retries its failure shares are counted on, and the attempts (none held) that
# mark a signature feature as one that fails (`FailureRates`).
MIN_CLASS_ROWS = 8
# Refinement points (`run.refinement_points`) per grid point of a one-variable op, where the
# store has no one-variable rows on the platform to count them from: the share measured on the
# CPU for a tiny Llama and Qwen2.5-0.5B (docs/profile.md).
DEFAULT_REFINEMENT_RATE = 0.1
PERCENT = 100.0


@dataclass
class WorkItem:
    signature: str
    op: Operation
    model_id: str
    stack: Stack
    points: list[Point]  # every point of the grid
    missing: list[Point]  # those the store does not hold
    held_seconds: float = 0.0  # what the held points cost when they were measured
    # Missing points the store records a failed attempt at on this stack: profile tries them again.
    failed: set[str] = field(default_factory=set)


@dataclass
class ModelPlan:
    model_id: str
    model_key: str
    signatures: list[str]
    profiled: list[str] = field(default_factory=list)  # missing at this model's turn
    reused: list[str] = field(default_factory=list)


@dataclass
class Plan:
    stack: Stack
    items: dict[str, WorkItem]
    models: list[ModelPlan]
    traces: list[Trace]
    stale_signatures: int = 0
    point_seconds: float = 0.0
    sources: dict[str, Any] = field(default_factory=dict)  # model_id -> ModelSpec to build it again
    configs: dict[str, Any] = field(default_factory=dict)  # model_key -> ModelSpec, stored beside its inventories
    comm_stack: Stack | None = None  # where collectives are measured (None: the traces have none)
    topology: dict[str, Any] = field(default_factory=dict)  # what the machine said about its links
    costs: PointCosts | None = None  # what a point costs on this platform, from the store's rows

    def work(self, shard_index: int = 0, shard_count: int = 1) -> list[WorkItem]:
        """This pod's share of the missing work: a deterministic split by signature hash."""
        items = [item for item in self.items.values() if item.missing]
        return [item for item in items if shard_of(item.signature, shard_count) == shard_index]

    def world_size(self) -> int:
        """Ranks the collectives need: the largest tensor-parallel degree of the traces."""
        return max([trace.tp for trace in self.traces if trace.collectives] or [1])

    def estimate_seconds(self, shard_index: int = 0, shard_count: int = 1) -> float:
        """Device-seconds the missing points (and their expected refinements) will take."""
        if self.costs is None:
            return sum(len(item.missing) for item in self.work(shard_index, shard_count)) * self.point_seconds
        return sum(self.costs.item_seconds(item) for item in self.work(shard_index, shard_count))

    def expected_refinement_points(self, shard_index: int = 0, shard_count: int = 1) -> int:
        if self.costs is None:
            return 0
        return round(sum(self.costs.refinements(item) for item in self.work(shard_index, shard_count)))

    def expected_failures(self, shard_index: int = 0, shard_count: int = 1) -> dict[str, Any]:
        """The missing points expected to fail, and what those attempts cost (part of the estimate).

        `points` is the expected count (a sum of chances, rounded): a subset of the missing points,
        which profile attempts all the same, so the point count does not change."""
        work = self.work(shard_index, shard_count)
        if self.costs is None:
            return {"points": 0, "device_seconds": 0.0, "never_held_points": 0, "failed_before_points": 0,
                    "source": "no cost model"}
        failures = self.costs.failures
        points = seconds = 0.0
        never_held = failed_before = 0
        for item in work:
            expected_points, expected_seconds = self.costs.item_failures(item)
            points += expected_points
            seconds += expected_seconds
            if failures.dooms(item.op.op_class(), item.op.scalars):
                never_held += len(item.missing)
            else:
                failed_before += sum(1 for point in item.missing if point.key in item.failed)
        return {"points": round(points), "device_seconds": round(seconds, 3), "never_held_points": never_held,
                "failed_before_points": failed_before, "source": failures.source}

    def summary(self) -> dict[str, Any]:
        missing = [i for i in self.items.values() if i.missing]
        return {
            "platform": self.stack.platform,
            "backend": self.stack.backend,
            "signatures": len(self.items),
            "missing_signatures": len(missing),
            "missing_points": sum(len(i.missing) for i in missing),
            "expected_refinement_points": self.expected_refinement_points(),
            "held_points": sum(len(i.points) - len(i.missing) for i in self.items.values()),
            "stale_signatures": self.stale_signatures,
            "estimated_device_seconds": round(self.estimate_seconds(), 3),
            "expected_failures": self.expected_failures(),
            "estimate": {
                "phases": list(ESTIMATE_PHASES),
                "excludes": "process start, tracing, engine start-up outside a measurement, shard writes",
                "source": self.costs.source if self.costs is not None else f"{self.point_seconds:g} s per point",
                "failures": self.costs.failures.describe() if self.costs is not None else "not priced",
            },
            "models": [
                {"model": m.model_id, "signatures": len(m.signatures), "profiled_signatures": len(m.profiled),
                 "reused_signatures": len(m.reused)}
                for m in self.models
            ],
        }


def shard_of(signature: str, shard_count: int) -> int:
    return int(hashlib.sha256(signature.encode()).hexdigest(), 16) % max(shard_count, 1)


def points_for(op: Operation, grid: GridSpec) -> list[Point]:
    if op.kind == KIND_ATTENTION:
        return attention_points(grid, op.scalars.get("sliding_window"), unaligned=materialises_scores(op.backend))
    return variable_points(op.request_vars(), grid)


def stack_for(op: Operation, stack: Stack, comm: Stack | None = None) -> Stack:
    if op.kind == KIND_COLLECTIVE:
        if comm is None:
            raise DoolyError(f"{op.op} is a collective, but no communication stack was given to plan it on")
        return comm
    return stack.for_backend(stack.backend if op.kind == KIND_ATTENTION else SHARED_BACKEND)


# What "same stack" means when planning for another machine whose software we cannot see.
PLATFORM_COLUMNS = ("platform", "engine", "backend", "dtype", "block_size")


def build_plan(traces: list[Trace], store: Any, stack: Stack, grid: GridSpec, *,
               software_agnostic: bool = False, comm: Stack | None = None) -> Plan:
    """Every signature of every trace, with the points the store lacks for this stack.

    `comm` is the stack collectives are measured on (`provenance.comm_stack`); traces with
    collectives need it. `software_agnostic` compares platform, engine, backend, dtype and block
    size only: for planning another machine's work, whose torch/driver versions this machine
    cannot know."""
    stacks = [stack.for_backend(SHARED_BACKEND), stack] + ([comm] if comm is not None else [])
    held, stale, failed, cost_rows = _held(store, stacks, software_agnostic)
    items: dict[str, WorkItem] = {}
    models: list[ModelPlan] = []
    for trace in traces:
        signatures = trace.signatures(PROFILED_KINDS)
        plan = ModelPlan(trace.model_id, trace.model_key, sorted(signatures))
        for signature, op in signatures.items():
            if signature in items:
                plan.reused.append(signature)
                continue
            points = points_for(op, grid)
            held_points = held.get(signature, {})
            missing = [p for p in points if p.key not in held_points]
            failed_points = failed.get(signature, set())
            item = WorkItem(signature, op, trace.model_id, stack_for(op, stack, comm), points, missing,
                            held_seconds=sum(held_points.get(p.key, 0.0) for p in points),
                            failed={p.key for p in missing if p.key in failed_points})
            items[signature] = item
            (plan.profiled if missing else plan.reused).append(signature)
        models.append(plan)
    stale_count = len({s for s in stale if s in items and items[s].missing})
    if stale_count:
        log.warning("%d signatures are held for another software stack only: re-measuring them", stale_count)
    default = DEFAULT_POINT_SECONDS.get(stack.device_type, DEFAULT_POINT_SECONDS["cpu"])
    costs = PointCosts.fit(cost_rows, default, stack.platform)
    return Plan(stack, items, models, traces, stale_count, _point_seconds(held, stack), comm_stack=comm, costs=costs)


def _held(store: Any, stacks: list[Stack], software_agnostic: bool
          ) -> tuple[dict[str, dict[str, float]], set[str], dict[str, set[str]], list[dict[str, Any]]]:
    """signature -> {point_key: device_seconds} held on these stacks, the signatures held for
    another stack only, signature -> the point keys whose measurement failed on these stacks (not
    held: profile attempts them again), and every held or failed row of the platform (any software
    version: what a point costs to measure there, and how often it fails) for `PointCosts`."""
    from dooly.store.schema import STACK_COLUMNS
    from dooly.store.shards import read_held

    compared = PLATFORM_COLUMNS if software_agnostic else STACK_COLUMNS

    held: dict[str, dict[str, float]] = {}
    stale: set[str] = set()
    failed: dict[str, set[str]] = {}
    cost_rows: list[dict[str, Any]] = []
    for stack in dict.fromkeys(stacks):
        expected = stack.columns()
        table = read_held(store, platform=stack.platform, engine=stack.engine, backend=stack.backend, dtype=stack.dtype)
        for row in table.to_pylist():
            if row["status"] not in (*HELD_STATUSES, FAILED_STATUS):
                continue
            cost_rows.append(row)
            same_stack = all(row[c] == expected[c] for c in compared)
            if row["status"] == FAILED_STATUS:
                if same_stack:
                    failed.setdefault(row["signature"], set()).add(row["point_key"])
                continue
            if not same_stack:
                stale.add(row["signature"])
                continue
            held.setdefault(row["signature"], {})[row["point_key"]] = row["device_seconds"]
    return held, stale, failed, cost_rows


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
    failed attempt costs instead, in proportion to its chance of failing."""

    means: dict[str, float] = field(default_factory=dict)  # op class or kind -> mean seconds per point
    refinement_rates: dict[str, float] = field(default_factory=dict)  # op class -> extra per grid point
    default_seconds: float = DEFAULT_POINT_SECONDS["cpu"]
    default_refinement_rate: float = DEFAULT_REFINEMENT_RATE
    source: str = ""
    failures: FailureRates = field(default_factory=FailureRates)

    @classmethod
    def fit(cls, rows: list[dict[str, Any]], default_seconds: float, platform: str) -> PointCosts:
        """Rows of the platform, held (`HELD_STATUSES`) and failed (`FAILED_STATUS`); others are ignored."""
        totals: dict[str, list[float]] = {}
        on_ladder: dict[str, int] = {}
        off_ladder: dict[str, int] = {}
        held_rows = [row for row in rows if row["status"] in HELD_STATUSES]
        for row in held_rows:
            op_class = str(row.get("op_class") or "")
            attention = op_class.startswith(f"{KIND_ATTENTION}:")
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
        rates = {c: off_ladder.get(c, 0) / n for c, n in on_ladder.items() if n}
        total_on = sum(on_ladder.values())
        default_rate = sum(off_ladder.values()) / total_on if total_on else DEFAULT_REFINEMENT_RATE
        source = (f"the mean cost per point of each op class among the store's {len(held_rows)} points on {platform}"
                  if held_rows else f"no points measured on {platform} yet: {default_seconds:g} s per point assumed")
        failures = FailureRates.fit([row for row in rows if row["status"] in (*HELD_STATUSES, FAILED_STATUS)],
                                    platform)
        return cls(means, rates, default_seconds, default_rate, source, failures)

    def seconds(self, op_class: str) -> float:
        """What measuring one point of an op of this class costs."""
        attention = op_class.startswith(f"{KIND_ATTENTION}:")
        mean = self.means.get(op_class)
        if mean is None:
            mean = self.means.get(_kind_key(attention))
        return self.default_seconds if mean is None else mean

    def failed_seconds(self, op_class: str) -> float:
        """What a failed attempt at a point of this class costs (FailureRates' docstring)."""
        mean = self.failures.failed_seconds.get(op_class)
        return self.seconds(op_class) if mean is None else mean

    def attempt(self, op_class: str, doomed: bool, failed_before: bool) -> tuple[float, float]:
        """One attempt at a point: (chance it fails, expected device-seconds)."""
        chance = self.failures.chance(op_class, doomed, failed_before)
        return chance, chance * self.failed_seconds(op_class) + (1.0 - chance) * self.seconds(op_class)

    def refinements(self, item: Any) -> float:
        """Expected refinement points of a work item (one-variable ops only)."""
        if item.op.kind == KIND_ATTENTION or len(item.op.request_vars()) != 1:
            return 0.0
        return self.refinement_rates.get(item.op.op_class(), self.default_refinement_rate) * len(item.missing)

    def item_seconds(self, item: Any) -> float:
        """The missing points' cost (each at its chance of failing), plus the expected refinements'."""
        op_class = item.op.op_class()
        doomed = self.failures.dooms(op_class, item.op.scalars)
        missing = sum(self.attempt(op_class, doomed, point.key in item.failed)[1] for point in item.missing)
        return missing + self.refinements(item) * self.seconds(op_class)

    def item_failures(self, item: Any) -> tuple[float, float]:
        """A work item's expected failed points and the device-seconds those attempts cost."""
        op_class = item.op.op_class()
        doomed = self.failures.dooms(op_class, item.op.scalars)
        expected = sum(self.failures.chance(op_class, doomed, point.key in item.failed) for point in item.missing)
        return expected, expected * self.failed_seconds(op_class)


def _kind_key(attention: bool) -> str:
    return "kind:attention" if attention else "kind:other"


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


def _point_seconds(held: dict[str, dict[str, float]], stack: Stack) -> float:
    costs = sorted(cost for points in held.values() for cost in points.values())
    if not costs:
        return DEFAULT_POINT_SECONDS.get(stack.device_type, DEFAULT_POINT_SECONDS["cpu"])
    return costs[len(costs) // 2]
