"""Trace every bundled model for every phase on this CPU: seconds each and unlabeled dims.

The target (foundation issue): under 10 s per trace, 0 unlabeled dims. Each trace runs in a fresh
process so import time is counted the way a user pays it once, and reported apart from the trace.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from dooly.models.registry import bundled_model_ids

PHASES = ("prefill", "decode", "mixed")
TARGET_SECONDS = 10.0
CHILD = """
import json, sys, time
started = time.perf_counter()
from dooly.trace.tracer import trace_model
imported = time.perf_counter()
results = []
for phase in sys.argv[2:]:
    trace = trace_model(sys.argv[1], phase=phase)
    results.append({"phase": phase, "seconds": trace.seconds, "unlabeled": trace.unlabeled_dims(),
                    "signatures": len(trace.signatures()), "operations": len(trace.operations)})
print(json.dumps({"import_seconds": imported - started, "results": results}))
"""


def main() -> None:
    rows = []
    for model in bundled_model_ids():
        begun = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, model, *PHASES], capture_output=True, text=True, check=True)
        payload = json.loads(out.stdout.strip().splitlines()[-1])
        for result in payload["results"]:
            rows.append({"model": model, **result})
        print(f"{model:45s} import {payload['import_seconds']:.1f} s, "
              + ", ".join(f"{r['phase']} {r['seconds']:.2f} s ({r['unlabeled']} unlabeled, {r['signatures']} sigs)"
                          for r in payload["results"])
              + f"  [{time.perf_counter() - begun:.1f} s wall]", flush=True)
    seconds = [r["seconds"] for r in rows]
    print(f"\n{len(rows)} traces: median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s "
          f"(target < {TARGET_SECONDS:.0f} s); unlabeled dims total {sum(r['unlabeled'] for r in rows)}")


if __name__ == "__main__":
    main()
