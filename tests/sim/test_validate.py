"""Validation math on constructed ground truth."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from dooly.errors import DoolyError
from dooly.sim.schedulers import VllmScheduler
from dooly.sim.simulator import simulate
from dooly.sim.step_model import CpuOverheadModel, OverheadTerms, StepKind
from dooly.sim.validate import (
    GroundTruth,
    MeasuredRequest,
    MeasuredStep,
    compare_requests,
    compare_steps,
    error_stats,
    ground_truth_from_arrow,
    mape,
    plot_scatter,
    replay_steps,
    validate,
)

STEP_S = 0.010


def test_mape_and_median_of_absolute_percentage_errors():
    stats = error_stats([110.0, 90.0, 100.0, 130.0], [100.0, 100.0, 100.0, 100.0])
    result = stats.as_dict()
    assert result["mape"] == pytest.approx((10 + 10 + 0 + 30) / 4)
    assert result["p50_ape"] == pytest.approx(10.0)
    assert result["bias"] == pytest.approx((10 - 10 + 0 + 30) / 4)
    assert mape([2.0], [4.0]) == pytest.approx(50.0)


def test_pairs_without_a_usable_measurement_are_skipped():
    stats = error_stats([1.0, 1.0, math.nan, 2.0], [0.0, None, 1.0, 1.0])
    assert stats.skipped == 3
    assert stats.as_dict()["mape"] == pytest.approx(100.0)
    assert math.isnan(mape([1.0], [0.0]))


def _truth_from_simulation(result, slowdown: float) -> GroundTruth:
    """A 'measurement' that is the simulation stretched in time by `slowdown` after each arrival."""
    requests = []
    for record in result.requests:
        times = [record.arrival_s + slowdown * (t - record.arrival_s) for t in result.token_times[record.request_id]]
        requests.append(
            MeasuredRequest(
                request_id=record.request_id,
                arrived_at_s=100.0 + record.arrival_s,  # another clock origin
                first_token_s=100.0 + times[0],
                finished_s=100.0 + times[-1],
                prompt_tokens=record.prompt_tokens,
                output_tokens=record.output_tokens,
                token_times_s=[100.0 + t for t in times],
            )
        )
    return GroundTruth(requests, [])


def test_request_errors_against_a_stretched_measurement(constant_model):
    from dooly.workload import Request

    workload = [Request(f"r{i}", 1.0 * i, 50, 4) for i in range(5)]
    result = simulate(workload, VllmScheduler(), constant_model(STEP_S), record_token_times=True)
    # Measured times 25% longer: the simulation under-predicts by 20% of the measurement.
    truth = _truth_from_simulation(result, slowdown=1.25)
    comparison = compare_requests(truth, result).as_dict()
    assert comparison["ttft"]["mape"] == pytest.approx(20.0)
    assert comparison["tpot"]["mape"] == pytest.approx(20.0)
    assert comparison["ttft"]["bias"] == pytest.approx(-20.0)
    assert comparison["unmatched_requests"] == 0


def test_validate_resimulates_the_measured_workload(constant_model):
    from dooly.workload import Request

    workload = [Request(f"r{i}", 0.5 * i, 30, 3) for i in range(6)]
    result = simulate(workload, VllmScheduler(), constant_model(STEP_S), record_token_times=True)
    truth = _truth_from_simulation(result, slowdown=1.0)
    truth.steps = [MeasuredStep(0, 0.0, 2 * STEP_S, [(30, 0)], []), MeasuredStep(1, 0.1, STEP_S, [], [30])]
    report = validate(truth, VllmScheduler(), constant_model(STEP_S))
    assert report.requests.ttft.as_dict()["mape"] == pytest.approx(0.0, abs=1e-9)
    assert report.steps.as_dict()["mape"] == pytest.approx(25.0)  # (50% + 0%) / 2


def test_step_replay_adds_overhead_and_tells_the_path(recording_model):
    model = recording_model(STEP_S)
    overhead = CpuOverheadModel(terms={"decode": OverheadTerms(per_sequence_s=0.001)})
    steps = [MeasuredStep(0, 0.0, 0.02, [], [10, 20, 30]), MeasuredStep(1, 0.0, 0.02, [(5, 0)], [7])]
    predicted = replay_steps(steps, model, overhead)
    assert predicted == pytest.approx([STEP_S + 0.003, STEP_S])
    assert [p.kind for p in model.paths] == [StepKind.DECODE, StepKind.MIXED]
    stats = compare_steps(steps, model, overhead)
    assert stats.as_dict()["mape"] == pytest.approx((35 + 50) / 2)


def test_ground_truth_from_bench_tables():
    prefill_type = pa.list_(pa.struct([("q", pa.int64()), ("ctx", pa.int64())]))
    requests = pa.table({
        "request_id": ["a", "b"],
        "arrived_at_s": [1.0, 2.0],
        "first_token_s": [1.5, 2.2],
        "finished_s": [2.5, 2.2],
        "prompt_tokens": [10, 20],
        "output_tokens": [3, 1],
        "token_times_s": pa.array([[1.5, 2.0, 2.5], [2.2]], type=pa.list_(pa.float64())),
    })
    steps = pa.table({
        "step": [0, 1],
        "start_s": [1.0, 1.5],
        "duration_s": [0.5, 0.5],
        "prefill": pa.array([[{"q": 10, "ctx": 0}], []], type=prefill_type),
        "decode_ctx": pa.array([[], [10]], type=pa.list_(pa.int64())),
    })
    truth = ground_truth_from_arrow(requests, steps)
    assert truth.requests[0].ttft_s == pytest.approx(0.5)
    assert truth.requests[0].tpot_s == pytest.approx(0.5)
    assert math.isnan(truth.requests[1].tpot_s)
    assert truth.steps[0].prefill == [(10, 0)] and truth.steps[1].decode_ctx == [10]
    assert [r.arrival_s for r in truth.workload()] == [0.0, 1.0]
    with pytest.raises(DoolyError, match="lacks column"):
        ground_truth_from_arrow(requests.drop(["token_times_s"]), steps)


def test_scatter_plot_is_written(tmp_path, constant_model):
    from dooly.workload import Request

    workload = [Request(f"r{i}", 0.2 * i, 20, 3) for i in range(4)]
    result = simulate(workload, VllmScheduler(), constant_model(STEP_S), record_token_times=True)
    truth = _truth_from_simulation(result, slowdown=1.1)
    truth.steps = [MeasuredStep(0, 0.0, 0.012, [(20, 0)], [])]
    report = validate(truth, VllmScheduler(), constant_model(STEP_S))
    path = plot_scatter(report, tmp_path / "scatter.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
