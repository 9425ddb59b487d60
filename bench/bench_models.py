"""How long resolving and building a bundled model config takes (the tracer pays it per model).

Prints, per bundled model, the median seconds of: resolve_model, build_hf_config, and building
the whole model on the meta device (what a parameter count or a trace starts from).
Run: .venv/bin/python bench/bench_models.py
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
from transformers import AutoModelForCausalLM

from dooly.models.registry import build_hf_config, bundled_model_ids, resolve_model

REPEATS = 5


def _median_seconds(action) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _meta_model(model_id: str) -> None:
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(build_hf_config(resolve_model(model_id)))


def main() -> None:
    print(f"{'model':42s} {'resolve ms':>10s} {'config ms':>10s} {'meta model ms':>14s}")
    for model_id in bundled_model_ids():
        spec = resolve_model(model_id)
        build_hf_config(spec)
        resolve_ms = 1e3 * _median_seconds(partial(resolve_model, model_id))
        config_ms = 1e3 * _median_seconds(partial(build_hf_config, spec))
        model_ms = 1e3 * _median_seconds(partial(_meta_model, model_id))
        print(f"{model_id:42s} {resolve_ms:10.2f} {config_ms:10.2f} {model_ms:14.1f}")


if __name__ == "__main__":
    main()
