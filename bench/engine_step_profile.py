"""Where the real engine's step spends its device time, kernel by kernel (one GPU, minutes).

The simulator's device time for Llama-3.1-8B's heavy mixed steps comes out ~3% under the engine's
measured device time, while the attention calls inside the model's forward cost what they cost
timed alone (bench/attention_in_forward.py). This serves a ground-truth workload on the real
engine (`dooly bench`'s own runner) under the torch profiler and charges every kernel to the part of
the step whose host code launched it (input preparation, the generation step, the batch update),
by the timings `dooly bench` records per step; it reports per step the device time of the kernels
by kind (the attention kernel, GEMMs, memory copies and fills, the rest) and the costliest ones by
name and launching operator.

    python bench/engine_step_profile.py --ground-truth data/h100/groundtruth/Llama-3.1-8B.paged-sdpa.graphs.heavy \\
        --model meta-llama/Llama-3.1-8B --out steps.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from dooly.engines import transformers_bench
from dooly.engines.base import parse_engine_settings
from dooly.engines.groundtruth import ENGINE_FILE
from dooly.models.registry import build_hf_config, resolve_model
from dooly.sim.validate import load_ground_truth

log = logging.getLogger("engine_step_profile")

# A main-thread mark whose name carries the perf_counter time it was set at: it ties the
# profiler's clock to the one the engine's step records use (the engine runs in its own thread).
CLOCK_MARK = "dooly.clock"
US_PER_MS = 1e3
US_PER_S = 1e6
TOP_KERNELS = 10
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
TOP_NAME_CHARS = 80
# The paged cache's read-back of the batch's keys and values (a gather, sorted as `other`).
READ_BACK_KERNEL = "gather_kernel"
# Kernel kinds, first match wins (lower-case substrings of the kernel's name).
KERNEL_KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "splitk")),
    ("copy", ("memcpy", "copy")),
    ("fill", ("memset", "fill")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def kernel_launches(trace: dict[str, Any]) -> list[tuple[float, float, str, str]]:
    """(host launch time, device duration, kernel name, launching operator) of every kernel, copy
    and fill, in microseconds on the trace's clock. A kernel is matched to the runtime or driver
    call that launched it (cuDNN and cuBLAS launch through the driver; a graph replay's kernels all
    through its one cudaGraphLaunch), and that call to the operator it ran under, where the
    profile holds the engine thread's operators."""
    events = trace["traceEvents"]
    operators = {
        int(e["args"]["External id"]): str(e.get("name", ""))
        for e in events
        if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})
    }
    launches = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in args:
            launches[int(args["correlation"])] = (float(e["ts"]), operators.get(int(args.get("External id", -1)), ""))
    out = []
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            found = launches.get(int(e.get("args", {}).get("correlation", -1)))
            if found is not None:
                out.append((found[0], float(e.get("dur", 0.0)), str(e.get("name", "")), found[1]))
    return sorted(out)


def clock_offset_us(trace: dict[str, Any]) -> float:
    """Trace time minus perf_counter time, from the clock mark set just before the run."""
    for e in trace["traceEvents"]:
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(CLOCK_MARK):
            return float(e["ts"]) - float(str(e["name"]).split("@")[1])
    raise RuntimeError("the profile holds no clock mark")


def attribute(steps: list[Any], launches: list[tuple[float, float, str, str]], offset_us: float) -> list[dict[str, Any]]:
    """Per recorded step: its kernels' device time by kind (ms), split by which part of the step
    launched them: the host's input preparation, the generation step (forward, sampling) or the
    batch update after it."""
    import bisect

    times = [launch for launch, *_ in launches]
    out = []
    for step in steps:
        begin = step.start_s * US_PER_S + offset_us
        parts = {
            "prepare": (begin, begin + step.prepare_s * US_PER_S),
            "step": (begin + step.prepare_s * US_PER_S, begin + (step.prepare_s + step.forward_s) * US_PER_S),
            "update": (begin + (step.prepare_s + step.forward_s) * US_PER_S, begin + step.duration_s * US_PER_S),
        }
        row: dict[str, Any] = {}
        top: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for part, (low, high) in parts.items():
            by_kind: dict[str, float] = defaultdict(float)
            for index in range(bisect.bisect_left(times, low), bisect.bisect_right(times, high)):
                _, duration, name, operator = launches[index]
                by_kind[kernel_kind(name)] += duration / US_PER_MS
                if part == "step":
                    entry = top[f"{operator} | {name[:TOP_NAME_CHARS]}"]
                    entry[0] += duration / US_PER_MS
                    entry[1] += 1
            row[f"{part}_kernels_ms"] = {kind: round(ms, 4) for kind, ms in by_kind.items()}
        # name -> [device ms, launches] of the step's costliest kernels
        row["top_step_kernels"] = {name: [round(ms, 4), count] for name, (ms, count) in
                                   sorted(top.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]}
        out.append(row)
    return out


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
