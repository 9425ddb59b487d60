"""Every bundled model and every test config simulates on a fitted store without profiling (#20).

For each model (the bundled ids of `dooly models`, plus the tiny configs of tests/trace/trace_configs.py
and any config.json given with --config), and each backend, `dooly simulate` runs in-process on a
short workload; a model without an inventory in the store is traced on the CPU. One row per
(model, backend): whether it simulated, the inventory's origin, its mean TTFT/TPOT and the
per-phase share of predicted device time that is measured.

    python bench/unseen_models.py --store /work/fitted/h100 --platform NVIDIA-H100-80GB-HBM3 \\
        --out data/h100/experiments/unseen_models --config /tmp/qwen15moe.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

# validate_groundtruth lives with the report generators (reports/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reports"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trace"))

from validate_groundtruth import run_json  # noqa: E402

from dooly.errors import DoolyError  # noqa: E402

log = logging.getLogger("unseen_models")

BACKENDS = ("paged|sdpa", "paged|eager")
WORKLOAD = ("--requests", "20", "--rate", "4", "--prompt-len", "uniform:128:1024", "--output-len", "64", "--seed", "1")
PERCENT = 100.0


def test_configs(folder: Path) -> list[str]:
    """The tracer tests' configs (trace_configs.py: every dict whose name starts with TINY_), as files."""
    import trace_configs

    paths = []
    for name in sorted(dir(trace_configs)):
        payload = getattr(trace_configs, name)
        if name.startswith("TINY_") and isinstance(payload, dict):
            directory = folder / name.lower()
            directory.mkdir(exist_ok=True)
            (directory / "config.json").write_text(json.dumps(payload))
            paths.append(str(directory))
    return paths


def simulate_row(model: str, store: str, platform: str, backend: str) -> dict[str, Any]:
    from dooly.sim.commands import simulate_command

    try:
        summary = run_json(simulate_command, [model, "--store", store, "--platform", platform, "--backend", backend,
                                              *WORKLOAD])
    except DoolyError as exc:
        return {"model": model, "backend": backend, "ok": False, "error": str(exc)}
    return {
        "model": model, "backend": backend, "ok": True,
        "ttft_mean_ms": summary["ttft_s"]["mean"] * 1e3, "tpot_mean_ms": summary["tpot_s"]["mean"] * 1e3,
        "measured_share": {phase: c["measured_share"] for phase, c in summary["coverage"].items()},
        "fallback_share": {phase: c["fallback_share"] for phase, c in summary["coverage"].items()},
        "estimated_ops": max((len(c["estimated"]) for c in summary["coverage"].values()), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--platform", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", action="append", default=[], help="Another config.json or folder (repeatable).")
    parser.add_argument("--backend", action="append", help=f"Backends (default: {', '.join(BACKENDS)}).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from dooly.models.registry import bundled_model_ids

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        models = [*bundled_model_ids(), *test_configs(Path(folder)), *args.config]
        for model in models:
            for backend in args.backend or BACKENDS:
                row = simulate_row(model, args.store, args.platform, backend)
                row["model"] = Path(model).name if Path(model).exists() else model
                log.info("%s %s: %s", row["model"], backend, "ok" if row["ok"] else row["error"])
                rows.append(row)
    (args.out / "unseen_models.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | backend | simulated | mean TTFT (ms) | mean TPOT (ms) | measured share by phase | "
             "fallback share | estimated ops |", "|---|---|---|---:|---:|---|---|---:|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['backend']} | error: {r['error']} | | | | | |")
            continue
        measured = ", ".join(f"{p} {PERCENT * v:.1f}%" for p, v in r["measured_share"].items())
        fallback = ", ".join(f"{p} {PERCENT * v:.2f}%" for p, v in r["fallback_share"].items())
        lines.append(f"| {r['model']} | {r['backend']} | yes | {r['ttft_mean_ms']:.1f} | {r['tpot_mean_ms']:.2f} | "
                     f"{measured} | {fallback} | {r['estimated_ops']} |")
    ok = sum(1 for r in rows if r["ok"])
    lines += ["", f"{ok} of {len(rows)} (model, backend) pairs simulated without profiling."]
    (args.out / "unseen_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
