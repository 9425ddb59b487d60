"""Run every benchmark under bench/ in turn; each prints its own medians and ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = (
    "bench_trace.py",
    "bench_models.py",
    "bench_merge.py",
    "bench_predict.py",
    "bench_simulate.py",
    "bench_fleet_executor.py",
)


def main() -> int:
    here = Path(__file__).parent
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== {name}", flush=True)
        if subprocess.run([sys.executable, str(here / name)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
