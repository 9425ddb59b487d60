"""Record real-engine ground truth for a grid of (model, backend, engine settings, workload) cells.

Runs on the GPU machine, in one process (imports and CUDA start-up paid once), each cell through
the `dooly bench` command itself; a failing cell is logged and the grid goes on. Everything lands
under OUT/groundtruth/<cell> (the caller packs it: the device tool brings back few files, and a
run cut short by a time limit should still bring back its finished cells).

    timeout 540 python3 device/device_bench.py --models meta-llama/Llama-3.2-1B,meta-llama/Llama-3.1-8B \\
        --backends 'paged|sdpa,paged|eager' --workloads light,heavy,calib --variants default,graphs
    tar -C "$OUT" -czf "$OUT/groundtruth.tar.gz" groundtruth
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from dooly.engines.commands import bench_command

log = logging.getLogger("device_bench")

WORKLOAD_DIR = Path(__file__).parent / "workloads"
# Engine-setting variants: `default` is what the engine picks for these backends (no CUDA
# graphs, since they need a mask); `graphs` turns CUDA graphs on for both paths.
VARIANTS = {
    "default": [],
    "graphs": ["use_cuda_graph=true"],
    "warm": ["use_cuda_graph=true"],
    # transformers' async batching: the host prepares the next batch while the device runs this one.
    "async": ["use_cuda_graph=true", "use_async_batching=true"],
}
# `warm`: CUDA graphs on, the workload served WARM_PASSES times unrecorded first (`dooly bench --warm-passes`), so
# the recorded pass meets the shapes it needs already captured, as on a server that has been running.
WARM_PASSES = 3
# Cache and batch sizes pinned per backend, so every cell (and its simulation) uses the same
# engine settings whatever memory earlier cells left behind. The eager backend materialises the
# [heads, tokens, KV] score matrix, so its token budget is smaller (8192 tokens OOM on an H100).
BACKEND_SETTINGS = {
    "paged|sdpa": ["num_blocks=1024", "max_batch_tokens=2048"],
    "paged|eager": ["num_blocks=512", "max_batch_tokens=512"],
}


def cell_name(model: str, backend: str, variant: str, workload: str) -> str:
    short = model.split("/")[-1]
    return f"{short}.{backend.replace('|', '-')}.{variant}.{workload}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True)
    parser.add_argument("--backends", default="paged|sdpa,paged|eager")
    parser.add_argument("--workloads", default="light,heavy,calib")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--client", choices=("inprocess", "http"), default="inprocess",
                        help="`dooly bench --client`: http serves every cell behind the engine's own HTTP server "
                             "(the serving wheels must be importable) and times it at the client.")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="An engine setting for every cell, after the per-backend ones (e.g. a smaller "
                             "num_blocks where the weights leave less room).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    root = Path(args.out) / "groundtruth"
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models.split(","):
        for backend in args.backends.split(","):
            for variant in args.variants.split(","):
                for workload in args.workloads.split(","):
                    name = cell_name(model, backend, variant, workload)
                    argv = [model, "--out", str(root / name), "--attention", backend,
                            "--workload", str(WORKLOAD_DIR / f"{workload}.json"), "--output", "json",
                            "--client", args.client]
                    for setting in BACKEND_SETTINGS[backend] + VARIANTS[variant] + args.extra:
                        argv += ["--set", setting]
                    if variant == "warm":
                        argv += ["--warm-passes", str(WARM_PASSES)]
                    start = time.perf_counter()
                    try:
                        bench_command.main(argv, standalone_mode=False)
                        status = "ok"
                    except Exception as exc:  # one failing cell must not lose the others
                        log.exception("cell %s failed", name)
                        status = f"failed: {exc}"
                    wall = time.perf_counter() - start
                    _release_device_memory()
                    log.info("cell %s: %s in %.1f s", name, status, wall)
                    results.append({"cell": name, "status": status, "wall_s": round(wall, 1)})
                    (root / "cells.json").write_text(json.dumps(results, indent=2) + "\n")


def _release_device_memory() -> None:
    """Drop what a finished (or failed) cell left on the GPU before the next one sizes its cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
