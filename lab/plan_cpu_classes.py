"""Where a CPU plan's estimate misses, op class by op class (one demo-pair repeat, minutes).

`bench/plan_cpu.py --pair demo` plans Qwen2.5-1.5B on a store that holds Qwen2.5-0.5B's run, then
profiles it. This takes the two stores of one such repeat (BEFORE: the store as planned on, merged
and fitted; AFTER: the same store once B's profile wrote its shards) and reports per op class what
the plan priced, the weight builds in it, what B's run spent, and B's rows priced by the latency
each measured on the same cost lines (the bound a perfect prediction reaches); then, per matmul
signature of B, its measured against its predicted latency (the fitted database's answer).

    bash: dooly profile Qwen/Qwen2.5-0.5B --store W/db ...; dooly merge/fit --store W/db; cp -r W/db W/before
          dooly profile Qwen/Qwen2.5-1.5B --store W/db ...
    python lab/plan_cpu_classes.py W/before W/db Qwen/Qwen2.5-1.5B

Prints one JSON object (stdout).
"""

from __future__ import annotations

import glob
import json
import sys
from collections import defaultdict
from typing import Any

import polars as pl

from dooly.engines.registry import engine_kind
from dooly.fit.persist import store_predictor
from dooly.profile.grid import GridSpec
from dooly.profile.latency import row_latencies
from dooly.profile.plan import build_plan
from dooly.profile.provenance import current_stack, detect_platform
from dooly.profile.run import trace_all
from dooly.store.backends import open_store

BACKEND, DTYPE = "paged|sdpa", "float32"
# `dooly demo`'s CPU sweep (dooly/fleet/demo_fleet.yaml).
DEMO_GRID = GridSpec(max_tokens=64, max_seqs=8, max_kv=512, max_context=256)
MATMUL = "aten.mm.default"


def shard_rows(store: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(path) for path in glob.glob(f"{store}/shards/**/*.parquet", recursive=True)],
                     how="diagonal_relaxed")


def main() -> None:
    before, after, model = sys.argv[1:4]
    store = open_store(before, create=False)
    kind = engine_kind("transformers")
    stack = current_stack(device="cpu", platform=detect_platform("cpu"), engine=kind.name,
                          engine_version=kind.version(), backend=BACKEND, dtype=DTYPE, block_size=kind.block_size)
    plan = build_plan(trace_all([model], BACKEND, DTYPE, store=store), store, stack, DEMO_GRID)
    assert plan.costs is not None
    classes: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for item in plan.work():
        classes[item.op.op_class()]["plan_s"] += plan.costs.item_seconds(item)
        classes[item.op.op_class()]["build_s"] += plan.costs.item_build_seconds(item)
    for op_class, seconds in plan.costs.run_startups(plan.work()).items():
        classes[op_class]["plan_s"] += seconds
    earlier = set(shard_rows(before)["run_id"].to_list())
    rows = shard_rows(after).filter(~pl.col("run_id").is_in(sorted(earlier))).to_dicts()
    predictor = store_predictor(store, platform=rows[0]["platform"], engine=kind.name, backend=BACKEND, dtype=DTYPE)
    predicted = row_latencies(predictor, rows)
    firsts = {(row["run_id"], row["signature"]): row for row in rows}
    for row in rows:
        classes[row["op_class"]]["spent_s"] += row["device_seconds"]
        classes[row["op_class"]]["by_measured_latency_s"] += plan.costs.seconds(row["op_class"], row["latency_median_s"])
    for row in firsts.values():
        classes[row["op_class"]]["by_measured_latency_s"] += plan.costs.build_seconds(
            row["op_class"], json.loads(row["signature_json"]))
    matmuls: dict[str, dict[str, Any]] = {}
    for row, latency in zip(rows, predicted, strict=True):
        if row["op_class"] == MATMUL:
            entry = matmuls.setdefault(row["config_dims"], {"points": 0, "measured_s": 0.0, "predicted_s": 0.0})
            entry["points"] += 1
            entry["measured_s"] += row["latency_median_s"] or 0.0
            entry["predicted_s"] += latency or 0.0
    report = {
        "classes": {c: {k: round(v, 3) for k, v in values.items()}
                    for c, values in sorted(classes.items(), key=lambda kv: -kv[1]["spent_s"])},
        "total": {key: round(sum(values[key] for values in classes.values()), 2)
                  for key in ("plan_s", "build_s", "spent_s", "by_measured_latency_s")},
        "matmul_latency_sums": {dims: {k: round(v, 4) for k, v in entry.items()} for dims, entry in matmuls.items()},
        "build_terms": plan.costs.build_terms,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
