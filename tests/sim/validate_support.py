"""Synthetic `dooly bench` ground truth for the validate tests: the analytic simulation of a small
workload, written in the bench's schema, optionally stretched in time (a slower 'engine')."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MODEL = "meta-llama/Llama-3.1-8B"
NUM_REQUESTS = 12
RATE = 4.0
SEED = 3


def simulated_run(engine: str = "transformers") -> Any:
    """The analytic simulation of the test workload with the engine's default scheduler model."""
    from dooly.models.registry import resolve_model
    from dooly.sim.schedulers import make_scheduler
    from dooly.sim.simulator import simulate
    from dooly.sim.step_model import AnalyticStepModel, ModelDims
    from dooly.workload import LengthSpec, WorkloadSpec, generate_requests

    model = AnalyticStepModel(dims=ModelDims.from_config(resolve_model(MODEL).config))
    spec = WorkloadSpec(num_requests=NUM_REQUESTS, rate=RATE, prompt=LengthSpec("uniform", low=20, high=300),
                        output=LengthSpec("fixed", value=8), seed=SEED)
    return simulate(generate_requests(spec), make_scheduler(engine), model, record_token_times=True)


def write_truth(directory: Path, *, engine: str = "transformers", settings: dict[str, Any] | None = None,
                stretch: float = 1.0) -> Path:
    """A ground-truth directory (requests.parquet, engine.json when `settings` is given) whose every
    latency is the simulated one times `stretch` (token times stretched after each arrival)."""
    result = simulated_run(engine)
    records = result.requests
    times = [[r.arrival_s + stretch * (t - r.arrival_s) for t in result.token_times[r.request_id]] for r in records]
    table = pa.table({
        "request_id": [r.request_id for r in records],
        "arrived_at_s": [r.arrival_s for r in records],
        "first_token_s": [t[0] for t in times],
        "finished_s": [t[-1] for t in times],
        "prompt_tokens": [r.prompt_tokens for r in records],
        "output_tokens": [r.output_tokens for r in records],
        "token_times_s": times,
    })
    directory.mkdir(parents=True)
    pq.write_table(table, directory / "requests.parquet")
    if settings is not None:
        (directory / "engine.json").write_text(json.dumps(settings))
    return directory
