"""The H100's lease5 HTTP cells, each paired in-process on the same lease: docs/engine-paths-http-h100-lease5.md.

One H100 lease (data/h100/experiments/engine_paths/lease5; `device/grid_cells.sh` groups, three
device calls of one session on one warm machine) served Llama-3.2-1B and Llama-3.2-3B (random
weights) on transformers continuous batching behind `transformers serve`, timed at an HTTP client,
on the engine paths of docs/engine-paths-http-h100.md (`paged|sdpa` graphs + async batching,
`paged|sdpa` without graphs, `paged|eager` with graphs) and the light and heavy workloads (the 3B's
eager path light only: 11 cells), some light cells again (`http_r2/`, `http_r3/`: their floor), and
every cell in-process after its HTTP runs (`pairs/`). This script

1. measures each path's server costs (`dooly server-costs`) from both models' pairs of the path
   (in sample) and from each model's own pairs (the other model's record holds the model out);
   and, from reports/engine_paths_http_h100.py, lease4's Llama-3.1-8B record of the path;
2. validates every HTTP cell, with all its HTTP runs (repeats give the floor), without server
   costs, with the path's record of the other model, with the pooled record and with lease4's
   record where `dooly validate` accepts it, and the cell's in-process pair for reference;
3. sets the measured differences (HTTP minus in-process, every HTTP run) and the HTTP repeats'
   spread side by side;
4. writes the page.

    python reports/engine_paths_http_h100_lease5.py --fitted-store FITTED_H100_STORE [--out docs/engine-paths-http-h100-lease5.md]

Run from the repository root (the page names the data by relative path).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# engine_paths_table lives in bench/ (a script folder, not a package), as engine_grid_table reads it;
# the lease4 page's script beside this one.
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "reports"))

import engine_paths_http_h100 as lease4  # noqa: E402
from engine_paths_http_h100 import (  # noqa: E402
    INPROCESS,
    PATHS,
    PLATFORM,
    EnginePath,
    PathRecord,
    measure_record,
    pass_counts,
    record_section,
    validation_table,
)
from engine_paths_http_h200 import held_out_records, measured_differences  # noqa: E402
from engine_paths_table import (  # noqa: E402
    HEAVY_TPOT_MAPE_PCT,
    HEAVY_TTFT_MAPE_PCT,
    HTTP_STATISTICS,
    MS_PER_S,
    SUMMARY_TARGET_PCT,
    Cell,
    gpu_name,
    server_cost_lines,
    validate,
    write_page,
)

from dooly.sim.validate import load_ground_truth, run_floor  # noqa: E402

log = logging.getLogger("engine_paths_http_h100_lease5")

DATA = Path("data/h100/experiments/engine_paths/lease5")
GPU_REPORT = DATA / "gpu.txt"
PAGE = Path("docs/engine-paths-http-h100-lease5.md")
MODELS = ("Llama-3.2-1B", "Llama-3.2-3B")
WORKLOADS = ("light", "heavy")
# The HTTP runs of a cell, first run first (the one simulated and paired), then its repeats.
HTTP_DIRS = ("http", "http_r2", "http_r3")
PAIRS_DIR = "pairs"
# Not served on this lease.
NOT_SERVED = (("Llama-3.2-3B", "paged-eager.graphs", "heavy"),)
POOLED = "both models"
NONE, HELD_OUT, IN_SAMPLE, LEASE4 = "none", "other model's record", "both models' record", "lease4 8B record"
VARIANTS = (NONE, HELD_OUT, IN_SAMPLE, LEASE4)
VARIANT_NOTES = {
    NONE: "no server costs",
    HELD_OUT: "measured on the other model's pairs of the cell's path on this lease (model held out)",
    IN_SAMPLE: "measured on both models' pairs of the path on this lease (in sample)",
    LEASE4: "measured on Llama-3.1-8B's pairs of the path on lease4 (another lease and model; "
            "docs/engine-paths-http-h100.md)",
}
REFERENCE = "in-process pair"


@dataclass(frozen=True)
class LeaseCell:
    """One cell of the lease: its model, engine path and workload, its HTTP runs and its pair."""

    model: str
    path: EnginePath
    workload: str
    data: Path = DATA  # the lease's folder (another lease's page builds its cells with its own)

    @property
    def dirname(self) -> str:
        return f"{self.model}.{self.path.suffix}.{self.workload}"

    def run(self, client: str = HTTP_DIRS[0]) -> Path:
        return self.data / client / self.dirname

    @property
    def http_runs(self) -> tuple[Path, ...]:
        """The cell's HTTP runs: the first, then its repeats."""
        return tuple(self.run(d) for d in HTTP_DIRS if self.run(d).is_dir())

    @property
    def pair(self) -> Path:
        return self.run(PAIRS_DIR)

    @property
    def name(self) -> str:
        return f"{self.model} {self.path.label} {self.workload}"

    @property
    def hf_model(self) -> str:
        """The served model's id, as the run's bench.json names it."""
        return str(json.loads((self.run() / "bench.json").read_text())["model"])


CELLS = tuple(LeaseCell(m, p, w) for p in PATHS for m in MODELS for w in WORKLOADS
              if (m, p.suffix, w) not in NOT_SERVED)


def other_model(model: str) -> str:
    return next(m for m in MODELS if m != model)


def lease_records(store: str, scratch: Path) -> dict[str, dict[str, PathRecord]]:
    """Per path: its record of both models' pairs and of each model's own."""
    records: dict[str, dict[str, PathRecord]] = {}
    for path in PATHS:
        cells = [c for c in CELLS if c.path == path]
        records[path.label] = {}
        for label, chosen in ((POOLED, cells), *[(m, [c for c in cells if c.model == m]) for m in MODELS]):
            out = scratch / f"{path.suffix}.{label.replace(' ', '-')}.json"
            records[path.label][label] = measure_record([(c.run(), c.pair) for c in chosen], store, out)
    return records


def record_for(cell: LeaseCell, variant: str, records: dict[str, dict[str, PathRecord]],
               lease4_records: dict[str, PathRecord]) -> tuple[str, PathRecord]:
    """The record a variant applies to a cell, and what it was measured on."""
    if variant == HELD_OUT:
        model = other_model(cell.model)
        return f"the {model.split('-')[-1]}'s record", records[cell.path.label][model]
    if variant == IN_SAMPLE:
        return "the pooled record", records[cell.path.label][POOLED]
    return "lease4's 8B record", lease4_records[cell.path.label]


# What a variant adds to `dooly validate` for a cell: its flags, or why its record is refused ("" where not).
Choice = tuple[tuple[str, ...], str]
Results = dict[str, dict[str, tuple[Cell, dict[str, Any]]]]


def record_choice(what: str, record: PathRecord) -> Choice:
    """A record's flags for `dooly validate`, or, where it refuses the record, why (`what`: the record)."""
    if record.refused:
        return (), f"{what}, {', '.join(record.refused)} below zero"
    return ("--server-costs", str(record.path)), ""


def validate_cells(store: str, cells: tuple[LeaseCell, ...], variants: tuple[str, ...],
                   choose: Callable[[LeaseCell, str], Choice]) -> tuple[Results, dict[str, dict[str, str]]]:
    """Every HTTP cell (all its HTTP runs) under each variant whose record `dooly validate` accepts
    (`choose`), and its in-process pair where it has one; and per variant and path, the records
    refused and why (each reason once)."""
    out: Results = {}
    refused: dict[str, dict[str, str]] = {}
    for http in cells:
        out[http.name] = {}
        for variant in variants:
            extra, why = choose(http, variant)
            if why:
                reasons = refused.setdefault(variant, {})
                if why not in reasons.get(http.path.label, ""):
                    reasons[http.path.label] = "; ".join(filter(None, (reasons.get(http.path.label), why)))
                continue
            cell = Cell(f"{http.name}, {variant}", http.path.backend, http.workload, http.http_runs, extra=extra,
                        model=http.hf_model, platform=PLATFORM)
            out[http.name][variant] = (cell, validate(cell, store))
        if http.pair.is_dir():
            cell = Cell(f"{http.name}, {REFERENCE}", http.path.backend, http.workload, (http.pair,),
                        model=http.hf_model, platform=PLATFORM)
            out[http.name][INPROCESS] = (cell, validate(cell, store))
    return out, refused


def validations(store: str, records: dict[str, dict[str, PathRecord]], lease4_records: dict[str, PathRecord]
                ) -> tuple[Results, dict[str, dict[str, str]]]:
    """This lease's cells under every variant (`validate_cells`)."""
    def choose(cell: LeaseCell, variant: str) -> Choice:
        return ((), "") if variant == NONE else record_choice(*record_for(cell, variant, records, lease4_records))

    return validate_cells(store, CELLS, VARIANTS, choose)


def started(run: Path) -> float:
    return float(json.loads((run / "bench.json").read_text())["started_at_unix"])


def serving_order(cells: tuple[LeaseCell, ...] = CELLS) -> list[str]:
    """When each cell's HTTP runs and its pair started, in minutes after the lease's first cell."""
    first = min(started(run) for c in cells for run in (*c.http_runs, c.pair) if run.is_dir())
    header = ["cell", *[f"{d} (min)" for d in HTTP_DIRS], f"{PAIRS_DIR} (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in cells:
        times = [f"{(started(run) - first) / 60:.1f}" if run.is_dir() else ""
                 for run in (*(cell.run(d) for d in HTTP_DIRS), cell.pair)]
        lines.append(f"| {cell.name} | {' | '.join(times)} |")
    return lines


def differences(cells: tuple[LeaseCell, ...] = CELLS) -> list[str]:
    """HTTP minus in-process, every HTTP run of every paired cell against its pair (same lease)."""
    return measured_differences([("H100 (same lease)", f"{c.name} ({run.parent.name})", run, c.pair)
                                 for c in cells if c.pair.is_dir() for run in c.http_runs])


REPEAT_KEYS = (("ttft", "mean"), ("ttft", "p90"), ("tpot", "mean"), ("tpot", "p50"), ("tpot", "p90"))


def repeat_spread(cells: tuple[LeaseCell, ...] = CELLS) -> list[str]:
    """The cells with repeated HTTP runs: each run's TTFT and TPOT statistics and the floor
    `dooly validate` takes from them (the largest relative difference between any two runs)."""
    statistics = dict(HTTP_STATISTICS)
    header = ["cell", "run", *[f"{m.upper()} {s} (ms)" for m, s in REPEAT_KEYS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in cells:
        if len(cell.http_runs) < 2:
            continue
        truths = [load_ground_truth(run) for run in cell.http_runs]
        for run, truth in zip(cell.http_runs, truths, strict=True):
            values = {"ttft": [r.ttft_s for r in truth.requests], "tpot": [r.tpot_s for r in truth.requests]}
            lines.append(f"| {cell.name} | {run.parent.name} | "
                         + " | ".join(f"{float(statistics[s](values[m])) * MS_PER_S:.1f}" for m, s in REPEAT_KEYS)
                         + " |")
        floor = run_floor(truths)
        lines.append(f"| {cell.name} | floor | " + " | ".join(f"{floor[f'{m}_{s}']:.1f}%" for m, s in REPEAT_KEYS)
                     + " |")
    return lines


def record_rows(records: dict[str, dict[str, PathRecord]], lease4_records: dict[str, PathRecord]) -> list[str]:
    """Every record: its step term, residual offsets and failed checks."""
    documents = {f"{path.label}: {label}": records[path.label][label].document
                 for path in PATHS for label in (POOLED, *MODELS)}
    documents.update({f"{path.label}: lease4 Llama-3.1-8B": lease4_records[path.label].document for path in PATHS})
    return held_out_records(documents)


def refused_records(records: dict[str, dict[str, PathRecord]], lease4_records: dict[str, PathRecord]) -> list[str]:
    """The records `dooly validate` refuses, and why."""
    named = [(f"{path.label}, {label}", records[path.label][label]) for path in PATHS for label in (POOLED, *MODELS)]
    named += [(f"{path.label}, lease4 Llama-3.1-8B", lease4_records[path.label]) for path in PATHS]
    lines = [f"- {label}: {', '.join(record.refused)} below zero" for label, record in named if record.refused]
    return lines or ["- none"]


def record_sections(records: dict[str, dict[str, PathRecord]]) -> list[str]:
    """Per path, its pooled record: step term, each pair's pairing and offsets, checks."""
    lines: list[str] = []
    for path in PATHS:
        record = records[path.label][POOLED]
        section = record_section(f"{path.label}, both models' pairs", record)
        lines += [*section[:-1], "Each pair (the pooled record's offsets):", "",
                  *server_cost_lines(record.document), ""]
    return lines


def page(gpu: str, records: dict[str, dict[str, PathRecord]], lease4_records: dict[str, PathRecord],
         results: dict[str, dict[str, tuple[Cell, dict[str, Any]]]], refused: dict[str, dict[str, str]]) -> str:
    variants = (*VARIANTS, INPROCESS)
    return "\n".join([
        "# At an HTTP client on the H100, lease5: async batching, no graphs and eager graphs, each cell paired "
        "in-process on its lease",
        "",
        "Generated by `python reports/engine_paths_http_h100_lease5.py --fitted-store STORE` (from the repository "
        "root, on a fitted copy of the H100 store; see Regenerate). Do not edit by hand. The same paths on lease4 "
        "(three models, only the 8B paired): [engine-paths-http-h100.md](engine-paths-http-h100.md); the "
        "`paged|sdpa` graphs path at a client: [engine-paths.md](engine-paths.md#at-an-http-client); what the server "
        "costs: [server-costs.md](server-costs.md).",
        "",
        "**What was served.** meta-llama/Llama-3.2-1B and Llama-3.2-3B (bundled configs, random weights, bfloat16) on "
        f"transformers 5.17.0 continuous batching, torch 2.11.0+cu130, one lease of an {gpu}, behind `transformers "
        "serve --continuous-batching`, streamed and timed at the client (`dooly bench --client http`): `paged|sdpa` "
        "graphs + async batching and `paged|sdpa` without graphs (num_blocks=1024, max_batch_tokens=2048), "
        "`paged|eager` with graphs (num_blocks=512, max_batch_tokens=512), on `device/workloads/light.json` (40 "
        f"requests, 4 req/s) and `heavy.json` (96 requests, 32 req/s): {len(CELLS)} cells (the 3B's eager path light "
        f"only). The 1B's three light cells and the 3B's async and no-graph light cells were served again "
        f"(`http_r2/`; the 3B's async light a third time, `http_r3/`), and every cell in-process on the same lease "
        f"after its HTTP runs (`pairs/`), in three device calls of one session on one warm machine. Data: `{DATA}`.",
        "",
        f"**Targets (issue #24).** Heavy cells: per-request TTFT MAPE within {HEAVY_TTFT_MAPE_PCT:g}% and TPOT within "
        f"{HEAVY_TPOT_MAPE_PCT:g}%. Every cell: mean and p90 of TTFT and TPOT within {SUMMARY_TARGET_PCT:g}% or the "
        "cell's own floor, whichever is larger (the floor: the largest difference between the cell's HTTP runs, where "
        "it was served more than once; the in-process reference is one run per cell, so no floor).",
        "",
        *FINDINGS,
        "",
        "## What the server adds, measured",
        "",
        "When each run started (minutes after the lease's first cell):",
        "",
        *serving_order(),
        "",
        "HTTP minus in-process at the client, every HTTP run against the cell's pair of the same lease, and the "
        "engines' host time per step (wall minus device time, steps that captured no graph):",
        "",
        *differences(),
        "",
        "The HTTP runs of the cells served more than once, and the floor `dooly validate` takes from them (the "
        "largest relative difference between any two of the runs):",
        "",
        *repeat_spread(),
        "",
        "## The records",
        "",
        "Per path: measured on both models' pairs (in sample), on each model's own pairs (the other model's record "
        "holds the model out), and lease4's Llama-3.1-8B record (another lease and model). Each record pairs a cell's "
        "steps step for step where the two engines ran the same steps, else batch-matched (`pairing`, "
        "docs/server-costs.md). The first HTTP run of each cell is paired.",
        "",
        *record_rows(records, lease4_records),
        "",
        "Records `dooly validate` refuses (a raw median offset below zero: the HTTP runs were faster than their "
        "in-process pairs):",
        "",
        *refused_records(records, lease4_records),
        "",
        *record_sections(records),
        "## Validated",
        "",
        "Each HTTP cell (all its HTTP runs: the first simulated, the others its floor) simulated without server "
        "costs and with each record `dooly validate` accepts, and its in-process pair for reference. Records: "
        + "; ".join(f"`{v}`: {n}" for v, n in VARIANT_NOTES.items()) + ".",
        "",
        *pass_counts(results, CELLS, variants, "1B, 3B", refused),
        "",
        *validation_table(results, CELLS),
        "",
        "## Regenerate",
        "",
        "```",
        "cp -r data/h100/db /tmp/h100 && dooly merge --store /tmp/h100 && dooly fit --store /tmp/h100",
        "python reports/engine_paths_http_h100_lease5.py --fitted-store /tmp/h100",
        "```",
        "",
        f"Re-measure: `{DATA}/README.md`.",
        "",
    ])


# From the tables this script writes (the data are committed and the page regenerates them as they were).
FINDINGS = [
    "**Findings.** With every cell paired on its lease (the first HTTP runs 3.0-9.0 minutes before their pairs), "
    "the server costs the no-graph path most: its HTTP TPOT is 10.3% (3B) and 18.0% (1B) above in-process at heavy "
    "load and 22.5-30.3% at light load (first runs), the server's engine spending 21.0-22.6 ms of host time per heavy "
    "step against 10.2-11.5 ms in-process. The eager path adds 4.6% (1B heavy) to 28.0% (1B light, second run) to "
    "TPOT; the async path 7.0% (1B) and 2.5% (3B) at heavy load, though its wall minus device time per step is about "
    "zero on both sides (an async step's host work overlaps the device's). The records say the same: a decode step term of +0.65 to +1.29 ms plus "
    "0.189-0.225 ms per sequence on the no-graph path, +0.76 to +1.55 ms plus 0.148-0.165 ms per sequence on the "
    "eager path, and +0.72 to +1.97 ms plus 0.171-0.207 ms per sequence on the async path, where it is measured on the "
    "host's share of the async cycle (wall minus device time is about zero there: the host work overlaps the "
    "device's; docs/server-costs.md), leaving a residual TPOT of -0.28 to +0.70 ms once the captures' server cost is "
    "priced too (+8.6 to +10.4 us per layer and sequence of a capture on this path). "
    "The light cells move between HTTP runs as much as the server adds: the async light cells' floors are 30.0% "
    "and 36.6% on TTFT mean and 50.2% and 54.4% on its p90, and the 3B's no-graph light cell's two HTTP runs differ "
    "by 28.5% in TPOT p50 (95.5 vs 74.3 ms; the second within 0.8% of its pair's TPOT mean), so the 1B's async "
    "light and the 3B's no-graph light cells pass without server costs on their floors, while the 1B's no-graph and "
    "eager light cells, with floors of 1.9-4.9% and 3.7-10.6%, miss by -18.8% and -21.7% on TTFT p90. A record "
    "held out by model carries its step term over, not its offsets: the residual TTFT offsets differ by model (no "
    "graphs: -67.2 ms for the 1B, +160.8 ms for the 3B), so they fail the record's model checks and `dooly "
    "validate` leaves them out (docs/server-costs.md); with the step term alone 4 of 9 cells pass with the other "
    "model's record against 5 of 11 with none. On the 1B's heavy cells it brings TPOT MAPE down (no graphs 11.8% "
    "to 2.6%, eager 7.8% to 3.9%, the eager cell then within the targets; async 7.4% to 3.1%) while the async and "
    "no-graph cells' TTFT MAPE grows (18.7% to 25.6%, 22.7% to 27.8%). The 1B's async record is refused (raw median TTFT offset "
    "-37.81 ms: its first light HTTP run was 20.9% faster to the first token than its pair, its second 2.8% "
    "slower), so the 3B's async cells have no held-out record. In sample the pooled records pass 7 of 11; lease4's "
    "8B records are refused on the async and no-graph paths, and its eager record passes 1 of 3 (the 1B's heavy "
    "cell). The in-process pairs pass 4 of 11, none of the no-graph cells (their light TPOT predicted 19.9% and 33.9% "
    "slow, the 1B's heavy TTFT MAPE 21.0%): part of what misses at the client is the simulator's error on the engine "
    "alone.",
]


def build(store: str, scratch: Path) -> str:
    (scratch / "lease4").mkdir()
    lease4_records = lease4.path_records(store, scratch / "lease4")
    records = lease_records(store, scratch)
    results, refused = validations(store, records, lease4_records)
    return page(gpu_name(GPU_REPORT, "H100"), records, lease4_records, results, refused)


if __name__ == "__main__":
    write_page(__doc__, PAGE, "H100", build)
