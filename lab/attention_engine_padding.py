"""Attention as the CUDA-graph path runs it, against what the profiler times (one GPU, minutes).

Under CUDA graphs the fitted step model over-predicts heavy mixed steps of some models (Llama-3.1-8B
+9.5%, gemma-2-9b +31% device time) and not others (Llama-3.2-3B +0.9%), while it matches the
profiled grid points within 0.3%. An earlier padding script (retired) found that padded extents cost what
unpadded ones do per (query, key) pair, but it built both forms with the profiler's inputs
(`use_padding=False`). This times real heavy mixed steps of the ground truth
(data/h100/experiments/attention_engine_padding/compositions.json) three ways, each with the
`Timer` of `dooly profile` and the names of the kernels one call launches:

- `unpadded`: the step's composition as the profiler builds it;
- `padded_composition`: the composition the simulator hands the fitted model for a padded step
  (extra query tokens as a context-free chunk, extra KV on the first decode);
- `engine`: the step's composition with the engine's own padded inputs (`use_padding=True` at the
  padded query and KV sizes), which is what the CUDA graph replays;

and re-times a few stored grid points, to tell a lease difference from a shape difference.

    python lab/attention_engine_padding.py --models Llama-3.1-8B,gemma-2-9b > out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from dooly.engines.base import Batch
from dooly.engines.transformers_cb import cache_groups
from dooly.models.registry import build_hf_config, resolve_model
from dooly.profile.attention import engine_attention
from dooly.profile.grid import GridSpec
from dooly.profile.measure import STATUS_OK, Timer
from dooly.sim.step_model import StepKind, StepPath, padded_composition
from dooly.trace.tracer import DTYPES

log = logging.getLogger("attention_engine_padding")

COMPOSITIONS = Path(__file__).resolve().parent.parent / "data/h100/experiments/attention_engine_padding/compositions.json"
MAX_TOKENS = 4096
MAX_SEQS = 128
# Kernels reported per call: the ones that take most of its device time.
TOP_KERNELS = 3


def kernel_names(call: Any) -> list[str]:
    """The CUDA kernels one call launches, the longest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    totals: Counter[str] = Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total
    return [name[:120] for name, _ in totals.most_common(TOP_KERNELS)]


def step_forms(step: dict[str, Any]) -> dict[str, tuple[Batch, tuple[int, int] | None]]:
    prefill = [tuple(p) for p in step["prefill"]]
    decode_ctx = list(step["decode_ctx"])
    path = StepPath(StepKind.MIXED, cuda_graph=True, padded_tokens=step["padded_tokens"],
                    engine_path="varlen", padded_kv=step["padded_kv"])
    padded_prefill, padded_decodes = padded_composition(prefill, decode_ctx, path)
    read = step["padded_kv"] - step["padded_tokens"]
    return {
        "unpadded": (Batch.of(prefill=prefill, decode_ctx=decode_ctx), None),
        "padded_composition": (Batch.of(prefill=padded_prefill, decode_ctx=padded_decodes), None),
        "engine": (Batch.of(prefill=prefill, decode_ctx=decode_ctx), (step["padded_tokens"], read)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="Llama-3.1-8B")
    parser.add_argument("--backend", default="paged|sdpa")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--compositions", type=Path, default=COMPOSITIONS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    plan = json.loads(args.compositions.read_text())
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        hf_config = build_hf_config(resolve_model(model))
        steps = plan["steps"].get(model, [])
        grid_points = plan["grid_points"].get(model, [])
        cases: list[tuple[str, str, Batch, tuple[int, int] | None, dict[str, Any]]] = []
        for step in steps:
            for form, (batch, sizes) in step_forms(step).items():
                cases.append((f"step {step['step']}", form, batch, sizes, {"device_s": step["device_s"]}))
        for point in grid_points:
            batch = Batch.of(prefill=[tuple(s) for s in point["seqs"] if s[0] > 1 or s[1] == 0],
                             decode_ctx=[s[1] for s in point["seqs"] if s[0] == 1 and s[1] > 0])
            cases.append(("grid point", "unpadded", batch, None, {"stored_s": point["stored_s"]}))
        max_kv = max(max(b.kv_tokens, (s[0] + s[1]) if s else 0) for _, _, b, s, _ in cases)
        grid = GridSpec(max_tokens=MAX_TOKENS, max_seqs=MAX_SEQS, max_kv=max_kv)
        runner = engine_attention("transformers", hf_config, backend=args.backend, dtype=DTYPES[args.dtype],
                                  device="cuda", grid=grid)
        windowed = cache_groups(hf_config)["sliding_attention_groups"] > 0
        timer = Timer("cuda")
        for case, form, batch, sizes, extra in cases:
            for sliding in (False, True) if windowed else (False,):
                build = functools.partial(runner.call_for, batch, sliding, sizes)
                result = timer.measure(build)
                seconds = result.median_s if result.status == STATUS_OK else None
                kernels = kernel_names(build()) if seconds else []
                rows.append({"model": model, "case": case, "form": form, "sliding": sliding,
                             "T": sizes[0] if sizes else batch.tokens,
                             "K": sum(sizes) if sizes else batch.kv_tokens, "seqs": batch.num_seqs,
                             "seconds": seconds, "status": result.status, "kernels": kernels, **extra})
                log.info("%s %s %s sliding=%s: %s %s", model, case, form, sliding, seconds, kernels[:1])
        del runner
        torch.cuda.empty_cache()
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "backend": args.backend,
               "points": rows}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
