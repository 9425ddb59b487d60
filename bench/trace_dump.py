"""Write every bundled model's traces (every phase; tensor parallel too for TP_MODELS) to a folder,
or compare two such folders: a change meant to make tracing faster must leave them byte-identical.

    python bench/trace_dump.py dump OUT_DIR          # with the dooly on PYTHONPATH
    python bench/trace_dump.py compare BEFORE AFTER  # exit status 1 when any file differs

Each model is traced in a fresh process, as a user runs `dooly trace`, so state one trace leaves
behind (caches, imports) cannot hide a difference in the next. The timing field `seconds` is left
out; everything else of `Trace.to_dict()` is kept, one JSON file per model and tp.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

PHASES = ("prefill", "decode", "mixed")
# Models also traced at TP_DEGREE: a dense model and a mixture of experts, whose plans differ.
TP_MODELS = ("meta-llama/Llama-3.1-8B", "mistralai/Mixtral-8x7B-v0.1")
TP_DEGREE = 2
CHILD = """
import json, sys
from dooly.trace.tracer import trace_model
model, tp, phases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
traces = {}
for phase in phases:
    payload = trace_model(model, phase=phase, tp=tp).to_dict()
    payload.pop("seconds", None)
    traces[phase] = payload
print(json.dumps(traces, sort_keys=True, indent=0))
"""


def file_name(model: str, tp: int) -> str:
    return f"{model.replace('/', '__')}_tp{tp}.json"


def dump(out: Path) -> None:
    import dooly
    from dooly.models.registry import bundled_model_ids

    # The children run where this dooly lives, so that it (not the working directory's) is traced.
    checkout = Path(dooly.__file__).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(model, 1) for model in bundled_model_ids()] + [(model, TP_DEGREE) for model in TP_MODELS]
    for model, tp in jobs:
        result = subprocess.run([sys.executable, "-c", CHILD, model, str(tp), *PHASES], capture_output=True,
                                text=True, check=True, cwd=checkout)
        (out / file_name(model, tp)).write_text(result.stdout)
        print(f"{model} tp={tp}", flush=True)


def compare(before: Path, after: Path) -> int:
    names = sorted({p.name for p in before.glob("*.json")} | {p.name for p in after.glob("*.json")})
    differ = [name for name in names
              if not (before / name).exists() or not (after / name).exists()
              or (before / name).read_bytes() != (after / name).read_bytes()]
    for name in differ:
        print(f"differs: {name}")
    print(f"{len(names) - len(differ)} of {len(names)} files identical")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump").add_argument("out", type=Path)
    comparing = sub.add_parser("compare")
    comparing.add_argument("before", type=Path)
    comparing.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
