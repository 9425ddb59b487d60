"""GPU smoke test of `paged|flex_attention` before a profiling campaign (minutes, one GPU).

For each model (bundled ids; one period of its layers, random weights, the engine's paged cache
filled with random K/V):
1. numerics: for a few batch compositions the engine's forward runs with `paged|sdpa`, and every
   layer's attention call is repeated with the flex function on the same arguments; the outputs
   must agree to bf16 rounding. Logit soft-capping is left out of this comparison (`paged|sdpa`
   drops it, flex applies it).
2. timing: the profiler's own path (EngineAttention + Timer: warm-up, CUDA-graph capture, replays)
   at each batch for flex and for sdpa, with the first call's wall time (compilation included),
   how many graphs dynamo compiled for it, and whether the compiled flex call can be captured in a
   CUDA graph (else the Timer falls back to eager timing).

    python bench/flex_smoke.py                                  # Llama-3.1-8B, three batches
    # the suite's attention shapes that stress flex: GQA groups of 4 (8B) and 7 (Qwen2.5-7B), head
    # dim 96 with every layer sliding (Phi-3), head dim 256 with soft-capping, full + sliding (gemma-2)
    python bench/flex_smoke.py --models Llama-3.1-8B,Qwen2.5-7B,Phi-3-mini-4k-instruct,gemma-2-9b --all-batches
    python bench/flex_smoke.py --device cpu --models tiny/config.json   # a dry run of the script itself

Prints one JSON object (stdout) and exits 1 when a numerics check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from typing import Any

import torch

from dooly.engines import flex_paged
from dooly.engines.base import Batch
from dooly.engines.transformers_cb import EngineAttention, capture_attention_calls
from dooly.models.registry import build_hf_config, resolve_model
from dooly.profile.grid import spread
from dooly.profile.measure import Timer
from dooly.trace.tracer import DTYPES, layer_plan

log = logging.getLogger("flex_smoke")

SDPA = "paged|sdpa"
FLEX = flex_paged.BACKEND
DEFAULT_MODELS = "Llama-3.1-8B"
# Mean absolute error of bf16 attention outputs stays far below this; the max is checked loosely.
MEAN_TOLERANCE = 2e-3
MAX_TOLERANCE = 5e-2
MAX_TOKENS = 4096
MAX_KV = 65536
MAX_SEQS = 256
CACHE_SEED = 7
US_PER_S = 1e6
# A prefill, a chunk after a long context, a decode batch and a mixed batch; --all-batches adds
# the shapes where dynamo specialises (one query token, one 128-token mask block).
# All within the profiler's default grid (dooly/profile/grid.py).
QUICK_BATCHES = {
    "prefill-1024": Batch.of(prefill=[(1024, 0)]),
    "chunk-512@4096": Batch.of(prefill=[(512, 4096)]),
    "decode-32x1024": Batch.of(decode_ctx=spread(1024, 32)),
}
MORE_BATCHES = {
    "mixed-256@1024+16x2048": Batch.of(prefill=[(256, 1024)], decode_ctx=spread(2048, 16)),
    "decode-1x8192": Batch.of(decode_ctx=[8192]),
    "prefill-64": Batch.of(prefill=[(64, 0)]),
    "decode-256x128": Batch.of(decode_ctx=spread(128, 256)),
    "prefill-4x1024": Batch.of(prefill=[(1024, 0)] * 4),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="Comma-separated bundled model ids.")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--all-batches", action="store_true", help="Also the shapes that make dynamo recompile.")
    parser.add_argument("--samples", type=int, default=None, help="Timer samples per point (profiler default).")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a dry run of this script (eager flex, no graph capture).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device: this smoke test checks the compiled GPU path (--device cpu: a dry run)")
        return 2
    batches = {**QUICK_BATCHES, **(MORE_BATCHES if args.all_batches else {})}
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "models": {},
    }
    passed = True
    for model in args.models.split(","):
        result = smoke_model(model, DTYPES[args.dtype], batches, args.samples, args.device)
        passed &= all(check["ok"] for check in result["numerics"].values())
        report["models"][model] = result
        empty_cache(args.device)
    report["numerics_ok"] = passed
    print(json.dumps(report, indent=1))
    return 0 if passed else 1


def smoke_model(model: str, dtype: torch.dtype, batches: dict[str, Batch], samples: int | None,
                device: str) -> dict[str, Any]:
    hf_config = build_hf_config(resolve_model(model))
    period, _ = layer_plan(hf_config.get_text_config())
    shape = {"dtype": dtype, "device": device, "max_tokens": MAX_TOKENS, "max_kv": MAX_KV, "max_seqs": MAX_SEQS,
             "period": period}
    sdpa = EngineAttention(copy.deepcopy(hf_config), backend=SDPA, **shape)
    fill_cache(sdpa)
    numerics = {name: compare(sdpa, batch) for name, batch in batches.items()}
    for name, check in numerics.items():
        log.info("%s %s: max |flex - sdpa| %.2e, mean %.2e -> %s", model, name, check["max_abs"], check["mean_abs"],
                 "ok" if check["ok"] else "MISMATCH")
    timings: dict[str, dict[str, Any]] = {name: {} for name in batches}
    timer = Timer(device, samples)
    for name, batch in batches.items():
        timings[name][SDPA] = time_point(sdpa, batch, timer)
    del sdpa
    empty_cache(device)
    flex = EngineAttention(copy.deepcopy(hf_config), backend=FLEX, **shape)
    for name, batch in batches.items():
        timings[name][FLEX] = time_point(flex, batch, timer)
    for name, by_backend in timings.items():
        log.info("%s %s: %s", model, name, by_backend)
    return {"period_layers": period, "numerics": numerics, "timings": timings}


def fill_cache(runner: EngineAttention) -> None:
    """Finite K/V in every block, so reads of past tokens compare numbers, not uninitialised memory."""
    device = runner.engine.device
    generator = torch.Generator(device=device).manual_seed(CACHE_SEED)
    cache = runner.engine.cache
    for tensor in [*cache.key_cache, *cache.value_cache]:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device, dtype=torch.float32))


def compare(sdpa: EngineAttention, batch: Batch) -> dict[str, Any]:
    """Every layer's attention call of one engine step, by sdpa and by flex on the same arguments."""
    kwargs = sdpa.engine.step_inputs(batch)
    with capture_attention_calls(SDPA) as (original, calls), torch.no_grad():
        sdpa.engine.model(**kwargs)
    worst, mean = 0.0, 0.0
    for module, call_args, call_kwargs in calls:
        comparable = {k: v for k, v in call_kwargs.items() if k != "softcap"}
        with torch.no_grad():
            expected, _ = original(module, *call_args, **dict(comparable))
            got, _ = flex_paged.paged_flex_attention_forward(module, *call_args, **dict(comparable))
        error = (got.float() - expected.float()).abs()
        worst, mean = max(worst, error.max().item()), max(mean, error.mean().item())
    return {"layers": len(calls), "max_abs": worst, "mean_abs": mean,
            "ok": mean <= MEAN_TOLERANCE and worst <= MAX_TOLERANCE}


def time_point(runner: EngineAttention, batch: Batch, timer: Timer) -> dict[str, Any]:
    """The profiler's measurement of one point, plus what it hides: the first call's wall time (the
    step's forward that captures the call, then the call; compilation included), the graphs dynamo
    compiled for it, and whether the call can be captured in a CUDA graph."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    timer.sync()
    started = time.perf_counter()
    call = first_layer_call(runner, batch)
    call()
    timer.sync()
    first_call_s = time.perf_counter() - started
    compiled = counters["stats"]["unique_graphs"] - graphs
    measurement = timer.measure(lambda: call)
    return {
        "first_call_s": round(first_call_s, 3),
        "graphs_compiled": compiled,
        "graph_capture": capture_error(call) if timer.device == "cuda" else "n/a",
        "median_us": None if measurement.median_s is None else round(measurement.median_s * US_PER_S, 2),
        "status": measurement.status,
        "device_seconds": round(measurement.device_seconds, 3),
    }


def first_layer_call(runner: EngineAttention, batch: Batch) -> Any:
    """A full-attention layer's call, or a sliding one's where every layer slides (Phi-3)."""
    try:
        return runner.call_for(batch, sliding=False)
    except ValueError:
        return runner.call_for(batch, sliding=True)


def empty_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def capture_error(call: Any) -> str:
    """'ok', or why the call cannot be captured in a CUDA graph (the Timer then times it eagerly)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            call()
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError as exc:
        torch.cuda.synchronize()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return "ok"


if __name__ == "__main__":
    sys.exit(main())
