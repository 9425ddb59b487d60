"""Where does the `paged|sdpa` no-graph path's light-load miss come from? (CPU, seconds on a fitted store.)

Issue #24 / #20: with the whole H100 store, the no-graph ("default") cells of `paged|sdpa` are
predicted 22-27% fast at light load for Llama-3.2-1B and -3B and 4-17% slow for Llama-3.1-8B,
while a re-run of the same 1B cell on another session (engine_grid r1/r2) validates within 9%.
This script takes every committed no-graph `paged|sdpa` run of the H100 (the groundtruth cells and
calib runs, experiments/repeat, sdpa_repeat r1-r3 and engine_grid r1/r2) and splits each step's
wall time into the device time the store's fitted kernels predict for that batch and the rest (the
"host residual" the calibration models: `dooly.sim.validate.host_samples`), per step class
(prefill, mixed, decode by batch size), beside what the store's calibration charges.

Tables (markdown on stdout; with --out also README.md and nograph_light.json, per run and class):

1. Per run: session (runs started within SESSION_GAP_S of each other), steps, and per class the
   mean wall, predicted device and host residual; the calibration's host charge; and the bench
   probe's own split (the forward's device span, which without graphs holds every host stall
   inside the forward, against prepare + update).
2. Per model and session: the mean host residual of small decode steps (1-16 sequences, where a
   light cell spends its time), to tell a per-model term from a per-session one.
3. Steps whose attention shape (query tokens, KV tokens read) was already seen in the run against
   first-seen shapes: without graphs `paged|sdpa` builds a cuDNN plan per new shape (docs/findings.md).
4. Regimes: a run's host residual per step sits for seconds at a time near one of two levels
   (histogram modes ~57 and ~86 ms, a tail to 150 ms). Per model, the median residual of decode
   steps (up to 64 sequences) below and above SLOW_REGIME_MS, and the share above it.
5. Every light and heavy run validated (`dooly.sim.validate.validate`) with the store's
   calibration: mean TTFT / TPOT error beside the run's host residual against the calibration's
   charge and its share of slow-regime steps; the correlation of the two errors over the runs.
6. A candidate term, tried and not adopted: a launch floor. Without graphs the host launches every
   kernel of every layer while the device runs them, so a step cannot take less than the launches
   (about 1.1 ms per layer: the steps of an already-seen shape take 20.6 ms on 1B, 36.9 on 3B, 38.2
   on 8B). host = constant (per kind) + per token * T + max(floor_per_layer * L - D, 0), D the
   predicted device time, fitted on the four calib runs of the calibration's session (floor by
   grid search, the rest by NNLS), against the same without the floor; each model left out in
   turn (mean host residual of its calib run, as `choose_layer_terms` scores), and every run's
   mean host residual predicted by the fit on all four.
7. Control: the same Llama-3.2-1B light cell served with cuDNN SDPA disabled (session S1,
   experiments/nocudnn...): its step wall times against the cuDNN runs' of that cell.

    python lab/nograph_light.py --fitted-store FITTED_H100_STORE [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dooly.sim.calibration import CacheGroups, Calibration, find_calibration
from dooly.sim.calibration_commands import CalibrationRun, run_samples
from dooly.sim.step_model import device_seconds, step_keywords
from dooly.sim.validate import load_ground_truth, validate
from dooly.store.backends import open_store

log = logging.getLogger("nograph_light")

ROOT = Path(__file__).resolve().parent.parent
H100 = ROOT / "data" / "h100"
RUN_GLOBS = ("groundtruth/*.paged-sdpa.default.*", "experiments/repeat/*.paged-sdpa.default.*",
             "experiments/sdpa_repeat/default-r*/*.paged-sdpa.default.*",
             "experiments/engine_grid/r*/*.paged-sdpa.default.*")
# Runs started within this many seconds of the previous one belong to one session (one lease as
# far as the records tell: none of these runs records its host).
SESSION_GAP_S = 3600.0
MS_PER_S = 1e3
# Decode batch-size classes (upper bounds, inclusive).
DECODE_CLASSES = ((4, "decode 1-4"), (16, "decode 5-16"), (64, "decode 17-64"), (10**9, "decode 65+"))
SMALL_DECODE_MAX = 16
# Decode steps of up to this many sequences are the regime table's (a light cell's steps).
REGIME_DECODE_MAX = 64
# The valley between the two modes of the host residual per decode step over every run (ms).
SLOW_REGIME_MS = 72.5
PERCENT = 100.0
PERCENT_POINTS = 100
VALIDATED_WORKLOADS = ("light", "heavy")
# Launch-floor candidate: grid (ms per layer) searched for the floor.
FLOOR_GRID_MS = tuple(step / 20 for step in range(0, 61))
CALIB_RUNS_PREFIX = "groundtruth/"
CALIB_WORKLOAD = "calib"
NO_CUDNN_RUN = "experiments/nocudnn.Llama-3.2-1B.paged-sdpa.default.light"
CONTROL_PERCENTILES = (10, 50, 90)
CLASS_ORDER = ("prefill", "mixed", *(name for _, name in DECODE_CLASSES))


def step_class(prefill: list[tuple[int, int]], decode_ctx: list[int]) -> str:
    if prefill:
        return "mixed" if decode_ctx else "prefill"
    return next(name for bound, name in DECODE_CLASSES if len(decode_ctx) <= bound)


@dataclass
class StepRow:
    cls: str
    layers: int
    seqs: int
    tokens: int
    kv: int
    shape_seen: bool  # the step's (query tokens, KV tokens read) appeared earlier in the run
    wall_ms: float
    device_pred_ms: float
    host_residual_ms: float
    host_calibration_ms: float
    probe_device_ms: float  # steps.parquet device_s: the forward's span on the device, launch gaps included
    probe_host_ms: float  # steps.parquet prepare_s + update_s: the host work outside the forward


def run_rows(run: CalibrationRun, fitted_store: str, cache: dict[tuple[str, ...], Any],
             calibration: Calibration) -> list[StepRow]:
    """Every step of the run: wall, predicted device, host residual, the calibration's host charge."""
    _, _, layers = run_samples(run, fitted_store, cache)
    step_model = next(v[0] for k, v in cache.items() if k[1] == run.model and k[3] == run.key.backend)
    keywords = step_keywords(step_model)
    scheduler = run.scheduler()
    overhead = calibration.for_model(layers, run.model, CacheGroups.from_scheduler(scheduler))
    rows = []
    seen: set[tuple[int, int]] = set()
    for step in load_ground_truth(run.directory).steps:
        path = scheduler.path_for(step.prefill, step.decode_ctx)
        device = float(device_seconds(step_model, step.prefill, step.decode_ctx, path, keywords))
        seqs, tokens, kv = step.sizes()
        shape = (tokens, kv)
        rows.append(StepRow(step_class(step.prefill, step.decode_ctx), layers, seqs, tokens, kv, shape in seen,
                            MS_PER_S * step.duration_s, MS_PER_S * device, MS_PER_S * (step.duration_s - device),
                            MS_PER_S * overhead.seconds(path, seqs, tokens, kv), MS_PER_S * step.device_s,
                            MS_PER_S * (step.prepare_s + step.update_s)))
        seen.add(shape)
    return rows


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def sessions(starts: dict[str, float]) -> dict[str, str]:
    """Session label per run: runs sorted by start, a new session after a SESSION_GAP_S gap."""
    labels: dict[str, str] = {}
    previous = None
    index = 0
    for name, start in sorted(starts.items(), key=lambda item: item[1]):
        if previous is None or start - previous > SESSION_GAP_S:
            index += 1
        labels[name] = f"S{index}"
        previous = start
    return labels


def _kind(cls: str) -> str:
    return "decode" if cls.startswith("decode") else cls


def _floor(row: StepRow, floor_ms: float) -> float:
    return max(floor_ms * row.layers - row.device_pred_ms, 0.0)


def fit_floor(rows: list[StepRow], floor_ms: float) -> tuple[list[float], float]:
    """NNLS of host residual minus the floor's part on (decode, mixed, prefill constants, tokens):
    the coefficients and the sum of squared residuals."""
    import numpy as np
    from scipy.optimize import nnls

    kinds = ("decode", "mixed", "prefill")
    design = np.array([[float(_kind(r.cls) == k) for k in kinds] + [float(r.tokens)] for r in rows])
    target = np.array([r.host_residual_ms - _floor(r, floor_ms) for r in rows])
    scale = np.maximum(design.max(axis=0), 1e-12)
    coef, _ = nnls(design / scale, target)
    coef = coef / scale
    return [float(c) for c in coef], float(((design @ coef - target) ** 2).sum())


def predict_floor(coef: list[float], floor_ms: float, rows: list[StepRow]) -> float:
    """Mean predicted host residual of the rows."""
    kinds = ("decode", "mixed", "prefill")
    return mean([coef[kinds.index(_kind(r.cls))] + coef[-1] * r.tokens + _floor(r, floor_ms) for r in rows])


def best_floor(rows: list[StepRow]) -> float:
    return min(FLOOR_GRID_MS, key=lambda f: fit_floor(rows, f)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fitted-store", required=True, help="The H100 store, merged and fitted (its calibration is used).")
    parser.add_argument("--out", type=Path, help="Write nograph_light.json here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    logging.getLogger("dooly").setLevel(logging.WARNING)  # the simulator logs every simulated run
    directories = sorted({d for pattern in RUN_GLOBS for d in H100.glob(pattern) if (d / "steps.parquet").is_file()})
    runs = {str(d.relative_to(H100)): CalibrationRun.load(d, str(d.relative_to(H100))) for d in directories}
    starts = {name: float(json.loads((run.directory / "bench.json").read_text())["started_at_unix"])
              for name, run in runs.items()}
    label = sessions(starts)
    first = next(iter(runs.values())).key
    calibration = find_calibration(open_store(args.fitted_store), platform=first.platform, engine=first.engine,
                                   backend=first.backend, cuda_graphs=False)
    if calibration is None:
        raise SystemExit(f"{args.fitted_store} holds no no-graph calibration for {first.label()}")
    lines: list[str] = []

    def emit(text: str = "") -> None:
        lines.append(text)
        print(text)

    cache: dict[tuple[str, ...], Any] = {}
    per_run = {name: run_rows(run, args.fitted_store, cache, calibration) for name, run in runs.items()}
    document: dict[str, Any] = {"calibration": calibration.describe(), "runs": {}}

    emit(f"Calibration: {calibration.describe()}\n")
    emit("## Per run and step class: mean wall / predicted device / host residual (calibration's host) in ms\n")
    emit("| run | session | steps | " + " | ".join(CLASS_ORDER) + " | all: residual (calibration) | probe: device / host |")
    emit("|---|---|---:|" + "---|" * len(CLASS_ORDER) + "---:|---:|")
    for name in sorted(runs, key=lambda n: starts[n]):
        rows = per_run[name]
        cells = []
        classes = {}
        for cls in CLASS_ORDER:
            part = [r for r in rows if r.cls == cls]
            if not part:
                cells.append("")
                continue
            stats = {"steps": len(part), "wall_ms": mean([r.wall_ms for r in part]),
                     "device_pred_ms": mean([r.device_pred_ms for r in part]),
                     "host_residual_ms": mean([r.host_residual_ms for r in part]),
                     "host_calibration_ms": mean([r.host_calibration_ms for r in part])}
            classes[cls] = stats
            cells.append(f"{stats['steps']}: {stats['wall_ms']:.0f} / {stats['device_pred_ms']:.1f} / "
                         f"{stats['host_residual_ms']:.0f} ({stats['host_calibration_ms']:.0f})")
        residual = mean([r.host_residual_ms for r in rows])
        charged = mean([r.host_calibration_ms for r in rows])
        probe = f"{mean([r.probe_device_ms for r in rows]):.1f} / {mean([r.probe_host_ms for r in rows]):.1f}"
        emit(f"| {name} | {label[name]} | {len(rows)} | " + " | ".join(cells) + f" | {residual:.1f} ({charged:.1f}) | {probe} |")
        document["runs"][name] = {"session": label[name], "started_at_unix": starts[name], "model": runs[name].model,
                                  "classes": classes, "host_residual_ms": residual, "host_calibration_ms": charged,
                                  "steps": len(rows)}

    emit(f"\n## Small decode steps (1-{SMALL_DECODE_MAX} sequences): mean host residual in ms, by model and session\n")
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, rows in per_run.items():
        table[runs[name].model][label[name]] += [r.host_residual_ms for r in rows
                                                 if r.cls.startswith("decode") and r.seqs <= SMALL_DECODE_MAX]
    all_sessions = sorted({label[n] for n in runs}, key=lambda s: int(s[1:]))
    emit("| model | " + " | ".join(all_sessions) + " |")
    emit("|---|" + "---:|" * len(all_sessions))
    for model, by_session in sorted(table.items()):
        emit(f"| {model} | " + " | ".join(f"{mean(by_session[s]):.1f} ({len(by_session[s])})" if by_session[s] else ""
                                           for s in all_sessions) + " |")

    emit("\n## Steps of a shape already seen in the run against first-seen shapes (mean wall, host residual, ms)\n")
    emit("| run | first-seen steps | wall | residual | repeated steps | wall | residual |")
    emit("|---|---:|---:|---:|---:|---:|---:|")
    for name in sorted(runs, key=lambda n: starts[n]):
        rows = per_run[name]
        new = [r for r in rows if not r.shape_seen]
        old = [r for r in rows if r.shape_seen]
        if old:
            emit(f"| {name} | {len(new)} | {mean([r.wall_ms for r in new]):.1f} | {mean([r.host_residual_ms for r in new]):.1f} | "
                  f"{len(old)} | {mean([r.wall_ms for r in old]):.1f} | {mean([r.host_residual_ms for r in old]):.1f} |")
    emit(f"\n## Regimes: decode steps of up to {REGIME_DECODE_MAX} sequences, host residual below / above "
          f"{SLOW_REGIME_MS} ms\n")
    emit("| model | layers | steps | fast: median ms | slow: median ms | slow share |")
    emit("|---|---:|---:|---:|---:|---:|")
    for model in sorted({run.model for run in runs.values()}):
        part = [r for name, rows in per_run.items() if runs[name].model == model for r in rows
                if r.cls.startswith("decode") and r.seqs <= REGIME_DECODE_MAX]
        fast = [r.host_residual_ms for r in part if r.host_residual_ms <= SLOW_REGIME_MS]
        slow = [r.host_residual_ms for r in part if r.host_residual_ms > SLOW_REGIME_MS]
        emit(f"| {model} | {part[0].layers} | {len(part)} | {statistics.median(fast):.1f} | {statistics.median(slow):.1f} | "
              f"{PERCENT * len(slow) / len(part):.0f}% |")

    emit("\n## Validated with the store's calibration (error > 0: predicted slower)\n")
    emit("| run | session | host residual / charged (ms) | host error | slow share | TTFT mean err | TPOT mean err |")
    emit("|---|---|---:|---:|---:|---:|---:|")
    document["validation"] = {}
    for name in sorted(runs, key=lambda n: (runs[n].model, n.rsplit(".", 1)[-1], starts[n])):
        run = runs[name]
        if name.rsplit(".", 1)[-1] not in VALIDATED_WORKLOADS:
            continue
        step_model, layers = next(v for k, v in cache.items() if k[1] == run.model and k[3] == run.key.backend)
        scheduler = run.scheduler()
        overhead = calibration.for_model(layers, run.model, CacheGroups.from_scheduler(scheduler))
        report = validate(load_ground_truth(run.directory), scheduler, step_model, overhead).as_dict()
        rows = per_run[name]
        decodes = [r for r in rows if r.cls.startswith("decode") and r.seqs <= REGIME_DECODE_MAX]
        entry = {"ttft_mean_error_pct": report["distribution"]["ttft"]["mean"]["error_pct"],
                 "tpot_mean_error_pct": report["distribution"]["tpot"]["mean"]["error_pct"],
                 "host_error_pct": PERCENT * (document["runs"][name]["host_calibration_ms"]
                                              / document["runs"][name]["host_residual_ms"] - 1),
                 "slow_share_pct": PERCENT * sum(r.host_residual_ms > SLOW_REGIME_MS for r in decodes) / len(decodes)}
        document["validation"][name] = entry
        emit(f"| {name} | {label[name]} | {document['runs'][name]['host_residual_ms']:.1f} / "
              f"{document['runs'][name]['host_calibration_ms']:.1f} | {entry['host_error_pct']:+.1f}% | "
              f"{entry['slow_share_pct']:.0f}% | {entry['ttft_mean_error_pct']:+.1f}% | {entry['tpot_mean_error_pct']:+.1f}% |")
    errors = list(document["validation"].values())
    correlation = statistics.correlation([e["host_error_pct"] for e in errors], [e["tpot_mean_error_pct"] for e in errors])
    emit(f"\nCorrelation over {len(errors)} runs of host error and mean TPOT error: {correlation:.2f}")
    document["host_tpot_error_correlation"] = correlation

    calib = [name for name in runs if name.startswith(CALIB_RUNS_PREFIX) and name.endswith(CALIB_WORKLOAD)]
    pooled = [r for name in calib for r in per_run[name]]
    floor = best_floor(pooled)
    emit(f"\n## Candidate: a launch floor (fitted on {len(calib)} calib runs: {floor:.2f} ms per layer)\n")
    emit("| left out | measured host (ms) | without floor | with floor |")
    emit("|---|---:|---:|---:|")
    lomo: dict[str, list[float]] = {"without": [], "with": []}
    for held in sorted(calib):
        rest = [r for name in calib if name != held for r in per_run[name]]
        measured = mean([r.host_residual_ms for r in per_run[held]])
        cells = []
        for variant, chosen in (("without", 0.0), ("with", best_floor(rest))):
            coef, _ = fit_floor(rest, chosen)
            error = PERCENT * (predict_floor(coef, chosen, per_run[held]) / measured - 1)
            lomo[variant].append(abs(error))
            cells.append(f"{error:+.1f}%")
        emit(f"| {runs[held].model} | {measured:.1f} | " + " | ".join(cells) + " |")
    emit("| mean abs. | | " + " | ".join(f"{mean(lomo[v]):.1f}%" for v in ("without", "with")) + " |")
    coef_without, _ = fit_floor(pooled, 0.0)
    coef_with, _ = fit_floor(pooled, floor)
    deviation: dict[str, list[float]] = {"without": [], "with": []}
    for rows in per_run.values():
        measured = mean([r.host_residual_ms for r in rows])
        deviation["without"].append(abs(predict_floor(coef_without, 0.0, rows) / measured - 1))
        deviation["with"].append(abs(predict_floor(coef_with, floor, rows) / measured - 1))
    emit(f"\nEvery run's mean host residual, mean abs. error: without the floor {PERCENT * mean(deviation['without']):.1f}%, "
          f"with it {PERCENT * mean(deviation['with']):.1f}% ({len(per_run)} runs)")
    document["launch_floor"] = {"floor_ms_per_layer": floor, "lomo_abs_error_pct": {k: mean(v) for k, v in lomo.items()},
                                "all_runs_abs_error_pct": {k: PERCENT * mean(v) for k, v in deviation.items()}}
    control = load_ground_truth(H100 / NO_CUDNN_RUN)
    same_cell = [name for name in runs if name.endswith(NO_CUDNN_RUN.rsplit("/", 1)[-1].removeprefix("nocudnn."))]
    emit(f"\n## Control: step wall time (ms, p{'/p'.join(map(str, CONTROL_PERCENTILES))}) of the cell without "
         "cuDNN SDPA, and with it\n")
    emit("| run | steps | wall |")
    emit("|---|---:|---:|")
    for name, walls in [(NO_CUDNN_RUN, [MS_PER_S * s.duration_s for s in control.steps]),
                        *((name, [r.wall_ms for r in per_run[name]]) for name in sorted(same_cell, key=lambda n: starts[n]))]:
        cuts = statistics.quantiles(walls, n=PERCENT_POINTS)
        emit(f"| {name} | {len(walls)} | " + " / ".join(f"{cuts[p - 1]:.1f}" for p in CONTROL_PERCENTILES) + " |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nograph_light.json").write_text(json.dumps(document, indent=1) + "\n")
        (args.out / "README.md").write_text("# No-graph `paged|sdpa` host time per step (lab/nograph_light.py)\n\n"
                                            + "\n".join(lines) + "\n")
        log.info("wrote %s", args.out / "nograph_light.json")


if __name__ == "__main__":
    main()
