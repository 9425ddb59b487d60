"""Benchmark: `simulate` of 10,000 requests on one core, per scheduler model.

A Poisson workload at a rate the replica sustains (prompts 64-2048, outputs 16-512 tokens), a
step model and a CPU overhead model; each scheduler runs a few times and the median wall time is
printed, with the process CPU time (the machine may be shared) and simulated steps per second.
Target: a 10,000-request simulation in seconds on one core.

The step model is the analytic roofline (cheap, so the number measures the simulator, not a
regressor), or with --store the fitted models of `dooly fit` (StepPredictor.step_seconds once per
simulated step: the simulator's real hot path).

    python bench/bench_simulate.py                  # 10,000 requests, 3 runs each
    python bench/bench_simulate.py --requests 2000 --runs 1
    python bench/bench_simulate.py --store DB --model meta-llama/Llama-3.1-8B \
        --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa'
"""

from __future__ import annotations

import argparse
import statistics
import time

from dooly.sim.schedulers import TransformersCBScheduler, VllmScheduler
from dooly.sim.simulator import simulate
from dooly.sim.step_model import AnalyticStepModel, CpuOverheadModel, OverheadTerms, StepLatencyModel
from dooly.workload import LengthSpec, WorkloadSpec, generate_requests

TARGET_SECONDS = 10.0
RATE_RPS = 8.0
PROMPT = LengthSpec("uniform", low=64, high=2048)
OUTPUT = LengthSpec("uniform", low=16, high=512)
OVERHEAD = CpuOverheadModel(
    terms={
        "decode_graph": OverheadTerms(constant_s=0.0015, per_sequence_s=1e-5),
        "default": OverheadTerms(constant_s=0.003, per_sequence_s=2e-5, per_token_s=1e-7),
    }
)
SCHEDULERS = {
    "transformers fifo": lambda: TransformersCBScheduler({"num_blocks": 2048}),
    "transformers prefill_first": lambda: TransformersCBScheduler({"num_blocks": 2048, "scheduler_type": "prefill_first"}),
    "transformers async": lambda: TransformersCBScheduler({"num_blocks": 2048, "use_async_batching": True}),
    "vllm": lambda: VllmScheduler({"num_gpu_blocks": 32768}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=RATE_RPS, help="Poisson arrival rate, requests/s")
    parser.add_argument("--store", help="fitted latency database: use its models instead of the analytic one")
    parser.add_argument("--model", help="model whose inventory is in --store")
    parser.add_argument("--platform", help="platform of the fitted models")
    parser.add_argument("--backend", help="attention backend of the fitted models")
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    requests = generate_requests(WorkloadSpec(num_requests=args.requests, rate=args.rate, prompt=PROMPT, output=OUTPUT, seed=0))
    model: StepLatencyModel
    if args.store:
        from dooly.fit.source import FittedSource, open_step_model

        source = FittedSource(store=args.store, platform=args.platform, backend=args.backend, engine=args.engine,
                              dtype=args.dtype)
        fitted = open_step_model(source, args.model)
        model = fitted
        label = f"fitted models of {fitted.model_id} ({fitted.describe}, {fitted.op_count} ops)"
    else:
        model = AnalyticStepModel()
        label = "analytic step model"
    print(f"{args.requests} requests, Poisson {args.rate} req/s, {label}, {args.runs} runs each (median wall)")
    worst = 0.0
    for name, make in SCHEDULERS.items():
        walls, cpus = [], []
        for _ in range(args.runs):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = simulate(requests, make(), model, OVERHEAD)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
        median = statistics.median(walls)
        worst = max(worst, median)
        summary = result.summary()
        print(
            f"{name:28s} {median:6.2f} s wall ({statistics.median(cpus):5.2f} s CPU)  {result.num_steps:7d} steps  "
            f"{result.num_steps / median:7.0f} steps/s  "
            f"{args.requests / median:7.0f} req/s  p50 TTFT {summary['ttft_s']['p50'] * 1e3:6.1f} ms  "
            f"p50 TPOT {summary['tpot_s']['p50'] * 1e3:5.1f} ms  mean batch {summary['steps']['mean_seqs']:5.1f}"
        )
    print(f"slowest median {worst:.2f} s; target {TARGET_SECONDS:.0f} s: {'met' if worst <= TARGET_SECONDS else 'MISSED'}")


if __name__ == "__main__":
    main()
