"""Which engine settings the simulator models, and how: the one registry `simulate`, `validate`
and `explore` check every engine setting against (issue #24: never silently ignored).

Each engine's settings fall in two lists:
- `modelled`: the scheduler model's config fields (`dooly.sim.schedulers.TransformersCBConfig`,
  `VllmConfig`; a test keeps the two equal), each with the part of the simulator that reads it.
  An entry with `modelled_values` is modelled for those values only (vLLM async scheduling: off);
- `not_modelled`: settings the engine takes that change serving but the simulator does not
  model, each with what it lacks.

A setting in neither list is unknown. `check_modelled` refuses an unknown setting, a not-modelled
one, or a value outside `modelled_values`, with one line naming it and what is modelled. `dooly
bench` (the real engine) does not consult this: it accepts whatever the engine takes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dooly.errors import DoolyError

# Async batching, per engine. transformers `use_async_batching` is modelled from H100 measurement
# (bench/async_batching.py, docs/calibration.md "Async batching"): the loop prepare(N+1) ->
# launch(N+1) -> update(N), two IO pairs with their own CUDA graphs, and a host calibration of its
# own (simulate/validate/explore refuse it where the store has none). vLLM `async_scheduling` has
# not been measured: `true` stays refused. Set a flag to True only once that engine's async loop is
# measured and modelled.
ASYNC_BATCHING_MODELLED = True
VLLM_ASYNC_SCHEDULING_MODELLED = False
_TF_ASYNC_VALUES: tuple[Any, ...] | None = None if ASYNC_BATCHING_MODELLED else (False,)
_VLLM_ASYNC_VALUES: tuple[Any, ...] | None = None if VLLM_ASYNC_SCHEDULING_MODELLED else (False,)
_ASYNC_GAP = ("asynchronous scheduling is not modelled for this engine: it has not been measured, and "
              "transformers' async loop (modelled) need not be vLLM's")

# The parts of the simulator a modelled setting reaches.
SCHEDULER = "scheduler (batch formation)"
KV_CACHE = "KV cache size and block allocation"
STEP_PATH = "step path (CUDA graphs, padding) and the host-overhead calibration's graph mode"
MODEL_GROUPS = "the model's KV layer groups (read from its config unless given)"
HOST_LOOP = "host loop (synchronous or transformers' async batching) and the host-overhead calibration's key"


@dataclass(frozen=True)
class EngineSetting:
    """One engine setting: how the simulator models it (`how`), or what it lacks for it (`gap`)."""

    name: str
    how: str = ""
    gap: str = ""
    # Values modelled (None: every value the scheduler model accepts); others are refused with `gap`.
    modelled_values: tuple[Any, ...] | None = None

    def accepts(self, value: Any) -> bool:
        if not self.how:
            return False
        if self.modelled_values is None:
            return True
        return any(value == v and type(value) is type(v) for v in self.modelled_values)

    def label(self) -> str:
        """The name, with the modelled values where only some are."""
        if self.modelled_values is None:
            return self.name
        return f"{self.name} ({'/'.join(json.dumps(v) for v in self.modelled_values)} only)"


@dataclass(frozen=True)
class EngineSettings:
    """What the simulator does with one engine's settings."""

    engine: str
    modelled: tuple[EngineSetting, ...]
    not_modelled: tuple[EngineSetting, ...]

    def find(self, name: str) -> EngineSetting | None:
        return next((s for s in (*self.modelled, *self.not_modelled) if s.name == name), None)

    def modelled_names(self) -> str:
        return ", ".join(s.label() for s in self.modelled)


_GROUPS = (
    EngineSetting("full_attention_groups", MODEL_GROUPS),
    EngineSetting("sliding_attention_groups", MODEL_GROUPS),
    EngineSetting("sliding_window", MODEL_GROUPS),
)

TRANSFORMERS = EngineSettings(
    "transformers",
    modelled=(
        EngineSetting("scheduler_type", SCHEDULER),
        EngineSetting("block_size", KV_CACHE),
        EngineSetting("num_blocks", KV_CACHE),
        EngineSetting("max_batch_tokens", f"{SCHEDULER}; {STEP_PATH}"),
        EngineSetting("max_requests_per_batch", f"{SCHEDULER}; {STEP_PATH}"),
        EngineSetting("safety_margin", SCHEDULER),
        EngineSetting("use_cuda_graph", STEP_PATH),
        EngineSetting("use_async_batching", HOST_LOOP, _ASYNC_GAP, _TF_ASYNC_VALUES),
        EngineSetting("max_blocks_per_request", STEP_PATH),
        EngineSetting("q_padding_interval_size", STEP_PATH),
        EngineSetting("kv_padding_interval_size", STEP_PATH),
        EngineSetting("cpu_offload_blocks", f"{KV_CACHE} (CPU swap pool, in blocks)"),
        *_GROUPS,
    ),
    not_modelled=(
        EngineSetting("allow_block_sharing", gap="prefix/block sharing between requests (the simulator's prompts share nothing)"),
        EngineSetting("cpu_offload_space", gap="a CPU swap pool in GiB: give cpu_offload_blocks (blocks) instead"),
        EngineSetting("cpu_offload_space_safety_threshold", gap="CPU swap pool sizing: give cpu_offload_blocks"),
        EngineSetting("max_memory_percent", gap="cache sized from free GPU memory: give num_blocks (the engine log's value)"),
        EngineSetting("max_cached_graphs", gap="eviction of captured CUDA graphs"),
        EngineSetting("max_queue_size", gap="admission limits and rejected requests"),
        EngineSetting("default_compile_level", gap="torch.compile of the forward"),
        EngineSetting("varlen_compile_config", gap="torch.compile of the forward"),
        EngineSetting("decode_compile_config", gap="torch.compile of the forward"),
        EngineSetting("use_default_compile_configs", gap="torch.compile of the forward"),
        EngineSetting("per_request_processors", gap="per-request logits processors (sampling cost)"),
        EngineSetting("drop_unsupported_processors", gap="logits processors (sampling cost)"),
        EngineSetting("return_logprobs", gap="log-probability outputs (sampling cost)"),
        EngineSetting("disable_nccl_graph_mixing", gap="tensor-parallel graph/NCCL interplay"),
    ),
)

VLLM = EngineSettings(
    "vllm",
    modelled=(
        EngineSetting("max_num_batched_tokens", SCHEDULER),
        EngineSetting("max_num_seqs", SCHEDULER),
        EngineSetting("block_size", KV_CACHE),
        EngineSetting("num_gpu_blocks", KV_CACHE),
        EngineSetting("enable_chunked_prefill", SCHEDULER),
        EngineSetting("long_prefill_token_threshold", SCHEDULER),
        EngineSetting("cudagraph_mode", STEP_PATH),
        EngineSetting("max_cudagraph_capture_size", STEP_PATH),
        EngineSetting("capture_sizes", STEP_PATH),
        EngineSetting("async_scheduling", HOST_LOOP, _ASYNC_GAP, _VLLM_ASYNC_VALUES),
        EngineSetting("scheduler_reserve_full_isl", SCHEDULER),
        EngineSetting("watermark", SCHEDULER),
    ),
    not_modelled=(
        EngineSetting("enable_prefix_caching", gap="prefix caching (the simulator's prompts share nothing)"),
        EngineSetting("max_model_len", gap="requests longer than the model length are served, not rejected"),
        EngineSetting("kv_cache_bytes", gap="cache sized in bytes: give num_gpu_blocks (the engine log's value)"),
        EngineSetting("gpu_memory_utilization", gap="cache sized from GPU memory: give num_gpu_blocks"),
        EngineSetting("enforce_eager", gap="give cudagraph_mode=none instead"),
        EngineSetting("speculative_config", gap="speculative decoding"),
        EngineSetting("dtype", gap="the model dtype is the step model's --dtype, not an engine setting"),
    ),
)

REGISTRY: Mapping[str, EngineSettings] = {e.engine: e for e in (TRANSFORMERS, VLLM)}

# vLLM's attention backends of its CPU build (dooly.engines.vllm_engine.CPU_BACKEND; literal here so
# that the simulator need not import torch): that platform captures no CUDA graphs, whatever
# cudagraph_mode defaults to on a GPU (vLLM 0.32's CPU platform turns them off).
VLLM_CPU_BACKENDS = ("CPU_ATTN",)
NO_CUDA_GRAPHS = "none"


def platform_defaults(engine: str, backend: str | None) -> dict[str, Any]:
    """The settings the engine resolves on the platform BACKEND runs on where they differ from its
    defaults elsewhere, for a simulation to start from (what the user sets wins): vLLM on a CPU runs
    eager, so its step model and host calibration are those of graphs off."""
    if engine == VLLM.engine and backend in VLLM_CPU_BACKENDS:
        return {"cudagraph_mode": NO_CUDA_GRAPHS}
    return {}


def check_modelled(engine: str, settings: Mapping[str, Any], origin: str) -> None:
    """Refuse (DoolyError, one line) any setting in `settings` the simulator does not model.

    `origin` says where the settings came from (`--set`, a ground truth's engine.json...). An
    engine without a registry is left to `make_scheduler`, which names the engines it knows."""
    registry = REGISTRY.get(engine)
    if registry is None:
        return
    for key, value in settings.items():
        entry = registry.find(key)
        if entry is None:
            raise DoolyError(f"{origin}: unknown key {key!r} for the {engine} engine; "
                             f"the simulator models {registry.modelled_names()}")
        if not entry.accepts(value):
            raise DoolyError(f"{origin}: {engine} setting {key}={json.dumps(value)} is not modelled "
                             f"({entry.gap}); the simulator models {registry.modelled_names()}")
