"""How far a host-overhead calibration moves between runs and leases on the H200 (issue #20, item 4).

Every committed H200 calib run of a synchronous engine path is fitted alone (`dooly calibrate
--dry-run`, the product's fit) and priced on two reference steps, so that runs of different models
and leases compare on the same batch. Columns per run: the lease, the decode and mixed constants, the
graph capture cost, host time of the reference decode and mixed steps, and the run's own mean host
time per step (what the fit saw). The spread per (path, model) across leases is the calibration's
run-to-run floor; docs/calibration.md quotes the table.

    python lab/calibration_leases.py --fitted-store FITTED_H200 [--out TABLE.md]

FITTED_H200: a merged and fitted copy of data/h200/db (read only: `--dry-run` writes nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("calibration_leases")

ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "data" / "h200"
# Committed calib runs, by lease (the device machine each was recorded on).
LEASES = {
    "A": H200 / "groundtruth",
    "B r2": H200 / "experiments" / "unseen_llama" / "calib_repeat" / "lease-b" / "r2",
    "B r3": H200 / "experiments" / "unseen_llama" / "calib_repeat" / "lease-b" / "r3",
    "C": H200 / "experiments" / "engine_grid" / "r1",
    "D": H200 / "experiments" / "engine_grid" / "calib_d",
}
# Synchronous engine paths: the run directory's suffix and the calibration path of its steps.
PATHS = {
    "paged-sdpa.graphs": ("paged|sdpa, graphs", "decode_graph", "mixed_graph"),
    "paged-sdpa.default": ("paged|sdpa, no graphs", "decode", "mixed"),
    "paged-eager.graphs": ("paged|eager, graphs", "decode_graph", "mixed_graph"),
}
# Reference steps: 32 decodes at 1,000 tokens of context, and a 2,048-token chunked prefill beside
# 16 decodes (about 40,000 KV tokens read); one full-attention cache group (the Llama models).
REFERENCE = {"decode": (32, 32, 32 * 1001), "mixed": (17, 2048 + 16, 40_000)}
MS = 1e3


@dataclass(frozen=True)
class Row:
    path: str
    model: str
    lease: str
    layers: int
    decode_const_ms: float
    mixed_const_ms: float
    capture_ms: float
    decode_ref_ms: float
    mixed_ref_ms: float
    mean_host_ms: float


def host_ms(terms: dict[str, float], layers: int, step: tuple[int, int, int]) -> float:
    """Host time (ms) a path's terms charge a step of (sequences, query tokens, KV tokens read), as
    the simulator charges it (`PathTerms.for_layers`, one full-attention cache group)."""
    from dooly.sim.calibration import PathTerms

    return MS * PathTerms(**terms).for_layers(layers).seconds(*step)


def fit_alone(run: Path, store: str) -> dict[str, Any]:
    """The calibration `dooly calibrate --dry-run` fits on RUN alone."""
    result = subprocess.run([sys.executable, "-m", "dooly.cli", "calibrate", "--store", store, "--dry-run",
                             "--ground-truth", str(run), "--output", "json"],
                            check=True, capture_output=True, text=True, cwd=ROOT)
    calibrations = json.loads(result.stdout)["calibrations"]
    if len(calibrations) != 1:
        raise SystemExit(f"{run}: expected one calibration, got {len(calibrations)}")
    return dict(calibrations[0])


def rows(store: str) -> list[Row]:
    out = []
    for lease, folder in LEASES.items():
        for run in sorted(folder.glob("*.calib")):
            name = run.name.removesuffix(".calib")
            suffix = next((s for s in PATHS if name.endswith(f".{s}")), None)
            if suffix is None:
                continue
            model_dir = name.removesuffix(f".{suffix}")
            label, decode_path, mixed_path = PATHS[suffix]
            calibration = fit_alone(run, store)
            layers = int(calibration["inputs"][0]["num_layers"])
            terms = calibration["terms"]
            decode = terms.get(decode_path, terms["default"])
            mixed = terms.get(mixed_path, terms["default"])
            fitted = calibration["fit"]["models"]
            mean_host = next(iter(fitted.values()))["mean_host_ms"]
            capture = MS * (calibration["graph_capture_s"] + calibration["graph_capture_per_layer_s"] * layers)
            out.append(Row(label, model_dir, lease, layers, MS * decode["constant_s"], MS * mixed["constant_s"], capture,
                           host_ms(decode, layers, REFERENCE["decode"]), host_ms(mixed, layers, REFERENCE["mixed"]),
                           float(mean_host)))
            log.info("%s %s %s: decode ref %.2f ms", label, model_dir, lease, out[-1].decode_ref_ms)
    return out


def spread(values: list[float]) -> str:
    """Largest minus smallest, as a share of the smallest (the floor the table quotes)."""
    low, high = min(values), max(values)
    return f"{(high - low) / low * 100:.0f}%" if low > 0 and len(values) > 1 else "-"


def table(found: list[Row]) -> str:
    lines = ["| path | model | lease | decode / mixed constant (ms) | capture (ms) | ref decode (ms) | ref mixed (ms) | mean host per step (ms) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in sorted(found, key=lambda r: (r.path, r.layers, r.lease)):
        groups[(row.path, row.model)].append(row)
        lines.append(f"| {row.path} | {row.model} | {row.lease} | {row.decode_const_ms:.2f} / {row.mixed_const_ms:.2f} | "
                     f"{row.capture_ms:.1f} | {row.decode_ref_ms:.2f} | {row.mixed_ref_ms:.2f} | {row.mean_host_ms:.2f} |")
    lines += ["", "| path | model | runs | spread of ref decode | spread of ref mixed | spread of mean host |", "|---|---|---:|---:|---:|---:|"]
    for (path, model), members in groups.items():
        lines.append(f"| {path} | {model} | {len(members)} | {spread([r.decode_ref_ms for r in members])} | "
                     f"{spread([r.mixed_ref_ms for r in members])} | {spread([r.mean_host_ms for r in members])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--fitted-store", required=True, help="A merged and fitted copy of data/h200/db (read only).")
    parser.add_argument("--out", help="Write the markdown table here (default: stdout).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    text = table(rows(args.fitted_store))
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
