"""Export Dooly's predictions as Vidur profiling CSVs, so Vidur simulates on Dooly's database.

Vidur (github.com/microsoft/vidur, main branch) reads, per device and model,
`data/profiling/compute/{device}/{model}/mlp.csv` and `attention.csv`. Each row is one profiled
point: model-dimension key columns, the point's request variables, and for every timed operation
`time_stats.<op>.{min,max,mean,median,std}` in milliseconds for ONE layer (`emb` once per
forward). Vidur filters rows by the key columns (`n_head`, `n_kv_head`, `n_embd`,
`n_expanded_embd`, `vocab_size`, `use_gated_mlp`, `num_tensor_parallel_workers` in mlp.csv;
`n_embd`, `n_q_head`, `n_kv_head`, `block_size`, `num_tensor_parallel_workers` in attention.csv)
and fits its own regressors on the medians: compute ops on `num_tokens`; `attn_prefill` on
(`kv_cache_size`, `prefill_chunk_size`^2) over prefill rows (batch size 1); `attn_decode` on
(`batch_size`, `kv_cache_size`) over decode rows (`prefill_chunk_size` 0); `attn_kv_cache_save`
on the row's token count. Vidur's attention profiler times every stage of sarathi's attention
call on every row (a kineto timer around each stage), so a stage that launches no kernel at a
point records 0.0: `attn_decode` on prefill rows and `attn_prefill` on decode rows are 0.0, not
empty. Its `attention_backend` column holds the str() of sarathi's `AttentionBackend` enum
(`AttentionBackend.FLASHINFER`, the only value that runs attention; `NO_OP` skips it); Vidur does
not filter on it, and Dooly's own backend (`paged|sdpa`...) is written beside the tables in
`dooly_export.json` with the coverage of each file.

The exporter does not know where numbers come from: it calls a `VidurOpPredictor`, any callable
`(op, point) -> seconds for one layer` (or `OpStats`); the fitted predictor of `dooly fit` or
`analytic_op_predictor(AnalyticStepModel(...))` provide one.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dooly.errors import DoolyError
from dooly.sim.step_model import ModelDims

if TYPE_CHECKING:
    from dooly.sim.step_model import AnalyticStepModel

logger = logging.getLogger(__name__)

STAT_NAMES = ("min", "max", "mean", "median", "std")
MS_PER_S = 1e3

# Column order of Vidur's published mlp.csv (data/profiling/compute/a100/meta-llama/Meta-Llama-3-8B).
MLP_OPS = (
    "emb",
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
MLP_KEYS = (
    "n_head",
    "n_kv_head",
    "n_embd",
    "n_expanded_embd",
    "vocab_size",
    "use_gated_mlp",
    "num_tokens",
    "num_tensor_parallel_workers",
)
# Timers of Vidur's attention profiler (sarathi's attention wrapper) and its result keys.
ATTENTION_OPS = ("attn_input_reshape", "attn_kv_cache_save", "attn_prefill", "attn_decode", "attn_output_reshape")
ATTENTION_KEYS = (
    "n_embd",
    "n_q_head",
    "n_kv_head",
    "block_size",
    "num_tensor_parallel_workers",
    "max_model_len",
    "batch_size",
    "prefill_chunk_size",
    "kv_cache_size",
    "is_prefill",
    "attention_backend",
)

# Sweep grids, dense where latency bends (small sizes), sparse where it is linear.
DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_BATCH_SIZE = 128
DEFAULT_BLOCK_SIZE = 16
# sarathi.types.AttentionBackend as pandas writes it (str of the enum member) in Vidur's profiles.
VIDUR_ATTENTION_BACKEND = "AttentionBackend.FLASHINFER"
# What a Vidur attention stage that launched no kernel at a point records (ms).
NOT_RUN_MS = 0.0
EXPORT_INFO_FILE = "dooly_export.json"
_TOKEN_GRID = ((1, 8, 1), (8, 1024, 8), (1024, 4096, 32), (4096, 16384, 128), (16384, 131073, 1024))
_CHUNK_GRID = ((64, 1024, 32), (1024, 4096, 128), (4096, 65537, 512))
_CONTEXT_GRID = ((0, 1024, 32), (1024, 4096, 128), (4096, 131073, 1024))
_BATCH_GRID = ((1, 32, 1), (32, 128, 4), (128, 1025, 16))


@dataclass(frozen=True)
class VidurPoint:
    """A Vidur request point. mlp.csv rows set `num_tokens`; attention rows set `batch_size`,
    `prefill_chunk_size` (0 for decode), `kv_cache_size` (context before the chunk, or the decode
    context) and `is_prefill`, and `num_tokens` = max(prefill_chunk_size, batch_size)."""

    num_tokens: int
    batch_size: int = 1
    prefill_chunk_size: int = 0
    kv_cache_size: int = 0
    is_prefill: bool = False


@dataclass(frozen=True)
class OpStats:
    """Latency statistics of one operation, in seconds."""

    median: float
    min: float
    max: float
    mean: float
    std: float = 0.0


class VidurOpPredictor(Protocol):
    """Seconds one layer spends in Vidur operation `op` at `point` (a float: the median, or
    `OpStats`). Returning None or NaN leaves the cells empty."""

    def __call__(self, op: str, point: VidurPoint) -> float | OpStats | None: ...


@dataclass(frozen=True)
class VidurSweep:
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE

    def mlp_points(self) -> list[VidurPoint]:
        return [VidurPoint(num_tokens=t) for t in _grid(_TOKEN_GRID, 1, self.max_tokens)]

    def attention_points(self) -> list[VidurPoint]:
        points = []
        for chunk in _grid(_CHUNK_GRID, 1, self.max_seq_len):
            for ctx in range(0, self.max_seq_len - chunk + 1, chunk):
                points.append(VidurPoint(chunk, 1, chunk, ctx, True))
        for length in _grid(_CONTEXT_GRID, 1, self.max_seq_len):
            points.append(VidurPoint(length, 1, length, 0, True))
        contexts = _grid(_CONTEXT_GRID, 1, self.max_seq_len)
        for batch in _grid(_BATCH_GRID, 1, self.max_batch_size):
            for ctx in contexts:
                points.append(VidurPoint(batch, batch, 0, ctx, False))
        return sorted(set(points), key=lambda p: (not p.is_prefill, p.batch_size, p.prefill_chunk_size, p.kv_cache_size))


def _grid(ranges: tuple[tuple[int, int, int], ...], low: int, high: int) -> list[int]:
    values = sorted({v for start, stop, step in ranges for v in range(start, stop, step)} | {high})
    return [v for v in values if low <= v <= high]


def mlp_rows(predict: VidurOpPredictor, dims: ModelDims, sweep: VidurSweep, tp: int = 1) -> list[dict[str, object]]:
    keys = {
        "n_head": dims.num_heads,
        "n_kv_head": dims.num_kv_heads,
        "n_embd": dims.hidden_size,
        "n_expanded_embd": dims.intermediate_size,
        "vocab_size": dims.vocab_size,
        "use_gated_mlp": dims.gated_mlp,
        "num_tensor_parallel_workers": tp,
    }
    rows = []
    for point in sweep.mlp_points():
        row: dict[str, object] = {}
        for op in MLP_OPS:
            row.update(_stat_cells(op, predict(op, point)))
        row.update(keys, num_tokens=point.num_tokens)
        rows.append(row)
    return rows


def attention_rows(
    predict: VidurOpPredictor, dims: ModelDims, sweep: VidurSweep, block_size: int, backend: str, tp: int = 1
) -> list[dict[str, object]]:
    keys = {
        "n_embd": dims.hidden_size,
        "n_q_head": dims.num_heads,
        "n_kv_head": dims.num_kv_heads,
        "block_size": block_size,
        "num_tensor_parallel_workers": tp,
        "max_model_len": sweep.max_seq_len,
        "attention_backend": backend,
    }
    rows = []
    for point in sweep.attention_points():
        row: dict[str, object] = {}
        for op in ATTENTION_OPS:
            applies = not (op == "attn_prefill" and not point.is_prefill) and not (op == "attn_decode" and point.is_prefill)
            row.update(_stat_cells(op, predict(op, point) if applies else NOT_RUN_MS))
        row.update(
            keys,
            batch_size=point.batch_size,
            prefill_chunk_size=point.prefill_chunk_size,
            kv_cache_size=point.kv_cache_size,
            is_prefill=point.is_prefill,
        )
        rows.append(row)
    return rows


def mlp_columns() -> list[str]:
    return [f"time_stats.{op}.{s}" for op in MLP_OPS for s in STAT_NAMES] + list(MLP_KEYS)


def attention_columns() -> list[str]:
    return [f"time_stats.{op}.{s}" for op in ATTENTION_OPS for s in STAT_NAMES] + list(ATTENTION_KEYS)


def export_vidur(
    predict: VidurOpPredictor,
    dims: ModelDims,
    out_dir: str | Path,
    device: str,
    model_name: str,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = VIDUR_ATTENTION_BACKEND,
    sweep: VidurSweep | None = None,
    tp: int = 1,
) -> list[Path]:
    """Write mlp.csv and attention.csv under `out_dir/data/profiling/compute/{device}/{model_name}`.

    `dims` are the whole model's (Vidur's key columns); with `tp` > 1, `predict` answers for one
    rank and rows carry num_tensor_parallel_workers = tp. Both files appear whole or not at all
    (written to temporary names, then renamed)."""
    if not device or "/" in device:
        raise DoolyError(f"Vidur device name {device!r} must be one path segment, e.g. h100")
    if not model_name or model_name.startswith("/") or ".." in model_name.split("/"):
        raise DoolyError(f"Vidur model name {model_name!r} must look like org/name")
    sweep = sweep or VidurSweep()
    target = Path(out_dir) / "data" / "profiling" / "compute" / device / model_name
    tables = (
        ("mlp.csv", mlp_columns(), mlp_rows(predict, dims, sweep, tp)),
        ("attention.csv", attention_columns(), attention_rows(predict, dims, sweep, block_size, backend, tp)),
    )
    return write_csv_tables(target, tables)


def write_csv_tables(target: Path, tables: tuple[tuple[str, list[str], list[dict[str, object]]], ...]) -> list[Path]:
    """Write every table, then rename them into place: all appear or none."""
    target.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, columns, rows in tables:
            staged.append((_write_csv_temp(target, columns, rows), target / name))
        for temp, final in staged:
            os.replace(temp, final)
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
    written = [final for _, final in staged]
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def _write_csv_temp(directory: Path, columns: list[str], rows: Iterable[dict[str, object]]) -> Path:
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".dooly-", suffix=".csv", delete=False, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return Path(handle.name)


def _cell(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return value


def _stat_cells(op: str, value: float | OpStats | None) -> dict[str, float | None]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {f"time_stats.{op}.{s}": None for s in STAT_NAMES}
    if not isinstance(value, OpStats):
        seconds = float(value)
        value = OpStats(median=seconds, min=seconds, max=seconds, mean=seconds, std=0.0)
    cells = {}
    for stat in STAT_NAMES:
        seconds = getattr(value, stat)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise DoolyError(f"the predictor returned {seconds!r} s for {op} ({stat}); expected a finite value >= 0")
        cells[f"time_stats.{op}.{stat}"] = seconds * MS_PER_S
    return cells


# ---------------------------------------------------------------------------------------------
# Network profiles: data/profiling/network/{network_device}/all_reduce.csv (and send_recv.csv).
#
# Vidur's collective profiler writes one row per (collective, size): a pandas index column, then
# `time_stats.<collective>.{min,max,mean,median,std}` in milliseconds, then `rank, num_workers,
# size, collective, devices_per_node, max_devices_per_node`. `size` is in bytes; Vidur turns it
# into tokens as size / embedding_dim / 2 (2-byte elements) and fits the median on that. Its
# predictor keeps all_reduce rows with num_workers == devices_per_node == the TP degree, and
# send_recv rows with devices_per_node 2 (one host) or 1 (across hosts).

NETWORK_KEYS = ("rank", "num_workers", "size", "collective", "devices_per_node", "max_devices_per_node")
NETWORK_COLLECTIVES = ("all_reduce", "send_recv")
# Vidur converts sizes with 2 bytes per element (fp16/bf16) whatever the model's dtype.
VIDUR_BYTES_PER_ELEMENT = 2
SEND_RECV_WORKERS = 2


class FittedOps(Protocol):
    """What the compute export asks of a fitted step predictor (`dooly.fit.predictor.StepPredictor`,
    named structurally so the simulator's exporter does not import the fitting stage)."""

    def op_seconds(self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int]) -> list[dict[str, Any]]: ...


class FittedCollectives(Protocol):
    """What the network export asks of a fitted predictor (`dooly.fit.predictor.Predictor`)."""

    def predict_ops(self, signatures: Sequence[str], op_classes: Sequence[str], config_dims: Sequence[Mapping[str, int]],
                    request: Mapping[str, Any], *, request_vars: Sequence[Sequence[str]] | None = None,
                    ops: Sequence[str] | None = None) -> Any: ...


class VidurCollectivePredictor(Protocol):
    """Seconds one `collective` ("all_reduce", "send_recv") takes for `num_tokens` hidden-state
    rows (a float or `OpStats`); None when it was never measured."""

    def __call__(self, collective: str, num_tokens: int) -> float | OpStats | None: ...


def network_columns(collective: str) -> list[str]:
    return ["", *(f"time_stats.{collective}.{s}" for s in STAT_NAMES), *NETWORK_KEYS]


def network_rows(predict: VidurCollectivePredictor, collective: str, dims: ModelDims, sweep: VidurSweep,
                 num_workers: int, devices_per_node: int, max_devices_per_node: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for point in sweep.mlp_points():
        seconds = predict(collective, point.num_tokens)
        if seconds is None:
            continue
        row: dict[str, object] = {"": len(rows)}
        row.update(_stat_cells(collective, seconds))
        row.update(
            rank=0,
            num_workers=num_workers,
            size=point.num_tokens * dims.hidden_size * VIDUR_BYTES_PER_ELEMENT,
            collective=collective,
            devices_per_node=devices_per_node,
            max_devices_per_node=max_devices_per_node,
        )
        rows.append(row)
    return rows


def export_vidur_network(
    predict: VidurCollectivePredictor,
    dims: ModelDims,
    out_dir: str | Path,
    network_device: str,
    tp: int,
    *,
    max_devices_per_node: int | None = None,
    sweep: VidurSweep | None = None,
) -> list[Path]:
    """Write all_reduce.csv (TP degree `tp`) and, where `predict` knows it, send_recv.csv under
    `out_dir/data/profiling/network/{network_device}`, whole or not at all."""
    if not network_device or "/" in network_device:
        raise DoolyError(f"Vidur network device name {network_device!r} must be one path segment, e.g. h200_pair_nvlink")
    if tp < 2:
        raise DoolyError(f"an all_reduce profile needs a tensor-parallel degree >= 2, got {tp}")
    sweep = sweep or VidurSweep()
    most = max_devices_per_node or tp
    tables = []
    reduce_rows = network_rows(predict, "all_reduce", dims, sweep, tp, tp, most)
    if not reduce_rows:
        raise DoolyError(f"no all_reduce latency for {tp} ranks: profile a trace made with --tp {tp}, merge and fit")
    tables.append(("all_reduce.csv", network_columns("all_reduce"), reduce_rows))
    send_rows = network_rows(predict, "send_recv", dims, sweep, SEND_RECV_WORKERS, SEND_RECV_WORKERS, most)
    if send_rows:
        tables.append(("send_recv.csv", network_columns("send_recv"), send_rows))
    target = Path(out_dir) / "data" / "profiling" / "network" / network_device
    return write_csv_tables(target, tuple(tables))


def analytic_collective_seconds(model: AnalyticStepModel, collective: str, num_tokens: int) -> float:
    """The analytic model's ring estimate for `num_tokens` rows of the hidden state."""
    return model.collective_seconds(collective, num_tokens * model.dims.hidden_size)


def store_collective_predictor(predictor: FittedCollectives, inventory: dict[str, Any]) -> VidurCollectivePredictor:
    """Collective latencies from fitted models: the inventory's collective of each kind whose
    input is hidden-state rows (request variable T), evaluated at T = num_tokens."""
    import numpy as np

    found: dict[str, dict[str, Any]] = {}
    for entry in inventory.get("operations", []):
        op = str(entry.get("op", ""))
        if entry.get("kind") == "collective" and entry.get("request_vars") == ["T"]:
            found.setdefault(op.removeprefix("collective."), entry)

    def predict(collective: str, num_tokens: int) -> float | None:
        entry = found.get(collective)
        if entry is None:
            return None
        seconds = predictor.predict_ops(
            [entry["signature"]], [entry["op_class"]], [entry.get("config_dims", {})],
            {"T": np.array([num_tokens])}, request_vars=[["T"]], ops=[entry["op"]],
        )
        return float(seconds[0])

    return predict


# ---------------------------------------------------------------------------------------------
# Roofline per-op estimates from the analytic step model (tests and demos only). They live here,
# not on AnalyticStepModel, because the operations are Vidur's: the step model knows no exporter.
# ---------------------------------------------------------------------------------------------

ROPE_FLOPS_PER_ELEMENT = 6
ACT_FLOPS_PER_ELEMENT = 8
NORM_FLOPS_PER_ELEMENT = 5


def analytic_op_predictor(model: AnalyticStepModel) -> VidurOpPredictor:
    """The analytic model as the exporter's per-op predictor (no store needed)."""
    return functools.partial(analytic_op_seconds, model)


def analytic_op_seconds(model: AnalyticStepModel, op: str, point: VidurPoint) -> float:
    """Per-layer seconds of one Vidur operation at one Vidur request point: the larger of its
    compute and memory time on the analytic model's roofline, plus a launch."""
    d = model.dims
    b = model.bytes_per_param
    t = point.num_tokens
    q_width = d.num_heads * d.head_dim
    kv_width = d.num_kv_heads * d.head_dim
    h, inter = d.hidden_size, d.intermediate_size
    up_width = 2 * inter if d.gated_mlp else inter
    if op == "attn_prefill":
        chunk, ctx = point.prefill_chunk_size, point.kv_cache_size
        flops = 4 * q_width * chunk * (ctx + (chunk + 1) / 2)
        data = 2 * kv_width * (ctx + chunk) * b + 2 * q_width * chunk * b
    elif op == "attn_decode":
        seqs, ctx = point.batch_size, point.kv_cache_size
        flops = 4 * q_width * seqs * (ctx + 1)
        data = 2 * kv_width * seqs * (ctx + 1) * b
    else:
        shapes = {
            "emb": (0, 2 * t * h * b),
            "input_layernorm": (NORM_FLOPS_PER_ELEMENT * t * h, 2 * t * h * b),
            "post_attention_layernorm": (NORM_FLOPS_PER_ELEMENT * t * h, 2 * t * h * b),
            "attn_pre_proj": (2 * t * h * (q_width + 2 * kv_width), (h * (q_width + 2 * kv_width) + t * (h + q_width + 2 * kv_width)) * b),
            "attn_rope": (ROPE_FLOPS_PER_ELEMENT * t * (q_width + kv_width), 2 * t * (q_width + kv_width) * b),
            "attn_post_proj": (2 * t * q_width * h, (q_width * h + t * (q_width + h)) * b),
            "mlp_up_proj": (2 * t * h * up_width, (h * up_width + t * (h + up_width)) * b),
            "mlp_act": (ACT_FLOPS_PER_ELEMENT * t * inter, (up_width + inter) * t * b),
            "mlp_down_proj": (2 * t * inter * h, (inter * h + t * (inter + h)) * b),
            "add": (t * h, 3 * t * h * b),
            "attn_kv_cache_save": (0, 4 * t * kv_width * b),
            "attn_input_reshape": (0, 2 * t * (q_width + 2 * kv_width) * b),
            "attn_output_reshape": (0, 2 * t * q_width * b),
        }
        if op not in shapes:
            raise DoolyError(f"no analytic estimate for Vidur operation {op!r}")
        flops, data = shapes[op]
    return max(flops / model.peak_flops, data / model.bytes_per_s) + model.launch_s


# ---------------------------------------------------------------------------------------------
# Vidur's operations from fitted models: each inventory operation belongs to the Vidur timer of
# the module that ran it (transformers' module names), its count split over its modules.
# ---------------------------------------------------------------------------------------------

# (Vidur op, module-name suffixes after "model.layers.*") in the order they are tried.
_LAYER_MODULE_OPS = (
    ("attn_pre_proj", (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj")),
    ("attn_post_proj", (".self_attn.o_proj",)),
    ("input_layernorm", (".input_layernorm",)),
    ("post_attention_layernorm", (".post_attention_layernorm",)),
    ("mlp_up_proj", (".mlp.gate_proj", ".mlp.up_proj")),
    ("mlp_down_proj", (".mlp.down_proj",)),
    ("mlp_act", (".mlp.act_fn", ".mlp")),
    ("attn_rope", (".self_attn",)),
    ("add", ("",)),
)
_LAYER_PREFIX = "model.layers.*"
_MODEL_MODULE_OPS = {"model.embed_tokens": "emb", "model.rotary_emb": "attn_rope"}
_ATTENTION_OP = "attention"


def vidur_op_of(module: str, op: str) -> str | None:
    """The Vidur timer an operation of `module` is charged to, or None (lm_head, sampling, the
    final norm: outside Vidur's per-layer tables)."""
    if module in _MODEL_MODULE_OPS:
        return _MODEL_MODULE_OPS[module]
    if not module.startswith(_LAYER_PREFIX):
        return None
    suffix = module[len(_LAYER_PREFIX):]
    if op == _ATTENTION_OP:
        return _ATTENTION_OP
    for vidur_op, suffixes in _LAYER_MODULE_OPS:
        if suffix in suffixes:
            return vidur_op
    return None


def _per_layer_shares(inventory: dict[str, Any], num_layers: int) -> dict[str, dict[str, float]]:
    """signature -> {Vidur op: executions per layer} (or per forward, for `emb`). A signature shared
    by several modules runs once per forward in each model-level module and equally often in each
    layer-level one (e.g. the RMSNorm kernels of both layer norms and the final norm)."""
    shares: dict[str, dict[str, float]] = {}
    for entry in inventory.get("operations", []):
        modules = list(entry.get("modules") or [""])
        layer_modules = [m for m in modules if m.startswith(_LAYER_PREFIX)]
        per_layer_module = (entry["count"] - (len(modules) - len(layer_modules))) / max(len(layer_modules), 1) / num_layers
        target = shares.setdefault(entry["signature"], {})
        for module in modules:
            vidur_op = vidur_op_of(module, entry["op"])
            if vidur_op is None:
                continue
            if module in layer_modules:
                weight = per_layer_module
            else:
                weight = 1.0 if vidur_op == "emb" else 1.0 / num_layers
            target[vidur_op] = target.get(vidur_op, 0.0) + weight
    return shares


# The Vidur table each timer's row lives in (for the coverage of each file).
_TABLE_OF_OP = {**{op: "mlp.csv" for op in MLP_OPS}, **{op: "attention.csv" for op in ATTENTION_OPS}}


class FittedVidurOps:
    """Vidur operations from a fitted step model: at each Vidur point, the per-execution seconds
    of every inventory operation (`op_seconds`) times its executions per layer, summed per Vidur
    timer. Attention is the engine's attention call for the point's batch (prefill: chunks of
    `prefill_chunk_size` after `kv_cache_size`; decode: `batch_size` sequences of that context);
    the reshapes and the KV-cache write happen inside that call, so they are reported as 0.

    `coverage` sums, per file, the seconds that come from measured signatures and from estimated
    ones (rows without a `measured` key count as measured: a predictor that cannot tell)."""

    def __init__(self, step_predictor: FittedOps, inventory: dict[str, Any], num_layers: int) -> None:
        from dooly.sim.export_ops import CoverageTally

        self._step = step_predictor
        self._shares = _per_layer_shares(inventory, num_layers)
        self._cache: dict[VidurPoint, tuple[dict[str, float], dict[str, float]]] = {}
        self.coverage = CoverageTally()

    def _per_op(self, point: VidurPoint) -> tuple[dict[str, float], dict[str, float]]:
        if point not in self._cache:
            batch: tuple[list[tuple[int, int]], list[int]]
            if point.is_prefill:
                batch = ([(point.prefill_chunk_size, point.kv_cache_size)] * point.batch_size, [])
            elif point.kv_cache_size > 0:
                batch = ([], [point.kv_cache_size] * point.batch_size)
            else:
                batch = ([(point.num_tokens, 0)], [])
            totals: dict[str, float] = {}
            measured: dict[str, float] = {}
            for row in self._step.op_seconds(*batch):
                for vidur_op, weight in self._shares.get(row["signature"], {}).items():
                    seconds = row["seconds"] * weight
                    totals[vidur_op] = totals.get(vidur_op, 0.0) + seconds
                    if row.get("measured", True):
                        measured[vidur_op] = measured.get(vidur_op, 0.0) + seconds
            self._cache[point] = (totals, measured)
        return self._cache[point]

    def __call__(self, op: str, point: VidurPoint) -> float:
        totals, measured = self._per_op(point)
        key = _ATTENTION_OP if op in ("attn_prefill", "attn_decode") else op
        seconds = totals.get(key, 0.0)
        table = _TABLE_OF_OP.get(op, "")
        share = measured.get(key, 0.0)
        self.coverage.add(table, share, True)
        self.coverage.add(table, seconds - share, False)
        return seconds


def fitted_op_predictor(step_predictor: FittedOps, inventory: dict[str, Any], num_layers: int) -> FittedVidurOps:
    """The exporter's per-op predictor from a fitted step model (see `FittedVidurOps`)."""
    return FittedVidurOps(step_predictor, inventory, num_layers)


def vidur_attention_backend(dooly_backend: str) -> str:
    """Vidur's attention_backend cell for a Dooly backend. sarathi's enum has one value that runs
    attention (FLASHINFER) and one that skips it (NO_OP); every Dooly backend runs attention, so
    all map to FLASHINFER. Vidur does not filter on the column: it only has to be a value Vidur's
    own files hold, and the real backend goes to dooly_export.json."""
    if not dooly_backend:
        raise DoolyError("an attention backend is needed to label Vidur's attention.csv")
    return VIDUR_ATTENTION_BACKEND


def write_export_info(directory: str | Path, info: Mapping[str, Any]) -> Path:
    """dooly_export.json beside exported tables: where the numbers came from (store, platform,
    Dooly backend, engine, dtype), the coverage of each file and the settings the target needs.
    Written atomically, so a reader sees the old or the new one."""
    import json

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target, prefix=".dooly-", suffix=".json", delete=False) as handle:
        handle.write(json.dumps(dict(info), indent=2, sort_keys=True) + "\n")
    final = target / EXPORT_INFO_FILE
    os.replace(handle.name, final)
    return final


# ---------------------------------------------------------------------------------------------
# How to run Vidur on exported tables: the command-line flags of its predictor (vidur.main).
# ---------------------------------------------------------------------------------------------

VIDUR_PREDICTORS = ("linear_regression", "random_forrest")
DEFAULT_VIDUR_PREDICTOR = "random_forrest"
# A small RandomForest grid: Vidur's default (3 x 3 x 3 forests of up to 750 trees, 10-fold) trains
# for about 45 minutes on 2 cores; Dooly's tables are smooth and dense, and one forest of 100
# trees per operation reproduces them (bench/vidur_dropin.py compares).
SMALL_FOREST = {"num_estimators": 100, "max_depth": 32, "min_samples_split": 2}
SMALL_K_FOLD = 2


def vidur_predictor_flags(
    predictor: str = DEFAULT_VIDUR_PREDICTOR, *, max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_chunk: int = DEFAULT_MAX_TOKENS,
) -> list[str]:
    """Vidur's flags to read Dooly's tables as Dooly prices them: its GQA batching surcharge off
    (Vidur adds 10% to batched attention of GQA models; Dooly's rows already price the batch),
    prediction ranges the tables cover, and a training grid that fits in minutes."""
    if predictor not in VIDUR_PREDICTORS:
        raise DoolyError(f"Vidur predictor {predictor!r}: choose one of {', '.join(VIDUR_PREDICTORS)}")
    prefix = f"--{predictor}_execution_time_predictor_config_"
    settings: dict[str, object] = {
        "attention_decode_batching_overhead_fraction": 0,
        "attention_prefill_batching_overhead_fraction": 0,
        "prediction_max_tokens_per_request": max_tokens,
        "prediction_max_batch_size": max_batch_size,
        "prediction_max_prefill_chunk_size": max_chunk,
        "k_fold_cv_splits": SMALL_K_FOLD,
    }
    if predictor == "random_forrest":
        settings.update(SMALL_FOREST)
    flags = ["--execution_time_predictor_config_type", predictor]
    for key, value in settings.items():
        flags += [prefix + key, str(value)]
    return flags
