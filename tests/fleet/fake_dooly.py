"""A stand-in for the `dooly` program in the demo test: the same arguments, tiny deterministic work.

profile writes one shard file per (backend, index) and prints the figures the real command prints;
merge needs the shards, fit needs the snapshot, simulate needs the fit: the order is checked for real.
A GPU pod's calibration steps: bench writes bench.json (its model, shard and --out directory) and
calibrate --record-only copies it into the store under calibration-runs/.
"""

import hashlib
import json
import os
import pathlib
import sys

args = sys.argv[1:]


def option(name: str) -> str:
    return args[args.index(name) + 1]


store = pathlib.Path(option("--store"))
command = args[0]
if command == "profile":
    index, count = int(option("--shard-index")), int(option("--shard-count"))
    backend = option("--attention").replace("|", "_")
    shard = store / "shards" / f"{backend}-{index}-of-{count}.json"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_text(json.dumps({"models": args[1 : args.index("--store")]}))
    models = args[1 : args.index("--store")]
    print(json.dumps({
        # Shard-local figures, as the real profiler prints them.
        "profiled_signatures": 10 + index,
        "reused_signatures": index,
        "device_seconds": 1.0 + index,
        "baseline_device_seconds": 3.0 + 2 * index,
        # The whole Job's plan, model by model: identical on every shard.
        "models": [
            {"model": m, "profiled_signatures": 5 + k, "reused_signatures": ["sig"] * (2 * k)}
            for k, m in enumerate(models)
        ],
    }))
elif command == "bench":
    # MODEL... --model-index N, as the real bench picks: models[N % len(models)].
    models = args[1 : next(i for i, a in enumerate(args) if a.startswith("--"))]
    if len(models) > 1 and "--model-index" not in args:
        sys.exit("fake dooly: several MODELs need --model-index")
    model = models[int(option("--model-index")) % len(models)] if len(models) > 1 else models[0]
    out = pathlib.Path(option("--out"))
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "shard": os.environ.get("JOB_COMPLETION_INDEX"), "out": str(out)}
    (out / "bench.json").write_text(json.dumps(record))
    print(json.dumps({"model": model}))
elif command == "calibrate" and "--record-only" in args:
    # Content-addressed under calibration-runs/, as the real record step stores a run.
    run = pathlib.Path(option("--ground-truth"))
    text = (run / "bench.json").read_text()
    recorded = store / "calibration-runs" / f"{run.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    recorded.mkdir(parents=True, exist_ok=True)
    (recorded / "bench.json").write_text(text)
    print(json.dumps({"recorded": [str(recorded)]}))
elif command == "merge":
    shards = sorted((store / "shards").glob("*.json"))
    (store / "snapshot.json").write_text(json.dumps([s.name for s in shards]))
    print(json.dumps({"shards": len(shards)}))
elif command == "fit":
    if os.environ.get("FAKE_DOOLY_FAIL_FIT"):
        print("fit: no rows for op class matmul", file=sys.stderr)
        sys.exit(1)
    snapshot = json.loads((store / "snapshot.json").read_text())
    (store / "fitted.json").write_text(json.dumps({"inputs": len(snapshot)}))
    print(json.dumps({"models": 3}))
elif command == "simulate":
    fitted = json.loads((store / "fitted.json").read_text())
    print(json.dumps({
        "model": args[1],
        "backend": option("--backend"),
        "platform": option("--platform"),
        "requests": 64,
        "metrics": {"ttft_s_p50": 0.1 * fitted["inputs"], "tpot_s_p50": 0.02},
    }))
else:
    sys.exit(f"fake dooly: unknown command {command}")
