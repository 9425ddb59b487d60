"""The H100's HTTP cells of every engine path but plain graphs against the simulator: docs/engine-paths-http-h100.md.

One H100 lease (data/h100/experiments/engine_paths/lease4; `device/grid_cells.sh` groups with the
`http` client) served Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (random weights) on transformers
continuous batching behind `transformers serve`, timed at an HTTP client, on three engine paths
(`paged|sdpa` graphs + async batching, `paged|sdpa` without graphs, `paged|eager` with graphs) and
the light and heavy workloads; the 8B's cells also in-process on the same lease (`pairs/`). This
script

1. measures the server's costs of each path from the 8B's pairs of that path (`dooly server-costs`;
   the light pairs' steps are batch-matched, the heavy ones' paired step for step; the eager path
   has its light pair only, so its load check cannot run);
2. validates every HTTP cell without server costs, with the H100's lease3 record (Qwen2.5-7B's
   `paged|sdpa` graphs heavy pair: another model, lease and path, docs/server-costs.md) and with
   its path's 8B record (in sample for the 8B, model held out for the 1B and 3B), and the
   in-process runs for reference: the 8B's pairs, and the 1B's and 3B's grid runs of another lease
   (data/h100/experiments/engine_grid r1, r2; their repeats give the in-process floor);
3. sets the measured differences (HTTP minus in-process) side by side;
4. writes the page.

    python reports/engine_paths_http_h100.py --fitted-store FITTED_H100_STORE [--out docs/engine-paths-http-h100.md]

Run from the repository root (the page names the data by relative path).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# engine_paths_table lives in bench/ (a script folder, not a package), as engine_grid_table reads it.
sys.path.insert(0, str(ROOT / "bench"))

from engine_paths_http_h200 import (  # noqa: E402
    VALIDATION_HEADER,
    held_out_records,
    measured_differences,
    pass_cells,
    problem_summary,
    validation_row,
)
from engine_paths_table import (  # noqa: E402
    HEAVY_TPOT_MAPE_PCT,
    HEAVY_TTFT_MAPE_PCT,
    SUMMARY_TARGET_PCT,
    Cell,
    dooly,
    gpu_name,
    step_term_lines,
    validate,
    write_page,
)

log = logging.getLogger("engine_paths_http_h100")

PLATFORM = "NVIDIA-H100-80GB-HBM3"
DATA = Path("data/h100/experiments/engine_paths/lease4")
GRID = Path("data/h100/experiments/engine_grid")
GRID_ROUNDS = ("r1", "r2")
LEASE3_RECORD = Path("data/h100/experiments/engine_paths/lease3/server_costs.json")
GPU_REPORT = DATA / "gpu.txt"
PAGE = Path("docs/engine-paths-http-h100.md")
MODELS = ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B")
# The model whose cells were also served in-process on the lease: each path's record is measured on it.
PAIRED_MODEL = "Llama-3.1-8B"
WORKLOADS = ("light", "heavy")
HTTP_DIR, PAIRS_DIR = "http", "pairs"


@dataclass(frozen=True)
class EnginePath:
    """One engine path: its label, the attention backend and the cell name's middle part."""

    label: str
    backend: str
    suffix: str
    # Whether the lease3 record (`paged|sdpa`, graphs on) may serve it: a record is keyed by the
    # backend and whether CUDA graphs are on (not by async batching), and refused for any other.
    lease3_applies: bool


PATHS = (EnginePath("graphs + async", "sdpa", "paged-sdpa.async", True),
         EnginePath("no graphs", "sdpa", "paged-sdpa.default", False),
         EnginePath("eager graphs", "eager", "paged-eager.graphs", False))
NONE, LEASE3, SAME_PATH = "none", "lease3 record", "8B record of the path"
VARIANTS = (NONE, LEASE3, SAME_PATH)
VARIANT_NOTES = {
    NONE: "no server costs",
    LEASE3: "the lease3 record of Qwen2.5-7B's `paged|sdpa` graphs heavy pair (model, lease and async batching "
            "held out; keyed to `paged|sdpa` with graphs, so the async cells only)",
    SAME_PATH: f"measured on {PAIRED_MODEL}'s pairs of the cell's path on this lease (in sample for the 8B; model "
               "held out for the 1B and 3B)",
}
INPROCESS = "in-process (reference)"
SHOWN = ("ttft_mean", "ttft_p90", "tpot_mean", "tpot_p90")


@dataclass(frozen=True)
class HttpCell:
    """One HTTP cell of the lease: its model, engine path and workload."""

    model: str
    path: EnginePath
    workload: str

    @property
    def dirname(self) -> str:
        return f"{self.model}.{self.path.suffix}.{self.workload}"

    def run(self, client: str = HTTP_DIR) -> Path:
        return DATA / client / self.dirname

    @property
    def name(self) -> str:
        return f"{self.model} {self.path.label} {self.workload}"

    @property
    def hf_model(self) -> str:
        """The served model's id, as the run's bench.json names it."""
        return str(json.loads((self.run() / "bench.json").read_text())["model"])

    def inprocess(self) -> tuple[str, tuple[Path, ...]]:
        """The in-process runs of the same cell: the lease's pair, else the grid's rounds (another lease)."""
        pair = self.run(PAIRS_DIR)
        if pair.is_dir():
            return "same lease", (pair,)
        runs = tuple(GRID / r / self.dirname for r in GRID_ROUNDS if (GRID / r / self.dirname).is_dir())
        return f"grid {', '.join(r.parent.name for r in runs)}, another lease", runs


CELLS = tuple(HttpCell(m, p, w) for p in PATHS for m in MODELS for w in WORKLOADS)


@dataclass(frozen=True)
class PathRecord:
    """A path's server-cost record: its file, its document and why `dooly validate` refuses it
    (its raw median offsets below zero; empty: it applies)."""

    path: Path
    document: dict[str, Any]
    refused: list[str]


def measure_record(pairs: list[tuple[Path, Path]], store: str, out: Path) -> PathRecord:
    """`dooly server-costs` over (HTTP run, in-process run) pairs, written to `out`, with why
    `dooly validate` refuses it (empty: it applies)."""
    from dooly.sim.server_costs import ServerCosts

    flags = [a for http, inprocess in pairs for a in ("--http", str(http), "--inprocess", str(inprocess))]
    document = dooly("server-costs", *flags, "--store", store, "--out", str(out))
    return PathRecord(out, document, ServerCosts.load(out).negative_offsets())


def path_records(store: str, scratch: Path) -> dict[str, PathRecord]:
    """Each path's record, measured on the paired model's HTTP and in-process runs of that path."""
    records: dict[str, PathRecord] = {}
    for path in PATHS:
        pairs = [c for c in CELLS if c.path == path and c.model == PAIRED_MODEL and c.run(PAIRS_DIR).is_dir()]
        records[path.label] = measure_record([(c.run(), c.run(PAIRS_DIR)) for c in pairs], store,
                                             scratch / f"{path.suffix}.json")
    return records


def validations(store: str, records: dict[str, PathRecord]
                ) -> dict[str, dict[str, tuple[Cell, dict[str, Any]]]]:
    """Every HTTP cell under each variant, and the cell's in-process runs."""
    out: dict[str, dict[str, tuple[Cell, dict[str, Any]]]] = {}
    for http in CELLS:
        out[http.name] = {}
        for variant in VARIANTS:
            if variant == LEASE3 and not http.path.lease3_applies:
                continue
            extra: tuple[str, ...] = ()
            if variant == LEASE3:
                extra = ("--server-costs", str(LEASE3_RECORD))
            elif variant == SAME_PATH:
                if records[http.path.label].refused:
                    continue
                extra = ("--server-costs", str(records[http.path.label].path))
            cell = Cell(f"{http.name}, {variant}", http.path.backend, http.workload, (http.run(),), extra=extra,
                        model=http.hf_model, platform=PLATFORM)
            out[http.name][variant] = (cell, validate(cell, store))
        where, runs = http.inprocess()
        if runs:
            cell = Cell(f"{http.name}, in-process ({where})", http.path.backend, http.workload, runs,
                        model=http.hf_model, platform=PLATFORM)
            out[http.name][INPROCESS] = (cell, validate(cell, store))
    return out


def pass_counts(results: dict[str, dict[str, tuple[Cell, dict[str, Any]]]], cells: tuple[Any, ...] = CELLS,
                variants: tuple[str, ...] = (*VARIANTS, INPROCESS), heavy_models: str = "1B, 3B, 8B",
                refused: dict[str, dict[str, str]] | None = None,
                paths: tuple[EnginePath, ...] = PATHS) -> list[str]:
    """Per variant and path (of `paths`): how many of `cells` (each with a `name` and an engine
    `path`) pass, and the heavy cells' per-request MAPEs; where `dooly validate` refused a variant's
    record for some cells of a path (`refused[variant][path label]`: why), a row saying so."""
    header = ["server costs", "path", "cells passing", "largest abs. error of mean and p90 TTFT / TPOT",
              f"TTFT MAPE, heavy cells ({heavy_models})", "TPOT MAPE, heavy cells"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        total = 0
        for path in paths:
            done = [results[c.name][variant] for c in cells if c.path == path and variant in results[c.name]]
            if done:
                passing, counts = pass_cells(done)
                total += passing
                lines.append(f"| {variant} | {path.label} | {counts} |")
            why = (refused or {}).get(variant, {}).get(path.label)
            if why:
                lines.append(f"| {variant} | {path.label} | refused: {why} | | | |")
        lines.append(f"| {variant} | all | {total} of {sum(variant in results[c.name] for c in cells)} | | | |")
    return lines


def validation_table(results: dict[str, dict[str, tuple[Cell, dict[str, Any]]]],
                     cells: tuple[Any, ...] = CELLS) -> list[str]:
    """Per cell and variant: the errors of mean and p90 TTFT and TPOT (floor in brackets where the
    runs repeat), the per-request MAPE and the verdict."""
    lines = ["| " + " | ".join(VALIDATION_HEADER) + " |", "|" + "---|" * len(VALIDATION_HEADER)]
    for http in cells:
        for variant, (cell, payload) in results[http.name].items():
            label = variant if variant != INPROCESS else cell.name.split(", ", 1)[1]
            lines.append(validation_row(http.name, label, cell, payload))
    return lines


def differences() -> list[str]:
    """HTTP minus in-process, measured: the 8B's pairs (same lease), the 1B's and 3B's HTTP cells
    against their first grid round (another lease)."""
    runs = []
    for http in CELLS:
        where, inprocess = http.inprocess()
        if inprocess:
            runs.append((f"H100 ({where.split(',')[0]})", http.name, http.run(), inprocess[0]))
    return measured_differences(runs)


def record_rows(records: dict[str, PathRecord]) -> list[str]:
    """Each path's record: its step term, residual offsets and failed checks (the H200 page's table)."""
    documents = {f"{PAIRED_MODEL} {label}": record.document for label, record in records.items()}
    documents["lease3 (Qwen2.5-7B graphs heavy)"] = json.loads(LEASE3_RECORD.read_text())
    return held_out_records(documents)


def record_section(title: str, record: PathRecord) -> list[str]:
    """A record's subsection: its step term, its failed checks and, where `dooly validate` refuses
    it, why."""
    why = record.refused
    verdict_line = ([f"`dooly validate` refuses this record: {', '.join(why)} below zero (the HTTP runs were faster "
                     "than their in-process pairs)."] if why else [])
    return [f"### {title}", "", *step_term_lines(record.document), "",
            "Checks:", "", *problem_summary(record.document), "", *verdict_line, ""]


def page(gpu: str, records: dict[str, PathRecord],
         results: dict[str, dict[str, tuple[Cell, dict[str, Any]]]]) -> str:
    record_sections = [line for label, record in records.items()
                       for line in record_section(f"{PAIRED_MODEL}, {label}", record)]
    return "\n".join([
        "# At an HTTP client on the H100: async batching, no graphs and eager graphs, three Llama models",
        "",
        "Generated by `python reports/engine_paths_http_h100.py --fitted-store STORE` (from the repository root, on a "
        "fitted copy of the H100 store; see Regenerate). Do not edit by hand. The `paged|sdpa` graphs path at a "
        "client: [engine-paths.md](engine-paths.md#at-an-http-client) (H100), "
        "[engine-paths-h200.md](engine-paths-h200.md) (H200); what the server costs: [server-costs.md](server-costs.md); "
        "the 1B's and 3B's cells of these paths paired in-process on one later lease, with repeats: "
        "[engine-paths-http-h100-lease5.md](engine-paths-http-h100-lease5.md).",
        "",
        "**What was served.** meta-llama/Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (bundled configs, random weights, "
        f"bfloat16) on transformers 5.17.0 continuous batching, torch 2.11.0+cu130, one lease of an {gpu}, behind "
        "`transformers serve --continuous-batching`, streamed and timed at the client (`dooly bench --client http`): "
        "`paged|sdpa` graphs + async batching and `paged|sdpa` without graphs (num_blocks=1024, max_batch_tokens=2048), "
        "`paged|eager` with graphs (num_blocks=512, max_batch_tokens=512), on `device/workloads/light.json` (40 "
        "requests, 4 req/s) and `heavy.json` (96 requests, 32 req/s). Llama-3.1-8B's cells also in-process on the same "
        f"lease (its eager heavy pair was cut by the call's deadline). Data: `{DATA}`.",
        "",
        f"**Targets (issue #24).** Heavy cells: per-request TTFT MAPE within {HEAVY_TTFT_MAPE_PCT:g}% and TPOT within "
        f"{HEAVY_TPOT_MAPE_PCT:g}%. Every cell: mean and p90 of TTFT and TPOT within {SUMMARY_TARGET_PCT:g}% (one run "
        "per HTTP cell, so no floor; the in-process reference of the 1B and 3B has the grid's two rounds).",
        "",
        "**Findings.** At a client these paths miss more than in-process, and no measured server-cost record "
        "serves them. (1) The engine paths miss in-process too, at light load most (the async path's captures at "
        "new shapes, docs/calibration.md \"Async batching's light-load TTFT\"; the no-graph path's host regime, "
        "\"No-graph `paged|sdpa` at light load\"), so the in-process reference passes only some cells. "
        "(2) The server's engine spends 1.2-3.8x the in-process host time per step where both are measured "
        "(the no-graph and eager rows of the first table; an async step's host work overlaps the device's), and its "
        "light cells lose most: the 3B's no-graph and eager light TPOT +44-49% against the grid's in-process runs "
        "of another lease. (3) Within this one lease the 8B's in-process light runs of the async and no-graph "
        "paths, served about twenty minutes after their HTTP cells, were 30-33% slower than the HTTP ones "
        "(the eager light pair agreed within 0.1% TTFT, the heavy pairs within 3%): the host's regime moved "
        "within the lease. Records measured from those pairs have negative raw offsets, which `dooly validate` "
        "refuses to apply, so those two paths have no record of their own here. (4) The lease3 record "
        "(Qwen2.5-7B, graphs, heavy) on the async cells brings the heavy cells' TPOT MAPE down; its residual "
        "offsets (TTFT -125.4 ms, TPOT -0.67 ms, measured at heavy load only, after its step and capture terms) "
        "are below zero, so `dooly validate` leaves them out (applied, the first generation's -98.6 ms TTFT took "
        "about 0.1 s off every light request). (5) The eager path's record, from its light pair "
        "alone (the two engines ran other batches, so its steps are batch-matched: about +5.4 ms of host time per "
        "step), passes 4 of 6 cells, its three heavy cells within the targets; its residual TTFT offset (-76 ms, "
        "one light pair) is left out as below zero. What would settle it: pairs "
        "served back to back per cell and repeated, so that a pair shares the host's regime, and heavy pairs of "
        "every path.",
        "",
        "## What the server adds, measured",
        "",
        "HTTP minus in-process at the client, and the engines' host time per step (wall minus device time, steps "
        "that captured no graph). The 8B's in-process runs are of the same lease, the 1B's and 3B's of another "
        "(the grid's r1): lease differences are in theirs.",
        "",
        *differences(),
        "",
        "## The records",
        "",
        *record_rows(records),
        "",
        *record_sections,
        "## Validated",
        "",
        "Each HTTP cell simulated without server costs and with each record, and its in-process runs for reference. "
        "Records: " + "; ".join(f"`{v}`: {n}" for v, n in VARIANT_NOTES.items()) + ".",
        "",
        *pass_counts(results),
        "",
        *validation_table(results),
        "",
        "## Regenerate",
        "",
        "```",
        "cp -r data/h100/db /tmp/h100 && dooly merge --store /tmp/h100 && dooly fit --store /tmp/h100",
        "python reports/engine_paths_http_h100.py --fitted-store /tmp/h100",
        "```",
        "",
        f"Re-measure: `{DATA}/README.md`.",
        "",
    ])


def build(store: str, scratch: Path) -> str:
    records = path_records(store, scratch)
    results = validations(store, records)
    return page(gpu_name(GPU_REPORT, "H100"), records, results)


if __name__ == "__main__":
    write_page(__doc__, PAGE, "H100", build)
