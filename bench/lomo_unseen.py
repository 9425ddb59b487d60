"""Leave one model out, end to end: predict a suite model's served cells as if it were unseen.

For every model with committed ground truth (GROUND_TRUTH cells `<model>.<backend>.<variant>.<workload>`):
1. copy the fitted store without its models; remove from the snapshot every signature that only
   this model runs (the store's inventories tell which signatures each model runs; a signature
   another model also runs stays, since the database would hold it anyway), and the model's own
   inventories, so the commands trace it on the CPU like any model they have never seen;
2. refit that copy (`fit_store`, --repeats REPEATS; flex_attention rows dropped: no cell uses them);
3. validate its light and heavy cells of paged|sdpa and paged|eager, zero new profiling, and the
   same cells against the fully profiled store; record each held-out prediction's coverage
   (share of predicted device time from measured signatures, class regressors and fallbacks).
   The host overhead (`--host`):
     store  (default) the store's calibration, as for any model never run: each store copy's
            calibrations are refitted (`dooly calibrate`) from the calib runs of every model but
            the held-out one (the whole-store copy: from all of them), and `dooly validate` reads
            them with no --cpu-overhead. So the held-out model has neither kernels nor a
            calibration run of its own: the issue's unseen model, end to end.
     own    the model's own committed calibration run (VALIDATION/<model>.<backend>.<variant>
            .overhead.json, `dooly overhead`): device-time transfer alone.
`--keep-attention DESIGN` keeps the held-out model's own attention rows at that attention grid's
points (`dooly profile --attention-grid DESIGN`) and records their device-seconds against those of
every signature only it runs: what closing its attention gap costs, and buys.

    python bench/lomo_unseen.py --store FITTED_H100 --platform NVIDIA-H100-80GB-HBM3 --work /tmp/lomo \\
        --out data/h100/experiments/unseen --refit-full

Calib runs kept elsewhere than --ground-truth are named with --calib-runs (a directory of `*.calib`
runs, or one run; repeated). The H200 engine grid's round 1, with the calib runs the H200 store's
calibrations were fitted on (docs/calibration.md, "Across leases on the H200"; lease C's 1B async
run is not one of them):

    python bench/lomo_unseen.py --store FITTED_H200 --platform NVIDIA-H200 --work /tmp/lomo200 \\
        --out data/h200/experiments/unseen --ground-truth data/h200/experiments/engine_grid/r1 \\
        --calib-runs data/h200/groundtruth --calib-runs data/h200/experiments/engine_grid/calib_d \\
        --calib-runs data/h200/experiments/unseen_llama/calib_repeat/lease-b/r2 \\
        --calib-runs data/h200/experiments/unseen_llama/calib_repeat/lease-b/r3 \\
        --calib-runs data/h200/experiments/engine_grid/r1/Llama-3.2-1B.paged-eager.graphs.calib \\
        --calib-runs data/h200/experiments/engine_grid/r1/Llama-3.2-1B.paged-sdpa.default.calib \\
        --calib-runs data/h200/experiments/engine_grid/r1/Llama-3.2-1B.paged-sdpa.graphs.calib --refit-full

Stages are resumable: a held-out store already fitted is reused (`--stage fit` only fits,
`--stage validate` only validates what is fitted).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# validate_groundtruth lives with the report generators (reports/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reports"))

from validate_groundtruth import accuracy_fields, model_id, run_json  # noqa: E402

log = logging.getLogger("lomo_unseen")

GROUND_TRUTH = Path("data/h100/groundtruth")
VALIDATION = Path("data/h100/validation")
BACKENDS = ("paged-sdpa", "paged-eager")
WORKLOADS = ("light", "heavy")
# The backend no committed cell serves: left out of the held-out refits to save their time.
UNSERVED_BACKEND = "paged|flex_attention"
SNAPSHOT_DATA = "snapshots/gen-000001/data.parquet"
ATTENTION_OP = "attention"
CALIBRATIONS_DIR = "calibrations"
CALIBRATION_WORKLOAD = "calib"
HOST_SCHEMES = ("store", "own")
DEFAULT_REPEATS = 1
# Targets of issue #20 (percent): heavy cells' per-request MAPE, every cell's mean errors.
HEAVY_TTFT_MAPE = 5.0
HEAVY_TPOT_MAPE = 8.0
CELL_MEAN_ERROR = 8.0
# The coverage probe: the batch of a heavy decode step and of a prefill step.
COVERAGE_PROBE_DECODES = 64
COVERAGE_PROBE_CONTEXT = 1024
COVERAGE_PROBE_PREFILL = 2048
# The largest estimated operations kept per probe phase in lomo.json.
PROBE_ESTIMATED_ROWS = 5


def suite_cells(ground_truth: Path) -> dict[str, list[str]]:
    """Per model short name, the `<backend>.<variant>.<workload>` cells to validate."""
    cells: dict[str, list[str]] = defaultdict(list)
    for cell in sorted(p for p in ground_truth.iterdir() if (p / "requests.parquet").is_file()):
        short, backend, variant, workload = cell.name.rsplit(".", 3)
        if backend in BACKENDS and workload in WORKLOADS:
            cells[short].append(f"{backend}.{variant}.{workload}")
    return dict(cells)


FULL_REFIT = "_full"


def held_out_store(source: Path, work: Path, short: str, keep_attention: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A copy of SOURCE without fitted models, without the signatures only SHORT runs and
    without SHORT's inventories (SHORT = FULL_REFIT: nothing removed, the same refit of the whole
    store, the reference the held-out predictions are compared with). With `keep_attention` (an
    attention design, `dooly profile --attention-grid`), SHORT's own attention rows at that
    design's points stay: the model profiled with a thin attention grid and nothing else, whose
    device-seconds are the bill. Returns its path and what was removed."""
    import polars as pl

    from dooly.fit.persist import read_inventories
    from dooly.profile.grid import ATTENTION_DESIGNS, GridSpec, attention_points
    from dooly.store.backends import open_store

    target = work / short
    wanted = model_id(short).lower()
    inventories = read_inventories(open_store(str(source), create=False))
    held: set[str] = set()
    others: set[str] = set()
    held_keys: set[str] = set()
    for key, inventory in inventories.items():
        signatures = {op["signature"] for op in inventory["operations"]}
        if str(inventory.get("model_id", "")).lower() == wanted:
            held |= signatures
            held_keys.add(key.split("/", 1)[0])
        else:
            others |= signatures
    if not held_keys and short != FULL_REFIT:
        raise SystemExit(f"no inventory of {model_id(short)} in {source}")
    only = held - others
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("models"))
    for key in held_keys:
        shutil.rmtree(target / "inventories" / key)
    frame = pl.read_parquet(source / SNAPSHOT_DATA)
    own = pl.col("signature").is_in(sorted(only))
    probe = pl.lit(False)
    if keep_attention:
        keys = sorted({point.key for point in attention_points(GridSpec(attention=ATTENTION_DESIGNS[keep_attention]))})
        probe = own & (pl.col("op") == ATTENTION_OP) & pl.col("point_key").is_in(keys)
    kept = frame.filter((~own | probe) & (pl.col("backend") != UNSERVED_BACKEND))
    kept.write_parquet(target / SNAPSHOT_DATA)
    removed = {"signatures_run": len(held), "signatures_removed": len(only),
               "rows_removed": frame.filter(own & ~probe).height,
               "inventories_removed": sorted(held_keys), "keep_attention": keep_attention,
               "own_device_seconds": float(frame.filter(own & (pl.col("backend") != UNSERVED_BACKEND))["device_seconds"].sum()),
               "kept_device_seconds": float(frame.filter(probe & (pl.col("backend") != UNSERVED_BACKEND))["device_seconds"].sum())}
    (target / "lomo.json").write_text(json.dumps(removed, indent=1) + "\n")
    return target, removed


def fit_held_out(store: Path, repeats: int) -> None:
    from dooly.fit.persist import fit_store
    from dooly.store.backends import open_store

    fit_store(open_store(str(store), create=False), repeats=repeats)


def calib_runs(sources: list[Path], held_out: str) -> list[Path]:
    """The committed calibration runs of every model but HELD_OUT (FULL_REFIT: of every model).
    Each source is a calib run (`<model>.<backend>.<variant>.calib`) or a directory of them."""
    found = []
    for source in sources:
        runs = [source] if source.name.endswith(f".{CALIBRATION_WORKLOAD}") else sorted(
            source.glob(f"*.{CALIBRATION_WORKLOAD}"))
        found += [p for p in runs if (p / "requests.parquet").is_file() and p.name.rsplit(".", 3)[0] != held_out]
    return found


def calibrate_store(store: Path, runs: list[Path]) -> dict[str, Any]:
    """Replace the store copy's host-overhead calibrations by those `dooly calibrate` fits on RUNS
    against the copy's own fitted models (what the merge Job does with the runs it holds)."""
    from dooly.sim.calibration_commands import calibrate_command

    shutil.rmtree(store / CALIBRATIONS_DIR, ignore_errors=True)
    argv = ["--store", str(store), *[a for run in runs for a in ("--ground-truth", str(run))]]
    return run_json(calibrate_command, argv)


def coverage_probe(store: str, platform: str, backend: str, model: str) -> dict[str, Any]:
    """Coverage of a decode step and of a prefill step of MODEL (share of predicted device time
    that is measured / class-estimated / fallback-estimated)."""
    from dooly.fit.source import FittedSource, open_fitted_step

    step = open_fitted_step(FittedSource(store=store, platform=platform, backend=backend), model).step
    decode = [COVERAGE_PROBE_CONTEXT] * COVERAGE_PROBE_DECODES
    out = {}
    for phase, coverage in (("decode", step.coverage([], decode)),
                            ("prefill", step.coverage([(COVERAGE_PROBE_PREFILL, 0)], []))):
        payload = coverage.to_dict()
        out[phase] = {**payload, "estimated": payload["estimated"][:PROBE_ESTIMATED_ROWS]}
    return out


def own_calibration(validation: Path, short: str, backend_name: str, variant: str) -> Path | None:
    """The model's own committed overhead calibration for a cell (its variant's, else its graphs one)."""
    for candidate in (variant, "graphs"):
        path = validation / f"{short}.{backend_name}.{candidate}.overhead.json"
        if path.is_file():
            return path
    return None


def validate_cells(store: str, platform: str, short: str, cells: list[str], ground_truth: Path,
                   validation: Path, host: str) -> list[dict[str, Any]]:
    from dooly.sim.commands import validate_command

    rows = []
    model = model_id(short)
    for cell in cells:
        backend_name, variant, workload = cell.split(".")
        overhead: list[str] = []
        calibration = "store"
        if host == "own":
            own = own_calibration(validation, short, backend_name, variant)
            if own is None:
                log.warning("%s %s: no committed calibration, skipped", short, cell)
                continue
            overhead, calibration = ["--cpu-overhead", str(own)], own.name
        backend = backend_name.replace("-", "|", 1)
        report = run_json(validate_command, [
            model, "--ground-truth", str(ground_truth / f"{short}.{cell}"), *overhead,
            "--store", store, "--platform", platform, "--backend", backend])
        if host == "store":
            calibration = str(report.get("cpu_overhead", "store"))
        rows.append({"model": short, "backend": backend, "variant": variant, "workload": workload,
                     "calibration": calibration, **accuracy_fields(report["requests"], report["distribution"]),
                     "cell_coverage": {phase: {k: v for k, v in c.items() if k != "estimated"}
                                       for phase, c in (report.get("coverage") or {}).items()}})
    return rows


def verdict(row: dict[str, Any]) -> bool:
    """The issue's targets for one cell: heavy per-request MAPE, and every cell's mean errors."""
    ok = abs(row["ttft_mean_error_pct"]) <= CELL_MEAN_ERROR and abs(row["tpot_mean_error_pct"]) <= CELL_MEAN_ERROR
    if row["workload"] == "heavy":
        ok = ok and row["ttft_mape"] <= HEAVY_TTFT_MAPE and row["tpot_mape"] <= HEAVY_TPOT_MAPE
    return ok


def _measured_share(coverage: dict[str, Any]) -> str:
    """The measured share of a cell's predicted device time, over all its simulated steps."""
    total = sum(c["device_seconds"] for c in coverage.values())
    if not total:
        return "-"
    measured = sum(c["device_seconds"] * c["measured_share"] for c in coverage.values())
    return f"{100 * measured / total:.1f}%"


HOST_LINES = {
    "store": "Host overhead: the store's calibration, refitted without any calibration run of the held-out model "
             "(the whole-store column: from every model's runs).",
    "own": "Host overhead: the model's own committed calibration run (`dooly overhead`), both columns; only the "
           "kernels are held out.",
}


def table(rows: list[dict[str, Any]], host: str) -> list[str]:
    kept = {r.get("removed", {}).get("keep_attention") for r in rows} - {None}
    head = [HOST_LINES[host]]
    if kept:
        head.append(f"Kept: the held-out model's own attention rows at the `{', '.join(sorted(kept))}` attention grid's "
                    "points (`dooly profile --attention-grid`); its other own signatures held out.")
    lines = [*head, "", "| model | backend | settings | workload | TTFT MAPE held-out (full) | TPOT MAPE held-out (full) | "
             "mean TTFT err held-out (full) | mean TPOT err held-out (full) | measured share of device time | "
             "targets |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        f = r["full"]
        cov = r.get("cell_coverage") or {}
        share = _measured_share(cov)
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['variant']} | {r['workload']} | "
            f"{r['ttft_mape']:.1f}% ({f['ttft_mape']:.1f}%) | {r['tpot_mape']:.1f}% ({f['tpot_mape']:.1f}%) | "
            f"{r['ttft_mean_error_pct']:+.1f}% ({f['ttft_mean_error_pct']:+.1f}%) | "
            f"{r['tpot_mean_error_pct']:+.1f}% ({f['tpot_mean_error_pct']:+.1f}%) | {share} | "
            f"{'met' if verdict(r) else 'MISSED'} |")
    met = sum(1 for r in rows if verdict(r))
    met_full = sum(1 for r in rows if verdict({**r["full"], "workload": r["workload"]}))
    lines += ["", f"{met} of {len(rows)} cells meet the targets held out ({met_full} with the whole store) (heavy: TTFT MAPE <= {HEAVY_TTFT_MAPE:.0f}%, "
              f"TPOT MAPE <= {HEAVY_TPOT_MAPE:.0f}%; every cell: |mean TTFT err|, |mean TPOT err| <= "
              f"{CELL_MEAN_ERROR:.0f}%)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path, help="The fully profiled, fitted store (not modified).")
    parser.add_argument("--platform", required=True)
    parser.add_argument("--work", required=True, type=Path, help="Where the held-out store copies go.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--ground-truth", type=Path, default=GROUND_TRUTH)
    parser.add_argument("--validation", type=Path, default=VALIDATION)
    parser.add_argument("--calib-runs", type=Path, action="append",
                        help="Where the calib runs the store calibrations are refitted from live (--host store): a "
                             "directory of `*.calib` runs or one run; repeat the flag (default: --ground-truth).")
    parser.add_argument("--models", nargs="*", help="Short names (default: every model with ground truth).")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--stage", choices=("all", "fit", "validate", "table"), default="all",
                        help="table: rebuild lomo.md from the per-model results under --out.")
    parser.add_argument("--host", choices=HOST_SCHEMES, default=HOST_SCHEMES[0],
                        help="Host overhead of the validated cells: the store's calibration fitted without the "
                             "held-out model's runs (store), or the model's own committed calibration (own).")
    parser.add_argument("--keep-attention", choices=("thin-mixed", "thin-all", "full"),
                        help="Keep the held-out model's own attention rows at this design's points (dooly profile "
                             "--attention-grid): the model profiled for its attention alone, the rest held out.")
    parser.add_argument("--refit-full", action="store_true",
                        help="Compare with a refit of the whole store made the same way (work/_full), not with --store's models.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    logging.getLogger("dooly.fit").setLevel(logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cells = suite_cells(args.ground_truth)
    calib_sources = args.calib_runs or [args.ground_truth]
    shorts = args.models or sorted(cells)
    full_store = args.work / FULL_REFIT if args.refit_full else args.store
    if args.stage in ("all", "fit"):
        for short in [FULL_REFIT, *shorts] if args.refit_full else shorts:
            target = args.work / short
            if (target / "models").is_dir():
                log.info("%s: held-out store already fitted", short)
                continue
            target, removed = held_out_store(args.store, args.work, short, None if short == FULL_REFIT else args.keep_attention)
            log.info("%s: %d of its %d signatures removed (%d rows); refitting", short,
                     removed["signatures_removed"], removed["signatures_run"], removed["rows_removed"])
            fit_held_out(target, args.repeats)
    if args.stage == "fit":
        return
    full_calibrated = False
    for short in shorts if args.stage != "table" else []:
        rows: list[dict[str, Any]] = []
        target = args.work / short
        if not (target / "models").is_dir():
            log.warning("%s: no fitted held-out store, skipped", short)
            continue
        removed = json.loads((target / "lomo.json").read_text())
        if args.host == "store":
            calibrated = calibrate_store(target, calib_runs(calib_sources, short))
            log.info("%s: store calibrations refitted without its runs (%d keys)", short, len(calibrated.get("calibrations", [])))
            if args.refit_full and not full_calibrated:
                calibrate_store(full_store, calib_runs(calib_sources, FULL_REFIT))
                full_calibrated = True
        held = validate_cells(str(target), args.platform, short, cells[short], args.ground_truth, args.validation, args.host)
        full = validate_cells(str(full_store), args.platform, short, cells[short], args.ground_truth, args.validation,
                              args.host)
        coverage = {b: coverage_probe(str(target), args.platform, b, model_id(short)) for b in {r["backend"] for r in held}}
        for h, f in zip(held, full, strict=True):
            rows.append({**h, "full": f, "removed": removed, "coverage": coverage[h["backend"]]})
            log.info("%s %s %s %s: held-out TTFT %.1f%% TPOT %.1f%% (full %.1f%% / %.1f%%)", short, h["backend"],
                     h["variant"], h["workload"], h["ttft_mape"], h["tpot_mape"], f["ttft_mape"], f["tpot_mape"])
        (args.out / short).mkdir(exist_ok=True)
        (args.out / short / "lomo.json").write_text(json.dumps(rows, indent=1) + "\n")
    rows = [row for path in sorted(args.out.glob("*/lomo.json")) for row in json.loads(path.read_text())]
    (args.out / "lomo.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = table(rows, args.host)
    (args.out / "lomo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
