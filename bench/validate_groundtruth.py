"""Accuracy table: every benchmarked (model, backend, engine settings) against the latency database.

For each group of cells `<model>.<backend>.<variant>.<workload>` under GROUND_TRUTH (as
bench/device_bench.py writes them), the engine overhead is calibrated on the `calib` workload
(`dooly overhead`), then every other workload is validated (`dooly validate`) with it: TTFT, TPOT
and per-step MAPE. The store must be merged and fitted (`dooly merge`, `dooly fit`).

    python bench/validate_groundtruth.py --ground-truth data/h100/groundtruth --store DB \\
        --platform NVIDIA-H100-80GB-HBM3 --out report/
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

from dooly.sim.commands import overhead_command, validate_command

log = logging.getLogger("validate_groundtruth")

CALIBRATION_WORKLOAD = "calib"
BUNDLED_ORGS = {"Llama": "meta-llama", "Qwen2.5": "Qwen", "gemma": "google", "Mistral": "mistralai", "Mixtral": "mistralai"}


def model_id(short: str) -> str:
    for prefix, org in BUNDLED_ORGS.items():
        if short.startswith(prefix):
            return f"{org}/{short}"
    return short


def run_json(command, argv: list[str]) -> dict:
    """Run a dooly command in-process with --output json and return what it printed."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        command.main(argv + ["--output", "json"], standalone_mode=False)
    return json.loads(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ground-truth", required=True, type=Path)
    parser.add_argument("--store", required=True)
    parser.add_argument("--platform", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--plots", action="store_true", help="Write a predicted-vs-measured scatter per cell.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for cell in sorted(p for p in args.ground_truth.iterdir() if (p / "requests.parquet").is_file()):
        short, backend, variant, workload = cell.name.rsplit(".", 3)
        groups[(short, backend, variant)].append(workload)

    rows = []
    for (short, backend_name, variant), workloads in sorted(groups.items()):
        if CALIBRATION_WORKLOAD not in workloads:
            log.warning("%s %s %s has no %s run: skipped", short, backend_name, variant, CALIBRATION_WORKLOAD)
            continue
        model = model_id(short)
        backend = backend_name.replace("-", "|", 1)
        common = ["--store", args.store, "--platform", args.platform, "--backend", backend]
        prefix = f"{short}.{backend_name}.{variant}"
        overhead_file = args.out / f"{prefix}.overhead.json"
        run_json(overhead_command, [model, "--ground-truth", str(args.ground_truth / f"{prefix}.{CALIBRATION_WORKLOAD}"),
                                    "--out", str(overhead_file), *common])
        for workload in sorted(w for w in workloads if w != CALIBRATION_WORKLOAD):
            argv = [model, "--ground-truth", str(args.ground_truth / f"{prefix}.{workload}"),
                    "--cpu-overhead", str(overhead_file), *common]
            if args.plots:
                argv += ["--plot", str(args.out / f"{prefix}.{workload}.png")]
            report = run_json(validate_command, argv)
            requests = report["requests"]
            rows.append({
                "model": short, "backend": backend, "variant": variant, "workload": workload,
                "requests": requests["ttft"]["n"],
                "ttft_mape": requests["ttft"]["mape"], "ttft_p50": requests["ttft"]["p50_ape"],
                "tpot_mape": requests["tpot"]["mape"], "tpot_p50": requests["tpot"]["p50_ape"],
                "step_mape": (report["steps"] or {}).get("mape"),
            })
            log.info("%s %s: TTFT %.1f%% TPOT %.1f%%", prefix, workload, rows[-1]["ttft_mape"], rows[-1]["tpot_mape"])
    (args.out / "accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | backend | engine settings | workload | requests | TTFT MAPE | TPOT MAPE | step MAPE |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        step = "-" if r["step_mape"] is None else f"{r['step_mape']:.1f}%"
        lines.append(f"| {r['model']} | {r['backend']} | {r['variant']} | {r['workload']} | {r['requests']} | "
                     f"{r['ttft_mape']:.1f}% | {r['tpot_mape']:.1f}% | {step} |")
    if rows:
        lines.append(f"| mean | | | | | {sum(r['ttft_mape'] for r in rows) / len(rows):.1f}% | "
                     f"{sum(r['tpot_mape'] for r in rows) / len(rows):.1f}% | |")
    (args.out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
