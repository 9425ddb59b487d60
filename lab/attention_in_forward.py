"""Attention inside the engine's forward against the same call timed alone (one GPU, minutes).

With the wave model, the fitted attention matches the engine-padded heavy mixed steps of
Llama-3.1-8B timed alone (lab/attention_engine_padding.py) within 0-4%, yet the whole steps come
out 3% under their measured device time. This runs the whole model (random weights, the engine's
paged cache and padded inputs) on the same compositions under the torch profiler and reports, per
step, the device time of every kernel by kind: the attention kernel per layer (to set against
the standalone figure) and the rest.

    python lab/attention_in_forward.py --model Llama-3.1-8B > out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from attention_engine_padding import COMPOSITIONS

from dooly.engines.base import Batch
from dooly.engines.transformers_cb import DEFAULT_BLOCK_SIZE, TransformersCBEngine
from dooly.models.registry import build_hf_config, resolve_model
from dooly.trace.tracer import DTYPES

log = logging.getLogger("attention_in_forward")

# Kernel names that are the attention call itself (cuDNN's fused flash forward).
ATTENTION_KERNEL = "sdpa"
MAX_BATCH_TOKENS = 2048
# Forwards per step: the first warms up (cuDNN plans, allocator), the rest are profiled.
FORWARDS = 4
US_PER_S = 1e6
MS_PER_S = 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Llama-3.1-8B")
    parser.add_argument("--backend", default="paged|sdpa")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--compositions", type=Path, default=COMPOSITIONS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    steps = json.loads(args.compositions.read_text())["steps"][args.model]
    hf_config = build_hf_config(resolve_model(args.model))
    layers = hf_config.get_text_config().num_hidden_layers
    blocks = 2 * max(s["padded_kv"] for s in steps) // DEFAULT_BLOCK_SIZE + 2 * max(len(s["decode_ctx"]) for s in steps)
    engine = TransformersCBEngine(hf_config, attention=args.backend, dtype=DTYPES[args.dtype], device="cuda",
                                  num_blocks=blocks, max_batch_tokens=MAX_BATCH_TOKENS)
    engine.build_model()
    engine.build_cache(max_requests=MAX_BATCH_TOKENS)
    rows = []
    for step in steps:
        batch = Batch.of(prefill=[tuple(p) for p in step["prefill"]], decode_ctx=step["decode_ctx"])
        sizes = (step["padded_tokens"], step["padded_kv"] - step["padded_tokens"])
        rows.append({"step": step["step"], "T": sizes[0], "K": step["padded_kv"],
                     "measured_step_device_s": step["device_s"], **profile_step(engine, batch, sizes, layers)})
        log.info("%s", rows[-1])
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
               "backend": args.backend, "steps": rows}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def profile_step(engine: TransformersCBEngine, batch: Batch, sizes: tuple[int, int], layers: int) -> dict[str, Any]:
    """Median per forward of the attention kernels' device time (per layer) and of the rest."""
    from torch.profiler import ProfilerActivity, profile

    kwargs = engine.step_inputs(batch, sizes)
    with torch.no_grad():
        engine.model(**kwargs)
    torch.cuda.synchronize()
    attention, rest, wall = [], [], []
    for _ in range(FORWARDS - 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
            start.record()
            engine.model(**kwargs)
            end.record()
            torch.cuda.synchronize()
        totals: dict[bool, float] = defaultdict(float)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[ATTENTION_KERNEL in event.name] += event.device_time_total / US_PER_S
        attention.append(totals[True] / layers)
        rest.append(totals[False])
        wall.append(start.elapsed_time(end) / MS_PER_S)
    return {"attention_per_layer_s": statistics.median(attention), "other_kernels_s": statistics.median(rest),
            "forward_events_s": statistics.median(wall)}


if __name__ == "__main__":
    raise SystemExit(main())
