"""How well the family fallback predicts an op class never measured (dooly.fit.fallback), measured
by leaving each measured class out of the platform's fitted models in turn.

For each class of a fitted group (backend-independent ops merged in), the fallback is refitted on
every other class's measured signatures and predicts the held-out class's signatures on the request
ladder against their own fitted models. Two generic-op candidates are compared: the elements curve
(the one used) and a relative NNLS over the class regressors' physical features.

    python bench/fallback_holdout.py --store /work/fitted/h100 --platform NVIDIA-H100-80GB-HBM3 \\
        --backend 'paged|sdpa' --out data/h100/experiments/fallback_holdout
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dooly.fit.fallback import METHOD_GENERIC_CURVE, METHOD_GENERIC_NNLS, holdout_by_class, samples_from_inventories
from dooly.fit.source import FittedSource, open_predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--platform", required=True)
    parser.add_argument("--backend", default="paged|sdpa")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    predictor = open_predictor(FittedSource(store=args.store, platform=args.platform, backend=args.backend))
    inventories = list(predictor.inventories()) if predictor.inventories else []
    models = predictor.group.signatures
    samples = samples_from_inventories(models, inventories)
    curve = {r["op_class"]: r for r in holdout_by_class(models, samples, generic=METHOD_GENERIC_CURVE)}
    nnls = {r["op_class"]: r for r in holdout_by_class(models, samples, generic=METHOD_GENERIC_NNLS)}
    rows = [{**curve[c], "nnls_mape_median_pct": nnls[c]["mape_median_pct"]} for c in sorted(curve)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fallback_holdout.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| op class held out | family | signatures | fallback MAPE (curve, used) | physical NNLS |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op_class']} | {r['family']} | {r['signatures']} | {r['mape_median_pct']:.1f}% | "
                     f"{r['nnls_mape_median_pct']:.1f}% |")
    for family in ("generic", "matmul"):
        chosen = [r for r in rows if r["family"] == family]
        if chosen:
            lines.append(f"| median over {family} classes | | {sum(r['signatures'] for r in chosen)} | "
                         f"{np.median([r['mape_median_pct'] for r in chosen]):.1f}% | "
                         f"{np.median([r['nnls_mape_median_pct'] for r in chosen]):.1f}% |")
    lines += ["", "Per class: the median over its signatures of the per-signature MAPE on the request ladder "
              "(1..8192), against the signature's own fitted model."]
    (args.out / "fallback_holdout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
