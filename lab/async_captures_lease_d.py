"""Async batching's capture forms on lease D's calib runs (docs/calibration.md, "Async batching's
light-load TTFT"; CPU, about a minute).

Lease D (H200, 2026-12-06) ran the calib workload with async batching for Llama-3.2-1B, -3B and
Llama-3.1-8B (16 / 28 / 32 layers): calib runs of several layer counts from one lease, what
`dooly calibrate --async-captures split` needs for its per-layer capture line. This prints:

1. Per calib run alone (`dooly calibrate --dry-run`, each form), lease C's 1B calib run
   (engine_grid/r1) beside them: the capture cost (`single`: over every capture; `split`: over
   known-shape captures), new-shape eager time H (`split`), the captures counted (known / new /
   new ones hidden behind the device) and the spread of the known-shape captures' cost (p25-p75).
2. Every async grid cell (each model's light and heavy cells, rounds r1..r3 together as the grid
   validates them, r1 measured, the floor over all rounds) validated with: the fitted store's
   own async calibration (`committed`), lease D's three calib runs in each form (`D single`,
   `D split`), and leave-one-model-out on lease D (`LOMO single`, `LOMO split`: fitted on the
   other two models' calib runs). Mean / p90 TTFT, mean / p90 TPOT error and TTFT / TPOT MAPE;
   a statistic passes within 8% or within the engine's floor.
3. Per async run (calib and cells), what its captures cost against lease D's `split` fit: the
   known-shape captures' cost (median), and H fitted on the run alone, against the fit's line and H.

    python lab/async_captures_lease_d.py FITTED_H200_STORE [--work DIR] [--json OUT]

FITTED_H200_STORE: a fitted copy of data/h200/db (read only: every calibration is written into a
copy of it under DIR).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dooly.sim.calibration import _terms_for, fit_new_shape_eager
from dooly.sim.calibration_commands import CalibrationRun, calibrate_runs, run_samples

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "data/h200/experiments/engine_grid"
MODELS = ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B")
LEASE_D = "calib_d"
LEASE_C = "r1"
ROUNDS = ("r1", "r2", "r3")
LOADS = ("light", "heavy")
FORMS = ("single", "split")
PLATFORM = "NVIDIA-H200"
BACKEND = "paged|sdpa"
TARGET_PCT = 8.0
STATS = (("ttft", "mean"), ("ttft", "p90"), ("tpot", "mean"), ("tpot", "p90"))
MS = 1e3


def dooly(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "dooly.cli", *args, "--output", "json"], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


def calib_run(lease: str, model: str) -> Path:
    return GRID / lease / f"{model}.paged-sdpa.async.calib"


def run_terms(store: str, run: Path) -> dict[str, Any]:
    """Part 1: one calib run's terms in each form and its captures."""
    row: dict[str, Any] = {"run": f"{run.parent.name}/{run.name}"}
    for form in FORMS:
        calibration = dooly("calibrate", "--store", store, "--dry-run", "--async-captures", form,
                            "--ground-truth", str(run))["calibrations"][0]
        row[form] = {"capture_ms": calibration["graph_capture_s"] * MS,
                     "per_layer_ms": calibration["graph_capture_per_layer_s"] * MS,
                     "new_shape_eager_ms": calibration["new_shape_eager_s"] * MS,
                     "input_copy_ms": calibration["input_copy_s"] * MS,
                     "decode_constant_ms": calibration["terms"]["decode_graph"]["constant_s"] * MS}
    loaded = CalibrationRun.load(run)
    samples, captures, _ = run_samples(loaded, store, split_new_shapes=True)
    calibration = calibrate_runs([CalibrationRun.load(run)], store, async_captures="split")[0]
    known = [(s.host_s - _terms_for(calibration.terms, s.key).seconds(s)) * MS for s, _ in captures]
    capture = calibration.graph_capture_s
    row.update({"captures": len(captures) + len(loaded.new_shapes), "known": len(captures) if loaded.new_shapes else 0,
                "new": len(loaded.new_shapes),
                "new_hidden": sum(1 for _, launch, device in loaded.new_shapes if launch - capture <= device + 0.002),
                "known_p25_ms": float(np.percentile(known, 25)) if known else 0.0,
                "known_p75_ms": float(np.percentile(known, 75)) if known else 0.0})
    return row


def fitted_copy(fitted: str, work: Path, name: str, form: str, runs: list[Path]) -> tuple[str, dict[str, Any]]:
    """A copy of the fitted store with the runs' async calibration in `form` as its newest."""
    store = work / name
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(fitted, store)
    args = ["calibrate", "--store", str(store), "--async-captures", form]
    for run in runs:
        args += ["--ground-truth", str(run)]
    return str(store), dooly(*args)["calibrations"][0]


def cell_runs(model: str, load: str) -> list[Path]:
    return [d for r in ROUNDS if (d := GRID / r / f"{model}.paged-sdpa.async.{load}").is_dir()]


def validate_cell(store: str, model: str, load: str) -> dict[str, Any]:
    runs = cell_runs(model, load)
    args = ["validate", f"meta-llama/{model}", "--store", store, "--platform", PLATFORM, "--backend", BACKEND]
    for run in runs:
        args += ["--ground-truth", str(run)]
    report = dooly(*args)
    floors = {row["statistic"]: row["floor_pct"] for row in report["summary"]["rows"]}
    row: dict[str, Any] = {"runs": len(runs), "ttft_mape": report["requests"]["ttft"]["mape"],
                           "tpot_mape": report["requests"]["tpot"]["mape"]}
    for quantity, stat in STATS:
        error = report["distribution"][quantity][stat]["error_pct"]
        floor = floors.get(f"{quantity}_{stat}", 0.0)
        row[f"{quantity}_{stat}"] = {"error_pct": error, "floor_pct": floor,
                                     "pass": abs(error) <= TARGET_PCT or abs(error) <= floor}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fitted")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="async-lease-d-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"terms": [], "fits": {}, "cells": []}

    runs = [calib_run(LEASE_D, m) for m in MODELS] + [calib_run(LEASE_C, MODELS[0])]
    print("## Per calib run alone (ms; capture + per layer, H: new-shape eager; known spread p25-p75)")
    print("| run | single: capture | split: capture | split: H | captures (known / new, hidden) | known p25-p75 | copy |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for run in runs:
        terms = run_terms(args.fitted, run)
        out["terms"].append(terms)
        print(f"| {terms['run']} | {terms['single']['capture_ms']:.1f} | {terms['split']['capture_ms']:.1f} | "
              f"{terms['split']['new_shape_eager_ms']:.1f} | {terms['captures']} ({terms['known']} / {terms['new']}, "
              f"{terms['new_hidden']}) | {terms['known_p25_ms']:.1f}-{terms['known_p75_ms']:.1f} | "
              f"{terms['single']['input_copy_ms']:.2f} |")

    stores: dict[tuple[str, str], str] = {}
    print("\n## Fits (ms)")
    print("| fit | form | capture | per layer | H |")
    print("|---|---|---:|---:|---:|")
    for form in FORMS:
        for fit in ("all", *MODELS):
            fit_runs = [calib_run(LEASE_D, m) for m in MODELS if fit == "all" or m != fit]
            name = f"D.{form}" if fit == "all" else f"lomo.{fit}.{form}"
            stores[(fit, form)], calibration = fitted_copy(args.fitted, work, name, form, fit_runs)
            terms = {"capture_ms": calibration["graph_capture_s"] * MS,
                     "per_layer_ms": calibration["graph_capture_per_layer_s"] * MS,
                     "new_shape_eager_ms": calibration["new_shape_eager_s"] * MS}
            out["fits"][f"{fit}.{form}"] = terms
            label = "lease D, 3 models" if fit == "all" else f"lease D without {fit}"
            print(f"| {label} | {form} | {terms['capture_ms']:.2f} | {terms['per_layer_ms']:.3f} | "
                  f"{terms['new_shape_eager_ms']:.1f} |")

    variants = ["committed", "D single", "D split", "LOMO single", "LOMO split"]
    print("\n## Cells (error %: mean TTFT / p90 TTFT / mean TPOT / p90 TPOT, * outside 8% and floor; "
          "TTFT / TPOT MAPE)")
    print("| cell | floor (TTFT mean/p90, TPOT mean/p90) | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for model in MODELS:
        for load in LOADS:
            row: dict[str, Any] = {"model": model, "load": load}
            for variant in variants:
                if variant == "committed":
                    store = args.fitted
                else:
                    fit, form = variant.split()
                    store = stores[("all" if fit == "D" else model, form)]
                row[variant] = validate_cell(store, model, load)
            out["cells"].append(row)
            first = row[variants[0]]
            floors = "/".join(f"{first[f'{q}_{s}']['floor_pct']:.0f}" for q, s in STATS)
            texts = []
            for variant in variants:
                cell = row[variant]
                stats = " / ".join(f"{cell[f'{q}_{s}']['error_pct']:+.1f}{'' if cell[f'{q}_{s}']['pass'] else '*'}"
                                   for q, s in STATS)
                texts.append(f"{stats}; {cell['ttft_mape']:.1f} / {cell['tpot_mape']:.1f}")
            print(f"| {model} {load} ({first['runs']} runs) | {floors} | " + " | ".join(texts) + " |")
    print("\n## Captures per async run against lease D's split fit (ms; known: median capture cost beyond the fit's "
          "host terms; "
          "H: first-shape host time fitted on the run alone)")
    print("| run | layers | known captures | known: cost | fit: cost | new captures | H | fit: H |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    split = out["fits"]["all.split"]
    fitted = calibrate_runs([CalibrationRun.load(calib_run(LEASE_D, m)) for m in MODELS], stores[("all", "split")],
                            async_captures="split")[0]
    for run in sorted(GRID.glob("calib_d/*.paged-sdpa.async.calib")) + sorted(GRID.glob("r*/*.paged-sdpa.async.*")):
        loaded = CalibrationRun.load(run)
        _, captures, layers = run_samples(loaded, stores[("all", "split")], split_new_shapes=True)
        line = split["capture_ms"] + split["per_layer_ms"] * layers
        known = [(s.host_s - _terms_for(fitted.terms, s.key).seconds(s)) * MS for s, _ in captures]
        own_h = fit_new_shape_eager([(launch - line / MS, free) for _, launch, free in loaded.new_shapes]) * MS
        row = {"run": f"{run.parent.name}/{run.name}", "layers": layers, "known": len(known) if loaded.new_shapes else 0,
               "known_ms": float(np.median(known)) if known else 0.0, "line_ms": line, "new": len(loaded.new_shapes),
               "h_ms": own_h}
        out.setdefault("runs", []).append(row)
        print(f"| {row['run']} | {layers} | {row['known']} | {row['known_ms']:.1f} | {line:.1f} | {row['new']} | "
              f"{own_h:.1f} | {split['new_shape_eager_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
