"""Does `dooly plan` price a model's profiling right? Checked on what a store's shards record.

For every model with an inventory in the store (per backend): the signatures only that model
uses are set aside, `dooly.profile.plan.PointCosts` is fitted on every other row of the platform
(what the store would know before profiling the model), and the set-aside rows are priced with
it: estimate against the device_seconds those rows record (each row's whole measurement: build,
warm-up, calibration, samples). The plan's earlier estimate (the median held point's cost times
the point count) is shown beside it. Point counts are not the question here: the rows are the
points that were measured, refinements included.

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

from dooly.profile.plan import DEFAULT_POINT_SECONDS, HELD_STATUSES, PointCosts
from dooly.store.shards import SHARDS_PREFIX

log = logging.getLogger("plan_estimate")

COLUMNS = ("signature", "op_class", "point_key", "status", "device_seconds", "platform", "backend")
SHARED_BACKEND_MARK = "shared"
TARGET_PCT = 25.0
PERCENT = 100.0


def read_rows(store: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((store / SHARDS_PREFIX.rstrip("/")).rglob("*.parquet")):
        rows += pq.read_table(path, columns=list(COLUMNS)).to_pylist()
    return [r for r in rows if r["status"] in HELD_STATUSES]


def inventories(store: Path) -> dict[tuple[str, str], set[str]]:
    """(model id, backend) -> the signatures its inventory lists."""
    found = {}
    for path in sorted((store / "inventories").glob("*/*.json")):
        doc = json.loads(path.read_text())
        if "operations" not in doc or doc.get("tp", 1) != 1:  # the model's config.json sits beside them
            continue
        found[(doc["model_id"], doc["backend"])] = {op["signature"] for op in doc["operations"]}
    return found


def leave_one_model_out(rows: list[dict[str, Any]], models: dict[tuple[str, str], set[str]]) -> list[dict[str, Any]]:
    results = []
    by_backend: dict[str, set[str]] = defaultdict(set)
    for (_, backend), signatures in models.items():
        by_backend[backend] |= signatures
    for (model, backend), signatures in sorted(models.items()):
        others = set().union(*(s for (m, b), s in models.items() if m != model))
        own = signatures - others
        target = [r for r in rows if r["signature"] in own and r["backend"] in (backend, SHARED_BACKEND_MARK)]
        if not target:
            continue
        platform = target[0]["platform"]
        history = [r for r in rows if r["signature"] not in own and r["platform"] == platform]
        costs = PointCosts.fit(history, DEFAULT_POINT_SECONDS["cuda"], platform)
        held = sorted(r["device_seconds"] for r in history)
        median = held[len(held) // 2] if held else DEFAULT_POINT_SECONDS["cuda"]
        spent = sum(r["device_seconds"] for r in target)
        estimate = sum(costs.seconds(str(r["op_class"])) for r in target)
        results.append({
            "model": model, "backend": backend, "signatures": len(own), "points": len(target),
            "spent_s": round(spent, 2), "estimate_s": round(estimate, 2),
            "error_pct": round(PERCENT * (estimate - spent) / spent, 1),
            "median_estimate_s": round(median * len(target), 2),
            "median_error_pct": round(PERCENT * (median * len(target) - spent) / spent, 1),
        })
        log.info("%s %s: spent %.1f s, estimate %.1f s (median rule %.1f s)", model, backend, spent, estimate,
                 median * len(target))
    return results


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | backend | own signatures | points | spent (device-s) | estimate | error | median rule | error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['backend']} | {r['signatures']} | {r['points']} | {r['spent_s']:.1f} | "
                     f"{r['estimate_s']:.1f} | {r['error_pct']:+.1f}% | {r['median_estimate_s']:.1f} | {r['median_error_pct']:+.1f}% |")
    if results:
        within = sum(1 for r in results if abs(r["error_pct"]) <= TARGET_PCT)
        within_median = sum(1 for r in results if abs(r["median_error_pct"]) <= TARGET_PCT)
        total_spent = sum(r["spent_s"] for r in results)
        lines += ["", f"within {TARGET_PCT:.0f}%: {within} of {len(results)} (median rule: {within_median}); "
                      f"total spent {total_spent:.0f} s, estimated {sum(r['estimate_s'] for r in results):.0f} s "
                      f"(median rule {sum(r['median_estimate_s'] for r in results):.0f} s)"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path, help="A local store directory (its shards are read).")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    results = leave_one_model_out(read_rows(args.store), inventories(args.store))
    lines = table(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "estimate.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
