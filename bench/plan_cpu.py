"""Does `dooly plan` say what `dooly profile` then spends, on the CPU? Run end to end, as a user would.

Each repeat, in a fresh store: `dooly profile` model A, `dooly plan` model B (the store not fitted:
every point at its class's mean cost), `dooly merge` and `dooly fit`, `dooly plan` B again (points
priced by the kernel latencies the fitted store predicts, `dooly.profile.latency`), then `dooly
profile` B. Reported per repeat and as medians: both estimates against the device-seconds profile
spent, and the planned against the measured point counts (refinements apart: the plan expects
them, profile measures them where latency bends). B's MLP and attention are wider than A's, so its
kernels run longer than any A measured: the case a mean cost per point cannot see.

Pairs (`--pair`): `tiny`, two 2-layer configs whose kernels take microseconds (a Llama, then a wider
Qwen2 with biased projections, a matmul class the Llama never ran); `demo`, the bundled
Qwen2.5-0.5B then Qwen2.5-1.5B on `dooly demo`'s CPU sweep (float32, 3 samples a point).

    python bench/plan_cpu.py --pair tiny --out data/cpu/plan_estimate/tiny --repeats 3
    python bench/plan_cpu.py --pair demo --out data/cpu/plan_estimate/demo --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("plan_cpu")

DOOLY = str(Path(sys.executable).parent / "dooly")
MODEL_A = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
           "intermediate_size": 352, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "vocab_size": 512, "max_position_embeddings": 4096, "tie_word_embeddings": False}
# Another architecture (biased q/k/v projections: a matmul class A never ran), wider everywhere.
MODEL_B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 192,
           "intermediate_size": 512, "num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "vocab_size": 512, "max_position_embeddings": 4096, "tie_word_embeddings": False}
TINY_GRID = ["--max-tokens", "64", "--max-seqs", "8", "--max-kv", "2048", "--max-context", "512"]
# `dooly demo`'s sweep and timer (dooly/fleet/demo_fleet.yaml); the timer is profile's alone.
DEMO_GRID = ["--max-tokens", "64", "--max-seqs", "8", "--max-kv", "512", "--max-context", "256", "--dtype", "float32"]
DEMO_TIMER = ["--samples", "3"]
PAIRS: dict[str, tuple[str | dict[str, Any], str | dict[str, Any], list[str], list[str]]] = {
    "tiny": (MODEL_A, MODEL_B, TINY_GRID, []),
    "demo": ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", DEMO_GRID, DEMO_TIMER),
}
TARGET_PCT = 25.0
PERCENT = 100.0


def dooly(*args: str) -> dict[str, Any]:
    done = subprocess.run([DOOLY, *args, "--output", "json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def model_arg(work: Path, name: str, model: str | dict[str, Any]) -> str:
    """A bundled id as it is, a config written into WORK as NAME.json."""
    if isinstance(model, str):
        return model
    path = work / f"{name}.json"
    path.write_text(json.dumps(model))
    return str(path)


def repeat(work: Path, pair: str) -> dict[str, Any]:
    store = str(work / "db")
    first, second, grid, timer = PAIRS[pair]
    model_a, model_b = model_arg(work, "model-a", first), model_arg(work, "model-b", second)
    dooly("profile", model_a, "--store", store, *grid, *timer)
    unfitted = dooly("plan", model_b, "--store", store, *grid)
    subprocess.run([DOOLY, "merge", "--store", store], capture_output=True, check=True)
    subprocess.run([DOOLY, "fit", "--store", store], capture_output=True, check=True)
    fitted = dooly("plan", model_b, "--store", store, *grid)
    spent = dooly("profile", model_b, "--store", store, *grid, *timer)
    seconds = spent["device_seconds"]
    return {
        "spent_s": seconds,
        "estimate_fitted_s": fitted["estimated_device_seconds"],
        "estimate_unfitted_s": unfitted["estimated_device_seconds"],
        "error_fitted_pct": round(PERCENT * (fitted["estimated_device_seconds"] - seconds) / seconds, 1),
        "error_unfitted_pct": round(PERCENT * (unfitted["estimated_device_seconds"] - seconds) / seconds, 1),
        "planned_points": fitted["missing_points"],
        "measured_planned_points": spent["planned_points"],
        "expected_refinements": fitted["expected_refinement_points"],
        "measured_refinements": spent["refinement_points"],
        "latencies": fitted["estimate"]["latencies"],
    }


def table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| repeat | spent (device-s) | plan, store fitted | error | plan, store not fitted | error "
             "| points planned / measured | refinements expected / measured |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['spent_s']:.3f} | {r['estimate_fitted_s']:.3f} | {r['error_fitted_pct']:+.1f}% | "
                     f"{r['estimate_unfitted_s']:.3f} | {r['error_unfitted_pct']:+.1f}% | "
                     f"{r['planned_points']} / {r['measured_planned_points']} | "
                     f"{r['expected_refinements']} / {r['measured_refinements']} |")
    fitted = statistics.median(r["error_fitted_pct"] for r in runs)
    unfitted = statistics.median(r["error_unfitted_pct"] for r in runs)
    lines += ["", f"median error: {fitted:+.1f}% with the store fitted, {unfitted:+.1f}% without (target "
                  f"{TARGET_PCT:.0f}%); within it: {sum(abs(r['error_fitted_pct']) <= TARGET_PCT for r in runs)} and "
                  f"{sum(abs(r['error_unfitted_pct']) <= TARGET_PCT for r in runs)} of {len(runs)} repeats; point counts "
                  f"equal in {sum(r['planned_points'] == r['measured_planned_points'] for r in runs)} of {len(runs)}",
              "", f"{runs[-1]['latencies']}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    runs = []
    for index in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="plan-cpu-") as work:
            runs.append(repeat(Path(work), args.pair))
        log.info("repeat %d: spent %.3f s, plan %.3f s (store fitted), %.3f s (not fitted)", index + 1,
                 runs[-1]["spent_s"], runs[-1]["estimate_fitted_s"], runs[-1]["estimate_unfitted_s"])
    lines = table(runs)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan_cpu.json").write_text(json.dumps(runs, indent=2) + "\n")
        (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
