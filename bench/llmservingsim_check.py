"""Check `dooly export llmservingsim` with LLMServingSim's own loader and lookups.

LLMServingSim's full run needs its ASTRA-sim backend compiled (C++, the astra-sim submodule and
chakra; scripts/compile.sh), which this CPU machine does not build in reasonable time. Its GPU
pricing, though, is plain Python: `serving/core/trace_generator._load_perf_db` reads the bundle and
`_lookup_dense`, `_lookup_per_sequence` and `_lookup_attention` price each layer of an iteration.
This script exports MODEL into a checkout (given as an argument, never committed), runs that loader
in a Python that can import it (pandas, pyyaml, rich), prices iterations layer by layer in the
order of the model's architecture catalog, and prints them beside `dooly`'s step prediction for
the same batch, on grid points and between them (where LLMServingSim interpolates linearly).

    python bench/llmservingsim_check.py /work/scratch/llmss --sim-python /work/scratch/vidur-venv/bin/python \
        --store /work/fitted/h100 --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa'
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("llmservingsim_check")

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B"
DEFAULT_HARDWARE = "H100"
MS_PER_S = 1e3
NS_PER_S = 1e9
RUN_TIMEOUT_S = 1800
# Batches (prefill chunk, its cached context, decodes, their context): grid points and between.
BATCHES = [
    (512, 0, 0, 0), (2048, 0, 0, 0), (384, 1000, 0, 0),
    (0, 0, 1, 1024), (0, 0, 32, 2048), (0, 0, 48, 1500), (0, 0, 128, 512),
    (256, 512, 16, 1024), (300, 700, 24, 900),
]

# Runs inside LLMServingSim's serving/ directory with its Python: its loader, its lookups.
_PRICE = r"""
import json, sys
sys.path.insert(0, "..")
import serving.core.trace_generator as tg
hardware, model, variant, model_type, layers, batches = json.loads(sys.argv[1])
db = tg._load_perf_db(hardware, model, variant, {1}, model_type)
seq = db["architecture"]["sequence"]
out = []
for chunk, kv_prefill, n_decode, kv_decode in batches:
    tokens = chunk + n_decode
    sequences = (1 if chunk else 0) + n_decode
    def price(name):
        cat = next(c for c in ("per_sequence", "attention", "moe", "dense") if tg._catalog_has(db, c, name))
        if cat == "per_sequence":
            return tg._lookup_per_sequence(db, name, 1, sequences)
        if cat == "attention":
            return tg._lookup_attention(db, 1, chunk, kv_prefill, n_decode, kv_decode)
        return tg._lookup_dense(db, name, 1, tokens)
    per_layer = sum(price(n) for part in ("pre_attn", "post_attn", "mlp_dense") for n in seq[part])
    once = sum(price(n) for part in ("prologue", "head") for n in seq[part])
    out.append(layers * per_layer + once)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", type=Path, help="LLMServingSim checkout (serving/, profiler/models/, configs/).")
    parser.add_argument("--sim-python", default=sys.executable, help="A Python with pandas, pyyaml and rich.")
    parser.add_argument("--store", required=True)
    parser.add_argument("--platform", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--hardware", default=DEFAULT_HARDWARE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from dooly.fit.source import FittedSource, open_fitted_step
    from dooly.models.registry import resolve_model

    source = ["--store", args.store, "--platform", args.platform, "--backend", args.backend]
    logger.info("exporting %s into %s", args.model, args.checkout)
    subprocess.run([sys.executable, "-m", "dooly.cli", "export", "llmservingsim", args.model, "--hardware", args.hardware,
                    "--out", str(args.checkout), *source], check=True, timeout=RUN_TIMEOUT_S, stdout=subprocess.DEVNULL)
    spec = resolve_model(args.model)
    payload = [args.hardware, spec.model_id, "bf16", spec.config["model_type"], int(spec.config["num_hidden_layers"]), BATCHES]
    result = subprocess.run([args.sim_python, "-c", _PRICE, json.dumps(payload)], cwd=args.checkout / "serving",
                            check=True, timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
    simulated_ns = json.loads(result.stdout.strip().splitlines()[-1])
    step = open_fitted_step(FittedSource(store=args.store, platform=args.platform, backend=args.backend), args.model).step
    print(f"{spec.model_id} on {args.platform} ({args.backend}): one iteration, LLMServingSim's loader vs dooly")
    print("| prefill chunk | its context | decodes | their context | LLMServingSim (ms) | dooly (ms) | diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for (chunk, kv_prefill, n_decode, kv_decode), ns in zip(BATCHES, simulated_ns, strict=True):
        dooly_s = step.step_seconds([(chunk, kv_prefill)] if chunk else [], [kv_decode] * n_decode)
        sim_s = ns / NS_PER_S
        print(f"| {chunk} | {kv_prefill} | {n_decode} | {kv_decode} | {sim_s * MS_PER_S:.2f} | {dooly_s * MS_PER_S:.2f} | "
              f"{100 * (sim_s - dooly_s) / dooly_s:+.1f}% |")


if __name__ == "__main__":
    main()
