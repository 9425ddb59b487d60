"""Which host calibration serves runs of either H200 lease: one fitted on leases A-C, or one pooled over A-D?

Lease D (data/h200/experiments/engine_grid/calib_d) added a calib run of every path for three models,
on a host that spent 30-45% less time per step than the earlier leases (lab/calibration_leases.py).
This validates every synchronous grid run (all rounds, each run alone) against two stores and
groups the errors by lease:

    a-to-c   each synchronous path fitted on the calib runs of leases A, B and C;
    pooled   each synchronous path fitted on every committed calib run, A to D (data/h200/db's).

    python lab/calibration_pooling.py --a-to-c FITTED_AC --pooled FITTED_AD [--jobs 4] [--out TABLE.md]

Both stores are fitted copies (read only), built with `dooly calibrate --store STORE --ground-truth
RUN ...` over the calib runs lab/calibration_leases.py lists.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("calibration_pooling")

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "data" / "h200" / "experiments" / "engine_grid"
PLATFORM = "NVIDIA-H200"
ROUNDS = ("r1", "r2", "r3")
# Runs recorded on lease D (walls_d.txt): all of r3, and these cells' r2.
LEASE_D_R2 = ("Llama-3.1-8B.", "Llama-3.2-1B.paged-eager.", "Llama-3.2-3B.paged-sdpa.default.")
SYNC_MODES = (".graphs.", ".default.")
STATISTICS = (("ttft", "mean"), ("ttft", "p90"), ("tpot", "mean"), ("tpot", "p90"))


def lease(run: Path) -> str:
    if run.parent.name == "r3" or (run.parent.name == "r2" and run.name.startswith(LEASE_D_R2)):
        return "D"
    return "C"


def grid_runs() -> list[Path]:
    """The synchronous grid runs (calib runs are inputs, async runs keep one calibration here)."""
    return [run for name in ROUNDS for run in sorted((GRID / name).glob("Llama-*"))
            if not run.name.endswith(".calib") and any(mode in run.name for mode in SYNC_MODES)]


def validate(run: Path, store: str) -> dict[str, float]:
    bench = json.loads((run / "bench.json").read_text())
    result = subprocess.run([sys.executable, "-m", "dooly.cli", "validate", str(bench["model"]), "--store", store,
                             "--platform", PLATFORM, "--backend", str(bench["backend"]), "--ground-truth", str(run),
                             "--output", "json"], check=True, capture_output=True, text=True, cwd=ROOT)
    payload: dict[str, Any] = json.loads(result.stdout)
    return {f"{metric} {stat}": float(payload["distribution"][metric][stat]["error_pct"]) for metric, stat in STATISTICS}


def table(results: dict[str, dict[Path, dict[str, float]]]) -> str:
    """Per lease and store: the median and mean absolute error of each statistic over the runs."""
    lines = ["| lease | runs | store | " + " | ".join(f"{m} {s}: median / mean abs err" for m, s in STATISTICS) + " |",
             "|---|---:|---|" + "---:|" * len(STATISTICS)]
    by_lease: dict[str, list[Path]] = defaultdict(list)
    for run in next(iter(results.values())):
        by_lease[lease(run)].append(run)
    for name in sorted(by_lease):
        runs = by_lease[name]
        for store, found in results.items():
            cells = []
            for metric, stat in STATISTICS:
                errors = [found[run][f"{metric} {stat}"] for run in runs]
                cells.append(f"{statistics.median(errors):+.1f}% / {statistics.fmean(abs(e) for e in errors):.1f}%")
            lines.append(f"| {name} | {len(runs)} | {store} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--a-to-c", dest="a_to_c", required=True,
                        help="Fitted store whose synchronous calibrations hold leases A-C's calib runs (read only).")
    parser.add_argument("--pooled", required=True, help="The same, fitted on every committed calib run, A-D (read only).")
    parser.add_argument("--jobs", type=int, default=4, help="Validations run at once.")
    parser.add_argument("--out", help="Write the markdown table here (default: stdout).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    runs = grid_runs()
    results: dict[str, dict[Path, dict[str, float]]] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, store in (("A-C", args.a_to_c), ("pooled A-D", args.pooled)):
            found = dict(zip(runs, pool.map(lambda run, s=store: validate(run, s), runs), strict=True))
            results[name] = found
            log.info("%s: %d runs validated", name, len(found))
    text = table(results)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
