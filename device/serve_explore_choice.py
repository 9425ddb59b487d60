"""Serve the configuration `dooly explore` chose on the real engine, at its predicted capacity.

Reads an explore.json (`dooly explore --out DIR`), takes its best candidate (model, backend, engine
settings) and its workload with the rate set to SCALE x the predicted capacity, and runs `dooly
bench` on it. At SCALE 1 the measured SLO percentiles should hold; past the capacity they should
not. `dooly validate` then compares the run with the simulation.

    python3 device/serve_explore_choice.py docs/explore/explore.json --scale 1.0 --out gt/explore-capacity
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from dooly.engines.commands import bench_command

log = logging.getLogger("serve_explore_choice")


def bench_argv(explore: dict, scale: float, out: Path, workload_file: Path) -> list[str]:
    """`dooly bench` arguments for the best candidate at `scale` x its capacity; writes the workload."""
    best = explore["best"]
    candidate = best["candidate"]
    workload = dict(explore["workload"], rate=best["capacity_rps"] * scale)
    workload_file.write_text(json.dumps(workload) + "\n")
    argv = [candidate["model"], "--attention", candidate["backend"], "--dtype", candidate["dtype"],
            "--engine", candidate["engine"], "--workload", str(workload_file), "--out", str(out),
            "--output", "json"]
    for key, value in sorted(candidate["settings"].items()):
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("explore", type=Path, help="explore.json written by `dooly explore --out`")
    parser.add_argument("--scale", type=float, default=1.0, help="rate as a multiple of the predicted capacity")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    explore = json.loads(args.explore.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        argv = bench_argv(explore, args.scale, args.out, Path(tmp) / "workload.json")
        log.info("dooly bench %s", " ".join(argv))
        bench_command.main(argv, standalone_mode=False)


if __name__ == "__main__":
    main()
