"""Validation math on constructed ground truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

from dooly.errors import DoolyError
from dooly.sim.schedulers import VllmScheduler
from dooly.sim.simulator import simulate
from dooly.sim.step_model import CpuOverheadModel, OverheadTerms, StepKind
from dooly.sim.validate import (
    DISTRIBUTION_STATISTICS,
    GroundTruth,
    MeasuredRequest,
    MeasuredStep,
    compare_requests,
    compare_runs,
    compare_steps,
    error_stats,
    ground_truth_from_arrow,
    load_ground_truth,
    mape,
    plot_scatter,
    replay_steps,
    validate,
)

STEP_S = 0.010
REPEATS = Path(__file__).resolve().parents[2] / "data" / "h100" / "experiments" / "repeat"
GROUND_TRUTH = REPEATS.parents[1] / "groundtruth"


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


def _run(ttfts: list[float], tpot_s: float = 0.02, outputs: int = 5) -> GroundTruth:
    """A real run whose request i arrives at i seconds, waits ttfts[i] for its first token and then
    emits a token every `tpot_s`."""
    requests = []
    for i, ttft in enumerate(ttfts):
        times = [i + ttft + k * tpot_s for k in range(outputs)]
        requests.append(MeasuredRequest(f"r{i}", float(i), times[0], times[-1], 100, outputs, times))
    return GroundTruth(requests, [])


def _distribution_errors(stats) -> dict[str, float]:
    return {e.statistic: e.error_pct for e in stats.distribution()}


def test_uniformly_slower_prediction_is_off_by_the_same_share_at_every_statistic():
    measured = [0.05, 0.08, 0.12, 0.30, 0.07, 0.21, 0.11]
    stats = error_stats([1.1 * m for m in measured], measured)
    assert list(_distribution_errors(stats)) == list(DISTRIBUTION_STATISTICS) == ["mean", "p50", "p90", "p99"]
    for statistic, error in stats.distribution_dict().items():
        if statistic in DISTRIBUTION_STATISTICS:
            assert error["error_pct"] == pytest.approx(10.0)
            assert error["abs_error_pct"] == pytest.approx(10.0)
            assert error["predicted_s"] == pytest.approx(1.1 * error["measured_s"])
    assert stats.distribution_dict()["mean"]["measured_s"] == pytest.approx(sum(measured) / len(measured))
    assert stats.as_dict()["mape"] == pytest.approx(10.0)
    faster = error_stats([0.8 * m for m in measured], measured).distribution_dict()
    assert faster["p90"]["error_pct"] == pytest.approx(-20.0) and faster["p90"]["abs_error_pct"] == pytest.approx(20.0)


def test_shuffled_latencies_miss_every_request_but_not_the_distribution():
    """The light-load case: the right latencies, dealt to the wrong requests (phase luck)."""
    ttfts = [0.05, 0.08, 0.12, 0.30, 0.07, 0.21, 0.11, 0.04]
    shuffled = ttfts[3:] + ttfts[:3]
    comparison = compare_runs(_run(ttfts), _run(shuffled))
    assert comparison.ttft.as_dict()["mape"] > 50
    for statistic in DISTRIBUTION_STATISTICS:
        assert comparison.distribution_dict()["ttft"][statistic]["error_pct"] == pytest.approx(0.0, abs=1e-9)
    # Same token gaps in both runs: TPOT agrees per request and per distribution.
    assert comparison.tpot.as_dict()["mape"] == pytest.approx(0.0, abs=1e-9)
    assert comparison.distribution_dict()["tpot"]["p99"]["error_pct"] == pytest.approx(0.0, abs=1e-9)


def test_unusable_requests_leave_both_views_alike():
    """An errored request (no first token) and a request the other run lacks are out of the
    per-request errors and of the distributions alike."""
    reference = _run([0.1, 0.2, 0.4, 0.8])
    reference.requests[1].first_token_s = math.nan  # errored: no TTFT
    repeat = _run([0.2, 5.0, 0.8])  # r3 missing
    comparison = compare_runs(reference, repeat)
    assert comparison.unmatched == 1
    per_request, distribution = comparison.as_dict()["ttft"], comparison.distribution_dict()["ttft"]
    assert (per_request["n"], per_request["skipped"]) == (distribution["n"], distribution["skipped"]) == (2, 1)
    assert distribution["mean"]["measured_s"] == pytest.approx((0.1 + 0.4) / 2)
    assert distribution["mean"]["predicted_s"] == pytest.approx((0.2 + 0.8) / 2)
    assert distribution["mean"]["error_pct"] == pytest.approx(100.0)


def test_no_usable_pair_gives_no_distribution():
    stats = error_stats([1.0], [math.nan])
    assert stats.distribution() == []
    assert stats.distribution_dict() == {"n": 0, "skipped": 1, "mean": None, "p50": None, "p90": None, "p99": None}


def test_validate_reports_the_distribution_of_the_same_requests(constant_model):
    from dooly.workload import Request

    workload = [Request(f"r{i}", 0.5 * i, 30, 4) for i in range(6)]
    result = simulate(workload, VllmScheduler(), constant_model(STEP_S), record_token_times=True)
    truth = _truth_from_simulation(result, slowdown=1.25)
    report = validate(truth, VllmScheduler(), constant_model(STEP_S)).as_dict()
    assert set(report["distribution"]) == {"ttft", "tpot", "e2e"}
    for metric in ("ttft", "tpot", "e2e"):
        assert report["distribution"][metric]["n"] == report["requests"][metric]["n"] == 6
        # Every measured latency is 1.25x the simulated one, so every statistic is 20% short.
        assert report["distribution"][metric]["mean"]["error_pct"] == pytest.approx(-20.0)
        assert report["distribution"][metric]["p99"]["error_pct"] == pytest.approx(-20.0)
    assert report["distribution"]["ttft"]["p90"]["predicted_s"] == pytest.approx(report["simulation"]["ttft_s"]["p90"])


def test_a_run_scored_against_itself_is_exact_and_against_its_repeat_is_not():
    cell = "Llama-3.1-8B.paged-sdpa.graphs.heavy"
    first = load_ground_truth(GROUND_TRUTH / cell)
    itself = compare_runs(first, first)
    assert itself.ttft.as_dict()["mape"] == 0.0
    assert all(itself.distribution_dict()["e2e"][s]["error_pct"] == 0.0 for s in DISTRIBUTION_STATISTICS)
    repeat = compare_runs(first, load_ground_truth(REPEATS / cell))
    assert repeat.unmatched == 0 and repeat.ttft.as_dict()["n"] == len(first.requests)
    assert repeat.ttft.as_dict()["mape"] > 0
    # Per request, a run's requests differ more than its distribution does (errors of opposite sign cancel).
    assert abs(repeat.distribution_dict()["ttft"]["mean"]["error_pct"]) <= repeat.ttft.as_dict()["mape"]


def test_validate_json_on_committed_ground_truth():
    from click.testing import CliRunner

    from dooly.cli import cli

    cell = GROUND_TRUTH / "Llama-3.2-1B.paged-sdpa.graphs.light"
    result = CliRunner().invoke(cli, ["validate", "meta-llama/Llama-3.2-1B", "--ground-truth", str(cell), "--analytic", "--output", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    truth = load_ground_truth(cell)
    ttft = report["distribution"]["ttft"]
    assert ttft["n"] == report["requests"]["ttft"]["n"] == len(truth.requests)
    assert ttft["mean"]["measured_s"] == pytest.approx(sum(r.ttft_s for r in truth.requests) / len(truth.requests))
    assert ttft["mean"]["predicted_s"] == pytest.approx(report["simulation"]["ttft_s"]["mean"])
    for metric in ("ttft", "tpot", "e2e"):
        for statistic in DISTRIBUTION_STATISTICS:
            entry = report["distribution"][metric][statistic]
            assert set(entry) == {"predicted_s", "measured_s", "error_pct", "abs_error_pct"}
            assert entry["abs_error_pct"] == pytest.approx(abs(entry["error_pct"]))
    text = CliRunner().invoke(cli, ["validate", "meta-llama/Llama-3.2-1B", "--ground-truth", str(cell), "--analytic"])
    assert text.exit_code == 0, text.output
    assert "Distribution across requests" in text.output and "TTFT p90" in text.output
