"""What building the engine's attention costs on the CPU, before and after two changes (minutes).

`dooly profile`'s attention runner (`dooly.engines.transformers_cb.EngineAttention`) builds one
layer period of the model once per run, then, for every point, prepares the step's inputs and runs
one forward to capture the calls. Two costs were not attention's own:
- building the model drew every weight twice (torch's initialisers in each module's constructor,
  then transformers' `init_weights` over them): now torch's are skipped (`_weight_init`);
- the forward ran to the logits (a hidden x vocab product per sequence): now it stops before the
  output embedding (`_stopped_before`).
This times both ways in one process, alternating: the engine build, and `call_for` over the
attention batches of `dooly demo`'s sweep; and, alternating on one runner, each batch's latency as
`Timer` measures it after either step (`latency_ratio_stopped_over_full`: it must not change).

    python lab/attention_build_cpu.py --models Qwen/Qwen2.5-0.5B,Qwen/Qwen2.5-1.5B --repeats 3

Prints one JSON object (stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from typing import Any

import torch

from dooly.engines import transformers_cb
from dooly.models.registry import build_hf_config, resolve_model
from dooly.profile.attention import engine_attention
from dooly.profile.grid import GridSpec, attention_batches
from dooly.profile.measure import Timer

# `dooly demo`'s CPU sweep (dooly/fleet/demo_fleet.yaml).
DEMO_GRID = GridSpec(max_tokens=64, max_seqs=8, max_kv=512, max_context=256)


def _full_step(module: object) -> contextlib.AbstractContextManager[None]:
    """The old step: it runs to the logits."""
    return contextlib.nullcontext()


def _patched(name: str, value: Any) -> contextlib.ExitStack:
    """`transformers_cb.NAME` is VALUE until the returned stack closes."""
    patches = contextlib.ExitStack()
    patches.callback(setattr, transformers_cb, name, getattr(transformers_cb, name))
    setattr(transformers_cb, name, value)
    return patches


def timed(model_id: str, old: bool) -> dict[str, float]:
    patches = contextlib.ExitStack()
    if old:
        new_init = transformers_cb._weight_init
        patches.enter_context(_patched(
            "_weight_init", lambda enabled: contextlib.nullcontext() if enabled else new_init(enabled)))
        patches.enter_context(_patched("_stopped_before", _full_step))
    with patches:
        config = build_hf_config(resolve_model(model_id))
        started = time.perf_counter()
        runner = engine_attention("transformers", config, backend="paged|sdpa", dtype=torch.float32, device="cpu",
                                  grid=DEMO_GRID)
        build = time.perf_counter() - started
        steps, calls = [], []
        for batch in attention_batches(DEMO_GRID):
            started = time.perf_counter()
            call = runner.call_for(batch, False)
            steps.append(time.perf_counter() - started)
            started = time.perf_counter()
            call()
            calls.append(time.perf_counter() - started)
    return {"build_s": build, "call_for_s": statistics.fmean(steps), "call_s": statistics.fmean(calls),
            "points": len(steps)}


def latency_ratios(model_id: str, rounds: int) -> list[float]:
    """Per attention batch, the median over ROUNDS of the measured latency (`Timer`, as profile
    measures a point) after a step stopped before the logits over one run to its end, on one
    runner, the two in turn and each first in every other round: the forward's end must not change
    what is measured."""
    config = build_hf_config(resolve_model(model_id))
    runner = engine_attention("transformers", config, backend="paged|sdpa", dtype=torch.float32, device="cpu",
                              grid=DEMO_GRID)
    ratios = []
    for batch in attention_batches(DEMO_GRID):
        pairs = []
        for index in range(rounds):
            measured: dict[bool, float | None] = {}
            for full in (True, False) if index % 2 == 0 else (False, True):
                with _patched("_stopped_before", _full_step) if full else contextlib.nullcontext():
                    measured[full] = Timer("cpu", samples=5).measure(
                        functools.partial(runner.call_for, batch, False)).median_s
            full_s, stopped_s = measured[True], measured[False]
            if full_s and stopped_s:
                pairs.append(stopped_s / full_s)
        ratios.append(statistics.median(pairs))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="Qwen/Qwen2.5-0.5B,Qwen/Qwen2.5-1.5B")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    report: dict[str, Any] = {}
    for model_id in args.models.split(","):
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            runs["before"].append(timed(model_id, old=True))
            runs["after"].append(timed(model_id, old=False))
        report[model_id] = {
            way: {key: round(statistics.median(r[key] for r in values), 4) for key in values[0]}
            for way, values in runs.items()
        }
        ratios = latency_ratios(model_id, args.repeats)
        report[model_id]["latency_ratio_stopped_over_full"] = {
            "median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
