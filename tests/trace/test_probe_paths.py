"""Every config transformers builds traces in every phase, even when the probe config would take
another code path (dooly.trace.tracer._probe_on_same_path)."""

import logging

import pytest
from trace_configs import TINY_GEMMA2, TINY_MIXTRAL, TINY_QWEN2_MOE, TINY_STARCODER2, write_config

from dooly.trace.tracer import PHASES, trace_model


@pytest.mark.parametrize("phase", PHASES)
def test_starcoder2_like_config_traces_every_phase(config_dir, phase, caplog):
    path = write_config(config_dir, "starcoder2", TINY_STARCODER2)
    with caplog.at_level(logging.INFO, logger="dooly.trace.tracer"):
        trace = trace_model(str(path), phase=phase)
    assert trace.unlabeled_dims() == 0
    assert any(o.kind == "attention" for o in trace.operations)
    ops = {o.op for o in trace.operations}
    assert "aten.gelu.default" in ops and any("layer_norm" in op for op in ops)
    # Dims sized by fields other than the one re-probed keep their names.
    fields = {f for o in trace.operations for t in o.inputs for d in t.dims for f in d.fields}
    assert {"hidden_size", "intermediate_size"} <= fields


@pytest.mark.parametrize("config", [TINY_QWEN2_MOE, TINY_MIXTRAL, TINY_GEMMA2], ids=["qwen2_moe", "mixtral", "gemma2"])
def test_other_architectures_trace_decode(config_dir, config):
    path = write_config(config_dir, config["model_type"], config)
    trace = trace_model(str(path), phase="decode")
    assert trace.unlabeled_dims() == 0
    assert trace.operations
