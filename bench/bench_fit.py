"""How long `dooly fit` takes on a copy of a store (the committed H100 store by default), and
what it chooses: per op class, the seen and unseen methods and their held-out medians.

Each run fits a fresh copy (merged first when the store holds no snapshot) through the CLI, in a
subprocess, as a user runs it; the wall time of each run and their median are printed, then the
choices of the last run. --code runs another checkout of Dooly (e.g. an export of an older
commit) for a before/after comparison in one session; --save writes the last run's JSON report,
--compare diffs the choices and errors against a saved one (identical, or what changed).

Run: .venv/bin/python bench/bench_fit.py [--runs 3] [--jobs N] [--code DIR] [--save F] [--compare F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = ROOT / "data" / "h100" / "db"
DEFAULT_RUNS = 3
# Report keys that differ between two fits of the same data (library versions, where it went).
VOLATILE_KEYS = ("versions", "meta_key")


def _dooly(code: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Run from `code`: `python -m` puts the working directory first on sys.path, before PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": str(code)}
    return subprocess.run(
        [sys.executable, "-m", "dooly.cli", *args], env=env, cwd=code, capture_output=True, text=True, check=True
    )


def fit_once(store: Path, code: Path, jobs: int | None) -> tuple[float, dict[str, Any]]:
    """Seconds of one `dooly fit --output json` on a fresh copy of `store`, and its report."""
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        copy = Path(tmp) / "db"
        shutil.copytree(store, copy)
        if not (copy / "snapshots").exists():
            _dooly(code, "merge", "--store", str(copy))
        args = ["fit", "--store", str(copy), "--output", "json"]
        if jobs is not None:
            args += ["--jobs", str(jobs)]
        start = time.perf_counter()
        result = _dooly(code, *args)
        return time.perf_counter() - start, json.loads(result.stdout)


def choices(report: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """One row per group and op class: its methods and held-out medians."""
    rows = []
    for group in report["groups"]:
        for cls in group["classes"]:
            rows.append(
                (
                    str(group["backend"]),
                    str(cls["op_class"]),
                    str(cls["seen_method"]),
                    _pct(cls["seen_mape_median_pct"]),
                    str(cls["unseen_method"]),
                    _pct(cls["unseen_mape_median_pct"]),
                )
            )
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def compare(report: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """What differs between two reports (empty when the choices and every error are identical)."""
    ours = {k: v for k, v in report.items() if k not in VOLATILE_KEYS}
    theirs = {k: v for k, v in saved.items() if k not in VOLATILE_KEYS}
    if ours == theirs:
        return []
    lines = [f"section {key} differs" for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    old = {row[:2]: row[2:] for row in choices(saved)}
    for row in choices(report):
        if old.get(row[:2]) != row[2:]:
            lines.append(f"{row[0]} / {row[1]}: {old.get(row[:2])} -> {row[2:]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--jobs", type=int, default=None, help="--jobs of dooly fit (default: its own)")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout of Dooly to run")
    parser.add_argument("--save", type=Path, help="write the last run's JSON report here")
    parser.add_argument("--compare", type=Path, help="a saved JSON report to compare the last run with")
    args = parser.parse_args()

    times = []
    report: dict[str, Any] = {}
    for run in range(args.runs):
        seconds, report = fit_once(args.store, args.code, args.jobs)
        times.append(seconds)
        print(f"run {run + 1}: {seconds:.1f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
    print(f"median of {args.runs}: {statistics.median(times):.1f} s wall (code: {args.code})")
    print()
    header = ("backend", "op class", "seen method", "seen med %", "unseen method", "unseen med %")
    rows = choices(report)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    overall = report.get("overall", {})
    print(f"\noverall: {json.dumps(overall, sort_keys=True)}")
    if args.save:
        args.save.write_text(json.dumps(report, indent=1, sort_keys=True))
    if args.compare:
        differences = compare(report, json.loads(args.compare.read_text()))
        print("\n" + ("\n".join(differences) if differences else f"identical to {args.compare}"))


if __name__ == "__main__":
    main()
