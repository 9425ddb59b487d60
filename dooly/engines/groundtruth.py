"""Ground truth of a real-engine run, as `dooly bench` writes it and `dooly validate` reads it.

Every engine adapter (transformers continuous batching, vLLM) produces the same records, so the
validation does not care which engine ran:

- one `RequestRecord` per request: when it arrived, its first and every token, its lengths;
- one `StepRecord` per engine step: the batch composition (prefill chunks as (query tokens,
  context before the chunk), decode sequences as their context), the step's wall time from the
  scheduler's start to the outputs being handled, and how that time splits (host preparation,
  forward as seen from the host, device busy span from CUDA events, output handling).

A directory holds `requests.parquet`, `steps.parquet`, `engine.json` (the engine settings, in the
names the simulator's scheduler model takes) and `bench.json` (provenance and summary). The files
appear together or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REQUESTS_FILE = "requests.parquet"
STEPS_FILE = "steps.parquet"
ENGINE_FILE = "engine.json"
BENCH_FILE = "bench.json"
GROUND_TRUTH_SCHEMA = "dooly.ground_truth/1"
# The transformers harness's warm-up: short requests served before the recorded ones (first-call
# costs land on them). They run on the same engine, so the CUDA graphs they capture are held when
# the recorded pass starts: bench.json records them (`warmup`) and `dooly validate` serves them
# first in the simulation too. Ground truth recorded before bench.json said so ran these defaults.
DEFAULT_WARMUP_REQUESTS = 4
WARMUP_PROMPT_TOKENS = 256
WARMUP_OUTPUT_TOKENS = 8


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    arrived_at_s: float
    first_token_s: float | None
    finished_s: float | None
    prompt_tokens: int
    output_tokens: int
    token_times_s: list[float] = field(default_factory=list)
    error: str = ""


@dataclass(slots=True)
class StepRecord:
    step: int
    start_s: float
    duration_s: float
    prefill: list[tuple[int, int]]
    decode_ctx: list[int]
    engine_path: str = ""
    cuda_graph: bool = False
    padded_tokens: int = 0
    prepare_s: float = 0.0
    forward_s: float = 0.0
    device_s: float | None = None
    update_s: float = 0.0
    # The engine captured a CUDA graph for this step's shape (a first-seen shape): a one-off cost.
    graph_captured: bool = False
    # Host seconds Python's garbage collector ran within the step (any thread: it holds the GIL),
    # None where the bench does not track it.
    gc_s: float | None = None


@dataclass
class BenchRun:
    """What an engine's bench runner returns: the records, and the engine settings in the names the
    simulator's scheduler model takes (engine.json)."""

    requests: list[RequestRecord]
    steps: list[StepRecord]
    engine_settings: dict[str, Any]
    engine_details: dict[str, Any] = field(default_factory=dict)


def requests_table(records: list[RequestRecord]) -> Any:
    import pyarrow as pa

    schema = pa.schema(
        [
            ("request_id", pa.string()),
            ("arrived_at_s", pa.float64()),
            ("first_token_s", pa.float64()),
            ("finished_s", pa.float64()),
            ("prompt_tokens", pa.int64()),
            ("output_tokens", pa.int64()),
            ("token_times_s", pa.list_(pa.float64())),
            ("error", pa.string()),
        ]
    )
    return pa.Table.from_pylist([asdict(r) for r in records], schema=schema)


def steps_table(records: list[StepRecord]) -> Any:
    import pyarrow as pa

    chunk = pa.struct([("q", pa.int64()), ("ctx", pa.int64())])
    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("start_s", pa.float64()),
            ("duration_s", pa.float64()),
            ("prefill", pa.list_(chunk)),
            ("decode_ctx", pa.list_(pa.int64())),
            ("engine_path", pa.string()),
            ("cuda_graph", pa.bool_()),
            ("padded_tokens", pa.int64()),
            ("prepare_s", pa.float64()),
            ("forward_s", pa.float64()),
            ("device_s", pa.float64()),
            ("update_s", pa.float64()),
            ("graph_captured", pa.bool_()),
            ("gc_s", pa.float64()),
        ]
    )
    rows = []
    for record in records:
        row = asdict(record)
        row["prefill"] = [{"q": q, "ctx": c} for q, c in record.prefill]
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


def write_ground_truth(
    out_dir: str | Path,
    requests: list[RequestRecord],
    steps: list[StepRecord],
    engine_settings: dict[str, Any],
    provenance: dict[str, Any],
) -> list[Path]:
    """Write the four files into `out_dir`; staged in a sibling temporary directory and moved in
    file by file, so a killed run leaves either the previous files or the new ones."""
    from dooly.parquetfile import write_compact

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dooly-bench-", dir=out))
    try:
        write_compact(requests_table(requests), staging / REQUESTS_FILE)
        write_compact(steps_table(steps), staging / STEPS_FILE)
        (staging / ENGINE_FILE).write_text(json.dumps(engine_settings, indent=2, sort_keys=True) + "\n")
        payload = {"schema": GROUND_TRUTH_SCHEMA, **provenance}
        (staging / BENCH_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        written = []
        for name in (REQUESTS_FILE, STEPS_FILE, ENGINE_FILE, BENCH_FILE):
            os.replace(staging / name, out / name)
            written.append(out / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summarize(requests: list[RequestRecord], steps: list[StepRecord]) -> dict[str, Any]:
    """Counts and medians a person reads first, to see that the run did what was asked."""
    import numpy as np

    done = [r for r in requests if r.first_token_s is not None and not r.error]
    ttft = [first - r.arrived_at_s for r in done if (first := r.first_token_s) is not None]
    tpot = [
        (r.token_times_s[-1] - r.token_times_s[0]) / (len(r.token_times_s) - 1)
        for r in done
        if len(r.token_times_s) >= 2
    ]
    return {
        "requests": len(requests),
        "finished": len(done),
        "failed": sum(1 for r in requests if r.error),
        "steps": len(steps),
        "ttft_p50_s": float(np.median(ttft)) if ttft else None,
        "tpot_p50_s": float(np.median(tpot)) if tpot else None,
        "step_p50_s": float(np.median([s.duration_s for s in steps])) if steps else None,
        "graph_captures": sum(1 for s in steps if s.graph_captured),
        "gc_s": sum(s.gc_s for s in steps if s.gc_s is not None),
    }
