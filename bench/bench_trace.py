"""Trace every bundled model for every phase on this CPU: seconds each and unlabeled dims.

The targets: 0 unlabeled dims, and (issue #25) every phase under 3 s, the first one of a process
included (it pays for importing transformers and warming torch's symbolic shapes). Each model runs
in a fresh process, its phases in turn, so the first phase is counted the way a user pays it;
importing the tracer itself (torch, sympy) is reported apart.

`--baseline DIR` times a second checkout (its `dooly` on PYTHONPATH) against this one, the two in
turn for every run so that both see the same load on a shared machine, and prints per model the
median of each phase before and after with their ratio. `--runs N` repeats each model's process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dooly.models.registry import bundled_model_ids

PHASES = ("prefill", "decode", "mixed")
TARGET_SECONDS = 3.0
HERE = Path(__file__).resolve().parent.parent
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


def run_child(model: str, code: Path) -> dict:
    """One fresh process tracing every phase of `model` with the `dooly` of checkout `code`."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, "-c", CHILD, model, *PHASES], capture_output=True, text=True, check=True,
                         env=env, cwd=code)
    return json.loads(out.stdout.strip().splitlines()[-1])


def single(models: list[str], runs: int) -> None:
    rows = []
    for model in models:
        begun = time.perf_counter()
        payloads = [run_child(model, HERE) for _ in range(runs)]
        medians = [statistics.median(p["results"][i]["seconds"] for p in payloads) for i in range(len(PHASES))]
        last = payloads[-1]
        for result, seconds in zip(last["results"], medians):
            rows.append({"model": model, **result, "seconds": seconds})
        print(f"{model:45s} import {statistics.median(p['import_seconds'] for p in payloads):.1f} s, "
              + ", ".join(f"{r['phase']} {s:.2f} s ({r['unlabeled']} unlabeled, {r['signatures']} sigs)"
                          for r, s in zip(last["results"], medians))
              + f"  [{time.perf_counter() - begun:.1f} s wall]", flush=True)
    seconds = [r["seconds"] for r in rows]
    first = [r["seconds"] for r in rows if r["phase"] == PHASES[0]]
    print(f"\n{len(rows)} traces: median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s; first phase "
          f"median {statistics.median(first):.2f} s, max {max(first):.2f} s (target < {TARGET_SECONDS:.0f} s); "
          f"over target {sum(s >= TARGET_SECONDS for s in seconds)}; unlabeled dims total "
          f"{sum(r['unlabeled'] for r in rows)}")


def against(models: list[str], runs: int, baseline: Path) -> None:
    """Median seconds per phase, baseline checkout vs this one, runs interleaved."""
    codes = {"before": baseline, "after": HERE}
    table: dict[str, dict[str, list[float]]] = {}
    for model in models:
        samples: dict[str, list[list[float]]] = {label: [] for label in codes}
        for _ in range(runs):
            for label, code in codes.items():
                payload = run_child(model, code)
                samples[label].append([r["seconds"] for r in payload["results"]])
        table[model] = {label: [statistics.median(column) for column in zip(*rows)] for label, rows in samples.items()}
        before, after = table[model]["before"], table[model]["after"]
        print(f"{model:45s} " + "  ".join(f"{phase} {b:.2f} -> {a:.2f} ({a / b:.2f}x)"
                                         for phase, b, a in zip(PHASES, before, after)), flush=True)
    for label in codes:
        first = [table[m][label][0] for m in models]
        later = [s for m in models for s in table[m][label][1:]]
        print(f"{label}: first phase median {statistics.median(first):.2f} s, max {max(first):.2f} s; later phases "
              f"median {statistics.median(later):.2f} s, max {max(later):.2f} s; over {TARGET_SECONDS:.0f} s: "
              f"{sum(s >= TARGET_SECONDS for s in first + later)} of {len(first + later)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="processes per model (medians are reported)")
    parser.add_argument("--baseline", type=Path, help="another checkout to time against this one")
    parser.add_argument("--models", nargs="*", help="bundled model ids (default: all)")
    args = parser.parse_args()
    models = args.models or bundled_model_ids()
    if args.baseline:
        against(models, args.runs, args.baseline.resolve())
    else:
        single(models, args.runs)


if __name__ == "__main__":
    main()
