"""The input copy of transformers' async batching, measured in the committed H100 steps (CPU, a minute).

With `use_async_batching=true` the engine copies a launch's inputs host-to-device on one copy
stream (`ContinuousBatchingAsyncIOs.get_model_kwargs` -> `ContinuousBatchingIOs._transfer_inputs`,
`non_blocking=True`), and the compute stream waits for that copy (`h2d_over`). For the eager and
SDPA backends the inputs include the whole host-side attention mask, max_batch_tokens x (cache
tokens + max_batch_tokens) per layer type, whatever the batch holds: 2048 x 264192 bfloat16 =
1.08 GB on every async run here. The probe's `device_s` starts when the compute stream is free,
before its wait for the copy, so the copy shows in the steps in two places:

- steps launched with the device and the copy stream idle (right after a capture, which
  synchronises) take the whole copy on top of their device work;
- consecutive decode steps shorter than the copy follow each other at the copy's pace (the next
  copy cannot start before the previous ends), not at their device time.

Per async run this prints, from steps.parquet alone: the mask bytes, the device interval between
consecutive ordinary decode steps of equal size with the device busy (its median: the copy where
the device work is shorter), the device time of the decodes launched right after a capture, and
the same round's graphs-without-async decode device time for the same batch sizes (where the grid
has that cell): their differences are the copy. With `--store FITTED` (a fitted copy of
data/h100/db) it also fits each run's copy as the calibration does (`fit_input_copy`) and prints
the capture cost and post-capture stall with and without the copy modelled.

    python lab/async_input_copy.py [--store FITTED_H100_STORE] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dooly.sim.schedulers import TF_MASK_ELEMENT_BYTES
from dooly.sim.validate import MeasuredStep, async_timeline, load_ground_truth

log = logging.getLogger("async_input_copy")

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "data" / "h100" / "experiments"
RUN_GLOBS = ("engine_grid/r*/*.async.*", "engine_paths/r*/*.async.*")
ASYNC_MODE = ".async."
SYNC_MODE = ".graphs."
PLATFORM = "NVIDIA-H100-80GB-HBM3"
MS = 1e3
BYTES_PER_GB = 1e9


def mask_bytes(run: Path) -> int:
    """The attention mask the engine copies per launch (one layer type: every model here is full attention)."""
    engine = json.loads((run / "engine.json").read_text())
    tokens = int(engine["max_batch_tokens"])
    return tokens * (int(engine["num_blocks"]) * int(engine["block_size"]) + tokens) * TF_MASK_ELEMENT_BYTES


def is_decode(step: MeasuredStep) -> bool:
    return not step.prefill and bool(step.decode_ctx)


def steady_intervals(steps: list[MeasuredStep]) -> list[float]:
    """Device-end to device-end intervals of consecutive ordinary decode steps of equal size,
    the later launched while the device was still busy (no capture in the last two steps): the
    longer of the copy and the device work, where the host's cycle is shorter than both."""
    ends = [timing.device_end_s for timing in async_timeline(steps)]
    out = []
    for k in range(2, len(steps)):
        step, previous = steps[k], steps[k - 1]
        if step.graph_captured or previous.graph_captured or steps[k - 2].graph_captured:
            continue
        if not (is_decode(step) and is_decode(previous)) or len(step.decode_ctx) != len(previous.decode_ctx):
            continue
        if step.start_s + step.prepare_s >= ends[k - 1]:
            continue
        out.append(ends[k] - ends[k - 1])
    return out


def after_capture(steps: list[MeasuredStep]) -> list[tuple[int, float]]:
    """(batch size, device time) of each ordinary decode launched right after a capture."""
    return [(len(step.decode_ctx), step.device_s) for previous, step in zip(steps, steps[1:], strict=False)
            if previous.graph_captured and not step.graph_captured and is_decode(step)]


def sync_decode_device(run: Path) -> dict[int, float]:
    """Median device time of the ordinary decode steps of the same round's cell without async
    batching, per batch size (empty where the round has no such cell)."""
    sync = run.parent / run.name.replace(ASYNC_MODE, SYNC_MODE)
    if not (sync / "steps.parquet").is_file():
        return {}
    by_size: dict[int, list[float]] = {}
    for step in load_ground_truth(sync).steps:
        if is_decode(step) and not step.graph_captured and math.isfinite(step.device_s):
            by_size.setdefault(len(step.decode_ctx), []).append(step.device_s)
    return {size: float(np.median(values)) for size, values in by_size.items()}


def data_row(run: Path) -> dict[str, Any]:
    """What steps.parquet alone says about the copy of one async run (see the module docstring)."""
    steps = load_ground_truth(run).steps
    intervals = steady_intervals(steps)
    after = after_capture(steps)
    sync = sync_decode_device(run)
    copies = [device - sync[size] for size, device in after if size in sync]
    sync_steady = [sync[len(step.decode_ctx)] for step in steps if is_decode(step) and len(step.decode_ctx) in sync]
    size = mask_bytes(run)
    after_copy = float(np.median(copies)) if copies else math.nan
    return {
        "run": str(run.relative_to(EXPERIMENTS)),
        "mask_gb": size / BYTES_PER_GB,
        "steps": len(steps),
        "steady_interval_ms": float(np.median(intervals)) * MS if intervals else math.nan,
        "steady_intervals": len(intervals),
        "sync_decode_device_ms": float(np.median(sync_steady)) * MS if sync_steady else math.nan,
        "after_capture_device_ms": float(np.median([device for _, device in after])) * MS if after else math.nan,
        "after_capture_decodes": len(after),
        "after_capture_copy_ms": after_copy * MS,
        "h2d_gb_per_s": size / after_copy / BYTES_PER_GB if copies else math.nan,
    }


def fitted_row(run: Path, store: str) -> dict[str, Any]:
    """The calibration's view of one run: its fitted copy, and the capture cost and post-capture
    stall measured with the copy modelled and without (copy 0)."""
    from dooly.fit.source import FittedSource, open_fitted_step
    from dooly.sim.calibration_commands import model_layers
    from dooly.sim.options import with_model_groups
    from dooly.sim.schedulers import make_scheduler
    from dooly.sim.step_model import CpuOverheadModel

    bench = json.loads((run / "bench.json").read_text())
    model = str(bench["model"])
    fitted = open_fitted_step(FittedSource(store=store, platform=PLATFORM, backend=str(bench["backend"])), model)
    scheduler = make_scheduler("transformers", with_model_groups(model, "transformers",
                                                                 json.loads((run / "engine.json").read_text())))
    truth = load_ground_truth(run)
    out: dict[str, Any] = {"run": str(run.relative_to(EXPERIMENTS)), "layers": model_layers(model, fitted.inventory)}
    from dooly.sim.validate import async_host_samples

    for label, given in (("copy", None), ("no_copy", 0.0)):
        measured = async_host_samples(truth, scheduler, fitted.step, input_copy_s=given)
        ordinary = CpuOverheadModel.fit([(s.key, s.num_seqs, s.num_tokens, s.kv_tokens, s.host_s) for s in measured.samples])
        excess = [s.host_s - ordinary.seconds(path, s.num_seqs, s.num_tokens, s.kv_tokens) for s, path in measured.captures]
        out[f"{label}_input_copy_ms"] = measured.input_copy_s * MS
        out[f"{label}_capture_ms"] = float(np.median(excess)) * MS if excess else math.nan
        out[f"{label}_post_capture_ms"] = float(np.median(measured.stalls)) * MS if measured.stalls else math.nan
    return out


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    header = "| " + " | ".join(name for name, _, _ in columns) + " |"
    rule = "|" + "|".join("---" if key == "run" else "---:" for _, key, _ in columns) + "|"
    body = ["| " + " | ".join(fmt.format(row[key]) for _, key, fmt in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


DATA_COLUMNS = [
    ("run", "run", "{}"), ("mask (GB)", "mask_gb", "{:.3f}"), ("steps", "steps", "{}"),
    ("steady decode interval (ms)", "steady_interval_ms", "{:.2f}"), ("n", "steady_intervals", "{}"),
    ("sync decode device (ms)", "sync_decode_device_ms", "{:.2f}"),
    ("decode after a capture (ms)", "after_capture_device_ms", "{:.2f}"), ("n ", "after_capture_decodes", "{}"),
    ("after capture - sync (ms)", "after_capture_copy_ms", "{:.2f}"), ("mask / that (GB/s)", "h2d_gb_per_s", "{:.1f}"),
]
FITTED_COLUMNS = [
    ("run", "run", "{}"), ("fitted copy (ms)", "copy_input_copy_ms", "{:.2f}"),
    ("capture, copy modelled (ms)", "copy_capture_ms", "{:.1f}"), ("capture, no copy (ms)", "no_copy_capture_ms", "{:.1f}"),
    ("post-capture stall, copy modelled (ms)", "copy_post_capture_ms", "{:.2f}"),
    ("post-capture stall, no copy (ms)", "no_copy_post_capture_ms", "{:.2f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--store", help="A fitted copy of data/h100/db: also fit each run's copy as the calibration does.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    runs = sorted(run for pattern in RUN_GLOBS for run in EXPERIMENTS.glob(pattern) if (run / "steps.parquet").is_file())
    log.info("%d async runs", len(runs))
    rows = [data_row(run) for run in runs]
    sys.stdout.write(table(rows, DATA_COLUMNS) + "\n")
    result: dict[str, Any] = {"data": rows}
    if args.store:
        fitted = []
        for run in runs:
            log.info("fitting the copy of %s", run.name)
            fitted.append(fitted_row(run, args.store))
        sys.stdout.write("\n" + table(fitted, FITTED_COLUMNS) + "\n")
        result["fitted"] = fitted
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
