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


def _truth(warm_passes: int):
    from dooly.sim.validate import GroundTruth, MeasuredRequest

    requests = [
        MeasuredRequest(f"r{i}", arrived_at_s=float(i), first_token_s=i + 0.05, finished_s=i + 0.1,
                        prompt_tokens=300 + 50 * i, output_tokens=4)
        for i in range(6)
    ]
    return GroundTruth(requests, [], warm_passes=warm_passes)


def test_validate_simulates_the_benchs_warm_passes_before_the_recorded_one():
    from dooly.sim.validate import validate

    overhead = CpuOverheadModel(terms={"default": OverheadTerms()}, graph_capture_s=CAPTURE_S)
    cold = validate(_truth(0), TransformersCBScheduler(SETTINGS), _FlatSteps(), overhead)
    warm = validate(_truth(1), TransformersCBScheduler(SETTINGS), _FlatSteps(), overhead)
    assert max(r.ttft_s for r in cold.result.requests) >= CAPTURE_S
    assert max(r.ttft_s for r in warm.result.requests) < CAPTURE_S


def test_warm_passes_are_read_from_bench_json_and_checked(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from dooly.errors import DoolyError
    from dooly.sim.validate import load_ground_truth

    row = {"request_id": "r0", "arrived_at_s": 0.0, "first_token_s": 0.1, "finished_s": 0.2, "prompt_tokens": 8,
           "output_tokens": 2, "token_times_s": [0.1, 0.2], "error": ""}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "requests.parquet")
    (tmp_path / "bench.json").write_text(json.dumps({"warm_passes": 2}))
    assert load_ground_truth(tmp_path).warm_passes == 2
    (tmp_path / "bench.json").write_text(json.dumps({"warm_passes": "two"}))
    with pytest.raises(DoolyError, match="warm_passes must be an integer"):
        load_ground_truth(tmp_path)


def test_validate_serves_the_harness_warm_up_first_and_its_graphs_are_held():
    """The warm-up requests capture the shapes of short prompts' decodes: a recorded pass of such
    requests then pays no capture for them, in the engine and in the simulation."""
    from dooly.sim.validate import validate

    overhead = CpuOverheadModel(terms={"default": OverheadTerms()}, graph_capture_s=CAPTURE_S)
    cold = _truth(0)
    warmed = _truth(0)
    warmed.warmup = [Request(f"warmup-{i}", 0.0, 400, 4) for i in range(1)]
    cold_tpot = [r.tpot_s for r in validate(cold, TransformersCBScheduler(SETTINGS), _FlatSteps(), overhead).result.requests]
    warm_tpot = [r.tpot_s for r in validate(warmed, TransformersCBScheduler(SETTINGS), _FlatSteps(), overhead).result.requests]
    # The first request's decodes captured their shape cold; after the warm-up they replay it.
    assert cold_tpot[0] > CAPTURE_S / 4 > warm_tpot[0]


def test_warm_up_requests_are_read_from_bench_json(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from dooly.engines.groundtruth import DEFAULT_WARMUP_REQUESTS, WARMUP_PROMPT_TOKENS
    from dooly.errors import DoolyError
    from dooly.sim.validate import load_ground_truth

    row = {"request_id": "r0", "arrived_at_s": 0.0, "first_token_s": 0.1, "finished_s": 0.2, "prompt_tokens": 8,
           "output_tokens": 2, "token_times_s": [0.1, 0.2], "error": ""}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "requests.parquet")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"engine": "transformers", "warmup": {"requests": 2, "prompt_tokens": 16, "output_tokens": 3}}))
    assert [(r.prompt_tokens, r.output_tokens) for r in load_ground_truth(tmp_path).warmup] == [(16, 3), (16, 3)]
    # Recorded before bench.json said so: the transformers harness's defaults; another engine: none.
    bench.write_text(json.dumps({"engine": "transformers"}))
    warmup = load_ground_truth(tmp_path).warmup
    assert len(warmup) == DEFAULT_WARMUP_REQUESTS and warmup[0].prompt_tokens == WARMUP_PROMPT_TOKENS
    bench.write_text(json.dumps({"engine": "vllm"}))
    assert load_ground_truth(tmp_path).warmup == []
    bench.write_text(json.dumps({"engine": "transformers", "warmup": {"requests": -1}}))
    with pytest.raises(DoolyError, match="warmup must hold non-negative integers"):
        load_ground_truth(tmp_path)
