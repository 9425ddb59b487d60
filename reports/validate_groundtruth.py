"""Accuracy table: every benchmarked (model, backend, engine settings) against the latency database.

For each group of cells `<model>.<backend>.<variant>.<workload>` under GROUND_TRUTH (as
device/device_bench.py writes them), the engine overhead is calibrated on the `calib` workload
(`dooly overhead`), then every other workload is validated (`dooly validate`) with it: TTFT, TPOT
and per-step MAPE, and the signed error of the TTFT, TPOT and E2E distributions (mean, p50, p90,
p99 across requests). The store must be merged and fitted (`dooly merge`, `dooly fit`).

accuracy.json holds one row per validated cell: `ttft_mape`, `ttft_p50` (median APE), `tpot_mape`,
`tpot_p50`, `step_mape`, and `<ttft|tpot|e2e>_<mean|p50|p90|p99>_error_pct` (simulated statistic
against measured, in percent; > 0: the simulation is slower). accuracy.md is the table of the
headline columns.

    python reports/validate_groundtruth.py --ground-truth data/h100/groundtruth --store DB \\
        --platform NVIDIA-H100-80GB-HBM3 --out report/
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from dooly.sim.commands import overhead_command, validate_command
from dooly.sim.validate import DISTRIBUTION_STATISTICS, REQUEST_METRICS

log = logging.getLogger("validate_groundtruth")

CALIBRATION_WORKLOAD = "calib"
# Variants whose engine settings equal another's but for how the run was served: calibrated on
# that one's calibration run (`warm` is `graphs` after an unrecorded warm pass) where they have
# no calibration run of their own.
CALIBRATION_VARIANT = {"warm": "graphs"}
# The distribution errors that make it into the markdown tables (all are in accuracy.json).
DISTRIBUTION_COLUMNS = (
    ("mean TTFT err", "ttft_mean_error_pct"),
    ("p90 TTFT err", "ttft_p90_error_pct"),
    ("mean TPOT err", "tpot_mean_error_pct"),
)
DISTRIBUTION_NOTE = ("Distribution columns (err): the simulated mean or p90 across requests against the measured one\n"
                     "(> 0: simulated slower); their mean row averages absolute values.")
# The paper's accuracy targets (arXiv 2605.07985), in percent.
TTFT_TARGET_PCT = 5.0
TPOT_TARGET_PCT = 8.0
BUNDLED_ORGS = {"Llama": "meta-llama", "Qwen2.5": "Qwen", "gemma": "google", "Mistral": "mistralai", "Mixtral": "mistralai"}


def within_targets(rows: list[dict], ttft_key: str, tpot_key: str) -> int:
    """How many rows have |TTFT error| <= the TTFT target and |TPOT error| <= the TPOT target."""
    return sum(1 for r in rows if abs(r[ttft_key]) <= TTFT_TARGET_PCT and abs(r[tpot_key]) <= TPOT_TARGET_PCT)


def model_id(short: str) -> str:
    for prefix, org in BUNDLED_ORGS.items():
        if short.startswith(prefix):
            return f"{org}/{short}"
    return short


def accuracy_fields(requests: dict[str, Any], distribution: dict[str, Any]) -> dict[str, float | int | None]:
    """The flat accuracy.json fields of one comparison, from the `requests` (per-request errors)
    and `distribution` parts of a `dooly validate` report or of a `compare_runs` result: one
    flattening for the simulator and for the real engine against itself."""
    fields: dict[str, float | int | None] = {
        "requests": requests["ttft"]["n"],
        "ttft_mape": requests["ttft"]["mape"], "ttft_p50": requests["ttft"]["p50_ape"],
        "tpot_mape": requests["tpot"]["mape"], "tpot_p50": requests["tpot"]["p50_ape"],
    }
    for metric in REQUEST_METRICS:
        for statistic in DISTRIBUTION_STATISTICS:
            error = distribution[metric][statistic]
            fields[f"{metric}_{statistic}_error_pct"] = None if error is None else error["error_pct"]
    return fields


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def signed_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def distribution_cells(row: dict[str, Any]) -> list[str]:
    """The DISTRIBUTION_COLUMNS of one accuracy row, formatted."""
    return [signed_pct(row[key]) for _, key in DISTRIBUTION_COLUMNS]


def mean_abs(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of |row[key]| over the rows that have it: signed errors of opposite cells must not cancel."""
    values = [abs(r[key]) for r in rows if r[key] is not None]
    return sum(values) / len(values) if values else None


def run_json(command, argv: list[str]) -> dict:
    """Run a dooly command in-process with --output json and return what it printed."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        command.main(argv + ["--output", "json"], standalone_mode=False)
    return json.loads(buffer.getvalue())


def calibration_cell(ground_truth: Path, short: str, backend_name: str, variant: str) -> str | None:
    """The cell a group's engine overhead is calibrated on: its own `calib` run, recorded in the
    same device session as the runs it is validated against (the host's share of a step differs
    between machines), else the calib run of the variant it derives from; None if neither exists."""
    for candidate in (variant, CALIBRATION_VARIANT.get(variant)):
        name = f"{short}.{backend_name}.{candidate}.{CALIBRATION_WORKLOAD}"
        if candidate and (ground_truth / name / "requests.parquet").is_file():
            return name
    return None


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
        calibration = calibration_cell(args.ground_truth, short, backend_name, variant)
        if calibration is None:
            log.warning("%s %s %s has no %s run: skipped", short, backend_name, variant, CALIBRATION_WORKLOAD)
            continue
        model = model_id(short)
        backend = backend_name.replace("-", "|", 1)
        common = ["--store", args.store, "--platform", args.platform, "--backend", backend]
        prefix = f"{short}.{backend_name}.{variant}"
        overhead_file = args.out / f"{prefix}.overhead.json"
        run_json(overhead_command, [model, "--ground-truth", str(args.ground_truth / calibration),
                                    "--out", str(overhead_file), *common])
        for workload in sorted(w for w in workloads if w != CALIBRATION_WORKLOAD):
            argv = [model, "--ground-truth", str(args.ground_truth / f"{prefix}.{workload}"),
                    "--cpu-overhead", str(overhead_file), *common]
            if args.plots:
                argv += ["--plot", str(args.out / f"{prefix}.{workload}.png")]
            report = run_json(validate_command, argv)
            rows.append({
                "model": short, "backend": backend, "variant": variant, "workload": workload, "calibration": calibration,
                **accuracy_fields(report["requests"], report["distribution"]),
                "step_mape": (report["steps"] or {}).get("mape"),
            })
            log.info("%s %s: TTFT MAPE %.1f%% TPOT MAPE %.1f%%; mean TTFT %+.1f%% mean TPOT %+.1f%%", prefix, workload,
                     rows[-1]["ttft_mape"], rows[-1]["tpot_mape"], rows[-1]["ttft_mean_error_pct"], rows[-1]["tpot_mean_error_pct"])
    (args.out / "accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = accuracy_table(rows)
    (args.out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def accuracy_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per cell, per-request MAPE then distribution errors, a mean row."""
    distribution_headers = " | ".join(label for label, _ in DISTRIBUTION_COLUMNS)
    lines = [f"| model | backend | engine settings | workload | requests | TTFT MAPE | TPOT MAPE | step MAPE | {distribution_headers} |",
             "|---|---|---|---|---:|---:|---:|---:|" + "---:|" * len(DISTRIBUTION_COLUMNS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['backend']} | {r['variant']} | {r['workload']} | {r['requests']} | "
                     f"{pct(r['ttft_mape'])} | {pct(r['tpot_mape'])} | {pct(r['step_mape'])} | {' | '.join(distribution_cells(r))} |")
    if rows:
        distribution_means = " | ".join(pct(mean_abs(rows, key)) for _, key in DISTRIBUTION_COLUMNS)
        lines.append(f"| mean | | | | | {pct(sum(r['ttft_mape'] for r in rows) / len(rows))} | "
                     f"{pct(sum(r['tpot_mape'] for r in rows) / len(rows))} | | {distribution_means} |")
        lines += ["", DISTRIBUTION_NOTE]
    return lines


if __name__ == "__main__":
    main()
