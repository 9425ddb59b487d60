"""Why one attention call costs more inside the running engine than timed alone (one GPU, minutes).

lab/engine_step_profile.py found Llama-3.1-8B's attention call 2-8% dearer inside the engine's
heavy mixed steps than `dooly profile` timed it at the same padded shape. This times the engine's
attention call for real heavy steps of the ground truth (the engine's own padded inputs, as the
CUDA graph replays them) under the conditions that differ between the two:

- `fresh`: as the profiler does, on a fresh cache whose blocks each sequence takes in order;
- `scattered`: the cache's free blocks shuffled first, as after a server has served many requests;
- `sustained`: the same call back to back for `SUSTAIN_S` seconds, as the engine's forward keeps
  the GPU busy (clocks under a sustained power draw);
- `sustained+scattered`: both;
- `all-layers`: a fresh cache of every layer of the model, as large as the engine's, the calls moving
  from layer to layer (the profiler holds one period of layers: a cache some 30x smaller);
- `between-gemms`: each timed call follows the GEMMs of one MLP at the step's token count, as the
  call follows its layer's neighbours in a forward (the loop's figure then times the call only).

Each condition reports the profiler's timer and the median of the last `LOOP_TIMED` calls of a
loop (`SUSTAIN_S` long under `sustained`, else just those calls), timed with CUDA events, and on
a fresh cache the device time per call of its kernels by kind (as lab/engine_step_profile.py
sorts the engine's), also under `all-layers`.

    python lab/attention_conditions.py --model Llama-3.1-8B > out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from attention_engine_padding import COMPOSITIONS, MAX_SEQS, MAX_TOKENS, step_forms

from dooly.engines.kernel_trace import READ_BACK_KERNEL, kernel_kind
from dooly.engines.transformers_cb import EngineAttention
from dooly.models.registry import build_hf_config, resolve_model
from dooly.profile.attention import engine_attention
from dooly.profile.grid import GridSpec
from dooly.profile.measure import STATUS_OK, Timer
from dooly.trace.tracer import DTYPES, layer_plan

log = logging.getLogger("attention_conditions")

SUSTAIN_S = 20.0
# Calls timed with events at the end of a sustained run, and how often the loop waits for the GPU.
LOOP_TIMED = 20
LOOP_SYNC_EVERY = 8
MS_PER_S = 1e3
# A short run: the load a timer's samples put on the GPU.
BURST_S = 0.0
# Calls profiled kernel by kernel.
PROFILED_CALLS = 10
ALL_LAYERS = "all-layers"
BETWEEN_GEMMS = "between-gemms"
PROFILED_CONDITIONS = ("fresh", ALL_LAYERS)
US_PER_MS = 1e3
SHUFFLE_SEED = 0
CONDITIONS = ("fresh", "scattered", "sustained", "sustained+scattered", "all-layers", "between-gemms")


def scatter_free_blocks(runner: Any, seed: int) -> None:
    """Shuffle the order in which the cache hands out free blocks."""
    manager = runner.engine.cache._block_manager
    blocks = list(manager._uninit_block_ids)
    random.Random(seed).shuffle(blocks)
    manager._uninit_block_ids.clear()
    manager._uninit_block_ids.extend(blocks)


def sustain(call: Any, seconds: float) -> tuple[int, float]:
    """Run `call` back to back for `seconds` of wall time; returns how many calls ran and the
    median device time of the last `LOOP_TIMED` of them (timed in the loop, under that load)."""
    calls, deadline = 0, time.perf_counter() + seconds
    timed: list[tuple[Any, Any]] = []  # (start, end) CUDA events
    while time.perf_counter() < deadline or len(timed) < LOOP_TIMED:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        timed = (timed + [(start, end)])[-LOOP_TIMED:]
        calls += 1
        if calls % LOOP_SYNC_EVERY == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return calls, statistics.median(a.elapsed_time(b) for a, b in timed) / MS_PER_S


def mlp_gemms(config: Any, tokens: int, dtype: torch.dtype) -> Any:
    """The GEMMs of one MLP of the model at `tokens` tokens (up, gate, down), as one callable."""
    hidden, inner = config.hidden_size, config.intermediate_size
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    up, gate = (torch.randn(hidden, inner, device="cuda", dtype=dtype) for _ in range(2))
    down = torch.randn(inner, hidden, device="cuda", dtype=dtype)

    def run() -> None:
        torch.mm(torch.mm(x, up) * torch.mm(x, gate), down)

    return run


def between(call: Any, neighbour: Any, count: int) -> float:
    """Median device seconds of `call`, each run right after `neighbour` on the same stream."""
    timed = []
    for _ in range(count):
        neighbour()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        timed.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in timed) / MS_PER_S


def kernels_per_call(call: Any, calls: int) -> dict[str, float]:
    """Device milliseconds per call by kernel kind (as lab/engine_step_profile.py sorts them),
    over `calls` calls under the profiler."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kind = "gather" if READ_BACK_KERNEL in event.name else kernel_kind(event.name)
            totals[kind] += event.device_time_total / US_PER_MS / calls
    return {kind: round(ms, 4) for kind, ms in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Llama-3.1-8B")
    parser.add_argument("--backend", default="paged|sdpa")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=3, help="How many of the heaviest ground-truth steps to time.")
    parser.add_argument("--compositions", type=Path, default=COMPOSITIONS)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    plan = json.loads(args.compositions.read_text())
    steps = sorted(plan["steps"][args.model], key=lambda s: s["padded_kv"])[-args.steps:]
    hf_config = build_hf_config(resolve_model(args.model))
    forms = [step_forms(step)["engine"] for step in steps]
    max_kv = max(sum(sizes) for _, sizes in forms)
    grid = GridSpec(max_tokens=MAX_TOKENS, max_seqs=MAX_SEQS, max_kv=max_kv)
    runner = engine_attention("transformers", hf_config, backend=args.backend, dtype=DTYPES[args.dtype],
                              device="cuda", grid=grid)
    timer = Timer("cuda")
    rows = []
    for condition in args.conditions.split(","):
        if condition == ALL_LAYERS:
            del runner
            torch.cuda.empty_cache()
            period, _ = layer_plan(hf_config.get_text_config())
            runner = EngineAttention(hf_config, backend=args.backend, dtype=DTYPES[args.dtype], device="cuda",
                                     max_tokens=grid.max_tokens, max_kv=grid.max_kv, max_seqs=grid.max_seqs,
                                     period=period, rotation=hf_config.get_text_config().num_hidden_layers // period)
        for step, (batch, sizes) in zip(steps, forms):
            if "scattered" in condition:
                scatter_free_blocks(runner, SHUFFLE_SEED)
            result = timer.measure(functools.partial(runner.call_for, batch, False, sizes))
            seconds = result.median_s if result.status == STATUS_OK else None
            if condition == BETWEEN_GEMMS:
                neighbour = mlp_gemms(hf_config.get_text_config(), sizes[0], DTYPES[args.dtype])
                calls, in_loop = LOOP_TIMED, between(runner.call_for(batch, False, sizes), neighbour, LOOP_TIMED)
            else:
                calls, in_loop = sustain(runner.call_for(batch, False, sizes),
                                         SUSTAIN_S if "sustained" in condition else BURST_S)
            kernels = kernels_per_call(runner.call_for(batch, False, sizes), PROFILED_CALLS) if condition in PROFILED_CONDITIONS else None
            rows.append({"condition": condition, "step": step["step"], "T": sizes[0], "K": sum(sizes),
                         "timer_s": seconds, "status": result.status, "loop_calls": calls, "loop_s": in_loop,
                         "kernels_ms": kernels})
            log.info("%s step %s (T=%d, K=%d): timer %s, in a loop of %d calls %.5f", condition, step["step"],
                     sizes[0], sum(sizes), seconds, calls, in_loop)
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "backend": args.backend,
               "model": args.model, "sustain_s": SUSTAIN_S, "points": rows}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
