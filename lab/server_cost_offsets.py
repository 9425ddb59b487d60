"""Which per-request offsets should a server-cost record carry? Held out by model, four forms.

A `dooly server-costs` record holds a step term (extra host time per engine step) and per-request
TTFT/TPOT offsets: the residual left after the step term is simulated, pooled over every paired
cell. At heavy load a request's TTFT is mostly queueing, so a heavy cell's residual holds whatever
the step term misses, amplified by the queue, and the pooled median carries that into light cells
(lease3's -99 ms took 0.1 s off every light request: docs/engine-paths-http-h100.md). This script
asks, on the committed pairs, whether a record predicts a model it was not measured on better with

- `pooled`: its step term and its offsets (median over all its cells), both applied;
- `light`: its step term, offsets from its light cells only (the mean of their residual medians);
- `zero`: its step term, no per-request offsets;
- `record`: the record as `dooly validate` applies it (each offset only where it passed its load
  and model checks: `ServerCosts.applied_offsets`);

beside `none` (no server costs). The first three are written as one-cell records, so that
`dooly validate` applies their offsets whatever the load and model checks found (a negative median
it withholds in every form). Each model's HTTP cells (with their repeats: the floor) are
validated with the record measured on the other models' pairs of the same path and lease. Data:
data/h200/experiments/engine_paths/lease_d (graphs; 1B, 3B, 8B) and
data/h100/experiments/engine_paths/lease5 (async, no graphs, eager graphs; 1B, 3B).

    python lab/server_cost_offsets.py --h200-store FITTED_H200 --h100-store FITTED_H100 [--out FILE]

Its last output: data/h100/experiments/engine_paths/server_cost_offsets.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "reports"))

from engine_paths_http_h200 import pass_cells  # noqa: E402
from engine_paths_table import Cell, dooly, rows_by_key, validate, verdict  # noqa: E402

log = logging.getLogger("server_cost_offsets")

FORMS = ("none", "pooled", "light", "zero", "record")
WORKLOADS = ("light", "heavy")


@dataclass(frozen=True)
class Lease:
    """One lease's paired HTTP and in-process cells: where, on what, and which paths."""

    name: str
    root: Path
    platform: str
    models: tuple[str, ...]
    paths: tuple[tuple[str, str], ...]  # (cell suffix, backend)
    repeats: tuple[str, ...] = ()

    def http_runs(self, model: str, suffix: str, workload: str) -> tuple[Path, ...]:
        name = f"{model}.{suffix}.{workload}"
        return tuple(self.root / d / name for d in ("http", *self.repeats) if (self.root / d / name).is_dir())

    def pair(self, model: str, suffix: str, workload: str) -> Path:
        return self.root / "pairs" / f"{model}.{suffix}.{workload}"


LEASES = (
    Lease("H200 lease_d", ROOT / "data/h200/experiments/engine_paths/lease_d", "NVIDIA-H200",
          ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B"), (("paged-sdpa.graphs", "sdpa"),)),
    Lease("H100 lease5", ROOT / "data/h100/experiments/engine_paths/lease5", "NVIDIA-H100-80GB-HBM3",
          ("Llama-3.2-1B", "Llama-3.2-3B"),
          (("paged-sdpa.async", "sdpa"), ("paged-sdpa.default", "sdpa"), ("paged-eager.graphs", "eager")),
          ("http_r2", "http_r3")),
)


def record_forms(lease: Lease, suffix: str, held_out: str, store: str, scratch: Path) -> dict[str, Path] | str:
    """The record of the other models' pairs of this path in each form, or why there is none."""
    flags: list[str] = []
    for model in lease.models:
        if model == held_out:
            continue
        for workload in WORKLOADS:
            runs = lease.http_runs(model, suffix, workload)
            if runs and lease.pair(model, suffix, workload).is_dir():
                flags += ["--http", str(runs[0]), "--inprocess", str(lease.pair(model, suffix, workload))]
    if not flags:
        return "no pair of another model"
    base = scratch / f"{lease.root.name}.{suffix}.without-{held_out}.json"
    dooly("server-costs", *flags, "--store", store, "--out", str(base))
    document: dict[str, Any] = json.loads(base.read_text())
    raw = [document[k]["median_s"] for k in ("raw_ttft", "raw_tpot") if document.get(k)]
    if any(v < 0 for v in raw):
        return "refused (raw median offset below zero)"
    light = [c for c in document["cells"] if c["http"].endswith(".light")]
    forms = {"record": base}
    for form, (ttft, tpot) in (("pooled", (document["ttft"]["median_s"], document["tpot"]["median_s"])),
                               ("light", (_mean_median(light, "ttft"), _mean_median(light, "tpot"))),
                               ("zero", (0.0, 0.0))):
        changed = json.loads(json.dumps(document))
        changed["ttft"]["median_s"], changed["tpot"]["median_s"] = ttft, tpot
        # One cell: no pair of cells to fail a load or model check, so validate applies these offsets.
        changed["cells"] = changed["cells"][:1]
        path = scratch / f"{base.stem}.{form}.json"
        path.write_text(json.dumps(changed))
        forms[form] = path
    return forms


def _mean_median(cells: list[dict[str, Any]], term: str) -> float:
    return sum(c[term]["median_s"] for c in cells) / len(cells) if cells else 0.0


def _mean_abs_errors(done: list[tuple[Cell, dict[str, Any]]]) -> str:
    """`TTFT% / TPOT%`: the mean absolute error of the cells' mean TTFT and mean TPOT."""
    if not done:
        return "-"
    rows = [rows_by_key(payload) for _, payload in done]
    return " / ".join(f"{sum(abs(r[key]['error_pct']) for r in rows) / len(rows):.1f}%"
                      for key in ("ttft_mean", "tpot_mean"))


def validate_forms(lease: Lease, suffix: str, backend: str, model: str, forms: dict[str, Path], store: str
                   ) -> list[tuple[str, Cell, dict[str, Any]]]:
    """The held-out model's HTTP cells of this path (with their repeats: the floor), validated
    without server costs and with the record in each form."""
    done = []
    for form in FORMS:
        for workload in WORKLOADS:
            runs = lease.http_runs(model, suffix, workload)
            if not runs:
                continue
            extra = () if form == "none" else ("--server-costs", str(forms[form]))
            bench = json.loads((runs[0] / "bench.json").read_text())
            cell = Cell(f"{model} {suffix} {workload}", backend, workload, runs, extra=extra,
                        model=str(bench["model"]), platform=lease.platform)
            done.append((form, cell, validate(cell, store)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--h200-store", required=True)
    parser.add_argument("--h100-store", required=True)
    parser.add_argument("--out", help="Markdown file to write (default: stdout).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    stores = {"H200 lease_d": args.h200_store, "H100 lease5": args.h100_store}
    results: dict[str, list[tuple[Cell, dict[str, Any]]]] = {form: [] for form in FORMS}
    rows = ["| lease | path | held-out model | form | cell | verdict | TTFT mean err | TPOT mean err |",
            "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="server-cost-offsets-") as scratch:
        for lease in LEASES:
            store = stores[lease.name]
            for suffix, backend in lease.paths:
                for model in lease.models:
                    forms = record_forms(lease, suffix, model, store, Path(scratch))
                    if isinstance(forms, str):
                        # No record to compare with `none` on: the cells stay out of every form's count.
                        rows.append(f"| {lease.name} | {suffix} | {model} | all | all | {forms} | | |")
                        continue
                    for form, cell, payload in validate_forms(lease, suffix, backend, model, forms, store):
                        results[form].append((cell, payload))
                        summary = rows_by_key(payload)
                        rows.append(f"| {lease.name} | {suffix} | {model} | {form} | {cell.workload} | "
                                    f"{'pass' if verdict(cell, payload) == 'pass' else 'miss'} | "
                                    f"{summary['ttft_mean']['error_pct']:+.1f}% | {summary['tpot_mean']['error_pct']:+.1f}% |")
    totals = ["| form | cells passing | mean abs. error of mean TTFT / TPOT, light cells | heavy cells |",
              "|---|---|---|---|"]
    for form in FORMS:
        passing, _ = pass_cells(results[form]) if results[form] else (0, "")
        errors = [_mean_abs_errors([(c, p) for c, p in results[form] if c.workload == w]) for w in WORKLOADS]
        totals.append(f"| {form} | {passing} of {len(results[form])} | {errors[0]} | {errors[1]} |")
    text = "\n".join(["# Server-cost offsets held out by model", "", *totals, "", *rows, ""])
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
