"""The H100 campaign in tables: what each model cost against the growing store, what profiling it
alone would have cost, and which configuration values recur across models (where the saving comes
from). Reads the `dooly profile --output json` reports and the store's inventories; no GPU.

    python reports/suite_report.py --reports data/h100/suite-order.json --store data/h100/db > report.md
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from campaign_from_store import campaign_arguments, campaign_entries, campaign_totals, suite_order

SHARED_ROWS = 15


def campaign_table(entries: list[dict]) -> list[str]:
    lines = ["| # | backend | model | signatures | reused | profiled | device-s spent | device-s alone |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for index, m in enumerate(entries, 1):
        lines.append(f"| {index} | {m['backend']} | {m['model']} | {m['signatures']} | {m['reused_signatures']} | "
                     f"{m['profiled_signatures']} | {m['device_seconds']:.1f} | {m['baseline_device_seconds']:.1f} |")
    spent, alone, saving = campaign_totals(entries)
    lines.append(f"| | | **total** | | | | **{spent:.1f}** | **{alone:.1f}** |")
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
    campaign_arguments(parser)
    args = parser.parse_args()
    entries = campaign_entries(args.store, args.backends.split(","), suite_order(args.order))
    lines = ["## Campaign (one growing store, fixed order)", "", *campaign_table(entries), "",
             "## Where the saving comes from", "", *shared_table(args.store)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
