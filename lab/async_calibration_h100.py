"""Which calib runs the H100's async-batching calibration should carry (docs/calibration.md, "Async
batching on the H100: three layer counts of one lease"; CPU, a few minutes).

The committed H100 calibration of `paged|sdpa`, graphs on, async batching was fitted on one calib
run (Qwen2.5-7B, engine_paths/r1), so its per-layer capture term is unidentified. Lease 4
(engine_grid/calib_lease4) ran the calib workload with async batching for Llama-3.2-1B, -3B and
Llama-3.1-8B (16 / 28 / 32 layers). Candidates, each fitted with `dooly calibrate` into a copy of
the fitted store, in each capture form (`--async-captures single|split`):

    qwen       the committed calibration's run: Qwen2.5-7B's engine_paths/r1 async calib run
               (`single`: the fitted store's own calibration, as committed);
    lease4     lease 4's three calib runs;
    lease4+q   lease 4's three and Qwen2.5-7B's.

Every committed H100 async cell is validated with each (`dooly validate`, the cell's own engine
settings; rounds of a cell together, the first simulated, all giving the engine's floor): the
grid's Llama-3.2-1B and -3B light and heavy cells (engine_grid r1, r2, as
reports/engine_grid_table.py validates them), Qwen2.5-7B's (engine_paths r1-r3) and Llama-3.1-8B's
in-process pair of lease 4 (engine_paths/lease4/pairs). Held out: each lease-4 model's cells
validated with the candidate fitted without that model's calib run (leave one model out; `qwen`
never saw them). This prints:

1. per calib run alone: its capture cost in each form, H (new-shape eager time, `split`), the
   input copy, the decode path's constant and the run's mean host time per step;
2. per fit: the capture line (constant + per layer, and at 16 / 28 / 32 layers), H and the copy;
3. per cell and candidate: mean / p90 TTFT and TPOT error (* outside both 8% and the floor),
   TTFT / TPOT MAPE and issue #24's verdict (engine_paths_table.verdict), in-sample and held out;
4. per candidate: cells passing, mean absolute error of the four statistics and mean MAPEs, over
   every cell in-sample, the lease-4 models' cells held out, and the grid's cells (served on leases
   none of the calib runs came from) in-sample and held out;
5. what moves between the committed calibration and lease 4's (`single`): lease 4's with the
   committed one's capture line, or its mixed path's terms, put in its place, on every cell.

    python lab/async_calibration_h100.py --fitted-store FITTED_H100_STORE [--work DIR] [--json OUT]
        [--forms single split]

FITTED_H100_STORE: a merged and fitted copy of data/h100/db (read only: every calibration is
written into a copy of it under --work).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "reports"))
sys.path.insert(0, str(ROOT / "bench"))

from engine_grid_table import H100_PLATFORM, discover, run_model  # noqa: E402
from engine_paths_table import SUMMARY_TARGET_PCT, Cell, dooly, rows_by_key, validate, verdict  # noqa: E402

log = logging.getLogger("async_calibration_h100")

H100 = ROOT / "data/h100"
GRID = H100 / "experiments/engine_grid"
PATHS = H100 / "experiments/engine_paths"
LEASE4_CALIB = GRID / "calib_lease4"
LEASE4_MODELS = ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B")
QWEN = "Qwen2.5-7B"
QWEN_CALIB = PATHS / "r1" / f"{QWEN}.paged-sdpa.async.calib"
QWEN_ROUNDS = ("r1", "r2", "r3")
LEASE4_PAIRS = PATHS / "lease4" / "pairs"
ASYNC = "paged-sdpa.async"
LOADS = ("light", "heavy")
FORMS = ("single", "split")
BACKEND = "sdpa"
ASYNC_MODE = "async"
STATS = ("ttft_mean", "ttft_p90", "tpot_mean", "tpot_p90")
LAYERS = (16, 28, 32)
MS = 1e3
COMMITTED = "qwen"
LEASE4 = "lease4"
# Part 5: what of the committed calibration is put into lease 4's.
CAPTURE_LINE, MIXED_PATH = "capture line", "mixed_graph"
SWAPS = (CAPTURE_LINE, MIXED_PATH)
# Where a cell was served: the grid's rounds (leases of no calib run here), the Qwen calib run's lease, lease 4.
GRID_SOURCE, QWEN_SOURCE, LEASE4_SOURCE = "grid", "qwen", "lease4"


@dataclass(frozen=True)
class Candidate:
    """A set of calib runs; `lease4` names the lease-4 models among them (those a held-out fit leaves out)."""

    name: str
    runs: tuple[Path, ...]
    lease4: tuple[str, ...]


def lease4_run(model: str) -> Path:
    return LEASE4_CALIB / f"{model}.{ASYNC}.calib"


CANDIDATES = (
    Candidate(COMMITTED, (QWEN_CALIB,), ()),
    Candidate(LEASE4, tuple(lease4_run(m) for m in LEASE4_MODELS), LEASE4_MODELS),
    Candidate("lease4+q", (*(lease4_run(m) for m in LEASE4_MODELS), QWEN_CALIB), LEASE4_MODELS),
)


@dataclass(frozen=True)
class AsyncCell:
    """One committed async cell: its runs (the first simulated) and the calib-run model it belongs to."""

    name: str
    model_dir: str
    workload: str
    runs: tuple[Path, ...]
    source: str  # GRID_SOURCE, QWEN_SOURCE or LEASE4_SOURCE: where (on which lease) the cell was served

    def cell(self) -> Cell:
        return Cell(self.name, BACKEND, self.workload, self.runs, model=run_model(self.runs[0]), platform=H100_PLATFORM)


def async_cells() -> list[AsyncCell]:
    """The grid's async cells (as reports/engine_grid_table.py groups them), Qwen2.5-7B's and the 8B pair's."""
    cells = [AsyncCell(f"{g.model_dir} {g.workload} (grid {', '.join(g.rounds)})", g.model_dir, g.workload, g.runs,
                       GRID_SOURCE)
             for g in discover(GRID) if g.mode == ASYNC_MODE and g.backend == BACKEND]
    for load in LOADS:
        runs = tuple(run for r in QWEN_ROUNDS if (run := PATHS / r / f"{QWEN}.{ASYNC}.{load}").is_dir())
        rounds = ", ".join(r.parent.name for r in runs)
        cells.append(AsyncCell(f"{QWEN} {load} (engine_paths {rounds})", QWEN, load, runs, QWEN_SOURCE))
    for load in LOADS:
        run = LEASE4_PAIRS / f"Llama-3.1-8B.{ASYNC}.{load}"
        cells.append(AsyncCell(f"Llama-3.1-8B {load} (lease4 pair)", "Llama-3.1-8B", load, (run,), LEASE4_SOURCE))
    return cells


def calibrated_copy(fitted: str, work: Path, name: str, form: str, runs: tuple[Path, ...]) -> tuple[str, dict[str, Any]]:
    """A copy of the fitted store whose newest async calibration is fitted on `runs` in `form`."""
    store = work / name
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(fitted, store)
    truth = [a for run in runs for a in ("--ground-truth", str(run))]
    answer = dooly("calibrate", "--store", str(store), "--async-captures", form, *truth)
    calibration: dict[str, Any] = answer["calibrations"][0]
    return str(store), calibration


def find_async(store: str) -> Any:
    """The store's newest async calibration of the H100's `paged|sdpa` (a `Calibration`)."""
    from dooly.sim.calibration import find_calibration
    from dooly.store.backends import open_store

    found = find_calibration(open_store(store, create=False), platform=H100_PLATFORM, engine="transformers",
                             backend=f"paged|{BACKEND}", cuda_graphs=True, async_batching=True)
    if found is None:
        raise SystemExit(f"{store} holds no async calibration for {H100_PLATFORM}")
    return found


def store_calibration(store: str) -> dict[str, Any]:
    """The store's own async calibration, as the fitted store holds it, in `dooly calibrate`'s JSON terms."""
    found = find_async(store)
    return {"graph_capture_s": found.graph_capture_s, "graph_capture_per_layer_s": found.graph_capture_per_layer_s,
            "new_shape_eager_s": found.new_shape_eager_s, "input_copy_s": found.input_copy_s,
            "terms": {key: {"constant_s": term.constant_s} for key, term in found.terms.items()},
            "inputs": found.inputs}


def swapped(base: str, work: Path, name: str, part: str, committed: Any) -> str:
    """A copy of `base` whose newest async calibration is its own with the committed one's `part`
    (SWAPS) in its place."""
    from dataclasses import replace

    from dooly.sim.calibration import write_calibration
    from dooly.store.backends import open_store

    store = work / name
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(base, store)
    own = find_async(str(store))
    if part == CAPTURE_LINE:
        changed = replace(own, graph_capture_s=committed.graph_capture_s,
                          graph_capture_per_layer_s=committed.graph_capture_per_layer_s)
    else:
        changed = replace(own, terms={**own.terms, MIXED_PATH: committed.terms[MIXED_PATH]})
    write_calibration(open_store(str(store), create=False), changed)
    return str(store)


def fit_terms(calibration: dict[str, Any]) -> dict[str, Any]:
    capture, per_layer = calibration["graph_capture_s"] * MS, calibration["graph_capture_per_layer_s"] * MS
    return {"capture_ms": capture, "per_layer_ms": per_layer,
            "capture_at_ms": {str(n): capture + per_layer * n for n in LAYERS},
            "new_shape_eager_ms": calibration["new_shape_eager_s"] * MS, "input_copy_ms": calibration["input_copy_s"] * MS,
            "decode_constant_ms": calibration["terms"]["decode_graph"]["constant_s"] * MS}


def run_alone(fitted: str, run: Path) -> dict[str, Any]:
    """Part 1: one calib run's terms in each form (a dry run)."""
    row: dict[str, Any] = {"run": f"{run.parent.name}/{run.name}"}
    for form in FORMS:
        calibration = dooly("calibrate", "--store", fitted, "--dry-run", "--async-captures", form,
                            "--ground-truth", str(run))["calibrations"][0]
        row[form] = fit_terms(calibration)
        model = next(iter(calibration["fit"]["models"].values()))
        row["mean_host_ms"], row["steps"] = model["mean_host_ms"], model["steps"]
    return row


def judged(cell: AsyncCell, store: str) -> dict[str, Any]:
    """One cell validated against `store`: the four statistics' error and floor, MAPEs and verdict."""
    simulated = cell.cell()
    payload = validate(simulated, store)
    rows = rows_by_key(payload)
    row: dict[str, Any] = {"ttft_mape": payload["requests"]["ttft"]["mape"], "tpot_mape": payload["requests"]["tpot"]["mape"],
                           "verdict": verdict(simulated, payload), "calibration": payload.get("cpu_overhead")}
    for key in STATS:
        error, floor = rows[key]["error_pct"], rows[key]["floor_pct"]
        row[key] = {"error_pct": error, "floor_pct": floor,
                    "pass": error is not None and abs(error) <= max(SUMMARY_TARGET_PCT, floor or 0.0)}
    return row


def cell_text(row: dict[str, Any]) -> str:
    stats = " / ".join(f"{row[k]['error_pct']:+.1f}{'' if row[k]['pass'] else '*'}" for k in STATS)
    return f"{stats}; {row['ttft_mape']:.1f} / {row['tpot_mape']:.1f}; {'pass' if row['verdict'] == 'pass' else 'miss'}"


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {"cells": len(rows), "pass": sum(1 for r in rows if r["verdict"] == "pass"),
            "mean_abs_pct": statistics.fmean(abs(r[k]["error_pct"]) for r in rows for k in STATS),
            "mean_abs_ttft_mean_pct": statistics.fmean(abs(r["ttft_mean"]["error_pct"]) for r in rows),
            "ttft_mape": statistics.fmean(r["ttft_mape"] for r in rows),
            "tpot_mape": statistics.fmean(r["tpot_mape"] for r in rows)}


def summary_text(found: dict[str, float]) -> str:
    return (f"{found['pass']:.0f} of {found['cells']:.0f} | {found['mean_abs_pct']:.1f} | "
            f"{found['mean_abs_ttft_mean_pct']:.1f} | {found['ttft_mape']:.1f} / {found['tpot_mape']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fitted-store", required=True, help="A merged and fitted copy of data/h100/db (read only).")
    parser.add_argument("--work", type=Path, default=None, help="Where the calibrated copies go (default: a temporary dir).")
    parser.add_argument("--json", type=Path, default=None, help="Write every number here.")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="Capture forms to fit.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    work = args.work or Path(tempfile.mkdtemp(prefix="async-h100-"))
    work.mkdir(parents=True, exist_ok=True)
    log.info("calibrated copies of %s under %s", args.fitted_store, work)
    out: dict[str, Any] = {"runs": [], "fits": {}, "cells": [], "summary": {}}

    print("## Per calib run alone (ms; capture in each form, H: new-shape eager time of `split`)\n")
    print("| run | steps | mean host per step | decode constant | single: capture | split: capture | split: H | copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in (QWEN_CALIB, *(lease4_run(m) for m in LEASE4_MODELS)):
        row = run_alone(args.fitted_store, run)
        out["runs"].append(row)
        print(f"| {row['run']} | {row['steps']} | {row['mean_host_ms']:.2f} | {row['single']['decode_constant_ms']:.2f} | "
              f"{row['single']['capture_ms']:.1f} | {row['split']['capture_ms']:.1f} | "
              f"{row['split']['new_shape_eager_ms']:.1f} | {row['single']['input_copy_ms']:.2f} |")

    # (candidate, form, held-out model or "") -> store
    stores: dict[tuple[str, str, str], str] = {}
    print("\n## Fits (ms; capture = constant + per layer x L)\n")
    print("| candidate | form | runs | capture | per layer | at " + " / ".join(map(str, LAYERS)) + " layers | H | copy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for candidate in CANDIDATES:
        for form in args.forms:
            for left_out in ("", *candidate.lease4):
                runs = tuple(r for r in candidate.runs if not left_out or r != lease4_run(left_out))
                if candidate.name == COMMITTED and form == "single":
                    store, calibration = args.fitted_store, store_calibration(args.fitted_store)
                else:
                    name = f"{candidate.name}.{form}" + (f".without-{left_out}" if left_out else "")
                    store, calibration = calibrated_copy(args.fitted_store, work, name, form, runs)
                stores[(candidate.name, form, left_out)] = store
                terms = fit_terms(calibration)
                label = candidate.name + (f" without {left_out}" if left_out else "")
                out["fits"][f"{label}.{form}"] = {**terms, "runs": [str(r.relative_to(ROOT)) for r in runs]}
                print(f"| {label} | {form} | {len(runs)} | {terms['capture_ms']:.1f} | {terms['per_layer_ms']:.3f} | "
                      + " / ".join(f"{terms['capture_at_ms'][str(n)]:.1f}" for n in LAYERS)
                      + f" | {terms['new_shape_eager_ms']:.1f} | {terms['input_copy_ms']:.2f} |")

    cells = async_cells()
    for cell in cells:
        record: dict[str, Any] = {"cell": cell.name, "model": cell.model_dir, "source": cell.source,
                                  "runs": [str(r.relative_to(ROOT)) for r in cell.runs], "in_sample": {}, "held_out": {}}
        for candidate in CANDIDATES:
            for form in args.forms:
                label = f"{candidate.name} {form}"
                record["in_sample"][label] = judged(cell, stores[(candidate.name, form, "")])
                if cell.model_dir in candidate.lease4:
                    record["held_out"][label] = judged(cell, stores[(candidate.name, form, cell.model_dir)])
        out["cells"].append(record)

    columns = [(c.name, False) for c in CANDIDATES[:1]] + [(c.name, held) for c in CANDIDATES[1:] for held in (False, True)]
    for form in args.forms:
        print(f"\n## Cells, `{form}` (error %: mean TTFT / p90 TTFT / mean TPOT / p90 TPOT, * outside 8% and the floor; "
              "TTFT / TPOT MAPE %; issue #24's verdict)\n")
        print("| cell | floor (TTFT mean/p90, TPOT mean/p90) | "
              + " | ".join(f"{name}{', held out' if held else ''}" for name, held in columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        for record in out["cells"]:
            first = record["in_sample"][f"{COMMITTED} {form}"]
            floors = "/".join("-" if first[k]["floor_pct"] is None else f"{first[k]['floor_pct']:.0f}" for k in STATS)
            texts = []
            for name, held in columns:
                row = (record["held_out"] if held else record["in_sample"]).get(f"{name} {form}")
                texts.append("-" if row is None else cell_text(row))
            print(f"| {record['cell']} | {floors} | " + " | ".join(texts) + " |")

    print("\n## Per candidate (cells passing; mean absolute error of the four statistics, of the mean TTFT; "
          "mean TTFT / TPOT MAPE; %)\n")
    print("| candidate | form | cells | passing | abs err | abs TTFT-mean err | TTFT / TPOT MAPE |")
    print("|---|---|---|---:|---:|---:|---:|")
    views = (("every cell", lambda c: True, False),
             ("lease-4 models' cells, held out", lambda c: c["model"] in LEASE4_MODELS, True),
             ("the grid's cells (a lease of no calib run)", lambda c: c["source"] == GRID_SOURCE, False),
             ("the grid's cells, held out", lambda c: c["source"] == GRID_SOURCE, True))
    for candidate in CANDIDATES:
        for form in args.forms:
            label = f"{candidate.name} {form}"
            out["summary"][label] = {}
            for view, chosen, held in views:
                found = summary([c["held_out"].get(label, c["in_sample"][label]) if held else c["in_sample"][label]
                                 for c in out["cells"] if chosen(c)])
                out["summary"][label][view] = found
                print(f"| {candidate.name} | {form} | {view} | {summary_text(found)} |")
    if "single" in args.forms:
        committed = find_async(args.fitted_store)
        base = stores[(LEASE4, "single", "")]
        variants = [(LEASE4, base)]
        for part in SWAPS:
            label = f"{LEASE4} with {COMMITTED}'s {part if part == CAPTURE_LINE else f'`{part}` terms'}"
            variants.append((label, swapped(base, work, f"{LEASE4}.single.with-{COMMITTED}-{part.replace(' ', '-')}",
                                            part, committed)))
        variants.append((COMMITTED, args.fitted_store))
        print(f"\n## What moves between {COMMITTED} and {LEASE4} (`single`; error %: mean TTFT / mean TPOT; TTFT MAPE %)\n")
        print("| cell | " + " | ".join(label for label, _ in variants) + " |")
        print("|---|" + "---|" * len(variants))
        out["swaps"] = {}
        for cell in cells:
            texts = []
            for label, store in variants:
                row = judged(cell, store)
                out["swaps"].setdefault(cell.name, {})[label] = row
                texts.append(f"{row['ttft_mean']['error_pct']:+.1f} / {row['tpot_mean']['error_pct']:+.1f}; "
                             f"{row['ttft_mape']:.1f}")
            print(f"| {cell.name} | " + " | ".join(texts) + " |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
