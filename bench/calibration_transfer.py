"""Does a platform's shared host-overhead calibration serve a model it was not fitted on?

Two analyses of the committed ground truth (docs/calibration.md quotes their tables):

1. Leave one model out. For every validated cell of model M (as bench/validate_groundtruth.py
   validates them: light and heavy workloads), TTFT/TPOT MAPE and the signed error of the mean TTFT
   and TPOT with three host-overhead models:
     own     M's own calibration (`dooly overhead` on M's calib run: what accuracy.json holds);
     shared  the platform calibration (`dooly calibrate`) fitted on every calib run of that key;
     lomo    the same calibration fitted without any run of M: what a never-run model gets.
2. Stability. Calib runs of one cell recorded on two device leases (data/h100/experiments/host_cost
   against data/h100/groundtruth), fitted with the per-model solver (`CpuOverheadModel.fit`) and the
   shared solver (`dooly.sim.calibration.fit_path_terms`): the terms, and the host time each predicts
   for a reference decode and mixed step, per lease.

    python bench/calibration_transfer.py --fitted-h100 FITTED_H100_STORE --out data/h100/experiments/calibration_transfer

`--kv-regressors tokens` fits the shared calibrations with the KV form of those before the cache
layer-group terms (lab/host_kv_groups.py compares the two).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from validate_groundtruth import CALIBRATION_WORKLOAD, accuracy_fields, calibration_cell, mean_abs, pct, signed_pct

from dooly.sim.calibration import (
    DEFAULT_KV_REGRESSORS,
    KV_REGRESSORS,
    CacheGroups,
    Calibration,
    HostSample,
    fit_calibration,
    fit_path_terms,
)
from dooly.sim.calibration_commands import CalibrationRun, pool_samples, run_samples
from dooly.sim.step_model import CpuOverheadModel, StepKind, StepPath
from dooly.sim.validate import load_ground_truth, validate

log = logging.getLogger("calibration_transfer")

ROOT = Path(__file__).resolve().parent.parent
H100_TRUTH = ROOT / "data" / "h100" / "groundtruth"
H100_REPEAT = ROOT / "data" / "h100" / "experiments" / "host_cost" / "groundtruth"
H200_TRUTH = ROOT / "data" / "h200" / "groundtruth"
# Repeats of no-graph cells (three runs each, plus the committed run): their steps, fitted like a
# calibration run, show whether the eager paths' terms hold still between runs.
EAGER_REPEATS = (ROOT / "data" / "h100" / "experiments" / "eager_repeat", ROOT / "data" / "h100" / "experiments" / "sdpa_repeat")
SCHEMES = ("own", "shared", "lomo")
# Reference steps for the stability table: 32 decodes at 1,000 tokens of context each, and a
# chunked-prefill step of 2,048 query tokens beside 16 decodes (about 40,000 KV tokens read).
REFERENCE_STEPS = {
    "decode": (32, 32, 32 * 1001),
    "mixed": (17, 2048, 40_000),
}
MS = 1e3


def _cells(truth_dir: Path) -> dict[tuple[str, str, str], list[str]]:
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for cell in sorted(p for p in truth_dir.iterdir() if (p / "requests.parquet").is_file()):
        short, backend, variant, workload = cell.name.rsplit(".", 3)
        groups[(short, backend, variant)].append(workload)
    return groups


def own_overhead(samples: list[HostSample], captures: list[tuple[HostSample, Any]], source: str) -> CpuOverheadModel:
    """M's own calibration, exactly as `dooly overhead` fits it (calibrate_overhead)."""
    import numpy as np

    fitted = CpuOverheadModel.fit([(s.key, s.num_seqs, s.num_tokens, s.kv_tokens, s.host_s) for s in samples], source=source)
    if captures:
        excess = [s.host_s - fitted.seconds(path, s.num_seqs, s.num_tokens, s.kv_tokens) for s, path in captures]
        fitted.graph_capture_s = max(float(np.median(excess)), 0.0)
    return fitted


def leave_one_out(truth_dir: Path, fitted_store: str, kv_regressors: str = DEFAULT_KV_REGRESSORS) -> list[dict[str, Any]]:
    """One row per (validated cell, scheme)."""
    runs = {p.name: CalibrationRun.load(p) for p in sorted(truth_dir.glob(f"*.{CALIBRATION_WORKLOAD}"))
            if (p / "requests.parquet").is_file()}
    cache: dict[tuple[str, ...], Any] = {}
    measured = {name: run_samples(run, fitted_store, cache) for name, run in runs.items()}
    rows = []
    for (short, backend_name, variant), workloads in sorted(_cells(truth_dir).items()):
        calibration = calibration_cell(truth_dir, short, backend_name, variant)
        if calibration is None:
            continue
        run = runs[calibration]
        same_key = [name for name, other in runs.items() if other.key == run.key]
        others = [name for name in same_key if runs[name].model != run.model]
        samples, captures, layers = measured[calibration]
        groups = CacheGroups.from_scheduler(run.scheduler())
        overheads: dict[str, CpuOverheadModel | None] = {"own": own_overhead(samples, captures, calibration)}
        overheads["shared"] = _shared(run, same_key, measured, runs, kv_regressors).for_model(layers, run.model, groups)
        overheads["lomo"] = (_shared(run, others, measured, runs, kv_regressors).for_model(layers, run.model, groups)
                             if others else None)
        step_model = cache[next(k for k in cache if k[1] == run.model and k[3] == run.key.backend)][0]
        for workload in sorted(w for w in workloads if w != CALIBRATION_WORKLOAD):
            cell_dir = truth_dir / f"{short}.{backend_name}.{variant}.{workload}"
            truth = load_ground_truth(cell_dir)
            cell_run = CalibrationRun.load(cell_dir)
            for scheme, overhead in overheads.items():
                row: dict[str, Any] = {"model": short, "backend": run.key.backend, "variant": variant, "workload": workload,
                                       "scheme": scheme, "calibration_models": _models(run, scheme, same_key, others, runs)}
                if overhead is not None:
                    report = validate(truth, cell_run.scheduler(), step_model, overhead)
                    row.update(accuracy_fields(report.as_dict()["requests"], report.as_dict()["distribution"]))
                rows.append(row)
                log.info("%s %s %s %s %s: TTFT %s TPOT %s", short, backend_name, variant, workload, scheme,
                         pct(row.get("ttft_mape")), pct(row.get("tpot_mape")))
    return rows


def _models(run: CalibrationRun, scheme: str, same_key: list[str], others: list[str], runs: dict[str, CalibrationRun]) -> int:
    if scheme == "own":
        return 1
    return len({runs[name].model for name in (same_key if scheme == "shared" else others)})


def _shared(run: CalibrationRun, names: list[str], measured: dict[str, Any], runs: dict[str, CalibrationRun],
            kv_regressors: str) -> Calibration:
    """What `dooly calibrate` fits on these runs (calibrate_runs, without re-reading them)."""
    samples, captures = pool_samples([(runs[name].warm, *measured[name][:2]) for name in names])
    return fit_calibration(run.key, samples, captures, inputs=[{"run": name} for name in names], kv_regressors=kv_regressors)


def repeat_groups() -> dict[str, list[tuple[str, Path]]]:
    """cell -> [(label, run directory)]: the warm calib runs of two leases, and the repeated
    no-graph heavy and light cells (each beside its committed run)."""
    groups: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for first in sorted(H100_REPEAT.glob(f"*.{CALIBRATION_WORKLOAD}")):
        second = H100_TRUTH / first.name
        if (second / "requests.parquet").is_file():
            groups[first.name] += [("lease 1", first), ("lease 2", second)]
    for root in EAGER_REPEATS:
        for run_dir in sorted(root.glob("*")):
            for cell in sorted(p for p in run_dir.glob("*.default.*") if (p / "steps.parquet").is_file()):
                groups[cell.name].append((run_dir.name, cell))
    for name in list(groups):
        committed = H100_TRUTH / name
        if not name.endswith(CALIBRATION_WORKLOAD) and (committed / "steps.parquet").is_file():
            groups[name].append(("committed", committed))
    return groups


def stability(fitted_store: str, kv_regressors: str = DEFAULT_KV_REGRESSORS) -> list[dict[str, Any]]:
    """Per repeated cell and run: each solver's terms and reference-step host ms, per path."""
    rows = []
    cache: dict[tuple[str, ...], Any] = {}
    for cell, members in sorted(repeat_groups().items()):
        for lease, directory in members:
            run = CalibrationRun.load(directory)
            samples, captures, layers = run_samples(run, fitted_store, cache)
            per_model = own_overhead(samples, captures, directory.name)
            shared = fit_path_terms(samples, kv_regressors=kv_regressors)
            groups = CacheGroups.from_scheduler(run.scheduler())
            graphs = run.key.cuda_graphs
            for key in ("decode_graph", "mixed_graph") if graphs else ("decode", "mixed"):
                kind = StepKind(key.removesuffix("_graph"))
                sizes = REFERENCE_STEPS[kind.value]
                path = StepPath(kind, cuda_graph=graphs)
                old = per_model.terms.get(key)
                new = shared.get(key)
                rows.append({
                    "cell": cell, "lease": lease, "path": key, "steps": sum(1 for s in samples if s.key == key),
                    "per_model_terms": asdict(old) if old else None,
                    "shared_solver_terms": asdict(new.for_layers(layers, groups)) if new else None,
                    "per_model_reference_ms": MS * per_model.seconds(path, *sizes),
                    "shared_solver_reference_ms": MS * (new or shared["default"]).for_layers(layers, groups).seconds(*sizes),
                })
    return rows


def transfer_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | backend | settings | workload | own TTFT / TPOT MAPE | shared | leave-one-out | "
             "own mean TTFT / TPOT err | shared | leave-one-out |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    by_cell: dict[tuple[str, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_cell[(r["model"], r["backend"], r["variant"], r["workload"])][r["scheme"]] = r

    def mape(r: dict[str, Any] | None) -> str:
        return "-" if not r or r.get("ttft_mape") is None else f"{pct(r['ttft_mape'])} / {pct(r['tpot_mape'])}"

    def mean(r: dict[str, Any] | None) -> str:
        return "-" if not r or r.get("ttft_mape") is None else (
            f"{signed_pct(r['ttft_mean_error_pct'])} / {signed_pct(r['tpot_mean_error_pct'])}")

    for cell, schemes in sorted(by_cell.items()):
        lines.append(f"| {' | '.join(cell)} | " + " | ".join(mape(schemes.get(s)) for s in SCHEMES) + " | "
                     + " | ".join(mean(schemes.get(s)) for s in SCHEMES) + " |")
    summary = []
    for scheme in SCHEMES:
        part = [r for r in rows if r["scheme"] == scheme and r.get("ttft_mape") is not None]
        if part:
            summary.append(f"{scheme}: {len(part)} cells, mean TTFT MAPE {pct(mean_abs(part, 'ttft_mape'))}, "
                           f"TPOT MAPE {pct(mean_abs(part, 'tpot_mape'))}, mean |mean TTFT err| "
                           f"{pct(mean_abs(part, 'ttft_mean_error_pct'))}, |mean TPOT err| {pct(mean_abs(part, 'tpot_mean_error_pct'))}")
    return lines + [""] + summary


def stability_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| cell | path | run | steps | per-model: constant ms, per token us, per KV ns | ref. step ms | "
             "shared solver: constant ms, per token us, per KV ns | ref. step ms |", "|---|---|---|---:|---|---:|---|---:|"]

    def terms(t: dict[str, float] | None) -> str:
        if not t:
            return "-"
        return f"{t['constant_s'] * MS:.2f}, {t['per_token_s'] * 1e6:.2f}, {t['per_kv_token_s'] * 1e9:.1f}"

    for r in rows:
        lines.append(f"| {r['cell']} | {r['path']} | {r['lease']} | {r['steps']} | {terms(r['per_model_terms'])} | "
                     f"{r['per_model_reference_ms']:.2f} | {terms(r['shared_solver_terms'])} | {r['shared_solver_reference_ms']:.2f} |")
    return lines + ["", *spread_lines(rows)]


def spread_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per (cell, path): the range across runs of the constant and of the reference step, per solver."""
    lines = ["| cell | path | runs | per-model constant ms (min-max) | ref. ms (min-max) | shared solver constant ms | ref. ms |",
             "|---|---|---:|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["cell"], r["path"])].append(r)

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}" if values else "-"

    for (cell, path), part in sorted(groups.items()):
        old_const = [MS * r["per_model_terms"]["constant_s"] for r in part if r["per_model_terms"]]
        new_const = [MS * r["shared_solver_terms"]["constant_s"] for r in part if r["shared_solver_terms"]]
        lines.append(f"| {cell} | {path} | {len(part)} | {span(old_const)} | {span([r['per_model_reference_ms'] for r in part])} | "
                     f"{span(new_const)} | {span([r['shared_solver_reference_ms'] for r in part])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fitted-h100", required=True, help="The H100 store, merged and fitted.")
    parser.add_argument("--fitted-h200", help="The H200 store, merged and fitted (one model per key: no leave-one-out).")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kv-regressors", choices=list(KV_REGRESSORS), default=DEFAULT_KV_REGRESSORS,
                        help="The shared calibrations' KV form (dooly calibrate --kv-regressors).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = leave_one_out(H100_TRUTH, args.fitted_h100, args.kv_regressors)
    if args.fitted_h200:
        rows += leave_one_out(H200_TRUTH, args.fitted_h200, args.kv_regressors)
    repeat = stability(args.fitted_h100, args.kv_regressors)
    (args.out / "transfer.json").write_text(json.dumps({"leave_one_out": rows, "stability": repeat}, indent=2) + "\n")
    lines = ["## Leave one model out", "", *transfer_table(rows), "", "## Two leases, one cell", "", *stability_table(repeat)]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
