"""The tracer's labels, checked dim by dim and against a concrete run of the same engine step."""

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from trace_configs import COLLIDING_LLAMA, TINY_GEMMA2, TINY_LLAMA, TINY_MIXTRAL, write_config

from dooly.engines.base import Batch
from dooly.engines.transformers_cb import TransformersCBEngine
from dooly.errors import DoolyError
from dooly.models.registry import build_hf_config, bundled_model_ids, resolve_model
from dooly.trace.recorder import ModuleStack, OpRecorder, capture_attention
from dooly.trace.schema import KIND_ATTENTION, KIND_INNER, ORIGIN_CONFIG, ORIGIN_REQUEST, Trace
from dooly.trace.tracer import _fold_layer, _window, trace_model


def ops(trace: Trace, op: str, module: str) -> list:
    return [o for o in trace.operations if o.op == op and o.module == module]


def labels(spec) -> list[tuple[str, str]]:
    return [(d.origin, d.expr) for d in spec.dims]


def test_two_layer_llama_labels_dim_by_dim(config_dir):
    path = write_config(config_dir, "tiny", TINY_LLAMA)
    trace = trace_model(str(path), phase="mixed")
    assert trace.unlabeled_dims() == 0
    assert trace.traced_layers == 1 and trace.total_layers == 2

    (q_proj,) = [o for o in ops(trace, "aten.mm.default", "model.layers.*.self_attn.q_proj")]
    assert q_proj.count == 2
    assert labels(q_proj.inputs[0]) == [("request", "T"), ("config", "hidden_size")]
    assert [d.value for d in q_proj.inputs[1].dims] == [64, 64]
    (k_proj,) = ops(trace, "aten.mm.default", "model.layers.*.self_attn.k_proj")
    assert labels(k_proj.inputs[1]) == [("config", "hidden_size"), ("config", "num_key_value_heads*head_dim")]
    assert k_proj.inputs[1].dims[1].value == 32
    assert set(k_proj.inputs[1].dims[1].fields) == {"num_key_value_heads", "head_dim"}
    (gate,) = ops(trace, "aten.mm.default", "model.layers.*.mlp.gate_proj")
    assert labels(gate.outputs[0]) == [("request", "T"), ("config", "intermediate_size")]

    (attention,) = [o for o in trace.operations if o.kind == "attention"]
    assert attention.count == 2 and attention.backend == "paged|sdpa"
    q, k, v, mask, read_index, write_index = attention.inputs
    assert labels(q) == [("config", "1"), ("config", "num_attention_heads"), ("request", "T"), ("config", "head_dim")]
    assert labels(k) == [("config", "1"), ("config", "num_key_value_heads"), ("request", "T"), ("config", "head_dim")]
    assert labels(mask) == [("config", "1"), ("config", "1"), ("request", "T"), ("request", "K")]
    assert labels(read_index) == [("request", "K")]
    assert labels(write_index) == [("request", "T")]

    (lm_head,) = ops(trace, "aten.mm.default", "lm_head")
    assert labels(lm_head.inputs[0]) == [("request", "B"), ("config", "hidden_size")]
    assert labels(lm_head.outputs[0]) == [("request", "B"), ("config", "vocab_size")]
    cache_write = [o for o in trace.operations if o.op == "aten.index_copy_.default"]
    assert cache_write and cache_write[0].inputs[0].dims[0].fields == ("engine.num_blocks", "engine.block_size")


def test_colliding_numbers_keep_their_own_labels(config_dir):
    """layers = heads = B = 2 * kv heads = 4 and head_dim = 6 = a prefill chunk: labels stay exact."""
    path = write_config(config_dir, "collide", COLLIDING_LLAMA)
    trace = trace_model(str(path), phase="mixed")
    assert trace.request_point["B"] == COLLIDING_LLAMA["num_attention_heads"]
    assert trace.unlabeled_dims() == 0
    (attention,) = [o for o in trace.operations if o.kind == "attention"]
    assert labels(attention.inputs[0]) == [
        ("config", "1"), ("config", "num_attention_heads"), ("request", "T"), ("config", "head_dim")
    ]
    (lm_head,) = ops(trace, "aten.mm.default", "lm_head")
    assert labels(lm_head.inputs[0])[0] == ("request", "B")
    for op in trace.operations:
        for dim in op.all_dims():
            if dim.origin == ORIGIN_REQUEST:
                assert re.fullmatch(r"[0-9TBKS+*() ]+", dim.expr), dim


def test_decode_phase_has_no_token_variable(config_dir):
    path = write_config(config_dir, "tiny", TINY_LLAMA)
    trace = trace_model(str(path), phase="decode")
    variables = {v for op in trace.operations for v in op.request_vars()}
    assert variables == {"B", "K"}
    prefill = trace_model(str(path), phase="prefill")
    assert {v for op in prefill.operations for v in op.request_vars()} == {"T", "B"}


def test_moe_token_to_expert_dims(config_dir):
    path = write_config(config_dir, "moe", TINY_MIXTRAL)
    trace = trace_model(str(path), phase="mixed")
    assert trace.unlabeled_dims() == 0
    grouped = [o for o in trace.operations if o.op == "aten._grouped_mm.default"]
    assert len(grouped) == 2
    routed = grouped[0].inputs[0].dims[0]
    assert routed.origin == ORIGIN_REQUEST and routed.expr == "2*T"
    assert routed.config_expr == "num_experts_per_tok*T"
    assert grouped[0].inputs[1].dims[0].expr == "num_local_experts"
    assert grouped[0].inputs[1].dims[2].expr == "2*intermediate_size"


def test_sliding_window_reads_get_their_own_variable(config_dir):
    path = write_config(config_dir, "gemma", TINY_GEMMA2)
    trace = trace_model(str(path), phase="mixed")
    assert trace.unlabeled_dims() == 0
    assert trace.traced_layers == 2 and trace.total_layers == 4
    attentions = [o for o in trace.operations if o.kind == "attention"]
    assert len(attentions) == 2
    windows = {o.scalars.get("sliding_window") for o in attentions}
    assert windows == {None, TINY_GEMMA2["sliding_window"]}
    sliding = next(o for o in attentions if o.scalars.get("sliding_window"))
    assert labels(sliding.inputs[3])[3] == ("request", "S")
    full = next(o for o in attentions if not o.scalars.get("sliding_window"))
    assert labels(full.inputs[3])[3] == ("request", "K")
    assert all(o.count == 2 for o in attentions)


def test_tensor_parallel_rank_and_collectives(config_dir):
    path = write_config(config_dir, "tiny", TINY_LLAMA)
    trace = trace_model(str(path), phase="mixed", tp=2)
    assert trace.unlabeled_dims() == 0
    (q_proj,) = ops(trace, "aten.mm.default", "model.layers.*.self_attn.q_proj")
    out = q_proj.inputs[1].dims[1]
    assert out.value == 32 and out.expr.endswith("/tp") and "tp" in out.fields
    kinds = {(c.op, c.module, c.count) for c in trace.collectives}
    assert kinds == {
        ("collective.all_reduce", "model.layers.*.self_attn.o_proj", 2),
        ("collective.all_reduce", "model.layers.*.mlp.down_proj", 2),
        ("collective.all_gather", "lm_head", 1),
    }
    reduce = next(c for c in trace.collectives if c.module.endswith("o_proj"))
    assert labels(reduce.inputs[0]) == [("config", "1"), ("request", "T"), ("config", "hidden_size")]
    # The world size is part of a collective's signature: 2 ranks and 4 ranks are two measurements.
    assert {c.scalars["world_size"] for c in trace.collectives} == {2}


def _evaluate(expr: str, names: Mapping[str, float]) -> float:
    return eval(expr.replace("engine.", "engine_"), {"__builtins__": {}}, names)  # noqa: S307


def _predicts(op: Any, actual: list[list[int]], names: Mapping[str, float]) -> bool:
    """Whether a traced operation's labelled dims, evaluated at the batch's values, give the sizes
    one recorded event actually had."""
    specs = op.inputs + op.outputs
    if len(specs) != len(actual):
        return False
    for spec, sizes in zip(specs, actual):
        if len(spec.dims) != len(sizes):
            return False
        for dim, size in zip(spec.dims, sizes):
            if not math.isclose(_evaluate(dim.expr, names), size):
                return False
    return True


@pytest.mark.parametrize("payload", [TINY_LLAMA, TINY_MIXTRAL, TINY_GEMMA2], ids=["llama", "mixtral", "gemma2"])
def test_labels_predict_a_concrete_run_with_other_sizes(config_dir, payload):
    """Independent check: run the real engine step on the CPU with a different batch, and every
    recorded size must equal its label evaluated at that batch and config."""
    path = write_config(config_dir, "model", payload)
    trace = trace_model(str(path), phase="mixed")
    hf_config = build_hf_config(resolve_model(str(path)))
    window = _window(hf_config)
    batch = Batch.of(prefill=[(11, 0), (5, 30)], decode_ctx=[40, 9, 70])
    engine = TransformersCBEngine(hf_config, attention="paged|sdpa", dtype=torch.bfloat16, block_size=256,
                                  num_blocks=64, max_batch_tokens=2048)
    model = engine.build_model()
    engine.build_cache()
    kwargs = engine.step_inputs(batch)
    modules = ModuleStack(model)
    recorder = OpRecorder(modules)
    with modules, capture_attention(recorder, "paged|sdpa"), recorder, torch.no_grad():
        engine.run_step(kwargs)

    names = {k: v for k, v in hf_config.get_text_config().to_dict().items() if isinstance(v, int)}
    names.setdefault("head_dim", names["hidden_size"] // names["num_attention_heads"])
    names.update(engine_block_size=256, engine_num_blocks=64, engine_max_batch_tokens=2048,
                 T=batch.tokens, B=batch.num_seqs, K=batch.kv_tokens)
    if window:
        names["S"] = sum(s.query + min(s.context, window - 1) for s in batch.seqs)
    by_key: dict[tuple, list] = {}
    for op in trace.operations:
        by_key.setdefault((op.op, op.module), []).append(op)
    checked = 0
    for event in recorder.events:
        module, _ = _fold_layer(event.module)
        candidates = by_key.get((event.op, module))
        assert candidates, f"{event.op} under {module} ran but is not in the trace"
        actual = [list(t.sizes) for t in event.inputs + event.outputs]
        assert any(_predicts(op, actual, names) for op in candidates), (event.op, module, actual)
        checked += 1
    assert checked > 50


@pytest.mark.slow
@pytest.mark.parametrize("model", bundled_model_ids())
def test_every_bundled_model_traces_fully_labeled(model):
    trace = trace_model(model, phase="mixed")
    assert trace.unlabeled_dims() == 0
    assert len(trace.signatures()) > 10
    assert any(o.kind == "attention" for o in trace.operations)
    config_dims = [d for o in trace.operations for d in o.all_dims() if d.origin == ORIGIN_CONFIG]
    assert any(d.fields for d in config_dims)


FLEX = "paged|flex_attention"
TRACES_DIR = Path(__file__).resolve().parents[2] / "data" / "traces"


def outside_attention(trace: Trace) -> set[str]:
    """Signatures of everything a step runs outside its attention call (kernels, views, collectives)."""
    return {o.signature() for o in [*trace.operations, *trace.collectives] if o.kind not in (KIND_ATTENTION, KIND_INNER)}


def test_flex_backend_changes_only_the_attention_call(config_dir):
    """paged|flex_attention shares every other signature with paged|sdpa, so a store that holds a
    model's paged|sdpa profile measures only attention for flex."""
    path = write_config(config_dir, "gemma", TINY_GEMMA2)
    sdpa = trace_model(str(path), phase="mixed", backend="paged|sdpa")
    flex = trace_model(str(path), phase="mixed", backend=FLEX)
    assert flex.unlabeled_dims() == 0
    assert outside_attention(flex) == outside_attention(sdpa)
    attentions = [o for o in flex.operations if o.kind == KIND_ATTENTION]
    assert len(attentions) == 2 and {o.backend for o in attentions} == {FLEX}
    assert {o.scalars.get("sliding_window") for o in attentions} == {None, TINY_GEMMA2["sliding_window"]}
    assert all(o.scalars["softcap"] == TINY_GEMMA2["attn_logit_softcapping"] for o in attentions)
    sliding = next(o for o in attentions if o.scalars.get("sliding_window"))
    assert len(sliding.inputs) == 5  # q, k, v and the indices: no 4D mask, flex builds a block mask on the device
    read_index, write_index = sliding.inputs[3:]
    assert labels(read_index) == [("request", "S")] and labels(write_index) == [("request", "T")]
    assert labels(sliding.outputs[0]) == [("config", "1"), ("request", "T"), ("config", "num_attention_heads"),
                                          ("config", "head_dim")]
    assert not set(flex.signatures((KIND_ATTENTION,))) & set(sdpa.signatures((KIND_ATTENTION,)))


ONE_RANK_SDPA_TRACES = sorted(p for p in TRACES_DIR.glob("*.paged-sdpa.json") if ".tp" not in p.name)


@pytest.mark.parametrize("sdpa_path", ONE_RANK_SDPA_TRACES, ids=lambda p: p.name)
def test_committed_flex_traces_differ_from_sdpa_only_in_attention(sdpa_path):
    """The traces the GPU campaign profiles (data/traces, made with torch 2.13): for every model the
    flex trace's non-attention signatures are its paged|sdpa trace's, already in the store."""
    flex_path = sdpa_path.with_name(sdpa_path.name.replace("paged-sdpa", "paged-flex_attention"))
    sdpa = Trace.from_dict(json.loads(sdpa_path.read_text()))
    flex = Trace.from_dict(json.loads(flex_path.read_text()))
    assert (flex.backend, flex.model_id, flex.tp) == (FLEX, sdpa.model_id, sdpa.tp)
    assert outside_attention(flex) == outside_attention(sdpa)
    assert {o.backend for o in flex.operations if o.kind == KIND_ATTENTION} == {FLEX}


def test_bad_inputs_are_one_line_errors(config_dir):
    with pytest.raises(DoolyError, match="unknown phase"):
        trace_model("meta-llama/Llama-3.2-1B", phase="sideways")
    with pytest.raises(DoolyError, match="attention backend"):
        trace_model("meta-llama/Llama-3.2-1B", backend="flash_attention_9")
    with pytest.raises(DoolyError, match="does not divide"):
        trace_model("meta-llama/Llama-3.2-1B", tp=3)
