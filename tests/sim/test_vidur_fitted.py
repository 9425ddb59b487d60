"""Vidur's per-layer operations from fitted models: every inventory operation is charged to the
Vidur timer of the module that ran it, its per-forward count split over its modules and layers."""

from __future__ import annotations

import pytest

from dooly.sim.vidur import VidurPoint, fitted_op_predictor, vidur_op_of

LAYERS = 4
INVENTORY = {
    "operations": [
        {"signature": "emb", "op": "aten.embedding.default", "count": 1, "modules": ["model.embed_tokens"]},
        # The RMSNorm kernels: both layer norms and the final norm share one signature.
        {"signature": "norm", "op": "aten.mul.Tensor", "count": 2 * LAYERS + 1,
         "modules": ["model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm", "model.norm"]},
        {"signature": "qo", "op": "aten.mm.default", "count": 2 * LAYERS,
         "modules": ["model.layers.*.self_attn.o_proj", "model.layers.*.self_attn.q_proj"]},
        {"signature": "attn", "op": "attention", "count": LAYERS, "modules": ["model.layers.*.self_attn"]},
        {"signature": "rope", "op": "aten.neg.default", "count": 2 * LAYERS, "modules": ["model.layers.*.self_attn"]},
        {"signature": "cos", "op": "aten.cos.default", "count": 1, "modules": ["model.rotary_emb"]},
        {"signature": "resid", "op": "aten.add.Tensor", "count": 2 * LAYERS, "modules": ["model.layers.*"]},
        {"signature": "head", "op": "aten.mm.default", "count": 1, "modules": ["lm_head"]},
    ]
}
SECONDS = {"emb": 1.0, "norm": 2.0, "qo": 3.0, "attn": 5.0, "rope": 7.0, "cos": 8.0, "resid": 11.0, "head": 13.0}


class FakeStepPredictor:
    """Per-execution seconds per signature; attention grows with the batch's context."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[tuple[int, int]], list[int]]] = []

    def op_seconds(self, prefill, decode_ctx):
        self.batches.append((list(prefill), list(decode_ctx)))
        context = sum(c for _, c in prefill) + sum(decode_ctx)
        return [
            {"signature": sig, "seconds": s * (1 + context) if sig == "attn" else s}
            for sig, s in SECONDS.items()
        ]


def test_module_names_map_to_vidur_timers():
    assert vidur_op_of("model.embed_tokens", "aten.embedding.default") == "emb"
    assert vidur_op_of("model.layers.*.self_attn.k_proj", "aten.mm.default") == "attn_pre_proj"
    assert vidur_op_of("model.layers.*.mlp.gate_proj", "aten.mm.default") == "mlp_up_proj"
    assert vidur_op_of("model.layers.*.mlp", "aten.mul.Tensor") == "mlp_act"
    assert vidur_op_of("model.layers.*.self_attn", "attention") == "attention"
    assert vidur_op_of("lm_head", "aten.mm.default") is None
    assert vidur_op_of("model.norm", "aten.mul.Tensor") is None


def test_counts_are_split_over_modules_and_layers():
    predict = fitted_op_predictor(FakeStepPredictor(), INVENTORY, LAYERS)
    point = VidurPoint(num_tokens=64)
    assert predict("emb", point) == pytest.approx(1.0)
    # 2L+1 executions: L per layer norm, one for the final norm (not a Vidur op).
    assert predict("input_layernorm", point) == pytest.approx(2.0)
    assert predict("post_attention_layernorm", point) == pytest.approx(2.0)
    assert predict("attn_post_proj", point) == pytest.approx(3.0)
    assert predict("attn_pre_proj", point) == pytest.approx(3.0)  # q_proj's share; k and v absent here
    # Two rope kernels per layer, plus the model-level rotary embedding spread over the layers.
    assert predict("attn_rope", point) == pytest.approx(2 * 7.0 + 8.0 / LAYERS)
    assert predict("add", point) == pytest.approx(2 * 11.0)
    assert predict("mlp_down_proj", point) == 0.0


def test_attention_follows_the_point_batch():
    fake = FakeStepPredictor()
    predict = fitted_op_predictor(fake, INVENTORY, LAYERS)
    decode = VidurPoint(num_tokens=8, batch_size=8, kv_cache_size=100)
    prefill = VidurPoint(num_tokens=256, batch_size=1, prefill_chunk_size=256, kv_cache_size=512, is_prefill=True)
    assert predict("attn_decode", decode) == pytest.approx(5.0 * (1 + 800))
    assert predict("attn_prefill", prefill) == pytest.approx(5.0 * (1 + 512))
    assert fake.batches == [([], [100] * 8), ([(256, 512)], [])]
    predict("attn_input_reshape", decode)
    assert len(fake.batches) == 2  # one evaluation per point, whatever the number of timers
