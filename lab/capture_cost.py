"""What a synchronous CUDA-graph capture costs on the H200, and what it depends on
(docs/calibration.md, "Synchronous captures: new and known attention shapes"; CPU, about a minute).

Every capture step of every H200 run with CUDA graphs (synchronous `paged|sdpa` and `paged|eager`
graphs runs, and async runs apart) is priced as `dooly calibrate` prices it (`host_samples`: its
wall time less the device time the fitted step model predicts for its eager run, less the fitted
store's calibration's ordinary host time for its path) and tabulated against the layer count, the
padded query and KV tokens of its graph, the run type (calib / light / heavy), the lease, and
whether its attention shape (engine path, padded query and KV tokens) was new to the engine or
was run before under another longest-sequence key (`CpuOverheadModel.attention_shape`).

Then capture-cost forms are fitted on calib runs only (as `dooly calibrate` is) and compared on
the grid cells' captures (mean capture cost per cell): a line in L (the product before), + padded
KV (+ padded query) tokens, and the new / known split (+ padded KV), fitted on the committed sync
calibration's four calib runs, on all seven sync calib runs, and on lease D's three; and a
within-run slope in padded KV tokens (each run's own level taken off).

    python lab/capture_cost.py FITTED_H200_STORE [--csv OUT.csv]

FITTED_H200_STORE: a fitted copy of data/h200/db (`cp -r data/h200/db S && dooly merge --store S
&& dooly fit --store S`; read only).
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from dooly.sim.calibration import _terms_for, find_calibration
from dooly.sim.calibration_commands import CalibrationRun, capture_novelty, run_samples
from dooly.store.backends import open_store

logger = logging.getLogger("capture_cost")

ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "data/h200"
SKIPPED = ("engine_paths",)  # HTTP / pair probes, not grid cells or calib runs
# The committed sync graphs calibration's inputs (its gen json's `inputs`).
COMMITTED_CALIB = (
    "groundtruth/Llama-3.1-8B.paged-sdpa.graphs.calib",
    "experiments/unseen_llama/calib_repeat/lease-b/r2/Llama-3.1-8B.paged-sdpa.graphs.calib",
    "experiments/unseen_llama/calib_repeat/lease-b/r3/Llama-3.1-8B.paged-sdpa.graphs.calib",
    "experiments/engine_grid/r1/Llama-3.2-1B.paged-sdpa.graphs.calib",
)
# Lease D ran calib_d, r3, and r2 of these (engine_grid/walls_d.txt); the rest of r1/r2 is lease C.
LEASE_D_R2 = ("Llama-3.1-8B.", "Llama-3.2-1B.paged-eager.", "Llama-3.2-3B.paged-sdpa.default.")
KV_SCALE = 1e5  # slopes per 100k padded KV tokens
Q_SCALE = 1e3  # per 1k padded query tokens
L_SCALE = 32.0  # per 32 layers
IRLS_ROUNDS = 20  # reweighted least squares toward a median (L1) fit: a capture's cost has outliers
IRLS_FLOOR_MS = 1.0
MS = 1e3
# Runs whose captures span fewer padded KV tokens (light cells: 2k) give no slope worth printing.
MIN_KV_SPAN = 10_000
FORMS = ("L", "L+kv", "L+kv+q", "split", "split+kv")


def lease(relative: str) -> str:
    parts = relative.split("/")
    if parts[0] == "groundtruth":
        return "A"
    if "unseen_llama" in parts:
        return "B"
    if "engine_grid" in parts:
        round_name, name = parts[-2], parts[-1]
        if round_name in ("calib_d", "r3") or (round_name == "r2" and name.startswith(LEASE_D_R2)):
            return "D"
        return "C"
    return "?"


def capture_rows(store_uri: str) -> list[dict[str, Any]]:
    """One row per capture step of every H200 graphs run."""
    store = open_store(store_uri)
    cache: dict[tuple[str, ...], Any] = {}
    rows: list[dict[str, Any]] = []
    runs = sorted(p.parent for p in H200.rglob("steps.parquet")
                  if not any(s in p.parts for s in SKIPPED) and ("graphs" in p.parent.name or "async" in p.parent.name))
    for directory in runs:
        run = CalibrationRun.load(directory)
        if not run.key.cuda_graphs:
            continue
        calibration = find_calibration(store, platform=run.key.platform, engine=run.key.engine, backend=run.key.backend,
                                       cuda_graphs=True, async_batching=run.key.async_batching)
        if calibration is None:
            logger.warning("no calibration for %s; skipped", directory)
            continue
        _, captures, layers = run_samples(run, store_uri, cache)
        relative = str(directory.relative_to(H200))
        logger.info("%s: %d captures", relative, len(captures))
        for (sample, path), new in zip(captures, capture_novelty([p for _, p in captures]), strict=True):
            ordinary = _terms_for(calibration.terms, sample.key).seconds(sample)
            rows.append({"run": relative, "model": run.model.split("/")[-1], "layers": layers,
                         "loop": "async" if run.key.async_batching else "sync", "backend": run.key.backend,
                         "kind": directory.name.rsplit(".", 1)[-1], "lease": lease(relative),
                         "new_shape": new, "padded_q": path.padded_tokens, "padded_kv": path.padded_kv,
                         "padded_seqlen_k": path.padded_seqlen_k, "excess_ms": (sample.host_s - ordinary) * MS})
    return rows


def per_run_table(rows: Sequence[dict[str, Any]]) -> None:
    print("\nPer run and attention-shape kind: captures, cost beyond the eager run (ms, median [p25, p75]), "
          "median padded query / KV tokens")
    keys = sorted({(r["loop"], r["backend"], r["layers"], r["run"], r["new_shape"]) for r in rows})
    for loop, backend, layers, run, new in keys:
        group = [r for r in rows if (r["loop"], r["backend"], r["run"], r["new_shape"]) == (loop, backend, run, new)]
        cost = np.array([r["excess_ms"] for r in group])
        print(f"{loop:5s} {backend:11s} {run:88s} {group[0]['lease']} L{layers:2d} {'new  ' if new else 'known'} "
              f"n={len(group):2d} {np.median(cost):6.1f} [{np.percentile(cost, 25):6.1f}, {np.percentile(cost, 75):6.1f}] "
              f"q={np.median([r['padded_q'] for r in group]):5.0f} kv={np.median([r['padded_kv'] for r in group]):7.0f}")


def design(rows: Sequence[dict[str, Any]], form: str) -> np.ndarray:
    layers = np.array([r["layers"] for r in rows], dtype=float) / L_SCALE
    kv = np.array([r["padded_kv"] for r in rows], dtype=float) / KV_SCALE
    q = np.array([r["padded_q"] for r in rows], dtype=float) / Q_SCALE
    new = np.array([r["new_shape"] for r in rows], dtype=float)
    one = np.ones_like(layers)
    columns = {"L": [one, layers], "L+kv": [one, layers, kv], "L+kv+q": [one, layers, kv, q],
               "split": [new, new * layers, 1 - new, (1 - new) * layers],
               "split+kv": [new, new * layers, 1 - new, (1 - new) * layers, kv]}[form]
    return np.column_stack(columns)


def fit(rows: Sequence[dict[str, Any]], form: str) -> np.ndarray:
    matrix, target = design(rows, form), np.array([r["excess_ms"] for r in rows])
    weights = np.ones_like(target)
    coef = np.zeros(matrix.shape[1])
    for _ in range(IRLS_ROUNDS):
        coef, _ = nnls(matrix * weights[:, None], target * weights)
        weights = 1 / np.sqrt(np.maximum(np.abs(target - matrix @ coef), IRLS_FLOOR_MS))
    return coef


def held_out(train: Sequence[dict[str, Any]], cells: Sequence[dict[str, Any]], title: str) -> None:
    print(f"\nFitted on {title} ({len(train)} captures) -> the sync paged|sdpa grid cells' mean capture cost (ms)")
    runs = sorted({r["run"] for r in cells})
    predicted: dict[str, list[float]] = {}
    measured = [float(np.mean([r["excess_ms"] for r in cells if r["run"] == run])) for run in runs]
    for form in FORMS:
        coef = fit(train, form)
        predicted[form] = [float(np.mean(design([r for r in cells if r["run"] == run], form) @ coef)) for run in runs]
        errors = np.array(predicted[form]) - np.array(measured)
        print(f"  {form:9s} coefficients {np.round(coef, 1)}: MAE {np.abs(errors).mean():5.1f}, bias {errors.mean():+5.1f}, "
              f"MAPE {100 * np.mean(np.abs(errors) / np.array(measured)):5.1f}%")
    print(f"  {'cell':60s} {'n':>3s} {'meas':>6s} " + " ".join(f"{form:>9s}" for form in FORMS))
    for index, run in enumerate(runs):
        count = sum(r["run"] == run for r in cells)
        print(f"  {run:60s} {count:3d} {measured[index]:6.1f} " + " ".join(f"{predicted[f][index]:9.1f}" for f in FORMS))


def within_run_slopes(rows: Sequence[dict[str, Any]]) -> None:
    print("\nWithin-run slope of the capture cost in padded KV tokens (ms per 100k; each run's median taken off)")
    for loop in ("sync", "async"):
        for new in (True, False):
            for kind in ("calib", "light", "heavy"):
                group = [r for r in rows if r["loop"] == loop and r["new_shape"] == new and r["kind"] == kind
                         and r["backend"] == "paged|sdpa"]
                if not group:
                    continue
                cost, kv = demeaned(group, lambda r: r["excess_ms"]), demeaned(group, lambda r: r["padded_kv"] / KV_SCALE)
                span = (min(r["padded_kv"] for r in group), max(r["padded_kv"] for r in group))
                if span[1] - span[0] < MIN_KV_SPAN:
                    continue
                slope = float(kv @ cost / (kv @ kv)) if kv @ kv > 0 else float("nan")
                print(f"  {loop:5s} {'new  ' if new else 'known'} {kind:5s} n={len(group):3d} padded KV {span[0]}-{span[1]}: "
                      f"{slope:+7.1f}")


def demeaned(group: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> np.ndarray:
    values = np.array([value(r) for r in group], dtype=float)
    runs = np.array([r["run"] for r in group])
    for run in set(runs):
        mask = runs == run
        values[mask] -= np.median(values[mask])
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fitted_store", help="a fitted copy of data/h200/db (read only)")
    parser.add_argument("--csv", type=Path, help="write one row per capture here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = capture_rows(args.fitted_store)
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    per_run_table(rows)
    sync = [r for r in rows if r["loop"] == "sync" and r["backend"] == "paged|sdpa"]
    calib = [r for r in sync if r["kind"] == "calib"]
    cells = [r for r in sync if r["kind"] != "calib"]
    held_out([r for r in calib if r["run"] in COMMITTED_CALIB], cells, "the committed calibration's 4 calib runs")
    held_out(calib, cells, "all 7 sync calib runs")
    held_out([r for r in calib if r["lease"] == "D"], cells, "lease D's 3 calib runs")
    within_run_slopes(rows)


if __name__ == "__main__":
    main()
