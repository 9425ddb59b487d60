"""The capacity search: for each candidate, the largest request rate whose simulated SLO
percentiles hold.

The workload's lengths and arrival process are kept and only its clock is scaled: requests are
generated once at unit rate (Poisson and gamma gaps scale exactly with 1/rate for a fixed seed; a
trace's arrivals are rescaled to its offered rate), so every rate of every candidate serves the
same requests. Per candidate:

1. saturation: all requests at once; the completed requests per second bound any sustainable rate;
2. if the SLO holds at that rate the candidate's capacity is it (throughput-bound, not SLO-bound);
3. otherwise halve the rate until the SLO holds; past three halvings, `min_rate` (saturation / 256
   by default) is tried first, and a candidate missing the SLO there does not meet it; then bisect
   the bracket geometrically until hi / lo <= 1 + tolerance; the capacity is the last rate that held.

Bisection assumes the percentiles grow with the rate; with a finite request count they are noisy
near the knee, so the answer is good to about the tolerance, not better.

Speed: candidates are grouped by step model (model x platform x engine x backend x dtype x tp) and
each group runs in one worker process, which opens the fitted predictor once; step predictions
are memoised by exact batch composition and path across the group's settings and rates
(`MemoStep`), since settings that do not bind and low rates replay the same batches.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any

from dooly.errors import DoolyError
from dooly.explore.candidates import Candidate
from dooly.sim.server_costs import HTTP_CLIENT, INPROCESS_CLIENT, ServerCosts
from dooly.sim.step_model import CpuOverheadModel, StepPath, device_seconds, step_keywords
from dooly.workload import Request, WorkloadSpec, generate_requests

logger = logging.getLogger(__name__)

SLO_METRICS = ("ttft", "tpot", "e2e")
SLO_STATISTICS = ("mean", "p50", "p90", "p99")
_SLO_RE = re.compile(r"^(?P<metric>[a-z]+)_(?P<stat>[a-z0-9]+)=(?P<limit>.+)$")
DEFAULT_TOLERANCE = 0.05
# The halving stops this far below the saturation rate: a candidate whose SLO fails even there is
# reported as not meeting it (its latency at that rate is still reported, for the closest one).
DEFAULT_MIN_RATE_FRACTION = 1.0 / 256
# "All at once": arrivals compressed to this rate measure the saturation throughput.
SATURATION_RATE = 1e9
# Memo entries kept per step model before the memo is cleared (bounds a worker's memory).
MEMO_LIMIT = 2_000_000
RATE_HALVING = 2.0
# Halvings from the saturation rate tried before the floor is checked (most candidates that meet
# the SLO at all do so within a factor 8 of saturation).
QUICK_HALVINGS_RATIO = RATE_HALVING**3


@dataclass(frozen=True)
class Slo:
    """One objective: a latency statistic (seconds) that must not exceed `limit_s`."""

    metric: str
    stat: str
    limit_s: float

    @property
    def name(self) -> str:
        return f"{self.metric}_{self.stat}"

    def value(self, summary: dict[str, Any]) -> float | None:
        return summary[f"{self.metric}_s"][self.stat]


def parse_slos(items: Sequence[str]) -> list[Slo]:
    """`ttft_p90=0.5` flags -> objectives; unknown metrics or non-positive limits are DoolyErrors."""
    if not items:
        raise DoolyError("give at least one --slo, e.g. --slo ttft_p90=0.5 --slo tpot_p90=0.05")
    slos: dict[str, Slo] = {}
    known = ", ".join(f"{m}_{s}" for m in SLO_METRICS for s in SLO_STATISTICS)
    for item in items:
        match = _SLO_RE.match(item.strip())
        if not match or match["metric"] not in SLO_METRICS or match["stat"] not in SLO_STATISTICS:
            raise DoolyError(f"--slo {item!r}: unknown SLO metric; expected METRIC=SECONDS with METRIC one of {known}")
        try:
            limit = float(match["limit"])
        except ValueError:
            raise DoolyError(f"--slo {item!r}: the limit must be a number of seconds") from None
        if not (limit > 0 and math.isfinite(limit)):
            raise DoolyError(f"--slo {item!r}: the limit must be a positive number of seconds")
        slo = Slo(match["metric"], match["stat"], limit)
        slos[slo.name] = slo
    return list(slos.values())


# ---------------------------------------------------------------------------------------------
# Workload at any rate


@dataclass(frozen=True)
class RateWorkload:
    """The workload's requests at unit rate; `at(rate)` scales the clock."""

    unit: tuple[Request, ...]
    spec: dict[str, Any]

    @classmethod
    def from_spec(cls, spec: WorkloadSpec) -> RateWorkload:
        if not spec.trace and spec.arrival == "burst":
            raise DoolyError("burst arrivals have no rate to search: use --arrival poisson or gamma")
        if spec.trace:
            requests = generate_requests(spec)
            span = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
            if len(requests) < 2 or span <= 0:
                raise DoolyError("the trace needs at least two requests at different times to define a rate")
            offered = (len(requests) - 1) / span
            unit = tuple(Request(r.request_id, r.arrival_s * offered, r.prompt_tokens, r.output_tokens) for r in requests)
        else:
            spec.rate = 1.0
            unit = tuple(generate_requests(spec))
        document = spec.to_dict()
        document.pop("rate", None)
        document.pop("time_scale", None)
        return cls(unit=unit, spec=document)

    def at(self, rate: float) -> list[Request]:
        return [Request(r.request_id, r.arrival_s / rate, r.prompt_tokens, r.output_tokens) for r in self.unit]

    @property
    def mean_output_tokens(self) -> float:
        return sum(r.output_tokens for r in self.unit) / len(self.unit)


# ---------------------------------------------------------------------------------------------
# Step models, opened once and memoised


class MemoStep:
    """A step model that remembers each (composition, path) it has predicted.

    It takes the step's path itself (`**keywords`), so the simulator hands it every path and it
    pads for the wrapped model as `device_seconds` would; the key is the exact batch, so a hit
    returns the very value the model would."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.keywords = step_keywords(inner)
        self.memo: dict[tuple[Any, ...], float] = {}
        self.hits = 0
        self.misses = 0

    def step_seconds(self, prefill: list[tuple[int, int]], decode_ctx: list[int], **keywords: Any) -> float:
        path: StepPath | None = keywords.get("path")
        key = (tuple(prefill), tuple(decode_ctx), path)
        found = self.memo.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        if path is None:
            value = float(self.inner.step_seconds(prefill, decode_ctx))
        else:
            value = float(device_seconds(self.inner, prefill, decode_ctx, path, self.keywords))
        if len(self.memo) >= MEMO_LIMIT:
            self.memo.clear()
        self.memo[key] = value
        return value


@dataclass
class CandidateModels:
    """What one candidate simulates with: the step model, the host-overhead model and the
    coverage of the step model's prediction. A different source of any of them (an overhead
    calibrated per platform in the store, a coverage report of measured vs estimated device time)
    plugs in as another `ModelOpener`."""

    step: Any
    overhead: CpuOverheadModel | None
    coverage: dict[str, Any]
    generation: int | None = None
    overhead_source: str = "none: host overhead not modelled"
    # `--client http`: the server-cost record of the candidate's key (step term already in `overhead`;
    # its checked per-request offsets are added to every simulated request).
    server_costs: ServerCosts | None = None


ModelOpener = Callable[[Candidate, "SearchContext"], CandidateModels]

_STEP_CACHE: dict[tuple[Any, ...], tuple[MemoStep, dict[str, Any], int | None]] = {}
_OVERHEAD_CACHE: dict[tuple[Any, ...], tuple[CpuOverheadModel, str]] = {}
# One fitted predictor per (store, platform, engine, backend, dtype) and process: every model and
# TP degree on it shares the loaded regressors (loading is most of a cold candidate's cost).
_PREDICTOR_CACHE: dict[tuple[str, ...], Any] = {}
# The inventory each step model was built from (the store's, or a CPU trace), for the overhead's
# layer count of a model Dooly has no config of.
_INVENTORY_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def open_store_models(candidate: Candidate, context: SearchContext) -> CandidateModels:
    """The default opener: the fitted step model from the store (once per process and step model,
    memoised); the model's inventory is the store's, else a CPU trace made now (an unseen model is
    predicted from class regressors: its coverage says how much); the host overhead is the
    --overhead file given for the candidate, else the store's calibration for its platform, engine,
    backend and CUDA-graph mode. A model the resolver cannot trace, or a candidate without any
    host-overhead calibration, raises DoolyError: the candidate is listed as unpredictable."""
    key = (context.store, *candidate.source_key())
    cached = _STEP_CACHE.get(key)
    if cached is None:
        from dooly.fit.source import open_predictor, resolve_source_inventory

        source = candidate.source(context.store)
        predictor_key = (context.store, *candidate.predictor_key())
        predictor = _PREDICTOR_CACHE.get(predictor_key)
        if predictor is None:
            predictor = _PREDICTOR_CACHE[predictor_key] = open_predictor(source)
        resolved = resolve_source_inventory(source, candidate.model)
        _INVENTORY_CACHE[key] = resolved.inventory
        step = predictor.step_predictor(resolved.inventory)
        coverage = {"inventory": resolved.origin}
        cached = (MemoStep(step), coverage, int(predictor.generation))
        _STEP_CACHE[key] = cached
    memo, coverage, generation = cached
    overhead, overhead_source = _candidate_overhead(candidate, context, _INVENTORY_CACHE.get(key))
    return CandidateModels(step=memo, overhead=overhead, coverage=dict(coverage), generation=generation,
                           overhead_source=overhead_source)


def _candidate_overhead(candidate: Candidate, context: SearchContext,
                        inventory: dict[str, Any] | None) -> tuple[CpuOverheadModel | None, str]:
    """The host overhead of one candidate and where it came from (see `open_store_models`).

    The graph mode is the scheduler's own reading of the settings (what `dooly simulate` keys the
    store's calibration by), so explore and simulate charge a candidate the same host time."""
    from dooly.sim.calibration import (
        CacheGroups,
        find_calibration,
        missing_calibration,
        scheduler_uses_async,
        scheduler_uses_graphs,
    )
    from dooly.sim.calibration_commands import model_layers
    from dooly.sim.schedulers import make_scheduler
    from dooly.store.backends import open_store

    if context.no_overhead:
        return None, "none: --no-cpu-overhead (the engine's host time per step is left out)"
    mode = graph_mode(candidate.settings)
    path = context.overhead_for(candidate.platform, candidate.backend, mode)
    if path:
        found = _OVERHEAD_CACHE.get(("file", path))
        if found is None:
            found = _OVERHEAD_CACHE[("file", path)] = (CpuOverheadModel.load(path), f"file {path}")
        return found
    settings = {**context.model_settings.get(candidate.model, {}), **candidate.settings}
    scheduler = make_scheduler(candidate.engine, settings)
    graphs = scheduler_uses_graphs(scheduler)
    asynchronous = scheduler_uses_async(scheduler)
    key = ("store", context.store, candidate.platform, candidate.engine, candidate.backend, graphs, asynchronous,
           candidate.model)
    found = _OVERHEAD_CACHE.get(key)
    if found is None:
        calibration = find_calibration(open_store(context.store, create=False), platform=candidate.platform,
                                       engine=candidate.engine, backend=candidate.backend, cuda_graphs=graphs,
                                       async_batching=asynchronous)
        if calibration is None:
            raise DoolyError(missing_calibration(platform=candidate.platform, engine=candidate.engine,
                                                 backend=candidate.backend, cuda_graphs=graphs,
                                                 async_batching=asynchronous, file_flag="--overhead"))
        model = calibration.for_model(model_layers(candidate.model, inventory, context.store), candidate.model,
                                      CacheGroups.from_scheduler(scheduler))
        found = _OVERHEAD_CACHE[key] = (model, model.source or calibration.describe())
    return found


def measured_coverage(step: Any, batches: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
    """The share of predicted device time that is measured, from class regressors and from the
    family fallback, over the steps one simulation priced (as `dooly simulate` reports it): in
    total and per phase (`dooly.fit.coverage.coverage_payload`, without the per-op lists of
    estimated and extrapolated operations, which `dooly simulate` gives for one candidate)."""
    from dooly.fit.coverage import coverage_payload

    inner = step.inner if isinstance(step, MemoStep) else step
    if not hasattr(inner, "coverage_many"):
        return {}
    steps = list(batches)
    total = coverage_payload({"all": inner.coverage_many(steps)})["all"]
    phases = coverage_payload(inner.coverage_by_phase(steps))
    for payload in (total, *phases.values()):
        payload.pop("estimated", None)
        payload.pop("extrapolated", None)
    return {**total, "phases": phases}


def analytic_models(candidate: Candidate, context: SearchContext) -> CandidateModels:
    """The roofline step model of `dooly simulate --analytic` (tests and demos only)."""
    from dooly.sim.options import model_dims
    from dooly.sim.step_model import AnalyticStepModel

    key = ("analytic", *candidate.source_key())
    cached = _STEP_CACHE.get(key)
    if cached is None:
        step = AnalyticStepModel(dims=model_dims(candidate.model), tp=candidate.tp)
        cached = _STEP_CACHE[key] = (MemoStep(step), {"kind": "analytic roofline: nothing measured"}, None)
    return CandidateModels(step=cached[0], overhead=None, coverage=cached[1], generation=None)


# ---------------------------------------------------------------------------------------------
# The search


@dataclass
class SearchContext:
    """Everything a worker needs (picklable: it crosses into the worker processes)."""

    store: str
    slos: list[Slo]
    workload: RateWorkload
    overheads: dict[str, str] = field(default_factory=dict)  # "[PLATFORM:]BACKEND[:MODE]" | "*[:MODE]" -> file
    model_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model: KV layer groups
    tolerance: float = DEFAULT_TOLERANCE
    min_rate: float | None = None
    max_rate: float | None = None
    no_overhead: bool = False  # --no-cpu-overhead: device time only, as `dooly simulate` does
    opener: ModelOpener = open_store_models
    client: str = INPROCESS_CLIENT  # --client: where requests are timed
    # --client http: the store's server-cost record per client key (`client_key`), read once in the
    # parent process and carried to the workers with the context (a record is a few kB).
    server_costs: dict[tuple[Any, ...], ServerCosts] = field(default_factory=dict)

    def overhead_for(self, platform: str, backend: str, mode: str) -> str | None:
        """The overhead file for a candidate: the most specific key given wins (platform, backend,
        graph mode: the host cost of a CUDA-graph replay is a fraction of an eager step's)."""
        for key in (f"{platform}:{backend}:{mode}", f"{platform}:{backend}", f"{backend}:{mode}", backend,
                    f"*:{mode}", "*"):
            if key in self.overheads:
                return self.overheads[key]
        return None


GRAPHS, NO_GRAPHS = "graphs", "nographs"


def graph_mode(settings: dict[str, Any]) -> str:
    """`graphs` when the engine settings turn CUDA graphs on for any path, else `nographs`."""
    value = settings.get("use_cuda_graph", False)
    on = any(bool(v) for v in value) if isinstance(value, list) else bool(value)
    return GRAPHS if on else NO_GRAPHS


def client_key(candidate: Candidate, context: SearchContext) -> tuple[str, str, str, bool, bool]:
    """What a candidate's server-cost record is keyed by: platform, engine, backend, and the graph
    mode and loop its scheduler runs (the scheduler's own reading of the settings, as for the
    host-overhead calibration); the newest engine version the store holds is read."""
    from dooly.sim.calibration import scheduler_uses_async, scheduler_uses_graphs
    from dooly.sim.schedulers import make_scheduler

    scheduler = make_scheduler(candidate.engine, {**context.model_settings.get(candidate.model, {}),
                                                  **candidate.settings})
    return (candidate.platform, candidate.engine, candidate.backend, scheduler_uses_graphs(scheduler),
            scheduler_uses_async(scheduler))


def describe_client_key(key: tuple[str, str, str, bool, bool]) -> str:
    """A client key in words, as the store lays a record of it out (any engine version)."""
    from dooly.sim.calibration import CalibrationKey

    platform, engine, backend, graphs, asynchronous = key
    return CalibrationKey(platform, engine, "", backend, graphs, asynchronous).label()


def resolve_server_costs(candidates: Sequence[Candidate], context: SearchContext
                         ) -> tuple[dict[tuple[Any, ...], ServerCosts], dict[Candidate, str]]:
    """`--client http`: the store's server-cost record of each candidate's key, read once per key
    (not per candidate or rate), and why each candidate without a usable one is skipped (the store
    holds none for its key, or the record it holds has a negative raw median offset, which
    `dooly simulate --client http` refuses too)."""
    from dooly.sim.server_costs import find_server_costs
    from dooly.store.backends import open_store

    store = open_store(context.store, create=False)
    records: dict[tuple[Any, ...], ServerCosts] = {}
    refused: dict[tuple[Any, ...], str] = {}
    skipped: dict[Candidate, str] = {}
    for candidate in candidates:
        key = client_key(candidate, context)
        if key not in records and key not in refused:
            platform, engine, backend, graphs, asynchronous = key
            costs = find_server_costs(store, platform=platform, engine=engine, backend=backend, cuda_graphs=graphs,
                                      async_batching=asynchronous)
            if costs is None:
                refused[key] = (f"no server-cost record for {describe_client_key(key)}: dooly server-costs --save "
                                "writes one")
            else:
                try:
                    costs.refuse_negative()
                    records[key] = costs
                except DoolyError as exc:
                    refused[key] = str(exc)
        if key in refused:
            skipped[candidate] = refused[key]
    return records, skipped


def _with_client(candidate: Candidate, models: CandidateModels, context: SearchContext) -> CandidateModels:
    """`--client http`: the candidate's models with its key's server-cost record (the step term
    added to the host overhead, an empty one under --no-cpu-overhead); in-process: unchanged."""
    if context.client != HTTP_CLIENT:
        return models
    key = client_key(candidate, context)
    costs = context.server_costs.get(key)
    if costs is None:
        raise DoolyError(f"no server-cost record for {describe_client_key(key)}: dooly server-costs --save writes one")
    overhead = costs.overhead_for(models.overhead if models.overhead is not None else CpuOverheadModel(),
                                  candidate.model, context.store)
    return replace(models, overhead=overhead, overhead_source=overhead.source or models.overhead_source,
                   server_costs=costs)


def _simulate(candidate: Candidate, models: CandidateModels, context: SearchContext, rate: float,
              record_batches: bool = False) -> Any:
    """One simulation at `rate`; with a server-cost record, its requests as the server's client
    times them (`ServerCosts.apply`), so every statistic the SLOs read includes the offsets."""
    from dooly.sim.schedulers import make_scheduler
    from dooly.sim.simulator import simulate

    settings = {**context.model_settings.get(candidate.model, {}), **candidate.settings}
    scheduler = make_scheduler(candidate.engine, settings)
    result = simulate(context.workload.at(rate), scheduler, models.step, models.overhead, record_batches=record_batches)
    if models.server_costs is not None:
        result.requests = models.server_costs.apply(result.requests)
    return result


def _coverage_at(candidate: Candidate, models: CandidateModels, context: SearchContext, rate: float) -> dict[str, Any]:
    """Coverage of the steps simulated at `rate` (the capacity, or the closest rate tried): the
    batches are replayed from the step memo, so this costs one scheduler run, not a prediction."""
    result = _simulate(candidate, models, context, rate, record_batches=True)
    return {**models.coverage, **measured_coverage(models.step, result.batches or []), "at_rate_rps": rate}


def _evaluate(candidate: Candidate, models: CandidateModels, context: SearchContext, rate: float) -> dict[str, Any]:
    """One simulation at `rate`: the SLO statistics and whether they hold."""
    summary = _simulate(candidate, models, context, rate).summary()
    finished = summary["num_finished"] == summary["num_requests"]
    values = {slo.name: slo.value(summary) for slo in context.slos}
    ok = finished and all(v is not None and v <= slo.limit_s for slo, v in zip(context.slos, values.values()))
    worst = max((v / slo.limit_s if v is not None else math.inf) for slo, v in zip(context.slos, values.values()))
    latency = {f"{m}_{s}": summary[f"{m}_s"][s] for m in SLO_METRICS for s in SLO_STATISTICS}
    return {
        "rate_rps": rate,
        "ok": ok,
        "slo_values_s": values,
        "worst_slo_ratio": worst,
        "latency_s": latency,
        "throughput_rps": summary["throughput"]["requests_per_s"],
        "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"],
        "preemptions": summary["preemptions"],
    }


def search_capacity(candidate: Candidate, context: SearchContext) -> dict[str, Any]:
    """The largest rate meeting the SLOs for one candidate (see the module docstring)."""
    from dooly.sim.schedulers import SimulationError

    try:
        models = _with_client(candidate, context.opener(candidate, context), context)
    except DoolyError as exc:
        # The store lists the group but cannot predict this model on it (an op class never
        # measured there, an unreadable file): the candidate is reported, not the search aborted.
        return {"candidate": candidate.to_dict(), "label": candidate.label(), "status": "unpredictable",
                "reason": str(exc), "capacity_rps": None, "points": []}
    memo = models.step if isinstance(models.step, MemoStep) else None
    hits0, misses0 = (memo.hits, memo.misses) if memo else (0, 0)
    points: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "candidate": candidate.to_dict(),
        "label": candidate.label(),
        "coverage": models.coverage,
        "generation": models.generation,
        "overhead": models.overhead_source,
        "points": points,
    }
    if models.server_costs is not None:
        result["server_costs"] = models.server_costs.applied_payload()
    try:
        saturated = _evaluate(candidate, models, context, SATURATION_RATE)
        saturation = saturated["throughput_rps"]
        hi = min(saturation, context.max_rate) if context.max_rate else saturation
        floor = context.min_rate or saturation * DEFAULT_MIN_RATE_FRACTION
        top = _evaluate(candidate, models, context, hi)
        points.append(top)
        result["saturation_rps"] = saturation
        if top["ok"]:
            best, limited_by = top, ("max_rate" if context.max_rate and hi < saturation else "throughput")
        else:
            best, limited_by = None, "slo"
            lo, bottom = hi, None
            while best is None:
                lo /= RATE_HALVING
                if bottom is None and (lo <= floor or top["rate_rps"] / lo > QUICK_HALVINGS_RATIO):
                    # Not within a few halvings of saturation: check the floor before a long
                    # descent (low rates are the slow, unbatched simulations).
                    bottom = _evaluate(candidate, models, context, floor)
                    points.append(bottom)
                    if not bottom["ok"]:
                        break
                if lo <= floor:
                    best = bottom
                    break
                point = _evaluate(candidate, models, context, lo)
                points.append(point)
                if point["ok"]:
                    best = point
                else:
                    hi = lo
            while best is not None and hi / best["rate_rps"] > 1 + context.tolerance:
                mid = math.sqrt(hi * best["rate_rps"])
                point = _evaluate(candidate, models, context, mid)
                points.append(point)
                if point["ok"]:
                    best = point
                else:
                    hi = mid
    except SimulationError as exc:
        result.update(status="infeasible", reason=str(exc), capacity_rps=0.0)
        return result
    points.sort(key=lambda p: p["rate_rps"])
    if memo:
        result["memo"] = {"hits": memo.hits - hits0, "misses": memo.misses - misses0}
    if best is None:
        lowest = points[0]
        result.update(status="slo_not_met", capacity_rps=0.0, closest=lowest,
                      reason=f"SLO missed even at {lowest['rate_rps']:.3g} req/s",
                      coverage=_coverage_at(candidate, models, context, lowest["rate_rps"]))
        return result
    result.update(status="ok", capacity_rps=best["rate_rps"], at_capacity=best, limited_by=limited_by,
                  coverage=_coverage_at(candidate, models, context, best["rate_rps"]))
    return result


def _search_group(candidates: list[Candidate], context: SearchContext) -> list[dict[str, Any]]:
    return [search_capacity(c, context) for c in candidates]


def group_tasks(candidates: Sequence[Candidate], jobs: int) -> list[list[Candidate]]:
    """Candidates sharing a fitted predictor go to one task (one process loads it once); groups are
    split when there are fewer than two tasks per worker, so every core has work."""
    groups: dict[tuple[Any, ...], list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.predictor_key(), []).append(c)
    tasks = list(groups.values())
    while len(tasks) < 2 * jobs and any(len(t) > 1 for t in tasks):
        tasks.sort(key=len, reverse=True)
        biggest = tasks.pop(0)
        half = len(biggest) // 2
        tasks += [biggest[:half], biggest[half:]]
    return tasks


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_search(
    candidates: Sequence[Candidate], context: SearchContext, *, jobs: int, on_done: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Every candidate's capacity, in the order given; `on_done(n)` after each n finished."""
    tasks = group_tasks(candidates, jobs)
    results: dict[Candidate, dict[str, Any]] = {}
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            for candidate, result in zip(task, _search_group(task, context), strict=True):
                results[candidate] = result
            if on_done:
                on_done(len(task))
    else:
        import multiprocessing

        # fork: the workers inherit the imported modules and the generated requests.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method)) as pool:
            futures = {pool.submit(_search_group, task, context): task for task in tasks}
            for future in as_completed(futures):
                task = futures[future]
                for candidate, result in zip(task, future.result(), strict=True):
                    results[candidate] = result
                if on_done:
                    on_done(len(task))
    return [results[c] for c in candidates]


def iter_points(result: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from result.get("points", [])
