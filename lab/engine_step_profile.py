"""Where the real engine's step spends its device time, kernel by kernel (one GPU, minutes).

The simulator's device time for Llama-3.1-8B's heavy mixed steps comes out ~3% under the engine's
measured device time, while the attention calls inside the model's forward cost what they cost
timed alone (lab/attention_in_forward.py). This serves a ground-truth workload on the real
engine (`dooly bench`'s own runner) under the torch profiler and charges every kernel to the part of
the step whose host code launched it (input preparation, the generation step, the batch update),
by the timings `dooly bench` records per step; it reports per step the device time of the kernels
by kind (the attention kernel, GEMMs, memory copies and fills, the rest) and the costliest ones by
name and launching operator.

    python lab/engine_step_profile.py --ground-truth data/h100/groundtruth/Llama-3.1-8B.paged-sdpa.graphs.heavy \\
        --model meta-llama/Llama-3.1-8B --out steps.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dooly.engines import transformers_bench
from dooly.engines.base import parse_engine_settings
from dooly.engines.groundtruth import ENGINE_FILE
from dooly.engines.kernel_trace import CLOCK_MARK, US_PER_S, attribute, clock_offset_us, kernel_launches
from dooly.models.registry import build_hf_config, resolve_model
from dooly.sim.validate import load_ground_truth

log = logging.getLogger("engine_step_profile")


def all_threads() -> Any:
    """Record the engine thread's operators too (torch >= 2.7); without them kernels still count,
    unnamed by operator."""
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        log.warning("this torch cannot profile every thread: kernels are not named by operator")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ground-truth", required=True, type=Path, help="A `dooly bench` cell: its workload and engine settings are served again.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="paged|sdpa")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-requests", type=int, default=None, help="Serve only the first N requests (a smoke run).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    truth = load_ground_truth(args.ground_truth)
    requests = truth.workload()[: args.max_requests]
    settings = parse_engine_settings(str(args.ground_truth / ENGINE_FILE), ())
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # Ties the steps' perf_counter times to wall-clock time (GPU clock and power samples from
    # nvidia-smi carry wall-clock timestamps).
    clock = {"unix_s": time.time(), "perf_counter_s": time.perf_counter()}
    with torch.profiler.profile(activities=activities, experimental_config=all_threads()) as profiler:
        with torch.profiler.record_function(f"{CLOCK_MARK}@{time.perf_counter() * US_PER_S:.1f}"):
            pass
        run = transformers_bench.run_transformers_bench(
            build_hf_config(resolve_model(args.model)), args.backend, requests, settings=settings, device=args.device,
            dtype=torch.bfloat16,
        )
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trace.json"
        profiler.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    kernels = attribute(run.steps, kernel_launches(trace), clock_offset_us(trace))
    rows = []
    for record, attributed in zip(run.steps, kernels):
        rows.append({
            "prefill": [list(p) for p in record.prefill], "decode_ctx": list(record.decode_ctx),
            "padded_tokens": record.padded_tokens, "cuda_graph": record.cuda_graph,
            "start_s": record.start_s, "duration_s": record.duration_s, "prepare_s": record.prepare_s, "forward_s": record.forward_s,
            "device_s": record.device_s, **attributed,
        })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "backend": args.backend, "ground_truth": str(args.ground_truth),
                                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "clock": clock, "steps": rows}) + "\n")
    log.info("%d steps written to %s", len(rows), args.out)


if __name__ == "__main__":
    main()
