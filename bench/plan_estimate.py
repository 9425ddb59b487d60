"""Does `dooly plan` price a model's profiling right? Checked on what a store's shards record.

For every model with an inventory in the store (per backend): the signatures only that model
uses are set aside, `dooly.profile.costs.PointCosts` is fitted on every other row of the platform,
held and failed (what the store would know before profiling the model), and the set-aside rows are
priced with it: estimate against the device_seconds those rows record (each row's whole
measurement: build, warm-up, calibration, samples, or the failed attempt). Every row is one
attempt a plan listed: a point that failed is not held, so the next run's plan lists it again and
its profile attempts it again (the H100 store's flex points were attempted up to five times). The
first attempt at a point is priced as a plan for a store without it would price it, every later
one as a point that failed before. The estimate without failure pricing (every attempt at the
cost of a held point, what `dooly plan` did before it priced failures) is shown beside it.
Point counts are not the question here: the rows are the attempts that were made, refinements
included.

`dooly plan` prices a point by its kernel's latency where the store's fitted models predict one
(`dooly.profile.latency`). With `--fitted FITTED --work DIR`, each model's points are also priced
that way: FITTED (the store, merged and fitted) is copied into DIR without the signatures only that
model runs and refitted, and its predictions for those signatures price the model's points (the
`latency` columns: what a plan on a fitted store says for a model it has never measured). The
`measured latency` columns price each point by the latency its own row measured: the bound a
perfect prediction would reach.

    python bench/plan_estimate.py --store data/h100/db --out data/h100/experiments/plan_estimate \\
        --fitted FITTED_H100 --work /tmp/plan-lomo

`--run RUN_ID` also holds out one profile run as a whole (the H200's unseen Llama-3.1-8B, whose
plan the issue on unseen models found at 13.5 device-s against 41.8 spent, and the unseen
Llama-3.2-3B's sdpa and eager runs):

    python bench/plan_estimate.py --store data/h200/db --out data/h200/experiments/plan_estimate \\
        --fitted FITTED_H200 --work /tmp/plan-lomo200 --run 20261204T190249Z-bf9da9b0 \\
        --run 20261206T040852Z-5d3c62e5 --run 20261206T040950Z-964dea7b
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dooly.profile.costs import (
    ATTEMPT_STACK,
    DEFAULT_POINT_SECONDS,
    FAILED_STATUS,
    HELD_STATUSES,
    OOM_STATUS,
    PointCosts,
    startups_of,
)
from dooly.profile.latency import row_latencies
from dooly.profile.provenance import SHARED_BACKEND
from dooly.store.shards import SHARDS_PREFIX

log = logging.getLogger("plan_estimate")

COLUMNS = ("signature", "op", "op_class", "signature_json", "config_dims", "request_vars", "T", "B", "K", "D",
           "point_key", "status", "device_seconds", "latency_median_s", "run_id", *ATTEMPT_STACK)
SNAPSHOT_DATA = "snapshots/gen-000001/data.parquet"
MODELS_DIR = "models"
TARGET_PCT = 25.0
PERCENT = 100.0


def read_rows(store: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((store / SHARDS_PREFIX.rstrip("/")).rglob("*.parquet")):
        rows += pq.read_table(path, columns=list(COLUMNS)).to_pylist()
    return [r for r in rows if r["status"] in (*HELD_STATUSES, FAILED_STATUS)]


def inventories(store: Path) -> dict[tuple[str, str], set[str]]:
    """(model id, backend) -> the signatures its inventory lists."""
    found = {}
    for path in sorted((store / "inventories").glob("*/*.json")):
        doc = json.loads(path.read_text())
        if "operations" not in doc or doc.get("tp", 1) != 1:  # the model's config.json sits beside them
            continue
        found[(doc["model_id"], doc["backend"])] = {op["signature"] for op in doc["operations"]}
    return found


def attempts_by_point(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """(stack, signature, point) -> its rows: the attempts at one point on one software stack."""
    points: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        stack = tuple(row[c] for c in ATTEMPT_STACK)
        points[(stack, row["signature"], row["point_key"])].append(row)
    return points


def price(costs: PointCosts, attempts: list[dict[str, Any]], latency: float | None = None) -> tuple[float, float, float]:
    """A point's attempts as plans would have priced them: (estimate, its expected failed
    attempts' seconds, the estimate without failure pricing). The first attempt is a new point;
    the others follow a failure (a held point is not attempted again). `latency`: the point's
    kernel latency where the plan knows one (None: its class's mean cost)."""
    first = attempts[0]
    op_class = str(first["op_class"])
    scalars = json.loads(first["signature_json"]).get("scalars", {})
    doomed = costs.failures.dooms(op_class, scalars)
    estimate = failures = 0.0
    for index in range(len(attempts)):
        chance, seconds = costs.attempt(op_class, doomed, failed_before=index > 0, latency=latency)
        estimate += seconds
        failures += chance * costs.failed_seconds(op_class)
    return estimate, failures, costs.seconds(op_class, latency) * len(attempts)


def measured_latency(attempts: list[dict[str, Any]]) -> float | None:
    """The kernel latency a point's held row measured (None where no attempt was held)."""
    return next((float(r["latency_median_s"]) for r in attempts if r["status"] in HELD_STATUSES
                 and r["latency_median_s"]), None)


def held_out_predictor(fitted: Path, work: Path, name: str, dropped: Any, row: dict[str, Any]) -> Any:
    """The fitted models a store without some rows makes: FITTED copied into WORK/NAME without its
    models, the snapshot rows DROPPED (a polars expression) selects left out, fitted again (reused
    where WORK already holds the fit). Their group is that of ROW's platform, engine, backend, dtype."""
    import polars as pl

    from dooly.fit.persist import fit_store, store_predictor
    from dooly.store.backends import open_store

    target = work / name.replace("/", "--")
    if not (target / MODELS_DIR).is_dir():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(fitted, target, ignore=shutil.ignore_patterns(MODELS_DIR))
        frame = pl.read_parquet(fitted / SNAPSHOT_DATA)
        kept = frame.filter(~dropped)
        kept.write_parquet(target / SNAPSHOT_DATA)
        log.info("%s: refitting %s without %d of its rows", name, target, frame.height - kept.height)
        fit_store(open_store(str(target), create=False))
    store = open_store(str(target), create=False)
    return store_predictor(store, platform=row["platform"], engine=row["engine"], backend=row["backend"],
                           dtype=row["dtype"])


def predicted_latencies(predictors: dict[str, Any], rows: list[dict[str, Any]]) -> list[float | None]:
    """Each row's kernel latency as the held-out fit of its backend predicts it
    (`dooly.profile.latency.row_latencies`, as a plan predicts its store's rows)."""
    found: list[float | None] = [None] * len(rows)
    by_backend: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_backend[row["backend"]].append(index)
    for backend, indices in by_backend.items():
        for index, latency in zip(indices, row_latencies(predictors[backend], [rows[i] for i in indices]), strict=True):
            found[index] = latency
    return found


def leave_one_model_out(rows: list[dict[str, Any]], models: dict[tuple[str, str], set[str]],
                        fitted: Path | None = None, work: Path | None = None) -> list[dict[str, Any]]:
    """Each model's own rows priced from every other row of the platform, per attention backend and
    for its operations that serve every backend (backend `any`, measured once): each attempt as a plan
    prices a point, and each run those rows started (they hold its attention start-up row,
    `startups_of` over the whole store) at the class's start-up, as a plan prices one run, and each
    (run, signature) not attention at its weight build (`run_builds`). With
    FITTED and WORK, also by the kernel latencies a held-out fit predicts (`held_out_predictor`)."""
    import polars as pl

    results = []
    startup_rows, _ = startups_of([r for r in rows if r["status"] in HELD_STATUSES])
    by_model: dict[str, set[str]] = defaultdict(set)
    for (model, _), signatures in models.items():
        by_model[model] |= signatures
    pairs = sorted({*models, *((model, SHARED_BACKEND) for model in by_model)})
    for model, backend in pairs:
        own = by_model[model] - set().union(*(s for m, s in by_model.items() if m != model))
        target = [r for r in rows if r["signature"] in own and r["backend"] == backend]
        if not target:
            continue
        history = [r for r in rows if r["signature"] not in own and r["platform"] == target[0]["platform"]]
        refit = None if fitted is None or work is None else partial(
            held_out_predictor, fitted, work, model, pl.col("signature").is_in(sorted(own)))
        results.append(priced_result({"model": model, "backend": backend, "signatures": len(own)}, target, history,
                                     startup_rows, refit))
    return results


def leave_one_run_out(rows: list[dict[str, Any]], runs: list[str], fitted: Path | None = None,
                      work: Path | None = None) -> list[dict[str, Any]]:
    """Each named profile run's rows priced from every other row of its platform, as a plan made
    just before that run would have priced them (the H200's unseen Llama-3.1-8B, say)."""
    import polars as pl

    results = []
    startup_rows, _ = startups_of([r for r in rows if r["status"] in HELD_STATUSES])
    for run in runs:
        target = [r for r in rows if r["run_id"] == run]
        if not target:
            raise SystemExit(f"no rows of run {run}")
        history = [r for r in rows if r["run_id"] != run and r["platform"] == target[0]["platform"]]
        refit = None if fitted is None or work is None else partial(
            held_out_predictor, fitted, work, f"run-{run}", pl.col("run_id") == run)
        backends = "+".join(sorted({r["backend"] for r in target}))
        results.append(priced_result({"model": f"run {run}", "backend": backends,
                                      "signatures": len({r["signature"] for r in target})},
                                     target, history, startup_rows, refit))
    return results


def run_builds(costs: PointCosts, target: list[dict[str, Any]]) -> float:
    """The weight builds TARGET's rows paid, as plans price them: one per (run, signature) that is
    not attention (`PointCosts.build_seconds`), as the run start-ups are one per run."""
    firsts = {(r["run_id"], r["signature"]): r for r in target}
    return sum(costs.build_seconds(str(r["op_class"]), json.loads(r["signature_json"] or "{}")) for r in firsts.values())


def priced_result(names: dict[str, Any], target: list[dict[str, Any]], history: list[dict[str, Any]],
                  startup_rows: set[int], refit: Any) -> dict[str, Any]:
    """TARGET's rows (attempts) priced from HISTORY's: at the class mean, without failure pricing,
    by each point's measured latency, and (REFIT: the held-out fit's predictor of a row's group)
    by the latencies that fit predicts, against the device-seconds they spent."""
    platform = target[0]["platform"]
    costs = PointCosts.fit(history, DEFAULT_POINT_SECONDS["cuda"], platform)
    points = attempts_by_point(target)
    priced = [price(costs, attempts) for attempts in points.values()]
    measured = [price(costs, attempts, measured_latency(attempts)) for attempts in points.values()]
    startups = sum(costs.startup_seconds(str(r["op_class"])) for r in target if id(r) in startup_rows)
    builds = run_builds(costs, target)
    once = startups + builds  # what the runs pay once: attention start-ups and weight builds
    estimate = sum(p[0] for p in priced) + once
    before = sum(p[2] for p in priced) + once
    spent = sum(r["device_seconds"] for r in target)
    failed = [r for r in target if r["status"] == FAILED_STATUS]
    result = {
        **names, "points": len(points), "attempts": len(target), "failed_attempts": len(failed),
        "spent_s": round(spent, 2), "estimate_s": round(estimate, 2), "startup_estimate_s": round(startups, 2),
        "build_estimate_s": round(builds, 2),
        "error_pct": _error(estimate, spent),
        "failed_spent_s": round(sum(r["device_seconds"] for r in failed), 2),
        "failed_estimate_s": round(sum(p[1] for p in priced), 2),
        "unpriced_failures_s": round(before, 2),
        "unpriced_failures_error_pct": _error(before, spent),
        "measured_latency_estimate_s": round(sum(p[0] for p in measured) + once, 2),
        "measured_latency_error_pct": _error(sum(p[0] for p in measured) + once, spent),
    }
    if refit is not None:
        predictors = {row["backend"]: refit(row) for row in {r["backend"]: r for r in history + target}.values()}
        costs = PointCosts.fit(history, DEFAULT_POINT_SECONDS["cuda"], platform,
                               predict=partial(predicted_latencies, predictors))
        firsts = [attempts[0] for attempts in points.values()]
        latencies = dict(zip(points, predicted_latencies(predictors, firsts), strict=True))
        latency_priced = sum(price(costs, attempts, latencies[point])[0] for point, attempts in points.items())
        result.update({
            "latency_estimate_s": round(latency_priced + once, 2),
            "latency_error_pct": _error(latency_priced + once, spent),
            "latency_points": sum(latency is not None for latency in latencies.values()),
            "expected_oom_points": sum(costs.expects_oom(str(attempts[0]["op_class"]), latencies[point])
                                       for point, attempts in points.items()),
            "oom_points": sum(attempts[-1]["status"] == OOM_STATUS for attempts in points.values()),
        })
    log.info("%s %s: spent %.1f s (%d failed attempts), estimate %.1f s (%.1f s without failure pricing)%s",
             names["model"], names["backend"], spent, len(failed), estimate, before,
             f", {result['latency_estimate_s']:.1f} s by predicted latency" if "latency_estimate_s" in result else "")
    return result


def _error(estimate: float, spent: float) -> float:
    return round(PERCENT * (estimate - spent) / spent, 1)


def leave_one_signature_out(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The signatures a failure rule condemns on the whole store (a feature none of its attempts
    survived), each priced from every other row of its platform: whether the rule, learned from
    the other signatures that set the feature, foresees this one's failures. Leaving a model out
    cannot show it where, as for gemma-2's soft-capping, one model alone sets the feature."""
    results = []
    for platform in sorted({r["platform"] for r in rows}):
        on_platform = [r for r in rows if r["platform"] == platform]
        whole = PointCosts.fit(on_platform, DEFAULT_POINT_SECONDS["cuda"], platform)
        signatures: dict[str, dict[str, Any]] = {}
        for row in on_platform:
            signatures.setdefault(row["signature"], row)
        for signature, first in sorted(signatures.items()):
            scalars = json.loads(first["signature_json"]).get("scalars", {})
            if not whole.failures.dooms(str(first["op_class"]), scalars):
                continue
            costs = PointCosts.fit([r for r in on_platform if r["signature"] != signature],
                                   DEFAULT_POINT_SECONDS["cuda"], platform)
            target = [r for r in on_platform if r["signature"] == signature]
            priced = [price(costs, attempts) for attempts in attempts_by_point(target).values()]
            spent = sum(r["device_seconds"] for r in target)
            estimate = sum(p[0] for p in priced)
            results.append({
                "signature": signature, "op_class": first["op_class"], "attempts": len(target),
                "failed_attempts": sum(1 for r in target if r["status"] == FAILED_STATUS),
                "doomed": costs.failures.dooms(str(first["op_class"]), scalars),
                "spent_s": round(spent, 2), "estimate_s": round(estimate, 2),
                "error_pct": round(PERCENT * (estimate - spent) / spent, 1),
                "unpriced_failures_s": round(sum(p[2] for p in priced), 2),
            })
    return results


def rule_table(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    lines = ["", "Signatures a failure rule condemns, each priced from every other row (its own left out):", "",
             "| signature | op class | attempts | failed | rule fires | spent (device-s) | estimate | error "
             "| without failure pricing |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['signature']} | {r['op_class']} | {r['attempts']} | {r['failed_attempts']} | "
                     f"{'yes' if r['doomed'] else 'no'} | {r['spent_s']:.1f} | {r['estimate_s']:.1f} | "
                     f"{r['error_pct']:+.1f}% | {r['unpriced_failures_s']:.1f} |")
    return lines


def table(results: list[dict[str, Any]]) -> list[str]:
    latency = any("latency_estimate_s" in r for r in results)
    lines = ["| model | backend | own signatures | points | attempts | failed | spent (device-s) | estimate | error "
             "| failed: spent | failed: estimate | without failure pricing | error | by measured latency | error"
             + (" | by predicted latency | error |" if latency else " |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if latency else "")]
    for r in results:
        line = (f"| {r['model']} | {r['backend']} | {r['signatures']} | {r['points']} | {r['attempts']} | "
                f"{r['failed_attempts']} | {r['spent_s']:.1f} | {r['estimate_s']:.1f} | {r['error_pct']:+.1f}% | "
                f"{r['failed_spent_s']:.1f} | {r['failed_estimate_s']:.1f} | {r['unpriced_failures_s']:.1f} | "
                f"{r['unpriced_failures_error_pct']:+.1f}% | {r['measured_latency_estimate_s']:.1f} | "
                f"{r['measured_latency_error_pct']:+.1f}% |")
        if latency:
            line += f" {r['latency_estimate_s']:.1f} | {r['latency_error_pct']:+.1f}% |"
        lines.append(line)
    if results:
        columns = {"error_pct": "by class mean", "unpriced_failures_error_pct": "without failure pricing",
                   "measured_latency_error_pct": "by measured latency"}
        if latency:
            columns["latency_error_pct"] = "by predicted latency (held-out fit)"
        within = "; ".join(f"{label} {sum(1 for r in results if abs(r[name]) <= TARGET_PCT)}"
                           for name, label in columns.items())
        total = {name: sum(r[name] for r in results)
                 for name in ("spent_s", "estimate_s", "unpriced_failures_s", "failed_spent_s", "failed_estimate_s",
                              "measured_latency_estimate_s", *(("latency_estimate_s",) if latency else ()))}
        lines += ["", f"within {TARGET_PCT:.0f}% of {len(results)}: {within}; total spent {total['spent_s']:.0f} s, "
                      f"estimated {total['estimate_s']:.0f} s by class mean (without failure pricing "
                      f"{total['unpriced_failures_s']:.0f} s), {total['measured_latency_estimate_s']:.0f} s by measured "
                      f"latency" + (f", {total['latency_estimate_s']:.0f} s by predicted latency" if latency else "")
                      + f"; failed attempts spent {total['failed_spent_s']:.0f} s, estimated "
                      f"{total['failed_estimate_s']:.0f} s"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path, help="A local store directory (its shards are read).")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fitted", type=Path,
                        help="The same store merged and fitted (`dooly merge`, `dooly fit`): its held-out refits "
                             "predict each model's kernel latencies.")
    parser.add_argument("--work", type=Path, help="Where the held-out refits are made (reused when there).")
    parser.add_argument("--run", action="append", default=[],
                        help="A profile run (its run_id) to hold out as a whole as well, priced as the plan made "
                             "just before it would have (repeatable).")
    args = parser.parse_args()
    if (args.fitted is None) != (args.work is None):
        parser.error("--fitted and --work go together")
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    rows = read_rows(args.store)
    results = leave_one_model_out(rows, inventories(args.store), args.fitted, args.work)
    results += leave_one_run_out(rows, args.run, args.fitted, args.work)
    rules = leave_one_signature_out(rows)
    lines = table(results) + rule_table(rules)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "estimate.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "failure_rules.json").write_text(json.dumps(rules, indent=2) + "\n")
        (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
