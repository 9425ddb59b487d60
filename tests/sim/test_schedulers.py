"""Scheduler decisions on small scenarios worked out by hand from the engines' rules."""

from __future__ import annotations

import pytest

from dooly.errors import DoolyError
from dooly.sim.schedulers import (
    SimulationError,
    TransformersCBScheduler,
    VllmScheduler,
    make_scheduler,
)
from dooly.sim.step_model import StepKind


def _tf(**settings):
    return TransformersCBScheduler(settings)


# -- transformers continuous batching --------------------------------------------------------------


def test_transformers_chunks_a_long_prompt_under_the_token_budget(drive):
    steps, seqs = drive(_tf(max_batch_tokens=100, block_size=16, num_blocks=64), [("a", 250, 3, 0)])
    assert steps == [
        [("a", 100, 0)],
        [("a", 100, 100)],
        [("a", 50, 200)],  # last chunk: samples the first token
        [("a", 1, 250)],
        [("a", 1, 251)],
    ]
    assert seqs["a"].generated == 3


def test_transformers_fifo_puts_decodes_before_split_prefills(drive):
    requests = [("a", 10, 5, 0), ("b", 200, 2, 0)]
    steps, _ = drive(_tf(max_batch_tokens=64, block_size=16, num_blocks=64, safety_margin=0.0), requests)
    assert steps[0] == [("a", 10, 0), ("b", 54, 0)]
    assert steps[1] == [("a", 1, 10), ("b", 63, 54)]


def test_transformers_prefill_first_puts_split_prefills_before_decodes(drive):
    requests = [("a", 10, 5, 0), ("b", 200, 2, 0)]
    steps, _ = drive(_tf(scheduler_type="prefill_first", max_batch_tokens=64, block_size=16, num_blocks=64), requests)
    assert steps[0] == [("a", 10, 0), ("b", 54, 0)]
    # b's remaining 146 tokens take the whole budget: a's decode waits.
    assert steps[1] == [("b", 64, 54)]
    assert steps[2] == [("b", 64, 118)]
    assert steps[3] == [("b", 18, 182), ("a", 1, 10)]


def test_transformers_safety_margin_holds_back_new_prefills(drive):
    # 20 blocks of 4 tokens; a 68-token prompt takes (68 + 1) // 4 + 1 = 18 blocks, leaving 2 free,
    # under FIFO's default margin of 0.15 * 20 = 3 blocks: b must wait while a decodes.
    requests = [("a", 68, 3, 0), ("b", 4, 2, 0)]
    fifo_steps, _ = drive(_tf(block_size=4, num_blocks=20), requests)
    assert fifo_steps[0] == [("a", 68, 0)]
    assert fifo_steps[1] == [("a", 1, 68)]
    # prefill-first has no margin: both start together.
    pf_steps, _ = drive(_tf(scheduler_type="prefill_first", block_size=4, num_blocks=20), requests)
    assert pf_steps[0] == [("a", 68, 0), ("b", 4, 0)]


def test_transformers_block_exhaustion_soft_resets_the_newest_starved_request(drive):
    # 6 blocks of 4 tokens. Each 8-token prompt takes (8 + 1) // 4 + 1 = 3 blocks: the cache is
    # full after step 1. At step 6 both need a fourth block: b (the newest) is evicted and
    # requeued with its 5 generated tokens appended to its prompt; new requests stay blocked
    # until a finishes, then b re-prefills 13 tokens.
    scheduler = _tf(block_size=4, num_blocks=6, safety_margin=0.0)
    steps, seqs = drive(scheduler, [("a", 8, 10, 0), ("b", 8, 10, 0)])
    expected = [[("a", 8, 0), ("b", 8, 0)]]
    expected += [[("a", 1, c), ("b", 1, c)] for c in (8, 9, 10, 11)]
    expected += [[("a", 1, c)] for c in (12, 13, 14, 15, 16)]
    expected += [[("b", 13, 0)]]
    expected += [[("b", 1, c)] for c in (13, 14, 15, 16)]
    assert steps == expected
    assert seqs["b"].preemptions == 1 and seqs["a"].preemptions == 0
    assert scheduler.free_blocks == 6


def test_transformers_cpu_offload_keeps_progress(drive):
    # Same scenario with a CPU swap pool big enough for b: b keeps its KV cache and resumes
    # with a 1-token step at context 12 instead of recomputing 13 tokens.
    scheduler = _tf(block_size=4, num_blocks=6, safety_margin=0.0, cpu_offload_blocks=8)
    steps, seqs = drive(scheduler, [("a", 8, 10, 0), ("b", 8, 10, 0)])
    resumed = [s for s in steps if s and s[0][0] == "b" and len(s) == 1]
    assert resumed[0] == [("b", 1, 12)]
    assert seqs["b"].preemptions == 1
    assert scheduler.free_cpu_blocks == 8


def test_transformers_raises_when_one_request_cannot_fit(drive):
    with pytest.raises(SimulationError, match="too small"):
        drive(_tf(block_size=4, num_blocks=4, safety_margin=0.0), [("a", 8, 40, 0)])


def test_transformers_respects_max_requests_per_batch(drive):
    requests = [(f"r{i}", 4, 2, 0) for i in range(5)]
    steps, _ = drive(_tf(max_requests_per_batch=2, safety_margin=0.0), requests)
    assert [len(s) for s in steps[:2]] == [2, 2]


def test_transformers_cuda_graph_pads_varlen_steps():
    scheduler = _tf(use_cuda_graph=True, num_blocks=64)
    from dooly.sim.schedulers import Seq

    for i in range(3):
        scheduler.add(Seq(f"r{i}", 0.0, 30, 4))
    batch = scheduler.schedule()
    assert batch.path.kind is StepKind.PREFILL
    assert batch.path.padded_tokens == 128  # 90 tokens, padded to the next multiple of 64
    assert batch.path.cuda_graph and batch.path.engine_path == "varlen"


def test_transformers_decode_fast_path_pads_to_a_power_of_two():
    from dooly.sim.schedulers import Seq

    scheduler = _tf(use_cuda_graph=[False, True], max_blocks_per_request=8, block_size=16, num_blocks=64)
    for i in range(3):
        scheduler.add(Seq(f"r{i}", 0.0, 5, 4))
    first = scheduler.schedule()
    assert first.path.engine_path == "varlen" and not first.path.cuda_graph
    for seq, _ in first.samplers:
        seq.generated += 1
    decode = scheduler.schedule()
    assert decode.path.kind is StepKind.DECODE
    assert decode.path.engine_path == "decode_fast_path"
    assert decode.path.cuda_graph and decode.path.padded_tokens == 4


# -- vLLM v1 ---------------------------------------------------------------------------------------


def test_vllm_schedules_running_requests_then_chunks_waiting_prefills(drive):
    scheduler = VllmScheduler({"max_num_batched_tokens": 64, "block_size": 16, "num_gpu_blocks": 64})
    steps, seqs = drive(scheduler, [("a", 10, 5, 0), ("b", 200, 2, 0)])
    assert steps[:5] == [
        [("a", 10, 0), ("b", 54, 0)],
        [("a", 1, 10), ("b", 63, 54)],
        [("a", 1, 11), ("b", 63, 117)],
        [("a", 1, 12), ("b", 20, 180)],
        [("a", 1, 13), ("b", 1, 200)],
    ]
    assert seqs["a"].generated == 5 and seqs["b"].generated == 2


def test_vllm_caps_running_requests_at_max_num_seqs(drive):
    scheduler = VllmScheduler({"max_num_seqs": 2})
    steps, _ = drive(scheduler, [("a", 4, 3, 0), ("b", 4, 3, 0), ("c", 4, 3, 0)])
    assert [rid for rid, _, _ in steps[0]] == ["a", "b"]
    assert ("c", 4, 0) in steps[3]


def test_vllm_preempts_the_last_running_request_by_recompute(drive):
    # 6 usable blocks of 4 tokens (7 minus vLLM's null block); a and b hold 3 blocks each after step 2. At step 6 a needs a fourth:
    # b, last in the running list, is preempted (blocks freed, recompute later); no waiting request
    # is admitted in a step with a preemption, and b's 13 tokens (8 + 5 generated) need 4 blocks,
    # which only free up when a finishes.
    scheduler = VllmScheduler({"block_size": 4, "num_gpu_blocks": 7})
    steps, seqs = drive(scheduler, [("a", 8, 10, 0), ("b", 8, 10, 0)])
    expected = [[("a", 8, 0), ("b", 8, 0)]]
    expected += [[("a", 1, c), ("b", 1, c)] for c in (8, 9, 10, 11)]
    expected += [[("a", 1, c)] for c in (12, 13, 14, 15, 16)]
    expected += [[("b", 13, 0)]]
    expected += [[("b", 1, c)] for c in (13, 14, 15, 16)]
    assert steps == expected
    assert seqs["b"].preemptions == 1
    assert scheduler.free_blocks == 6


def test_vllm_without_chunked_prefill_waits_for_budget(drive):
    scheduler = VllmScheduler({"max_num_batched_tokens": 64, "enable_chunked_prefill": False})
    steps, _ = drive(scheduler, [("a", 40, 3, 0), ("b", 40, 3, 0)])
    assert steps[0] == [("a", 40, 0)]
    assert steps[1] == [("a", 1, 40), ("b", 40, 0)]


def test_vllm_cuda_graph_paths():
    from dooly.sim.schedulers import Seq

    scheduler = VllmScheduler({"max_cudagraph_capture_size": 16})
    seqs = [Seq(f"r{i}", 0.0, 6, 3) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    prefill = scheduler.schedule()  # 18 tokens: over the largest captured size
    assert prefill.path.engine_path == "eager" and not prefill.path.cuda_graph
    for seq, _ in prefill.samplers:
        seq.generated += 1
    decode = scheduler.schedule()
    assert decode.path.kind is StepKind.DECODE
    assert decode.path.engine_path == "full_graph" and decode.path.padded_tokens == 4
    scheduler.add(Seq("late", 0.0, 5, 2))
    for seq, _ in decode.samplers:
        seq.generated += 1
    mixed = scheduler.schedule()
    assert mixed.path.kind is StepKind.MIXED
    assert mixed.path.engine_path == "piecewise_graph" and mixed.path.padded_tokens == 8


def test_engine_settings_are_checked():
    with pytest.raises(DoolyError, match="unknown key"):
        make_scheduler("transformers", {"num_block": 3})
    with pytest.raises(DoolyError, match="scheduler_type"):
        make_scheduler("transformers", {"scheduler_type": "lifo"})
    with pytest.raises(DoolyError, match="cudagraph_mode"):
        make_scheduler("vllm", {"cudagraph_mode": "sometimes"})
    with pytest.raises(DoolyError, match="no scheduler model"):
        make_scheduler("sglang", {})
    assert make_scheduler("transformers", {"scheduler_type": "prefill_first"}).config.safety_margin == 0.0
    assert make_scheduler("transformers", {}).config.safety_margin == 0.15
