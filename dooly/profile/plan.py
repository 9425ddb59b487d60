"""What is missing: trace the models, look their signatures up in the store, list the work.

A signature is held for a point when the store has a row for (signature, point) measured on the
same stack (every STACK_COLUMNS value equal) with status ok or oom. Rows of another stack are
reported as stale and re-measured, never silently reused. Within and across the listed models each
signature is planned once, for the first model that needs it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dooly.errors import DoolyError
from dooly.profile.costs import (
    DEFAULT_POINT_SECONDS,
    ESTIMATE_PHASES,
    FAILED_STATUS,
    HELD_STATUSES,
    PointCosts,
)
from dooly.profile.grid import GridSpec, Point, attention_points, materialises_scores, variable_points
from dooly.profile.latency import open_predictor, predict_latencies, row_latencies
from dooly.profile.provenance import SHARED_BACKEND, Stack
from dooly.trace.schema import KIND_ATTENTION, KIND_COLLECTIVE, KIND_KERNEL, Operation, Trace

log = logging.getLogger(__name__)

PROFILED_KINDS = (KIND_KERNEL, KIND_ATTENTION, KIND_COLLECTIVE)


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
    # The kernel latency of each missing point as the store's fitted database predicts it (None
    # where it cannot; no list where the store has no fitted models): `dooly.profile.latency`.
    latencies: list[float | None] | None = None


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
    latency_source: str = ""  # where the missing points' predicted kernel latencies come from

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
        return self.costs.run_seconds(self.work(shard_index, shard_count))

    def startups(self, shard_index: int = 0, shard_count: int = 1) -> dict[str, float]:
        """Attention class -> the run start-up the estimate includes for it (`PointCosts.startups`)."""
        if self.costs is None:
            return {}
        return {c: round(seconds, 3) for c, seconds in self.costs.run_startups(self.work(shard_index, shard_count)).items()}

    def builds(self, shard_index: int = 0, shard_count: int = 1) -> dict[str, Any]:
        """The weight builds the estimate includes (`PointCosts.build_seconds`): one per missing
        non-attention signature, the first of its points drawing its weights."""
        if self.costs is None or self.costs.build_terms is None:
            return {"signatures": 0, "device_seconds": 0.0}
        priced = [seconds for item in self.work(shard_index, shard_count)
                  if (seconds := self.costs.item_build_seconds(item))]
        return {"signatures": len(priced), "device_seconds": round(sum(priced), 3)}

    def expected_refinement_points(self, shard_index: int = 0, shard_count: int = 1) -> int:
        if self.costs is None:
            return 0
        return round(sum(self.costs.refinements(item) for item in self.work(shard_index, shard_count)))

    def expected_failures(self, shard_index: int = 0, shard_count: int = 1) -> dict[str, Any]:
        """The missing points expected to fail, and what those attempts cost (part of the estimate).

        `points` is the expected count (a sum of chances, rounded): a subset of the missing points,
        which profile attempts all the same, so the point count does not change. `causes` says why,
        for each op class expected to fail: its most common causes among the store's failed rows
        with error text (none where its rows carry no text), so a user can tell a failure worth
        fixing (or leaving out of the run) from one the plan merely prices."""
        work = self.work(shard_index, shard_count)
        if self.costs is None:
            return {"points": 0, "device_seconds": 0.0, "never_held_points": 0, "failed_before_points": 0,
                    "causes": [], "source": "no cost model"}
        failures = self.costs.failures
        points = seconds = 0.0
        never_held = failed_before = 0
        failing_classes: set[str] = set()
        for item in work:
            expected_points, expected_seconds = self.costs.item_failures(item)
            points += expected_points
            seconds += expected_seconds
            if expected_points:
                failing_classes.add(item.op.op_class())
            if failures.dooms(item.op.op_class(), item.op.scalars):
                never_held += len(item.missing)
            else:
                failed_before += sum(1 for point in item.missing if point.key in item.failed)
        causes = [{"op_class": op_class, "cause": cause, "attempts": count,
                   "failed_attempts": failures.failed_attempts[op_class]}
                  for op_class in sorted(failing_classes) for cause, count in failures.causes.get(op_class, [])]
        return {"points": round(points), "device_seconds": round(seconds, 3), "never_held_points": never_held,
                "failed_before_points": failed_before, "causes": causes, "source": failures.source}

    def expected_oom_points(self, shard_index: int = 0, shard_count: int = 1) -> int:
        """Missing points predicted past their class's memory wall (`PointCosts.memory_walls`):
        measured all the same, each as cheaply as an out-of-memory point is."""
        if self.costs is None:
            return 0
        return sum(self.costs.expects_oom(item.op.op_class(), latency)
                   for item in self.work(shard_index, shard_count) for latency in item.latencies or [])

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
            "expected_oom_points": self.expected_oom_points(),
            "estimate": {
                "phases": list(ESTIMATE_PHASES),
                "excludes": "process start, tracing, engine start-up outside a measurement, shard writes",
                "source": self.costs.source if self.costs is not None else f"{self.point_seconds:g} s per point",
                "failures": self.costs.failures.describe() if self.costs is not None else "not priced",
                "startups": self.startups(),
                "builds": self.builds(),
                "latencies": self.latency_source,
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
               software_agnostic: bool = False, comm: Stack | None = None, price: bool = True) -> Plan:
    """Every signature of every trace, with the points the store lacks for this stack.

    `comm` is the stack collectives are measured on (`provenance.comm_stack`); traces with
    collectives need it. `software_agnostic` compares platform, engine, backend, dtype and block
    size only: for planning another machine's work, whose torch/driver versions this machine
    cannot know. `price` False leaves the plan unpriced (no `costs`, no predicted latencies):
    `dooly profile` measures the work instead of pricing it, and need not read the fitted models."""
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
    result = Plan(stack, items, models, traces, stale_count, _point_seconds(held, stack), comm_stack=comm)
    if price:
        default = DEFAULT_POINT_SECONDS.get(stack.device_type, DEFAULT_POINT_SECONDS["cpu"])
        predictor, origin = open_predictor(store, stack)
        result.costs = PointCosts.fit(cost_rows, default, stack.platform,
                                    predict=None if predictor is None else partial(row_latencies, predictor))
        result.latency_source = predict_latencies(predictor, origin, items.values())
    return result


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


def _point_seconds(held: dict[str, dict[str, float]], stack: Stack) -> float:
    costs = sorted(cost for points in held.values() for cost in points.values())
    if not costs:
        return DEFAULT_POINT_SECONDS.get(stack.device_type, DEFAULT_POINT_SECONDS["cpu"])
    return costs[len(costs) // 2]
