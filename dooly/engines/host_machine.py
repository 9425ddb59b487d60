"""The host machine a ground-truth run was served from (bench.json `host`).

The engine's host time per step (building its inputs in Python, launching) is a property of the
host CPU as much as of the GPU platform: the same cell on two H100 leases measured device time
within 1% and host time up to 1.7x apart (docs/calibration.md, "Stability of the fitted terms").
The runs committed before this record say nothing of their host, so such a spread could only be
seen, not attributed. Each run now records the CPU model, its logical CPU count, the Python
version, and a short probe of the kind of work the engine's scheduler does per step (appending
integers to a Python list, as it builds its per-token index lists), so that calibrations fitted
on different hosts can be compared, and one day normalised, by something measured.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
CPU_MODEL_FIELD = "model name"
UNKNOWN_CPU = "unknown"
# The probe: append this many integers to a list, the median over the repeats (a few ms each).
PROBE_ITEMS = 200_000
PROBE_REPEATS = 5


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == CPU_MODEL_FIELD and value.strip():
                return value.strip()
    return platform.processor() or UNKNOWN_CPU


def list_probe_seconds(items: int = PROBE_ITEMS, repeats: int = PROBE_REPEATS) -> float:
    """Median seconds to append `items` integers to a Python list, one at a time."""
    timings = []
    for _ in range(repeats):
        out: list[int] = []
        start = time.perf_counter()
        for value in range(items):
            out.append(value)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def host_machine() -> dict[str, Any]:
    """What bench.json records of the host: CPU model, logical CPUs, Python, the list probe."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count() or 0,
        "python": platform.python_version(),
        "list_probe_items": PROBE_ITEMS,
        "list_probe_s": list_probe_seconds(),
    }
