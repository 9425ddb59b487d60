"""Drop-in check: Vidur on `dooly export vidur` tables against `dooly simulate`, same traces.

Given a Vidur checkout (github.com/microsoft/vidur, main; its path as an argument, never
committed) and a Python that can import it, this script
1. exports Dooly's predictions for MODEL as Vidur profiles into a scratch directory (not into the
   checkout: Vidur's own files stay untouched; its predictor is pointed at the scratch files);
2. writes one Vidur trace (arrived_at, num_prefill_tokens, num_decode_tokens) per load, at a light
   and a heavy Poisson rate, with the same prompts and outputs;
3. runs Vidur (sarathi scheduler, chunk C, batch cap S, N KV blocks of 16; CPU overhead off, the
   GQA batching surcharge off, the predictor of --predictor) and `dooly simulate` (the store's
   engine, transformers continuous batching: FIFO, max_batch_tokens = C, max_requests_per_batch =
   S, N blocks, no padding, CUDA graphs off, no host overhead) on each trace;
4. prints mean/p50/p90 TTFT, TPOT and E2E side by side with the difference.

Both price device time only, from the same fitted models: what differs is the schedulers and
Vidur's regressors over the exported tables. TPOT is (E2E - TTFT) / (output tokens - 1) for both.

    python bench/vidur_dropin.py /work/scratch/vidur --vidur-python /work/scratch/vidur-venv/bin/python \
        --store /work/fitted/h100 --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa'
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dooly.sim.vidur import vidur_predictor_flags
from dooly.workload import LengthSpec, WorkloadSpec, generate_requests

logger = logging.getLogger("vidur_dropin")

MS_PER_S = 1e3
PERCENTILES = (50, 90)
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B"
# Vidur knows Llama-3.1-8B's shapes as Meta-Llama-3-8B (same dims and vocabulary).
DEFAULT_VIDUR_MODEL = "meta-llama/Meta-Llama-3-8B"
DEFAULT_DEVICE = "h100"
DEFAULT_REQUESTS = 64
DEFAULT_LOADS = ("light=1.0", "heavy=12.0")
DEFAULT_PROMPT = "uniform:128:1024"
DEFAULT_OUTPUT = "uniform:16:256"
CHUNK = 512
BATCH_CAP = 64
NUM_BLOCKS = 20000
BLOCK_SIZE = 16
MAX_SEQ_LEN = 2048
SEED = 0
# transformers pads query and KV lengths to intervals; Vidur prices exact lengths: compare unpadded.
NO_PADDING = 1
# Vidur's trace generator caps prompt + output at its max_tokens.
VIDUR_TRACE_MAX_TOKENS = 4096
RUN_TIMEOUT_S = 3600


def _length(spec: str) -> LengthSpec:
    kind, low, high = spec.split(":")
    return LengthSpec(kind, low=int(low), high=int(high))


def write_trace(path: Path, rate: float, requests: int, prompt: str, output: str) -> Path:
    """One workload as a Vidur trace CSV, which `dooly simulate --trace` reads too."""
    spec = WorkloadSpec(num_requests=requests, rate=rate, prompt=_length(prompt), output=_length(output), seed=SEED)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        for request in generate_requests(spec):
            writer.writerow([f"{request.arrival_s:.6f}", request.prompt_tokens, request.output_tokens])
    return path


def _stats(values: list[float]) -> dict[str, float]:
    finite = np.array([v for v in values if math.isfinite(v)])
    out = {"mean": float(finite.mean())}
    out.update({f"p{p}": float(np.percentile(finite, p)) for p in PERCENTILES})
    return out


def run_vidur(args: argparse.Namespace, exported: Path, trace: Path, out_dir: Path) -> dict[str, dict[str, float]]:
    """Vidur on the exported tables; per-request TTFT, TPOT, E2E from its request_metrics.csv."""
    compute = exported / "data" / "profiling" / "compute" / args.device / args.vidur_model
    prefix = f"--{args.predictor}_execution_time_predictor_config_"
    command = [
        args.vidur_python, "-m", "vidur.main",
        "--replica_config_device", args.device,
        "--replica_config_model_name", args.vidur_model,
        "--cluster_config_num_replicas", "1",
        "--replica_config_tensor_parallel_size", "1",
        "--replica_config_num_pipeline_stages", "1",
        "--request_generator_config_type", "trace_replay",
        "--trace_request_generator_config_trace_file", str(trace),
        "--trace_request_generator_config_max_tokens", str(VIDUR_TRACE_MAX_TOKENS),
        "--replica_scheduler_config_type", "sarathi",
        "--sarathi_scheduler_config_chunk_size", str(CHUNK),
        "--sarathi_scheduler_config_batch_size_cap", str(BATCH_CAP),
        "--sarathi_scheduler_config_num_blocks", str(NUM_BLOCKS),
        "--sarathi_scheduler_config_block_size", str(BLOCK_SIZE),
        *vidur_predictor_flags(args.predictor, max_tokens=MAX_SEQ_LEN, max_batch_size=BATCH_CAP, max_chunk=CHUNK),
        prefix + "compute_input_file", str(compute / "mlp.csv"),
        prefix + "attention_input_file", str(compute / "attention.csv"),
        prefix + "num_training_job_threads", str(args.jobs),
        "--metrics_config_output_dir", str(out_dir),
        "--metrics_config_cache_dir", str(out_dir / "cache"),
        "--no-metrics_config_store_plots",
        "--no-metrics_config_enable_chrome_trace",
    ]
    logger.info("running Vidur on %s", trace.name)
    subprocess.run(command, cwd=args.vidur, check=True, timeout=RUN_TIMEOUT_S, stdout=subprocess.DEVNULL)
    metrics = sorted(out_dir.rglob("request_metrics.csv"))[-1]
    ttft, tpot, e2e = [], [], []
    with metrics.open(newline="") as handle:
        for row in csv.DictReader(handle):
            first, total = float(row["prefill_e2e_time"]), float(row["request_e2e_time"])
            decode_tokens = int(float(row["request_num_decode_tokens"]))
            ttft.append(first)
            e2e.append(total)
            tpot.append((total - first) / (decode_tokens - 1) if decode_tokens > 1 else math.nan)
    return {"ttft": _stats(ttft), "tpot": _stats(tpot), "e2e": _stats(e2e)}


def run_dooly(args: argparse.Namespace, trace: Path) -> dict[str, dict[str, float]]:
    command = [
        sys.executable, "-m", "dooly.cli", "simulate", args.model, "--store", args.store, "--platform", args.platform,
        "--backend", args.backend, "--engine", "transformers", "--trace", str(trace),
        "--set", f"max_batch_tokens={CHUNK}", "--set", f"max_requests_per_batch={BATCH_CAP}",
        "--set", f"num_blocks={NUM_BLOCKS}", "--set", f"block_size={BLOCK_SIZE}", "--set", "use_cuda_graph=false",
        "--set", f"q_padding_interval_size={NO_PADDING}", "--set", f"kv_padding_interval_size={NO_PADDING}",
        "--output", "json",
    ]
    logger.info("running dooly simulate on %s", trace.name)
    result = subprocess.run(command, check=True, timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
    summary = json.loads(result.stdout)
    return {key: {s: summary[f"{key}_s"][s] for s in ("mean", "p50", "p90")} for key in ("ttft", "tpot", "e2e")}


def export(args: argparse.Namespace, out: Path) -> None:
    command = [
        sys.executable, "-m", "dooly.cli", "export", "vidur", args.model, "--device", args.device, "--out", str(out),
        "--vidur-model", args.vidur_model, "--store", args.store, "--platform", args.platform, "--backend", args.backend,
        "--max-tokens", str(MAX_SEQ_LEN), "--max-seq-len", str(MAX_SEQ_LEN), "--max-batch-size", str(BATCH_CAP),
    ]
    logger.info("exporting %s for Vidur", args.model)
    subprocess.run(command, check=True, timeout=RUN_TIMEOUT_S, stdout=subprocess.DEVNULL)


def table(results: dict[str, tuple[dict, dict]]) -> str:
    lines = ["| load | metric | stat | Vidur (ms) | dooly simulate (ms) | Vidur vs Dooly |", "|---|---|---|---:|---:|---:|"]
    for load, (vidur, dooly) in results.items():
        for metric in ("ttft", "tpot", "e2e"):
            for stat in ("mean", "p50", "p90"):
                v, d = vidur[metric][stat], dooly[metric][stat]
                diff = f"{100 * (v - d) / d:+.1f}%" if d else "-"
                lines.append(f"| {load} | {metric.upper()} | {stat} | {v * MS_PER_S:.1f} | {d * MS_PER_S:.1f} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("vidur", type=Path, help="Vidur checkout (github.com/microsoft/vidur, main).")
    parser.add_argument("--vidur-python", default=sys.executable, help="A Python that imports Vidur's requirements.")
    parser.add_argument("--store", required=True)
    parser.add_argument("--platform", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--vidur-model", default=DEFAULT_VIDUR_MODEL)
    parser.add_argument("--device", default=DEFAULT_DEVICE)
    parser.add_argument("--predictor", default="random_forrest", choices=("random_forrest", "linear_regression"))
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    parser.add_argument("--load", action="append", help=f"NAME=RATE requests/s [default: {' '.join(DEFAULT_LOADS)}]")
    parser.add_argument("--prompt-len", default=DEFAULT_PROMPT)
    parser.add_argument("--output-len", default=DEFAULT_OUTPUT)
    parser.add_argument("--jobs", type=int, default=1, help="Vidur's training threads.")
    parser.add_argument("--work", type=Path, help="Scratch directory [default: a temporary one].")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="vidur-dropin-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    export(args, work / "export")
    results = {}
    for load in args.load or DEFAULT_LOADS:
        name, rate = load.split("=")
        trace = write_trace(work / f"{name}.csv", float(rate), args.requests, args.prompt_len, args.output_len)
        results[f"{name} ({rate} req/s)"] = (run_vidur(args, work / "export", trace, work / f"vidur-{name}"),
                                            run_dooly(args, trace))
    print(f"{args.model} on {args.platform} ({args.backend}); Vidur predictor {args.predictor}; "
          f"{args.requests} requests, prompts {args.prompt_len}, outputs {args.output_len}; "
          f"chunk {CHUNK}, batch cap {BATCH_CAP}, {NUM_BLOCKS} blocks of {BLOCK_SIZE}")
    print(table(results))


if __name__ == "__main__":
    main()
