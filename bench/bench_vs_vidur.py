"""Benchmark: `dooly simulate` against Vidur's warm run on the same 2000-request trace (issue #25).

A planner's loop runs many simulations, so what counts is the whole process, start-up included.
Each side replays one seeded Poisson trace (Vidur's CSV format: arrived_at, num_prefill_tokens,
num_decode_tokens). Timed pair by pair, interleaved, so a busy shared machine slows both alike:
  - dooly fitted:   `dooly simulate MODEL --store DB ...` as a fresh process
  - dooly analytic: `dooly simulate MODEL --analytic` as a fresh process
  - vidur:          Vidur's own `main()` as a fresh process (a driver that also times its event
                    loop, `Simulator.run`), on Dooly's exported CSVs with a warm model cache
The dooly package is byte-compiled first, as an installed copy is. The event loop is timed inside each process (Dooly: `simulation_wall_s`; Vidur: `Simulator.run`).
Medians over --runs, and ratios of medians. Targets: whole process >= 10x faster than Vidur,
event loop >= 20x, analytic no slower than fitted.

Vidur is optional (`--vidur CHECKOUT --vidur-python VENV/bin/python --vidur-profiles DIR`, DIR
holding the exported mlp.csv and attention.csv); `--vidur-cache DIR` is its model cache (its
first run trains the random forests: a warm-up run, never timed, fills it).

    python bench/bench_vs_vidur.py --store DB --platform NVIDIA-H100-80GB-HBM3
    python bench/bench_vs_vidur.py --store DB --platform NVIDIA-H100-80GB-HBM3 \
        --vidur ~/vidur --vidur-python ~/vidur-venv/bin/python \
        --vidur-profiles EXPORT/data/profiling/compute/h100/meta-llama/Meta-Llama-3-8B --vidur-cache CACHE
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WHOLE_PROCESS_TARGET = 10.0
EVENT_LOOP_TARGET = 20.0
RATE_RPS = 4.0
PROMPT_RANGE = (64, 2048)
OUTPUT_RANGE = (16, 512)
SEED = 0
# Vidur's settings of the drop-in comparison (docs/simulate.md): its model name for Llama-3.1-8B's
# shapes, Sarathi with a 512-token chunk, and its random forest narrowed to one grid point.
VIDUR_MODEL = "meta-llama/Meta-Llama-3-8B"
VIDUR_DEVICE = "h100"
VIDUR_MAX_TOKENS = 4096
VIDUR_ARGS = [
    "--replica_scheduler_config_type", "sarathi",
    "--sarathi_scheduler_config_batch_size_cap", "64",
    "--sarathi_scheduler_config_chunk_size", "512",
    "--sarathi_scheduler_config_num_blocks", "20000",
    "--request_generator_config_type", "trace_replay",
    "--trace_request_generator_config_max_tokens", str(VIDUR_MAX_TOKENS),
    "--execution_time_predictor_config_type", "random_forrest",
    "--random_forrest_execution_time_predictor_config_k_fold_cv_splits", "2",
    "--random_forrest_execution_time_predictor_config_num_estimators", "100",
    "--random_forrest_execution_time_predictor_config_max_depth", "32",
    "--random_forrest_execution_time_predictor_config_min_samples_split", "2",
    "--random_forrest_execution_time_predictor_config_skip_cpu_overhead_modeling",
    "--random_forrest_execution_time_predictor_config_attention_decode_batching_overhead_fraction", "0",
    "--random_forrest_execution_time_predictor_config_attention_prefill_batching_overhead_fraction", "0",
    "--no-metrics_config_store_plots",
]
# Runs Vidur's main() as its CLI does, timing the event loop apart (Vidur also prints, so the
# driver's line carries a marker).
LOOP_MARKER = "dooly-bench-vidur-loop-s"
VIDUR_DRIVER = """
import time
from vidur.config import SimulationConfig
from vidur.simulator import Simulator
from vidur.utils.random import set_seeds
config = SimulationConfig.create_from_cli_args()
set_seeds(config.seed)
simulator = Simulator(config)
start = time.perf_counter()
simulator.run()
print(LOOP_MARKER, time.perf_counter() - start, flush=True)
""".replace("LOOP_MARKER", repr(LOOP_MARKER))


def write_trace(path: Path, requests: int) -> None:
    """A seeded Poisson trace in Vidur's format, so both simulators replay the same requests."""
    rng = random.Random(SEED)
    arrived = 0.0
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    for _ in range(requests):
        arrived += rng.expovariate(RATE_RPS)
        lines.append(f"{arrived:.6f},{rng.randint(*PROMPT_RANGE)},{rng.randint(*OUTPUT_RANGE)}")
    path.write_text("\n".join(lines) + "\n")


def timed(command: list[str], cwd: str | None = None) -> tuple[float, str]:
    """Wall seconds of a whole process and its stdout (a failure stops the benchmark)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return wall, done.stdout


def compile_dooly() -> None:
    """Byte-compile the dooly package once, as installing it does: where PYTHONDONTWRITEBYTECODE
    is set (as on the shared machines) a source checkout would otherwise recompile its modules in
    every fresh process, a cost no installed copy pays."""
    import dooly

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(dooly.__file__).parent)], check=True)


def dooly_run(args: argparse.Namespace, trace: Path, analytic: bool) -> tuple[float, float]:
    """(whole process s, event loop s) of one `dooly simulate`."""
    step = ["--analytic"] if analytic else ["--store", args.store, "--platform", args.platform, "--backend", args.backend]
    command = [sys.executable, "-m", "dooly.cli", "simulate", args.model, *step, "--trace", str(trace), "--output", "json"]
    wall, out = timed(command)
    return wall, float(json.loads(out)["simulation_wall_s"])


def vidur_run(args: argparse.Namespace, trace: Path, out_dir: Path) -> tuple[float, float]:
    """(whole process s, event loop s) of one Vidur run on the exported CSVs."""
    profiles = Path(args.vidur_profiles)
    command = [
        args.vidur_python, "-c", VIDUR_DRIVER,
        "--replica_config_device", VIDUR_DEVICE, "--replica_config_model_name", VIDUR_MODEL,
        "--trace_request_generator_config_trace_file", str(trace),
        "--random_forrest_execution_time_predictor_config_compute_input_file", str(profiles / "mlp.csv"),
        "--random_forrest_execution_time_predictor_config_attention_input_file", str(profiles / "attention.csv"),
        "--metrics_config_output_dir", str(out_dir), "--metrics_config_cache_dir", args.vidur_cache,
        *VIDUR_ARGS,
    ]
    wall, out = timed(command, cwd=args.vidur)
    loop = next(line.split()[1] for line in out.splitlines() if line.startswith(LOOP_MARKER))
    return wall, float(loop)


def _median(samples: list[tuple[float, float]], index: int) -> float:
    return statistics.median(sample[index] for sample in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="fitted latency database (`dooly fit`)")
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    parser.add_argument("--platform", required=True)
    parser.add_argument("--backend", default="paged|sdpa")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vidur", help="Vidur checkout (GitHub main); without it only Dooly runs")
    parser.add_argument("--vidur-python", help="python of Vidur's environment")
    parser.add_argument("--vidur-profiles", help="folder with Dooly's exported mlp.csv and attention.csv")
    parser.add_argument("--vidur-cache", help="Vidur's model cache folder (warm: trained forests)")
    args = parser.parse_args()
    with_vidur = bool(args.vidur)
    if with_vidur and not (args.vidur_python and args.vidur_profiles and args.vidur_cache):
        parser.error("--vidur needs --vidur-python, --vidur-profiles and --vidur-cache")
    with tempfile.TemporaryDirectory(prefix="bench-vs-vidur-") as tmp:
        trace = Path(tmp) / "trace.csv"
        write_trace(trace, args.requests)
        compile_dooly()
        if with_vidur:
            vidur_run(args, trace, Path(tmp) / "vidur-warmup")  # fills the model cache; not timed
        fitted: list[tuple[float, float]] = []
        analytic: list[tuple[float, float]] = []
        vidur: list[tuple[float, float]] = []
        for run in range(args.runs):
            fitted.append(dooly_run(args, trace, analytic=False))
            analytic.append(dooly_run(args, trace, analytic=True))
            if with_vidur:
                vidur.append(vidur_run(args, trace, Path(tmp) / f"vidur-{run}"))
    print(f"{args.requests} requests, {args.runs} runs, medians (whole process / event loop, seconds)")
    print(f"  dooly fitted    {_median(fitted, 0):7.2f} / {_median(fitted, 1):6.3f}")
    print(f"  dooly analytic  {_median(analytic, 0):7.2f} / {_median(analytic, 1):6.3f}"
          f"   (analytic/fitted: {_median(analytic, 0) / _median(fitted, 0):.2f}x whole, "
          f"{_median(analytic, 1) / _median(fitted, 1):.2f}x loop)")
    if vidur:
        whole = _median(vidur, 0) / _median(fitted, 0)
        loop = _median(vidur, 1) / _median(fitted, 1)
        print(f"  vidur (warm)    {_median(vidur, 0):7.2f} / {_median(vidur, 1):6.3f}")
        print(f"  vidur/dooly: {whole:.1f}x whole process (target >= {WHOLE_PROCESS_TARGET:.0f}x), "
              f"{loop:.1f}x event loop (target >= {EVENT_LOOP_TARGET:.0f}x)")


if __name__ == "__main__":
    main()
