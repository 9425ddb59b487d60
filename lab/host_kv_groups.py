"""Does the engine's host time per step follow the KV index entries of a model's cache layer groups
better than the KV tokens read (and those times the layer count)? (CPU, a few minutes.)

transformers' continuous batching builds, every step, index lists as long as the KV tokens read,
one per cache layer group (a full-attention group reads every token; a sliding group at most its
window per sequence): the per-step host work scales with the groups, not with the layer count. The
calibration (`dooly.sim.calibration`) can fit either KV form (`KV_REGRESSORS`):
  tokens  per_kv_token_s * K + per_kv_token_layer_s * K * L  (calibrations before the group form);
  groups  per_kv_group_token_s * G + per_kv_sliding_token_s * S  (`CacheGroups.kv_reads`).
For every calibration key of the committed H100 calib runs with enough models, this measures:

1. Leave one model out: each model's mean host time per step predicted by the calibration fitted
   on the other models' runs (the layer-term choice as the full calibration makes it), per form;
   and the host charge per KV token that fit gives the left-out model on its decode path, beside
   the model's own (`dooly overhead`'s per-model fit of its runs).
2. Validation: every heavy and light cell of those keys (calibrated on the key's calib runs, as
   the store's calibration is) simulated with the store calibration of each form (`shared`: all
   models) and with the one fitted without the cell's model (`lomo`: what a never-run model gets).

    python lab/host_kv_groups.py --fitted-h100 FITTED_H100_STORE --out data/h100/experiments/host_kv_groups
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from dooly.sim.calibration import (
    DEFAULT_KEY,
    KV_REGRESSORS,
    CacheGroups,
    CalibrationKey,
    HostSample,
    fit_calibration,
    fit_path_terms,
)
from dooly.sim.calibration_commands import CalibrationRun, pool_samples, run_samples
from dooly.sim.step_model import GRAPH_SUFFIX, CpuOverheadModel, OverheadTerms
from dooly.sim.validate import load_ground_truth, validate

log = logging.getLogger("host_kv_groups")

ROOT = Path(__file__).resolve().parent.parent
H100_TRUTH = ROOT / "data" / "h100" / "groundtruth"
CALIBRATION_WORKLOAD = "calib"
VALIDATED_WORKLOADS = ("heavy", "light")
# Leaving one model out needs this many models in a key (as the calibration's own choice does).
MIN_MODELS = 4
DECODE = "decode"
PERCENT = 100.0
NS_PER_S = 1e9
MS_PER_S = 1e3
SCHEMES = ("shared", "lomo")
FORMS = tuple(KV_REGRESSORS)


def load_runs(truth_dir: Path) -> dict[CalibrationKey, list[CalibrationRun]]:
    """The committed calib runs by calibration key."""
    by_key: dict[CalibrationKey, list[CalibrationRun]] = defaultdict(list)
    for directory in sorted(truth_dir.glob(f"*.{CALIBRATION_WORKLOAD}")):
        if (directory / "requests.parquet").is_file():
            run = CalibrationRun.load(directory)
            by_key[run.key].append(run)
    return dict(by_key)


def decode_terms(terms: dict[str, Any], graphs: bool) -> Any:
    """The decode path's terms (the path whose KV tokens vary most in a calib run)."""
    key = DECODE + GRAPH_SUFFIX if graphs else DECODE
    return terms.get(key) or terms.get(DECODE) or terms[DEFAULT_KEY]


def own_kv_charge(samples: list[HostSample], graphs: bool) -> float:
    """Seconds per KV token on the decode path of the model's own fit (`dooly overhead`'s solver)."""
    own = CpuOverheadModel.fit([(s.key, s.num_seqs, s.num_tokens, s.kv_tokens, s.host_s) for s in samples])
    terms: OverheadTerms = decode_terms(own.terms, graphs)
    return terms.per_kv_token_s


def leave_one_model_out(key: CalibrationKey, runs: list[CalibrationRun], measured: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (left-out model, KV form): mean host time error and the per-KV-token charge."""
    samples, captures = pool_samples([(run.warm, *measured[run.name][:2]) for run in runs])
    models = sorted({run.model for run in runs})
    groups = {run.model: CacheGroups.from_scheduler(run.scheduler()) for run in runs}
    layers = {run.model: measured[run.name][2] for run in runs}
    rows = []
    for form in FORMS:
        layered = bool(fit_calibration(key, samples, captures, kv_regressors=form).fit["layer_terms"])
        for model in models:
            held_out = [s for s in samples if s.model == model]
            terms = fit_path_terms([s for s in samples if s.model != model], layer_terms=layered, kv_regressors=form)
            predicted = sum((terms.get(s.key) or terms[DEFAULT_KEY]).seconds(s) for s in held_out) / len(held_out)
            actual = sum(s.host_s for s in held_out) / len(held_out)
            charge = decode_terms(terms, key.cuda_graphs).for_layers(layers[model], groups[model]).per_kv_token_s
            rows.append({
                "key": key.label(), "model": model, "form": form, "layer_terms": layered, "steps": len(held_out),
                "groups": groups[model].describe(), "measured_host_ms": MS_PER_S * actual,
                "predicted_host_ms": MS_PER_S * predicted, "error_pct": PERCENT * (predicted - actual) / actual,
                "kv_charge_ns": NS_PER_S * charge, "own_kv_charge_ns": NS_PER_S * own_kv_charge(held_out, key.cuda_graphs),
            })
            log.info("%s %s %s: host %.2f ms predicted %.2f ms (%+.1f%%), %.0f ns per KV token (own %.0f)",
                     key.label(), model, form, rows[-1]["measured_host_ms"], rows[-1]["predicted_host_ms"],
                     rows[-1]["error_pct"], rows[-1]["kv_charge_ns"], rows[-1]["own_kv_charge_ns"])
    return rows


def validation_rows(key: CalibrationKey, runs: list[CalibrationRun], measured: dict[str, Any],
                    cache: dict[tuple[str, ...], Any]) -> list[dict[str, Any]]:
    """Every heavy and light cell of the key's runs, with each form's shared and left-out calibration."""
    cells = sorted({(run.directory.name.rsplit(".", 1)[0], run.model) for run in runs})
    calibrations: dict[tuple[str, str, str], Any] = {}
    for form in FORMS:
        for model in sorted({run.model for run in runs}):
            for scheme in SCHEMES:
                chosen = [run for run in runs if scheme == "shared" or run.model != model]
                samples, captures = pool_samples([(run.warm, *measured[run.name][:2]) for run in chosen])
                stalls = [stall for run in chosen for stall in run.stalls]
                calibrations[(form, scheme, model)] = fit_calibration(key, samples, captures, post_capture=stalls,
                                                                      kv_regressors=form)
    rows = []
    for prefix, model in cells:
        step_model, layers = next(value for ident, value in cache.items() if ident[1] == model and ident[3] == key.backend)
        for workload in VALIDATED_WORKLOADS:
            directory = H100_TRUTH / f"{prefix}.{workload}"
            if not (directory / "requests.parquet").is_file():
                continue
            cell = CalibrationRun.load(directory)
            scheduler = cell.scheduler()
            truth = load_ground_truth(directory)
            for (form, scheme, fitted_model), calibration in sorted(calibrations.items()):
                if fitted_model != model:
                    continue
                overhead = calibration.for_model(layers, model, CacheGroups.from_scheduler(scheduler))
                report = validate(truth, scheduler, step_model, overhead).as_dict()
                rows.append({
                    "key": key.label(), "cell": directory.name, "model": model, "form": form, "scheme": scheme,
                    "ttft_mape": report["requests"]["ttft"]["mape"], "tpot_mape": report["requests"]["tpot"]["mape"],
                    "ttft_mean_error_pct": report["distribution"]["ttft"]["mean"]["error_pct"],
                    "tpot_mean_error_pct": report["distribution"]["tpot"]["mean"]["error_pct"],
                })
                log.info("%s %s %s: TTFT mean %+.1f%% TPOT mean %+.1f%%", directory.name, form, scheme,
                         rows[-1]["ttft_mean_error_pct"], rows[-1]["tpot_mean_error_pct"])
    return rows


def lomo_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| key | model | cache groups | measured host ms | error, tokens | error, groups | "
             "ns per KV token, tokens | groups | own |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    by_model: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_model[(r["key"], r["model"])][r["form"]] = r
    for (key, model), forms in sorted(by_model.items()):
        old, new = forms["tokens"], forms["groups"]
        lines.append(f"| {key} | {model} | {new['groups']} | {new['measured_host_ms']:.2f} | {old['error_pct']:+.1f}% | "
                     f"{new['error_pct']:+.1f}% | {old['kv_charge_ns']:.0f} | {new['kv_charge_ns']:.0f} | "
                     f"{new['own_kv_charge_ns']:.0f} |")
    summary = []
    for key in sorted({r["key"] for r in rows}):
        for form in FORMS:
            part = [abs(r["error_pct"]) for r in rows if r["key"] == key and r["form"] == form]
            summary.append(f"- {key}, {form}: mean |error| {sum(part) / len(part):.1f}% over {len(part)} models")
    return lines + [""] + summary


def validation_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| cell | scheme | tokens: TTFT / TPOT mean err | groups: TTFT / TPOT mean err | "
             "tokens: TTFT / TPOT MAPE | groups: TTFT / TPOT MAPE |", "|---|---|---:|---:|---:|---:|"]
    by_cell: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_cell[(r["cell"], r["scheme"])][r["form"]] = r

    def mean(r: dict[str, Any]) -> str:
        return f"{r['ttft_mean_error_pct']:+.1f}% / {r['tpot_mean_error_pct']:+.1f}%"

    def mape(r: dict[str, Any]) -> str:
        return f"{r['ttft_mape']:.1f}% / {r['tpot_mape']:.1f}%"

    for (cell, scheme), forms in sorted(by_cell.items()):
        lines.append(f"| {cell} | {scheme} | {mean(forms['tokens'])} | {mean(forms['groups'])} | "
                     f"{mape(forms['tokens'])} | {mape(forms['groups'])} |")
    summary = []
    for scheme in SCHEMES:
        for form in FORMS:
            part = [r for r in rows if r["scheme"] == scheme and r["form"] == form]
            if part:
                summary.append(
                    f"- {scheme}, {form}: {len(part)} cells, mean |mean TTFT err| "
                    f"{sum(abs(r['ttft_mean_error_pct']) for r in part) / len(part):.1f}%, |mean TPOT err| "
                    f"{sum(abs(r['tpot_mean_error_pct']) for r in part) / len(part):.1f}%, TTFT MAPE "
                    f"{sum(r['ttft_mape'] for r in part) / len(part):.1f}%, TPOT MAPE {sum(r['tpot_mape'] for r in part) / len(part):.1f}%")
    return lines + [""] + summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fitted-h100", required=True, help="The H100 store, merged and fitted.")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple[str, ...], Any] = {}
    lomo: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    for key, runs in sorted(load_runs(H100_TRUTH).items(), key=lambda item: item[0].label()):
        if len({run.model for run in runs}) < MIN_MODELS:
            continue
        measured = {run.name: run_samples(run, args.fitted_h100, cache) for run in runs}
        lomo += leave_one_model_out(key, runs, measured)
        cells += validation_rows(key, runs, measured, cache)
    (args.out / "host_kv_groups.json").write_text(json.dumps({"leave_one_model_out": lomo, "validation": cells}, indent=2) + "\n")
    lines = ["# Host time per KV token: tokens (K, K * L) against cache layer groups", "",
             "Generated by lab/host_kv_groups.py from the committed H100 calib runs (docs/calibration.md).", "",
             "## Leave one model out: mean host time per step of the left-out model", "", *lomo_table(lomo), "",
             "## Validation with each form's calibration", "", *validation_table(cells)]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
