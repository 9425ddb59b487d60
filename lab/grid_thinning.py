"""What a thinner attention grid would save, and what it would cost in accuracy (CPU, minutes).

Attention is most of a campaign's device time and few models share an attention signature, so
the suite saving is bounded by the attention grid's size. This replays the H100 campaign with
thinner attention designs without new measurements: each design keeps the committed store's rows
at its own points (every point of a thinner design is a point of the default grid, measured
there), then
- the campaign is recomputed from that store (`campaign_from_store.py`: spent against alone);
- the models are fitted on it, and scored on the default grid's attention points the design left
  out (per-signature MAPE, median and p90 over signatures: points the fit never saw);
- the ground truth is validated against it (`validate_groundtruth.py`), cells within 5% / 8%.

    python lab/grid_thinning.py --out data/h100/experiments/grid_thinning
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dooly.profile.grid import ATTENTION_DESIGNS, AttentionShapes, GridSpec, attention_points

ROOT = Path(__file__).resolve().parent.parent
# The replay scores each design with the report generators' own campaign and accuracy code.
REPORTS = ROOT / "reports"
sys.path.insert(0, str(REPORTS))
import campaign_from_store  # noqa: E402
from validate_groundtruth import within_targets  # noqa: E402

log = logging.getLogger("grid_thinning")

STORE = ROOT / "data" / "h100" / "db"
GROUND_TRUTH = ROOT / "data" / "h100" / "groundtruth"
PLATFORM = "NVIDIA-H100-80GB-HBM3"
BACKENDS = ("paged|sdpa", "paged|eager", "paged|flex_attention")
DESIGNS = {"default": ATTENTION_DESIGNS["full"], "thin-mixed": ATTENTION_DESIGNS["thin-mixed"],
           "thin-all": ATTENTION_DESIGNS["thin-all"]}


def thinned_store(shapes: AttentionShapes, out: Path) -> int:
    """A copy of the committed store holding only the attention rows at the design's points."""
    import polars as pl
    import pyarrow.parquet as pq

    keys = sorted({p.key for p in attention_points(GridSpec(attention=shapes))})
    shutil.copytree(STORE, out)
    dropped = 0
    for path in sorted(out.glob("shards/**/*.parquet")):
        table = pq.read_table(path)
        frame = pl.DataFrame(table)
        keep = (frame["op"] != "attention") | frame["point_key"].is_in(keys)
        dropped += int((~keep).sum())
        pq.write_table(table.filter(keep.to_arrow()), path)
    return dropped


def dropped_point_error(store: Path) -> dict[str, dict[str, float | None]]:
    """Per backend: the thinned fit's per-signature MAPE on the default grid's points it lacks."""
    import polars as pl

    from dooly.fit.persist import load_predictor
    from dooly.store.backends import open_store

    def rows(root: Path) -> pl.DataFrame:
        return campaign_from_store.store_rows(root).filter((pl.col("op") == "attention") & (pl.col("status") == "ok"))

    full, kept = rows(STORE), rows(store)
    held = set(zip(kept["signature"].to_list(), kept["point_key"].to_list()))
    grid_keys = {p.key for p in attention_points(GridSpec())}
    full = full.filter(pl.col("point_key").is_in(sorted(grid_keys))).unique(subset=["signature", "point_key"], keep="last")
    out = {}
    for backend in BACKENDS:
        predictor = load_predictor(open_store(str(store)), platform=PLATFORM, engine="transformers", backend=backend,
                                   dtype="bfloat16")
        per_signature = []
        for (signature,), part in full.filter(pl.col("backend") == backend).group_by("signature"):
            unseen = np.array([(signature, key) not in held for key in part["point_key"]])
            if not unseen.any():
                continue
            part = part.filter(pl.Series(unseen))
            config = json.loads(part["config_dims"][0])
            request = {"seqs": [json.loads(k)["seqs"] for k in part["point_key"]],
                       **{v: part[v].to_numpy().astype(float) for v in ("T", "B", "K", "D")}}
            predicted = predictor.predict_ops([signature] * part.height, part["op_class"].to_list(),
                                              [config] * part.height, request)
            per_signature.append(float(np.mean(np.abs(predicted / part["latency_median_s"].to_numpy() - 1)) * 100))
        out[backend] = {"signatures": len(per_signature),
                        "mape_median": round(float(np.median(per_signature)), 2) if per_signature else None,
                        "mape_p90": round(float(np.percentile(per_signature, 90)), 2) if per_signature else None}
    return out


def run(argv: list[str]) -> None:
    subprocess.run([sys.executable, *argv], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def evaluate(name: str, shapes: AttentionShapes, scratch: Path) -> dict:
    store = scratch / name / "db"
    dropped = thinned_store(shapes, store)
    log.info("%s: %d attention rows left out; fitting", name, dropped)
    run(["-m", "dooly.cli", "merge", "--store", str(store)])
    run(["-m", "dooly.cli", "fit", "--store", str(store)])
    entries = campaign_from_store.campaign_entries(store, list(BACKENDS),
                                                   campaign_from_store.suite_order(campaign_from_store.SUITE_ORDER),
                                                   GridSpec(attention=shapes))
    spent, alone, saving = campaign_from_store.campaign_totals(entries)
    validation = scratch / name / "validation"
    run([str(REPORTS / "validate_groundtruth.py"), "--ground-truth", str(GROUND_TRUTH), "--store", str(store),
         "--platform", PLATFORM, "--out", str(validation)])
    cells = json.loads((validation / "accuracy.json").read_text())
    return {
        "design": name, "shapes": asdict(shapes), "points": len(attention_points(GridSpec(attention=shapes))),
        "attention_rows_left_out": dropped,
        "campaign": {"device_seconds": round(spent, 1), "baseline_device_seconds": round(alone, 1), "saving": round(saving, 4)},
        "left_out_point_error": dropped_point_error(store) if dropped else None,
        "cells": len(cells), "cells_met": within_targets(cells, "ttft_mape", "tpot_mape"),
        "accuracy": [{k: c[k] for k in ("model", "backend", "variant", "workload", "ttft_mape", "tpot_mape")} for c in cells],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--designs", default=",".join(DESIGNS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.designs.split(","):
            result = evaluate(name, DESIGNS[name], Path(scratch))
            (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            log.info("%s: saving %.1f%%, %d of %d cells met", name, 100 * result["campaign"]["saving"],
                     result["cells_met"], result["cells"])


if __name__ == "__main__":
    main()
