"""The engine-built attention call the profiler times picks the layer kind the trace recorded, and
can move from layer to layer between calls (lab/attention_l2.py)."""

from __future__ import annotations

import pytest
import torch

from dooly.engines.base import Batch
from dooly.engines.transformers_cb import EngineAttention, TransformersCBEngine
from dooly.models.registry import build_hf_config, bundled_model_ids, resolve_model

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


def test_the_runner_stops_its_step_before_the_logits():
    """The step that hands over the attention calls ends before the output embedding (the costliest
    part of a one-layer forward on a CPU), and the calls it hands over run as before."""
    config = build_hf_config(resolve_model("meta-llama/Llama-3.2-1B"), **SMALL)
    attention = EngineAttention(config, backend="paged|sdpa", dtype=torch.float32, device="cpu", max_tokens=64,
                                max_kv=512, max_seqs=4, period=1, rotation=2)
    head = attention.engine.model.get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    # Prefills without context: a cached context would be uninitialised cache memory (NaN at times).
    call = attention.call_for(Batch.of(prefill=[(8, 0), (4, 0)]), sliding=False)
    assert calls == []
    assert call()[0].isfinite().all()
    # The engine's own steps still compute their logits.
    attention.engine.model(**attention.engine.step_inputs(Batch.of(prefill=[(8, 0)])))
    assert calls == [1]


@pytest.mark.parametrize("model_id", sorted({resolve_model(m).config["model_type"]: m
                                             for m in bundled_model_ids()}.values()))
def test_every_weight_of_a_bundled_architecture_is_drawn_by_transformers_alone(model_id, monkeypatch):
    """torch's initialisers, which every module's constructor runs before transformers draws each
    weight again, are skipped (`_weight_init`): here they write NaN instead, and none may remain."""
    from dooly.engines import transformers_cb

    poisoned = []

    def poison(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        poisoned.append(tensor.shape)
        with torch.no_grad():
            return tensor.fill_(float("nan"))

    monkeypatch.setattr(transformers_cb, "_skip_init", poison)
    config = build_hf_config(resolve_model(model_id), **SMALL)
    model = TransformersCBEngine(config, attention="paged|sdpa", dtype=torch.float32).build_model()
    assert poisoned  # the constructors' initialisers ran as `_skip_init`
    undrawn = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
               if tensor.is_floating_point() and not tensor.isfinite().all()]
    assert not undrawn
