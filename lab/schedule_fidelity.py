"""Does the simulator form the engine's schedule at heavy load? (CPU, a few minutes on fitted stores.)

docs/engine-grid-h200.md ("Where the misses come from") read the heavy cells' per-request TTFT
misses (MAPE > 5% with every measured step priced within ~3%) as the simulated schedule's: "the
batches it forms, where its graph captures fall". This script puts the engine's measured schedule
beside the simulated one, for every run of the H200 and H100 engine grids
(data/<platform>/experiments/engine_grid/r*; heavy runs by default), simulated as `dooly validate`
simulates the cell (the run's engine.json, the store's step model and calibration, the warm-up
requests first). Answer on the committed grids: the schedule is the engine's; the misses are step
prices, summed along the run's clock (docs/findings.md, "Simulating the engine's steps").

1. The schedules, step by step. The engine's steps.parquet records each step's prefill chunks
   (query tokens, cached tokens) and decode contexts but not whose they are; they are attributed
   here as the FIFO scheduler admits requests (`measured_schedule`): a chunk on an empty cache is
   the next waiting request in arrival order, a continued chunk the prefilling request whose cache
   holds that many tokens, a decode the decoding request whose context it is. The simulation's
   steps are recorded from its scheduler (decode windows off, so every step passes through
   `schedule`; the run's TTFTs are checked equal to the windowed run's). Per run: steps, steps of
   the same composition (the same chunks and decode contexts, whoever's), the first that differs;
   the same with the scheduler model driven on the engine's own clock (`on_engine_clock`: each
   step formed from the requests that had arrived when the engine started preparing it, so only
   the policy can differ); mean prefill tokens, decodes and sequences per step; per request,
   whether its first chunk's step and its prefill's step count are the engine's.
2. Each request's TTFT error, split into (a) its wait before its first chunk's step starts and
   (b) from that start to its first token (a step starts, in synchronous loops, when the host
   starts preparing it; in asynchronous ones when the device starts it), ms, mean over the requests.
3. The measured schedule at predicted prices: the engine's steps in its order (each run once its
   new requests have arrived), priced by the step model and host overhead on the simulator's own
   clock (`simulate` with `ReplayScheduler`), the requests' TTFTs read off that timeline. Its
   per-request TTFT MAPE beside the simulation's separates the schedule's error from the prices'.
   A request's replay TTFT error is the replay's clock error at its first token, split
   (`clock_error_split`) into the price errors of the steps before it by class (steps that
   captured a CUDA graph, prefill/mixed steps, decode steps) and the time between steps; with the
   capture steps' price error taken out, the MAPE that correctly priced captures would leave.
4. Graph captures: the engine's (steps.parquet `graph_captured`) against the replay's (the first
   step of each graph shape after the warm-up's, as the simulator charges them), the mean price
   error of a capture step, and beside all of it the engine's own floor: the cell's other rounds
   scored against this one (TTFT MAPE).

    python lab/schedule_fidelity.py --h200-store FITTED_H200 --h100-store FITTED_H100 \
        [--workload heavy light] [--rounds r1 ...] [--out FILE]

A fitted store: `cp -r data/h200/db S && dooly merge --store S && dooly fit --store S`. Run from the
repository root. Markdown on stdout (and in --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dooly.sim.schedulers import ScheduledBatch, Scheduler, Seq, make_scheduler
from dooly.sim.simulator import simulate
from dooly.sim.step_model import CpuOverheadModel, StepPath
from dooly.sim.validate import GroundTruth, async_timeline, compare_runs, load_ground_truth, warm_engine

log = logging.getLogger("schedule_fidelity")

ROOT = Path(__file__).resolve().parent.parent
GRIDS = {"h200": (ROOT / "data/h200/experiments/engine_grid", "NVIDIA-H200"),
         "h100": (ROOT / "data/h100/experiments/engine_grid", "NVIDIA-H100-80GB-HBM3")}
ENGINE = "transformers"
MS = 1e3
PCT = 100.0
# Step classes of the clock-error split (section 3).
CAPTURE, PREFILL, DECODE = "capture", "prefill/mixed", "decode"
CLASSES = (CAPTURE, PREFILL, DECODE)
BETWEEN = "between steps"

# One step's entries: (request id, query tokens, cached tokens before them).
Entries = list[tuple[str, int, int]]


@dataclass
class Schedule:
    """A run's steps with their requests, and per request its first and last prefill step."""

    steps: list[Entries]
    first: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, steps: list[Entries], prompts: dict[str, int]) -> Schedule:
        schedule = cls(steps)
        for index, entries in enumerate(steps):
            for rid, q, ctx in entries:
                schedule.first.setdefault(rid, index)
                if ctx < prompts[rid] <= ctx + q:
                    schedule.last.setdefault(rid, index)
        return schedule


def measured_schedule(truth: GroundTruth) -> Schedule:
    """The engine's steps with their requests (see the module docstring): FIFO admission in
    arrival order, continued chunks and decodes matched by the tokens the request has cached."""
    ordered = sorted(truth.requests, key=lambda r: r.arrived_at_s)
    prompts = {r.request_id: r.prompt_tokens for r in ordered}
    targets = {r.request_id: r.output_tokens for r in ordered}
    waiting = [r.request_id for r in ordered]
    admitted: list[str] = []  # admission order
    cached: dict[str, int] = {}
    decodes: Counter[str] = Counter()
    steps: list[Entries] = []
    for index, step in enumerate(truth.steps):
        entries: Entries = []
        for q, ctx in step.prefill:
            if ctx == 0:
                if not waiting:
                    raise SystemExit(f"step {index}: a chunk on an empty cache and no request left waiting")
                rid = waiting.pop(0)
                if q > prompts[rid]:
                    raise SystemExit(f"step {index}: chunk of {q} tokens is longer than {rid}'s prompt ({prompts[rid]})")
                admitted.append(rid)
            else:
                found = [r for r in admitted if cached[r] == ctx and ctx < prompts[r]]
                if len(found) != 1:
                    raise SystemExit(f"step {index}: continued chunk ({q}, {ctx}) matches {found}")
                rid = found[0]
            cached[rid] = ctx + q
            entries.append((rid, q, ctx))
        used: set[str] = set()
        for ctx in step.decode_ctx:
            # A request decodes output - 1 times, plus once more where the asynchronous loop
            # schedules it after its last token (a wasted slot): those go after the ones with
            # tokens still to come.
            found = [r for r in admitted
                     if r not in used and cached[r] == ctx and ctx >= prompts[r] and decodes[r] < targets[r]]
            found.sort(key=lambda r: decodes[r] + 1 >= targets[r])
            if not found:
                raise SystemExit(f"step {index}: decode at context {ctx} matches no decoding request")
            rid = found[0]
            used.add(rid)
            decodes[rid] += 1
            cached[rid] = ctx + 1
            entries.append((rid, 1, ctx))
        steps.append(entries)
    return Schedule.of(steps, prompts)


class ReplayScheduler(Scheduler):
    """The engine's measured steps, in order, as a scheduler: each step once all its requests have
    arrived, its path the real scheduler's for that composition; the simulator prices and clocks it."""

    def __init__(self, schedule: Schedule, reference: Scheduler) -> None:
        self.schedule_steps = schedule.steps
        self.reference = reference
        self.engine = reference.engine
        self.async_scheduling = reference.async_scheduling
        self.async_io_pairs = reference.async_io_pairs
        self.async_handoff_after_launch = reference.async_handoff_after_launch
        self.async_input_bytes = reference.async_input_bytes
        self.next = 0
        self.seqs: dict[str, Seq] = {}

    def add(self, seq: Seq) -> None:
        self.seqs[seq.rid] = seq

    def schedule(self) -> ScheduledBatch | None:
        if self.next >= len(self.schedule_steps):
            return None
        entries = self.schedule_steps[self.next]
        if any(rid not in self.seqs for rid, _, _ in entries):
            return None  # a request of this step has not arrived on the replay's clock
        self.next += 1
        batch: list[tuple[Seq, int]] = []
        for rid, q, ctx in entries:
            seq = self.seqs[rid]
            seq.computed = ctx
            seq.num_tokens = max(seq.num_tokens, ctx + q)
            batch.append((seq, q))
        return self._build(batch)

    def finish(self, seq: Seq) -> None:
        """Nothing to release: the recorded steps say who runs."""

    def has_unfinished(self) -> bool:
        return bool(self.seqs) and self.next < len(self.schedule_steps)

    def describe(self) -> dict[str, Any]:
        return {"replay_of": self.reference.describe()}

    def path_for(self, prefill: list[tuple[int, int]], decode_ctx: list[int]) -> StepPath:
        return self.reference.path_for(prefill, decode_ctx)

    def stall_message(self) -> str:
        return f"the replay stopped at step {self.next} of {len(self.schedule_steps)}"


@dataclass
class Cell:
    """One grid run and what the simulator is given for it."""

    platform: str
    directory: Path
    truth: GroundTruth
    scheduler: Scheduler
    step_model: Any
    overhead: CpuOverheadModel

    @property
    def round(self) -> str:
        return self.directory.parent.name

    @property
    def name(self) -> str:
        return self.directory.name


def load_cell(run: Path, platform_key: str, platform: str, store: str, models: dict[tuple[str, str], Any]) -> Cell:
    from dooly.sim.calibration_commands import resolve_overhead
    from dooly.sim.options import StepChoice, with_model_groups

    bench = json.loads((run / "bench.json").read_text())
    settings = json.loads((run / "engine.json").read_text())
    model, backend = str(bench["model"]), str(bench["backend"])
    choice = StepChoice(store=store, platform=platform, backend=backend)
    scheduler = make_scheduler(ENGINE, with_model_groups(model, ENGINE, settings, store))
    key = (model, backend)
    if key not in models:
        models[key] = choice.step_model(model, ENGINE)
    overhead = resolve_overhead(None, False, choice, ENGINE, scheduler, model)
    return Cell(platform_key, run, load_ground_truth(run), scheduler, models[key], overhead)


def simulated_schedule(cell: Cell) -> tuple[Schedule, Any]:
    """The simulation of the run as `dooly validate` runs it, its steps recorded (decode windows
    off); the recorded run's TTFTs are checked against the windowed run's."""
    workload = cell.truth.workload()
    captured = warm_engine(cell.truth, cell.scheduler, cell.step_model, cell.overhead)
    reference = simulate(workload, cell.scheduler.fresh(), cell.step_model, cell.overhead, captured=set(captured))
    scheduler = cell.scheduler.fresh()
    scheduler.decode_window = lambda: None  # type: ignore[method-assign]
    steps: list[Entries] = []
    schedule = scheduler.schedule

    def recorded() -> ScheduledBatch | None:
        batch = schedule()
        if batch is not None:
            steps.append([(seq.rid, q, ctx) for seq, q, ctx in batch.entries])
        return batch

    scheduler.schedule = recorded  # type: ignore[method-assign]
    result = simulate(workload, scheduler, cell.step_model, cell.overhead, captured=set(captured))
    windowed = {r.request_id: r.ttft_s for r in reference.requests}
    worst = max(abs(r.ttft_s - windowed[r.request_id]) for r in result.requests)
    if worst > 1e-9:
        log.warning("%s %s: the recorded run's TTFTs differ from the windowed run's by up to %.3g s", cell.round,
                    cell.name, worst)
    prompts = {r.request_id: r.prompt_tokens for r in cell.truth.requests}
    return Schedule.of(steps, prompts), result


def replay(cell: Cell, schedule: Schedule) -> Any:
    """The measured schedule on the simulator's clock (section 3)."""
    captured = warm_engine(cell.truth, cell.scheduler, cell.step_model, cell.overhead)
    return simulate(cell.truth.workload(), ReplayScheduler(schedule, cell.scheduler), cell.step_model, cell.overhead,
                    captured=set(captured))


def on_engine_clock(truth: GroundTruth, model: Scheduler) -> tuple[int, int | None]:
    """The scheduler model driven on the engine's own clock: before each measured step, the
    requests that had arrived when the engine started preparing it are added, the model forms the
    step, and the step's tokens are handed out as the engine hands them out (synchronous loops at
    once, asynchronous ones after the next step is formed). Returns how many of the model's steps
    have the engine's composition, and the first that does not (None: all). Timing cannot make
    these differ, only the scheduling policy. `model`: the run's scheduler (a fresh one is driven)."""
    origin = min(r.arrived_at_s for r in truth.requests)
    prompts = {r.request_id: r.prompt_tokens for r in truth.requests}
    seqs = sorted((Seq(r.request_id, r.arrived_at_s - origin, r.prompt_tokens, r.output_tokens) for r in truth.requests),
                  key=lambda seq: seq.arrival_s)
    scheduler = model.fresh()
    cursor, same, first_diff = 0, 0, None
    pending: ScheduledBatch | None = None  # the asynchronous loop's step whose tokens are not out yet

    def hand_out(batch: ScheduledBatch) -> None:
        for seq, epoch in batch.samplers:
            if seq.finished or seq.epoch != epoch:
                continue
            seq.generated += 1
            if seq.generated >= seq.target:
                seq.finished = True
                scheduler.finish(seq)

    for index, step in enumerate(truth.steps):
        while cursor < len(seqs) and seqs[cursor].arrival_s <= step.start_s - origin:
            scheduler.add(seqs[cursor])
            cursor += 1
        batch = scheduler.schedule()
        formed = [] if batch is None else [(seq.rid, q, ctx) for seq, q, ctx in batch.entries]
        engine = (tuple(sorted(step.prefill)), tuple(sorted(step.decode_ctx)))
        if composition(formed, prompts) == engine:
            same += 1
        elif first_diff is None:
            first_diff = index
        if scheduler.async_scheduling:
            if pending is not None:
                hand_out(pending)
            pending = batch
        elif batch is not None:
            hand_out(batch)
    return same, first_diff


def composition(entries: Entries, prompts: dict[str, int]) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """A step as the engine records it: its prompt chunks and its decode contexts, sorted. (The
    scheduler model hands a prompt's last token, when a chunk boundary leaves one alone, to the step
    model as a decode; the engine records it as a one-token chunk: classified here by the prompt.)"""
    chunks = sorted((q, ctx) for rid, q, ctx in entries if ctx < prompts[rid])
    contexts = sorted(ctx for rid, q, ctx in entries if ctx >= prompts[rid])
    return tuple(chunks), tuple(contexts)


def step_stats(steps: list[Entries], prompts: dict[str, int]) -> tuple[float, float, float]:
    """Mean prefill tokens, decodes and sequences per step."""
    prefill = [sum(q for rid, q, ctx in s if ctx < prompts[rid]) for s in steps]
    decodes = [sum(1 for rid, _, ctx in s if ctx >= prompts[rid]) for s in steps]
    return float(np.mean(prefill)), float(np.mean(decodes)), float(np.mean([len(s) for s in steps]))


def step_starts(cell: Cell, measured: bool, result: Any = None) -> list[float]:
    """When each step starts on the workload clock: the synchronous loop's step start (host), the
    asynchronous loop's device start."""
    origin = min(r.arrived_at_s for r in cell.truth.requests)
    if not measured:
        return [float(t) for t in result.step_column("start_s")]
    steps = cell.truth.steps
    if not cell.scheduler.async_scheduling:
        return [s.start_s - origin for s in steps]
    timings = async_timeline(steps)
    starts, previous_end = [], -math.inf
    for step, timing in zip(steps, timings, strict=True):
        starts.append(max(previous_end, step.start_s + step.prepare_s) - origin)
        previous_end = timing.device_end_s
    return starts


def capture_steps(cell: Cell) -> list[bool]:
    """Per measured step, whether the replay charges it a graph capture (`sync_capture_seconds` /
    `capture_seconds` of its IO pair, after the warm-up's graphs)."""
    captured = set(warm_engine(cell.truth, cell.scheduler, cell.step_model, cell.overhead))
    pairs = cell.scheduler.async_io_pairs if cell.scheduler.async_scheduling else 1
    out = []
    for index, step in enumerate(cell.truth.steps):
        path = cell.scheduler.path_for(step.prefill, step.decode_ctx)
        shape = CpuOverheadModel.graph_shape(path, index % pairs)
        out.append(shape is not None and shape not in captured)
        if shape is not None:
            captured.add(shape)
    return out


def analyse(cell: Cell) -> dict[str, Any]:
    truth = cell.truth
    prompts = {r.request_id: r.prompt_tokens for r in truth.requests}
    measured = measured_schedule(truth)
    simulated, result = simulated_schedule(cell)
    replayed = replay(cell, measured)
    clock_same, clock_diff = on_engine_clock(truth, cell.scheduler)
    same = [composition(a, prompts) == composition(b, prompts) for a, b in zip(measured.steps, simulated.steps)]
    first_diff = next((i for i, s in enumerate(same) if not s), None)
    if first_diff is None and len(measured.steps) != len(simulated.steps):
        first_diff = min(len(measured.steps), len(simulated.steps))
    origin = min(r.arrived_at_s for r in truth.requests)
    meas_start = step_starts(cell, True)
    sim_start = step_starts(cell, False, result)
    sim_by = {r.request_id: r for r in result.requests}
    rep_by = {r.request_id: r for r in replayed.requests}
    rows = []
    for r in truth.requests:
        rid = r.request_id
        arrival = r.arrived_at_s - origin
        m_first, s_first = measured.first[rid], simulated.first[rid]
        rows.append({
            "ttft_m": r.ttft_s, "ttft_s": sim_by[rid].ttft_s, "ttft_r": rep_by[rid].ttft_s,
            "wait_m": meas_start[m_first] - arrival, "wait_s": sim_start[s_first] - arrival,
            "same_first": m_first == s_first,
            "same_steps": measured.last[rid] - m_first == simulated.last[rid] - s_first,
        })
    ttft_m = np.array([row["ttft_m"] for row in rows])
    ttft_s = np.array([row["ttft_s"] for row in rows])
    ttft_r = np.array([row["ttft_r"] for row in rows])
    wait_m = np.array([row["wait_m"] for row in rows])
    wait_s = np.array([row["wait_s"] for row in rows])
    out: dict[str, Any] = {
        "platform": cell.platform, "round": cell.round, "cell": cell.name, "async": cell.scheduler.async_scheduling,
        "steps": (len(measured.steps), len(simulated.steps)), "same_steps": int(sum(same)), "first_diff": first_diff,
        "clock_same": clock_same, "clock_diff": clock_diff,
        "stats_m": step_stats(measured.steps, prompts), "stats_s": step_stats(simulated.steps, prompts),
        "same_first": sum(row["same_first"] for row in rows), "same_prefill_steps": sum(row["same_steps"] for row in rows),
        "requests": len(rows),
        "first_shift": Counter(simulated.first[r.request_id] - measured.first[r.request_id] for r in truth.requests),
        "ttft_mean_m": float(ttft_m.mean()),
        "sim_mape": float(np.mean(np.abs(ttft_s - ttft_m) / ttft_m) * PCT),
        "sim_bias": float((ttft_s.mean() / ttft_m.mean() - 1) * PCT),
        "wait_err_ms": float(np.mean(wait_s - wait_m) * MS),
        "chunk_err_ms": float(np.mean((ttft_s - wait_s) - (ttft_m - wait_m)) * MS),
        "replay_mape": float(np.mean(np.abs(ttft_r - ttft_m) / ttft_m) * PCT),
        "replay_bias": float((ttft_r.mean() / ttft_m.mean() - 1) * PCT),
        "sim_vs_replay_mape": float(np.mean(np.abs(ttft_s - ttft_r) / ttft_m) * PCT),
    }
    engine_captures = [s.graph_captured for s in truth.steps]
    replay_captures = capture_steps(cell)
    out["captures"] = (sum(engine_captures), sum(replay_captures),
                       sum(a and b for a, b in zip(engine_captures, replay_captures)))
    out["drift"] = clock_error_split(cell, measured, replayed, engine_captures, replay_captures)
    out["repeats"] = {other.parent.name: compare_runs(truth, load_ground_truth(other)).ttft.as_dict()["mape"]
                      for other in sorted(cell.directory.parent.parent.glob(f"r*/{cell.name}"))
                      if other != cell.directory and (other / "requests.parquet").is_file()}
    return out


def step_class(entries: Entries, prompts: dict[str, int], capture: bool) -> str:
    if capture:
        return CAPTURE
    return PREFILL if any(ctx < prompts[rid] for rid, _, ctx in entries) else DECODE


def step_ends(cell: Cell, measured: bool, result: Any = None) -> list[float]:
    """When each step ends on the workload clock: synchronous loops, the step's start plus its
    duration; asynchronous, when its device work (a captured step: its launch) is done."""
    if not measured:
        return [float(s + d) for s, d in zip(result.step_column("start_s"), result.step_column("duration_s"))]
    origin = min(r.arrived_at_s for r in cell.truth.requests)
    steps = cell.truth.steps
    if not cell.scheduler.async_scheduling:
        return [s.start_s + s.duration_s - origin for s in steps]
    return [timing.device_end_s - origin for timing in async_timeline(steps)]


def clock_error_split(cell: Cell, measured: Schedule, replayed: Any, engine_captures: list[bool],
                      replay_captures: list[bool]) -> dict[str, float]:
    """The replay's clock error at each request's first token (its TTFT error), split into the
    steps' prices (end minus start, replay minus engine, of every step up to the request's last
    prefill step), by step class, and the rest (`between`: the time between one step's end and the
    next one's start, replay minus engine: waits for arrivals; under async batching the host's
    cycle beyond the device's work, the input copy, and the hand-out of the first token after the
    next launch); mean over the requests, ms. Also: the replay's TTFT MAPE with its capture steps'
    price error taken out (captures at the engine's prices), the mean price error of a capture step
    (ms), and when the engine's last capture step ended (s after the first arrival)."""
    prompts = {r.request_id: r.prompt_tokens for r in cell.truth.requests}
    if replayed.num_steps != len(cell.truth.steps):
        raise SystemExit(f"{cell.name}: the replay ran {replayed.num_steps} steps of {len(cell.truth.steps)}")
    classes = np.array([step_class(entries, prompts, a or b)
                        for entries, a, b in zip(measured.steps, engine_captures, replay_captures, strict=True)])
    price = ((np.array(step_ends(cell, False, replayed)) - np.array(step_starts(cell, False, replayed)))
             - (np.array(step_ends(cell, True)) - np.array(step_starts(cell, True))))
    cumulative = {c: np.cumsum(np.where(classes == c, price, 0.0)) for c in CLASSES}
    replay_by = {r.request_id: r for r in replayed.requests}
    split: dict[str, list[float]] = {c: [] for c in (*CLASSES, BETWEEN)}
    without_captures = []  # APE of the replay's TTFT less its capture steps' price error
    for r in cell.truth.requests:
        last = measured.last[r.request_id]
        parts = {c: float(cumulative[c][last]) for c in CLASSES}
        for c in CLASSES:
            split[c].append(parts[c])
        error = replay_by[r.request_id].ttft_s - r.ttft_s
        split[BETWEEN].append(error - sum(parts.values()))
        without_captures.append(abs(error - parts[CAPTURE]) / r.ttft_s * PCT)
    out = {c: float(np.mean(v)) * MS for c, v in split.items()}
    captures = classes == CAPTURE
    out["mape_without_captures"] = float(np.mean(without_captures))
    out["per_capture_ms"] = float(price[captures].mean()) * MS if captures.any() else math.nan
    out["last_capture_s"] = float(np.array(step_ends(cell, True))[captures].max()) if captures.any() else math.nan
    return out


def _num(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def tables(results: list[dict[str, Any]]) -> list[str]:
    lines = ["## 1. Schedules: the engine's against the simulation's", "",
             "| grid | round | run | steps meas/sim | same steps | first differing step | on the engine's clock: same steps | "
             "first differing | prefill tok/step meas/sim | "
             "decodes/step meas/sim | seqs/step meas/sim | same first step | same prefill steps | first step sim - meas |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        (pm, dm, sm), (ps, ds, ss) = r["stats_m"], r["stats_s"]
        shifts = ", ".join(f"{k:+d}: {v}" for k, v in sorted(r["first_shift"].items()))
        lines.append(f"| {r['platform']} | {r['round']} | {r['cell']} | {r['steps'][0]} / {r['steps'][1]} | "
                     f"{r['same_steps']} | {'-' if r['first_diff'] is None else r['first_diff']} | {r['clock_same']} | "
                     f"{'-' if r['clock_diff'] is None else r['clock_diff']} | {pm:.0f} / {ps:.0f} | "
                     f"{dm:.1f} / {ds:.1f} | {sm:.1f} / {ss:.1f} | {r['same_first']}/{r['requests']} | "
                     f"{r['same_prefill_steps']}/{r['requests']} | {shifts} |")
    lines += ["", "## 2-3. Per-request TTFT: the simulation's error split, and the measured schedule at predicted prices", "",
              "| grid | round | run | TTFT mean meas (ms) | sim TTFT MAPE | sim mean err | (a) wait err (ms) | "
              "(b) first chunk to token err (ms) | replay TTFT MAPE | replay mean err | sim vs replay (% of meas) | "
              "replay TTFT err split, ms: capture / prefill+mixed / decode / between steps | captures engine / replay / both | "
              "capture price err each (ms) | last capture ends (s) | replay TTFT MAPE, captures at engine prices | "
              "engine's other rounds against this one: TTFT MAPE |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        drift = r["drift"]
        split = " / ".join(f"{drift[c]:+.0f}" for c in (*CLASSES, BETWEEN))
        lines.append(f"| {r['platform']} | {r['round']} | {r['cell']} | {r['ttft_mean_m'] * MS:.0f} | {r['sim_mape']:.1f}% | "
                     f"{r['sim_bias']:+.1f}% | {r['wait_err_ms']:+.0f} | {r['chunk_err_ms']:+.0f} | {r['replay_mape']:.1f}% | "
                     f"{r['replay_bias']:+.1f}% | {r['sim_vs_replay_mape']:.2f}% | {split} | "
                     f"{r['captures'][0]} / {r['captures'][1]} / {r['captures'][2]} | {_num(drift['per_capture_ms'], '+.1f')} | "
                     f"{_num(drift['last_capture_s'], '.2f')} | {drift['mape_without_captures']:.1f}% | "
                     f"{', '.join(f'{k}: {v:.1f}%' for k, v in r['repeats'].items()) or '-'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--h200-store", help="The H200 store, merged and fitted (its calibrations are used).")
    parser.add_argument("--h100-store", help="The H100 store, merged and fitted.")
    parser.add_argument("--workload", nargs="+", default=["heavy"], help="Which runs: heavy (default), light, or both.")
    parser.add_argument("--rounds", nargs="*", help="Only these rounds (r1, r2, ...); default: all.")
    parser.add_argument("--out", type=Path, help="Also write the tables here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    logging.getLogger("dooly").setLevel(logging.WARNING)  # the simulator logs every simulated run
    stores = {"h200": args.h200_store, "h100": args.h100_store}
    if not any(stores.values()):
        raise SystemExit("give --h200-store and/or --h100-store")
    results = []
    for key, store in stores.items():
        if not store:
            continue
        grid, platform = GRIDS[key]
        models: dict[tuple[str, str], Any] = {}
        for run in sorted(run for workload in args.workload for run in grid.glob(f"r*/*.{workload}")):
            if args.rounds and run.parent.name not in args.rounds:
                continue
            if not (run / "steps.parquet").is_file():
                continue
            log.info("%s %s %s", key, run.parent.name, run.name)
            results.append(analyse(load_cell(run, key, platform, store, models)))
    command = " ".join(["python lab/schedule_fidelity.py", *(f"--{k}-store STORE" for k, v in stores.items() if v),
                        "--workload", *args.workload, *(["--rounds", *args.rounds] if args.rounds else [])])
    header = ["# The engine's schedule against the simulator's", "",
              f"Generated by `{command}` (fitted copies of data/h200/db and data/h100/db); what each column "
              "means: the script's docstring. Times in ms unless marked.", ""]
    text = "\n".join(header + tables(results)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
