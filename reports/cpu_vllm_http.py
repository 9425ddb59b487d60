"""vLLM's own server on the CPU build, timed at its client: `dooly bench --engine vllm --client http`
beside the in-process harness, and what `dooly server-costs` makes of the pairs.

One run, in one window of time (the shared CPU's load as alike as it gets), for the first benchmarked
model's workloads (data/cpu-vllm/workloads, the in-process validation's light and heavy, its engine
limits):
1. each cell served three times in the order http, in-process, http: the two HTTP runs give the
   engine's own run-to-run floor at the client, the in-process run the pair;
2. `dooly server-costs` of every HTTP run against its in-process pair (both loads, so its load check
   runs), written beside the runs.

Writes OUT/gt/<model>/<workload>/{http,pair,http_r2}/, OUT/server-costs-<model>.json and
OUT/report.json (each run's mean and p90 TTFT and TPOT, the HTTP runs' floor and their difference
from the pair, the record's terms and checks).

    PYTHONPATH=$PWD .venv/bin/python reports/cpu_vllm_http.py [--out data/cpu-vllm/http]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "reports"))

from cpu_vllm_validation import BENCHED, DTYPE, ENGINE, VALIDATED, engine_flags  # noqa: E402

# Each cell's runs, in the order they are served: HTTP, its in-process pair, HTTP again.
RUNS = (("http", "http"), ("pair", "inprocess"), ("http_r2", "http"))
MS_PER_S = 1e3


def dooly(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "dooly.cli", *args, "--output", "json"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"dooly {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def means(run: Path) -> dict[str, float]:
    """Mean and p90 TTFT and TPOT (ms) of a recorded run, as `dooly validate` reads it."""
    import numpy as np

    from dooly.sim.validate import load_ground_truth

    requests = load_ground_truth(run).requests
    ttft = np.array([r.ttft_s for r in requests]) * MS_PER_S
    tpot = np.array([r.tpot_s for r in requests if np.isfinite(r.tpot_s)]) * MS_PER_S
    return {"ttft_mean_ms": float(ttft.mean()), "ttft_p90_ms": float(np.percentile(ttft, 90)),
            "tpot_mean_ms": float(tpot.mean()), "tpot_p90_ms": float(np.percentile(tpot, 90))}


def relative(value: float, reference: float) -> float:
    """VALUE's difference from REFERENCE, in percent of it."""
    return (value - reference) / reference * 100


def compared(measured: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per statistic: the HTTP runs' floor (the second against the first) and the first HTTP run
    against its in-process pair, in percent."""
    http, again, pair = measured["http"], measured["http_r2"], measured["pair"]
    return {**{f"floor_{name}_pct": relative(again[name], http[name]) for name in http},
            **{f"http_vs_pair_{name}_pct": relative(http[name], pair[name]) for name in http}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "cpu-vllm" / "http")
    parser.add_argument("--skip-bench", action="store_true", help="Reuse the runs under OUT.")
    args = parser.parse_args()
    # Paths as the commands are given them, relative to the repository where OUT is in it: the
    # server-cost record names its runs, and a committed record names them where they are committed.
    out: Path = args.out.resolve()
    out = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    workloads = ROOT / "data" / "cpu-vllm" / "workloads"
    from dooly.profile.provenance import detect_platform

    report: dict[str, Any] = {"platform": detect_platform("cpu"), "cells": [], "server_costs": {}}
    for model, prefix in BENCHED[:1]:
        name = model.rsplit("/", 1)[-1]
        cells = {workload: out / "gt" / name / workload for workload in VALIDATED}
        for workload, cell in cells.items():
            for folder, client in RUNS:
                if not args.skip_bench:
                    dooly("bench", model, "--engine", ENGINE, "--dtype", DTYPE, "--client", client, "--out",
                          str(cell / folder), "--workload", str(workloads / f"{prefix}-{workload}.json"),
                          *engine_flags())
            measured = {folder: means(ROOT / cell / folder) for folder, _ in RUNS}
            report["cells"].append({"model": model, "workload": workload, "measured": measured,
                                    "compared": compared(measured)})
        http_flags = [flag for cell in cells.values() for run in ("http", "http_r2") for flag in ("--http", str(cell / run))]
        pair_flags = [flag for cell in cells.values() for flag in ("--inprocess", str(cell / "pair"))]
        costs_file = out / f"server-costs-{name}.json"
        costs = dooly("server-costs", *http_flags, *pair_flags, "--out", str(costs_file))
        report["server_costs"][model] = {"file": costs_file.name, "terms": costs.get("terms"),
                                         "consistent": costs.get("consistent"),
                                         "problems": len(costs.get("problems") or [])}
    (ROOT / out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    for cell in report["cells"]:
        c = cell["compared"]
        print(f"{cell['model']} {cell['workload']}: HTTP vs in-process mean TTFT {c['http_vs_pair_ttft_mean_ms_pct']:+.1f}% "
              f"(floor {c['floor_ttft_mean_ms_pct']:+.1f}%), mean TPOT {c['http_vs_pair_tpot_mean_ms_pct']:+.1f}% "
              f"(floor {c['floor_tpot_mean_ms_pct']:+.1f}%)")


if __name__ == "__main__":
    main()
