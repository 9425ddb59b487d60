"""The engine-built attention call the profiler times picks the layer kind the trace recorded, and
can move from layer to layer between calls (lab/attention_l2.py)."""

from __future__ import annotations

import torch

from dooly.engines.base import Batch
from dooly.engines.transformers_cb import EngineAttention
from dooly.models.registry import build_hf_config, resolve_model

# Phi-3's shape, shrunk: its forward passes the config's window to attention, its modules carry none.
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
         "num_hidden_layers": 2, "vocab_size": 256, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}


def test_a_window_passed_by_the_forward_counts_as_a_sliding_layer():
    config = build_hf_config(resolve_model("microsoft/Phi-3-mini-4k-instruct"), **SMALL)
    assert config.sliding_window
    attention = EngineAttention(config, backend="paged|sdpa", dtype=torch.float32, device="cpu", max_tokens=64,
                                max_kv=512, max_seqs=4, period=1)
    call = attention.call_for(Batch.of(prefill=[(8, 16)], decode_ctx=[20]), sliding=True)
    out = call()
    assert out[0].shape[-1] == SMALL["hidden_size"] // SMALL["num_attention_heads"]


def test_a_rotated_runner_moves_to_the_next_layer_at_every_call():
    config = build_hf_config(resolve_model("meta-llama/Llama-3.2-1B"), **SMALL)
    # Prefills without context: every key the call reads is written by the step itself (a cached
    # context would be uninitialised cache memory, NaN at times).
    batch = Batch.of(prefill=[(8, 0), (4, 0)])

    def three_calls(rotation: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        attention = EngineAttention(config, backend="paged|sdpa", dtype=torch.float32, device="cpu", max_tokens=64,
                                    max_kv=512, max_seqs=4, period=1, rotation=rotation)
        assert len(attention.engine.model.model.layers) == rotation
        call = attention.call_for(batch, sliding=False)
        return [call()[0] for _ in range(3)]

    one = three_calls(1)
    assert one[0].isfinite().all()
    assert torch.equal(one[0], one[1])
    # Two layers: their own projections fed their own query, keys and values, so calls alternate.
    first, second, third = three_calls(2)
    assert not torch.allclose(first, second)
    assert torch.equal(first, third)


def test_padded_inputs_span_the_padded_extents_and_leave_real_rows_unchanged():
    """The CUDA-graph path's inputs (lab/attention_engine_padding.py): the query and the mask
    span the padded sizes, and the real tokens attend to exactly what they did unpadded."""
    config = build_hf_config(resolve_model("meta-llama/Llama-3.2-1B"), **SMALL)
    batch = Batch.of(prefill=[(8, 0), (4, 0)])
    padded_tokens, padded_read = 16, 32
    torch.manual_seed(0)
    attention = EngineAttention(config, backend="paged|sdpa", dtype=torch.float32, device="cpu", max_tokens=64,
                                max_kv=512, max_seqs=4, period=1)
    plain = attention.engine.step_inputs(batch)
    assert plain["input_ids"].shape[-1] == batch.tokens
    assert plain["attention_mask"].shape[-2:] == (batch.tokens, batch.tokens)
    unpadded = attention.call_for(batch, sliding=False)()[0]

    padded_inputs = attention.engine.step_inputs(batch, (padded_tokens, padded_read))
    assert padded_inputs["input_ids"].shape[-1] == padded_tokens
    assert padded_inputs["attention_mask"].shape[-2:] == (padded_tokens, padded_tokens + padded_read)
    padded = attention.call_for(batch, sliding=False, padded_sizes=(padded_tokens, padded_read))()[0]
    assert padded.shape[1] == padded_tokens
    torch.testing.assert_close(padded[:, : batch.tokens], unpadded)
