"""Does attention cost what T x K says, padded or not? (one GPU, a minute)

Under CUDA graphs transformers pads a step's query tokens to a multiple of 64 and its KV read to
a multiple of 16384; the profiler's grid points are unpadded. For heavy-load mixed steps the
fitted attention over-predicts the engine's padded steps by 10-30%. This times the engine-built
attention (the `Timer` of `dooly profile`) for pairs of batches: a heavy-load mixed composition
as the grid would hold it, and the same composition padded as the engine pads it (extra query
tokens as a context-free chunk, extra KV on the first decode), and reports each one's seconds per
million (query, key) pairs: equal if only T x K matters.

    python bench/attention_padding.py --models Llama-3.1-8B,gemma-2-9b --backends 'paged|sdpa'

Prints one JSON object (stdout).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import torch

from dooly.engines.base import Batch
from dooly.models.registry import build_hf_config, resolve_model
from dooly.profile.attention import engine_attention
from dooly.profile.grid import GridSpec, spread
from dooly.profile.measure import STATUS_OK, Timer
from dooly.trace.tracer import DTYPES

log = logging.getLogger("attention_padding")

Q_PADDING = 64
KV_PADDING = 16384
MAX_TOKENS = 4096
MAX_SEQS = 64
PAIRS_PER_MILLION = 1e6
# Heavy-load mixed steps of the H100 benchmarks: a prompt chunk beside ~48 decodes of ~2300 tokens.
COMPOSITIONS = {
    "chunk 1500 + 48 decodes": ([(1500, 0)], spread(2300, 48)),
    "chunk 2000 + 32 decodes": ([(2000, 0)], spread(3000, 32)),
    "chunk 1000 + 16 decodes": ([(1000, 0)], spread(4000, 16)),
}


def padded(prefill: list[tuple[int, int]], decode_ctx: list[int]) -> Batch:
    """The composition as the engine's graph path runs it: T and K rounded up to its intervals."""
    tokens = sum(q for q, _ in prefill) + len(decode_ctx)
    kv = sum(q + c for q, c in prefill) + sum(decode_ctx) + len(decode_ctx)
    extra_q = -tokens % Q_PADDING
    extra_kv = -(kv + extra_q) % KV_PADDING
    decodes = list(decode_ctx)
    decodes[0] += extra_kv
    return Batch.of(prefill=[*prefill, (extra_q, 0)] if extra_q else prefill, decode_ctx=decodes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="Llama-3.1-8B")
    parser.add_argument("--backends", default="paged|sdpa")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        hf_config = build_hf_config(resolve_model(model))
        batches = {}
        for name, (prefill, decode_ctx) in COMPOSITIONS.items():
            batches[(name, "grid")] = Batch.of(prefill=prefill, decode_ctx=decode_ctx)
            batches[(name, "padded")] = padded(prefill, decode_ctx)
        for backend in args.backends.split(","):
            grid = GridSpec(max_tokens=MAX_TOKENS, max_seqs=MAX_SEQS, max_kv=max(b.kv_tokens for b in batches.values()))
            runner = engine_attention("transformers", hf_config, backend=backend, dtype=DTYPES[args.dtype],
                                      device=args.device, grid=grid)
            timer = Timer(args.device)
            for (name, form), batch in batches.items():
                result = timer.measure(lambda: runner.call_for(batch, sliding=False))
                seconds = result.median_s if result.status == STATUS_OK else None
                pairs = batch.tokens * batch.kv_tokens
                rows.append({"model": model, "backend": backend, "composition": name, "form": form,
                             "T": batch.tokens, "K": batch.kv_tokens, "seconds": seconds,
                             "seconds_per_million_pairs": seconds / pairs * PAIRS_PER_MILLION if seconds else None})
                log.info("%s %s %s %s T=%d K=%d: %s", model, backend, name, form, batch.tokens, batch.kv_tokens, seconds)
            del runner
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    json.dump({"device": device, "torch": torch.__version__, "points": rows}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
