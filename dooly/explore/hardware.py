"""What a candidate costs and whether the model fits: GPU memory per platform, prices per GPU-hour,
weight and KV-cache bytes from the model config.

Memory figures are the `memory.total` nvidia-smi reported on the machines that measured the
committed stores (data/h100/gpu.txt: 81559 MiB; data/h200/gpu.txt: 143771 MiB), not the marketing
capacity: that is what the engine can allocate from. Platforms missing from the table take the
`memory_gib` of the prices file, else their fit is reported as unknown rather than guessed.

Prices are an input: `--prices FILE` (YAML, `platforms: {PLATFORM: {usd_per_gpu_hour: X,
memory_gib: Y}}`); without it the packaged `default_prices.yaml` is used, an EXAMPLE table (rough
on-demand cloud list prices of late 2026) that every output marks as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dooly.errors import DoolyError

MIB = 2**20
GIB = 2**30
DEFAULT_PRICES_RESOURCE = "default_prices.yaml"
PRICES_SCHEMA = "dooly.prices/1"
# nvidia-smi memory.total of the GPUs the committed stores were measured on (see module doc).
MEASURED_MEMORY_MIB: dict[str, int] = {
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-H200": 143771,
}
MEASURED_MEMORY_SOURCE = "nvidia-smi memory.total on the measuring machine (data/<gpu>/gpu.txt)"
# What the engine leaves outside weights and KV cache (CUDA context, activations of the largest
# step, allocator slack): transformers' PagedAttentionMemoryHandler keeps 10% of free memory back,
# and the CUDA context takes about 0.5 GiB; a candidate fits when weights + KV stay under this
# share of the GPU's memory.
USABLE_MEMORY_FRACTION = 0.9
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "int8": 1}


@dataclass(frozen=True)
class Price:
    """One platform's hourly price per GPU and, where given, its memory."""

    usd_per_gpu_hour: float | None
    memory_gib: float | None = None


@dataclass(frozen=True)
class PriceTable:
    """Prices by platform and where they came from (`example` marks the packaged default)."""

    platforms: dict[str, Price]
    source: str
    example: bool

    def price(self, platform: str) -> float | None:
        found = self.platforms.get(platform)
        return found.usd_per_gpu_hour if found else None

    def memory_bytes(self, platform: str) -> tuple[float | None, str]:
        """The platform's GPU memory and where the figure comes from (None: unknown)."""
        if platform in MEASURED_MEMORY_MIB:
            return MEASURED_MEMORY_MIB[platform] * MIB, MEASURED_MEMORY_SOURCE
        found = self.platforms.get(platform)
        if found and found.memory_gib:
            return found.memory_gib * GIB, f"memory_gib in {self.source}"
        return None, "unknown: not in the measured table nor in the prices file"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "example": self.example,
            "usd_per_gpu_hour": {p: v.usd_per_gpu_hour for p, v in sorted(self.platforms.items())},
        }


def load_prices(path: str | None) -> PriceTable:
    """The prices file, or the packaged example table; any malformed entry is a DoolyError."""
    if path is None:
        text = resources.files("dooly.explore").joinpath(DEFAULT_PRICES_RESOURCE).read_text(encoding="utf-8")
        source = f"packaged example {DEFAULT_PRICES_RESOURCE}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise DoolyError(f"cannot read prices file {path}: {exc.strerror or exc}") from None
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DoolyError(f"prices file {source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_prices(data, source, example=path is None)


def parse_prices(data: Any, source: str, *, example: bool = False) -> PriceTable:
    if not isinstance(data, dict) or not isinstance(data.get("platforms"), dict):
        raise DoolyError(f"prices file {source}: expected a mapping with `platforms: {{PLATFORM: {{usd_per_gpu_hour: X}}}}`")
    schema = data.get("schema", PRICES_SCHEMA)
    if schema != PRICES_SCHEMA:
        raise DoolyError(f"prices file {source}: schema {schema!r} is not {PRICES_SCHEMA}")
    unknown = sorted(set(data) - {"schema", "platforms", "note"})
    if unknown:
        raise DoolyError(f"prices file {source}: unknown key(s) {', '.join(unknown)}")
    platforms: dict[str, Price] = {}
    for name, entry in data["platforms"].items():
        if not isinstance(entry, dict) or set(entry) - {"usd_per_gpu_hour", "memory_gib"}:
            raise DoolyError(f"prices file {source}: platform {name!r} needs a mapping of usd_per_gpu_hour [, memory_gib]")
        values: dict[str, float | None] = {}
        for key in ("usd_per_gpu_hour", "memory_gib"):
            value = entry.get(key)
            if value is None:
                values[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise DoolyError(f"prices file {source}: {name}.{key} must be a positive number, got {value!r}")
            values[key] = float(value)
        platforms[str(name)] = Price(**values)
    return PriceTable(platforms=platforms, source=source, example=example)


# ---------------------------------------------------------------------------------------------
# Model memory


@dataclass(frozen=True)
class ModelMemory:
    """Bytes of weights and per KV token of one model, whole (not per rank)."""

    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    def kv_bytes_per_token_per_gpu(self, tp: int) -> int:
        """KV bytes one rank holds per token: KV heads are split across ranks, at least one each."""
        heads = max(self.num_kv_heads // tp, 1)
        return 2 * self.num_layers * heads * self.head_dim * self.dtype_bytes


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a decoder from its config's shape fields: embeddings, attention projections,
    (gated) MLP or MoE experts with their router, norms, and an untied lm_head.

    Biases are left out (under 0.1% for the suite's models); Llama-3.1-8B gives 8.03e9."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    layers = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    intermediate = int(config.get("moe_intermediate_size") or config["intermediate_size"])
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
    from dooly.sim.step_model import UNGATED_MODEL_TYPES

    mats = 2 if str(config.get("model_type", "")) in UNGATED_MODEL_TYPES else 3
    attention = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp = experts * mats * hidden * intermediate + (hidden * experts if experts > 1 else 0)
    norms = 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + norms) + embeddings + hidden


def model_memory(model: str, dtype: str, store: str | None = None) -> ModelMemory | None:
    """MODEL's memory facts from its config: a config file, a bundled id, or the config STORE (a
    URI, read only) keeps of a model only it knows; None when there is none (a store that knows
    the model by its inventories only)."""
    from dooly.sim.options import model_spec

    try:
        config = model_spec(model, store).config
    except DoolyError:
        return None
    if dtype not in DTYPE_BYTES:
        return None
    size = DTYPE_BYTES[dtype]
    try:
        params = parameter_count(config)
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return None
    return ModelMemory(
        parameters=params,
        weight_bytes=params * size,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * size,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype_bytes=size,
    )


def kv_cache_tokens(engine: str, settings: dict[str, Any]) -> int:
    """Tokens the scheduler model's KV cache holds with these settings (blocks x block size)."""
    from dooly.sim.schedulers import make_scheduler

    config = make_scheduler(engine, settings).describe()
    blocks = int(config.get("num_blocks") or config.get("num_gpu_blocks") or 0)
    return blocks * int(config.get("block_size") or 0)


def memory_verdict(
    memory: ModelMemory | None, platform_bytes: float | None, tp: int, kv_tokens: int
) -> dict[str, Any]:
    """Weights and KV cache per GPU against the platform's usable memory."""
    if memory is None:
        return {"fits": None, "reason": "no config for the model: weights unknown"}
    weights = memory.weight_bytes / tp
    kv = memory.kv_bytes_per_token_per_gpu(tp) * kv_tokens
    verdict: dict[str, Any] = {
        "parameters": memory.parameters,
        "weights_gib_per_gpu": weights / GIB,
        "kv_cache_gib_per_gpu": kv / GIB,
        "kv_cache_tokens": kv_tokens,
    }
    if platform_bytes is None:
        return {**verdict, "fits": None, "reason": "GPU memory of the platform unknown"}
    usable = platform_bytes * USABLE_MEMORY_FRACTION
    verdict.update(gpu_memory_gib=platform_bytes / GIB, usable_gib=usable / GIB, fits=weights + kv <= usable)
    if not verdict["fits"]:
        verdict["reason"] = (
            f"weights {weights / GIB:.1f} GiB + KV {kv / GIB:.1f} GiB per GPU exceed "
            f"{USABLE_MEMORY_FRACTION:.0%} of {platform_bytes / GIB:.1f} GiB"
        )
    return verdict
