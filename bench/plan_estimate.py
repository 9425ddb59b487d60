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

    python bench/plan_estimate.py --store data/h100/db --out data/h100/experiments/plan_estimate
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dooly.profile.costs import (
    ATTEMPT_STACK,
    DEFAULT_POINT_SECONDS,
    FAILED_STATUS,
    HELD_STATUSES,
    PointCosts,
    startups_of,
)
from dooly.store.shards import SHARDS_PREFIX

log = logging.getLogger("plan_estimate")

COLUMNS = ("signature", "op_class", "signature_json", "point_key", "status", "device_seconds", "run_id",
           *ATTEMPT_STACK)
SHARED_BACKEND_MARK = "shared"
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


def price(costs: PointCosts, attempts: list[dict[str, Any]]) -> tuple[float, float, float]:
    """A point's attempts as plans would have priced them: (estimate, its expected failed
    attempts' seconds, the estimate without failure pricing). The first attempt is a new point;
    the others follow a failure (a held point is not attempted again)."""
    first = attempts[0]
    op_class = str(first["op_class"])
    scalars = json.loads(first["signature_json"]).get("scalars", {})
    doomed = costs.failures.dooms(op_class, scalars)
    estimate = failures = 0.0
    for index in range(len(attempts)):
        chance, seconds = costs.attempt(op_class, doomed, failed_before=index > 0)
        estimate += seconds
        failures += chance * costs.failed_seconds(op_class)
    return estimate, failures, costs.seconds(op_class) * len(attempts)


def leave_one_model_out(rows: list[dict[str, Any]], models: dict[tuple[str, str], set[str]]) -> list[dict[str, Any]]:
    """Each model's own rows priced from every other row of the platform: each attempt as a plan
    prices a point, and each run those rows started (they hold its attention start-up row,
    `startups_of` over the whole store) at the class's start-up, as a plan prices one run."""
    results = []
    startup_rows, _ = startups_of([r for r in rows if r["status"] in HELD_STATUSES])
    for (model, backend), signatures in sorted(models.items()):
        others = set().union(*(s for (m, b), s in models.items() if m != model))
        own = signatures - others
        target = [r for r in rows if r["signature"] in own and r["backend"] in (backend, SHARED_BACKEND_MARK)]
        if not target:
            continue
        platform = target[0]["platform"]
        history = [r for r in rows if r["signature"] not in own and r["platform"] == platform]
        costs = PointCosts.fit(history, DEFAULT_POINT_SECONDS["cuda"], platform)
        points = attempts_by_point(target)
        priced = [price(costs, attempts) for attempts in points.values()]
        startups = sum(costs.startup_seconds(str(r["op_class"])) for r in target if id(r) in startup_rows)
        estimate = sum(p[0] for p in priced) + startups
        before = sum(p[2] for p in priced) + startups
        spent = sum(r["device_seconds"] for r in target)
        failed = [r for r in target if r["status"] == FAILED_STATUS]
        results.append({
            "model": model, "backend": backend, "signatures": len(own), "points": len(points),
            "attempts": len(target), "failed_attempts": len(failed),
            "spent_s": round(spent, 2), "estimate_s": round(estimate, 2), "startup_estimate_s": round(startups, 2),
            "error_pct": round(PERCENT * (estimate - spent) / spent, 1),
            "failed_spent_s": round(sum(r["device_seconds"] for r in failed), 2),
            "failed_estimate_s": round(sum(p[1] for p in priced), 2),
            "unpriced_failures_s": round(before, 2),
            "unpriced_failures_error_pct": round(PERCENT * (before - spent) / spent, 1),
        })
        log.info("%s %s: spent %.1f s (%d failed attempts), estimate %.1f s (%.1f s without failure pricing)",
                 model, backend, spent, len(failed), estimate, before)
    return results


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
    lines = ["| model | backend | own signatures | points | attempts | failed | spent (device-s) | estimate | error "
             "| failed: spent | failed: estimate | without failure pricing | error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['backend']} | {r['signatures']} | {r['points']} | {r['attempts']} | "
                     f"{r['failed_attempts']} | {r['spent_s']:.1f} | {r['estimate_s']:.1f} | {r['error_pct']:+.1f}% | "
                     f"{r['failed_spent_s']:.1f} | {r['failed_estimate_s']:.1f} | {r['unpriced_failures_s']:.1f} | "
                     f"{r['unpriced_failures_error_pct']:+.1f}% |")
    if results:
        within = sum(1 for r in results if abs(r["error_pct"]) <= TARGET_PCT)
        within_before = sum(1 for r in results if abs(r["unpriced_failures_error_pct"]) <= TARGET_PCT)
        total = {name: sum(r[name] for r in results)
                 for name in ("spent_s", "estimate_s", "unpriced_failures_s", "failed_spent_s", "failed_estimate_s")}
        lines += ["", f"within {TARGET_PCT:.0f}%: {within} of {len(results)} (without failure pricing: {within_before}); "
                      f"total spent {total['spent_s']:.0f} s, estimated {total['estimate_s']:.0f} s (without failure "
                      f"pricing {total['unpriced_failures_s']:.0f} s); failed attempts spent {total['failed_spent_s']:.0f} s, "
                      f"estimated {total['failed_estimate_s']:.0f} s"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path, help="A local store directory (its shards are read).")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    rows = read_rows(args.store)
    results = leave_one_model_out(rows, inventories(args.store))
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
