"""Leave one model out with the whole store's calibrations: the kernels' part of the held-out error.

bench/lomo_unseen.py holds a model out twice over: the signatures only it runs, and its calib runs
from the store's calibrations. This script takes the held-out stores that run left in its --work
directory, replaces each one's calibrations with those of the whole-store refit (`_full`, from
every model's calib runs) and validates the model's cells again, so the difference from the
held-out run is what the missing calib runs cost and the difference from the whole store is what
the missing kernels cost (docs/unseen.md, "Leave one model out on the H200").

    python bench/lomo_unseen.py ... --work WORK --refit-full      # first
    python lab/lomo_kernels_only.py --work WORK --platform NVIDIA-H200 \\
        --ground-truth data/h200/experiments/engine_grid/r1 --out data/h200/experiments/unseen/lomo_kernels_only.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

# lomo_unseen lives with the benchmarks (bench/, a script folder).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from lomo_unseen import CALIBRATIONS_DIR, FULL_REFIT, suite_cells, validate_cells  # noqa: E402

log = logging.getLogger("lomo_kernels_only")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="bench/lomo_unseen.py's --work (with --refit-full).")
    parser.add_argument("--platform", required=True)
    parser.add_argument("--ground-truth", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", nargs="*", help="Short names (default: every model with ground truth).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    full = args.work / FULL_REFIT / CALIBRATIONS_DIR
    if not full.is_dir():
        raise SystemExit(f"{full}: no whole-store calibrations; run bench/lomo_unseen.py with --refit-full first")
    cells = suite_cells(args.ground_truth)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lomo-kernels-") as scratch:
        for short in args.models or sorted(cells):
            target = Path(scratch) / short
            shutil.copytree(args.work / short, target)
            shutil.rmtree(target / CALIBRATIONS_DIR)
            shutil.copytree(full, target / CALIBRATIONS_DIR)
            rows += validate_cells(str(target), args.platform, short, cells[short], args.ground_truth, Path("."), "store")
            log.info("%s: %d cells validated with the whole store's calibrations", short, len(cells[short]))
    args.out.write_text(json.dumps(rows, indent=1))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
