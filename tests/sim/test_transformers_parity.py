"""The transformers scheduler model against the real transformers 5.17 scheduler.

Both are driven side by side on random workloads (tiny model config, real `PagedAttentionCache`,
`FIFOScheduler` / `PrefillFirstScheduler` and `OffloadingManager` on the CPU, no forward pass):
every step must hold the same requests, in the same order, with the same query lengths and
contexts, and the free-block counts must agree after every step. The model configs cover the
engine's three cache layouts: full attention only (one layer group), gemma-2's alternating
sliding-window and full layers (two groups drawing from one pool), and sliding windows only.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.distributed import DistributedHelper
from transformers.generation.continuous_batching.offloading_manager import (
    OffloadingManager,
)
from transformers.generation.continuous_batching.requests import (
    TMP_TOKEN_ID,
    RequestState,
    RequestStatus,
)
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

from dooly.engines.transformers_cb import cache_groups
from dooly.sim.schedulers import Seq, TransformersCBScheduler

VOCAB = 128
MAX_STEPS = 5000
# Shorter than most requests, so sliding-window groups hit their cap of blocks per request.
WINDOW = 40
# Keyword arguments of several config classes: mypy cannot match a heterogeneous dict to each.
TINY: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": VOCAB, "eos_token_id": None, "pad_token_id": None, "bos_token_id": None}
LAYOUTS = {
    "full": lambda: LlamaConfig(num_hidden_layers=1, **TINY),
    "sliding+full": lambda: Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, **TINY),
    "sliding": lambda: MistralConfig(num_hidden_layers=1, sliding_window=WINDOW, **TINY),
}


def _real_engine(config, scheduler_type, block_size, num_blocks, max_batch_tokens, max_requests, safety_margin):
    cb_config = ContinuousBatchingConfig(
        block_size=block_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
        allow_block_sharing=False, max_memory_percent=0.5, max_blocks_per_request=0,
    )
    helper = DistributedHelper(None, None)
    cache = PagedAttentionCache(config, cb_config, "cpu", helper, {}, torch.float32)
    scheduler = SCHEDULER_MAPPING[scheduler_type](cache, safety_margin, max_requests)
    offloader = OffloadingManager(cache, scheduler, 0.0, 1.0, None, helper)
    return cache, scheduler, offloader


def _real_step(cache, scheduler, offloader, max_batch_tokens):
    """`ContinuousBatchProcessor.prepare_next_batch` and the bookkeeping of `prepare_batch_tensors`."""
    batch, _, _, _ = scheduler.schedule_batch(max_batch_tokens, cache.num_pages)
    while batch is None:
        assert offloader.offload_requests() > 0, "the real engine is stuck"
        batch, _, _, _ = scheduler.schedule_batch(max_batch_tokens, cache.num_pages)
    if batch and scheduler.starved_requests:
        offloader.offload_requests()
    entries = []
    for future in batch or []:
        state = future.state
        entries.append((state.request_id, future.query_length, state.position_offset))
        state.position_offset += future.query_length
        if future.has_new_token:
            state.tokens_to_process = [TMP_TOKEN_ID]
    return batch or [], entries


def _real_update(scheduler, batch, rng):
    """`ContinuousBatchProcessor.update_batch` without the model outputs."""
    for future in batch:
        state = future.state
        if not future.has_new_token:
            continue
        if state.generated_len() == 0:
            state.status = RequestStatus.DECODING
        if state.update_and_check_completion(rng.randrange(VOCAB), None):
            scheduler.finish_request(state.request_id)
            scheduler.block_new_requests = False


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("scheduler_type", ["fifo", "prefill_first"])
@pytest.mark.parametrize(
    "block_size, num_blocks, max_batch_tokens, max_requests, safety_margin",
    [(16, 18, 64, 16, None), (16, 40, 64, 16, None), (8, 34, 100, 4, 0.3), (32, 30, 48, 8, 0.0)],
)
def test_same_batches_as_transformers(layout, scheduler_type, block_size, num_blocks, max_batch_tokens, max_requests,
                                      safety_margin):
    evictions = 0
    config = LAYOUTS[layout]()
    for seed in range(8):
        rng = random.Random(seed)
        cache, real, offloader = _real_engine(config, scheduler_type, block_size, num_blocks, max_batch_tokens,
                                              max_requests, safety_margin)
        model = TransformersCBScheduler({
            "scheduler_type": scheduler_type, "block_size": block_size, "num_blocks": num_blocks,
            "max_batch_tokens": max_batch_tokens, "max_requests_per_batch": max_requests,
            "safety_margin": safety_margin, **cache_groups(config),
        })
        arrivals = sorted(
            ((f"q{i}", rng.randint(1, 150), rng.randint(1, 60), rng.randint(0, 40)) for i in range(30)),
            key=lambda r: r[3],
        )
        seqs = {}
        for step in range(MAX_STEPS):
            while arrivals and arrivals[0][3] <= step:
                rid, prompt, output, _ = arrivals.pop(0)
                real.add_waiting_request(
                    RequestState(request_id=rid, initial_tokens=[rng.randrange(VOCAB) for _ in range(prompt)], max_new_tokens=output)
                )
                seqs[rid] = Seq(rid, 0.0, prompt, output)
                model.add(seqs[rid])
            if not real.has_pending_requests() and not arrivals:
                break
            batch, expected = _real_step(cache, real, offloader, max_batch_tokens)
            mine = model.schedule()
            got = [] if mine is None else [(s.rid, q, ctx) for s, q, ctx in mine.entries]
            assert got == expected, f"seed {seed} step {step}"
            _real_update(real, batch, rng)
            for seq, epoch in [] if mine is None else mine.samplers:
                if seq.epoch == epoch and not seq.finished:
                    seq.generated += 1
                    if seq.generated >= seq.target:
                        seq.finished = True
                        model.finish(seq)
            assert model.free_blocks == cache.get_num_free_blocks(), f"seed {seed} step {step}"
        assert all(seq.finished for seq in seqs.values())
        evictions += sum(seq.preemptions for seq in seqs.values())
    if num_blocks == 18 and layout != "sliding":
        assert evictions > 0, "the small-cache case must exercise eviction"


def test_bundled_models_layer_groups():
    """What `dooly simulate` / `validate` hand the scheduler for a bundled model: gemma-2's
    alternating layers are two groups (a short request holds twice the blocks), Phi-3's sliding
    window a single group, Llama one full-attention group."""
    from dooly.models.registry import build_hf_config, resolve_model

    def groups(model: str) -> dict:
        return cache_groups(build_hf_config(resolve_model(model)))

    assert groups("google/gemma-2-9b") == {"full_attention_groups": 1, "sliding_attention_groups": 1,
                                           "sliding_window": 4096}
    assert groups("microsoft/Phi-3-mini-4k-instruct") == {"full_attention_groups": 0, "sliding_attention_groups": 1,
                                                          "sliding_window": 2047}
    assert groups("meta-llama/Llama-3.1-8B") == {"full_attention_groups": 1, "sliding_attention_groups": 0,
                                                 "sliding_window": 0}
