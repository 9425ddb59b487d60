"""Where the device time of measuring attention goes, point by point (one GPU, minutes).

Attention is most of a campaign's device time (data/h100/db: 578 of 738 device-seconds) for a
few percent of kernel time. This measures every attention point of the profiler's default grid
exactly as `dooly profile` does (the engine-built call, `Timer`), for each model and backend, and
reports per point and in total the wall time per timer phase (building the call: the engine's
inputs and one forward; warm-up; sizing the capture; the capture; the timed samples), how much of
the build is the engine's input preparation alone, and what fewer samples would have cost and
changed: the median of the first k samples against the median of all of them.

    python lab/attention_cost.py --models Llama-3.2-1B,Qwen2.5-7B --backends paged|sdpa,paged|eager
    python lab/attention_cost.py --device cpu --models tiny/config.json --max-points 4   # dry run

Prints one JSON object (stdout).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from typing import Any

import torch

from dooly.models.registry import build_hf_config, resolve_model
from dooly.profile.attention import engine_attention
from dooly.profile.grid import GridSpec, attention_points
from dooly.profile.measure import P90, PHASES, STATUS_OK, Timer, percentile
from dooly.trace.tracer import DTYPES

log = logging.getLogger("attention_cost")

DEFAULT_BACKENDS = "paged|sdpa,paged|eager,paged|flex_attention"
FEWER_SAMPLES = (3, 5, 7)
PERCENT = 100.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="Llama-3.2-1B", help="Comma-separated bundled model ids.")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--samples", type=int, default=None, help="Timer samples per point (profiler default).")
    parser.add_argument("--max-points", type=int, default=None, help="Only the first N points of the grid.")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "runs": [],
    }
    for model in args.models.split(","):
        for backend in args.backends.split(","):
            run = cost_of(model, backend, DTYPES[args.dtype], args.device, args.samples, args.max_points)
            log.info("%s %s: %s", model, backend, run["summary"])
            report["runs"].append(run)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))
    return 0


def cost_of(model: str, backend: str, dtype: torch.dtype, device: str, samples: int | None,
            max_points: int | None) -> dict[str, Any]:
    grid = GridSpec()
    hf_config = build_hf_config(resolve_model(model))
    started = time.perf_counter()
    runner = engine_attention("transformers", hf_config, backend=backend, dtype=dtype, device=device, grid=grid)
    engine_seconds = time.perf_counter() - started
    timer = Timer(device, samples)
    points = attention_points(grid)[:max_points]
    rows = []
    for point in points:
        rows.append(point_cost(runner, point, timer, device))
    return {"model": model, "backend": backend, "engine_build_seconds": round(engine_seconds, 3),
            "summary": summarise(rows), "points": rows}


def point_cost(runner: Any, point: Any, timer: Timer, device: str) -> dict[str, Any]:
    before = dict(timer.phase_seconds)
    started = time.perf_counter()
    runner.engine.step_inputs(point.batch)
    if device == "cuda":
        torch.cuda.synchronize()
    inputs_seconds = time.perf_counter() - started
    measurement = timer.measure(lambda: runner.call_for(point.batch, False))
    phases = {phase: timer.phase_seconds.get(phase, 0.0) - before.get(phase, 0.0) for phase in PHASES}
    return {
        "values": point.as_dict,
        "status": measurement.status,
        "inputs_seconds": inputs_seconds,
        "phases": {phase: seconds for phase, seconds in phases.items() if seconds},
        "device_seconds": measurement.device_seconds,
        "samples_s": list(measurement.samples_s),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [row for row in rows if row["status"] == STATUS_OK]
    totals = {phase: round(sum(row["phases"].get(phase, 0.0) for row in rows), 3) for phase in PHASES}
    summary: dict[str, Any] = {
        "points": len(rows),
        "ok_points": len(ok),
        "device_seconds": round(sum(row["device_seconds"] for row in rows), 3),
        "inputs_seconds": round(sum(row["inputs_seconds"] for row in rows), 3),
        "by_phase": totals,
        "kernel_seconds": round(sum(statistics.median(row["samples_s"]) * len(row["samples_s"]) for row in ok), 3),
    }
    fewer = {}
    for k in FEWER_SAMPLES:
        errors = [abs(statistics.median(row["samples_s"][:k]) / statistics.median(row["samples_s"]) - 1)
                  for row in ok if len(row["samples_s"]) > k]
        if not errors:
            continue
        share = k / len(ok[0]["samples_s"])
        fewer[str(k)] = {
            "samples_seconds": round(totals["samples"] * share, 3),
            "median_error_p50_pct": round(PERCENT * percentile(errors, 50), 3),
            "median_error_p90_pct": round(PERCENT * percentile(errors, P90), 3),
            "median_error_max_pct": round(PERCENT * max(errors), 3),
        }
    summary["fewer_samples"] = fewer
    return summary


if __name__ == "__main__":
    sys.exit(main())
