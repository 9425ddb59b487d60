"""Synthetic latency databases from known analytic laws, for tests and benchmarks of the fit.

The laws are roofline-shaped (launch overhead + FLOPs at a peak rate + bytes at a bandwidth),
with log-normal noise, so the true latency of any shape is known: a test can check both that a
measured signature is reproduced and that a never-profiled one (a new hidden size) is predicted
within a tolerance. Rows carry every SHARD_SCHEMA column, like the profiler's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from dooly import SCHEMA_VERSION, __version__
from dooly.fit.features import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, aggregates_from_seqs, attention_field

PLATFORM = "Synthetic-GPU-80GB"
ENGINE = "transformers"
BACKEND = "paged|sdpa"
DTYPE = "bfloat16"
ATTENTION_CLASS = f"attention:{BACKEND}"
MM = "aten.mm.default"
MUL = "aten.mul.Tensor"
SILU = "aten.silu.default"

# The "hardware": launch overhead, peak FLOP rate, memory bandwidth, bytes per element.
LAUNCH_S = 5e-6
FLOPS_PER_S = 4e14
BYTES_PER_S = 2e12
ELEMENT_BYTES = 2
PER_SEQ_S = 2e-7
MM_TILE_ROWS = 64
DECODE_BANDWIDTH_SHARE = 0.6
NOISE_SIGMA = 0.01

T_GRID = tuple(sorted({2**i for i in range(13)} | {3 * 2**i for i in range(11)}))
B_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class ToyModel:
    model_id: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int


TOY_MODELS = (
    ToyModel("toy/alpha-1b", 1024, 4096, 8, 8, 128, 32000, 4),
    ToyModel("toy/beta-3b", 2048, 8192, 16, 8, 128, 32000, 4),
    ToyModel("toy/gamma-7b", 4096, 11008, 32, 8, 128, 32000, 4),
    ToyModel("toy/delta-2b", 1536, 6144, 12, 4, 128, 50000, 4),
)
# Never profiled: every one of its signatures is unseen.
UNSEEN_MODEL = ToyModel("toy/omega-5b", 3072, 9216, 24, 8, 128, 32000, 4)


def mm_seconds(m: np.ndarray, k: float, n: float) -> np.ndarray:
    """Roofline with tile quantisation: rows are computed in tiles of MM_TILE_ROWS, and the
    kernel is bound by whichever of compute and memory is slower (not linear in the features)."""
    tiled = np.ceil(m / MM_TILE_ROWS) * MM_TILE_ROWS
    flops = 2.0 * tiled * k * n
    moved = ELEMENT_BYTES * (m * k + k * n + m * n)
    return LAUNCH_S + np.maximum(flops / FLOPS_PER_S, moved / BYTES_PER_S)


def elementwise_seconds(elements: np.ndarray, inputs: int) -> np.ndarray:
    return LAUNCH_S + ELEMENT_BYTES * (inputs + 1) * elements / BYTES_PER_S


def attention_seconds(
    seqs_per_point: Sequence[Sequence[Sequence[int]]], heads: int, kv_heads: int, head_dim: int
) -> np.ndarray:
    """Causal attention work plus KV reads; decode-only batches take another kernel path that
    reaches a lower share of the bandwidth (a regime change, as real attention kernels have)."""
    agg = aggregates_from_seqs(seqs_per_point, 0)
    flops = 4.0 * agg["attn_pairs"] * heads * head_dim
    moved = ELEMENT_BYTES * (2.0 * agg["K"] * kv_heads * head_dim + 2.0 * agg["T"] * heads * head_dim)
    decode_only = agg["D"] >= agg["B"]
    bandwidth = np.where(decode_only, DECODE_BANDWIDTH_SHARE * BYTES_PER_S, BYTES_PER_S)
    return LAUNCH_S + PER_SEQ_S * agg["B"] + flops / FLOPS_PER_S + moved / bandwidth


def attention_points() -> list[list[list[int]]]:
    """Prefill-only, decode-only and mixed batches, as the profiler sweeps them."""
    points: list[list[list[int]]] = []
    for q in (16, 64, 256, 1024):
        for ctx in (0, 256, 1024):
            points.append([[q, ctx]])
            points.append([[q, ctx], [q // 2, ctx * 2]])
    for b in (1, 2, 4, 8, 16, 32, 64):
        for ctx in (128, 512, 1024, 4096):
            # Non-uniform contexts around the nominal one, as a serving batch has.
            points.append([[1, max(1, ctx // 2 + (ctx * i) // max(b - 1, 1))] for i in range(b)])
    for q in (64, 512):
        for chunk_ctx in (0, 1024):
            for b in (4, 32):
                points.append([[q, chunk_ctx]] + [[1, 350 + 20 * i] for i in range(b)])
    return points


def attention_config(model: ToyModel) -> dict[str, int]:
    """Config dims as the tracer records them: by position of query [1, H, T, d], key and value
    [1, Hkv, K, d] (the engine's attention call), request dims left out."""
    dims = {"in0.0": 1, "in0.1": model.heads, "in0.3": model.head_dim}
    for i in (1, 2):
        dims.update({f"in{i}.0": 1, f"in{i}.1": model.kv_heads, f"in{i}.3": model.head_dim})
    return dims


def signature_of(op: str, config: dict[str, int], request_vars: Sequence[str]) -> str:
    payload = json.dumps([op, BACKEND, DTYPE, sorted(config.items()), list(request_vars)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def model_operations(model: ToyModel) -> list[dict[str, Any]]:
    """A toy model's inventory operations: projections, MLP, norms, attention, lm_head."""
    h, i, kvw = model.hidden, model.intermediate, model.kv_heads * model.head_dim
    ops: list[tuple[str, str, dict[str, int], list[str], int]] = [
        (MM, MM, {"in0.1": h, "in1.0": h, "in1.1": h}, ["T"], 2 * model.layers),
        (MM, MM, {"in0.1": h, "in1.0": h, "in1.1": 2 * kvw}, ["T"], model.layers),
        (MM, MM, {"in0.1": h, "in1.0": h, "in1.1": 2 * i}, ["T"], model.layers),
        (MM, MM, {"in0.1": i, "in1.0": i, "in1.1": h}, ["T"], model.layers),
        (MM, MM, {"in0.1": h, "in1.0": h, "in1.1": model.vocab}, ["B"], 1),
        (MUL, MUL, {"in0.1": h, "in1.0": h}, ["T"], 2 * model.layers + 1),
        (SILU, SILU, {"in0.1": i}, ["T"], model.layers),
        (
            "attention",
            ATTENTION_CLASS,
            attention_config(model),
            ["T", "B", "K"],
            model.layers,
        ),
    ]
    return [
        {
            "signature": signature_of(op, config, request_vars),
            "op": op,
            "op_class": op_class,
            "config_dims": config,
            "request_vars": request_vars,
            "count": count,
        }
        for op, op_class, config, request_vars, count in ops
    ]


def inventory(model: ToyModel) -> dict[str, Any]:
    """The inventory document the profiler writes for a model (inventories/<key>/<backend>.json)."""
    return {
        "model_id": model.model_id,
        "model_key": model_key(model),
        "backend": BACKEND,
        "dtype": DTYPE,
        "operations": model_operations(model),
    }


def model_key(model: ToyModel) -> str:
    return hashlib.sha256(model.model_id.encode()).hexdigest()[:16]


def inventory_store_key(model: ToyModel) -> str:
    """Where the profiler would write the inventory of `model` in a store."""
    from dooly.store.keys import escape_value

    return f"inventories/{model_key(model)}/{escape_value(BACKEND)}.json"


def true_seconds(operation: dict[str, Any], request: dict[str, Any]) -> np.ndarray:
    """The law behind an operation: `request` holds T and B arrays, or `seqs` for attention."""
    cfg = operation["config_dims"]
    if operation["op"] == MM:
        var = operation["request_vars"][0]
        return mm_seconds(np.asarray(request[var], dtype=np.float64), cfg["in0.1"], cfg["in1.1"])
    if operation["op"] == MUL:
        return elementwise_seconds(np.asarray(request["T"], dtype=np.float64) * cfg["in0.1"], 2)
    if operation["op"] == SILU:
        return elementwise_seconds(np.asarray(request["T"], dtype=np.float64) * cfg["in0.1"], 1)
    heads = attention_field(cfg, NUM_HEADS)
    kv_heads = attention_field(cfg, NUM_KV_HEADS)
    head_dim = attention_field(cfg, HEAD_DIM)
    if heads is None or kv_heads is None or head_dim is None:
        raise ValueError(f"{operation['signature']}: attention config lacks heads, kv heads or head_dim")
    return attention_seconds(request["seqs"], heads, kv_heads, head_dim)


def snapshot_rows(
    models: Sequence[ToyModel] = TOY_MODELS, *, seed: int = 0, platform: str = PLATFORM
) -> list[dict[str, Any]]:
    """Rows for every distinct signature of `models`, measured with noise on its grid."""
    rng = np.random.default_rng(seed)
    created = datetime(2025, 1, 1, tzinfo=UTC)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for model in models:
        for operation in model_operations(model):
            if operation["signature"] in seen:
                continue
            seen.add(operation["signature"])
            rows += _operation_rows(operation, rng, created, platform)
    return rows


def _operation_rows(
    operation: dict[str, Any], rng: np.random.Generator, created: datetime, platform: str
) -> list[dict[str, Any]]:
    if operation["op"] == "attention":
        seqs = attention_points()
        agg = aggregates_from_seqs(seqs, 0)
        request: dict[str, Any] = {"seqs": seqs}
        points = [
            {
                "T": int(agg["T"][j]),
                "B": int(agg["B"][j]),
                "K": int(agg["K"][j]),
                "D": int(agg["D"][j]),
                "key": {"seqs": s},
            }
            for j, s in enumerate(seqs)
        ]
    else:
        var = operation["request_vars"][0]
        grid = T_GRID if var == "T" else B_GRID
        request = {var: np.array(grid)}
        points = [
            {"T": v if var == "T" else 0, "B": v if var == "B" else 0, "K": 0, "D": 0, "key": {var: v}}
            for v in grid
        ]
    truth = true_seconds(operation, request)
    measured = truth * np.exp(rng.normal(0.0, NOISE_SIGMA, size=len(truth)))
    rows = []
    for point, seconds in zip(points, measured, strict=True):
        rows.append(
            {
                "signature": operation["signature"],
                "op": operation["op"],
                "op_class": operation["op_class"],
                "signature_json": json.dumps(
                    {"op": operation["op"], "config": operation["config_dims"]}, sort_keys=True
                ),
                "config_dims": json.dumps(operation["config_dims"], sort_keys=True),
                "request_vars": json.dumps(operation["request_vars"]),
                "phase": "any",
                "T": point["T"],
                "B": point["B"],
                "K": point["K"],
                "D": point["D"],
                "point_key": json.dumps(point["key"], sort_keys=True, separators=(",", ":")),
                "latency_median_s": float(seconds),
                "latency_p10_s": float(seconds) * (1 - NOISE_SIGMA),
                "latency_p90_s": float(seconds) * (1 + NOISE_SIGMA),
                "latency_mean_s": float(seconds),
                "n_samples": 20,
                "status": "ok",
                "device_seconds": float(seconds) * 30,
                "platform": platform,
                "device_type": "cuda",
                "engine": ENGINE,
                "engine_version": "5.17.0",
                "backend": BACKEND,
                "dtype": DTYPE,
                "kv_dtype": DTYPE,
                "block_size": 32,
                "torch_version": "2.11.0",
                "cuda_version": "13.0",
                "driver_version": "580.0",
                "image_digest": "",
                "dooly_version": __version__,
                "schema_version": SCHEMA_VERSION,
                "run_id": "synthetic",
                "hostname": "synthetic",
                "created_at": created,
            }
        )
    return rows


def snapshot_table(models: Sequence[ToyModel] = TOY_MODELS, *, seed: int = 0, platform: str = PLATFORM):
    """The rows as a pyarrow Table with SHARD_SCHEMA (what a shard or snapshot holds)."""
    import pyarrow as pa

    from dooly.store.schema import SHARD_SCHEMA

    return pa.Table.from_pylist(snapshot_rows(models, seed=seed, platform=platform), schema=SHARD_SCHEMA)


def snapshot_frame(models: Sequence[ToyModel] = TOY_MODELS, *, seed: int = 0, platform: str = PLATFORM):
    """The rows as a polars DataFrame (what `read_snapshot` returns)."""
    import polars as pl

    return pl.from_arrow(snapshot_table(models, seed=seed, platform=platform))
