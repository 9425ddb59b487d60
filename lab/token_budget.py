"""Issue #24's large token budget: does the simulator price an engine serving at max_batch_tokens 8192?
(CPU, a minute on fitted stores.)

The engine pads every step to its token budget under CUDA graphs and fills it at heavy load, so at a
budget of 8192 its mixed steps hold 8192 query tokens where the profiling grid's budget-filling
points hold 512 or 2048 and its sweep stops at 4096: those steps were priced by extrapolation, and
the coverage line now says so. One device call (device/token_budget.sh) served Llama-3.1-8B's heavy
cell (`paged|sdpa`, CUDA graphs, in-process) at 8192 twice and at 2048 once between them, and
profiled the points `dooly profile --token-budget 8192` adds. This script validates each run
(`dooly validate`, the other 8192 run as the floor) on the store before those points and after them,
and sets the engine's slowdown from 2048 to 8192 beside the simulator's.

    python lab/token_budget.py --data data/h100/experiments/token_budget --before FITTED_BEFORE \\
        --after FITTED_AFTER [--out DIR]

FITTED_BEFORE: a merged and fitted copy of data/h100/db (without the run's budget points);
FITTED_AFTER: the same with the run's shards (DATA/shards) copied in, merged and fitted. With --out, DIR/token_budget.md holds the table and
DIR/token_budget.json the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("token_budget")

MODEL = "meta-llama/Llama-3.1-8B"
BACKEND = "paged|sdpa"
CELL = "Llama-3.1-8B.paged-sdpa.graphs.heavy"
# Runs of the device call: the budget each served at, and the run that is its floor.
RUNS = {"mbt8192_r1": (8192, "mbt8192_r2"), "mbt8192_r2": (8192, "mbt8192_r1"), "mbt2048": (2048, None)}
REFERENCE_RUN = "mbt2048"
STATISTICS = ("ttft_mean", "ttft_p90", "tpot_mean", "tpot_p90")
PERCENT = 100.0


@dataclass(frozen=True)
class Scored:
    """One run validated on one store."""

    run: str
    store: str
    rows: dict[str, dict[str, Any]]  # statistic -> summary row (measured, predicted, error_pct, floor_pct)
    ttft_mape: float
    tpot_mape: float
    step_bias: float
    step_mape: float
    extrapolated_mixed: float | None


def platform_of(run: Path) -> str:
    """The platform string a run's GPU name stands for (as `dooly validate` wants it)."""
    bench = json.loads((run / "bench.json").read_text())
    return str(bench["platform"])


def validate(run: Path, floor: Path | None, store: Path, platform: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "dooly.cli", "validate", MODEL, "--ground-truth", str(run), "--store", str(store),
            "--platform", platform, "--backend", BACKEND, "--output", "json"]
    if floor is not None:
        argv[argv.index("--store"):argv.index("--store")] = ["--ground-truth", str(floor)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def score(name: str, data: Path, store_name: str, store: Path) -> Scored:
    _, floor_name = RUNS[name]
    run = data / "groundtruth" / name / CELL
    floor = data / "groundtruth" / floor_name / CELL if floor_name else None
    payload = validate(run, floor if floor is not None and floor.is_dir() else None, store, platform_of(run))
    rows = {r["statistic"]: r for r in payload["summary"]["rows"]}
    mixed = payload["coverage"].get("mixed", {})
    return Scored(run=name, store=store_name, rows=rows, ttft_mape=payload["requests"]["ttft"]["mape"],
                  tpot_mape=payload["requests"]["tpot"]["mape"], step_bias=payload["steps"]["bias"],
                  step_mape=payload["steps"]["mape"], extrapolated_mixed=mixed.get("extrapolated_share"))


def slowdown(scores: list[Scored], store: str, statistic: str, field: str) -> float:
    """Mean of the 8192 runs' STATISTIC over the 2048 run's, as measured or predicted on STORE."""
    on = {s.run: s.rows[statistic][field] for s in scores if s.store == store}
    budget = [v for run, v in on.items() if RUNS[run][0] == max(b for b, _ in RUNS.values())]
    return (sum(budget) / len(budget)) / on[REFERENCE_RUN] - 1.0


def _pct(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}%" if signed else f"{value:.1f}%"


def tables(scores: list[Scored]) -> list[str]:
    lines = ["| run | budget | store | " + " | ".join(STATISTICS) + " | TTFT MAPE | TPOT MAPE | step bias | step MAPE "
             "| mixed extrapolated |", "|---" * (len(STATISTICS) + 8) + "|"]
    for s in scores:
        cells = []
        for statistic in STATISTICS:
            row = s.rows[statistic]
            floor = f" (floor {row['floor_pct']:.1f}%)" if row.get("floor_pct") is not None else ""
            cells.append(f"{row['measured'] * 1e3:.1f} ms: {_pct(row['error_pct'])}{floor}")
        extrapolated = None if s.extrapolated_mixed is None else s.extrapolated_mixed * PERCENT
        lines.append(f"| {s.run} | {RUNS[s.run][0]} | {s.store} | " + " | ".join(cells)
                     + f" | {_pct(s.ttft_mape, False)} | {_pct(s.tpot_mape, False)} | {_pct(s.step_bias)} "
                     f"| {_pct(s.step_mape, False)} | {_pct(extrapolated, False)} |")
    lines += ["", "| from 2048 to 8192 | measured | before | after |", "|---|---|---|---|"]
    for statistic in STATISTICS:
        measured = slowdown(scores, "before", statistic, "measured")
        lines.append(f"| {statistic} | {_pct(measured * PERCENT)} | "
                     + " | ".join(_pct(slowdown(scores, store, statistic, "predicted") * PERCENT)
                                  for store in ("before", "after")) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--before", required=True, type=Path)
    parser.add_argument("--after", required=True, type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    runs = [name for name in RUNS if (args.data / "groundtruth" / name / CELL).is_dir()]
    scores = [score(name, args.data, store_name, store) for name in runs
              for store_name, store in (("before", args.before), ("after", args.after))]
    text = "\n".join(tables(scores)) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_budget.md").write_text(text)
    (args.out / "token_budget.json").write_text(json.dumps([s.__dict__ for s in scores], indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
