"""Differential profiling: trace, plan, measure what is missing, write shards as we go.

Resumable: rows are flushed as shards whenever a chunk of whole signatures is complete (by row
count or by time), so a preempted pod loses at most the signature it was measuring plus the
unflushed chunk; the rerun plans again and skips every flushed point. A retried flush lands on the
same shard key (store/shards.py), so it never duplicates rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dooly.errors import DoolyError
from dooly.profile.grid import GridSpec, Point, refinement_points
from dooly.profile.measure import PHASES, Measurement, Timer, build_aten_call
from dooly.profile.plan import Plan, WorkItem, build_plan
from dooly.profile.provenance import (
    Stack,
    current_stack,
    detect_device,
    new_run_id,
    resolve_platform,
    run_columns,
)
from dooly.store.keys import inventory_key
from dooly.trace.schema import KIND_ATTENTION, KIND_COLLECTIVE, Trace

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 512
DEFAULT_FLUSH_SECONDS = 60.0
TOPOLOGY_PREFIX = "topologies/"
INVENTORY_KINDS = ("kernel", KIND_ATTENTION, KIND_COLLECTIVE)


@dataclass
class ProfileOptions:
    backend: str = "paged|sdpa"
    engine: str = "transformers"
    dtype: str = "bfloat16"
    device: str = "auto"
    platform: str = "auto"
    grid: GridSpec = field(default_factory=GridSpec)
    samples: int | None = None
    shard_index: int = 0
    shard_count: int = 1
    run_id: str | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    tp: int = 1


@dataclass
class ProfileReport:
    run_id: str
    platform: str
    backend: str
    profiled_signatures: int
    reused_signatures: int
    measured_points: int
    oom_points: int
    error_points: int
    device_seconds: float
    baseline_device_seconds: float
    shards: list[str]
    models: list[dict[str, Any]]
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # Points measured because the plan listed them (any status), and those added where a
    # one-variable op's latency bends (`refinement_points`): `dooly plan` counts the first exactly
    # and expects the second.
    planned_points: int = 0
    refinement_points: int = 0

    def to_dict(self) -> dict[str, Any]:
        saving = 1.0 - self.device_seconds / self.baseline_device_seconds if self.baseline_device_seconds else 0.0
        return {
            "run_id": self.run_id,
            "platform": self.platform,
            "backend": self.backend,
            "profiled_signatures": self.profiled_signatures,
            "reused_signatures": self.reused_signatures,
            "measured_points": self.measured_points,
            "planned_points": self.planned_points,
            "refinement_points": self.refinement_points,
            "oom_points": self.oom_points,
            "error_points": self.error_points,
            "device_seconds": round(self.device_seconds, 4),
            "baseline_device_seconds": round(self.baseline_device_seconds, 4),
            "saving": round(saving, 4) + 0.0,  # + 0.0: no "-0.0" in reports
            "shards": self.shards,
            "models": self.models,
            "seconds": round(self.seconds, 3),
            "device_seconds_by_phase": {phase: round(value, 4) for phase, value in self.phase_seconds.items()},
        }


def trace_all(models: list[str], backend: str, dtype: str, engine: str = "transformers", tp: int = 1,
              store: Any = None) -> list[Trace]:
    """Trace every model before anything is written: a model that fails leaves the store untouched.
    A name no config file or bundled id answers to is looked up in STORE's configs."""
    return [load_or_trace(model, backend, dtype, engine, tp, store=store)[0] for model in models]


def load_or_trace(
    model: str, backend: str, dtype: str, engine: str = "transformers", tp: int = 1, *, store: Any = None
) -> tuple[Trace, Any]:
    """A model to trace now (one rank of `tp`, with its collectives), or a trace file written by
    `dooly trace --out` (traced elsewhere, for instance on a controller whose torch keeps every
    request dim symbolic). A trace file keeps its own tp unless `tp` > 1 asks for another. A model
    named by an id or model key only STORE knows is traced from the config the store keeps."""
    from dooly.models.registry import ModelSpec
    from dooly.models.stored import resolve_model_with_store
    from dooly.trace.tracer import trace_model

    trace = _read_trace_file(model)
    if trace is None:
        spec = resolve_model_with_store(model, store)
        return trace_model(spec, phase="mixed", backend=backend, dtype=dtype, engine=engine, tp=tp), spec
    if tp > 1 and trace.tp != tp:
        raise DoolyError(f"trace {model} is for tp {trace.tp}; this run profiles --tp {tp}")
    if (trace.engine, trace.backend, trace.dtype, trace.phase) != (engine, backend, dtype, "mixed"):
        raise DoolyError(
            f"trace {model} is for engine {trace.engine}, backend {trace.backend}, dtype {trace.dtype}, phase "
            f"{trace.phase}; this run profiles engine {engine}, backend {backend}, dtype {dtype}, phase mixed"
        )
    return trace, ModelSpec(model_id=trace.model_id, config=trace.config, source=model)


def trace_defaults(model: str, tp: int | None, backend: str | None, dtype: str | None) -> tuple[int, str, str]:
    """tp, backend and dtype for MODEL: a trace file's own, unless given (a conflict is an error)."""
    trace = _read_trace_file(model)
    default_tp, default_backend, default_dtype = 1, "paged|sdpa", "bfloat16"
    if trace is not None:
        chosen = {"tp": tp, "backend": backend, "dtype": dtype}
        traced = {"tp": trace.tp, "backend": trace.backend, "dtype": trace.dtype}
        for name, value in chosen.items():
            if value is not None and value != traced[name]:
                raise DoolyError(f"trace {model} was made with {name} {traced[name]}, not {value}")
        default_tp, default_backend, default_dtype = trace.tp, trace.backend, trace.dtype
    return (default_tp if tp is None else tp, default_backend if backend is None else backend,
            default_dtype if dtype is None else dtype)


def load_model_source(model: str, backend: str, dtype: str, tp: int,
                      store_uri: str | None = None) -> tuple[Any, str, bool]:
    """(ModelSpec, model id, whether MODEL is a trace file) without tracing: a trace file's
    config, else a bundled model or config file, else, given STORE_URI, the config the store
    keeps under that id or model key (read only). Building the model needs only its config."""
    from dooly.models.registry import ModelSpec
    from dooly.models.stored import resolve_model_with_store

    trace = _read_trace_file(model)
    if trace is None:
        from dooly.store.backends import open_store

        store = open_store(store_uri, create=False) if store_uri is not None else None
        spec = resolve_model_with_store(model, store)
        return spec, spec.model_id, False
    if (trace.tp, trace.backend, trace.dtype) != (tp, backend, dtype):
        raise DoolyError(f"trace {model} is for tp {trace.tp}, {trace.backend}, {trace.dtype}; asked for "
                         f"tp {tp}, {backend}, {dtype}")
    return ModelSpec(model_id=trace.model_id, config=trace.config, source=model), trace.model_id, True


def _read_trace_file(path_text: str) -> Trace | None:
    from pathlib import Path

    path = Path(path_text)
    if not (path.is_file() and path.suffix == ".json"):
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not (isinstance(payload, dict) and "format_version" in payload and "operations" in payload):
        return None
    try:
        return Trace.from_dict(payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise DoolyError(f"trace file {path} is malformed: {type(exc).__name__}: {exc}") from exc


def prepare(models: list[str], store: Any, options: ProfileOptions) -> tuple[Plan, str]:
    """Trace and plan: everything that can fail on bad input happens here, before any write."""
    from dooly.engines.registry import engine_kind

    if not 0 <= options.shard_index < options.shard_count:
        raise DoolyError(f"--shard-index {options.shard_index} is not in [0, {options.shard_count})")
    device = detect_device(options.device)
    platform = resolve_platform(options.platform, device)
    kind = engine_kind(options.engine)
    loaded = [load_or_trace(model, options.backend, options.dtype, options.engine, options.tp, store=store)
              for model in models]
    traces = [trace for trace, _ in loaded]
    stack = current_stack(device=device, platform=platform, engine=kind.name, engine_version=kind.version(),
                          backend=options.backend, dtype=options.dtype, block_size=kind.block_size)
    comm, topology = collective_stack(traces, stack, device)
    plan = build_plan(traces, store, stack, options.grid, comm=comm, price=False)
    plan.sources = {trace.model_id: spec for trace, spec in loaded}
    plan.configs = {trace.model_key: spec for trace, spec in loaded}
    plan.topology = topology
    return plan, device


def collective_stack(traces: list[Trace], stack: Stack, device: str) -> tuple[Stack | None, dict[str, Any]]:
    """Where the traces' collectives are measured: None when they have none. Refuses (before
    anything is written) when this host cannot run as many ranks as a trace's tensor-parallel
    degree; reads the interconnect topology of the devices the ranks will use."""
    from dooly.distributed import check_world, detect_topology
    from dooly.profile.provenance import comm_stack

    world = max([trace.tp for trace in traces if trace.collectives] or [0])
    if not world:
        return None, {}
    names = ", ".join(sorted({t.model_id for t in traces if t.tp == world and t.collectives}))
    check_world(device, world, f"profiling the collectives of {names} (traced with --tp {world})")
    topology = detect_topology(device, world)
    log.info("ranks linked by %s (%s)", topology.label, topology.source)
    return comm_stack(stack, topology.label, topology.backend, topology.comm_version), topology.to_dict()


def profile_models(models: list[str], store: Any, options: ProfileOptions,
                   progress: Callable[[int, float], None] | None = None) -> ProfileReport:
    plan, device = prepare(models, store, options)
    return execute(plan, device, store, options, progress)


def execute(plan: Plan, device: str, store: Any, options: ProfileOptions,
            progress: Callable[[int, float], None] | None = None) -> ProfileReport:
    """Measure this worker's share of the plan's missing points and write them as shards. Each
    model's inventory and config are written first: the config lets its id or model key name the
    model later where no config file is at hand (`dooly.models.stored`)."""
    from dooly.models.stored import write_model_config

    started = time.perf_counter()
    run_id = options.run_id or new_run_id()
    for trace in plan.traces:
        write_inventory(store, trace)
        if trace.model_key in plan.configs:
            write_model_config(store, plan.configs[trace.model_key])
    work = plan.work(options.shard_index, options.shard_count)
    writer = _ShardWriter(store, run_id, options.chunk_rows, options.flush_seconds)
    timer = Timer(device, options.samples)
    measured_seconds: dict[str, float] = {}
    counts = {"ok": 0, "oom": 0, "error": 0}
    engines = _AttentionEngines(plan, options, device)
    if work and _measures_in_engine_process(options.engine):
        engines.get(work[0].model_id)
    collectives = [item for item in work if item.op.kind == KIND_COLLECTIVE]
    if collectives:
        from dooly.store.documents import write_json

        write_json(store, f"{TOPOLOGY_PREFIX}{run_id}.json", {"run_id": run_id, **plan.topology})
        _measure_collectives(collectives, device, options, writer, measured_seconds, counts, progress)
    for item in work:
        if item.op.kind == KIND_COLLECTIVE:
            continue
        rows = _measure_item(item, device, timer, engines, counts, progress)
        measured_seconds[item.signature] = sum(r["device_seconds"] for r in rows)
        writer.add(item.stack, rows)
    writer.flush_all()
    report = _report(plan, work, measured_seconds, counts, writer.keys, run_id, started)
    report.phase_seconds = {phase: timer.phase_seconds[phase] for phase in PHASES if timer.phase_seconds.get(phase)}
    # Every planned point is measured once; what the ranks and one-variable sweeps added beyond the
    # plan are refinements (plan estimates those; it cannot count them in advance).
    report.planned_points = sum(len(item.missing) for item in work)
    report.refinement_points = sum(counts.values()) - report.planned_points
    return report


def _measure_item(item: WorkItem, device: str, timer: Timer, engines: _AttentionEngines, counts: dict[str, int],
                  progress: Callable[[int, float], None] | None) -> list[dict[str, Any]]:
    """One item's rows: its missing points, then the refinement points those call for (one round).
    Its inputs are built once and reused across its points (`fixed_inputs`); only the planned
    points advance the progress count, so a bar sized by the plan ends at its total; every point's
    device-seconds are reported with it."""
    rows: list[dict[str, Any]] = []
    fixed_inputs: dict[int, Any] = {}

    def measure_into_rows(point: Point, planned: int) -> None:
        measurement = _measure(item, point, device, timer, engines, fixed_inputs)
        counts[measurement.status] += 1
        rows.append(_row(item, point, measurement))
        if progress is not None:
            progress(planned, float(rows[-1]["device_seconds"] or 0.0))

    for point in item.missing:
        measure_into_rows(point, 1)
    for point in refinement_points(item.op, rows):
        measure_into_rows(point, 0)
    return rows


def _measure_collectives(items: list[WorkItem], device: str, options: ProfileOptions, writer: _ShardWriter,
                         measured_seconds: dict[str, float], counts: dict[str, int],
                         progress: Callable[[int, float], None] | None) -> None:
    """Spawn the ranks once per world size; write each item's rows as soon as rank 0 reports it done."""
    from dooly.distributed import launch
    from dooly.profile.collectives import rank_worker, work_payload, world_size_of

    by_world: dict[int, list[WorkItem]] = {}
    for item in items:
        by_world.setdefault(world_size_of(item.op), []).append(item)
    for world, group in sorted(by_world.items()):
        log.info("measuring %d collective signatures on %d ranks", len(group), world)
        launch(rank_worker, work_payload(group, device, options.samples), world_size=world, device=device,
               on_message=_collective_sink(group, writer, measured_seconds, counts, progress))


def _collective_sink(group: list[WorkItem], writer: _ShardWriter, measured_seconds: dict[str, float],
                     counts: dict[str, int], progress: Callable[[int, float], None] | None) -> Callable[[tuple], None]:
    """What rank 0's messages do for one world size: a measured point becomes a row held until its
    item is reported finished, then the item's rows go to the shard writer together (an item's
    rows are never split across a crash). Only planned points advance the progress count."""
    lookup = {item.signature: item for item in group}
    pending: dict[str, list[dict[str, Any]]] = {}
    planned = {item.signature: {p.key for p in item.missing} for item in group}

    def on_message(message: tuple) -> None:
        kind, signature, values, measured = message
        item = lookup[signature]
        if kind == "item":
            rows = pending.pop(signature, [])
            measured_seconds[signature] = sum(r["device_seconds"] for r in rows)
            writer.add(item.stack, rows)
            return
        point = Point(values=tuple((name, int(v)) for name, v in values))
        measurement = Measurement(**measured)
        counts[measurement.status] += 1
        pending.setdefault(signature, []).append(_row(item, point, measurement))
        if progress is not None:
            progress(1 if point.key in planned[signature] else 0, float(pending[signature][-1]["device_seconds"] or 0.0))

    return on_message


def _measures_in_engine_process(engine: str) -> bool:
    """Engines that set up the process they serve in (vLLM's CPU worker binds its threads to
    cores): their engine starts before the first measurement, so every op runs as in the engine."""
    from dooly.engines.registry import engine_kind

    return bool(getattr(engine_kind(engine), "measure_in_engine_process", False))


def total_points(plan: Plan, options: ProfileOptions) -> int:
    return sum(len(item.missing) for item in plan.work(options.shard_index, options.shard_count))


def write_inventory(store: Any, trace: Trace) -> None:
    """What a model runs per step, by signature: the step predictor's recipe (see docs/store.md)."""
    from dooly.store.documents import write_json

    write_json(store, inventory_key(trace.model_key, trace.backend, trace.tp), inventory(trace))


def inventory(trace: Trace) -> dict[str, Any]:
    counts: dict[str, int] = {}
    first: dict[str, Any] = {}
    modules: dict[str, list[str]] = {}
    for op in (*trace.operations, *trace.collectives):
        if op.kind not in INVENTORY_KINDS:
            continue
        signature = op.signature()
        counts[signature] = counts.get(signature, 0) + op.count
        first.setdefault(signature, op)
        modules.setdefault(signature, []).append(op.module)
    windows = [op.scalars.get("sliding_window") for op in first.values() if op.kind == KIND_ATTENTION]
    return {
        "model_id": trace.model_id,
        "model_key": trace.model_key,
        "engine": trace.engine,
        "backend": trace.backend,
        "dtype": trace.dtype,
        "tp": trace.tp,
        "sliding_window": next((w for w in windows if w), None),
        "operations": [
            {
                "signature": signature,
                "op": op.op,
                "kind": op.kind,
                "op_class": op.op_class(),
                "config_dims": op.config_dims(),
                "request_vars": op.request_vars(),
                "sliding_window": op.scalars.get("sliding_window") if op.kind == KIND_ATTENTION else None,
                "count": counts[signature],
                "modules": sorted(set(modules[signature])),
            }
            for signature, op in first.items()
        ],
    }


class _AttentionEngines:
    """Engine-built attention, one instance per (model, sliding) kind, made on first use."""

    def __init__(self, plan: Plan, options: ProfileOptions, device: str) -> None:
        self.plan = plan
        self.options = options
        self.device = device
        self.cache: dict[str, Any] = {}

    def get(self, model_id: str) -> Any:
        if model_id not in self.cache:
            import torch

            from dooly.models.registry import build_hf_config
            from dooly.profile.attention import engine_attention
            from dooly.trace.tracer import DTYPES

            hf_config = build_hf_config(self.plan.sources[model_id])
            self.cache = {}  # one model's engine on the device at a time
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self.cache[model_id] = engine_attention(
                self.options.engine, hf_config, backend=self.options.backend, dtype=DTYPES[self.options.dtype],
                device=self.device, grid=self.options.grid,
            )
        return self.cache[model_id]


def _measure(item: WorkItem, point: Point, device: str, timer: Timer, engines: _AttentionEngines,
             fixed_inputs: dict[int, Any]) -> Measurement:
    if item.op.kind == KIND_ATTENTION:
        sliding = bool(item.op.scalars.get("sliding_window"))
        return timer.measure(lambda: engines.get(item.model_id).call_for(point.batch, sliding))
    return timer.measure(lambda: build_aten_call(item.op, point.as_dict, device, fixed_inputs))


def _row(item: WorkItem, point: Point, m: Measurement) -> dict[str, Any]:
    values = point.as_dict
    op = item.op
    return {
        "signature": item.signature,
        "op": op.op,
        "op_class": op.op_class(),
        "signature_json": json.dumps(op.signature_payload(), sort_keys=True, separators=(",", ":"), default=str),
        "config_dims": json.dumps(op.config_dims(), sort_keys=True),
        "request_vars": json.dumps(op.request_vars()),
        "phase": _phase(point),
        "T": values.get("T", 0),
        "B": values.get("B", 0),
        "K": values.get("K", values.get("S", 0)),
        "D": values.get("D", 0),
        "point_key": point.key,
        "latency_median_s": m.median_s,
        "latency_p10_s": m.p10_s,
        "latency_p90_s": m.p90_s,
        "latency_mean_s": m.mean_s,
        "n_samples": m.n,
        "status": m.status,
        "device_seconds": m.device_seconds,
        **item.stack.columns(),
        "error": m.error or None,
    }


def _phase(point: Point) -> str:
    if point.batch is None:
        return "any"
    decode = point.batch.decode_seqs
    if decode == point.batch.num_seqs:
        return "decode"
    return "prefill" if decode == 0 else "mixed"


class _ShardWriter:
    """Buffers rows per stack partition; flushes whole signatures as shards."""

    def __init__(self, store: Any, run_id: str, chunk_rows: int, flush_seconds: float) -> None:
        self.store = store
        self.run_id = run_id
        self.chunk_rows = chunk_rows
        self.flush_seconds = flush_seconds
        self.buffers: dict[Stack, list[dict[str, Any]]] = {}
        self.keys: list[str] = []
        self.chunk_index = 0
        self.last_flush = time.monotonic()

    def add(self, stack: Stack, rows: list[dict[str, Any]]) -> None:
        self.buffers.setdefault(stack, []).extend(rows)
        due = time.monotonic() - self.last_flush >= self.flush_seconds
        if due or sum(len(b) for b in self.buffers.values()) >= self.chunk_rows:
            self.flush_all()

    def flush_all(self) -> None:
        import pyarrow as pa

        from dooly.store.schema import SHARD_SCHEMA
        from dooly.store.shards import write_shard

        created = datetime.now(UTC)
        for rows in list(self.buffers.values()):
            if not rows:
                continue
            extra = {**run_columns(self.run_id), "created_at": created}
            table = pa.Table.from_pylist([{**row, **extra} for row in rows], schema=SHARD_SCHEMA)
            self.keys.append(write_shard(self.store, table, run_id=self.run_id, chunk_index=self.chunk_index))
            self.chunk_index += 1
        self.buffers = {}
        self.last_flush = time.monotonic()


def _report(plan: Plan, work: list[WorkItem], measured: dict[str, float], counts: dict[str, int], keys: list[str],
            run_id: str, started: float) -> ProfileReport:
    cost = {sig: item.held_seconds + measured.get(sig, 0.0) for sig, item in plan.items.items()}
    models: list[dict[str, Any]] = []
    for model in plan.models:
        spent = sum(measured.get(sig, 0.0) for sig in model.profiled)
        models.append({
            "model": model.model_id,
            "model_key": model.model_key,
            "signatures": len(model.signatures),
            "profiled_signatures": len(model.profiled),
            "reused_signatures": len(model.reused),
            "device_seconds": round(spent, 4),
            "baseline_device_seconds": round(sum(cost[sig] for sig in model.signatures), 4),
        })
    profiled = set(measured)
    every = {sig for model in plan.models for sig in model.signatures}
    return ProfileReport(
        run_id=run_id,
        platform=plan.stack.platform,
        backend=plan.stack.backend,
        profiled_signatures=len(profiled),
        reused_signatures=len(every - profiled),
        measured_points=counts["ok"],
        oom_points=counts["oom"],
        error_points=counts["error"],
        device_seconds=sum(measured.values()),
        baseline_device_seconds=sum(m["baseline_device_seconds"] for m in models),
        shards=keys,
        models=models,
        seconds=time.perf_counter() - started,
    )
