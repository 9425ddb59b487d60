"""Issue #24: why H100 lease5's no-graph `paged|sdpa` cells miss: the calibration's form, or the host's regime? (CPU, seconds)

On lease5's in-process pairs (data/h100/experiments/engine_paths/lease5/pairs/*.paged-sdpa.default.*)
the simulator predicts the light cells' TPOT 19.9% (1B) and 33.9% (3B) slow and misses the 1B
heavy cell's TTFT (MAPE 21.0%; docs/engine-paths-http-h100-lease5.md). Without CUDA graphs every
step of transformers' `paged|sdpa` path calls cuDNN SDPA at an attention shape (query tokens, KV
tokens read) it has not run before, so the step builds a cuDNN plan on the host inside its forward
(docs/calibration.md, "No-graph `paged|sdpa` at light load"). This script asks where the lease5
cells' error sits and whether a cost model per new shape, per sequence or per KV token would remove
it, or whether the host's time per step moves between runs and leases. It

1. replays every measured step of the four lease5 pairs as `dooly validate` does and splits it into
   device time (the store's prediction against steps.parquet `device_s`, the forward's span) and host
   time (the calibration's against wall minus `device_s`), by step kind (prefill, decode, mixed) and
   by whether the step's attention shape was first seen in the run or repeated;
2. for every committed no-graph `paged|sdpa` run of the H100 (groundtruth cells and calib runs,
   experiments/repeat and sdpa_repeat, engine_grid r1/r2, engine_paths lease4 and lease5, in-process
   and the HTTP server's engine) and, with `--h200-store`, of the H200 (groundtruth, unseen_llama
   calib repeats, engine_grid r1-r3 and calib_d), grouped into sessions by start time (a gap of
   SESSION_GAP_S starts a new one): the host time outside the forward (wall - `device_s`: input
   building, prepare and update) and its slope per KV token read, the host stall inside it
   (`device_s` less the predicted kernels: the plan build and launch gaps), their sum (the host
   residual the calibration fits; its median, and the share of slow steps, SLOW_STEP_MS above it)
   against what the platform store's calibration charges, and the difference (the run's level);
3. validates every light and heavy run of those (`dooly.sim.validate.validate`) with the store's
   calibration and with it moved to the run's own level: every path's constant shifted by the run's
   mean host residual less the calibration's mean charge (`level`), or each of the decode and mixed
   constants by its own (`level per path`): the calibration's form with the level of the run it is
   scored on. On the H100 also a form that charges the host time outside the forward per KV token and
   per sequence (`probe slopes`: the slopes fitted on the calib runs' wall - `device_s`, the
   constants on what is left of the host residual; the store's calibration has no KV slope). Mean
   absolute errors per platform, and the lease5 pairs' verdicts (issue #24's targets) per variant.

    python lab/nograph_load.py --h100-store FITTED_H100 [--h200-store FITTED_H200] [--out DIR]

FITTED_*: merged and fitted copies of data/h100/db and data/h200/db (their calibrations are used,
nothing is written). With --out, DIR/README.md holds the tables and DIR/nograph_load.json the
numbers. Its last output: data/h100/experiments/nograph_load/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from engine_paths_table import Cell, verdict  # noqa: E402

from dooly.sim.calibration import (  # noqa: E402
    CacheGroups,
    Calibration,
    HostSample,
    PathTerms,
    find_calibration,
    fit_path_terms,
)
from dooly.sim.calibration_commands import CalibrationRun, model_layers  # noqa: E402
from dooly.sim.step_model import device_seconds, step_keywords  # noqa: E402
from dooly.sim.validate import host_sample, load_ground_truth, validate  # noqa: E402
from dooly.store.backends import open_store  # noqa: E402

log = logging.getLogger("nograph_load")

H100 = ROOT / "data" / "h100"
H200 = ROOT / "data" / "h200"
NO_GRAPH = "*.paged-sdpa.default.*"
H100_GLOBS = ("groundtruth", "experiments/repeat", "experiments/sdpa_repeat/default-r*", "experiments/engine_grid/r*",
              "experiments/engine_paths/lease4/*", "experiments/engine_paths/lease5/*")
H200_GLOBS = ("groundtruth", "experiments/unseen_llama/calib_repeat/*/*", "experiments/engine_grid/*")
LEASE5_PAIRS = Path("experiments/engine_paths/lease5/pairs")
# The calib runs of data/h100/db's no-graph calibration (the `probe slopes` candidate is fitted on them).
H100_CALIB_RUNS = "groundtruth/*.paged-sdpa.default.calib"
CALIB = "calib"
VALIDATED = ("light", "heavy")
HTTP_CLIENT = "http"
# Runs started within this many seconds of the previous one belong to one session (a lease as far
# as the records tell).
SESSION_GAP_S = 3600.0
MS_PER_S = 1e3
NS_PER_S = 1e9
PERCENT = 100.0
KINDS = ("prefill", "decode", "mixed")
FIRST_SEEN = "first-seen"
REPEATED = "repeated"
DECODE, MIXED, DEFAULT_PATH = "decode", "mixed", "default"
# The slopes the `probe slopes` candidate takes from the host time outside the forward.
PROBE_SLOPES = ("per_sequence_s", "per_token_s", "per_kv_group_token_s", "per_kv_sliding_token_s")
STORE, LEVEL, LEVEL_PER_PATH, PROBE = "store", "level", "level per path", "probe slopes"
VARIANTS = (STORE, LEVEL, LEVEL_PER_PATH, PROBE)
STATISTICS = (("ttft", "mean"), ("ttft", "p90"), ("tpot", "mean"), ("tpot", "p90"))
PASSING = "pass"
# A step whose host residual exceeds its run's median by more than this is a slow step (ms): the
# no-graph path's steps sit near one level with a tail of slow ones, all at first-seen shapes.
SLOW_STEP_MS = 30.0


@dataclass(frozen=True)
class Step:
    """One measured step: what the engine ran, its times and what the store predicts and charges."""

    kind: str
    first_seen: bool  # its attention shape (query tokens, KV tokens read) had not run earlier in the run
    kv: int
    wall_s: float
    device_s: float  # steps.parquet: the forward's span on the device (host stalls inside it included)
    device_pred_s: float  # the store's kernels for this batch
    host_charge_s: float  # the calibration's host time for this batch
    sample: HostSample  # host residual (wall - predicted kernels), as `dooly calibrate` fits it
    outside: HostSample  # the host time outside the forward (wall - device_s), same regressors

    @property
    def residual_s(self) -> float:
        return self.wall_s - self.device_pred_s


@dataclass
class Run:
    name: str  # relative to the platform's data root
    platform: str
    calibration_run: CalibrationRun
    started: float
    probe_s: float | None  # bench.json host.list_probe_s, where recorded
    http: bool
    steps: list[Step] = dataclasses.field(default_factory=list)
    session: str = ""

    @property
    def workload(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def model(self) -> str:
        return self.calibration_run.model


class Models:
    """Each model's fitted step model and layer count from one fitted store (cached)."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.cache: dict[tuple[str, str, str], tuple[Any, int]] = {}

    def get(self, run: CalibrationRun) -> tuple[Any, int]:
        from dooly.fit.source import FittedSource, open_fitted_step

        ident = (run.model, run.key.platform, run.key.backend)
        if ident not in self.cache:
            source = FittedSource(store=self.store, platform=run.key.platform, backend=run.key.backend,
                                  engine=run.key.engine, dtype=run.dtype)
            fitted = open_fitted_step(source, run.model)
            self.cache[ident] = (fitted.step, model_layers(run.model, fitted.inventory, self.store))
        return self.cache[ident]


def step_kind(prefill: list[tuple[int, int]], decode_ctx: list[int]) -> str:
    if prefill:
        return MIXED if decode_ctx else "prefill"
    return DECODE


def load_runs(root: Path, globs: Iterable[str], platform: str) -> list[Run]:
    directories = sorted({d for pattern in globs for d in root.glob(f"{pattern}/{NO_GRAPH}") if (d / "steps.parquet").is_file()})
    runs = []
    for directory in directories:
        bench = json.loads((directory / "bench.json").read_text())
        probe = (bench.get("host") or {}).get("list_probe_s")
        runs.append(Run(str(directory.relative_to(root)), platform, CalibrationRun.load(directory),
                        float(bench["started_at_unix"]), None if probe is None else float(probe),
                        bench.get("client") == HTTP_CLIENT))
    runs.sort(key=lambda run: run.started)
    index, previous = 0, None
    for run in runs:
        if previous is None or run.started - previous > SESSION_GAP_S:
            index += 1
        run.session = f"{platform} S{index}"
        previous = run.started
    return runs


def measure(run: Run, models: Models, calibration: Calibration) -> None:
    """Every step of the run, replayed on the path the engine settings give it."""
    step_model, layers = models.get(run.calibration_run)
    keywords = step_keywords(step_model)
    scheduler = run.calibration_run.scheduler()
    groups = CacheGroups.from_scheduler(scheduler)
    overhead = calibration.for_model(layers, run.model, groups)
    seen: set[tuple[int, int]] = set()
    for step in load_ground_truth(run.calibration_run.directory).steps:
        path = scheduler.path_for(step.prefill, step.decode_ctx)
        predicted = float(device_seconds(step_model, step.prefill, step.decode_ctx, path, keywords))
        seqs, tokens, kv = step.sizes()
        shape = (tokens, kv)
        residual = host_sample(path.overhead_key, layers, step, max(step.duration_s - predicted, 0.0), run.model, groups)
        outside = host_sample(path.overhead_key, layers, step, max(step.duration_s - step.device_s, 0.0), run.model, groups)
        run.steps.append(Step(step_kind(step.prefill, step.decode_ctx), shape not in seen, kv, step.duration_s, step.device_s,
                              predicted, overhead.seconds(path, seqs, tokens, kv), residual, outside))
        seen.add(shape)


def mean(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.fmean(items) if items else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * MS_PER_S:.1f}"


def kv_slope_ns(steps: list[Step]) -> float:
    """Least-squares slope of the host time outside the forward per KV token read (ns)."""
    kv = [float(s.kv) for s in steps]
    outside = [s.wall_s - s.device_s for s in steps]
    return statistics.linear_regression(kv, outside).slope * NS_PER_S


def level_gap(steps: list[Step], kind: str | None = None) -> float:
    """The run's mean host residual less the calibration's mean charge (s), over its steps of `kind`."""
    chosen = [s for s in steps if kind is None or s.sample.key == kind]
    return mean(s.residual_s for s in chosen) - mean(s.host_charge_s for s in chosen)


def shifted(calibration: Calibration, gaps: dict[str, float]) -> Calibration:
    """The calibration with each path's constant moved by its gap (`default` for a path without one),
    no lower than zero."""
    terms = {path: dataclasses.replace(terms, constant_s=max(terms.constant_s + gaps.get(path, gaps[DEFAULT_PATH]), 0.0))
             for path, terms in calibration.terms.items()}
    return dataclasses.replace(calibration, terms=terms)


def probe_slopes(calibration: Calibration, runs: list[Run]) -> Calibration:
    """The `probe slopes` candidate: slopes fitted on the host time outside the forward of `runs`,
    each path's constant on the host residual less those slopes' part."""
    outside = [s.outside for run in runs for s in run.steps]
    slopes = fit_path_terms(outside, layer_terms=False)
    rest = []
    for run in runs:
        for step in run.steps:
            own = slopes.get(step.sample.key, slopes[DEFAULT_PATH])
            values = step.sample.regressors()
            part = sum(getattr(own, name) * values[name] for name in PROBE_SLOPES)
            rest.append(dataclasses.replace(step.sample, host_s=step.sample.host_s - part))
    constants = fit_path_terms(rest, layer_terms=False)
    terms = {}
    for path, fitted in constants.items():
        own = slopes.get(path, slopes[DEFAULT_PATH])
        terms[path] = PathTerms(constant_s=fitted.constant_s,
                                **{name: getattr(own, name) + getattr(fitted, name) for name in PROBE_SLOPES})
    return dataclasses.replace(calibration, terms=terms)


def validated(run: Run, models: Models, calibration: Calibration) -> dict[str, Any]:
    step_model, layers = models.get(run.calibration_run)
    scheduler = run.calibration_run.scheduler()
    overhead = calibration.for_model(layers, run.model, CacheGroups.from_scheduler(scheduler))
    return validate(load_ground_truth(run.calibration_run.directory), scheduler, step_model, overhead).as_dict()


def errors(payload: dict[str, Any]) -> list[float]:
    """Mean and p90 TTFT and TPOT error (%), then TTFT and TPOT MAPE (%)."""
    distribution = payload["distribution"]
    return ([distribution[metric][stat]["error_pct"] for metric, stat in STATISTICS]
            + [payload["requests"]["ttft"]["mape"], payload["requests"]["tpot"]["mape"]])


def replay_lines(run: Run) -> list[str]:
    """The step replay of one cell: per step kind and shape novelty, device and host per step."""
    header = ["step class", "steps", "device per step meas/pred (ms)", "host per step meas/pred (ms)",
              "wall per step meas/pred (ms)", "host residual meas (ms)", "wall pred - meas (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind in KINDS:
        for first in (True, False):
            part = [s for s in run.steps if s.kind == kind and s.first_seen == first]
            if not part:
                continue
            device = f"{ms(mean(s.device_s for s in part))} / {ms(mean(s.device_pred_s for s in part))}"
            host = f"{ms(mean(s.wall_s - s.device_s for s in part))} / {ms(mean(s.host_charge_s for s in part))}"
            wall = f"{ms(mean(s.wall_s for s in part))} / {ms(mean(s.device_pred_s + s.host_charge_s for s in part))}"
            gap = sum(s.device_pred_s + s.host_charge_s - s.wall_s for s in part)
            lines.append(f"| {kind}, {FIRST_SEEN if first else REPEATED} shape | {len(part)} | {device} | {host} | {wall} | "
                         f"{ms(mean(s.residual_s for s in part))} | {gap:+.2f} |")
    return lines


def run_row(run: Run) -> tuple[str, dict[str, Any]]:
    """One run's line of the per-run table and its record."""
    decodes = [s for s in run.steps if s.kind == DECODE]
    median_residual = statistics.median(s.residual_s for s in run.steps)
    slow = [s for s in run.steps if (s.residual_s - median_residual) * MS_PER_S > SLOW_STEP_MS]
    record: dict[str, Any] = {
        "session": run.session, "started": datetime.fromtimestamp(run.started, UTC).isoformat(timespec="minutes"),
        "http": run.http, "list_probe_s": run.probe_s, "steps": len(run.steps),
        "repeated_shape_steps": sum(not s.first_seen for s in run.steps),
        "outside_forward_ms": mean(s.wall_s - s.device_s for s in run.steps) * MS_PER_S,
        "outside_kv_slope_ns": kv_slope_ns(run.steps),
        "inside_forward_decode_median_ms": statistics.median(s.device_s - s.device_pred_s for s in decodes) * MS_PER_S,
        "host_residual_ms": mean(s.residual_s for s in run.steps) * MS_PER_S,
        "host_residual_median_ms": median_residual * MS_PER_S,
        "slow_steps": len(slow),
        "slow_excess_ms": mean(s.residual_s - median_residual for s in slow) * MS_PER_S if slow else 0.0,
        "charged_ms": mean(s.host_charge_s for s in run.steps) * MS_PER_S,
    }
    record["level_ms"] = record["host_residual_ms"] - record["charged_ms"]
    probe = "-" if run.probe_s is None else f"{run.probe_s * MS_PER_S:.1f}"
    label = f"{run.name}{' (HTTP)' if run.http else ''}"
    line = (f"| {run.session} | {record['started'][:16]} | {label} | {probe} | {len(run.steps)} | "
            f"{record['repeated_shape_steps']} | {record['outside_forward_ms']:.1f} | {record['outside_kv_slope_ns']:.0f} | "
            f"{record['inside_forward_decode_median_ms']:.1f} | {record['host_residual_median_ms']:.1f} | "
            f"{PERCENT * len(slow) / len(run.steps):.0f}% (+{record['slow_excess_ms']:.0f}) | {record['host_residual_ms']:.1f} | "
            f"{record['charged_ms']:.1f} | {record['level_ms']:+.1f} |")
    return line, record


def fmt(values: list[float]) -> str:
    signed, mapes = values[:len(STATISTICS)], values[len(STATISTICS):]
    return " / ".join(f"{v:+.1f}" for v in signed) + "; " + " / ".join(f"{v:.1f}" for v in mapes)


class Platform:
    """One platform's runs, fitted store and calibration."""

    def __init__(self, name: str, root: Path, globs: Iterable[str], store: str) -> None:
        self.name = name
        self.root = root
        self.models = Models(store)
        self.runs = load_runs(root, globs, name)
        key = self.runs[0].calibration_run.key
        found = find_calibration(open_store(store), platform=key.platform, engine=key.engine, backend=key.backend,
                                 cuda_graphs=False)
        if found is None:
            raise SystemExit(f"{store} holds no no-graph calibration for {key.label()}")
        self.calibration: Calibration = found
        for run in self.runs:
            measure(run, self.models, self.calibration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--h100-store", required=True, help="data/h100/db, merged and fitted")
    parser.add_argument("--h200-store", help="data/h200/db, merged and fitted (adds the H200's no-graph runs)")
    parser.add_argument("--out", type=Path, help="write README.md and nograph_load.json here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    logging.getLogger("dooly").setLevel(logging.WARNING)  # the simulator logs every simulated run
    platforms = [Platform("H100", H100, H100_GLOBS, args.h100_store)]
    if args.h200_store:
        platforms.append(Platform("H200", H200, H200_GLOBS, args.h200_store))
    lines: list[str] = []
    document: dict[str, Any] = {"calibrations": {p.name: p.calibration.describe() for p in platforms},
                                "runs": {}, "validation": {}}

    def emit(text: str = "") -> None:
        lines.append(text)
        print(text)

    h100 = platforms[0]
    pairs = [run for run in h100.runs if run.name.startswith(str(LEASE5_PAIRS))]
    for platform in platforms:
        emit(f"{platform.name}: {platform.calibration.describe()}")
    emit("\n## Lease5 pairs: every measured step replayed (device: store vs steps.parquet `device_s`; host: calibration vs "
         "wall - `device_s`)\n")
    for run in pairs:
        emit(f"### {run.name}\n")
        for line in replay_lines(run):
            emit(line)
        emit()

    emit("## Every no-graph run: host time outside and inside the forward, against the calibration (ms per step)\n")
    header = ["session", "started (UTC)", "run", "list probe (ms)", "steps", "repeated shapes", "outside forward",
              "its ns per KV", "inside forward, decode median", "host residual median",
              f"slow steps (> median + {SLOW_STEP_MS:g} ms; their excess)", "host residual", "charged", "level"]
    emit("| " + " | ".join(header) + " |")
    emit("|" + "---|" * len(header))
    for platform in platforms:
        for run in platform.runs:
            line, record = run_row(run)
            document["runs"][f"{platform.name}/{run.name}"] = record
            emit(line)
    emit(f"\nRepeated-shape steps: {sum(not s.first_seen for p in platforms for r in p.runs for s in r.steps)} of "
         f"{sum(len(r.steps) for p in platforms for r in p.runs)}; their host residual "
         f"{ms(mean(s.residual_s for p in platforms for r in p.runs for s in r.steps if not s.first_seen))} ms against "
         f"{ms(mean(s.residual_s for p in platforms for r in p.runs for s in r.steps if s.first_seen))} ms at first-seen shapes.")

    emit("\n## The calibration's form at each run's own level (error %: mean TTFT / p90 TTFT / mean TPOT / p90 TPOT; "
         "TTFT / TPOT MAPE)\n")
    emit("| run | " + " | ".join(VARIANTS) + " |")
    emit("|---|" + "---|" * len(VARIANTS))
    calib = [run for run in h100.runs if run.name in {str(p.relative_to(H100)) for p in H100.glob(H100_CALIB_RUNS)}]
    candidates: dict[str, Callable[[Run, Calibration], Calibration | None]] = {
        STORE: lambda run, c: c,
        LEVEL: lambda run, c: shifted(c, {DEFAULT_PATH: level_gap(run.steps)}),
        LEVEL_PER_PATH: lambda run, c: shifted(c, {DEFAULT_PATH: level_gap(run.steps),
                                                   **{k: level_gap(run.steps, k) for k in (DECODE, MIXED)
                                                      if any(s.sample.key == k for s in run.steps)}}),
    }
    probe = probe_slopes(h100.calibration, calib)
    summary: dict[str, dict[str, list[list[float]]]] = {}
    verdicts: dict[str, dict[str, str]] = {}
    for platform in platforms:
        for run in platform.runs:
            if run.http or run.workload not in VALIDATED:
                continue
            cells = []
            record = {}
            for variant in VARIANTS:
                if variant == PROBE:
                    chosen = probe if platform is h100 else None
                else:
                    chosen = candidates[variant](run, platform.calibration)
                if chosen is None:
                    cells.append("-")
                    continue
                payload = validated(run, platform.models, chosen)
                values = errors(payload)
                record[variant] = values
                summary.setdefault(platform.name, {}).setdefault(variant, []).append(values)
                cells.append(fmt(values))
                if run in pairs:
                    cell = Cell(run.name, "sdpa", run.workload, (run.calibration_run.directory,), model=run.model)
                    verdicts.setdefault(run.name, {})[variant] = verdict(cell, payload)
            document["validation"][f"{platform.name}/{run.name}"] = record
            emit(f"| {platform.name} {run.session.split()[-1]} {run.name} | " + " | ".join(cells) + " |")

    emit("\nMean absolute error over the runs (%: mean TTFT / p90 TTFT / mean TPOT / p90 TPOT; TTFT / TPOT MAPE):\n")
    emit("| platform | runs | " + " | ".join(VARIANTS) + " |")
    emit("|---|---:|" + "---|" * len(VARIANTS))
    document["mean_abs_error_pct"] = {}
    for name, by_variant in summary.items():
        means = {variant: [mean(abs(v[i]) for v in values) for i in range(len(values[0]))]
                 for variant, values in by_variant.items()}
        document["mean_abs_error_pct"][name] = means
        count = len(next(iter(by_variant.values())))
        shown = [fmt(means[v]).replace("+", "") if v in means else "-" for v in VARIANTS]
        emit(f"| {name} | {count} | " + " | ".join(shown) + " |")

    emit("\nLease5 pairs, issue #24's verdict per variant:\n")
    emit("| cell | " + " | ".join(VARIANTS) + " |")
    emit("|---|" + "---|" * len(VARIANTS))
    for name, judged in verdicts.items():
        emit(f"| {name} | " + " | ".join(judged.get(v, "-") for v in VARIANTS) + " |")
    document["lease5_verdicts"] = verdicts
    document["probe_slopes_terms"] = {path: dataclasses.asdict(terms) for path, terms in probe.terms.items()}
    passing = {v: sum(by.get(v) == PASSING for by in verdicts.values()) for v in VARIANTS}
    emit("\nLease5 pairs passing: " + ", ".join(f"{v} {n} of {len(verdicts)}" for v, n in passing.items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nograph_load.json").write_text(json.dumps(document, indent=1) + "\n")
        (args.out / "README.md").write_text("# The no-graph `paged|sdpa` path under load (lab/nograph_load.py)\n\n"
                                            "Generated by `python lab/nograph_load.py --h100-store FITTED_H100 --h200-store "
                                            "FITTED_H200 --out DIR` (docs/calibration.md, \"The no-graph path under load\").\n\n"
                                            + "\n".join(lines) + "\n")
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
