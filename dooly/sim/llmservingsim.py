"""Export Dooly's predictions as an LLMServingSim profile bundle, so LLMServingSim runs on them.

LLMServingSim (github.com/casys-kaist/LLMServingSim, its profiler/ + serving/ layout) prices each
GPU iteration from a bundle under `profiler/perf/{hardware}/{model}/{variant}/`, read by
`serving/core/trace_generator._load_perf_db`:

- `meta.yaml`: provenance, plus what the simulator reads: `engine_effective.max_num_batched_tokens`
  and `.max_num_seqs` (it warns when a run exceeds them) and `skew_fit` (off here: the decode-skew
  correction needs measurements of skewed batches that a fitted step model does not hold);
- `tp{N}/dense.csv` (`layer, tokens, time_us`): one layer call at the batch's total tokens,
  linearly interpolated over `tokens`;
- `tp{N}/per_sequence.csv` (`layer, sequences, time_us`): `lm_head` and `sampler` at the number of
  sequences;
- `tp{N}/attention.csv` (`prefill_chunk, kv_prefill, n_decode, kv_decode, time_us`): one layer's
  attention for a batch of prefill tokens after `kv_prefill` cached ones plus `n_decode` decodes of
  `kv_decode` context, interpolated linearly over the four axes.

Times are microseconds for ONE call of the layer (the simulator calls `layernorm` twice per decoder
layer, the others once, and `embedding`, `final_layernorm`, `lm_head`, `sampler` once per
iteration). Layer names are the canonical names of the architecture catalog
`profiler/models/{model_type}.yaml`; the layers a model runs come from its Dooly inventory (the
transformers module each operation ran in), so the per-iteration sum of the bundle's lookups is
Dooly's step prediction (tested). vLLM fuses the residual add into its RMSNorm, so the residual
adds are charged to `layernorm`; rotary and the other attention-module element-wise work to
`rotary_emb`. Where the checkout has no catalog for the model's `model_type` (LLMServingSim ships
llama, qwen3, mixtral, phimoe, qwen3_moe), one is written from the layers the model runs, and the
model's config.json goes to `configs/model/{model}.json`, where LLMServingSim looks it up.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dooly.errors import DoolyError
from dooly.sim.export_ops import CoverageTally
from dooly.sim.vidur import FittedOps, write_csv_tables

logger = logging.getLogger(__name__)

US_PER_S = 1e6
EMBEDDING = "embedding"
LAYERNORM = "layernorm"
QKV_PROJ = "qkv_proj"
QK_NORM = "qk_norm"
ROTARY_EMB = "rotary_emb"
ATTENTION = "attention"
O_PROJ = "o_proj"
GATE_UP_PROJ = "gate_up_proj"
ACT_FN = "act_fn"
DOWN_PROJ = "down_proj"
FINAL_LAYERNORM = "final_layernorm"
LM_HEAD = "lm_head"
SAMPLER = "sampler"
DENSE_LAYERS = (EMBEDDING, LAYERNORM, QKV_PROJ, QK_NORM, ROTARY_EMB, O_PROJ, GATE_UP_PROJ, ACT_FN, DOWN_PROJ, FINAL_LAYERNORM)
PER_SEQUENCE_LAYERS = (LM_HEAD, SAMPLER)
REQUIRED_LAYERS = (EMBEDDING, LAYERNORM, QKV_PROJ, ROTARY_EMB, ATTENTION, O_PROJ, GATE_UP_PROJ, ACT_FN, DOWN_PROJ,
                   FINAL_LAYERNORM, LM_HEAD, SAMPLER)
# Calls per decoder layer of the layers the simulator's sequence calls inside every layer
# (pre_attn: layernorm ... ; post_attn: o_proj, layernorm).
CALLS_PER_DECODER_LAYER = {LAYERNORM: 2}
# Layers called once per iteration, not per decoder layer.
ITERATION_LAYERS = (EMBEDDING, FINAL_LAYERNORM, LM_HEAD, SAMPLER)

DENSE_COLUMNS = ["layer", "tokens", "time_us"]
PER_SEQUENCE_COLUMNS = ["layer", "sequences", "time_us"]
ATTENTION_COLUMNS = ["prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"]
# The simulator's clamp: a lookup never returns less than 1 ns; keep every cell above it.
MIN_TIME_US = 1e-3

# LLMServingSim's variant names (serving/core/trace_generator.resolve_variant).
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
PROFILER_VERSION = "dooly-export/1"

# Its profiler's default grids (profiler/core/config.py): doubling axes with a 0 point.
DEFAULT_MAX_TOKENS = 8192
DEFAULT_MAX_SEQS = 256
DEFAULT_MAX_CHUNK = 2048
DEFAULT_MAX_KV = 16384
MIN_CHUNK = 16
MIN_KV = 16
GRID_FACTOR = 2
# Dense and per-sequence tables are cheap: sample them densely where latency bends.
_TOKEN_GRID = ((1, 16, 1), (16, 1024, 16), (1024, 4096, 64), (4096, 65537, 256))
_SEQUENCE_GRID = ((1, 32, 1), (32, 1025, 8))
# The decode context at which per-sequence layers (lm_head, sampler: request variable B) are priced.
PER_SEQUENCE_CONTEXT = 1

_LAYER_PREFIX = "model.layers.*"
_MODEL_MODULES = {"model.embed_tokens": EMBEDDING, "model.rotary_emb": ROTARY_EMB, "model.norm": FINAL_LAYERNORM,
                  "lm_head": LM_HEAD, "": SAMPLER}
_LAYER_MODULES = (
    ((".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj"), QKV_PROJ),
    ((".self_attn.o_proj",), O_PROJ),
    ((".self_attn.q_norm", ".self_attn.k_norm"), QK_NORM),
    ((".mlp.gate_proj", ".mlp.up_proj"), GATE_UP_PROJ),
    ((".mlp.down_proj",), DOWN_PROJ),
    ((".mlp.act_fn", ".mlp"), ACT_FN),
    ((".self_attn",), ROTARY_EMB),
    (("",), LAYERNORM),
)
_ATTENTION_OP = "attention"


def layer_of(module: str, op: str) -> str | None:
    """The LLMServingSim layer an operation of transformers module `module` is charged to, or None
    (a module this exporter does not map, e.g. MoE experts: the caller refuses the model)."""
    if module in _MODEL_MODULES:
        return _MODEL_MODULES[module]
    if not module.startswith(_LAYER_PREFIX):
        return None
    suffix = module[len(_LAYER_PREFIX):]
    if op == _ATTENTION_OP:
        return ATTENTION
    for suffixes, layer in _LAYER_MODULES:
        if suffix in suffixes:
            return layer
    if suffix.count(".") == 1 and suffix.endswith("norm"):
        return LAYERNORM  # the decoder layer's own norms (Gemma-2 has four)
    return None


def layer_weights(inventory: Mapping[str, Any], num_layers: int) -> dict[str, dict[str, float]]:
    """signature -> {layer: executions per call of that layer}. An operation shared by a
    model-level module (run once per forward) and decoder-layer modules runs once in the former
    and the rest of its count equally in the latter; a layer's executions per forward are divided
    by the layer's calls per forward (decoder-layer layers: num_layers, layernorm twice that)."""
    weights: dict[str, dict[str, float]] = {}
    unmapped: set[str] = set()
    for entry in inventory.get("operations", []):
        modules = list(entry.get("modules") or [""])
        count = float(entry.get("count", 1))
        layer_modules = [m for m in modules if m.startswith(_LAYER_PREFIX)]
        target = weights.setdefault(str(entry["signature"]), {})
        for module in modules:
            layer = layer_of(module, str(entry.get("op", "")))
            if layer is None:
                unmapped.add(module)
                continue
            if not layer_modules:
                executions = count / len(modules)
            elif module in layer_modules:
                # A model-level module shares the signature once per forward (e.g. the final norm).
                executions = (count - (len(modules) - len(layer_modules))) / len(layer_modules)
            else:
                executions = 1.0
            calls = 1 if layer in ITERATION_LAYERS else num_layers * CALLS_PER_DECODER_LAYER.get(layer, 1)
            target[layer] = target.get(layer, 0.0) + executions / calls
    if unmapped:
        raise DoolyError(
            f"LLMServingSim export: no LLMServingSim layer for module(s) {', '.join(sorted(unmapped))} of "
            f"{inventory.get('model_id', '?')} (dense decoder layers only; MoE blocks are not exported yet)"
        )
    return weights


@dataclass(frozen=True)
class ServingSimGrid:
    """The bundle's sample points: dense tokens and per-sequence counts up to their maxima, and
    LLMServingSim's doubling attention axes (0, then MIN doubling up to the maximum)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    max_seqs: int = DEFAULT_MAX_SEQS
    max_chunk: int = DEFAULT_MAX_CHUNK
    max_kv: int = DEFAULT_MAX_KV

    def __post_init__(self) -> None:
        if min(self.max_tokens, self.max_seqs, self.max_chunk, self.max_kv) < 1:
            raise DoolyError("the LLMServingSim grid maxima must be >= 1")

    def tokens(self) -> list[int]:
        return _grid(_TOKEN_GRID, self.max_tokens)

    def sequences(self) -> list[int]:
        return _grid(_SEQUENCE_GRID, self.max_seqs)

    def chunks(self) -> list[int]:
        return [0, *_doubling(MIN_CHUNK, self.max_chunk)]

    def decodes(self) -> list[int]:
        return [0, *_doubling(1, self.max_seqs)]

    def contexts(self) -> list[int]:
        return [0, *_doubling(MIN_KV, self.max_kv)]

    def attention_points(self) -> list[tuple[int, int, int, int]]:
        """(prefill_chunk, kv_prefill, n_decode, kv_decode); an absent part has its context 0."""
        points = []
        for chunk in self.chunks():
            for kv_prefill in self.contexts() if chunk else [0]:
                for n_decode in self.decodes():
                    if chunk == 0 and n_decode == 0:
                        continue
                    for kv_decode in self.contexts() if n_decode else [0]:
                        points.append((chunk, kv_prefill, n_decode, kv_decode))
        return points


def _grid(ranges: tuple[tuple[int, int, int], ...], high: int) -> list[int]:
    values = sorted({v for start, stop, step in ranges for v in range(start, stop, step)} | {high})
    return [v for v in values if 1 <= v <= high]


def _doubling(low: int, high: int) -> list[int]:
    values = []
    value = low
    while value < high:
        values.append(value)
        value *= GRID_FACTOR
    return [*values, high]


class LayerTimes:
    """Seconds of one call of each LLMServingSim layer in a step, from per-operation seconds
    (`op_seconds` rows: signature, seconds per execution, optionally measured) and the inventory's
    layer weights; `coverage` sums measured and estimated seconds per exported file."""

    def __init__(self, op_seconds: FittedOps, inventory: Mapping[str, Any], num_layers: int) -> None:
        self._ops = op_seconds
        self.weights = layer_weights(inventory, num_layers)
        self.found = {layer for per in self.weights.values() for layer in per}
        # Every layer the llama-family sequence calls gets rows, at the 1 ns floor where the model
        # runs nothing there: the simulator refuses a layer its catalog names but the bundle lacks.
        self.layers = sorted(self.found | set(REQUIRED_LAYERS))
        self.coverage = CoverageTally()

    def step(self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int], file: str,
             wanted: Iterable[str]) -> dict[str, float]:
        keep = set(wanted)
        seconds: dict[str, float] = {}
        for row in self._ops.op_seconds(prefill, decode_ctx):
            for layer, weight in self.weights.get(row["signature"], {}).items():
                if layer not in keep:
                    continue
                value = row["seconds"] * weight
                seconds[layer] = seconds.get(layer, 0.0) + value
                self.coverage.add(file, value, bool(row.get("measured", True)))
        return seconds


def _us(seconds: float) -> float:
    return max(seconds * US_PER_S, MIN_TIME_US)


def dense_rows(times: LayerTimes, grid: ServingSimGrid) -> list[dict[str, object]]:
    layers = [layer for layer in DENSE_LAYERS if layer in times.layers]
    rows: list[dict[str, object]] = []
    for tokens in grid.tokens():
        seconds = times.step([(tokens, 0)], [], "dense.csv", layers)
        rows += [{"layer": layer, "tokens": tokens, "time_us": _us(seconds.get(layer, 0.0))} for layer in layers]
    return sorted(rows, key=lambda r: (DENSE_LAYERS.index(str(r["layer"])), r["tokens"]))


def per_sequence_rows(times: LayerTimes, grid: ServingSimGrid) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for sequences in grid.sequences():
        seconds = times.step([], [PER_SEQUENCE_CONTEXT] * sequences, "per_sequence.csv", PER_SEQUENCE_LAYERS)
        rows += [{"layer": layer, "sequences": sequences, "time_us": _us(seconds.get(layer, 0.0))}
                 for layer in PER_SEQUENCE_LAYERS]
    return sorted(rows, key=lambda r: (PER_SEQUENCE_LAYERS.index(str(r["layer"])), r["sequences"]))


def attention_rows(times: LayerTimes, grid: ServingSimGrid) -> list[dict[str, object]]:
    if ATTENTION not in times.found:
        raise DoolyError("the inventory has no attention operation to fill LLMServingSim's attention.csv")
    rows: list[dict[str, object]] = []
    for chunk, kv_prefill, n_decode, kv_decode in grid.attention_points():
        prefill = [(chunk, kv_prefill)] if chunk else []
        seconds = times.step(prefill, [kv_decode] * n_decode, "attention.csv", (ATTENTION,))
        rows.append({"prefill_chunk": chunk, "kv_prefill": kv_prefill, "n_decode": n_decode, "kv_decode": kv_decode,
                     "time_us": _us(seconds.get(ATTENTION, 0.0))})
    return rows


def variant_of(dtype: str) -> str:
    """LLMServingSim's variant folder for a weight dtype (the KV cache in the same dtype)."""
    return DTYPE_SHORT.get(dtype, dtype)


def architecture_catalog(layers: Iterable[str]) -> dict[str, Any]:
    """An architecture catalog (profiler/models/{model_type}.yaml) for a dense decoder running
    `layers`, in the order LLMServingSim's llama catalog calls them."""
    present = set(layers)

    def keep(names: Sequence[str]) -> list[str]:
        return [n for n in names if n in present]

    pre_attn = keep([LAYERNORM, QKV_PROJ, QK_NORM, ROTARY_EMB, ATTENTION])
    return {
        "sequence": {
            "prologue": keep([EMBEDDING]),
            "pre_attn": pre_attn,
            "post_attn": keep([O_PROJ, LAYERNORM]),
            "mlp_dense": keep([GATE_UP_PROJ, ACT_FN, DOWN_PROJ]),
            "mlp_moe": [],
            "head": [FINAL_LAYERNORM, LM_HEAD, SAMPLER],
        },
        "catalog": {
            "dense": {n: ({"tp_stable": True} if n in (LAYERNORM, FINAL_LAYERNORM) else {})
                      for n in DENSE_LAYERS if n in present or n == FINAL_LAYERNORM},
            "per_sequence": {LM_HEAD: {}, SAMPLER: {"tp_stable": True}},
            "attention": {ATTENTION: {}},
        },
    }


@dataclass(frozen=True)
class BundleTarget:
    """Where a bundle goes in an LLMServingSim checkout (or any directory laid out like one)."""

    out_dir: Path
    hardware: str
    model: str
    variant: str
    tp: int = 1

    def __post_init__(self) -> None:
        if not self.hardware or "/" in self.hardware:
            raise DoolyError(f"LLMServingSim hardware name {self.hardware!r} must be one path segment, e.g. H100")
        if not self.model or self.model.startswith("/") or ".." in self.model.split("/"):
            raise DoolyError(f"LLMServingSim model name {self.model!r} must look like org/name")
        if self.tp < 1:
            raise DoolyError(f"--tp must be >= 1, got {self.tp}")

    @property
    def variant_root(self) -> Path:
        return self.out_dir / "profiler" / "perf" / self.hardware / self.model / self.variant

    @property
    def tp_dir(self) -> Path:
        return self.variant_root / f"tp{self.tp}"

    @property
    def model_config(self) -> Path:
        return self.out_dir / "configs" / "model" / f"{self.model}.json"

    def architecture(self, model_type: str) -> Path:
        return self.out_dir / "profiler" / "models" / f"{model_type}.yaml"


def export_llmservingsim(
    op_seconds: FittedOps,
    inventory: Mapping[str, Any],
    hf_config: Mapping[str, Any],
    target: BundleTarget,
    *,
    grid: ServingSimGrid | None = None,
    block_size: int = 16,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[list[Path], dict[str, float | None]]:
    """Write the bundle (tables, meta.yaml, and the model config and architecture catalog where the
    checkout lacks them). Returns the files written and the measured share of each table."""
    grid = grid or ServingSimGrid()
    num_layers = int(hf_config.get("num_hidden_layers") or 0)
    model_type = str(hf_config.get("model_type") or "")
    if num_layers < 1 or not model_type:
        raise DoolyError("the model config needs num_hidden_layers and model_type for an LLMServingSim bundle")
    times = LayerTimes(op_seconds, inventory, num_layers)
    tables = (
        ("dense.csv", DENSE_COLUMNS, dense_rows(times, grid)),
        ("per_sequence.csv", PER_SEQUENCE_COLUMNS, per_sequence_rows(times, grid)),
        ("attention.csv", ATTENTION_COLUMNS, attention_rows(times, grid)),
    )
    written = write_csv_tables(target.tp_dir, tables)
    coverage = times.coverage.as_dict()
    meta = {
        "profiler_version": PROFILER_VERSION,
        "hardware": target.hardware,
        "model": target.model,
        "variant": target.variant,
        "tp_degrees": sorted({target.tp, *_existing_tps(target.variant_root)}),
        "architecture": model_type,
        "engine_effective": {
            "max_num_batched_tokens": grid.max_tokens,
            "max_num_seqs": grid.max_seqs,
            "block_size": block_size,
            "tensor_parallel_size": target.tp,
        },
        "attention_grid": {
            "max_kv": grid.max_kv,
            "chunk_factor": float(GRID_FACTOR),
            "kv_factor": float(GRID_FACTOR),
            "chunks": f"0, {MIN_CHUNK}-{grid.max_chunk} x{GRID_FACTOR}",
            "n_decode": f"0, 1-{grid.max_seqs} x{GRID_FACTOR}",
            "kv": f"0, {MIN_KV}-{grid.max_kv} x{GRID_FACTOR}",
        },
        "skew_fit": {"enabled": False},
        "dooly": {**dict(provenance or {}), "coverage": {f"tp{target.tp}/{k}": v for k, v in coverage.items()}},
    }
    written.append(_write_text(target.variant_root / "meta.yaml", _yaml(meta)))
    if not target.model_config.exists():
        written.append(_write_text(target.model_config, json.dumps(dict(hf_config), indent=2, sort_keys=True) + "\n"))
    arch = target.architecture(model_type)
    if not arch.exists():
        written.append(_write_text(arch, _yaml(architecture_catalog(times.layers))))
        logger.info("LLMServingSim has no catalog for model_type %s here: wrote %s", model_type, arch)
    return written, coverage


def _existing_tps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(p.name[2:]) for p in root.iterdir() if p.is_dir() and p.name.startswith("tp") and p.name[2:].isdigit()]


def _yaml(document: Mapping[str, Any]) -> str:
    import yaml

    return str(yaml.safe_dump(dict(document), sort_keys=False))


def _write_text(path: Path, text: str) -> Path:
    """Write atomically: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".dooly-", suffix=path.suffix, delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)
    return path
