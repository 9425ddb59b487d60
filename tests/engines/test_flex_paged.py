"""`paged|flex_attention` against the engine's own `paged|sdpa`, on the same packed batches (CPU).

The flex function shares the engine's paged cache handling with `paged|sdpa` and replaces its 4D
mask by a flex BlockMask, so on one batch the two must agree to rounding: layer by layer on the
arguments the engine's forward passes, element by element on the mask, and on a whole step's
logits when the engine is built with the flex backend (no 4D mask prepared at all).
"""

from __future__ import annotations

import pytest
import torch
from tiny_configs import TINY_LLAMA
from torch.nn.attention.flex_attention import create_mask

from dooly.engines import flex_paged
from dooly.engines.base import Batch
from dooly.engines.transformers_cb import EngineAttention, TransformersCBEngine, capture_attention_calls
from dooly.models.registry import ModelSpec, build_hf_config

SDPA = "paged|sdpa"
FLEX = flex_paged.BACKEND
WINDOW = 24
# Alternating sliding-window and full layers (the engine keys cu_seq_lens_k by layer type).
GEMMA2_SLIDING = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "sliding_window": WINDOW,
    "query_pre_attn_scalar": 32,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "max_position_embeddings": 4096,
}
SOFTCAP = 50.0
# A fresh prompt longer than one 128-token mask block, a chunk after a context, and decodes whose
# contexts run past the window: every kind of block (full, partial, empty) and sequence.
MIXED = Batch.of(prefill=[(130, 0), (5, 30)], decode_ctx=[40, 70, 150])
BLOCK_SIZE = 32
NUM_BLOCKS = 64
MAX_BATCH_TOKENS = 512
CACHE_SEED = 1
FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2


def engine_for(payload: dict, backend: str, dtype: torch.dtype) -> TransformersCBEngine:
    """The engine with seeded weights and a cache holding finite values (its past tokens)."""
    config = build_hf_config(ModelSpec(model_id="tiny", config=payload, source="test"))
    torch.manual_seed(0)
    engine = TransformersCBEngine(config, attention=backend, dtype=dtype, block_size=BLOCK_SIZE,
                                  num_blocks=NUM_BLOCKS, max_batch_tokens=MAX_BATCH_TOKENS)
    engine.build_model()
    engine.build_cache()
    generator = torch.Generator().manual_seed(CACHE_SEED)
    for tensor in [*engine.cache.key_cache, *engine.cache.value_cache]:
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return engine


def captured_calls(engine: TransformersCBEngine, backend: str, batch: Batch) -> tuple[object, list]:
    kwargs = engine.step_inputs(batch)
    with capture_attention_calls(backend) as (original, calls), torch.no_grad():
        engine.model(**kwargs)
    return original, calls


@pytest.mark.parametrize(
    ("payload", "dtype", "tolerance"),
    [
        (TINY_LLAMA, torch.float32, FP32_TOLERANCE),
        (TINY_LLAMA, torch.bfloat16, BF16_TOLERANCE),
        (GEMMA2_SLIDING, torch.float32, FP32_TOLERANCE),
    ],
    ids=["gqa-fp32", "gqa-bf16", "sliding-fp32"],
)
def test_flex_equals_paged_sdpa_layer_by_layer(payload, dtype, tolerance):
    engine = engine_for(payload, SDPA, dtype)
    sdpa, calls = captured_calls(engine, SDPA, MIXED)
    windows = set()
    for module, args, kwargs in calls:
        windows.add(engine.cache.sliding_windows[module.layer_idx])
        with torch.no_grad():
            expected, _ = sdpa(module, *args, **dict(kwargs))
            got, _ = flex_paged.paged_flex_attention_forward(module, *args, **dict(kwargs))
        assert got.shape == expected.shape == (1, MIXED.tokens, payload["num_attention_heads"], module.head_dim)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    if payload is GEMMA2_SLIDING:
        assert windows == {flex_paged.FULL_WINDOW, WINDOW}


def test_block_mask_is_the_engines_4d_mask():
    engine = engine_for(GEMMA2_SLIDING, SDPA, torch.float32)
    kwargs = engine.step_inputs(MIXED)
    for layer_type, window in (("full_attention", flex_paged.FULL_WINDOW), ("sliding_attention", WINDOW)):
        dense = kwargs["attention_mask"][layer_type][0, 0]
        cu_k = kwargs["cu_seq_lens_k"][layer_type]
        block_mask = flex_paged.packed_block_mask(kwargs["cu_seq_lens_q"], cu_k, *dense.shape, window)
        allowed = create_mask(block_mask.mask_mod, None, None, *dense.shape, device="cpu")[0, 0]
        assert torch.equal(allowed, dense == 0), layer_type


def test_whole_step_on_a_flex_engine_matches_sdpa():
    flex = engine_for(GEMMA2_SLIDING, FLEX, torch.float32)
    sdpa = engine_for(GEMMA2_SLIDING, SDPA, torch.float32)
    flex_inputs, sdpa_inputs = flex.step_inputs(MIXED), sdpa.step_inputs(MIXED)
    assert flex_inputs["attention_mask"] is None  # the engine prepares no 4D mask for this backend
    with torch.no_grad():
        got = flex.model(**flex_inputs).logits
        expected = sdpa.model(**sdpa_inputs).logits
    torch.testing.assert_close(got, expected, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)


def test_logit_softcapping_is_applied():
    """gemma-2 asks for soft-capped scores; the flex backend applies them (paged|sdpa drops them)."""
    engine = engine_for({**GEMMA2_SLIDING, "attn_logit_softcapping": SOFTCAP}, SDPA, torch.float32)
    _, calls = captured_calls(engine, SDPA, MIXED)
    module, (query, key, value, mask), kwargs = calls[0]
    assert kwargs["softcap"] == SOFTCAP
    with torch.no_grad():
        got, _ = flex_paged.paged_flex_attention_forward(module, query, key, value, mask, **dict(kwargs))
        expected = softcapped_reference(module, query, key, value, mask, kwargs)
    torch.testing.assert_close(got, expected, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)


def softcapped_reference(module, query, key, value, mask, kwargs) -> torch.Tensor:
    """Scores soft-capped, then the engine's 4D mask, softmax and values: plain math."""
    cache = kwargs["cache"]
    keys, values = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                                read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    groups = query.shape[1] // keys.shape[1]
    keys = keys.transpose(0, 1).repeat_interleave(groups, dim=0)
    values = values.transpose(0, 1).repeat_interleave(groups, dim=0)
    scores = query[0] @ keys.transpose(1, 2) * kwargs["scaling"]
    scores = SOFTCAP * torch.tanh(scores / SOFTCAP) + mask[0]
    return (scores.softmax(dim=-1) @ values).transpose(0, 1).unsqueeze(0)


def test_a_step_builds_one_block_mask_for_all_its_calls():
    """Every layer of a step and every timed repeat reuse the step's mask; a new step builds anew."""
    engine = engine_for(TINY_LLAMA, FLEX, torch.float32)
    built = flex_paged._BLOCK_MASKS.built
    _, calls = captured_calls(engine, FLEX, MIXED)
    module, args, kwargs = calls[0]
    with torch.no_grad():
        for _ in range(3):
            flex_paged.paged_flex_attention_forward(module, *args, **dict(kwargs))
    assert len(calls) == TINY_LLAMA["num_hidden_layers"] and flex_paged._BLOCK_MASKS.built == built + 1
    captured_calls(engine, FLEX, Batch.of(decode_ctx=[40, 70]))
    assert flex_paged._BLOCK_MASKS.built == built + 2


def test_a_new_models_attention_forgets_the_previous_models_compiled_flex():
    """One profiling run measures many models: each model's attention runner starts from no
    compiled flex variants and no cached masks, so variants never pile up to the recompile limit."""
    flex_paged._compiled_flex()
    engine = engine_for(TINY_LLAMA, FLEX, torch.float32)
    captured_calls(engine, FLEX, MIXED)
    assert flex_paged._compiled_flex.cache_info().currsize == 1 and flex_paged._BLOCK_MASKS._masks
    config = build_hf_config(ModelSpec(model_id="tiny", config=TINY_LLAMA, source="test"))
    EngineAttention(config, backend=FLEX, dtype=torch.float32, device="cpu", max_tokens=MAX_BATCH_TOKENS,
                    max_kv=NUM_BLOCKS * BLOCK_SIZE, max_seqs=8, period=1)
    assert flex_paged._compiled_flex.cache_info().currsize == 0 and not flex_paged._BLOCK_MASKS._masks
