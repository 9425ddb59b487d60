"""Issue #24's engine-path grid of one platform against the simulator: docs/engine-grid.md (H100), docs/engine-grid-h200.md.

The grid (data/<platform>/experiments/engine_grid, rounds r1, r2, ...; `device/engine_grid.sh`) served
each model on transformers continuous batching along every engine path issue #24 names: `paged|sdpa`
with CUDA graphs, with async batching, without graphs, and `paged|eager` with graphs, each on the
light and heavy workloads; its models are the ones found there (H100: Llama-3.2-1B and -3B). The
H100's Qwen2.5-7B cells of the same issue have their own page (bench/engine_paths_table.py,
docs/engine-paths.md), whose validation, verdict and step breakdown this script reuses so that the
pages judge a cell the same way. For the platform's settings (PLATFORMS) this script

1. takes a fitted copy of the platform's store (`--fitted-store`, else merged and fitted here from
   data/<platform>/db or `--store`) and, for every engine path of the grid, the store's own
   calibration; where the store has none, fits one from the committed calib runs of that path under
   data/<platform> (`dooly calibrate`);
2. groups each cell's rounds and validates them with `dooly validate` (the first round is
   simulated; all of them give the engine's floor); calib runs (`*.calib`) are calibration inputs,
   not cells;
3. splits every missed cell's measured steps into device and host time per step class;
4. writes the page and the grid's validation.json.

    python reports/engine_grid_table.py [--platform h100|h200] [--fitted-store FITTED_STORE]
        [--data GRID_DIR] [--store STORE] [--out PAGE] [--record JSON]

Run from the repository root (the page and the record name the data by relative path).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# engine_paths_table lives in bench/ (a script folder, not a package), as h100_report lives here.
sys.path.insert(0, str(ROOT / "bench"))

from engine_paths_table import (  # noqa: E402
    HEAVY_TPOT_MAPE_PCT,
    HEAVY_TTFT_MAPE_PCT,
    SUMMARY_TARGET_PCT,
    TARGET_ROWS,
    Cell,
    cell_table,
    dooly,
    gpu_name,
    rows_by_key,
    step_breakdown,
    validate,
    verdict,
)
from engine_paths_table import PLATFORM as H100_PLATFORM  # noqa: E402

log = logging.getLogger("engine_grid_table")

H200_PLATFORM = "NVIDIA-H200"
# Under a platform's data root: the grid, its store; the grid's GPU report and per-cell record.
GRID_DIR = Path("experiments/engine_grid")
STORE_DIR = "db"
GPU_REPORT = "gpu.txt"
RECORD = "validation.json"
PAGE_DIR = Path("docs")
CALIB_SUFFIX = ".calib"
ENGINE = "transformers"
PAGED_PREFIX = "paged-"
RECORD_SCHEMA = "dooly.engine_grid_validation/1"
# How the grid's directories name an engine path's mode, in the order the page lists them.
MODE_LABELS = {"graphs": "graphs", "async": "graphs + async", "default": "no graphs"}
BACKEND_ORDER = ("sdpa", "eager")
WORKLOAD_ORDER = ("light", "heavy")
MS_PER_S = 1e3
# The device/host breakdown's terms, as step_breakdown names their sums.
TERMS = ("device", "host")
SETTINGS_SHOWN = ("num_blocks", "max_batch_tokens", "max_requests_per_batch", "block_size")
# Upper edges of the batch-size classes of the decode-step table; larger batches form the last class.
BATCH_EDGES = (4, 16, 64)
OTHER_STEPS = "other"
# The mode an async cell is compared with: the same settings without async batching.
SYNC_MODE = "graphs"
KV_PER_K = 1e3
NS_PER_S = 1e9
# A run whose replayed steps sum this close to their measured wall time misses in where its price errors fall
# (which steps, how early in the run), not in its prices summed over the run.
REPLAY_CLOSE_PCT = 3.0
DECODE_KEY = "decode"
DECODE_GRAPH_KEY = "decode_graph"


@dataclass(frozen=True)
class PlatformSettings:
    """What differs between the platforms' grids: the GPU's short name, the store's platform name,
    the data root (the grid under GRID_DIR, the store under STORE_DIR, and where committed calib
    runs are looked for when the store lacks a path's calibration), the page and the line linking
    the page to the platform's other engine-path pages."""

    gpu: str
    platform: str
    root: Path
    page: Path
    see_also: str = ""

    @property
    def data(self) -> Path:
        return self.root / GRID_DIR

    @property
    def store(self) -> Path:
        return self.root / STORE_DIR


PLATFORMS = {
    "h100": PlatformSettings("H100", H100_PLATFORM, Path("data/h100"), PAGE_DIR / "engine-grid.md",
                             " The Qwen2.5-7B cells of the same issue: [engine-paths.md](engine-paths.md)."),
    "h200": PlatformSettings("H200", H200_PLATFORM, Path("data/h200"), PAGE_DIR / "engine-grid-h200.md",
                             " The H100's grid: [engine-grid.md](engine-grid.md)."),
}
DEFAULT_PLATFORM = "h100"


@dataclass(frozen=True)
class GridRun:
    """One committed run of the grid: `<round>/<model>.paged-<backend>.<mode>.<workload>`."""

    round: str
    model_dir: str
    backend: str
    mode: str
    workload: str
    path: Path


@dataclass(frozen=True)
class GridCell:
    """One cell of the grid and its repeats, in round order (the first is simulated)."""

    model_dir: str
    backend: str
    mode: str
    workload: str
    rounds: tuple[str, ...]
    runs: tuple[Path, ...]

    @property
    def name(self) -> str:
        return f"{self.model_dir} {self.backend} {MODE_LABELS.get(self.mode, self.mode)} {self.workload}"


@dataclass(frozen=True)
class EnginePath:
    """What selects a calibration in the store, besides platform and engine."""

    backend: str
    graphs: bool
    asynchronous: bool

    @property
    def label(self) -> str:
        loop = ", async batching" if self.asynchronous else ""
        return f"`{self.backend}`, graphs {'on' if self.graphs else 'off'}{loop}"


@dataclass(frozen=True)
class CalibrationNote:
    """Which calibration a path's cells are validated with, as the page says it; `usable` is
    false when there is none (neither in the store nor from committed calib runs)."""

    text: str
    usable: bool = True
    kv_ns: float | None = None  # the decode path's host time per KV token read, where it has no per-layer part


def parse_run(path: Path) -> GridRun | None:
    """The run a grid directory holds, or None for anything else (the model name has dots) and for
    calib runs (calibration inputs, not cells)."""
    parts = path.name.rsplit(".", 3)
    if len(parts) != 4 or not parts[1].startswith(PAGED_PREFIX) or path.name.endswith(CALIB_SUFFIX):
        return None
    model_dir, backend, mode, workload = parts
    return GridRun(path.parent.name, model_dir, backend.removeprefix(PAGED_PREFIX), mode, workload, path)


def _round_order(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else 0, name)


def _rank(value: str, order: Iterable[str]) -> int:
    listed = list(order)
    return listed.index(value) if value in listed else len(listed)


def group_cells(runs: Iterable[GridRun]) -> list[GridCell]:
    """The runs grouped into cells (repeats in round order), cells in the page's order: sdpa
    before eager, graphs, async, no graphs, light before heavy."""
    groups: dict[tuple[str, str, str, str], list[GridRun]] = {}
    for run in runs:
        groups.setdefault((run.model_dir, run.backend, run.mode, run.workload), []).append(run)
    cells = []
    for (model_dir, backend, mode, workload), members in groups.items():
        ordered = sorted(members, key=lambda r: _round_order(r.round))
        cells.append(GridCell(model_dir, backend, mode, workload, tuple(r.round for r in ordered),
                              tuple(r.path for r in ordered)))
    return sorted(cells, key=lambda c: (c.model_dir, _rank(c.backend, BACKEND_ORDER), _rank(c.mode, MODE_LABELS),
                                        _rank(c.workload, WORKLOAD_ORDER)))


def discover(data: Path) -> list[GridCell]:
    """Every cell under `data`'s rounds that holds a complete run."""
    runs = [parse_run(d) for d in sorted(data.glob("*/*")) if (d / "requests.parquet").is_file()]
    return group_cells(r for r in runs if r is not None)


def grid_models(cells: Iterable[GridCell]) -> list[str]:
    """The models of the grid, as its directories name them, sorted."""
    return sorted({cell.model_dir for cell in cells})


def fit_copy(store: Path, work: Path) -> str:
    """A merged and fitted copy of a committed store, under `work`."""
    copy = work / STORE_DIR
    shutil.copytree(store, copy)
    for command in ("merge", "fit"):
        dooly(command, "--store", str(copy))
    return str(copy)


def run_model(run: Path) -> str:
    return str(json.loads((run / "bench.json").read_text())["model"])


def engine_path(run: Path) -> EnginePath:
    """The calibration key of a run's engine, resolved as `dooly validate` resolves it."""
    from dooly.sim.calibration import scheduler_uses_async, scheduler_uses_graphs
    from dooly.sim.options import with_model_groups
    from dooly.sim.schedulers import make_scheduler

    bench = json.loads((run / "bench.json").read_text())
    settings = json.loads((run / "engine.json").read_text())
    scheduler = make_scheduler(ENGINE, with_model_groups(str(bench["model"]), ENGINE, settings))
    return EnginePath(str(bench["backend"]), scheduler_uses_graphs(scheduler), scheduler_uses_async(scheduler))


def calib_runs(path: EnginePath, root: Path) -> list[Path]:
    """The committed calib runs under `root` whose engine took `path`."""
    from dooly.errors import DoolyError

    found = []
    for run in sorted(root.rglob(f"*{CALIB_SUFFIX}")):
        if not (run / "bench.json").is_file() or not (run / "engine.json").is_file():
            continue
        try:
            if engine_path(run) == path:
                found.append(run)
        except DoolyError as error:
            log.warning("%s: %s", run, error)
    return found


def calibrations(store: str, paths: Iterable[EnginePath], settings: PlatformSettings) -> dict[EnginePath, CalibrationNote]:
    """What each path is validated with, as the page says it: the store's calibration, or one
    fitted here from the committed calib runs of that path under the platform's data root (added
    to `store`), or none."""
    from dooly.sim.calibration import find_calibration
    from dooly.store.backends import open_store

    def find(path: EnginePath) -> Any:
        return find_calibration(open_store(store, create=False), platform=settings.platform, engine=ENGINE,
                                backend=path.backend, cuda_graphs=path.graphs, async_batching=path.asynchronous)

    notes = {}
    for path in paths:
        found = find(path)
        if found is not None:
            models = sorted({str(run.get("model", "")) for run in found.inputs})
            text = (f"the store's: {len(found.inputs)} calib run(s) of {', '.join(models)} "
                    f"({', '.join(str(run.get('run', '')) for run in found.inputs)})")
        else:
            runs = calib_runs(path, settings.root)
            if not runs:
                notes[path] = CalibrationNote("none in the store, and no committed calib run of this path: its cells are "
                                              "not validated", usable=False)
                continue
            dooly("calibrate", "--store", store, *[a for run in runs for a in ("--ground-truth", str(run))])
            found = find(path)
            text = "none in the store: fitted here from the committed calib runs " + ", ".join(f"`{run}`" for run in runs)
        notes[path] = CalibrationNote(text, kv_ns=decode_kv_ns(found.terms, path.graphs))
    return notes


def decode_kv_ns(terms: dict[str, Any], graphs: bool) -> float | None:
    """A calibration's decode host time per KV token read (ns) for a model of one full-attention
    cache group (the grid's models; a calibration fitted per group entry charges that), or None
    where it has a per-layer part."""
    decode = terms.get(DECODE_GRAPH_KEY if graphs else DECODE_KEY)
    if decode is None or decode.per_kv_token_layer_s:
        return None
    return float(decode.for_layers(0).per_kv_token_s) * NS_PER_S


def misses(cell: Cell, payload: dict[str, Any]) -> list[str]:
    """What missed issue #24's targets (empty when the cell passes): engine_paths_table's verdict."""
    said = verdict(cell, payload)
    return [] if said == "pass" else said.removeprefix("miss: ").split(", ")


def cell_record(grid: GridCell, cell: Cell, payload: dict[str, Any]) -> dict[str, Any]:
    """One cell's numbers for validation.json: each target statistic measured and predicted, its
    error, floor and bound, the per-request and per-step MAPEs, the calibration and the verdict."""
    rows = rows_by_key(payload)
    statistics = {}
    for key in TARGET_ROWS:
        row = rows[key]
        statistics[key] = {"measured_s": row["measured"], "predicted_s": row["predicted"], "error_pct": row["error_pct"],
                           "floor_pct": row["floor_pct"], "bound_pct": max(SUMMARY_TARGET_PCT, row["floor_pct"] or 0.0)}
    missed = misses(cell, payload)
    return {"cell": grid.name, "model": cell.model, "backend": f"paged|{grid.backend}", "mode": grid.mode,
            "workload": grid.workload, "runs": [str(run) for run in grid.runs], "calibration": payload.get("cpu_overhead"),
            "statistics": statistics, "ttft_mape_pct": payload["requests"]["ttft"]["mape"],
            "tpot_mape_pct": payload["requests"]["tpot"]["mape"], "step_mape_pct": (payload.get("steps") or {}).get("mape"),
            "pass": not missed, "misses": missed}


def path_class(path: Any, row: dict[str, Any]) -> str:
    """A step's class in the miss breakdown: its calibration path, and whether it captured a graph."""
    return f"{path.overhead_key}{' capture' if row.get('graph_captured') else ''}"


def batch_bucket(batch: int) -> str:
    """The batch-size class of a decode step: `1-4`, `5-16`, `17-64`, `65+` (BATCH_EDGES)."""
    low = 1
    for edge in BATCH_EDGES:
        if batch <= edge:
            return f"{low}-{edge}"
        low = edge + 1
    return f"{low}+"


def decode_class(path: Any, row: dict[str, Any]) -> str:
    """A decode-only step that captured no graph, by batch size; every other step is OTHER_STEPS."""
    if row.get("prefill") or row.get("graph_captured") or not row.get("decode_ctx"):
        return OTHER_STEPS
    return batch_bucket(len(row["decode_ctx"]))


def decode_kv_means(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Mean KV tokens a decode step reads, per decode_class: what the calibration's per-KV-token
    host term is charged on."""
    totals: dict[str, list[int]] = {}
    for row in rows:
        kind = decode_class(None, row)
        if kind != OTHER_STEPS:
            totals.setdefault(kind, []).append(sum(row["decode_ctx"]))
    return {kind: sum(values) / len(values) for kind, values in totals.items()}


def furthest_class(sums: dict[str, dict[str, float]]) -> tuple[str, float, float, float]:
    """The step class whose replayed wall time is furthest from its measurement: its class, and
    predicted minus measured wall, device and host time, summed over its steps (s)."""
    def gap(part: dict[str, float], term: str) -> float:
        return summed(part, f"{term}_pred") - summed(part, f"{term}_meas")

    kind = max(sums, key=lambda k: abs(gap(sums[k], "wall")))
    part = sums[kind]
    return kind, gap(part, "wall"), gap(part, "device"), gap(part, "host")


def _per_step(part: dict[str, float], measured: str, predicted: str) -> str:
    n = part["steps"]
    return f"{summed(part, measured) / n * MS_PER_S:.1f} / {summed(part, predicted) / n * MS_PER_S:.1f}"


def summed(part: dict[str, float], key: str) -> float:
    """A sum of step_breakdown's, or `wall_meas`/`wall_pred`: device plus host."""
    if key.startswith("wall_"):
        side = key.removeprefix("wall_")
        return part[f"device_{side}"] + part[f"host_{side}"]
    return part[key]


def breakdown_lines(sums: dict[str, dict[str, float]]) -> list[str]:
    header = ["step class", "steps", "device per step meas/pred (ms)", "host per step meas/pred (ms)",
              "wall per step meas/pred (ms)", "device pred - meas (s)", "host pred - meas (s)", "wall pred - meas (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, part in sorted(sums.items(), key=lambda item: -item[1]["steps"]):
        per_step = [_per_step(part, f"{t}_meas", f"{t}_pred") for t in (*TERMS, "wall")]
        gaps = [f"{summed(part, f'{t}_pred') - summed(part, f'{t}_meas'):+.2f}" for t in (*TERMS, "wall")]
        lines.append(f"| {kind} | {part['steps']:.0f} | " + " | ".join(per_step + gaps) + " |")
    return lines


def decode_lines(runs: list[tuple[str, dict[str, dict[str, float]], dict[str, float]]]) -> list[str]:
    """Ordinary decode steps by batch size, per run: device and host per step, KV tokens read."""
    header = ["run", "batch", "steps", "KV tokens read (k)", "device per step meas/pred (ms)", "host per step meas/pred (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, sums, kv in runs:
        for kind in sorted((k for k in sums if k != OTHER_STEPS), key=lambda k: int(k.split("-")[0].rstrip("+"))):
            part = sums[kind]
            lines.append(f"| {label} | {kind} | {part['steps']:.0f} | {kv.get(kind, 0.0) / KV_PER_K:.1f} | "
                         f"{_per_step(part, 'device_meas', 'device_pred')} | {_per_step(part, 'host_meas', 'host_pred')} |")
    return lines


def miss_section(grid: GridCell, missed: list[str], sums: dict[str, dict[str, float]],
                 decode: list[tuple[str, dict[str, dict[str, float]], dict[str, float]]], kv_ns: float | None) -> list[str]:
    kind, wall_gap, device_gap, host_gap = furthest_class(sums)
    measured = sum(summed(part, "wall_meas") for part in sums.values())
    predicted = sum(summed(part, "wall_pred") for part in sums.values())
    class_wall = summed(sums[kind], "wall_meas")
    notes = [f"Over all steps the replay predicts {predicted:.2f} s of wall time against {measured:.2f} s measured "
             f"({(predicted / measured - 1) * 100:+.1f}%). Furthest off: `{kind}` steps, wall {wall_gap:+.2f} s "
             f"({wall_gap / class_wall * 100:+.1f}% of theirs): device {device_gap:+.2f} s, host {host_gap:+.2f} s."]
    if abs(predicted / measured - 1) * 100 <= REPLAY_CLOSE_PCT:
        notes.append(f"With the measured steps priced within {REPLAY_CLOSE_PCT:g}% and the scheduler model forming the "
                     "engine's batches (driven on the engine's clock it forms every step of every grid run: "
                     "`lab/schedule_fidelity.py`), what misses is where the price errors fall: a request's TTFT error is "
                     "the simulated clock's error at its first token, the price error of every step since the engine was "
                     "last idle, so under load a few mispriced steps early in the run (the CUDA-graph captures) weigh on "
                     "the short TTFTs of the first requests.")
    if grid.mode == "default":
        notes.append("Without CUDA graphs the device waits for the host's kernel launches, so steps.parquet `device_s` "
                     "holds launch gaps the calibration counts as host time: read the wall columns.")
    if grid.mode == "async":
        notes.append("With async batching the host's cycle overlaps the previous step's device time, so a row's wall "
                     "time minus its device time is not the host time the simulator adds: read the device columns.")
    compared = " and, for comparison, the same round's cell without async batching" if len(decode) > 1 else ""
    return [
        f"### {grid.name}",
        "",
        f"Missed: {', '.join(missed)}. `{grid.runs[0]}` (the simulated round), every measured step replayed:",
        "",
        *breakdown_lines(sums),
        "",
        " ".join(notes),
        "",
        f"Its decode steps that captured no graph, by batch size{compared}:",
        "",
        *decode_lines(decode),
        "",
        *decode_findings(decode, kv_ns),
    ]


def decode_findings(decode: list[tuple[str, dict[str, dict[str, float]], dict[str, float]]], kv_ns: float | None) -> list[str]:
    """What the decode table shows, in numbers: the device time per step of the smallest batches
    against the reference run's (async cells), and the host error per step against the KV tokens
    read, beside the KV slope that would have matched (the calibration's per-KV-token term)."""
    label, sums, kv = decode[0]
    classes = sorted((k for k in sums if k != OTHER_STEPS), key=lambda k: int(k.split("-")[0].rstrip("+")))
    if not classes:
        return []
    said = []
    if len(decode) > 1:
        _, reference, _ = decode[1]
        small = next((k for k in classes if k in reference), None)
        if small is not None:
            own, other = sums[small], reference[small]
            said.append(f"Decode steps of {small} sequences: {own['device_meas'] / own['steps'] * MS_PER_S:.1f} ms of device "
                        f"time each with async batching, {other['device_meas'] / other['steps'] * MS_PER_S:.1f} ms "
                        f"without; the step model predicts {own['device_pred'] / own['steps'] * MS_PER_S:.1f} ms.")
    largest = sums[classes[-1]]
    host_error_ms = (largest["host_pred"] - largest["host_meas"]) / largest["steps"] * MS_PER_S
    if kv_ns is not None and kv.get(classes[-1]) and len(classes) > 1:
        smallest = sums[classes[0]]
        matched = kv_ns - host_error_ms / MS_PER_S / kv[classes[-1]] * NS_PER_S
        said.append(f"Host time per decode step predicted {(smallest['host_pred'] - smallest['host_meas']) / smallest['steps'] * MS_PER_S:+.1f} ms "
                    f"off at {kv.get(classes[0], 0.0) / KV_PER_K:.1f}k KV tokens read, {host_error_ms:+.1f} ms at "
                    f"{kv[classes[-1]] / KV_PER_K:.1f}k; the calibration charges {kv_ns:.0f} ns per KV token read, "
                    f"the {classes[-1]} steps of this run would match at {matched:.0f} ns.")
    return [" ".join(said), ""] if said else []


def sync_reference(grid: GridCell, cells: Iterable[GridCell]) -> GridCell | None:
    """For an async cell, the cell of the same settings without async batching that has a run of
    the async cell's first round: what its decode steps are compared with. None otherwise."""
    if grid.mode != "async":
        return None
    for cell in cells:
        if ((cell.model_dir, cell.backend, cell.mode, cell.workload) == (grid.model_dir, grid.backend, SYNC_MODE, grid.workload)
                and grid.rounds[0] in cell.rounds):
            return cell
    return None


def decode_breakdown(label: str, run: Path, backend: str, store: str, model: str, platform: str
                     ) -> tuple[str, dict[str, dict[str, float]], dict[str, float]]:
    """One row group of the decode table: a run's ordinary decode steps by batch size."""
    import pyarrow.parquet as pq

    sums = step_breakdown(run, backend, store, model, step_class=decode_class, platform=platform)
    return label, sums, decode_kv_means(pq.read_table(run / "steps.parquet").to_pylist())


def served_lines(cells: list[GridCell], data: Path, platform: str) -> list[str]:
    """What was served, from each model's first cell's bench.json, every path's engine.json and the
    grid's GPU report (else the store's platform name)."""
    bench = json.loads((cells[0].runs[0] / "bench.json").read_text())
    models = ", ".join(sorted({json.loads((c.runs[0] / "bench.json").read_text())["model"] for c in cells}))
    stack = bench["stack"]
    report = data / GPU_REPORT
    gpu = gpu_name(report, platform)
    workloads = {}
    for cell in cells:
        workload = json.loads((cell.runs[0] / "bench.json").read_text())["workload"]
        workloads[cell.workload] = (f"{cell.workload}: {workload['num_requests']} requests, {workload['rate']:g} req/s "
                                    f"({workload['arrival']}), prompts {workload['prompt']['low']}-{workload['prompt']['high']}, "
                                    f"outputs {workload['output']['low']}-{workload['output']['high']} tokens")
    settings = {}
    for cell in cells:
        engine = json.loads((cell.runs[0] / "engine.json").read_text())
        shown = ", ".join(f"{key}={engine[key]}" for key in SETTINGS_SHOWN if key in engine)
        settings[(cell.backend, cell.mode)] = (f"`paged|{cell.backend}` {MODE_LABELS.get(cell.mode, cell.mode)} "
                                               f"(use_cuda_graph={engine.get('use_cuda_graph')}, "
                                               f"use_async_batching={engine.get('use_async_batching')}, {shown})")
    rounds = sorted({r for cell in cells for r in cell.rounds}, key=_round_order)
    return [
        f"**What was served.** {models} (their bundled configs, random weights, {bench['dtype']}) on "
        f"{stack['engine']} {stack['engine_version']} continuous batching, torch {stack['torch_version']}, "
        f"in-process, cold runs (warm passes: {bench['warm_passes']}), one {gpu}. Workloads: "
        + "; ".join(workloads[w] for w in sorted(workloads, key=lambda w: _rank(w, WORKLOAD_ORDER))) + ". Engine paths: "
        + "; ".join(settings.values()) + f". Rounds {', '.join(rounds)} of `{data}`; the runs column counts the rounds "
        "a cell has.",
    ]


@dataclass(frozen=True)
class Sources:
    """What one page is generated from: the platform's settings, its flag on the command line, the
    grid, the committed store fitted (or the fitted store given) and the record written beside it."""

    settings: PlatformSettings
    key: str
    data: Path
    store: Path
    record: Path

    @property
    def command(self) -> str:
        """The command that regenerates the page (the platform's flag only where it is not the default)."""
        flag = "" if self.key == DEFAULT_PLATFORM else f" --platform {self.key}"
        return f"python reports/engine_grid_table.py{flag}"


def page(sources: Sources, cells: list[GridCell], notes: dict[EnginePath, CalibrationNote],
         results: list[tuple[GridCell, Cell, dict[str, Any]]], sections: list[str], skipped: list[GridCell]) -> str:
    passed = sum(1 for _, cell, payload in results if not misses(cell, payload))
    calibration_lines = [f"- {path.label}: {note.text}" for path, note in notes.items()]
    skipped_lines = [f"Not validated (no calibration): {', '.join(c.name for c in skipped)}.", ""] if skipped else []
    lines = [
        f"# Engine paths on the {sources.settings.gpu}: the grid of {', '.join(grid_models(cells))}",
        "",
        f"Generated by `{sources.command} [--fitted-store STORE]` (from the repository root; without "
        f"`--fitted-store` it merges and fits a copy of {sources.store}). Do not edit by hand.{sources.settings.see_also}",
        "",
        *served_lines(cells, sources.data, sources.settings.platform),
        "",
        f"**Targets (issue #24).** Heavy cells: per-request TTFT MAPE within {HEAVY_TTFT_MAPE_PCT:g}% and TPOT within "
        f"{HEAVY_TPOT_MAPE_PCT:g}%. Every cell: mean and p90 of TTFT and TPOT within {SUMMARY_TARGET_PCT:g}% or the "
        "engine's floor (the largest difference between the cell's repeated runs), whichever is larger.",
        "",
        "**Calibrations** (host time per step, per engine path; docs/calibration.md):",
        "",
        *calibration_lines,
        "",
        "## Cells",
        "",
        "Measured / predicted in ms, error of the prediction (error > 0: predicted slower; floor in brackets where the "
        "cell has repeats), per-request MAPE and the MAPE of every measured step replayed through the step model. "
        f"{passed} of {len(results)} cells pass. Per-cell numbers: `{sources.record}`.",
        "",
        *cell_table([(cell, payload) for _, cell, payload in results]),
        "",
        *skipped_lines,
        "## Where the misses come from",
        "",
        "For each missed cell, its simulated round's measured steps replayed as `dooly validate` replays them, split into "
        "device time (the store's prediction against steps.parquet `device_s`) and host time (the calibration's "
        "against the step's wall time minus `device_s`), per step class (the calibration path, and whether the step "
        "captured a CUDA graph in the engine); per step, then summed over the run.",
        "",
        *sections,
        "## Regenerate",
        "",
        "```",
        sources.command,
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default=DEFAULT_PLATFORM,
                        help="Whose grid: its data, store, platform name and page (PLATFORMS).")
    parser.add_argument("--fitted-store", help="A fitted store (read only: copied first); default: fit a copy of --store here.")
    parser.add_argument("--data", help="The grid's rounds; default: the platform's experiments/engine_grid.")
    parser.add_argument("--store", help="The committed store to fit; default: the platform's db.")
    parser.add_argument("--out", help="The page to write; default: the platform's page.")
    parser.add_argument("--record", help="Where the per-cell numbers go (JSON); default: validation.json in --data.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = PLATFORMS[args.platform]
    data = Path(args.data) if args.data else settings.data
    sources = Sources(settings, args.platform, data, Path(args.store) if args.store else settings.store,
                      Path(args.record) if args.record else data / RECORD)
    cells = discover(data)
    if not cells:
        raise SystemExit(f"no grid cells under {data}")
    with tempfile.TemporaryDirectory(prefix="engine-grid-") as scratch:
        if args.fitted_store:
            store = str(Path(scratch) / "store")
            shutil.copytree(args.fitted_store, store)
        else:
            store = fit_copy(sources.store, Path(scratch))
        paths = {cell: engine_path(cell.runs[0]) for cell in cells}
        notes = calibrations(store, dict.fromkeys(paths.values()), settings)
        results, skipped, sections = [], [], []
        for grid in cells:
            if not notes[paths[grid]].usable:
                skipped.append(grid)
                continue
            cell = Cell(grid.name, grid.backend, grid.workload, grid.runs, model=run_model(grid.runs[0]),
                        platform=settings.platform)
            payload = validate(cell, store)
            results.append((grid, cell, payload))
            missed = misses(cell, payload)
            if missed:
                sums = step_breakdown(grid.runs[0], grid.backend, store, cell.model, step_class=path_class,
                                      platform=settings.platform)
                decode = [decode_breakdown(f"{grid.name} {grid.rounds[0]}", grid.runs[0], grid.backend, store, cell.model,
                                           settings.platform)]
                reference = sync_reference(grid, cells)
                if reference is not None:
                    decode.append(decode_breakdown(f"{reference.name} {grid.rounds[0]}",
                                                   reference.runs[reference.rounds.index(grid.rounds[0])],
                                                   grid.backend, store, cell.model, settings.platform))
                kv_ns = notes[paths[grid]].kv_ns if grid.mode == SYNC_MODE else None
                sections += miss_section(grid, missed, sums, decode, kv_ns)
    record = {"schema": RECORD_SCHEMA, "platform": settings.platform, "data": str(data),
              "targets": {"summary_pct": SUMMARY_TARGET_PCT, "heavy_ttft_mape_pct": HEAVY_TTFT_MAPE_PCT,
                          "heavy_tpot_mape_pct": HEAVY_TPOT_MAPE_PCT, "statistics": list(TARGET_ROWS)},
              "calibrations": [{"backend": p.backend, "cuda_graphs": p.graphs, "async_batching": p.asynchronous,
                                "note": n.text, "usable": n.usable}
                               for p, n in notes.items()],
              "cells": [cell_record(grid, cell, payload) for grid, cell, payload in results],
              "not_validated": [grid.name for grid in skipped]}
    out = Path(args.out) if args.out else settings.page
    sources.record.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    out.write_text(page(sources, cells, notes, results, sections, skipped))
    log.info("wrote %s and %s", out, sources.record)


if __name__ == "__main__":
    main()
