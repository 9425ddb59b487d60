"""What a CUDA-graph capture costs behind the HTTP server, and what it scales with.

The server-cost step term (dooly/sim/server_step_term.py) leaves out the steps either engine
captured a graph on. This script pairs, step for step, every committed HTTP run with its in-process
pair where the two engines ran the same steps, and for each step both captured on takes the HTTP
run's wall minus the in-process one's. It prints the per-capture extra by the step's sequence count
(per decoder layer of the model) and compares one coefficient per layer against one per layer and
sequence by mean absolute error: the finding behind `dooly.sim.server_capture_term` (docs/server-costs.md,
"The capture term"). Run from the repository root:

    python lab/server_capture_cost.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dooly.sim.calibration_commands import model_layers  # noqa: E402
from dooly.sim.server_capture_term import paired_capture_samples  # noqa: E402
from dooly.sim.validate import load_ground_truth  # noqa: E402

LEASES = [ROOT / "data" / "h100" / "experiments" / "engine_paths" / f"lease{n}" for n in (3, 4, 5, 6, 7)]
LEASES.append(ROOT / "data" / "h200" / "experiments" / "engine_paths" / "lease_d")
HTTP_DIRS = ("http", "http_r2", "http_r3")
PAIRS_DIR = "pairs"
# Sequence-count buckets of the table: a capture in a step of [low, next low) sequences.
BUCKETS = (0, 8, 16, 32, 48)
MS_PER_S = 1e3
US_PER_S = 1e6


def samples() -> list[tuple[str, float, int, int]]:
    """(cell, extra seconds, layers, sequences) per capture both engines made on the same step."""
    out = []
    for lease in LEASES:
        for http_dir in HTTP_DIRS:
            if not (lease / http_dir).is_dir():
                continue
            for cell in sorted(p.name for p in (lease / http_dir).iterdir()):
                pair = lease / PAIRS_DIR / cell
                if not pair.is_dir():
                    continue
                layers = model_layers(cell.rsplit(".paged", 1)[0])  # the bundled config's
                http, inprocess = load_ground_truth(lease / http_dir / cell).steps, load_ground_truth(pair).steps
                for sample in paired_capture_samples(http, inprocess, layers):
                    out.append((f"{lease.name}/{http_dir}/{cell}", sample.extra_s, layers, sample.num_seqs))
    return out


def main() -> None:
    rows = samples()
    extra = np.array([r[1] for r in rows])
    layers = np.array([r[2] for r in rows], dtype=float)
    seqs = np.array([r[3] for r in rows], dtype=float)
    cells = {r[0] for r in rows}
    slower = sum(1 for c in cells if sum(r[1] for r in rows if r[0] == c) > 0)
    print(f"{len(rows)} paired captures in {len(cells)} cells; slower behind the server in {slower} cells")
    print("| sequences in the step | captures | mean extra per layer (ms) | median (ms) |")
    print("|---|---|---|---|")
    for low, high in zip(BUCKETS, (*BUCKETS[1:], None)):
        mask = (seqs >= low) & (seqs < high) if high is not None else seqs >= low
        per_layer = extra[mask] / layers[mask] * MS_PER_S
        label = f"{low}-{high - 1}" if high is not None else f"{low}+"
        print(f"| {label} | {int(mask.sum())} | {per_layer.mean():+.3f} | {np.median(per_layer):+.3f} |")
    for name, feature, unit, scale in (("per layer", layers, "ms", MS_PER_S),
                                       ("per layer and sequence", layers * seqs, "us", US_PER_S)):
        coefficient = float(extra @ feature / (feature @ feature))
        error = np.mean(np.abs(extra - coefficient * feature)) * MS_PER_S
        print(f"{name}: {coefficient * scale:+.3f} {unit}, mean absolute error {error:.1f} ms per capture")


if __name__ == "__main__":
    main()
