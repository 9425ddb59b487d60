"""Warm passes: a simulation continued from an earlier pass holds the CUDA graphs that pass
captured and pays no capture for them, as the engine after `dooly bench --warm-passes`."""

from __future__ import annotations

from dooly.sim.schedulers import TransformersCBScheduler
from dooly.sim.simulator import simulate
from dooly.sim.step_model import CpuOverheadModel, OverheadTerms
from dooly.workload import Request

CAPTURE_S = 0.5
STEP_S = 0.01
SETTINGS = {"num_blocks": 256, "block_size": 64, "max_batch_tokens": 512, "use_cuda_graph": True,
            "q_padding_interval_size": 64, "kv_padding_interval_size": 2048}


class _FlatSteps:
    def step_seconds(self, prefill, decode_ctx):
        return STEP_S


def _pass(captured: set) -> list[float]:
    overhead = CpuOverheadModel(terms={"default": OverheadTerms()}, graph_capture_s=CAPTURE_S)
    requests = [Request(f"r{i}", arrival_s=i * 1.0, prompt_tokens=300 + 50 * i, output_tokens=4) for i in range(6)]
    result = simulate(requests, TransformersCBScheduler(SETTINGS), _FlatSteps(), overhead, captured=captured)
    return [r.ttft_s for r in result.requests]


def test_a_second_pass_on_the_same_engine_pays_no_capture_and_the_first_does():
    captured: set = set()
    cold = _pass(captured)
    assert captured, "the first pass captured the shapes it met"
    warm = _pass(captured)
    assert max(cold) >= CAPTURE_S
    assert max(warm) < CAPTURE_S


def test_the_graph_key_holds_the_padded_longest_sequence():
    scheduler = TransformersCBScheduler(SETTINGS)
    short = CpuOverheadModel.graph_shape(scheduler.path_for([(100, 0)], []))
    long = CpuOverheadModel.graph_shape(scheduler.path_for([(100, 1500)], []))
    # Same padded query and KV read (one 2048-token bucket); the longest sequence pads to
    # 1024 vs 2048 tokens: two graphs, as transformers keys them.
    assert short[:3] == ("varlen", 128, 2048 + 128) and long[:3] == short[:3]
    assert (short[3], long[3]) == (1024, 2048)
