"""The shard schema: one row per (signature, request point) measured on one software stack.

This is the contract between the profiler (writer), the merge job and the fitter (readers).
It uses pyarrow only, so the GPU image (no polars, no boto3) can write and read shards.
"""

from __future__ import annotations

import pyarrow as pa

from dooly import SCHEMA_VERSION

# Request variables every row carries as plain columns (0 where an op does not depend on one):
#   T: tokens in the step (query tokens, prefill + decode)   B: sequences in the step
#   K: KV tokens read by attention (sum of context + new)     D: decode sequences (query length 1)
REQUEST_COLUMNS = ("T", "B", "K", "D")

# Columns that identify the software stack a row was measured on. Two rows are comparable only if
# all of these agree; a store holding rows for another stack must not make the profiler skip work.
STACK_COLUMNS = (
    "platform",
    "device_type",
    "engine",
    "engine_version",
    "backend",
    "dtype",
    "kv_dtype",
    "block_size",
    "torch_version",
    "cuda_version",
)

# Columns added to SHARD_SCHEMA after shards were already written without them (the committed
# stores under data/ among them). A shard lacking one still reads and merges: readers take it as
# null on every row, so adding one needs no schema-version bump and no rewrite of old shards.
# Writers always write them.
OPTIONAL_COLUMNS = ("error",)

SHARD_SCHEMA = pa.schema(
    [
        # What was measured.
        pa.field("signature", pa.string(), nullable=False),  # 32 hex chars, stable across versions
        pa.field("op", pa.string(), nullable=False),  # aten op or engine op ("attention")
        pa.field("op_class", pa.string(), nullable=False),  # fit grouping key
        pa.field("signature_json", pa.string(), nullable=False),  # canonical readable signature
        pa.field("config_dims", pa.string(), nullable=False),  # JSON {name: int} config-fixed dims
        pa.field("request_vars", pa.string(), nullable=False),  # JSON list, e.g. ["T", "K"]
        pa.field("phase", pa.string(), nullable=False),  # prefill | decode | mixed | any
        pa.field("T", pa.int64(), nullable=False),
        pa.field("B", pa.int64(), nullable=False),
        pa.field("K", pa.int64(), nullable=False),
        pa.field("D", pa.int64(), nullable=False),
        pa.field("point_key", pa.string(), nullable=False),  # canonical JSON of the request point
        # How long it took.
        pa.field("latency_median_s", pa.float64(), nullable=True),
        pa.field("latency_p10_s", pa.float64(), nullable=True),
        pa.field("latency_p90_s", pa.float64(), nullable=True),
        pa.field("latency_mean_s", pa.float64(), nullable=True),
        pa.field("n_samples", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | oom | error
        pa.field("device_seconds", pa.float64(), nullable=False),  # spent measuring, warm-up included
        # Provenance.
        pa.field("platform", pa.string(), nullable=False),  # e.g. NVIDIA-H100-80GB-HBM3, CPU model
        pa.field("device_type", pa.string(), nullable=False),  # cuda | cpu
        pa.field("engine", pa.string(), nullable=False),  # transformers | vllm
        pa.field("engine_version", pa.string(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),  # attention backend, e.g. paged|sdpa
        pa.field("dtype", pa.string(), nullable=False),  # bfloat16, float32, ...
        pa.field("kv_dtype", pa.string(), nullable=False),
        pa.field("block_size", pa.int64(), nullable=False),
        pa.field("torch_version", pa.string(), nullable=False),
        pa.field("cuda_version", pa.string(), nullable=False),  # "" on CPU
        pa.field("driver_version", pa.string(), nullable=False),  # "" on CPU
        pa.field("image_digest", pa.string(), nullable=False),  # "" outside a container
        pa.field("dooly_version", pa.string(), nullable=False),
        pa.field("schema_version", pa.int64(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("hostname", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # Why the measurement failed: the exception's type and message (`measure.ERROR_CHARS` at
        # most) on a row of status `error`, null on every other row. Last and optional (see
        # OPTIONAL_COLUMNS).
        pa.field("error", pa.string(), nullable=True),
    ],
    metadata={"dooly.schema_version": str(SCHEMA_VERSION)},
)
