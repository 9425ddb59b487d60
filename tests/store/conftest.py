"""Fixtures for the store tests: synthetic shard tables.

The S3 servers (moto, SeaweedFS), the AWS settings and the flaky proxy are fixtures of the root
tests/conftest.py, shared with the other test directories.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest

from dooly import SCHEMA_VERSION, __version__
from dooly.store.schema import SHARD_SCHEMA

DEFAULT_STACK: dict[str, Any] = {
    "platform": "NVIDIA-H100-80GB-HBM3",
    "device_type": "cuda",
    "engine": "transformers",
    "engine_version": "5.17.0",
    "backend": "paged|sdpa",
    "dtype": "bfloat16",
    "kv_dtype": "bfloat16",
    "block_size": 256,
    "torch_version": "2.11.0+cu130",
    "cuda_version": "13.0",
}
BASE_TIME = datetime(2026, 3, 1, tzinfo=UTC)


def signature_of(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()


def point_key_of(t: int, b: int = 1, k: int = 0, d: int = 0) -> str:
    return json.dumps({"B": b, "D": d, "K": k, "T": t}, sort_keys=True, separators=(",", ":"))


def make_shard_table(
    keys: Sequence[tuple[str, int]] = (("op-a", 1), ("op-a", 2), ("op-b", 1)),
    *,
    run_id: str = "run-a",
    **columns: Any,
) -> pa.Table:
    """A valid shard: one row per (signature name, T) in `keys`, on DEFAULT_STACK.

    Any column can be overridden with a scalar (every row) or a list (one value per row).
    """
    n = len(keys)
    base: dict[str, Any] = {
        "signature": [signature_of(name) for name, _ in keys],
        "op": "aten.mm",
        "op_class": "gemm",
        "signature_json": [json.dumps({"op": "aten.mm", "name": name}) for name, _ in keys],
        "config_dims": '{"hidden":4096}',
        "request_vars": '["T"]',
        "phase": "prefill",
        "T": [t for _, t in keys],
        "B": 1,
        "K": 0,
        "D": 0,
        "point_key": [point_key_of(t) for _, t in keys],
        "latency_median_s": [1e-4 * (i + 1) for i in range(n)],
        "latency_p10_s": [0.9e-4 * (i + 1) for i in range(n)],
        "latency_p90_s": [1.2e-4 * (i + 1) for i in range(n)],
        "latency_mean_s": [1.05e-4 * (i + 1) for i in range(n)],
        "n_samples": 10,
        "status": "ok",
        "device_seconds": 0.01,
        **DEFAULT_STACK,
        "driver_version": "580.65.06",
        "image_digest": "",
        "dooly_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "hostname": "test-host",
        "created_at": BASE_TIME,
        "error": None,
    }
    base.update(columns)
    data = {
        name: (value if isinstance(value, list) else [value] * n) for name, value in base.items()
    }
    return pa.table(data, schema=SHARD_SCHEMA)


@pytest.fixture
def shard_table():
    """The shard-table factory (see make_shard_table)."""
    return make_shard_table
