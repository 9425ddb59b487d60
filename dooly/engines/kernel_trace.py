"""Charge the kernels of a torch-profiler trace of a serving engine to the steps that launched them.

`dooly bench` records, per engine step, when its host code prepared the inputs, ran the forward and
updated the batch (perf_counter seconds). A chrome trace exported by `torch.profiler` holds every
kernel with the host call that launched it. Tying the two clocks together (a marker whose name
carries the perf_counter time it was set at) says where a step's device time goes, kernel kind by
kernel kind; lab/engine_step_profile.py and the H100 report use it to compare the real engine's
steps with the simulator's. Pure data handling: no torch import, so the CPU tests exercise it.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol


class TimedStep(Protocol):
    """The step timings `dooly bench` records (dooly.engines.transformers_bench step records)."""

    start_s: float
    prepare_s: float
    forward_s: float
    duration_s: float


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
    """A kernel's kind by its name: the step's device time is compared kind by kind, names vary by GPU."""
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


def attribute(steps: Sequence[TimedStep], launches: list[tuple[float, float, str, str]], offset_us: float) -> list[dict[str, Any]]:
    """Per recorded step: its kernels' device time by kind (ms), split by which part of the step
    launched them: the host's input preparation, the generation step (forward, sampling) or the
    batch update after it."""
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
