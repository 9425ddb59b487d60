"""transformers continuous batching, driven through its own initialisation code.

Everything stateful (the paged KV cache, the block allocation, the packed inputs with their read and
write indices and the 4D mask) is built by the engine's own classes: `resolve_continuous_batching_config`,
`PagedAttentionCache`, `ContinuousBatchingIOs`. We only decide the batch composition, the way the
engine's scheduler would hand it over (requests with a past length and a query length).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch

from dooly.engines import flex_paged
from dooly.engines.base import Batch, TraceStep, shape_only_mode

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
# Attention backends the continuous-batching engine runs (so `dooly bench` can measure them), and
# the ones Dooly registers itself, which are traced and profiled on the engine's cache and inputs
# but never served: profile only (dooly.engines.flex_paged).
ENGINE_BACKENDS = ("paged|sdpa", "paged|eager")
PROFILE_ONLY_BACKENDS = (flex_paged.BACKEND,)
DEFAULT_BACKEND = "paged|sdpa"
DEFAULT_BLOCK_SIZE = 256
DEFAULT_NUM_BLOCKS = 64
DEFAULT_MAX_BATCH_TOKENS = 2048
# A token id that exists in every vocabulary; inputs are deterministic and always in range.
SAFE_TOKEN_ID = 1
CPU_GROUP_TIMEOUT_S = 300.0
# The engine's cache geometry in the tracer's probe pass: values no config field takes.
PROBE_BLOCK_SIZE = 4 * 11
PROBE_NUM_BLOCKS = 37
PROBE_MAX_BATCH_TOKENS = 4099
# Full and sliding-window layer groups draw blocks from one pool, and a sliding group holds one
# block beyond its window per sequence: room for both, twice over.
_BLOCK_HEADROOM = 4
# Blocks beyond the largest batch's needs when measuring attention: rounding up per sequence,
# plus the sliding group.
ATTENTION_CACHE_HEADROOM = 2
# Periods of layers the attention runner builds. With more than one, the timed call moves to the
# next layer at every call, each reading its own KV cache as in a forward, where the keys a layer
# read last step are never still in L2. lab/attention_l2.py measured on the H100 that this does
# not change a point's median (ratio 1.000, 0.98-1.07 over 32 points): one period is enough.
CACHE_ROTATION_PERIODS = 1


def engine_version() -> str:
    import transformers

    return transformers.__version__


def cache_groups(hf_config: Any) -> dict[str, int]:
    """How the engine's paged cache charges a request's blocks for this model, as the scheduler
    model's settings: its layer groups by attention kind (the engine's own
    `group_layers_by_attn_type`; every group draws from one block pool) and the sliding window
    (a sliding group holds at most one window's blocks per request).

    The reference for `dooly.models.layout.cache_groups_from_facts`, which reads the same layout
    from config.json facts without importing transformers (the simulate path)."""
    from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

    from dooly.models.layout import cache_group_settings

    text = hf_config.get_text_config()
    _, group_types = group_layers_by_attn_type(text)
    return cache_group_settings(group_types, getattr(text, "sliding_window", None))


def all_backends() -> tuple[str, ...]:
    """Every backend a model can be traced and profiled with (the engine runs only ENGINE_BACKENDS)."""
    return ENGINE_BACKENDS + PROFILE_ONLY_BACKENDS


class TransformersCBEngine:
    """One model + paged cache + IO buffers of transformers' continuous batching engine.

    Construct it inside a FakeTensorMode to trace shapes only, or on a real device to measure.
    """

    name = ENGINE_NAME

    def __init__(
        self,
        hf_config: Any,
        *,
        attention: str = DEFAULT_BACKEND,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_blocks: int = DEFAULT_NUM_BLOCKS,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        tp_size: int = 1,
        init_weights: bool = True,
    ) -> None:
        self.config = hf_config
        self.tp_size = tp_size
        self.init_weights = init_weights
        self.attention = attention
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_batch_tokens = max_batch_tokens
        self.model: Any = None
        self.cache: Any = None
        self.io: Any = None
        self.logit_processor: Any = None
        self.cb_config: Any = None
        self._request_ids: list[str] = []
        self._runner: Any = None

    def version(self) -> str:
        return engine_version()

    def build_model(self) -> Any:
        """The engine's model with random weights. With `tp_size` > 1 (inside an initialised
        process group of that many ranks) transformers' own tensor-parallel loading builds this
        rank's shard: `from_pretrained` with an empty state dict and a DistributedConfig, so the
        TP plan's hooks (all_reduce after rowwise layers, all_gather of the logits) are installed
        exactly as for a checkpoint, and every missing weight is initialised on the device.

        With `init_weights` False (a model built in fake mode, whose weights have no values) the
        weights are left uninitialised, as transformers does before loading a checkpoint
        (`no_init_weights`), and only tied: the random init is most of building a model from its
        config (about 0.07 s of 0.09 s for Command-R7B's four layers on a 2-core CPU). Otherwise
        each weight is drawn once (`_weight_init`)."""
        from transformers import AutoModelForCausalLM

        from dooly.models.hf_imports import import_transformers_lean

        import_transformers_lean()
        flex_paged.register()
        if self.tp_size > 1:
            from transformers.distributed import DistributedConfig

            # The lazy auto-mapping's stubs type its values as (config, model) pairs; at run time it
            # returns the model class registered for this config type.
            model_class: Any = AutoModelForCausalLM._model_mapping[type(self.config)]
            model = model_class.from_pretrained(
                None,
                config=self.config,
                state_dict={},
                distributed_config=DistributedConfig(tp_size=self.tp_size),
                dtype=self.dtype,
                attn_implementation=self.attention,
            )
            self.model = model.eval()
            return self.model
        with self.device, _weight_init(self.init_weights):
            model = AutoModelForCausalLM.from_config(
                self.config, attn_implementation=self.attention, dtype=self.dtype
            )
        if not self.init_weights:
            model.tie_weights()
        self.model = model.eval()
        return self.model

    def build_cache(self, max_requests: int | None = None) -> None:
        """The engine's paged cache and IO buffers, sized for `num_blocks` blocks of `block_size`."""
        from transformers.generation.configuration_utils import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessorList,
        )
        from transformers.generation.continuous_batching.distributed import DistributedHelper
        from transformers.generation.continuous_batching.initialization import (
            resolve_continuous_batching_config,
        )
        from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs

        if self.model is None:
            raise RuntimeError("build_model() first: the logits processors come from the model")
        requests = max_requests or self.max_batch_tokens
        user_config = ContinuousBatchingConfig(
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            max_batch_tokens=self.max_batch_tokens,
            max_requests_per_batch=requests,
            use_cuda_graph=False,
            max_blocks_per_request=0,
            allow_block_sharing=False,
        )
        self.logit_processor = ContinuousBatchingLogitsProcessorList(
            logits_processor=self.model._get_logits_processor(GenerationConfig(do_sample=False)),
            per_request_processors=False,
            drop_unsupported_processors=True,
        )
        text_config = self.model.config.get_text_config()
        self.cb_config = resolve_continuous_batching_config(
            config=text_config,
            cb_config=user_config,
            workload_hints=None,
            has_logit_processors=self.logit_processor.do_processing,
        )
        mesh = getattr(self.model, "_device_mesh", None) if self.tp_size > 1 else None
        helper = DistributedHelper(device_mesh=mesh, cpu_group_timeout=CPU_GROUP_TIMEOUT_S)
        self.cache = PagedAttentionCache(
            config=text_config,
            continuous_batching_config=self.cb_config,
            device=self.device,
            distributed_helper=helper,
            tp_plan=getattr(self.model, "tp_plan", {}) if self.tp_size > 1 else {},
            dtype=self.dtype,
        )
        self.io = ContinuousBatchingIOs(
            cache=self.cache,
            config=text_config,
            continuous_batching_config=self.cb_config,
            device=self.device,
            model_dtype=self.dtype,
            logit_processor=self.logit_processor,
        )

    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def step_inputs(self, batch: Batch, padded_sizes: tuple[int, int] | None = None) -> dict[str, Any]:
        """The model kwargs the engine builds for this batch: blocks allocated, indices and mask filled.

        `padded_sizes` (query tokens, cached KV tokens read) are the sizes the engine pads a step
        to under CUDA graphs (`ModelRunner.maybe_pad_inputs`); given, the inputs are built as that
        path builds them (`use_padding=True`: query, read index and mask span the padded extents)."""
        from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState

        if self.cache is None:
            self.build_cache()
        if batch.tokens > self.max_batch_tokens:
            raise ValueError(f"batch of {batch.tokens} tokens exceeds max_batch_tokens={self.max_batch_tokens}")
        self.release()
        futures = []
        for index, seq in enumerate(batch.seqs):
            request_id = f"dooly-{index}"
            state = RequestState(request_id=request_id, initial_tokens=[SAFE_TOKEN_ID] * max(seq.kv, 1))
            state.position_offset = seq.context
            state.tokens_to_process = [SAFE_TOKEN_ID] * seq.query
            blocks = -(-seq.kv // self.block_size)
            allocated = self.cache.allocate_blocks(blocks, request_id, 0)
            if allocated is None:
                self.release()
                raise MemoryError(f"KV cache of {self.capacity_tokens()} tokens cannot hold this batch")
            state.allocated_blocks = allocated
            self._request_ids.append(request_id)
            futures.append(FutureRequestState(state, has_new_token=True, complete_blocks=0, query_length=seq.query))
        num_q_tokens, max_kv_read = padded_sizes or (batch.tokens, sum(seq.context for seq in batch.seqs))
        use_padding = padded_sizes is not None
        self.io.prepare_batch_tensors(
            futures,
            logits_processors=self.logit_processor,
            use_decode_fast_path=False,
            num_q_tokens=num_q_tokens,
            max_kv_read=max_kv_read,
            use_padding=use_padding,
        )
        kwargs = dict(self.io.get_model_kwargs(use_padding=use_padding))
        if _supports_logits_to_keep(self.model):
            kwargs["logits_to_keep"] = kwargs["logits_indices"]
        return kwargs

    def release(self) -> None:
        for request_id in self._request_ids:
            self.cache.free_blocks(request_id)
        self._request_ids = []

    def run_step(self, kwargs: dict[str, Any]) -> None:
        """One engine step through the engine's own model runner: forward, logits, sampling."""
        from transformers.generation.continuous_batching.model_runner import ModelRunner

        if self._runner is None:
            self._runner = ModelRunner(
                logit_processor=self.logit_processor,
                cb_config=self.cb_config,
                inputs_and_outputs=self.io,
                cache=self.cache,
                do_sample=False,
                return_logprobs=False,
            )
        carry_over_ids, prev_output_ids, output_ids = self.io.get_cb_kwargs()
        self._runner._forward_process_and_sample(self.model, kwargs, carry_over_ids, prev_output_ids, output_ids)


def _weight_init(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """How a model's weights get their values: drawn once by transformers' own `init_weights`
    (torch's initialisers, which every module's constructor runs first and transformers then
    overwrites, are skipped: `torch_init_replaced`), or not at all, transformers' `no_init_weights`
    (which also skips tying them: the caller ties). Drawing every weight twice was most of building
    the attention runner's model: 6.0 of 6.5 s for one layer of Qwen2.5-1.5B and its 151,936-row
    embedding on a 2-core CPU (docs/profile.md)."""
    if enabled:
        return torch_init_replaced(_skip_init)
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _skip_init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A torch initialiser that leaves the tensor as it is: transformers draws it next."""
    return tensor


@contextlib.contextmanager
def torch_init_replaced(initialiser: Callable[..., torch.Tensor]) -> Iterator[None]:
    """While active, torch's weight initialisers (`torch.nn.init.normal_`, `kaiming_uniform_`, ...:
    what module constructors call) are `initialiser`, wherever torch's modules imported them (the
    modules and functions transformers' `no_init_weights` patches); transformers' own initialisation
    keeps the originals it recorded at import and still runs."""
    from transformers.initialization import TORCH_INIT_FUNCTIONS, TORCH_MODULES_TO_PATCH

    replaced: list[tuple[Any, str, Any]] = []
    try:
        for module_name in TORCH_MODULES_TO_PATCH:
            module = sys.modules.get(module_name)
            for name in TORCH_INIT_FUNCTIONS:
                if module is not None and hasattr(module, name):
                    replaced.append((module, name, getattr(module, name)))
                    setattr(module, name, initialiser)
        yield
    finally:
        for module, name, original in replaced:
            setattr(module, name, original)


def _supports_logits_to_keep(model: Any) -> bool:
    return hasattr(model, "_supports_logits_to_keep") and model._supports_logits_to_keep()


def _blocks_for(batch: Batch, block_size: int) -> int:
    return _BLOCK_HEADROOM * sum(-(-s.kv // block_size) for s in batch.seqs)


class TransformersKind:
    """transformers continuous batching as an `EngineKind` (see dooly.engines.base)."""

    name = ENGINE_NAME
    default_backend = DEFAULT_BACKEND
    block_size = DEFAULT_BLOCK_SIZE

    def version(self) -> str:
        return engine_version()

    def backends(self) -> tuple[str, ...]:
        return all_backends()

    def request_values(self, phase: str, batch: Batch, window: int | None) -> dict[str, int]:
        """T, B, K (and S under a sliding window), as the engine's IO buffers size them."""
        values = {"B": batch.num_seqs}
        if phase != "decode":  # a decode step has one token per sequence: T is B
            values["T"] = batch.tokens
        if phase != "prefill":
            values["K"] = batch.kv_tokens
            if window:
                values["S"] = sum(s.query + min(s.context, window - 1) for s in batch.seqs)
        return values

    def geometry(self, batch: Batch, probe: bool) -> dict[str, int]:
        if probe:
            return {
                "engine.block_size": PROBE_BLOCK_SIZE,
                "engine.num_blocks": max(PROBE_NUM_BLOCKS, _blocks_for(batch, PROBE_BLOCK_SIZE)),
                "engine.max_batch_tokens": PROBE_MAX_BATCH_TOKENS,
            }
        return {
            "engine.block_size": DEFAULT_BLOCK_SIZE,
            "engine.num_blocks": max(DEFAULT_NUM_BLOCKS, _blocks_for(batch, DEFAULT_BLOCK_SIZE)),
            "engine.max_batch_tokens": DEFAULT_MAX_BATCH_TOKENS,
        }

    def probe_overrides(self, overrides: dict[str, int], config: dict[str, Any]) -> dict[str, int]:
        return overrides

    @contextlib.contextmanager
    def trace_session(self, config: Any, *, backend: str, dtype: torch.dtype, batch: Batch,
                      geometry: dict[str, int], shape_env: Any) -> Iterator[TraceStep]:
        """The whole engine (model, paged cache, IO buffers) is built inside the fake mode."""
        with shape_only_mode(shape_env):
            engine = TransformersCBEngine(
                config, attention=backend, dtype=dtype, device="cpu",
                block_size=geometry["engine.block_size"], num_blocks=geometry["engine.num_blocks"],
                max_batch_tokens=geometry["engine.max_batch_tokens"], init_weights=False,
            )
            model = engine.build_model()
            engine.build_cache()
            kwargs = engine.step_inputs(batch)
            yield TraceStep(model=model, prepare=lambda symbolizer: symbolizer.tree(kwargs), run=engine.run_step)

    def attention_runner(self, hf_config: Any, *, backend: str, dtype: torch.dtype, device: str, max_tokens: int,
                         max_kv: int, max_seqs: int, period: int) -> EngineAttention:
        return EngineAttention(hf_config, backend=backend, dtype=dtype, device=device, max_tokens=max_tokens,
                               max_kv=max_kv, max_seqs=max_seqs, period=period)


class EngineAttention:
    """The engine's attention call for a batch: the model (one period of its layers) built by
    transformers, the paged KV cache and the step's packed inputs (read/write indices, 4D mask) by
    the continuous-batching engine's own classes. One step runs with the engine's registered
    attention function wrapped, which captures the arguments each layer passes to it; the measured
    call is that very function with those arguments. One instance per (model config, backend,
    dtype), reused across points."""

    def __init__(self, hf_config: Any, *, backend: str, dtype: torch.dtype, device: str, max_tokens: int,
                 max_kv: int, max_seqs: int, period: int, rotation: int = CACHE_ROTATION_PERIODS) -> None:
        config = copy.deepcopy(hf_config)
        text = config.get_text_config()
        types = getattr(text, "layer_types", None)
        layers = period * max(rotation, 1)
        text.num_hidden_layers = layers
        if types:
            text.layer_types = [types[i % period] for i in range(layers)]
        blocks = ATTENTION_CACHE_HEADROOM * (max_kv // DEFAULT_BLOCK_SIZE + max_seqs + 1)
        if backend == flex_paged.BACKEND:
            flex_paged.forget_compiled()
        self.backend = backend
        self.engine = TransformersCBEngine(
            config, attention=backend, dtype=dtype, device=device, block_size=DEFAULT_BLOCK_SIZE,
            num_blocks=blocks, max_batch_tokens=max_tokens,
        )
        self.engine.build_model()
        self.engine.build_cache(max_requests=max_seqs)

    def call_for(self, batch: Batch, sliding: bool, padded_sizes: tuple[int, int] | None = None) -> Any:
        """The engine's attention call for this batch on the layers of the requested kind, one
        layer after the other from call to call (each reads its own cache, as in a forward);
        with `padded_sizes`, on the inputs the engine's CUDA-graph path pads (`step_inputs`)."""
        kwargs = self.engine.step_inputs(batch, padded_sizes)
        with capture_attention_calls(self.backend) as (original, calls), torch.no_grad(), \
                _stopped_before(self.engine.model.get_output_embeddings()):
            self.engine.model(**kwargs)
        # As the tracer labels a call: the layer's attribute, or the window its forward passes
        # (Phi-3 passes its config's window with no attribute on the module).
        layers = [(module, args, dict(call_kwargs)) for module, args, call_kwargs in calls
                  if bool(getattr(module, "sliding_window", None) or call_kwargs.get("sliding_window")) == sliding]
        if not layers:
            raise ValueError(f"no {'sliding' if sliding else 'full'}-attention layer in this model")
        turn = itertools.cycle(layers)

        def call() -> Any:
            module, args, call_kwargs = next(turn)
            with torch.no_grad():
                return original(module, *args, **call_kwargs)

        return call


class _ForwardStopped(Exception):
    """Raised by `_stopped_before`'s hook: the forward has done what was asked of it."""


@contextlib.contextmanager
def _stopped_before(module: torch.nn.Module | None) -> Iterator[None]:
    """While active, a forward ends where it would call `module` (none: it runs to its end). The
    attention runner stops a step before the output embedding: the step's attention calls are all
    made by then, and the logits are the costliest part of a one-layer forward on a CPU (a 1,536 x
    151,936 product per sequence for Qwen2.5-1.5B, 48 ms each on 2 cores, against 0.5 ms for the
    attention call measured)."""
    if module is None:
        yield
        return

    def stop(*_: Any) -> None:
        raise _ForwardStopped

    handle = module.register_forward_pre_hook(stop)
    try:
        yield
    except _ForwardStopped:
        pass
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_attention_calls(backend: str) -> Iterator[tuple[Any, list]]:
    """While active, every call of the registered attention function for `backend` is recorded as
    (module, args, kwargs) and passed on; yields (the registered function, the calls): what a
    layer hands its attention, to call again (timing, comparing backends) outside the forward."""
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    # transformers types its registry's values as `function`, which mypy does not treat as callable.
    original = cast(Callable[..., Any], mapping[backend])
    calls: list[tuple[Any, tuple, dict]] = []

    def wrapper(module: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((module, args, dict(kwargs)))
        return original(module, *args, **kwargs)

    mapping[backend] = wrapper
    try:
        yield original, calls
    finally:
        mapping[backend] = original
