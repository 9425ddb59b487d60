"""Simulator invariants and hand-computed timelines."""

from __future__ import annotations

import itertools
import math

import pytest

from dooly.sim.schedulers import SimulationError, TransformersCBScheduler, VllmScheduler
from dooly.sim.simulator import simulate
from dooly.sim.step_model import (
    AnalyticStepModel,
    CpuOverheadModel,
    OverheadTerms,
    StepKind,
)
from dooly.workload import LengthSpec, Request, WorkloadSpec, generate_requests

STEP_S = 0.010


def _workload(n=300, rate=30.0, seed=3):
    spec = WorkloadSpec(
        num_requests=n,
        rate=rate,
        prompt=LengthSpec("uniform", low=16, high=600),
        output=LengthSpec("uniform", low=1, high=120),
        seed=seed,
    )
    return generate_requests(spec)


SCHEDULERS = {
    "tf-fifo": lambda: TransformersCBScheduler({"num_blocks": 96, "block_size": 16}),
    "tf-prefill-first": lambda: TransformersCBScheduler({"num_blocks": 96, "block_size": 16, "scheduler_type": "prefill_first"}),
    "tf-async": lambda: TransformersCBScheduler({"num_blocks": 96, "block_size": 16, "use_async_batching": True}),
    "vllm": lambda: VllmScheduler({"num_gpu_blocks": 300, "max_num_batched_tokens": 512}),
    "vllm-async": lambda: VllmScheduler({"num_gpu_blocks": 300, "async_scheduling": True}),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_request_finishes_with_consistent_metrics(name):
    requests = _workload()
    overhead = CpuOverheadModel(terms={"default": OverheadTerms(constant_s=0.001, per_sequence_s=1e-5)})
    result = simulate(requests, SCHEDULERS[name](), AnalyticStepModel(), overhead, record_token_times=True)
    by_id = {r.request_id: r for r in requests}
    assert len(result.requests) == len(requests)
    for record in result.requests:
        request = by_id[record.request_id]
        assert record.output_tokens == request.output_tokens
        assert record.ttft_s > 0
        assert record.first_token_s >= record.arrival_s
        assert record.finish_s >= record.first_token_s
        times = result.token_times[record.request_id]
        assert len(times) == request.output_tokens
        assert times == sorted(times)
        assert record.ttft_s == pytest.approx(times[0] - request.arrival_s)
        assert record.e2e_s == pytest.approx(times[-1] - request.arrival_s)
        if request.output_tokens > 1:
            assert record.tpot_s == pytest.approx((times[-1] - times[0]) / (request.output_tokens - 1))
        else:
            assert math.isnan(record.tpot_s)
    steps = result.steps
    # Steps never overlap and time only moves forward.
    for before, after in itertools.pairwise(steps):
        assert after.start_s >= before.start_s + before.duration_s - 1e-12
    summary = result.summary()
    assert summary["num_finished"] == len(requests)
    out_tokens = sum(r.output_tokens for r in requests)
    assert summary["throughput"]["output_tokens_per_s"] == pytest.approx(out_tokens / summary["makespan_s"])
    # Every sampled token was either delivered or wasted (async slot after the end, recompute).
    assert sum(s.sampled for s in steps) == out_tokens + summary["wasted_tokens"]
    # A step samples at most once per sequence it holds.
    assert all(s.sampled <= s.num_prefill_seqs + s.num_decode_seqs for s in steps)
    assert summary["ttft_s"]["p50"] <= summary["ttft_s"]["p90"] <= summary["ttft_s"]["p99"]


def test_single_request_timeline_with_constant_steps(constant_model):
    result = simulate([Request("a", 0.5, 100, 5)], TransformersCBScheduler(), constant_model(STEP_S))
    record = result.requests[0]
    assert record.first_token_s == pytest.approx(0.5 + STEP_S)
    assert record.ttft_s == pytest.approx(STEP_S)
    assert record.tpot_s == pytest.approx(STEP_S)
    assert record.e2e_s == pytest.approx(5 * STEP_S)
    assert [s.kind for s in result.steps] == ["prefill"] + ["decode"] * 4


def test_cpu_overhead_adds_to_each_synchronous_step(constant_model):
    overhead = CpuOverheadModel(terms={"prefill": OverheadTerms(constant_s=0.004), "decode": OverheadTerms(constant_s=0.002)})
    result = simulate([Request("a", 0.0, 10, 3)], VllmScheduler({"cudagraph_mode": "none"}), constant_model(STEP_S), overhead)
    record = result.requests[0]
    assert record.ttft_s == pytest.approx(STEP_S + 0.004)
    assert record.e2e_s == pytest.approx(3 * STEP_S + 0.004 + 2 * 0.002)
    assert [s.cpu_s for s in result.steps] == pytest.approx([0.004, 0.002, 0.002])


def test_async_transformers_wastes_one_slot_after_the_last_token(constant_model):
    scheduler = TransformersCBScheduler({"use_async_batching": True})
    result = simulate([Request("a", 0.0, 100, 3)], scheduler, constant_model(STEP_S), record_token_times=True)
    assert result.token_times["a"] == pytest.approx([STEP_S, 2 * STEP_S, 3 * STEP_S])
    assert result.num_steps == 4
    assert result.summary()["wasted_tokens"] == 1


def test_async_vllm_does_not_schedule_past_max_tokens(constant_model):
    scheduler = VllmScheduler({"async_scheduling": True})
    result = simulate([Request("a", 0.0, 100, 3)], scheduler, constant_model(STEP_S))
    assert result.num_steps == 3
    assert result.summary()["wasted_tokens"] == 0


def test_async_host_time_hides_behind_device_time(constant_model):
    slow_host = CpuOverheadModel(terms={"default": OverheadTerms(constant_s=2 * STEP_S)})
    result = simulate(
        [Request("a", 0.0, 100, 3)],
        VllmScheduler({"async_scheduling": True}),
        constant_model(STEP_S),
        slow_host,
        record_token_times=True,
    )
    # The device waits for the host: steps start at 20, 40, 60 ms and last 10 ms.
    assert [s.start_s for s in result.steps] == pytest.approx([0.02, 0.04, 0.06])
    assert result.token_times["a"] == pytest.approx([0.03, 0.05, 0.07])


def test_idle_gaps_wait_for_the_next_arrival(constant_model):
    requests = [Request("a", 0.0, 10, 2), Request("b", 5.0, 10, 2)]
    result = simulate(requests, TransformersCBScheduler(), constant_model(STEP_S))
    b = next(r for r in result.requests if r.request_id == "b")
    assert b.first_token_s == pytest.approx(5.0 + STEP_S)
    assert result.steps[2].start_s == pytest.approx(5.0)


def test_path_aware_models_are_told_the_path(recording_model):
    model = recording_model(STEP_S)
    simulate([Request("a", 0.0, 20, 3)], VllmScheduler(), model)
    assert [p.kind for p in model.paths] == [StepKind.PREFILL, StepKind.DECODE, StepKind.DECODE]
    assert model.paths[1].engine_path == "full_graph"


def test_a_cache_too_small_for_a_request_is_an_error(constant_model):
    with pytest.raises(SimulationError):
        simulate([Request("a", 0.0, 100, 10)], VllmScheduler({"block_size": 16, "num_gpu_blocks": 4}), constant_model(STEP_S))


def test_a_bad_step_model_is_an_error():
    class Broken:
        def step_seconds(self, prefill, decode_ctx):
            return float("nan")

    with pytest.raises(SimulationError, match="step model"):
        simulate([Request("a", 0.0, 10, 2)], VllmScheduler(), Broken())


def test_preemptions_are_counted_under_memory_pressure():
    requests = _workload(n=120, rate=200.0)
    result = simulate(requests, VllmScheduler({"num_gpu_blocks": 120, "block_size": 16}), AnalyticStepModel())
    summary = result.summary()
    assert summary["num_finished"] == len(requests)
    assert summary["preemptions"] > 0
    assert summary["preemptions"] == sum(s.preempted for s in result.steps)


def test_tables_carry_every_record():
    result = simulate(_workload(n=20), VllmScheduler(), AnalyticStepModel(), record_token_times=True)
    requests = result.requests_table()
    steps = result.steps_table()
    assert requests.num_rows == 20 and "token_times_s" in requests.column_names
    assert steps.num_rows == result.num_steps
    assert set(steps.column_names) >= {"start_s", "duration_s", "num_prefill_tokens", "num_decode_seqs", "kv_tokens"}


# ---------------------------------------------------------------------------------------------
# transformers async batching: prepare(N+1) -> launch(N+1) -> update(N) (bench/async_batching.py)
# ---------------------------------------------------------------------------------------------


def _async_run(constant_model, host_s: float, output: int = 4, overhead: CpuOverheadModel | None = None,
               settings: dict | None = None):
    scheduler = TransformersCBScheduler({"use_async_batching": True, **(settings or {})})
    overhead = overhead or CpuOverheadModel(terms={"default": OverheadTerms(constant_s=host_s)})
    return simulate([Request("a", 0.0, 100, output)], scheduler, constant_model(STEP_S), overhead, record_token_times=True)


def test_async_host_work_hides_behind_a_longer_device_step(constant_model):
    host = 0.002
    result = _async_run(constant_model, host)
    # The device starts the first step after its host work, then runs back to back: each step's
    # host work (prepare + launch) happens while the previous one runs.
    assert [s.start_s for s in result.steps] == pytest.approx([host + i * STEP_S for i in range(5)])
    # A step's tokens are handed out when the next one is launched, which is before its device end.
    assert result.token_times["a"] == pytest.approx([host + (i + 1) * STEP_S for i in range(4)])
    assert result.requests[0].tpot_s == pytest.approx(STEP_S)
    sync = simulate([Request("a", 0.0, 100, 4)], TransformersCBScheduler(), constant_model(STEP_S),
                    CpuOverheadModel(terms={"default": OverheadTerms(constant_s=host)}))
    assert sync.requests[0].tpot_s == pytest.approx(STEP_S + host)


def test_async_tokens_wait_for_the_next_launch_when_the_host_is_slower(constant_model):
    host = 0.015  # longer than the 10 ms device step
    result = _async_run(constant_model, host)
    # Device: 15-25 ms, 30-40 ms, ...: it waits for the host each step.
    assert [s.start_s for s in result.steps] == pytest.approx([host * (i + 1) for i in range(5)])
    # Step N's token comes out once step N+1 is launched (30 ms), not when the device is done (25 ms).
    assert result.token_times["a"] == pytest.approx([host * (i + 2) for i in range(4)])


def test_async_captures_once_per_io_pair_and_the_next_step_pays_the_stall(constant_model):
    capture, stall, host = 0.1, 0.02, 0.001
    overhead = CpuOverheadModel(terms={"default": OverheadTerms(constant_s=host)}, graph_capture_s=capture,
                                post_capture_device_s=stall)
    graphs = {"use_cuda_graph": True}
    result = _async_run(constant_model, host, output=6, overhead=overhead, settings=graphs)
    # Prefill (pair 0), decode (pair 1), decode again in pair 0: three captures, then replays.
    assert [s.cpu_s for s in result.steps] == pytest.approx([host + capture] * 3 + [host] * 4)
    assert [s.gpu_s for s in result.steps] == pytest.approx([STEP_S] * 3 + [STEP_S + stall] + [STEP_S] * 3)
    # A capture holds the host for the step's device time and the capture: the prefill's token is
    # handed out only once the decode step after it has been captured.
    first_token = result.token_times["a"][0]
    assert first_token == pytest.approx(host + STEP_S + capture + host + STEP_S + capture)
    sync = simulate([Request("a", 0.0, 100, 6)], TransformersCBScheduler(graphs), constant_model(STEP_S), overhead)
    assert sum(1 for s in sync.steps if s.cpu_s > host) == 2
    assert all(s.gpu_s == pytest.approx(STEP_S) for s in sync.steps)


def test_async_capture_at_a_new_attention_shape_holds_the_host_from_its_launch(constant_model):
    capture, host, first_shape = 0.1, 0.001, 0.2  # first-shape host work before the eager kernels
    graphs = {"use_cuda_graph": True}
    overhead = CpuOverheadModel(terms={"default": OverheadTerms(constant_s=host)}, graph_capture_s=capture,
                                new_shape_eager_s=first_shape)
    result = _async_run(constant_model, host, output=6, overhead=overhead, settings=graphs)
    # Prefill and the first decode run shapes never run before; the decode in the other IO pair
    # captures a shape pair 1 already ran: it pays the capture only.
    # The eager kernels start after the first-shape work: its device time adds to it.
    assert [s.duration_s for s in result.steps[:4]] == pytest.approx(
        [first_shape + STEP_S + capture] * 2 + [STEP_S + capture, STEP_S])
    assert result.token_times["a"][0] == pytest.approx(2 * (host + first_shape + STEP_S + capture))
    # Shorter than the step's own device work, it still adds to it (it is not hidden there) ...
    short = CpuOverheadModel(terms={"default": OverheadTerms(constant_s=host)}, graph_capture_s=capture,
                             new_shape_eager_s=STEP_S / 2)
    assert [s.duration_s for s in _async_run(constant_model, host, 6, short, graphs).steps[:2]] == pytest.approx(
        [STEP_S / 2 + STEP_S + capture] * 2)
    # ... but an input copy longer than it, which the device waits for anyway, hides it.
    copy = first_shape * 1.5
    hidden = _copy_overhead(host, copy, graph_capture_s=capture, new_shape_eager_s=first_shape)
    plain = _copy_overhead(host, copy, graph_capture_s=capture)
    assert ([s.duration_s for s in _async_run(constant_model, host, 6, hidden, graphs).steps]
            == pytest.approx([s.duration_s for s in _async_run(constant_model, host, 6, plain, graphs).steps]))


def _copy_overhead(host_s: float, copy_s: float, **fields) -> CpuOverheadModel:
    return CpuOverheadModel(terms={"default": OverheadTerms(constant_s=host_s)}, input_copy_s=copy_s, **fields)


def test_async_copy_longer_than_the_step_sets_the_pace(constant_model):
    host, copy = 0.002, 0.025  # the copy is longer than the 10 ms device step
    result = _async_run(constant_model, host, overhead=_copy_overhead(host, copy))
    # Step 0's copy runs 2-27 ms, its device work 27-37; step 1 is launched at 4 ms but its copy
    # queues behind step 0's (27-52 ms), so its device work runs 52-62; and so on: one step per copy.
    assert [s.start_s for s in result.steps] == pytest.approx([host + (i + 1) * copy for i in range(5)])
    assert [s.gpu_s for s in result.steps] == pytest.approx([STEP_S] * 5)
    # Tokens come out at each step's device end (the next launch came earlier): 37, 62, 87, 112 ms.
    assert result.token_times["a"] == pytest.approx([host + (i + 1) * copy + STEP_S for i in range(4)])
    assert result.requests[0].tpot_s == pytest.approx(copy)
    assert _async_run(constant_model, host).requests[0].tpot_s == pytest.approx(STEP_S)


def test_async_copy_shorter_than_the_step_only_delays_the_first(constant_model):
    host, copy = 0.002, 0.004  # hidden behind the previous step's device time after the first
    result = _async_run(constant_model, host, overhead=_copy_overhead(host, copy))
    assert [s.start_s for s in result.steps] == pytest.approx([host + copy + i * STEP_S for i in range(5)])
    assert result.requests[0].tpot_s == pytest.approx(STEP_S)


def test_async_step_after_a_capture_waits_for_its_whole_copy(constant_model):
    capture, host, copy = 0.1, 0.001, 0.02
    overhead = _copy_overhead(host, copy, graph_capture_s=capture)
    result = _async_run(constant_model, host, output=6, overhead=overhead, settings={"use_cuda_graph": True})
    starts = [s.start_s for s in result.steps]
    # The first replay (step 3) is launched with the device idle after a synchronising capture:
    # its copy starts at its launch and its device work after the copy.
    captured_end = starts[2] + STEP_S + capture
    assert starts[3] == pytest.approx(captured_end + host + copy)
    # Each capture's eager run waits for that step's copy too.
    assert starts[0] == pytest.approx(host + copy)


def _graph_workload_results(overhead: CpuOverheadModel):
    scheduler = TransformersCBScheduler({"num_blocks": 96, "block_size": 16, "use_async_batching": True,
                                         "use_cuda_graph": True})
    result = simulate(_workload(n=120, rate=40.0), scheduler, AnalyticStepModel(), overhead, record_token_times=True)
    return result.requests, result.token_times, {name: list(result.step_column(name))
                                                 for name in ("start_s", "duration_s", "gpu_s", "cpu_s")}


def test_async_zero_copy_is_the_loop_without_a_copy():
    fields = {"terms": {"default": {"constant_s": 0.002, "per_sequence_s": 1e-5}}, "graph_capture_s": 0.03,
              "post_capture_device_s": 0.01}
    old = CpuOverheadModel.from_dict(fields)  # a document written before the copy was modelled
    assert old.input_copy_s == 0.0 and old.input_copy_bytes == 0
    zero = CpuOverheadModel.from_dict({**fields, "input_copy_s": 0.0, "input_copy_bytes": 1 << 30})
    assert _graph_workload_results(zero) == _graph_workload_results(old)
    # A copy changes the timeline (the test above would not tell a copy ignored from one absent).
    slow = CpuOverheadModel.from_dict({**fields, "input_copy_s": 0.02})
    assert _graph_workload_results(slow)[2]["start_s"] != _graph_workload_results(old)[2]["start_s"]


def test_async_copy_scales_with_the_bytes_the_engine_copies():
    measured = CpuOverheadModel(input_copy_s=0.02, input_copy_bytes=1000)
    assert measured.input_copy_seconds(2000) == pytest.approx(0.04)
    assert measured.input_copy_seconds(0) == pytest.approx(0.02)  # size unknown: as measured
    assert CpuOverheadModel(input_copy_s=0.02).input_copy_seconds(2000) == pytest.approx(0.02)
    scheduler = TransformersCBScheduler({"use_async_batching": True, "num_blocks": 1024, "block_size": 256,
                                         "max_batch_tokens": 2048})
    assert scheduler.async_input_bytes == 2048 * (1024 * 256 + 2048) * 2  # the H100 runs' 1.08 GB mask
    hybrid = TransformersCBScheduler({"use_async_batching": True, "full_attention_groups": 1,
                                      "sliding_attention_groups": 2, "sliding_window": 512})
    assert hybrid.async_input_bytes == 2 * TransformersCBScheduler().async_input_bytes  # a mask per layer type
