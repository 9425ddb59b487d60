"""Validation math: how far the simulator is from a real engine on the same workload.

Ground truth comes from `dooly bench` (Parquet, two tables):
- requests: request_id, arrived_at_s, first_token_s, finished_s, prompt_tokens, output_tokens,
  token_times_s (list<float>);
- steps: step, start_s, duration_s, prefill (list<struct<q, ctx>>), decode_ctx (list<int>).

Three comparisons:
- per request: TTFT, TPOT and E2E of the simulation of the same requests (same arrivals, lengths
  and engine settings) against the measured ones, matched by request id, as MAPE (mean absolute
  percentage error, in percent) plus its median, p90 and signed bias;
- distribution: the mean, p50, p90 and p99 of those same TTFT, TPOT and E2E values across the
  requests, simulated against measured, as a signed and an absolute relative error. Under light
  load a request's TTFT is dominated by where its arrival falls within the step in flight, which no
  simulator reproduces and the real engine does not reproduce run to run either; the distribution
  is what capacity planning reads, and that phase luck averages out of it;
- per step: each measured batch composition replayed through the step model (plus the CPU
  overhead model) against the measured step duration. This isolates the latency model from the
  scheduler model.

`compare_runs` scores one real run against another of the same workload with the same per-request
and distribution arithmetic: the engine's own run-to-run floor under both.

The planner's summary (`ValidationReport.summary_rows`) leads the report: mean, p50 and p90 of
TTFT, TPOT and E2E and the throughput, predicted against measured, each beside the engine's floor
for that statistic (`run_floor`, from repeated runs of the cell) and a verdict (`verdict`): within
the target, within the engine's floor, or a miss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dooly.engines.groundtruth import BENCH_FILE, REQUESTS_FILE, STEPS_FILE
from dooly.errors import DoolyError
from dooly.jsonfile import read_json, read_json_object
from dooly.sim.calibration import (
    CacheGroups,
    HostSample,
    fit_new_shape_eager,
    pooled_input_copy,
    scheduler_uses_async,
)
from dooly.sim.schedulers import Scheduler
from dooly.sim.simulator import PERCENTILES, SimResult, latency_stats, simulate
from dooly.sim.step_model import (
    ATTENTION_SHAPE_FIELDS,
    CpuOverheadModel,
    GraphShape,
    StepKind,
    StepLatencyModel,
    StepPath,
    device_seconds,
    step_keywords,
)
from dooly.workload import Request

logger = logging.getLogger(__name__)

REQUEST_COLUMNS = (
    "request_id",
    "arrived_at_s",
    "first_token_s",
    "finished_s",
    "prompt_tokens",
    "output_tokens",
    "token_times_s",
)
STEP_COLUMNS = ("step", "start_s", "duration_s", "prefill", "decode_ctx")
# Optional step columns of `dooly bench`: the probe's split of a step, and its capture flag.
STEP_TIMING_COLUMNS = ("prepare_s", "forward_s", "update_s", "device_s")
GRAPH_CAPTURED_COLUMN = "graph_captured"
# bench.json `warmup`: how many warm-up requests, of how many prompt and output tokens.
WARMUP_KEYS = ("requests", "prompt_tokens", "output_tokens")
WARMUP_ID_PREFIX = "warmup-"
TRANSFORMERS_ENGINE = "transformers"
PERCENT = 100.0
# Statistics of a latency distribution compared simulated against measured: those the simulation
# summary reports (`latency_stats`), so the two read alike.
DISTRIBUTION_STATISTICS = ("mean", *(f"p{p}" for p in PERCENTILES))
# The per-request latencies both comparisons read, in report order.
REQUEST_METRICS = ("ttft", "tpot", "e2e")


@dataclass(slots=True)
class MeasuredRequest:
    request_id: str
    arrived_at_s: float
    first_token_s: float
    finished_s: float
    prompt_tokens: int
    output_tokens: int
    token_times_s: list[float] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrived_at_s

    @property
    def e2e_s(self) -> float:
        return self.finished_s - self.arrived_at_s

    @property
    def tpot_s(self) -> float:
        """Mean gap between output tokens after the first; from the token timestamps when there
        are several, else from the finish time; NaN for a single-token output."""
        times = self.token_times_s
        if len(times) >= 2:
            return (times[-1] - times[0]) / (len(times) - 1)
        if self.output_tokens > 1:
            return (self.finished_s - self.first_token_s) / (self.output_tokens - 1)
        return math.nan


@dataclass(slots=True)
class MeasuredStep:
    step: int
    start_s: float
    duration_s: float
    prefill: list[tuple[int, int]]
    decode_ctx: list[int]
    # The bench probe's split of the step (NaN / False where a ground truth lacks it): what an
    # asynchronous run's host and device times are read from (`async_host_samples`).
    prepare_s: float = math.nan
    forward_s: float = math.nan
    update_s: float = math.nan
    device_s: float = math.nan
    graph_captured: bool = False

    def sizes(self) -> tuple[int, int, int]:
        """(sequences, query tokens, KV tokens read): what the overhead terms scale with."""
        num_seqs = len(self.prefill) + len(self.decode_ctx)
        num_tokens = sum(q for q, _ in self.prefill) + len(self.decode_ctx)
        kv = sum(q + c for q, c in self.prefill) + sum(self.decode_ctx) + len(self.decode_ctx)
        return num_seqs, num_tokens, kv

    def kv_per_sequence(self) -> list[int]:
        """KV tokens each sequence reads (its cached and new tokens): summed, the third of `sizes`;
        per sequence, what a sliding-window cache group caps at its window."""
        return [q + c for q, c in self.prefill] + [c + 1 for c in self.decode_ctx]


def host_sample(key: str, num_layers: int, step: MeasuredStep, host_s: float, model: str, groups: CacheGroups) -> HostSample:
    """A step's `HostSample`, with the KV index entries its model's cache groups build."""
    group_tokens, sliding_tokens = groups.kv_reads(step.kv_per_sequence())
    return HostSample(key, num_layers, *step.sizes(), host_s, model, group_tokens, sliding_tokens)


@dataclass
class GroundTruth:
    requests: list[MeasuredRequest]
    steps: list[MeasuredStep]
    # Unrecorded passes of the same workload the engine served first (`dooly bench --warm-passes`).
    warm_passes: int = 0
    # The harness's warm-up requests, served before everything else (bench.json `warmup`).
    warmup: list[Request] = field(default_factory=list)

    def workload(self) -> list[Request]:
        """The measured requests as a workload on a clock starting at the first arrival."""
        if not self.requests:
            raise DoolyError("the ground truth holds no requests")
        origin = min(r.arrived_at_s for r in self.requests)
        return [
            Request(r.request_id, r.arrived_at_s - origin, r.prompt_tokens, r.output_tokens)
            for r in sorted(self.requests, key=lambda r: r.arrived_at_s)
        ]


def ground_truth_from_arrow(requests: Any, steps: Any | None = None) -> GroundTruth:
    """Build `GroundTruth` from the two pyarrow tables `dooly bench` writes."""
    _require_columns(requests, REQUEST_COLUMNS, "requests")
    rows = requests.select(list(REQUEST_COLUMNS)).to_pylist()
    measured = [
        MeasuredRequest(
            request_id=str(r["request_id"]),
            arrived_at_s=float(r["arrived_at_s"]),
            first_token_s=_float(r["first_token_s"]),
            finished_s=_float(r["finished_s"]),
            prompt_tokens=int(r["prompt_tokens"]),
            output_tokens=int(r["output_tokens"]),
            token_times_s=[float(t) for t in (r["token_times_s"] or [])],
        )
        for r in rows
    ]
    measured_steps: list[MeasuredStep] = []
    if steps is not None:
        _require_columns(steps, STEP_COLUMNS, "steps")
        timing = [c for c in (*STEP_TIMING_COLUMNS, GRAPH_CAPTURED_COLUMN) if c in steps.column_names]
        for r in steps.select([*STEP_COLUMNS, *timing]).to_pylist():
            measured_steps.append(
                MeasuredStep(
                    step=int(r["step"]),
                    start_s=float(r["start_s"]),
                    duration_s=float(r["duration_s"]),
                    prefill=[(int(c["q"]), int(c["ctx"])) for c in (r["prefill"] or [])],
                    decode_ctx=[int(c) for c in (r["decode_ctx"] or [])],
                    **{c: _float(r[c]) for c in timing if c != GRAPH_CAPTURED_COLUMN},
                    graph_captured=bool(r.get(GRAPH_CAPTURED_COLUMN) or False),
                )
            )
    return GroundTruth(measured, measured_steps)


@dataclass(frozen=True, slots=True)
class DistributionError:
    """One statistic (mean or a percentile) of a latency distribution, predicted against measured.

    The error is relative to the measurement, in percent: > 0 means the prediction is slower than
    reality. The measured statistic is positive, since `ErrorStats` keeps positive measurements only."""

    statistic: str
    predicted_s: float
    measured_s: float

    @property
    def error_pct(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s * PERCENT

    @property
    def abs_error_pct(self) -> float:
        return abs(self.error_pct)

    def as_dict(self) -> dict[str, float]:
        return {
            "predicted_s": self.predicted_s,
            "measured_s": self.measured_s,
            "error_pct": self.error_pct,
            "abs_error_pct": self.abs_error_pct,
        }


@dataclass
class ErrorStats:
    """Absolute percentage errors of paired predictions (pairs with a non-positive or missing
    measurement are left out and counted).

    The same kept pairs feed both views: per pair (`ape`, `as_dict`) and per distribution
    (`distribution`, `distribution_dict`), so both describe exactly the same requests."""

    predicted: np.ndarray
    measured: np.ndarray
    skipped: int = 0

    @property
    def ape(self) -> np.ndarray:
        return np.abs(self.predicted - self.measured) / self.measured * PERCENT

    def distribution(self) -> list[DistributionError]:
        """Mean and percentiles of the predicted values against those of the measured values,
        each side summarised on its own: which request is slow does not matter, only how many
        are and by how much (empty when no pair is usable)."""
        if self.measured.size == 0:
            return []
        predicted, measured = latency_stats(self.predicted), latency_stats(self.measured)
        return [DistributionError(name, p, m) for name in DISTRIBUTION_STATISTICS
                if (p := predicted[name]) is not None and (m := measured[name]) is not None]

    def distribution_dict(self) -> dict[str, Any]:
        """`{"n", "skipped", "mean": {...}, "p50": {...}, ...}`; statistics are None when n is 0."""
        errors = {e.statistic: e.as_dict() for e in self.distribution()}
        return {
            "n": int(self.measured.size),
            "skipped": self.skipped,
            **{name: errors.get(name) for name in DISTRIBUTION_STATISTICS},
        }

    def as_dict(self) -> dict[str, float | int | None]:
        ape = self.ape
        if ape.size == 0:
            return {"n": 0, "skipped": self.skipped, "mape": None, "p50_ape": None, "p90_ape": None, "bias": None}
        return {
            "n": int(ape.size),
            "skipped": self.skipped,
            "mape": float(ape.mean()),
            "p50_ape": float(np.percentile(ape, 50)),
            "p90_ape": float(np.percentile(ape, 90)),
            # Signed mean relative error: > 0 means the prediction is slower than reality.
            "bias": float(np.mean((self.predicted - self.measured) / self.measured) * PERCENT),
        }


def error_stats(predicted: list[float], measured: list[float]) -> ErrorStats:
    """Pair up predictions and measurements, dropping pairs that cannot give a percentage."""
    if len(predicted) != len(measured):
        raise ValueError("predicted and measured must have the same length")
    keep_p, keep_m = [], []
    for p, m in zip(predicted, measured):
        if m is None or p is None or not (m > 0) or math.isnan(p) or not math.isfinite(m):
            continue
        keep_p.append(p)
        keep_m.append(m)
    return ErrorStats(np.asarray(keep_p, dtype=np.float64), np.asarray(keep_m, dtype=np.float64), len(measured) - len(keep_m))


def mape(predicted: list[float], measured: list[float]) -> float:
    """Mean absolute percentage error in percent (NaN when no pair is usable)."""
    stats = error_stats(predicted, measured)
    return float(stats.ape.mean()) if stats.ape.size else math.nan


class RequestLatencies(Protocol):
    """What a per-request comparison reads from either side: a simulated `RequestRecord` or a
    `MeasuredRequest` of another real run."""

    @property
    def request_id(self) -> str: ...

    @property
    def ttft_s(self) -> float: ...

    @property
    def tpot_s(self) -> float: ...

    @property
    def e2e_s(self) -> float: ...


@dataclass
class RequestComparison:
    ttft: ErrorStats
    tpot: ErrorStats
    e2e: ErrorStats
    unmatched: int

    def metrics(self) -> dict[str, ErrorStats]:
        """The per-metric pairs, keyed as in REQUEST_METRICS."""
        return {"ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e}

    def as_dict(self) -> dict[str, Any]:
        """Per-request errors (MAPE, median and p90 APE, bias) and the unmatched count."""
        return {**{name: stats.as_dict() for name, stats in self.metrics().items()}, "unmatched_requests": self.unmatched}

    def distribution_dict(self) -> dict[str, Any]:
        """Distribution errors (mean, p50, p90, p99) of the same requests, per metric."""
        return {name: stats.distribution_dict() for name, stats in self.metrics().items()}


def compare_latencies(measured: Sequence[MeasuredRequest], predicted: Iterable[RequestLatencies]) -> RequestComparison:
    """Per-request TTFT, TPOT and E2E of `predicted` against `measured`, matched by request id
    (all are time differences, so the two clocks may have different origins). Measured requests
    with no prediction are counted as unmatched; pairs without a usable value on either side (an
    errored request, a single-token output's TPOT) are left out and counted by `error_stats`."""
    by_id = {r.request_id: r for r in predicted}
    pairs: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in REQUEST_METRICS}
    unmatched = 0
    for truth in measured:
        other = by_id.get(truth.request_id)
        if other is None:
            unmatched += 1
            continue
        for name, (predicted_values, measured_values) in pairs.items():
            attribute = f"{name}_s"
            predicted_values.append(getattr(other, attribute))
            measured_values.append(getattr(truth, attribute))
    stats = {name: error_stats(p, m) for name, (p, m) in pairs.items()}
    return RequestComparison(stats["ttft"], stats["tpot"], stats["e2e"], unmatched)


def compare_requests(truth: GroundTruth, result: SimResult) -> RequestComparison:
    """The simulation's requests against the ground truth's (see `compare_latencies`)."""
    return compare_latencies(truth.requests, result.requests)


def compare_runs(reference: GroundTruth, repeat: GroundTruth) -> RequestComparison:
    """A second real run of the same workload scored against the first exactly as the simulator
    is scored: the engine's own run-to-run floor under the per-request and distribution errors
    (a simulator error below that floor cannot be told apart from the engine's own noise)."""
    return compare_latencies(reference.requests, repeat.requests)


def replay_steps(
    steps: list[MeasuredStep],
    step_model: StepLatencyModel,
    cpu_overhead: CpuOverheadModel | None = None,
    path_for: Any = None,
    captured: set[GraphShape] | None = None,
) -> list[float]:
    """Predicted seconds for each measured batch composition.

    `path_for(prefill, decode_ctx) -> StepPath` tells the models which path the engine took
    (by default: the kind of the batch, no CUDA graph, no padding); `captured`, the CUDA-graph
    shapes the engine held before the first step (none by default)."""
    overhead = cpu_overhead or CpuOverheadModel.zero()
    keywords = step_keywords(step_model)
    out = []
    captured = set(captured or ())
    for step in steps:
        path = path_for(step.prefill, step.decode_ctx) if path_for else _default_path(step.prefill, step.decode_ctx)
        gpu = device_seconds(step_model, step.prefill, step.decode_ctx, path, keywords)
        sizes = step.sizes()
        host = overhead.seconds(path, *sizes) + overhead.sync_capture_seconds(path, captured, sizes[0])
        out.append(float(gpu) + host)
    return out


def compare_steps(
    steps: list[MeasuredStep],
    step_model: StepLatencyModel,
    cpu_overhead: CpuOverheadModel | None = None,
    path_for: Any = None,
    captured: set[GraphShape] | None = None,
) -> ErrorStats:
    predicted = replay_steps(steps, step_model, cpu_overhead, path_for, captured)
    return error_stats(predicted, [s.duration_s for s in steps])


def compare_async_steps(
    steps: list[MeasuredStep],
    step_model: StepLatencyModel,
    cpu_overhead: CpuOverheadModel | None = None,
    path_for: Any = None,
    input_bytes: int = 0,
) -> ErrorStats:
    """An asynchronous run's steps: a row's wall time spans two batches, so each batch's device
    time is compared instead, plus what it waited for its input copy (the probe's device time
    starts when the stream is free, before the wait; `input_copy_waits`, the copy of
    `input_bytes` per launch) and `post_capture_device_s` right after a capture; captured steps,
    whose measured device time holds the capture, are left out."""
    overhead = cpu_overhead or CpuOverheadModel.zero()
    keywords = step_keywords(step_model)
    device = []
    for step in steps:
        path = path_for(step.prefill, step.decode_ctx) if path_for else _default_path(step.prefill, step.decode_ctx)
        device.append(float(device_seconds(step_model, step.prefill, step.decode_ctx, path, keywords)))
    copy = overhead.input_copy_seconds(input_bytes)
    waits = input_copy_waits(steps, async_timeline(steps), device, copy) if copy else [0.0] * len(steps)
    predicted: list[float] = []
    measured: list[float] = []
    previous_captured = False
    for step, gpu, wait in zip(steps, device, waits, strict=True):
        if not step.graph_captured and math.isfinite(step.device_s):
            predicted.append(gpu + wait + (overhead.post_capture_device_s if previous_captured else 0.0))
            measured.append(step.device_s)
        previous_captured = step.graph_captured
    return error_stats(predicted, measured)


def _default_path(prefill: list[tuple[int, int]], decode_ctx: list[int]) -> StepPath:
    tokens = sum(q for q, _ in prefill) + len(decode_ctx)
    return StepPath(StepKind.of(prefill, decode_ctx), cuda_graph=False, padded_tokens=tokens)


# ---------------------------------------------------------------------------------------------
# The planner's summary: mean, p50, p90 of TTFT/TPOT/E2E and throughput, each beside the engine's
# own run-to-run floor, with a verdict.

# What a capacity planner reads, in table order.
SUMMARY_STATISTICS = ("mean", "p50", "p90")
THROUGHPUT = "throughput"
THROUGHPUT_UNIT = "output tok/s"
LATENCY_UNIT = "s"
# Issue #24's target for a cell's mean and p90 TTFT and TPOT: within 8%, or within the engine's
# own floor for that cell, whichever is larger.
DEFAULT_TARGET_PCT = 8.0
WITHIN_TARGET, WITHIN_FLOOR, MISS, NO_DATA = "within target", "within floor", "miss", "no data"


def summary_key(metric: str, statistic: str) -> str:
    """`ttft_mean`, `tpot_p90`, ...: the key of one summary row."""
    return f"{metric}_{statistic}"


def measured_throughput(truth: GroundTruth) -> float | None:
    """Output tokens per second of a real run, as the simulation summary counts them: the finished
    requests' output tokens over first arrival to last finish (None when nothing finished)."""
    finished = [r for r in truth.requests if math.isfinite(r.finished_s)]
    if not finished:
        return None
    makespan = max(r.finished_s for r in finished) - min(r.arrived_at_s for r in truth.requests)
    return sum(r.output_tokens for r in finished) / makespan if makespan > 0 else None


def _relative_pct(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not reference > 0:
        return None
    return (value - reference) / reference * PERCENT


def run_floor(runs: Sequence[GroundTruth]) -> dict[str, float]:
    """The engine's run-to-run floor of each summary statistic, in percent: the largest relative
    difference between any two runs of the same cell (every ordered pair, each run scored against
    the other exactly as the simulator is, on the requests usable in both). Empty for one run."""
    floor: dict[str, float] = {}
    for index, reference in enumerate(runs):
        for other_index, repeat in enumerate(runs):
            if index == other_index:
                continue
            distribution = compare_runs(reference, repeat).distribution_dict()
            for metric in REQUEST_METRICS:
                for statistic in SUMMARY_STATISTICS:
                    entry = distribution[metric][statistic]
                    if entry is not None:
                        key = summary_key(metric, statistic)
                        floor[key] = max(floor.get(key, 0.0), float(entry["abs_error_pct"]))
            difference = _relative_pct(measured_throughput(repeat), measured_throughput(reference))
            if difference is not None:
                floor[THROUGHPUT] = max(floor.get(THROUGHPUT, 0.0), abs(difference))
    return floor


def verdict(error_pct: float | None, floor_pct: float | None, target_pct: float) -> str:
    """`within target` when |error| <= target; else `within floor` when |error| <= the engine's
    own floor (the miss cannot be told from the engine's noise); else `miss`."""
    if error_pct is None:
        return NO_DATA
    if abs(error_pct) <= target_pct:
        return WITHIN_TARGET
    if floor_pct is not None and abs(error_pct) <= floor_pct:
        return WITHIN_FLOOR
    return MISS


@dataclass(frozen=True)
class SummaryRow:
    """One statistic a planner reads: measured (the first run), predicted, error and floor."""

    statistic: str
    unit: str
    measured: float | None
    predicted: float | None
    floor_pct: float | None
    target_pct: float

    @property
    def error_pct(self) -> float | None:
        """> 0: the simulation is slower (latency) or serves more (throughput) than measured."""
        return _relative_pct(self.predicted, self.measured)

    @property
    def verdict(self) -> str:
        return verdict(self.error_pct, self.floor_pct, self.target_pct)

    def as_dict(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "unit": self.unit, "measured": self.measured, "predicted": self.predicted,
                "error_pct": self.error_pct, "floor_pct": self.floor_pct, "verdict": self.verdict}


@dataclass
class ValidationReport:
    requests: RequestComparison
    steps: ErrorStats | None
    result: SimResult
    # Per phase of the simulated steps: the share of predicted device time that is measured, and
    # the estimated operations (fitted step models only; see dooly.fit.coverage).
    coverage: dict[str, Any] | None = None
    # The planner's summary: the measured run's throughput, the engine's floor per statistic (from
    # repeated runs of the cell; empty for one run) and the target the verdict reads.
    measured_throughput: float | None = None
    floor: dict[str, float] = field(default_factory=dict)
    runs: int = 1
    target_pct: float = DEFAULT_TARGET_PCT

    def summary_rows(self, simulation: dict[str, Any] | None = None) -> list[SummaryRow]:
        """Mean, p50 and p90 of TTFT, TPOT and E2E (on the requests both sides can score), then
        throughput; each with the engine's floor where repeats give one."""
        distribution = self.requests.distribution_dict()
        rows = []
        for metric in REQUEST_METRICS:
            for statistic in SUMMARY_STATISTICS:
                key = summary_key(metric, statistic)
                entry = distribution[metric][statistic] or {}
                rows.append(SummaryRow(key, LATENCY_UNIT, entry.get("measured_s"), entry.get("predicted_s"),
                                       self.floor.get(key), self.target_pct))
        simulation = simulation if simulation is not None else self.result.summary()
        rows.append(SummaryRow(THROUGHPUT, THROUGHPUT_UNIT, self.measured_throughput,
                               simulation["throughput"]["output_tokens_per_s"], self.floor.get(THROUGHPUT),
                               self.target_pct))
        return rows

    def as_dict(self) -> dict[str, Any]:
        simulation = self.result.summary()
        return {
            "summary": {
                "target_pct": self.target_pct,
                "runs": self.runs,
                "rows": [row.as_dict() for row in self.summary_rows(simulation)],
            },
            "requests": self.requests.as_dict(),
            "distribution": self.requests.distribution_dict(),
            "steps": self.steps.as_dict() if self.steps is not None else None,
            "simulation": simulation,
            "coverage": self.coverage,
        }


def validate(
    truth: GroundTruth,
    scheduler: Scheduler,
    step_model: StepLatencyModel,
    cpu_overhead: CpuOverheadModel | None = None,
    path_for: Any = None,
    repeats: Sequence[GroundTruth] = (),
    target_pct: float = DEFAULT_TARGET_PCT,
) -> ValidationReport:
    """Simulate the measured workload with the given engine settings and compare both ways.

    `repeats` are other real runs of the same cell (same requests, same settings): with them the
    summary carries the engine's own run-to-run floor beside each statistic (`run_floor`).

    Measured steps are replayed on the path the engine settings imply for their composition
    (`scheduler.path_for`) unless `path_for` says otherwise. The engine's unrecorded warm passes
    are simulated first on the same engine state (the CUDA graphs they captured), each with a
    fresh scheduler, as the bench served them, after its warm-up requests (`truth.warmup`)."""
    path_for = path_for or scheduler.path_for
    workload = truth.workload()
    captured = warm_engine(truth, scheduler, step_model, cpu_overhead)
    # Replayed first: the recorded pass starts with what the warm passes captured (replay copies it).
    if not truth.steps:
        steps = None
    elif scheduler_uses_async(scheduler):
        steps = compare_async_steps(truth.steps, step_model, cpu_overhead, path_for, scheduler.async_input_bytes)
    else:
        steps = compare_steps(truth.steps, step_model, cpu_overhead, path_for, captured)
    fitted = hasattr(step_model, "coverage_by_phase")
    result = simulate(workload, scheduler, step_model, cpu_overhead, captured=captured, record_batches=fitted)
    coverage = None
    if fitted:
        from dooly.fit.coverage import coverage_payload

        coverage = coverage_payload(step_model.coverage_of_phases(result.batch_phases()))  # type: ignore[attr-defined]
    runs = [truth, *repeats]
    return ValidationReport(compare_requests(truth, result), steps, result, coverage,
                            measured_throughput=measured_throughput(truth), floor=run_floor(runs) if repeats else {},
                            runs=len(runs), target_pct=target_pct)


def warm_engine(truth: GroundTruth, scheduler: Scheduler, step_model: StepLatencyModel,
                cpu_overhead: CpuOverheadModel | None = None) -> set[GraphShape]:
    """The CUDA graphs the engine holds when its recorded pass starts: its warm-up requests
    (`truth.warmup`) and unrecorded warm passes simulated, each with a fresh scheduler, as the
    bench served them."""
    captured: set[GraphShape] = set()
    if truth.warmup:
        simulate(truth.warmup, scheduler.fresh(), step_model, cpu_overhead, captured=captured)
    if truth.warm_passes:
        workload = truth.workload()
        for _ in range(truth.warm_passes):
            simulate(workload, scheduler.fresh(), step_model, cpu_overhead, captured=captured)
    return captured


def check_repeat(reference: GroundTruth, repeat: GroundTruth, name: str) -> None:
    """Refuse a 'repeat' that served other requests than the reference run."""
    ours, theirs = {r.request_id for r in reference.requests}, {r.request_id for r in repeat.requests}
    if ours != theirs:
        raise DoolyError(f"{name} is not a repeat of the first --ground-truth: {len(ours - theirs)} of its requests "
                         f"are missing and {len(theirs - ours)} are extra")


def plot_scatter(report: ValidationReport, path: str | Path) -> Path:
    """Predicted-vs-measured scatter (TTFT, TPOT, step latency) with the y = x line, as a PNG."""
    from dooly.sim.plots import scatter_panels

    panels = [("TTFT (s)", report.requests.ttft), ("TPOT (s)", report.requests.tpot)]
    if report.steps is not None:
        panels.append(("step latency (s)", report.steps))
    return scatter_panels(panels, Path(path))


def load_ground_truth(directory: str | Path) -> GroundTruth:
    """The ground truth `dooly bench` wrote to `directory` (its requests, and its steps where
    recorded): what `dooly validate` and `compare_runs` read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    requests_path = directory / REQUESTS_FILE
    if not requests_path.is_file():
        raise DoolyError(f"ground truth {directory} has no {REQUESTS_FILE}")
    steps_path = directory / STEPS_FILE
    try:
        requests = pq.read_table(requests_path)
        steps = pq.read_table(steps_path) if steps_path.is_file() else None
    except (OSError, pa.ArrowException) as exc:
        raise DoolyError(f"ground truth in {directory} is not readable Parquet: {exc}") from None
    truth = ground_truth_from_arrow(requests, steps)
    bench_path = directory / BENCH_FILE
    if bench_path.is_file():
        warm = read_json_object(bench_path, "bench record").get("warm_passes", 0)
        if not isinstance(warm, int) or isinstance(warm, bool) or warm < 0:
            raise DoolyError(f"{bench_path}: warm_passes must be an integer >= 0, got {warm!r}")
        truth.warm_passes = warm
        truth.warmup = warmup_requests(read_json_object(bench_path, "bench record"), bench_path)
    return truth


def warmup_requests(bench: dict[str, Any], bench_path: Path) -> list[Request]:
    """The warm-up requests a bench record says its harness served first, all arriving at once:
    its `warmup` entry, or, for a transformers run recorded before bench.json carried one, the
    harness's defaults (it always served them); none for another engine."""
    from dooly.engines.groundtruth import DEFAULT_WARMUP_REQUESTS, WARMUP_OUTPUT_TOKENS, WARMUP_PROMPT_TOKENS

    if "warmup" in bench:
        record = bench["warmup"]
        if record is None:
            return []
        sizes = [record.get(key) if isinstance(record, dict) else None for key in WARMUP_KEYS]
        counts = [v for v in sizes if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
        if len(counts) != len(WARMUP_KEYS):
            raise DoolyError(f"{bench_path}: warmup must hold non-negative integers {', '.join(WARMUP_KEYS)}, "
                             f"got {record!r}")
        count, prompt, output = counts
    elif bench.get("engine") == TRANSFORMERS_ENGINE:
        count, prompt, output = DEFAULT_WARMUP_REQUESTS, WARMUP_PROMPT_TOKENS, WARMUP_OUTPUT_TOKENS
    else:
        return []
    return [Request(f"{WARMUP_ID_PREFIX}{i}", 0.0, prompt, output) for i in range(count)]


def _require_columns(table: Any, needed: tuple[str, ...], name: str) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DoolyError(f"ground-truth {name} table lacks column(s) {', '.join(missing)}")


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------------------------------
# Measured engine steps (`dooly measure-steps`): composed prediction against real steps.

MEASURED_STEPS_SCHEMA = "dooly.measured_steps/1"
STEP_TIMINGS = ("graph", "eager")


def read_measured_steps(path: str | Path) -> dict[str, Any]:
    """A `dooly.measured_steps/1` document, checked enough to compare against."""
    document = read_json(path, "measured steps")
    if not isinstance(document, dict) or document.get("schema") != MEASURED_STEPS_SCHEMA:
        raise DoolyError(f"{path} is not a {MEASURED_STEPS_SCHEMA} document (from `dooly measure-steps`)")
    if not isinstance(document.get("steps"), list) or not document["steps"]:
        raise DoolyError(f"{path} holds no measured steps")
    return document


def compare_measured_steps(document: dict[str, Any], step_model: StepLatencyModel, timing: str = "graph") -> dict[str, Any]:
    """Per composition: predicted and measured seconds and the error; MAPE overall and per kind.

    `timing` picks the measurement: `graph` (CUDA-graph replay: device time, what a composed
    prediction of graph-timed ops stands for) or `eager`. Compositions without that timing
    (a capture that failed) are listed and left out of the statistics."""
    if timing not in STEP_TIMINGS:
        raise DoolyError(f"unknown timing {timing!r}; choose {' or '.join(STEP_TIMINGS)}")
    rows = []
    for entry in document["steps"]:
        prefill = [(int(q), int(c)) for q, c in entry["prefill"]]
        decode = [int(c) for c in entry["decode"]]
        measured = entry.get(f"{timing}_s")
        predicted = replay_steps([MeasuredStep(0, 0.0, 0.0, prefill, decode)], step_model)[0]
        rows.append({
            "name": entry.get("name", ""),
            "kind": entry.get("kind", _default_path(prefill, decode).kind.value),
            "prefill": [list(p) for p in prefill],
            "decode": decode,
            "predicted_s": predicted,
            "measured_s": measured,
            "ape_pct": abs(predicted - measured) / measured * PERCENT if measured else None,
        })
    summary = {"all": error_stats([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]).as_dict()}
    for kind in sorted({r["kind"] for r in rows}):
        part = [r for r in rows if r["kind"] == kind]
        summary[kind] = error_stats([r["predicted_s"] for r in part], [r["measured_s"] for r in part]).as_dict()
    return {"timing": timing, "steps": rows, "summary": summary}


def host_samples(
    truth: GroundTruth, scheduler: Scheduler, step_model: StepLatencyModel, *, num_layers: int = 0, model: str = "",
) -> tuple[list[HostSample], list[tuple[HostSample, StepPath]]]:
    """Every measured step's host time: its wall time minus the device time the step model
    predicts for that exact batch on the path the engine took. The first step of each CUDA-graph
    shape is returned apart (with its path): it paid for the graph's capture too."""
    keywords = step_keywords(step_model)
    groups = CacheGroups.from_scheduler(scheduler)
    samples: list[HostSample] = []
    captures: list[tuple[HostSample, StepPath]] = []
    seen: set[GraphShape] = set()
    for step in truth.steps:
        path = scheduler.path_for(step.prefill, step.decode_ctx)
        device = float(device_seconds(step_model, step.prefill, step.decode_ctx, path, keywords))
        sample = host_sample(path.overhead_key, num_layers, step, max(step.duration_s - device, 0.0), model, groups)
        shape = CpuOverheadModel.graph_shape(path)
        if shape is not None and shape not in seen:
            seen.add(shape)
            captures.append((sample, path))
        else:
            samples.append(sample)
    return samples, captures


@dataclass(frozen=True, slots=True)
class AsyncStepTiming:
    """One row of an asynchronous run, rebuilt on the device's clock (bench/async_batching.py).

    The bench probe writes a row at update time, and the engine's loop is prepare(N) -> launch(N)
    -> update(N-1): row N holds batch N's `prepare_s`, `forward_s` (the launch) and `device_s`
    (CUDA events on the compute stream, whose start fires once batch N-1 is done), and the update
    of batch N-1, its wait for the device included. So batch N runs on the device from
    max(end of N-1, start + prepare) for `device_s`; a captured step runs eagerly and
    synchronises, so the device is done when its launch returns."""

    host_s: float  # prepare + launch + the update's own work: the host's share of one cycle
    busy_s: float  # captured steps: launch time once the device was free (eager run + capture)
    device_end_s: float


def async_timeline(steps: Sequence[MeasuredStep]) -> list[AsyncStepTiming]:
    """The host and device time of every row of an asynchronous run (see `AsyncStepTiming`)."""
    missing = [name for name in STEP_TIMING_COLUMNS
               if steps and any(not math.isfinite(getattr(s, name)) for s in steps)]
    if missing:
        raise DoolyError(f"an async-batching ground truth needs the bench probe's step columns; "
                         f"{', '.join(missing)} missing or empty (record it with `dooly bench`)")
    out: list[AsyncStepTiming] = []
    device_end = -math.inf
    for step in steps:
        ready = step.start_s + step.prepare_s
        launched = ready + step.forward_s
        wait = max(0.0, device_end - launched)
        host = step.prepare_s + step.forward_s + max(step.update_s - wait, 0.0)
        free = max(device_end, ready)
        if step.graph_captured:
            busy = max(launched - free, 0.0)
            device_end = launched
        else:
            busy = 0.0
            device_end = free + step.device_s
        out.append(AsyncStepTiming(host, busy, device_end))
    return out


def input_copy_waits(steps: Sequence[MeasuredStep], timings: Sequence[AsyncStepTiming], device: Sequence[float],
                     copy_s: float) -> list[float]:
    """Per row of an asynchronous run: how long its device work waited for its input copy beyond
    the moment the probe's device time starts (the stream free: max(end of the previous row's
    device work, its launch)), each row replayed on the measured clock as `replay_steps` prices a
    synchronous step on its measured composition.

    The engine issues a launch's copy on its one copy stream behind the previous launch's copy
    (`ContinuousBatchingAsyncIOs.get_model_kwargs`), and that copy ended when the previous row's
    device work could start, if the copy held it up, or earlier: the host prepares a launch only
    after handing out the row before the previous one, that is after the previous row's device work
    could start. So a copy starts at max(launch, end of the previous row's device work less its
    predicted device time, `device`) and lasts `copy_s`. (A replay that chained the copies
    instead drifts over a copy-bound stretch of hundreds of steps wherever `copy_s` is a little
    off the engine's.) Zero everywhere when `copy_s` is 0."""
    waits: list[float] = []
    previous_start = previous_end = -math.inf
    for step, timing, predicted in zip(steps, timings, device, strict=True):
        ready = step.start_s + step.prepare_s
        copy_end = max(ready, previous_start) + copy_s
        waits.append(max(copy_end - max(previous_end, ready), 0.0))
        previous_start, previous_end = timing.device_end_s - predicted, timing.device_end_s
    return waits


def fit_input_copy(steps: Sequence[MeasuredStep], timings: Sequence[AsyncStepTiming], device: Sequence[float]) -> float:
    """The input copy (seconds) of an asynchronous run, from pairs of consecutive decode steps of
    equal size: the first launched with the device idle (so the copy stream idle too: the
    previous step's device work waited for its copy), the second launched while the first still
    ran, neither capturing a graph. The first step's measured device time is its whole copy plus
    its device work, S = copy + work; the second follows it at M = max(copy, work) (the next copy
    cannot start before the previous ends, the device work not before the copy). So {copy, work}
    is {M, S - M}, and the step model only says which: the one whose work is closer to its
    predicted device time (`device`, per row). The copy is the median over the pairs: Llama-3.2-1B
    at light load (work 10 ms, every step copy-bound) and Qwen2.5-7B (work 29 ms) give 19.8-21.0
    ms alike (lab/async_input_copy.py), where a fit of the copy against a free step-model bias
    cannot tell 20 + 10 from 10 + 20 on the 1B. Zero, with a warning, where the run has no pair:
    the simulator then adds no copy."""
    copies: list[float] = []
    for k in range(1, len(steps) - 1):
        first, second = steps[k], steps[k + 1]
        if first.graph_captured or second.graph_captured or first.prefill or second.prefill:
            continue
        if not first.decode_ctx or len(first.decode_ctx) != len(second.decode_ctx):
            continue
        idle = first.start_s + first.prepare_s >= timings[k - 1].device_end_s
        busy = second.start_s + second.prepare_s < timings[k].device_end_s
        if not (idle and busy and math.isfinite(first.device_s)):
            continue
        whole, pace = first.device_s, timings[k + 1].device_end_s - timings[k].device_end_s
        copies.append(min((pace, whole - pace), key=lambda copy: abs(whole - copy - device[k])))
    if not copies:
        logger.warning("no decode step of this run was launched on an idle device and followed by one of its size: "
                       "its input copy is taken as 0")
        return 0.0
    return max(float(np.median(copies)), 0.0)


@dataclass(frozen=True)
class AsyncSamples:
    """What an asynchronous calibration run gives (`async_host_samples`)."""

    samples: list[HostSample]  # ordinary steps' host work
    captures: list[tuple[HostSample, StepPath]]  # the captured steps' host time, with their paths
    stalls: list[float]  # device time of each step after a capture beyond its copy and the model's bias
    input_copy_s: float  # the input copy of every launch, fitted on the run (or as given)
    # Captures of an attention shape the engine never ran (`CpuOverheadModel.new_attention_shape`):
    # (the launch's seconds less the eager run's predicted device time, when the device was free
    # for the eager run: seconds after the launch began), for `fit_new_shape_eager`; their host
    # samples are not in `captures` (the capture cost is priced on the others) unless the run
    # captured no known shape.
    new_shapes: list[tuple[float, float]] = field(default_factory=list)


def async_host_samples(
    truth: GroundTruth, scheduler: Scheduler, step_model: StepLatencyModel, *, num_layers: int = 0, model: str = "",
    input_copy_s: float | None = None, split_new_shapes: bool = False,
) -> AsyncSamples:
    """`host_samples` of an asynchronous run (transformers async batching), from the probe's split.

    A wall-time residual means nothing there (host and device overlap), so an ordinary step's
    sample is its host work: prepare + launch + the update's own work. The run's input copy is
    fitted on its device times (`fit_input_copy`) unless `input_copy_s` is given. A captured
    step's sample adds what its launch held the host once the device was free and its inputs
    copied, beyond the predicted device time (the eager run, then the capture), as the simulator
    charges it. Stalls: the extra device time of each step launched right after a capture,
    measured device time minus its copy wait and predicted time, less the median of that
    difference over ordinary steps (the step model's own bias).

    `split_new_shapes` (`dooly calibrate --async-captures split`): a capture at an attention shape
    the engine never ran (its warm-up simulated first, `warm_engine`) pays the eager run's
    first-shape host work from its launch before the eager kernels start (lab/async_ttft.py): it
    goes to `new_shapes` (its launch time less the eager run's device time, and when the device
    was free for it, both from the launch), and the capture cost is priced on the other captures. Off (the default), every capture prices the one capture cost."""
    keywords = step_keywords(step_model)
    groups = CacheGroups.from_scheduler(scheduler)
    timings = async_timeline(truth.steps)
    # The attention shapes the engine ran before its recorded pass (only the split asks).
    seen = ({graph[:ATTENTION_SHAPE_FIELDS] for graph in warm_engine(truth, scheduler, step_model)}
            if split_new_shapes else set())
    paths = [scheduler.path_for(step.prefill, step.decode_ctx) for step in truth.steps]
    device = [float(device_seconds(step_model, step.prefill, step.decode_ctx, path, keywords))
              for step, path in zip(truth.steps, paths, strict=True)]
    copy_s = fit_input_copy(truth.steps, timings, device) if input_copy_s is None else input_copy_s
    waits = input_copy_waits(truth.steps, timings, device, copy_s)
    samples: list[HostSample] = []
    captures: list[tuple[HostSample, StepPath]] = []
    known: list[bool] = []  # per capture: whether the engine had run its attention shape
    new_shapes: list[tuple[float, float]] = []
    residual: list[float] = []
    after_capture: list[float] = []
    previous_captured = False
    previous_end = -math.inf
    for step, timing, path, predicted, wait in zip(truth.steps, timings, paths, device, waits, strict=True):
        shape = CpuOverheadModel.attention_shape(path)
        if step.graph_captured:
            host = timing.host_s - step.forward_s + max(timing.busy_s - wait - predicted, 0.0)
            captures.append((host_sample(path.overhead_key, num_layers, step, host, model, groups), path))
            known.append(shape in seen)
            if not known[-1]:
                ready = step.start_s + step.prepare_s
                # The launch less its eager run's device time, and when the device was free for
                # that run (the previous step and the input copy done), both from the launch.
                new_shapes.append((step.forward_s - predicted, max(previous_end, ready) + wait - ready))
        else:
            samples.append(host_sample(path.overhead_key, num_layers, step, timing.host_s, model, groups))
            (after_capture if previous_captured else residual).append(step.device_s - wait - predicted)
        previous_captured = step.graph_captured
        previous_end = timing.device_end_s
        seen.add(shape)
    bias = float(np.median(residual)) if residual else 0.0
    if split_new_shapes and any(known):
        captures = [capture for capture, seen_before in zip(captures, known, strict=True) if seen_before]
    else:
        # One capture constant over every capture: unsplit (`ASYNC_CAPTURES`), or no known shape to price it on.
        new_shapes = []
    return AsyncSamples(samples, captures, [value - bias for value in after_capture], copy_s, new_shapes)


def calibrate_overhead(
    truths: list[tuple[GroundTruth, Scheduler]],
    step_model: StepLatencyModel,
    *,
    engine: str = "",
    platform: str = "",
    source: str = "",
    split_new_shapes: bool = False,
) -> CpuOverheadModel:
    """The engine's per-step overhead, measured: for every step of a calibration run, its wall
    time minus the device time the step model predicts for that exact batch on the path the
    engine took, fitted per path (constant, per sequence, per token, per KV token).

    What lands here is everything the per-operation latencies do not see: scheduling, input
    preparation, kernel-launch gaps, sampling and output handling. Calibrate on a workload other
    than the ones you validate on."""
    samples: list[HostSample] = []
    captures: list[tuple[HostSample, StepPath]] = []
    stalls: list[float] = []
    copies: list[tuple[float, int]] = []
    new_shapes: list[tuple[float, float]] = []
    for truth, scheduler in truths:
        if scheduler_uses_async(scheduler):
            measured = async_host_samples(truth, scheduler, step_model, split_new_shapes=split_new_shapes)
            steps, first_seen = measured.samples, measured.captures
            stalls += measured.stalls
            copies.append((measured.input_copy_s, scheduler.async_input_bytes))
            new_shapes += measured.new_shapes
        else:
            steps, first_seen = host_samples(truth, scheduler, step_model)
        samples += steps
        captures += first_seen
    if not samples:
        raise DoolyError("the calibration ground truth holds no steps")
    fitted = CpuOverheadModel.fit(
        [(s.key, s.num_seqs, s.num_tokens, s.kv_tokens, s.host_s) for s in samples],
        engine=engine, platform=platform, source=source,
    )
    if captures:
        # What a first-seen shape costs beyond an ordinary step on its path.
        excess = [s.host_s - fitted.seconds(path, s.num_seqs, s.num_tokens, s.kv_tokens) for s, path in captures]
        fitted.graph_capture_s = max(float(np.median(excess)), 0.0)
    if new_shapes:
        fitted.new_shape_eager_s = fit_new_shape_eager([(launch - fitted.graph_capture_s, device)
                                                        for launch, device in new_shapes])
    if stalls:
        fitted.post_capture_device_s = max(float(np.median(stalls)), 0.0)
    if copies:
        fitted.input_copy_s, fitted.input_copy_bytes = pooled_input_copy(copies)
    return fitted

