"""A campaign's per-model figures recomputed from the store it grew, in the report format of
`dooly profile --output json` (a step's report can be lost; the store holds what it measured).

In the fixed order, a model's *spent* device time is what the store's held rows cost for the
signatures it was first to need (their measurement, refinement included; failed attempts are not
part of a campaign that works), and its *alone* cost is
what its whole grid of points cost when measured: the planner's `held_seconds`, as `dooly
profile` reports it.

    python reports/campaign_from_store.py --store DB > campaign.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dooly.profile.costs import HELD_STATUSES
from dooly.profile.grid import GridSpec
from dooly.profile.plan import build_plan
from dooly.profile.provenance import Stack
from dooly.profile.run import load_or_trace
from dooly.store.backends import open_store

SUITE_ORDER = Path(__file__).resolve().parent.parent / "device" / "suite_models.txt"
# The campaign's passes, in order: the engine's two backends, then the profile-only one.
CAMPAIGN_BACKENDS = "paged|sdpa,paged|eager,paged|flex_attention"
TRACES = Path(__file__).parent.parent / "data" / "traces"


def suite_order(path: Path) -> list[tuple[str, str]]:
    """(model id, trace file stem) per line of the order file."""
    order = []
    for line in path.read_text().splitlines():
        if line.strip():
            model, stem = line.split()
            order.append((model, stem))
    return order


def store_rows(store_dir: Path) -> Any:
    """Every row of a directory store's shards, in one frame."""
    import polars as pl

    return pl.concat([pl.read_parquet(p) for p in sorted(store_dir.glob("shards/**/*.parquet"))], how="diagonal_relaxed")


@dataclass
class CampaignStep:
    """One model of one pass in the campaign's order: its plan on the store, and the signatures it
    was first to need (what it paid for)."""

    backend: str
    model: str
    plan: Any
    new: list[str]

    @property
    def signatures(self) -> list[str]:
        return self.plan.models[0].signatures


def held_rows(store_dir: Path) -> Any:
    """The store's rows a campaign keeps (what it measured and held, refinement included)."""
    import polars as pl

    return store_rows(store_dir).filter(pl.col("status").is_in(list(HELD_STATUSES)))


def campaign_steps(store_dir: Path, held: Any, backends: list[str], order: list[tuple[str, str]],
                   grid: GridSpec | None = None) -> list[CampaignStep]:
    """Every (pass, model) of the campaign in its fixed order, planned on `grid` (the default grid
    unless given) against the store; `held` (held_rows) gives the stack it was measured on."""
    store = open_store(str(store_dir))
    first = held.row(0, named=True)
    steps, seen = [], set()
    for backend in backends:
        stack = Stack(**{**{f.name: first[f.name] for f in fields(Stack)}, "backend": backend})
        for model_id, stem in order:
            trace, _ = load_or_trace(str(TRACES / f"{stem}.{backend.replace('|', '-')}.json"), backend, "bfloat16")
            plan = build_plan([trace], store, stack, grid or GridSpec(), software_agnostic=True)
            new = [s for s in plan.models[0].signatures if s not in seen]
            seen.update(new)
            steps.append(CampaignStep(backend=backend, model=model_id, plan=plan, new=new))
    return steps


def spent_by_signature(held: Any) -> dict[str, float]:
    """What the held rows (held_rows) of each signature cost to measure."""
    import polars as pl

    return dict(held.group_by("signature").agg(pl.col("device_seconds").sum()).iter_rows())


def campaign_entries(store_dir: Path, backends: list[str], order: list[tuple[str, str]],
                     grid: GridSpec | None = None) -> list[dict]:
    """Per model and pass: signatures, reused, spent and alone device-seconds, on `grid` (the
    default grid unless given)."""
    held = held_rows(store_dir)
    spent = spent_by_signature(held)
    entries = []
    for step in campaign_steps(store_dir, held, backends, order, grid):
        signatures = step.signatures
        entries.append({
            "backend": step.backend,
            "model": step.model,
            "signatures": len(signatures),
            "reused_signatures": len(signatures) - len(step.new),
            "profiled_signatures": len(step.new),
            "device_seconds": round(sum(spent.get(s, 0.0) for s in step.new), 4),
            "baseline_device_seconds": round(sum(step.plan.items[s].held_seconds for s in signatures), 4),
            "unheld_points": sum(len(step.plan.items[s].missing) for s in signatures),
        })
    return entries


def campaign_totals(entries: list[dict]) -> tuple[float, float, float]:
    """Device-seconds spent, device-seconds alone, and the share saved."""
    spent = sum(entry["device_seconds"] for entry in entries)
    alone = sum(entry["baseline_device_seconds"] for entry in entries)
    return spent, alone, (1 - spent / alone if alone else 0.0)


def campaign_arguments(parser: argparse.ArgumentParser) -> None:
    """The store, passes and order a campaign is read with (this script and suite_report.py)."""
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--backends", default=CAMPAIGN_BACKENDS)
    parser.add_argument("--order", type=Path, default=SUITE_ORDER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    campaign_arguments(parser)
    args = parser.parse_args()
    entries = campaign_entries(args.store, args.backends.split(","), suite_order(args.order))
    spent, alone, saving = campaign_totals(entries)
    print(json.dumps({"models": entries, "device_seconds": round(spent, 4), "baseline_device_seconds": round(alone, 4),
                      "saving": round(saving, 4)}, indent=1))


if __name__ == "__main__":
    main()
