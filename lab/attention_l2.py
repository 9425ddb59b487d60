"""Does timing one layer's attention call back to back flatter it? (one GPU, a minute or two)

The profiler times the engine's attention call many times in a row. If a call always reads the
same layer's KV cache, the keys it read last time may still sit in L2 (50 MB on an H100): a 1B
Llama's 16384-token read is 33 MB. The engine's forward never finds them there, since the other
layers' reads come in between. This times the same engine-built calls (the `Timer` of `dooly
profile`) twice per point: always on one layer, and moving to the next of several layers at every
call; the ratio is what the cache flattered. On the H100 it flattered nothing (median ratio
1.000, data/h100/experiments/attention_l2/), so the profiler times one period of layers.

    python lab/attention_l2.py --models Llama-3.2-1B,Qwen2.5-7B --backends 'paged|sdpa,paged|eager'

Prints one JSON object (stdout).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
from typing import Any

import torch

from dooly.engines.base import Batch
from dooly.engines.transformers_cb import EngineAttention
from dooly.models.registry import build_hf_config, resolve_model
from dooly.profile.grid import spread
from dooly.profile.measure import STATUS_OK, Timer
from dooly.trace.tracer import DTYPES, layer_plan

log = logging.getLogger("attention_l2")

# Step shapes the H100 benchmarks run under CUDA graphs (queries padded to 64, KV reads to 16384):
# a light-load decode and prefill, a heavy-load decode, and a small unpadded decode.
POINTS = {
    "light decode T=64 K=16384": Batch.of(prefill=[(61, 0)], decode_ctx=[15787, 300, 200]),
    "light prefill T=576 K=16384": Batch.of(prefill=[(512, 0), (64, 15808)]),
    "heavy decode T=64 K=131072": Batch.of(prefill=[(9, 4000)], decode_ctx=spread(2300, 55)),
    "small decode T=4 K=2052": Batch.of(decode_ctx=[512] * 4),
}
MAX_TOKENS = 2048
MAX_SEQS = 64
# Layer periods the rotated runner cycles through: 4 x a 16384-token read of a 1B model is 134 MB.
ROTATION_PERIODS = 4


def measure(model: str, backend: str, dtype: torch.dtype, device: str, rotation: int) -> dict[str, float | None]:
    hf_config = build_hf_config(resolve_model(model))
    period, _ = layer_plan(hf_config.get_text_config())
    max_kv = max(b.kv_tokens for b in POINTS.values())
    runner = EngineAttention(hf_config, backend=backend, dtype=dtype, device=device, max_tokens=MAX_TOKENS,
                             max_kv=max_kv, max_seqs=MAX_SEQS, period=period, rotation=rotation)
    timer = Timer(device)
    out: dict[str, float | None] = {}
    for name, batch in POINTS.items():
        result = timer.measure(functools.partial(runner.call_for, batch, sliding=False))
        out[name] = result.median_s if result.status == STATUS_OK else None
    del runner
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="Llama-3.2-1B")
    parser.add_argument("--backends", default="paged|sdpa")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--rotation", type=int, default=ROTATION_PERIODS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for backend in args.backends.split(","):
            one = measure(model, backend, DTYPES[args.dtype], args.device, rotation=1)
            rotated = measure(model, backend, DTYPES[args.dtype], args.device, rotation=args.rotation)
            for name in POINTS:
                alone, moving = one[name], rotated[name]
                ratio = moving / alone if alone and moving else None
                rows.append({"model": model, "backend": backend, "point": name, "one_layer_s": one[name],
                             "rotated_s": rotated[name], "rotated_over_one": ratio})
                log.info("%s %s %s: %s", model, backend, name, ratio)
    ratios = [r["rotated_over_one"] for r in rows if r["rotated_over_one"]]
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "rotation_periods": args.rotation, "median_ratio": statistics.median(ratios) if ratios else None,
              "points": rows}
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
