"""Where async batching's light-load TTFT goes, measured against the simulator (issue #24; CPU, minutes).

With `use_async_batching=true` the engine's loop is prepare(N+1) -> launch(N+1) -> update(N): a
request's first token is handed out after the step after its prefill is launched. A launch that
captures a CUDA graph runs the step eagerly, synchronises and records the graph, so it holds the
host, and the previous step's tokens, for all of it (docs/calibration.md, "Async batching").

Per async run (the committed engine-grid and engine-paths runs of both platforms, calib runs
included) this prints:

1. Captures by attention shape. A capture is "new" when the engine never ran its attention shape
   (engine path, padded query tokens, padded KV tokens: `CpuOverheadModel.attention_shape`) before
   (its warm-up simulated first), "known" when an earlier step ran that shape (the other IO pair's
   graph, or a graph of another longest-sequence key). Known: the capture cost beyond the device
   (launch held once the device was free, less the input-copy wait and the predicted device time;
   median). New: the launch's host time from its start less that capture cost, where the device
   was idle enough not to hide it (H, `fit_new_shape_eager` on the run alone).
2. Per async cell, every request's TTFT measured and simulated (the store's calibration), split at
   two instants: the device start of its prefill step (arrival -> there: "queue", the host's
   preparation and the input copy included) and that step's end (a captured step's launch
   return); "step" between them, "hand-off" after (until the first token: the next launch, a
   capture where that one captures). Means over requests, then over the requests whose prefill
   step was captured, and whose next step was.
3. Per async cell: mean / p90 TTFT, mean TPOT error and TTFT MAPE, the engine's floor (all rounds
   of the cell) in brackets.

    python lab/async_ttft.py --h200-store FITTED_H200 --h100-store FITTED_H100 [--json OUT]

FITTED_*: fitted copies of data/h200/db and data/h100/db (`dooly merge` + `dooly fit`) holding the
async calibration to judge (the newest generation is used).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dooly.fit.source import FittedSource, open_fitted_step
from dooly.sim.calibration import find_calibration, fit_new_shape_eager
from dooly.sim.calibration_commands import model_layers
from dooly.sim.options import with_model_groups
from dooly.sim.schedulers import Scheduler, make_scheduler
from dooly.sim.simulator import SimResult
from dooly.sim.step_model import CpuOverheadModel, StepLatencyModel
from dooly.sim.validate import (
    GroundTruth,
    MeasuredStep,
    async_host_samples,
    async_timeline,
    device_seconds,
    input_copy_waits,
    load_ground_truth,
    step_keywords,
    validate,
)
from dooly.store.backends import open_store

log = logging.getLogger("async_ttft")

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "paged|sdpa"
ENGINE = "transformers"
MS = 1e3
PERCENT = 100.0
ASYNC_GLOB = "*.paged-sdpa.async.*"
CALIB_LOAD = "calib"


@dataclass(frozen=True)
class Platform:
    name: str  # the store's platform string
    label: str
    experiments: Path
    rounds: tuple[str, ...]  # globs of round directories under experiments


PLATFORMS = (
    Platform("NVIDIA-H200", "H200", ROOT / "data/h200/experiments", ("engine_grid/r*",)),
    Platform("NVIDIA-H100-80GB-HBM3", "H100", ROOT / "data/h100/experiments", ("engine_grid/r*", "engine_paths/r*")),
)


@dataclass
class Served:
    """One platform's fitted store, its async calibration and the models' step models."""

    store: str
    platform: Platform
    models: dict[str, tuple[StepLatencyModel, int]]

    def model(self, name: str) -> tuple[StepLatencyModel, int]:
        if name not in self.models:
            fitted = open_fitted_step(FittedSource(store=self.store, platform=self.platform.name, backend=BACKEND), name)
            self.models[name] = (fitted.step, model_layers(name, fitted.inventory))
        return self.models[name]

    def overhead(self, name: str) -> CpuOverheadModel:
        calibration = find_calibration(open_store(self.store, create=False), platform=self.platform.name, engine=ENGINE,
                                       backend=BACKEND, cuda_graphs=True, async_batching=True)
        if calibration is None:
            raise SystemExit(f"{self.store} holds no async-batching calibration for {self.platform.name} / {BACKEND}")
        return calibration.for_model(self.model(name)[1], name)


def run_dirs(platform: Platform) -> list[Path]:
    return sorted(d for pattern in platform.rounds for d in platform.experiments.glob(f"{pattern}/{ASYNC_GLOB}"))


def cell_name(run: Path) -> str:
    """MODEL.LOAD of a run directory (MODEL.paged-sdpa.async.LOAD)."""
    parts = run.name.split(".")
    return f"{'.'.join(parts[:-3])}.{parts[-1]}"


def scheduler_of(run: Path, model: str) -> Scheduler:
    settings = json.loads((run / "engine.json").read_text())
    return make_scheduler(ENGINE, with_model_groups(model, ENGINE, settings))


def capture_row(served: Served, run: Path) -> dict[str, Any]:
    """Part 1: the run's captures by attention shape (see the module docstring)."""
    truth = load_ground_truth(run)
    model = json.loads((run / "bench.json").read_text())["model"]
    step_model, layers = served.model(model)
    overhead = served.overhead(model)
    scheduler = scheduler_of(run, model)
    measured = async_host_samples(truth, scheduler, step_model, num_layers=layers, model=model,
                                  input_copy_s=overhead.input_copy_s, split_new_shapes=True)
    known = [s.host_s - overhead.seconds(path, s.num_seqs, s.num_tokens, s.kv_tokens) for s, path in measured.captures]
    capture = float(np.median(known)) if known else 0.0
    hidden = sum(1 for launch, device in measured.new_shapes if launch - capture <= device)
    return {"run": f"{run.parent.parent.name}/{run.parent.name}/{cell_name(run)}", "layers": layers,
            "captures": sum(1 for s in truth.steps if s.graph_captured), "new": len(measured.new_shapes),
            "new_hidden": hidden, "known_ms": capture * MS,
            "new_eager_ms": fit_new_shape_eager([(launch - capture, device) for launch, device in measured.new_shapes]) * MS,
            "calibration_capture_ms": overhead.graph_capture_s * MS, "calibration_new_eager_ms": overhead.new_shape_eager_s * MS}


def prefill_steps(prompts: list[int], batches: list[tuple[list[tuple[int, int]], list[int]]]) -> list[int]:
    """Per request (in arrival order, first-come first-served), the step that ran the last chunk
    of its prompt: the first one not yet claimed whose prefill ends at the prompt's length."""
    claimed: set[tuple[int, int]] = set()
    out = []
    for prompt in prompts:
        for k, (prefill, _) in enumerate(batches):
            slots = [i for i, (q, past) in enumerate(prefill) if q + past == prompt and (k, i) not in claimed]
            if slots:
                claimed.add((k, slots[0]))
                out.append(k)
                break
        else:
            out.append(-1)
    return out


def measured_split(truth: GroundTruth, steps: list[MeasuredStep], waits: list[float]) -> list[tuple[float, ...]]:
    """Per request (arrival order): (TTFT, queue, step, hand-off, prefill step captured, next captured), seconds."""
    timings = async_timeline(steps)
    requests = sorted(truth.requests, key=lambda r: r.arrived_at_s)
    rows: list[tuple[float, ...]] = []
    for request, k in zip(requests, prefill_steps([r.prompt_tokens for r in requests],
                                                  [(s.prefill, s.decode_ctx) for s in steps]), strict=True):
        if k < 0:
            continue
        step = steps[k]
        free = max(timings[k - 1].device_end_s if k else -math.inf, step.start_s + step.prepare_s) + waits[k]
        end = timings[k].device_end_s
        following = k + 1 < len(steps) and steps[k + 1].graph_captured
        rows.append((request.ttft_s, free - request.arrived_at_s, end - free, request.first_token_s - end,
                     float(step.graph_captured), float(following)))
    return rows


def simulated_split(result: SimResult) -> list[tuple[float, ...]]:
    """Per simulated request, the same split as `measured_split` (a captured step: cpu_s above the
    step's host charge; the simulator logs no capture flag, so a step whose duration exceeds its
    device time is taken as one)."""
    steps = result.steps
    batches = result.batches or []
    requests = sorted(result.requests, key=lambda r: r.arrival_s)
    rows: list[tuple[float, ...]] = []
    for request, k in zip(requests, prefill_steps([r.prompt_tokens for r in requests], batches), strict=True):
        if k < 0:
            continue
        step = steps[k]
        end = step.start_s + step.duration_s
        captured = step.duration_s > step.gpu_s
        following = k + 1 < len(steps) and steps[k + 1].duration_s > steps[k + 1].gpu_s
        rows.append((request.ttft_s, step.start_s - request.arrival_s, step.duration_s, request.first_token_s - end,
                     float(captured), float(following)))
    return rows


def split_means(rows: list[tuple[float, ...]]) -> dict[str, Any]:
    array = np.asarray(rows)
    out: dict[str, Any] = {"n": len(rows)}
    for name, column in (("ttft", 0), ("queue", 1), ("step", 2), ("handoff", 3)):
        out[name] = float(array[:, column].mean()) * MS
    captured = array[array[:, 4] > 0]
    following = array[array[:, 5] > 0]
    out["captured_n"], out["captured_step"] = len(captured), float(captured[:, 2].mean()) * MS if len(captured) else math.nan
    out["next_captured_n"] = len(following)
    out["next_captured_handoff"] = float(following[:, 3].mean()) * MS if len(following) else math.nan
    return out


def cell_rows(served: Served) -> list[dict[str, Any]]:
    """Parts 2 and 3 for every async cell of the platform (calib runs are not cells)."""
    cells: dict[str, list[Path]] = {}
    for run in run_dirs(served.platform):
        if not run.name.endswith(f".{CALIB_LOAD}"):
            cells.setdefault(cell_name(run), []).append(run)
    rows = []
    for name, runs in sorted(cells.items()):
        model = json.loads((runs[0] / "bench.json").read_text())["model"]
        step_model, _ = served.model(model)
        overhead = served.overhead(model)
        truths = [load_ground_truth(run) for run in runs]
        report = validate(truths[0], scheduler_of(runs[0], model), step_model, overhead, repeats=truths[1:])
        summary = {row.statistic: row for row in report.summary_rows()}
        steps = truths[0].steps
        keywords = step_keywords(step_model)
        scheduler = scheduler_of(runs[0], model)
        paths = [scheduler.path_for(s.prefill, s.decode_ctx) for s in steps]
        device = [float(device_seconds(step_model, s.prefill, s.decode_ctx, p, keywords)) for s, p in zip(steps, paths, strict=True)]
        waits = input_copy_waits(steps, async_timeline(steps), device, overhead.input_copy_s)
        stats = {stat: (summary[stat].error_pct, summary[stat].floor_pct) for stat in ("ttft_mean", "ttft_p90", "tpot_mean")}
        rows.append({"platform": served.platform.label, "cell": name, "runs": [str(r.relative_to(ROOT)) for r in runs],
                     **{stat: value for stat, value in stats.items()},
                     "ttft_mape": float(report.requests.ttft.ape.mean()),
                     "measured": split_means(measured_split(truths[0], steps, waits)),
                     "simulated": split_means(simulated_split(report.result))})
    return rows


def pct(value: float | None, floor: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}%" + (f" ({floor:.1f})" if floor is not None else "")


def print_tables(captures: list[dict[str, Any]], cells: list[dict[str, Any]]) -> None:
    print("## Captures by attention shape (ms; known: capture cost beyond the device, median; "
          "new: eager run's host time from the launch, H, fitted on the run alone)\n")
    print("| run | layers | captures | new (device hid it) | known: capture | new: H | calibration: capture, H |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in captures:
        print(f"| {r['run']} | {r['layers']} | {r['captures']} | {r['new']} ({r['new_hidden']}) | {r['known_ms']:.1f} | "
              f"{r['new_eager_ms']:.1f} | {r['calibration_capture_ms']:.1f}, {r['calibration_new_eager_ms']:.1f} |")
    print("\n## TTFT split, measured / simulated (ms, means over requests)\n")
    print("| cell | TTFT | queue | prefill step | hand-off | captured prefill steps: n, step | next step captured: n, hand-off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        m, s = c["measured"], c["simulated"]
        print(f"| {c['platform']} {c['cell']} | {m['ttft']:.1f} / {s['ttft']:.1f} | {m['queue']:.1f} / {s['queue']:.1f} | "
              f"{m['step']:.1f} / {s['step']:.1f} | {m['handoff']:.1f} / {s['handoff']:.1f} | "
              f"{m['captured_n']}, {m['captured_step']:.1f} / {s['captured_n']}, {s['captured_step']:.1f} | "
              f"{m['next_captured_n']}, {m['next_captured_handoff']:.1f} / {s['next_captured_n']}, {s['next_captured_handoff']:.1f} |")
    print("\n## Cells (error of the statistic, engine floor in brackets)\n")
    print("| cell | TTFT mean | TTFT p90 | TPOT mean | TTFT MAPE |")
    print("|---|---:|---:|---:|---:|")
    for c in cells:
        print(f"| {c['platform']} {c['cell']} | {pct(*c['ttft_mean'])} | {pct(*c['ttft_p90'])} | {pct(*c['tpot_mean'])} | "
              f"{c['ttft_mape']:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--h200-store", required=True, help="A fitted copy of data/h200/db with its async calibration.")
    parser.add_argument("--h100-store", required=True, help="A fitted copy of data/h100/db with its async calibration.")
    parser.add_argument("--json", help="Write every number here too.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    captures: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    for platform, store in zip(PLATFORMS, (args.h200_store, args.h100_store), strict=True):
        served = Served(store, platform, {})
        captures += [capture_row(served, run) for run in run_dirs(platform)]
        cells += cell_rows(served)
    print_tables(captures, cells)
    if args.json:
        Path(args.json).write_text(json.dumps({"captures": captures, "cells": cells}, indent=2) + "\n")


if __name__ == "__main__":
    main()
