"""Discrete-event simulation of one serving replica.

Requests arrive on their own clock; whenever the engine is free the scheduler model forms the next
batch; the step takes `step_model` device time plus `cpu_overhead` host time for that exact batch
and execution path; tokens sampled by the step are delivered when it ends.

Two loops, as in the engines:
- synchronous (default): schedule, run, deliver, repeat; a step lasts host + device time;
- asynchronous (transformers `use_async_batching`): the engine's loop is prepare(N+1) ->
  launch(N+1) -> update(N), measured on H100 runs (bench/async_batching.py, docs/calibration.md):
  the host prepares and launches N+1 while the device runs N, so the device starts N+1 at
  max(end of N, host start + host time of N+1); N's tokens are handed out only after N+1 is
  launched, at max(end of N, launch of N+1), and the host schedules N+2 then. The scheduler forms
  N+1 before it knows N's results (a request that finishes in N takes a wasted slot in N+1). Steps
  alternate between two IO buffer pairs, each with its own CUDA graphs, so a shape is captured once
  per pair; a capture runs the step eagerly and synchronises, so it holds the host (and N's
  tokens) for the step's device time plus the capture (and, the first time the process runs the
  step's attention shape, the eager run's kernels start no earlier than `new_shape_eager_s` after
  its launch: the first-shape host work, hidden behind the device's work in flight but not behind
  the step's own), and the step launched after it pays the
  calibration's `post_capture_device_s` on the device. Every launch copies its inputs to the
  device on one copy stream (transformers copies the whole attention mask, max_batch_tokens x
  cache tokens: ~20 ms on the H100 runs): the copy starts at max(launch, end of the previous
  launch's copy) and lasts `CpuOverheadModel.input_copy_seconds`, and the step's device work
  cannot start before it ends; so a step shorter than the copy runs at the copy's pace, and the
  step after a capture (the device and the copy stream idle) waits for its whole copy.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np

from dooly.sim.schedulers import DecodeWindow, ScheduledBatch, Scheduler, Seq, SimulationError
from dooly.sim.step_model import (
    CpuOverheadModel,
    GraphShape,
    StepKind,
    StepLatencyModel,
    StepPath,
    decode_steps,
    device_seconds,
    step_keywords,
)
from dooly.workload import Request

if TYPE_CHECKING:
    from dooly.fit.predictor import DecodeRuns, FlatSteps

logger = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)
# Guards against a scheduler bug looping forever: every step processes at least one token, so a
# run needs at most (prompt + output tokens) steps per pass, times a generous recompute factor.
MAX_STEPS_PER_TOKEN = 8
MIN_STEP_LIMIT = 1000
# A scheduler may return nothing right after preempting (vLLM frees a request and admits it only
# on the next call); it is asked again this many times before the run counts as stalled.
IDLE_RETRIES = 2


@dataclass(slots=True)
class RequestRecord:
    """Per-request outcome. Times are seconds on the workload clock; TPOT is the mean time between
    output tokens after the first (NaN for single-token outputs)."""

    request_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    ttft_s: float
    tpot_s: float
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    preemptions: int


@dataclass(slots=True)
class StepRecord:
    """One engine step: when it started, how long it took, what it held. Synchronous loops: the
    step starts when the host starts preparing it and lasts host + device time; asynchronous
    loops: the device interval (host work overlaps the previous step)."""

    step: int
    start_s: float
    duration_s: float
    gpu_s: float
    cpu_s: float
    num_prefill_tokens: int
    num_prefill_seqs: int
    num_decode_seqs: int
    kv_tokens: int
    kind: str
    cuda_graph: bool
    padded_tokens: int
    preempted: int
    sampled: int
    wasted_tokens: int


_STEP_FIELDS = tuple(StepRecord.__dataclass_fields__)
# The step log's columns whose value is the same at every step of a decode window, and that value:
# windows leave them out while they run (`_Run.window_rows`), and `_Run.finish_log` fills them in.
_WINDOW_DEFAULTS = (
    ("num_prefill_tokens", 0), ("num_prefill_seqs", 0), ("kind", StepKind.DECODE.value), ("preempted", 0),
    ("wasted_tokens", 0),
)

# A step's composition as the step model takes it: (prefill chunks, decode contexts).
Batch = tuple[list[tuple[int, int]], list[int]]


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """How the recorded compositions hold a decode window's steps: the first step's decode
    contexts and the number of steps (step i decodes every context plus i). A window runs
    thousands of steps of a simulation, and a list of contexts per step was a tenth of its
    loop and, flattened again for coverage, a third of its report."""

    decode_ctx: list[int]
    steps: int

    def batches(self) -> Iterator[Batch]:
        ctx = self.decode_ctx
        for step in range(self.steps):
            yield [], [c + step for c in ctx]


def _phase_arrays(log: list[Batch | DecodeRun]) -> dict[str, FlatSteps | DecodeRuns]:
    """`dooly.fit.predictor.phase_arrays` of the recorded compositions, the decode steps kept
    as runs (`DecodeRuns`: a window's contexts and steps; a scheduled decode step a run of one)
    instead of a list of contexts per step."""
    from dooly.fit.predictor import PHASE_DECODE, DecodeRuns, flatten_steps, step_phase

    others: dict[str, list[Batch]] = {}
    contexts: list[list[int]] = []
    steps: list[int] = []
    for entry in log:
        if isinstance(entry, DecodeRun):
            contexts.append(entry.decode_ctx)
            steps.append(entry.steps)
            continue
        prefill, decode_ctx = entry
        phase = step_phase(prefill, decode_ctx)
        if phase == PHASE_DECODE:
            contexts.append(decode_ctx)
            steps.append(1)
        else:
            others.setdefault(phase, []).append(entry)
    phases: dict[str, FlatSteps | DecodeRuns] = {
        phase: (*flatten_steps(chosen), len(chosen)) for phase, chosen in others.items()
    }
    if steps:
        phases[PHASE_DECODE] = DecodeRuns(contexts, steps)
    return dict(sorted(phases.items()))


class SimResult:
    """What `simulate` returns: per-request records, the step log, engine settings, summary."""

    def __init__(
        self,
        requests: list[RequestRecord],
        step_columns: dict[str, list],
        settings: dict[str, Any],
        wall_s: float,
        token_times: dict[str, list[float]] | None = None,
        batch_log: list[Batch | DecodeRun] | None = None,
    ) -> None:
        self.requests = requests
        self._step_columns = step_columns
        self.settings = settings
        self.wall_s = wall_s
        self.token_times = token_times
        self._batch_log = batch_log
        self._batches: list[Batch] | None = None

    @property
    def batches(self) -> list[Batch] | None:
        """Each step's composition (prefill chunks, decode contexts), when recorded."""
        if self._batch_log is None:
            return None
        if self._batches is None:
            batches: list[Batch] = []
            for entry in self._batch_log:
                if isinstance(entry, DecodeRun):
                    batches.extend(entry.batches())
                else:
                    batches.append(entry)
            self._batches = batches
        return self._batches

    def batch_phases(self) -> dict[str, FlatSteps | DecodeRuns]:
        """The recorded compositions grouped by phase as flat arrays, for
        `StepPredictor.coverage_of_phases` (nothing when none were recorded)."""
        return _phase_arrays(self._batch_log or [])

    @property
    def steps(self) -> list[StepRecord]:
        cols = self._step_columns
        return [StepRecord(*row) for row in zip(*(cols[name] for name in _STEP_FIELDS))]

    @property
    def num_steps(self) -> int:
        return len(self._step_columns["step"])

    def step_column(self, name: str) -> np.ndarray:
        return np.asarray(self._step_columns[name])

    def summary(self) -> dict[str, Any]:
        """Latency percentiles, throughput and step statistics (JSON-ready: no NaN)."""
        reqs = self.requests
        finished = [r for r in reqs if not math.isnan(r.finish_s)]
        first_arrival = min((r.arrival_s for r in reqs), default=0.0)
        last_finish = max((r.finish_s for r in finished), default=first_arrival)
        makespan = last_finish - first_arrival
        out_tokens = sum(r.output_tokens for r in finished)
        in_tokens = sum(r.prompt_tokens for r in finished)
        kinds = self._step_columns["kind"]
        seqs = np.asarray(self._step_columns["num_prefill_seqs"]) + np.asarray(self._step_columns["num_decode_seqs"])
        return {
            "num_requests": len(reqs),
            "num_finished": len(finished),
            "makespan_s": makespan,
            "ttft_s": latency_stats([r.ttft_s for r in finished]),
            "tpot_s": latency_stats([r.tpot_s for r in finished]),
            "e2e_s": latency_stats([r.e2e_s for r in finished]),
            "throughput": {
                "requests_per_s": _rate(len(finished), makespan),
                "output_tokens_per_s": _rate(out_tokens, makespan),
                "total_tokens_per_s": _rate(out_tokens + in_tokens, makespan),
            },
            "steps": {
                "count": self.num_steps,
                "decode": kinds.count("decode"),
                "prefill": kinds.count("prefill"),
                "mixed": kinds.count("mixed"),
                "cuda_graph": int(sum(self._step_columns["cuda_graph"])),
                "mean_seqs": float(seqs.mean()) if len(seqs) else 0.0,
                "busy_s": float(sum(self._step_columns["duration_s"])),
            },
            "preemptions": int(sum(r.preemptions for r in reqs)),
            "wasted_tokens": int(sum(self._step_columns["wasted_tokens"])),
            "settings": self.settings,
            "simulation_wall_s": self.wall_s,
        }

    def requests_table(self):
        """The request records as a pyarrow table (token times as a list column when recorded)."""
        import pyarrow as pa

        columns = {name: [getattr(r, name) for r in self.requests] for name in RequestRecord.__dataclass_fields__}
        if self.token_times is not None:
            columns["token_times_s"] = [self.token_times.get(r.request_id, []) for r in self.requests]
        return pa.table(columns)

    def steps_table(self):
        import pyarrow as pa

        return pa.table({name: self._step_columns[name] for name in _STEP_FIELDS})


def latency_stats(values: Iterable[float]) -> dict[str, float | None]:
    """mean and percentiles of the finite values; None where there are none."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    stats: dict[str, float | None] = {"mean": float(array.mean())}
    for p, value in zip(PERCENTILES, np.percentile(array, PERCENTILES)):
        stats[f"p{p}"] = float(value)
    return stats


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def simulate(
    requests: list[Request],
    scheduler: Scheduler,
    step_model: StepLatencyModel,
    cpu_overhead: CpuOverheadModel | None = None,
    *,
    record_token_times: bool = False,
    record_batches: bool = False,
    max_steps: int | None = None,
    captured: set[GraphShape] | None = None,
) -> SimResult:
    """Serve `requests` on one replica and return what happened to each request and step.

    The scheduler keeps its state (KV blocks, queues): give each run a fresh one.
    `captured`: the CUDA-graph shapes the engine already holds (a server that has been running);
    the set grows with the shapes this run captures, so passing it on to the next run continues
    the same engine.
    `record_token_times` keeps every token's delivery time (for TBT distributions);
    `record_batches` keeps each step's (prefill, decode_ctx) composition (for replays)."""
    if scheduler.has_unfinished():
        raise ValueError("the scheduler still holds requests from another run: give simulate a fresh one")
    wall_start = time.perf_counter()
    overhead = cpu_overhead or CpuOverheadModel.zero()
    seqs = [Seq(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests]
    seqs.sort(key=lambda s: s.arrival_s)
    for seq in seqs:
        if seq.prompt < 1 or seq.target < 1:
            raise SimulationError(f"request {seq.rid} needs >= 1 prompt and >= 1 output token")
        if record_token_times:
            seq.token_times = []
    if max_steps is None:
        max_steps = MAX_STEPS_PER_TOKEN * sum(s.prompt + s.target for s in seqs) + MIN_STEP_LIMIT
    run = _Run(scheduler, step_model, overhead, record_batches, captured)
    # The loop allocates containers that live on (step log, token times, compositions) and frees
    # the rest by reference counting: it makes no reference cycles, and the collector's passes
    # over what lives on were a tenth of a simulation, for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        if scheduler.async_scheduling:
            run.loop_async(seqs, max_steps)
        else:
            run.loop_sync(seqs, max_steps)
    finally:
        if collecting:
            gc.enable()
    records = [_record(seq) for seq in seqs]
    token_times = {s.rid: s.token_times or [] for s in seqs} if record_token_times else None
    wall = time.perf_counter() - wall_start
    run.finish_log()
    logger.info("simulated %d requests in %d steps (%.2f s wall)", len(seqs), len(run.columns["step"]), wall)
    return SimResult(records, run.columns, scheduler.describe(), wall, token_times, run.batches)


class _Run:
    """The event loop's state: the clock, the arrival cursor, the step log."""

    def __init__(
        self,
        scheduler: Scheduler,
        step_model: StepLatencyModel,
        overhead: CpuOverheadModel,
        record_batches: bool,
        captured: set[GraphShape] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.step_model = step_model
        self.overhead = overhead
        self.captured: set[GraphShape] = captured if captured is not None else set()
        self.step_kwargs = step_keywords(step_model)
        self.columns: dict[str, list] = {name: [] for name in _STEP_FIELDS}
        # One bound `append` per column, in StepRecord's field order: `_log` runs once per step,
        # and looking each column up by name cost a tenth of a simulation.
        self._appends = tuple(self.columns[name].append for name in _STEP_FIELDS if name != "step")
        self.batches: list[Batch | DecodeRun] | None = [] if record_batches else None
        # (first row, steps) of each decode window, in order (see _WINDOW_DEFAULTS).
        self.window_rows: list[tuple[int, int]] = []
        self.unfinished = 0

    def loop_sync(self, seqs: list[Seq], max_steps: int) -> None:
        scheduler = self.scheduler
        now = seqs[0].arrival_s if seqs else 0.0
        cursor = 0
        self.unfinished = len(seqs)
        idle = 0
        while self.unfinished:
            cursor = self._admit(seqs, cursor, now)
            window = scheduler.decode_window()
            if window is not None:
                ran, now = self._run_window(window, seqs, cursor, now, max_steps)
                if ran:
                    continue
            batch = scheduler.schedule()
            if batch is None:
                now, idle = self._idle(seqs, cursor, now, idle)
                continue
            idle = 0
            gpu, cpu = self._cost(batch)
            cpu += self.overhead.sync_capture_seconds(batch.path, self.captured, batch.num_seqs)
            end = now + cpu + gpu
            wasted = self._deliver(batch, end)
            self._log(batch, now, cpu + gpu, gpu, cpu, wasted, max_steps)
            now = end

    def loop_async(self, seqs: list[Seq], max_steps: int) -> None:
        scheduler = self.scheduler
        overhead = self.overhead
        host = seqs[0].arrival_s if seqs else 0.0  # when the host starts preparing the next batch
        cursor = 0
        self.unfinished = len(seqs)
        in_flight: tuple[ScheduledBatch, float, int] | None = None
        device_free = -math.inf
        copy = overhead.input_copy_seconds(scheduler.async_input_bytes)
        copy_free = -math.inf  # when the copy stream finishes the last launch's inputs
        stall = 0.0  # device time the next step pays after a capture
        launched_steps = 0
        io_pairs = scheduler.async_io_pairs
        after_launch = scheduler.async_handoff_after_launch
        idle = 0
        while self.unfinished:
            cursor = self._admit(seqs, cursor, host)
            batch = scheduler.schedule()
            if batch is None:
                if in_flight is not None:
                    previous, previous_end, row = in_flight
                    self._finish_in_flight(previous, previous_end, row)
                    in_flight = None
                    host = max(host, previous_end)
                    continue
                host, idle = self._idle(seqs, cursor, host, idle)
                continue
            idle = 0
            gpu, cpu = self._cost(batch)
            # Asked before capture_seconds records the step's graph (a new shape is a new graph).
            new_shape = (overhead.new_shape_eager_s > 0 and batch.path.cuda_graph
                         and overhead.new_attention_shape(batch.path, self.captured))
            capture = overhead.capture_seconds(batch.path, self.captured, launched_steps % io_pairs, batch.num_seqs)
            launched_steps += 1
            ready = host + cpu
            # Issued at launch, behind the previous launch's copy (one copy stream); the device
            # work waits for it. Without a copy, copy_free <= ready: start as before, bit for bit.
            copy_free = max(ready, copy_free) + copy
            start = max(ready, device_free, copy_free)
            if capture or new_shape:
                # Captured: run eagerly, synchronise, record; the host is back after all of it.
                # The eager run of a shape the process never ran starts its kernels only after the
                # first-shape host work (`new_shape_eager_s` from the launch), behind which the
                # device's work in flight and the input copy hide, its own device time does not.
                eager_start = max(start, ready + overhead.new_shape_eager_s) if new_shape else start
                device_free = eager_start + gpu
                launched = device_free + capture
                capture = launched - start - gpu  # the step's time beyond its device work
                stall = overhead.post_capture_device_s
            else:
                gpu += stall
                stall = 0.0
                device_free = start + gpu
                launched = ready
            if in_flight is not None:
                previous, previous_end, row = in_flight
                handed_out = max(previous_end, launched) if after_launch else previous_end
                self._finish_in_flight(previous, handed_out, row)
                host = handed_out if after_launch else start
            else:
                host = launched if after_launch else start
            row = self._log(batch, start, gpu + capture, gpu, cpu + capture, 0, max_steps)
            in_flight = (batch, device_free, row)
        if in_flight is not None:
            previous, previous_end, row = in_flight
            self._finish_in_flight(previous, previous_end, row)

    def finish_log(self) -> None:
        """Complete the step log's columns: the step index (each row's own, `start_s` being the
        column every step appends to), and the decode windows' steps' values in the columns they
        left out while they ran (_WINDOW_DEFAULTS): each such column is the default at every row,
        the scheduled steps' values set at theirs (one list per column instead of an extension
        per window)."""
        cols = self.columns
        total = len(cols["start_s"])
        cols["step"] = list(range(total))
        if not self.window_rows:
            return
        scheduled: list[int] = []
        row = 0
        for first, steps in self.window_rows:
            scheduled.extend(range(row, first))
            row = first + steps
        scheduled.extend(range(row, total))
        for name, default in _WINDOW_DEFAULTS:
            full = [default] * total
            for row, value in zip(scheduled, cols[name], strict=True):
                full[row] = value
            cols[name] = full
        self.window_rows = []

    def _finish_in_flight(self, batch: ScheduledBatch, end: float, row: int) -> None:
        self.columns["wasted_tokens"][row] = self._deliver(batch, end)

    def _admit(self, seqs: list[Seq], cursor: int, now: float) -> int:
        add = self.scheduler.add
        while cursor < len(seqs) and seqs[cursor].arrival_s <= now:
            add(seqs[cursor])
            cursor += 1
        return cursor

    def _idle(self, seqs: list[Seq], cursor: int, now: float, idle: int) -> tuple[float, int]:
        """Nothing to run: retry (a scheduler may need a second call), else wait for the next
        arrival, else the run is stuck."""
        if self.scheduler.has_unfinished() and idle < IDLE_RETRIES:
            return now, idle + 1
        if cursor < len(seqs):
            return max(now, seqs[cursor].arrival_s), 0
        raise SimulationError(f"the simulation stalled with {self.unfinished} unfinished requests: {self.scheduler.stall_message()}")

    def _cost(self, batch: ScheduledBatch) -> tuple[float, float]:
        return self._step_cost(batch.prefill, batch.decode_ctx, batch.path, batch.num_seqs, batch.num_tokens, batch.kv_tokens)

    def _step_cost(
        self, prefill: list[tuple[int, int]], decode_ctx: list[int], path: StepPath, num_seqs: int, num_tokens: int,
        kv_tokens: int,
    ) -> tuple[float, float]:
        """(device, host) seconds of one step."""
        gpu = float(device_seconds(self.step_model, prefill, decode_ctx, path, self.step_kwargs))
        if not (gpu >= 0 and math.isfinite(gpu)):
            raise SimulationError(f"the step model returned {gpu!r} seconds for a batch of {num_tokens} tokens")
        cpu = self.overhead.seconds(path, num_seqs, num_tokens, kv_tokens)
        return gpu, cpu

    def _run_window(
        self, window: DecodeWindow, seqs: list[Seq], cursor: int, now: float, max_steps: int
    ) -> tuple[int, float]:
        """Run a `DecodeWindow`'s steps without scheduling each: the same costs, clock, step log
        and deliveries (the last step's finished requests released) as step by step, until the
        window ends, the step limit, or (when waiting requests could join) the next arrival.
        Returns (steps run, clock)."""
        cols = self.columns
        row = len(cols["start_s"])
        limit = min(window.steps, max_steps - row)
        next_arrival = seqs[cursor].arrival_s if window.admits_waiting and cursor < len(seqs) else math.inf
        batch = window.seqs
        n = len(batch)
        ctx = window.contexts
        path = window.path
        device = None if path is None else decode_steps(self.step_model, ctx, path, self.step_kwargs)
        if path is not None and device is not None:
            end = self._priced_window(path, device, ctx, limit, now, next_arrival)
            paths = None
        else:
            end, paths = self._window_step_by_step(path, ctx, limit, now, next_arrival)
        done = len(cols["start_s"]) - row
        if not done:
            return 0, now
        if self.batches is not None:
            self.batches.append(DecodeRun(ctx, done))
        self.window_rows.append((row, done))
        per_step = [n] * done
        cols["num_decode_seqs"] += per_step
        cols["sampled"] += per_step
        if paths is None:
            assert path is not None, "a window without a fixed path is priced step by step"
            cols["cuda_graph"] += [path.cuda_graph] * done
            cols["padded_tokens"] += [path.padded_tokens] * done
        else:
            cols["cuda_graph"].extend([step_path.cuda_graph for step_path in paths])
            cols["padded_tokens"].extend([step_path.padded_tokens for step_path in paths])
        scheduler = self.scheduler
        finishing = scheduler.advance_decodes(window, done)
        if batch[0].token_times is None:
            for seq in batch:
                seq.generated += done
        else:
            ends = cols["start_s"][row + 1:] + [end]
            for seq in batch:
                seq.generated += done
                seq.token_times.extend(ends)  # type: ignore[union-attr]
        for seq in finishing:
            seq.finished = True
            seq.finish_s = end
            self.unfinished -= 1
            scheduler.finish(seq)
        return done, end

    def _priced_window(
        self, path: StepPath, device: Callable[[int], float], ctx: list[int], limit: int, now: float,
        next_arrival: float,
    ) -> float:
        """A window's steps on one path, priced by the step model's `decode_steps` and the host
        overhead's `kv_terms` (each step differs from the last in its KV tokens only), the same
        as `_step_cost` gives step by step: logs each step's start, duration, device and host
        seconds and KV tokens; returns the clock after the last."""
        n = len(ctx)
        kv_tokens = sum(ctx) + n
        host, per_kv = self.overhead.kv_terms(path, n, n)
        cols = self.columns
        gpu_s = cols["gpu_s"]
        add_start, add_duration, add_gpu, add_cpu, add_kv = (
            cols["start_s"].append, cols["duration_s"].append, gpu_s.append, cols["cpu_s"].append,
            cols["kv_tokens"].append,
        )
        # The first step pays a capture where its graph is new; the others (the same path) none.
        capture = self.overhead.sync_capture_seconds(path, self.captured, n) if limit > 0 and now < next_arrival else 0.0
        done = 0
        while done < limit and now < next_arrival:
            gpu = device(done)
            cpu = host + per_kv * kv_tokens + capture
            capture = 0.0
            add_start(now)
            add_duration(cpu + gpu)
            add_gpu(gpu)
            add_cpu(cpu)
            add_kv(kv_tokens)
            now = now + cpu + gpu
            done += 1
            kv_tokens += n
        # Checked once the window is priced (a step model that returns nonsense stops the run
        # either way; each step's own check was a tenth of its cost).
        # (A NaN or an infinity makes the sum one; without them, the minimum shows a negative.)
        gpus = gpu_s[-done:] if done else []
        if gpus and not (math.isfinite(sum(gpus)) and min(gpus) >= 0):
            bad = next(gpu for gpu in gpus if not (gpu >= 0 and math.isfinite(gpu)))
            raise SimulationError(f"the step model returned {bad!r} seconds for a batch of {n} tokens")
        return now

    def _window_step_by_step(
        self, fixed_path: StepPath | None, ctx: list[int], limit: int, now: float, next_arrival: float,
    ) -> tuple[float, list[StepPath] | None]:
        """A window's steps priced one composition at a time (a path per step where the window
        has none, or a step model without `decode_steps`), logged as `_priced_window` logs them:
        (the clock after the last, each step's path or None for the fixed one)."""
        n = len(ctx)
        kv_tokens = sum(ctx) + n
        path_for = self.scheduler.path_for
        step_cost = self._step_cost
        capture_seconds, captured = self.overhead.sync_capture_seconds, self.captured
        cols = self.columns
        add_start, add_duration, add_gpu, add_cpu, add_kv = (
            cols[name].append for name in ("start_s", "duration_s", "gpu_s", "cpu_s", "kv_tokens")
        )
        paths: list[StepPath] = []
        done = 0
        while done < limit and now < next_arrival:
            if done:
                ctx = [c + 1 for c in ctx]
                kv_tokens += n
            path = fixed_path
            if path is None:
                path = path_for([], ctx)
                paths.append(path)
            gpu, cpu = step_cost([], ctx, path, n, n, kv_tokens)
            cpu += capture_seconds(path, captured, n)
            add_start(now)
            add_duration(cpu + gpu)
            add_gpu(gpu)
            add_cpu(cpu)
            add_kv(kv_tokens)
            now = now + cpu + gpu
            done += 1
        return now, None if fixed_path is not None else paths

    def _deliver(self, batch: ScheduledBatch, when: float) -> int:
        """Hand out the tokens a step sampled; returns how many were wasted. The batch's certain
        samplers (`ScheduledBatch.certain`) are handed theirs without a look at each (a step that
        admits a request hands out dozens of decodes' tokens besides)."""
        wasted = 0
        samplers = batch.samplers
        certain = batch.certain
        if certain:
            head = islice(samplers, certain)
            if samplers[0][0].token_times is None:
                for seq, _ in head:
                    seq.generated += 1
            else:
                for seq, _ in head:
                    seq.generated += 1
                    seq.token_times.append(when)  # type: ignore[union-attr]
            for seq in batch.finishing:
                seq.finished = True
                seq.finish_s = when
                self.unfinished -= 1
                self.scheduler.finish(seq)
            samplers = samplers[certain:]
        for seq, epoch in samplers:
            if seq.finished or seq.epoch != epoch:
                wasted += 1
                continue
            seq.generated += 1
            if seq.generated == 1:
                seq.first_token_s = when
            if seq.token_times is not None:
                seq.token_times.append(when)
            if seq.generated >= seq.target:
                seq.finished = True
                seq.finish_s = when
                self.unfinished -= 1
                self.scheduler.finish(seq)
        return wasted

    def _log(
        self,
        batch: ScheduledBatch,
        start: float,
        duration: float,
        gpu: float,
        cpu: float,
        wasted: int,
        max_steps: int,
    ) -> int:
        row = len(self.columns["start_s"])
        if row >= max_steps:
            raise SimulationError(f"the simulation exceeded {max_steps} steps without finishing: {self.scheduler.stall_message()}")
        path = batch.path
        (
            add_start, add_duration, add_gpu, add_cpu, add_prefill_tokens, add_prefill_seqs,
            add_decode_seqs, add_kv_tokens, add_kind, add_cuda_graph, add_padded, add_preempted,
            add_sampled, add_wasted,
        ) = self._appends
        num_decode = len(batch.decode_ctx)
        add_start(start)
        add_duration(duration)
        add_gpu(gpu)
        add_cpu(cpu)
        add_prefill_tokens(batch.num_tokens - num_decode)
        add_prefill_seqs(len(batch.prefill))
        add_decode_seqs(num_decode)
        add_kv_tokens(batch.kv_tokens)
        add_kind(path.kind.value)
        add_cuda_graph(path.cuda_graph)
        add_padded(path.padded_tokens)
        add_preempted(batch.preempted)
        add_sampled(len(batch.samplers))
        add_wasted(wasted)
        if self.batches is not None:
            self.batches.append((batch.prefill, batch.decode_ctx))
        return row


def _record(seq: Seq) -> RequestRecord:
    ttft = seq.first_token_s - seq.arrival_s
    e2e = seq.finish_s - seq.arrival_s
    tpot = (seq.finish_s - seq.first_token_s) / (seq.target - 1) if seq.target > 1 else math.nan
    return RequestRecord(
        request_id=seq.rid,
        arrival_s=seq.arrival_s,
        first_token_s=seq.first_token_s,
        finish_s=seq.finish_s,
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        prompt_tokens=seq.prompt,
        output_tokens=seq.target,
        preemptions=seq.preemptions,
    )

