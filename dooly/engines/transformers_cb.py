"""transformers continuous batching, driven through its own initialisation code.

Everything stateful (the paged KV cache, the block allocation, the packed inputs with their read and
write indices and the 4D mask) is built by the engine's own classes: `resolve_continuous_batching_config`,
`PagedAttentionCache`, `ContinuousBatchingIOs`. We only decide the batch composition, the way the
engine's scheduler would hand it over (requests with a past length and a query length).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from dooly.engines.base import Batch

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
# Attention backends the continuous-batching engine runs ("paged|..."), and the plain ones a model can
# still be traced and profiled with (flex_attention: profile only, the engine cannot run it).
ENGINE_BACKENDS = ("paged|sdpa", "paged|eager")
PROFILE_ONLY_BACKENDS = ("sdpa", "eager", "flex_attention")
DEFAULT_BACKEND = "paged|sdpa"
DEFAULT_BLOCK_SIZE = 256
DEFAULT_NUM_BLOCKS = 64
DEFAULT_MAX_BATCH_TOKENS = 2048
# A token id that exists in every vocabulary; inputs are deterministic and always in range.
SAFE_TOKEN_ID = 1
CPU_GROUP_TIMEOUT_S = 300.0


def engine_version() -> str:
    import transformers

    return transformers.__version__


def all_backends() -> tuple[str, ...]:
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
    ) -> None:
        self.config = hf_config
        self.tp_size = tp_size
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
        exactly as for a checkpoint, and every missing weight is initialised on the device."""
        from transformers import AutoModelForCausalLM

        if self.tp_size > 1:
            from transformers.distributed import DistributedConfig

            model_class = AutoModelForCausalLM._model_mapping[type(self.config)]
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
        with self.device:
            model = AutoModelForCausalLM.from_config(
                self.config, attn_implementation=self.attention, dtype=self.dtype
            )
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

    def step_inputs(self, batch: Batch) -> dict[str, Any]:
        """The model kwargs the engine builds for this batch: blocks allocated, indices and mask filled."""
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
        self.io.prepare_batch_tensors(
            futures,
            logits_processors=self.logit_processor,
            use_decode_fast_path=False,
            num_q_tokens=batch.tokens,
            max_kv_read=sum(seq.context for seq in batch.seqs),
            use_padding=False,
        )
        kwargs = dict(self.io.get_model_kwargs(use_padding=False))
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


def _supports_logits_to_keep(model: Any) -> bool:
    return hasattr(model, "_supports_logits_to_keep") and model._supports_logits_to_keep()
