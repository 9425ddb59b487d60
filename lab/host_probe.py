"""Does the host speed probe of `dooly bench` explain the spread of the engine's host time per step?

`dooly bench` records, once per run before the engine starts, `host.list_probe_s` in bench.json:
the median time to append 200,000 integers to a Python list (dooly/engines/host_machine.py). This
script takes every H200 engine-grid run that has it (experiments/engine_grid/{r1,r2,r3,calib_d}:
two leases, C and D, told apart by their start times) and asks whether a run's host time per step,
against what the store's calibration charges the same steps, follows its probe.

Per run, over its ordinary steps (a graph shape's first step, which captures, left out, as
`dooly.sim.validate.host_samples` does):

- host residual: wall time minus the device time the store's fitted kernels predict (what a
  calibration is fitted on and charges); without CUDA graphs the host's stalls sit inside the
  forward, so this is the only host measure there;
- measured host: wall time minus steps.parquet `device_s` (the forward's span on the device, CUDA
  events). With graphs that span holds kernels only, so this is the cleaner host measure: the step
  model's own error is not in it. Async-batching runs: the probe split's host work per step
  (`async_host_samples`; host and device overlap, so no wall residual means anything) for both;
- ratio = host / the calibration's charge for the same steps, all steps and decode / mixed apart.

Tables (markdown on stdout, also written to --out):

1. Per run: path, model, workload, lease, probe (ms), steps, mean host residual and measured
   host per step, the charge, both ratios, the decode and mixed ratios, and the spread of the
   measured ratio across WINDOWS consecutive windows of the run (max / min).
2. Per path and pooled (synchronous paths): Pearson and Spearman correlation of the ratio with the
   probe and with the lease (0 = C, 1 = D), n; the probe's correlation within each lease.
3. Variance of log ratio: between runs, within runs (between the windows of a run).
4. Held out: each run's ratio predicted from the other runs of its path, either as their geometric
   mean (the unscaled calibration, recentred) or as c * probe^a fitted on them (log-log least
   squares); mean |predicted / measured - 1| over the runs, and the same fitted on one lease and
   scored on the other.

    python lab/host_probe.py --fitted-store FITTED_H200 [--out TABLE.md] [--json ROWS.json]

FITTED_H200: a merged and fitted copy of data/h200/db (read only). CPU only; a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("host_probe")

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "data" / "h200" / "experiments" / "engine_grid"
ROUNDS = ("r1", "r2", "r3", "calib_d")
# Runs started within this many seconds of the previous one belong to one lease; the leases in
# start order, as data/h200/experiments/engine_grid/README.md and walls_d.txt name them.
LEASE_GAP_S = 3600.0
LEASE_NAMES = ("C", "D")
# A run's ordinary steps cut into this many consecutive windows of equal step counts (drift).
WINDOWS = 5
MS_PER_S = 1e3
# Engine paths, by the run directory's "<backend>.<mode>" suffix.
PATH_LABELS = {
    "paged-sdpa.graphs": "sdpa graphs",
    "paged-sdpa.default": "sdpa no graphs",
    "paged-eager.graphs": "eager graphs",
    "paged-sdpa.async": "sdpa graphs + async",
}
ASYNC_PATH = "sdpa graphs + async"
MIN_CORRELATION_RUNS = 4


@dataclass
class Step:
    decode: bool
    host_residual_s: float
    host_measured_s: float
    charged_s: float


@dataclass
class Run:
    name: str
    path: str
    model: str
    workload: str
    lease: str
    probe_ms: float
    started_s: float  # since the lease's first run
    steps: list[Step]

    def total(self, field: str, decode: bool | None = None) -> float:
        return sum(getattr(s, field) for s in self.steps if decode is None or s.decode == decode)

    def ratio(self, field: str, decode: bool | None = None) -> float:
        charged = self.total("charged_s", decode)
        return self.total(field, decode) / charged if charged > 0 else math.nan

    def window_ratios(self, field: str) -> list[float]:
        """The ratio over each of WINDOWS consecutive windows of the run's steps."""
        size = len(self.steps) / WINDOWS
        out = []
        for index in range(WINDOWS):
            part = self.steps[round(index * size):round((index + 1) * size)]
            charged = sum(s.charged_s for s in part)
            if charged > 0:
                out.append(sum(getattr(s, field) for s in part) / charged)
        return out


def leases(starts: dict[str, float]) -> dict[str, str]:
    """Lease per run: sorted by start, a new lease after a LEASE_GAP_S gap."""
    labels: dict[str, str] = {}
    previous = None
    index = -1
    for name, start in sorted(starts.items(), key=lambda item: item[1]):
        if previous is None or start - previous > LEASE_GAP_S:
            index += 1
        labels[name] = LEASE_NAMES[index] if index < len(LEASE_NAMES) else f"L{index}"
        previous = start
    return labels


def run_steps(directory: Path, fitted_store: str, cache: dict[tuple[str, ...], Any]) -> list[Step]:
    """The run's ordinary steps: host residual, measured host and the store's charge."""
    from dooly.sim.calibration import CacheGroups, find_calibration
    from dooly.sim.calibration_commands import CalibrationRun, run_samples
    from dooly.sim.step_model import CpuOverheadModel, device_seconds, step_keywords
    from dooly.sim.validate import load_ground_truth
    from dooly.store.backends import open_store

    run = CalibrationRun.load(directory, store=fitted_store)
    calibration = find_calibration(open_store(fitted_store), platform=run.key.platform, engine=run.key.engine,
                                   backend=run.key.backend, cuda_graphs=run.key.cuda_graphs,
                                   async_batching=run.key.async_batching)
    if calibration is None:
        raise SystemExit(f"{fitted_store} holds no calibration for {run.key.label()}")
    samples, _, layers = run_samples(run, fitted_store, cache)
    terms = calibration.terms

    def charge(key: str, sample: Any) -> float:
        base = key.removesuffix("_graph")
        return (terms.get(key) or terms.get(base) or terms["default"]).seconds(sample)

    if run.key.async_batching:
        return [Step(s.key.startswith("decode"), s.host_s, s.host_s, charge(s.key, s)) for s in samples]
    step_model = next(v[0] for k, v in cache.items() if k[1] == run.model and k[3] == run.key.backend)
    keywords = step_keywords(step_model)
    scheduler = run.scheduler()
    groups = CacheGroups.from_scheduler(scheduler)
    overhead = calibration.for_model(layers, run.model, groups)
    out = []
    seen: set[Any] = set()
    for step in load_ground_truth(run.directory).steps:
        path = scheduler.path_for(step.prefill, step.decode_ctx)
        shape = CpuOverheadModel.graph_shape(path)
        if shape is not None and shape not in seen:
            seen.add(shape)
            continue
        device = float(device_seconds(step_model, step.prefill, step.decode_ctx, path, keywords))
        out.append(Step(path.overhead_key.startswith("decode"), max(step.duration_s - device, 0.0),
                        step.duration_s - step.device_s, overhead.seconds(path, *step.sizes())))
    return out


def collect(fitted_store: str) -> list[Run]:
    directories = sorted(d for r in ROUNDS for d in (GRID / r).glob("*") if (d / "bench.json").is_file())
    benches = {d: json.loads((d / "bench.json").read_text()) for d in directories}
    probed = [d for d in directories if (benches[d].get("host") or {}).get("list_probe_s")]
    starts = {str(d): float(benches[d]["started_at_unix"]) for d in probed}
    lease = leases(starts)
    lease_start = {name: min(t for d, t in starts.items() if lease[d] == name) for name in set(lease.values())}
    cache: dict[tuple[str, ...], Any] = {}
    runs = []
    for d in probed:
        model, backend, mode, workload = d.name.rsplit(".", 3)
        suffix = f"{backend}.{mode}"
        if suffix not in PATH_LABELS:
            log.info("skipping %s (path %s)", d, suffix)
            continue
        steps = run_steps(d, fitted_store, cache)
        runs.append(Run(f"{d.parent.name}/{d.name}", PATH_LABELS[suffix], model, workload, lease[str(d)],
                        MS_PER_S * float(benches[d]["host"]["list_probe_s"]), starts[str(d)] - lease_start[lease[str(d)]],
                        steps))
        log.info("%s: %s, probe %.2f ms, %d steps, ratio %.2f", runs[-1].name, runs[-1].lease, runs[-1].probe_ms,
                 len(steps), runs[-1].ratio("host_measured_s"))
    return runs


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    index = 0
    while index < len(order):
        end = index
        while end + 1 < len(order) and values[order[end + 1]] == values[order[index]]:
            end += 1
        for position in range(index, end + 1):
            out[order[position]] = (index + end) / 2 + 1
        index = end + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    return pearson(ranks(xs), ranks(ys))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope through the origin (the data are deviations from their group means)."""
    sxx = sum(x * x for x in xs)
    return sum(x * y for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0


def r_squared(columns: list[list[float]], ys: list[float]) -> float:
    """Share of the variance of YS (centred) that a least-squares fit on COLUMNS (centred) explains."""
    import numpy as np

    design = np.array(columns, dtype=float).T
    target = np.array(ys, dtype=float)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    total = float((target ** 2).sum())
    return 1 - float(((target - design @ coef) ** 2).sum()) / total if total > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

SYNC = "synchronous paths"
ALL = "all paths"
GROUPS = (*PATH_LABELS.values(), SYNC, ALL)
# The ratio each table reads: measured host with graphs, host residual without (the forward's
# device span holds the host's stalls there, so wall minus `device_s` is only prepare + update).
NO_GRAPHS = "sdpa no graphs"


def field_of(run: Run) -> str:
    return "host_residual_s" if run.path == NO_GRAPHS else "host_measured_s"


def in_group(run: Run, group: str) -> bool:
    return group == ALL or (group == SYNC and run.path != ASYNC_PATH) or run.path == group


def cell_of(run: Run) -> tuple[str, str, str]:
    return (run.path, run.model, run.workload)


@dataclass(frozen=True)
class Deviation:
    """A run's log ratio, log probe and lease, each less its group's mean (a cell, or a cell on one lease)."""

    run: Run
    ratio: float
    probe: float
    lease: float


def deviations(runs: list[Run], by_lease: bool = False, decode: bool | None = None) -> list[Deviation]:
    """Per cell (per cell and lease with BY_LEASE) of two runs or more: each run against the cell."""
    groups: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(*cell_of(run), run.lease if by_lease else "")].append(run)
    out = []
    for members in groups.values():
        values = [(math.log(r.ratio(field_of(r), decode)), math.log(r.probe_ms), float(r.lease != LEASE_NAMES[0]))
                  for r in members]
        if len(members) < 2 or any(math.isnan(v[0]) for v in values):
            continue
        means = [statistics.fmean(v[i] for v in values) for i in range(3)]
        out += [Deviation(r, v[0] - means[0], v[1] - means[1], v[2] - means[2]) for r, v in zip(members, values)]
    return out


def run_table(runs: list[Run]) -> list[str]:
    lines = ["| run | path | lease | probe (ms) | steps | host residual / measured host / charged (ms per step) | "
             "ratio: residual / measured | decode / mixed ratio | windows max/min |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in sorted(runs, key=lambda r: (r.path, r.model, r.workload, r.lease, r.name)):
        n = len(run.steps)
        field = field_of(run)
        windows = run.window_ratios(field)
        lines.append(f"| {run.name} | {run.path} | {run.lease} | {run.probe_ms:.2f} | {n} | "
                     f"{MS_PER_S * run.total('host_residual_s') / n:.2f} / {MS_PER_S * run.total('host_measured_s') / n:.2f} / "
                     f"{MS_PER_S * run.total('charged_s') / n:.2f} | {run.ratio('host_residual_s'):.3f} / "
                     f"{run.ratio('host_measured_s'):.3f} | {run.ratio(field, True):.3f} / {run.ratio(field, False):.3f} | "
                     f"{max(windows) / min(windows):.2f} |")
    return lines


def lease_table(runs: list[Run]) -> list[str]:
    lines = ["| lease | runs | probe median (ms) | min | max |", "|---|---:|---:|---:|---:|"]
    for lease in sorted({r.lease for r in runs}):
        probes = [r.probe_ms for r in runs if r.lease == lease]
        lines.append(f"| {lease} | {len(probes)} | {statistics.median(probes):.2f} | {min(probes):.2f} | {max(probes):.2f} |")
    return lines


def _corr(xs: list[float], ys: list[float]) -> str:
    return f"{pearson(xs, ys):+.2f} / {spearman(xs, ys):+.2f}" if len(xs) >= MIN_CORRELATION_RUNS else "-"


def correlation_table(runs: list[Run]) -> list[str]:
    lines = ["| runs | n | ratio ~ probe, no cell control | n | within cell: ~ probe | ~ lease | probe slope a | "
             "R² lease / probe / both | n | within cell and lease: ~ probe | slope a | sd of log ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for group in GROUPS:
        members = [r for r in runs if in_group(r, group)]
        raw_x = [r.probe_ms for r in members]
        raw_y = [r.ratio(field_of(r)) for r in members]
        cell = deviations(members)
        lease = deviations(members, by_lease=True)
        px, py, lx = [d.probe for d in cell], [d.ratio for d in cell], [d.lease for d in cell]
        both = (f"{r_squared([lx], py):.2f} / {r_squared([px], py):.2f} / {r_squared([lx, px], py):.2f}"
                if len(cell) >= MIN_CORRELATION_RUNS else "-")
        qx, qy = [d.probe for d in lease], [d.ratio for d in lease]
        spread = f"{statistics.pstdev(qy):.3f}" if qy else "-"
        lines.append(f"| {group} | {len(members)} | {_corr(raw_x, raw_y)} | {len(cell)} | {_corr(px, py)} | {_corr(lx, py)} | "
                     f"{slope(px, py):.2f} | {both} | {len(lease)} | {_corr(qx, qy)} | "
                     f"{slope(qx, qy) if qx else 0.0:.2f} | {spread} |")
    for decode, label in ((True, "decode steps"), (False, "mixed and prefill steps")):
        members = [r for r in runs if in_group(r, SYNC)]
        cell = deviations(members, decode=decode)
        lease = deviations(members, by_lease=True, decode=decode)
        px, py, lx = [d.probe for d in cell], [d.ratio for d in cell], [d.lease for d in cell]
        qx, qy = [d.probe for d in lease], [d.ratio for d in lease]
        lines.append(f"| {SYNC}, {label} | - | - | {len(cell)} | {_corr(px, py)} | {_corr(lx, py)} | {slope(px, py):.2f} | "
                     f"{r_squared([lx], py):.2f} / {r_squared([px], py):.2f} / {r_squared([lx, px], py):.2f} | "
                     f"{len(lease)} | {_corr(qx, qy)} | {slope(qx, qy):.2f} | {statistics.pstdev(qy):.3f} |")
    return lines


def drift_table(runs: list[Run]) -> list[str]:
    """Repeats of one cell window by window: log(A_w / B_w) over the WINDOWS windows. Its spread
    across windows is how far one run's host moves against the other's within the run (an upper
    bound: two runs' windows hold like, not identical, steps); its mean, the run-level difference
    a once-per-run number could capture."""
    lines = ["| path | pairs | same lease: sd across windows / mean abs | pairs | across leases: sd across windows / mean abs |",
             "|---|---:|---:|---:|---:|"]
    for path in PATH_LABELS.values():
        cells: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
        for run in runs:
            if run.path == path:
                cells[cell_of(run)].append(run)
        parts: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for members in cells.values():
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    logs = [math.log(x / y) for x, y in zip(a.window_ratios(field_of(a)), b.window_ratios(field_of(b)))]
                    parts[a.lease == b.lease].append((statistics.stdev(logs), abs(statistics.fmean(logs))))
        cells_text = []
        for same in (True, False):
            pairs = parts[same]
            cells_text.append(f"{len(pairs)} | " + (f"{statistics.fmean(p[0] for p in pairs):.3f} / "
                                                   f"{statistics.fmean(p[1] for p in pairs):.3f}" if pairs else "-"))
        lines.append(f"| {path} | {' | '.join(cells_text)} |")
    return lines


def against_other_lease(runs: list[Run]) -> list[str]:
    """Each run of the first lease against the same cell's runs of the second (the geometric mean
    of their ratios): log of the two, against the run's log probe and its start in the lease; also
    with each model's mean taken out (the leases' gap differs by model and path)."""
    first, second = LEASE_NAMES[:2]
    lines = [f"| runs | n | {first}/{second} host ratio: mean (min-max) | ~ probe | slope a | ~ start in lease | "
             "~ probe within model | slope a |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for group in (SYNC, ASYNC_PATH):
        rows = []
        for run in runs:
            basis = [r for r in runs if r.lease == second and cell_of(r) == cell_of(run)]
            if run.lease != first or not basis or not in_group(run, group):
                continue
            reference = statistics.fmean(math.log(r.ratio(field_of(r))) for r in basis)
            rows.append((run.model, math.log(run.probe_ms), math.log(run.ratio(field_of(run))) - reference, run.started_s))
        if len(rows) < MIN_CORRELATION_RUNS:
            continue
        xs, ys, ts = [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
        wx, wy = [], []
        for model in {r[0] for r in rows}:
            part = [r for r in rows if r[0] == model]
            mx, my = statistics.fmean(r[1] for r in part), statistics.fmean(r[2] for r in part)
            wx += [r[1] - mx for r in part]
            wy += [r[2] - my for r in part]
        gaps = [math.exp(y) for y in ys]
        lines.append(f"| {group} | {len(rows)} | {statistics.fmean(gaps):.2f} ({min(gaps):.2f}-{max(gaps):.2f}) | "
                     f"{_corr(xs, ys)} | {slope([x - statistics.fmean(xs) for x in xs], ys):.2f} | {_corr(ts, ys)} | "
                     f"{_corr(wx, wy)} | {slope(wx, wy):.2f} |")
    return lines


def held_out(runs: list[Run], group: str, which: str) -> tuple[int, float, float]:
    """Each run's ratio predicted from other runs of its cell (any, the other lease's, its own lease's).

    `which`: "any", "other" or "same". Unscaled: their geometric mean; scaled: that times
    (probe / their geometric-mean probe)^a, a fitted on the other cells' within-cell deviations.
    Returns n and the mean |predicted / measured - 1| of both."""
    members = [r for r in runs if in_group(r, group)]
    cells: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in members:
        cells[cell_of(run)].append(run)
    unscaled, scaled = [], []
    for key, cell_runs in cells.items():
        others = deviations([r for r in members if cell_of(r) != key])
        a = slope([d.probe for d in others], [d.ratio for d in others])
        for run in cell_runs:
            basis = [r for r in cell_runs if r is not run and (which == "any" or (r.lease == run.lease) == (which == "same"))]
            if not basis:
                continue
            base = statistics.fmean(math.log(r.ratio(field_of(r))) for r in basis)
            base_probe = statistics.fmean(math.log(r.probe_ms) for r in basis)
            actual = math.log(run.ratio(field_of(run)))
            unscaled.append(abs(math.exp(base - actual) - 1))
            scaled.append(abs(math.exp(base + a * (math.log(run.probe_ms) - base_probe) - actual) - 1))
    if not unscaled:
        return 0, math.nan, math.nan
    return len(unscaled), statistics.fmean(unscaled), statistics.fmean(scaled)


def held_out_table(runs: list[Run]) -> list[str]:
    labels = (("any", "any other run of the cell"), ("other", "the cell's runs of the other lease"),
              ("same", "the cell's other runs of the same lease"))
    lines = ["| runs | predicted from | n | unscaled | scaled by probe^a |", "|---|---|---:|---:|---:|"]
    for group in GROUPS:
        for which, label in labels:
            n, plain, probed = held_out(runs, group, which)
            if n:
                lines.append(f"| {group} | {label} | {n} | {100 * plain:.1f}% | {100 * probed:.1f}% |")
    return lines


def report(runs: list[Run]) -> str:
    sections = [
        ("Per run", "Host per step (ms) and its ratio to the store's charge for the same steps; the tables below read "
         "the measured-host ratio with graphs and the residual ratio without. Windows: the ratio over each of "
         f"{WINDOWS} consecutive windows of the run's steps, largest over smallest.", run_table(runs)),
        ("The probe per lease", "", lease_table(runs)),
        ("Correlations", "Pearson / Spearman. No cell control: a run's ratio against its probe. Within cell: log ratio "
         "and log probe less their means over the cell's runs (same path, model and workload; cells of one run left "
         "out), against the probe and the lease (0 = C, 1 = D); a: the slope of log ratio on log probe, host ∝ probe^a; "
         "R²: the share of the within-cell variance of log ratio a least-squares fit on lease, probe or both explains. "
         "Within cell and lease: the same over runs of one cell on one lease.", correlation_table(runs)),
        ("One lease against the other", (against_other_lease.__doc__ or "") + " Pearson / Spearman.",
         against_other_lease(runs)),
        ("Within a run", (drift_table.__doc__ or "").replace("WINDOWS", str(WINDOWS)), drift_table(runs)),
        ("Held out", "Mean |predicted / measured - 1| of a run's host ratio. " + (held_out.__doc__ or "").split("\n")[0]
         + " Unscaled: their geometric mean; scaled: times (probe / their probe)^a, a fitted on the other cells' "
         "within-cell deviations (both leases).",
         held_out_table(runs)),
    ]
    out = []
    for title, text, lines in sections:
        out += [f"## {title}", ""] + ([" ".join(text.split()), ""] if text else []) + lines + [""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fitted-store", required=True, help="A merged and fitted copy of data/h200/db (read only).")
    parser.add_argument("--out", help="Write the markdown tables here too.")
    parser.add_argument("--json", help="Write the per-run rows (and their steps) here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("dooly").setLevel(logging.WARNING)
    runs = collect(args.fitted_store)
    text = report(runs)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs]))


if __name__ == "__main__":
    main()
