"""How fast the fitted latency models answer: operation predictions per second on one core.

The simulator calls the predictor once per engine step, millions of times per simulated day, so
the target is at least 1 million operation predictions per second on one core. Measured here on
models fitted to a synthetic snapshot (dooly.fit.synthetic): a profiled model (every signature
seen), a never-profiled one (every signature predicted from config dims) and a Llama-sized
inventory (28 distinct signatures, most of them unseen), through
  - StepPredictor.step_seconds: one step per call (the simulator's loop),
  - StepPredictor.step_seconds_many: a batch of steps per call, from Python lists,
  - StepPredictor.step_seconds_arrays: a batch of steps from flat numpy arrays,
  - Predictor.predict_ops: 1M arbitrary (signature, request) rows per call.
An "operation prediction" is one inventory operation evaluated for one step (or one row).
With --store, the same paths also run on the models `dooly fit` wrote there, for each --model's
inventory (e.g. the H100 shards: real curves, tree-corrected attention).

Run: .venv/bin/python bench/bench_predict.py [--steps N] [--repeats R]
     .venv/bin/python bench/bench_predict.py --store DB --platform NVIDIA-H100-80GB-HBM3 \
         --backend 'paged|sdpa' --model meta-llama/Llama-3.1-8B --model meta-llama/Llama-3.2-1B
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from dooly.fit import synthetic as syn  # noqa: E402
from dooly.fit.predictor import Predictor, flatten_steps  # noqa: E402
from dooly.fit.selection import fit_frame  # noqa: E402

TARGET_OPS_PER_S = 1_000_000
PREDICT_OPS_ROWS = 1_000_000
MAX_PREFILL_CHUNKS = 2
MAX_DECODES = 128
MAX_CONTEXT = 16384
MAX_CHUNK = 2048
MAX_TOKENS = 8192
MAX_SEQS = 64
MEAN_CONTEXT = 1000
SEED = 0
# A Llama layer has ~25-30 distinct signatures; the toy inventories have 8.
LLAMA_EXTRA_OPS = 20
US_PER_S = 1e6

Steps = list[tuple[list[tuple[int, int]], list[int]]]


def random_steps(n: int, rng: np.random.Generator) -> Steps:
    """Mixed batches like a continuous-batching scheduler forms: a few prefill chunks plus decodes."""
    steps = []
    for _ in range(n):
        prefill = [
            (int(rng.integers(1, MAX_CHUNK)), int(rng.integers(0, MAX_CONTEXT)))
            for _ in range(int(rng.integers(0, MAX_PREFILL_CHUNKS + 1)))
        ]
        decodes = int(rng.integers(0 if prefill else 1, MAX_DECODES))
        steps.append((prefill, rng.integers(1, MAX_CONTEXT, size=decodes).tolist()))
    return steps


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of `repeats` calls. CPU time is this process's own work,
    so it stays honest on a machine shared with other jobs; wall time is shown beside it."""
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return statistics.median(cpu), statistics.median(wall)


def llama_sized(inventory: dict, extra: int) -> dict:
    """The toy inventory plus `extra` never-profiled elementwise signatures (norm, rotary, residual
    and cast ops of other widths), to reach the ~25-30 distinct signatures of a Llama layer."""
    operations = list(inventory["operations"])
    for i in range(extra):
        width = 128 * (i + 1)
        op = syn.MUL if i % 2 else syn.SILU
        config = {"in0.1": width, "in1.0": width} if op == syn.MUL else {"in0.1": width}
        operations.append(
            {
                "signature": f"{i:032x}",
                "op": op,
                "op_class": op,
                "config_dims": config,
                "request_vars": ["T"],
                "count": 4,
            }
        )
    return {**inventory, "operations": operations}


def measure_steps(
    predictor: Predictor, label: str, inventory: dict, steps: Steps, repeats: int
) -> list[tuple]:
    step = predictor.step_predictor(inventory)
    n_ops = step.op_count
    flat = flatten_steps(steps)
    paths = {
        "step_seconds": lambda: [step.step_seconds(p, d) for p, d in steps],
        "step_seconds_many": lambda: step.step_seconds_many(steps),
        "step_seconds_arrays": lambda: step.step_seconds_arrays(*flat, len(steps)),
    }
    print(f"{inventory['model_id']} ({label}): {n_ops} ops, {step.unseen_count} unseen")
    rows = []
    for path, fn in paths.items():
        cpu, wall = timed(fn, repeats)
        ops = len(steps) * n_ops
        rows.append((f"{label}: {path}", n_ops, cpu / len(steps) * US_PER_S, ops / cpu, ops / wall))
    return rows


def measure_predict_ops(
    predictor: Predictor, rng: np.random.Generator, repeats: int, ops: list | None = None, label: str = ""
) -> tuple:
    if ops is None:
        ops = syn.inventory(syn.TOY_MODELS[2])["operations"] + syn.inventory(syn.UNSEEN_MODEL)["operations"]
    pick = rng.integers(0, len(ops), size=PREDICT_OPS_ROWS)
    tokens = rng.integers(1, MAX_TOKENS, size=PREDICT_OPS_ROWS)
    seqs = np.minimum(rng.integers(1, MAX_SEQS, size=PREDICT_OPS_ROWS), tokens)
    request = {"T": tokens, "B": seqs, "K": tokens + seqs * MEAN_CONTEXT}
    signatures = [ops[i]["signature"] for i in pick]
    classes = [ops[i]["op_class"] for i in pick]
    configs = [ops[i]["config_dims"] for i in pick]
    variables = [ops[i]["request_vars"] for i in pick]
    cpu, wall = timed(
        lambda: predictor.predict_ops(signatures, classes, configs, request, request_vars=variables), repeats
    )
    rows = PREDICT_OPS_ROWS
    name = f"{label}: predict_ops (1M rows)" if label else "predict_ops (1M mixed rows)"
    return (name, 1, cpu / rows * US_PER_S, rows / cpu, rows / wall)


def store_cases(args: argparse.Namespace) -> tuple[Predictor, list[tuple[str, dict]]]:
    """The fitted predictor of --store and the inventories of each --model."""
    from dooly.fit.source import FittedSource, open_inventory, open_predictor

    source = FittedSource(store=args.store, platform=args.platform, backend=args.backend, engine=args.engine,
                          dtype=args.dtype)
    predictor = open_predictor(source)
    cases = [(model.rsplit("/", 1)[-1], open_inventory(source, model)) for model in args.model]
    return predictor, cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store", help="also measure the models fitted in this latency database")
    parser.add_argument("--model", action="append", default=[], help="model whose inventory is in --store")
    parser.add_argument("--platform", help="platform of the fitted models in --store")
    parser.add_argument("--backend", help="attention backend of the fitted models in --store")
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    models, _ = fit_frame(syn.snapshot_frame(), generation=1, folds=3)
    predictor = Predictor(next(iter(models.values())))
    print(f"fit of the synthetic snapshot: {time.perf_counter() - start:.1f} s (not part of the rates)")
    steps = random_steps(args.steps, rng)
    print(
        f"{args.steps} random steps, up to {MAX_PREFILL_CHUNKS} prefill chunks + {MAX_DECODES} decodes each"
    )
    cases = (
        ("profiled", syn.inventory(syn.TOY_MODELS[2])),
        ("never profiled", syn.inventory(syn.UNSEEN_MODEL)),
        ("llama-sized", llama_sized(syn.inventory(syn.TOY_MODELS[2]), LLAMA_EXTRA_OPS)),
    )
    rows = []
    with threadpool_limits(limits=1):
        for label, inventory in cases:
            rows += measure_steps(predictor, label, inventory, steps, args.repeats)
        rows.append(measure_predict_ops(predictor, rng, args.repeats))
        if args.store:
            fitted, inventories = store_cases(args)
            for label, inventory in inventories:
                rows += measure_steps(fitted, label, inventory, steps, args.repeats)
                rows.append(measure_predict_ops(fitted, rng, args.repeats, inventory["operations"], label))
    print()
    header = (
        f"{'path':38s} {'ops':>4s} {'us/unit (cpu)':>14s} {'op pred/s (cpu)':>16s} {'op pred/s (wall)':>17s}"
    )
    print(f"{header} {'x target':>9s}")
    for name, n_ops, micros, rate, wall_rate in rows:
        print(
            f"{name:38s} {n_ops:4d} {micros:14.2f} {rate:16,.0f} {wall_rate:17,.0f} "
            f"{rate / TARGET_OPS_PER_S:9.2f}"
        )
    print(
        f"\nunit: one step for the step paths, one row for predict_ops; medians of {args.repeats} runs on "
        f"one core (BLAS/OpenMP limited to 1 thread); x target = CPU-time rate / {TARGET_OPS_PER_S:,}"
    )


if __name__ == "__main__":
    main()
