"""Are mixed steps of more sequences than the grid measured priced worse? (CPU, seconds on a fitted store.)

The coverage line says how much of a prediction lies beyond the sizes its operations were measured
at (docs/unseen.md). At heavy load a loaded engine's mixed steps hold up to ~96 sequences (a chunk
beside the decodes) where the grid's mixed attention batches hold at most 65, so every heavy
simulation reports part of its mixed device time as extrapolated in B. This script asks whether
that part is priced worse: every measured mixed and decode step (captures left out) of the heavy
CUDA-graph cells is replayed through the store's step model on the engine's padded path, and the
signed error of its device time (predicted against steps.parquet `device_s`) is summarised for
mixed steps within the grid's sequence count and beyond it.

    python lab/mixed_seqs_extent.py --store FITTED_STORE --platform NVIDIA-H100-80GB-HBM3 CELL [CELL ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dooly.engines.groundtruth import ENGINE_FILE
from dooly.fit.source import FittedSource, open_step_model
from dooly.sim.schedulers import make_scheduler
from dooly.sim.step_model import device_seconds, step_keywords
from dooly.sim.validate import load_ground_truth

# The most sequences a mixed batch of the default attention grid holds (a chunk and 64 decodes).
GRID_MIXED_SEQS = 65
PERCENT = 100.0
GROUPS = ("mixed within", "mixed beyond", "decode")


def step_errors(cell: Path, store: str, platform: str, models: dict) -> dict[str, list[float]]:
    """Signed device-time error (%) of each measured step of CELL, by group."""
    bench = json.loads((cell / "bench.json").read_text())
    key = (bench["model"], bench["backend"])
    if key not in models:
        source = FittedSource(store=store, platform=platform, backend=bench["backend"])
        models[key] = open_step_model(source, bench["model"])
    step_model = models[key]
    keywords = step_keywords(step_model)
    scheduler = make_scheduler("transformers", json.loads((cell / ENGINE_FILE).read_text()))
    errors: dict[str, list[float]] = {group: [] for group in GROUPS}
    for step in load_ground_truth(cell).steps:
        if not step.device_s > 0 or step.graph_captured:
            continue
        path = scheduler.path_for(step.prefill, step.decode_ctx)
        predicted = device_seconds(step_model, step.prefill, step.decode_ctx, path, keywords)
        error = (predicted - step.device_s) / step.device_s * PERCENT
        if step.prefill and step.decode_ctx:
            within = len(step.prefill) + len(step.decode_ctx) <= GRID_MIXED_SEQS
            errors["mixed within" if within else "mixed beyond"].append(error)
        elif step.decode_ctx:
            errors["decode"].append(error)
    return errors


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{len(values)}: {statistics.mean(values):+.1f} / {statistics.median(values):+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--platform", required=True)
    parser.add_argument("cells", nargs="+", type=Path)
    args = parser.parse_args()
    models: dict = {}
    lines = ["| cell | " + " | ".join(f"{g} (n: mean / median %)" for g in GROUPS) + " |", "|---" * (len(GROUPS) + 1) + "|"]
    pooled: dict[str, list[float]] = {group: [] for group in GROUPS}
    for cell in args.cells:
        errors = step_errors(cell, args.store, args.platform, models)
        for group in GROUPS:
            pooled[group] += errors[group]
        lines.append(f"| {cell.parent.name}/{cell.name} | " + " | ".join(_summary(errors[g]) for g in GROUPS) + " |")
    lines.append("| all | " + " | ".join(_summary(pooled[g]) for g in GROUPS) + " |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
