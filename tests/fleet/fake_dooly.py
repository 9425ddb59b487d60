"""A stand-in for the `dooly` program in the demo test: the same arguments, tiny deterministic work.

profile writes one shard file per (backend, index) and prints the figures the real command prints;
merge needs the shards, fit needs the snapshot, simulate needs the fit: the order is checked for real.
"""

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
