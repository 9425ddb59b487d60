"""The H100 campaign in tables: what each model cost against the growing store, what profiling it
alone would have cost, and which configuration values recur across models (where the saving comes
from). Reads the `dooly profile --output json` reports and the store's inventories; no GPU.

    python bench/suite_report.py --reports data/h100/suite-order.json --store data/h100/db > report.md
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

SHARED_ROWS = 15


def load_reports(order_file: Path) -> list[tuple[str, dict]]:
    """(backend, per-model entry) in campaign order; the order file lists report paths."""
    entries, seen = [], set()
    for path in json.loads(order_file.read_text())["reports"]:
        report = json.loads((order_file.parent / path).read_text())
        for model in report["models"]:
            # A later report may list a model again (fully reused): count each model once.
            if (report["backend"], model["model"]) not in seen:
                seen.add((report["backend"], model["model"]))
                entries.append((report["backend"], model))
    return entries


def campaign_table(entries: list[tuple[str, dict]]) -> list[str]:
    lines = ["| # | backend | model | signatures | reused | profiled | device-s spent | device-s alone |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    totals = defaultdict(float)
    for index, (backend, m) in enumerate(entries, 1):
        lines.append(f"| {index} | {backend} | {m['model']} | {m['signatures']} | {m['reused_signatures']} | "
                     f"{m['profiled_signatures']} | {m['device_seconds']:.1f} | {m['baseline_device_seconds']:.1f} |")
        totals["spent"] += m["device_seconds"]
        totals["alone"] += m["baseline_device_seconds"]
    saving = 1 - totals["spent"] / totals["alone"] if totals["alone"] else 0.0
    lines.append(f"| | | **total** | | | | **{totals['spent']:.1f}** | **{totals['alone']:.1f}** |")
    lines.append("")
    lines.append(f"Suite reduction: {saving:.1%} of the per-model profiling device time saved.")
    return lines


def shared_table(store: Path) -> list[str]:
    """Signatures held by several models, grouped: the recurring config values behind the reuse."""
    users: dict[str, set[str]] = defaultdict(set)
    describe: dict[str, str] = {}
    for inventory in store.glob("inventories/*/*.json"):
        data = json.loads(inventory.read_text())
        for op in data["operations"]:
            users[op["signature"]].add(data["model_id"].split("/")[-1])
            dims = ", ".join(f"{k}={v}" for k, v in sorted(op["config_dims"].items()))
            describe[op["signature"]] = f"{op['op']} ({dims})"
    shared = sorted(((len(m), describe[s], sorted(m)) for s, m in users.items() if len(m) > 1), reverse=True)
    lines = ["| models | operation (config dims) | shared by |", "|---:|---|---|"]
    for count, text, models in shared[:SHARED_ROWS]:
        lines.append(f"| {count} | {text} | {', '.join(models)} |")
    lines.append("")
    lines.append(f"{len(shared)} of {len(users)} signatures are used by more than one model.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", required=True, type=Path, help="JSON listing the profile reports in campaign order.")
    parser.add_argument("--store", required=True, type=Path)
    args = parser.parse_args()
    lines = ["## Campaign (one growing store, fixed order)", "", *campaign_table(load_reports(args.reports)), "",
             "## Where the saving comes from", "", *shared_table(args.store)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
