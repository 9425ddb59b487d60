"""`dooly validate`'s planner summary: mean, p50, p90 of TTFT/TPOT/E2E and throughput, measured
against predicted, beside the engine's run-to-run floor from repeated ground truths, and a verdict."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from validate_support import MODEL, write_truth

from dooly.cli import cli
from dooly.sim.validate import (
    MISS,
    NO_DATA,
    THROUGHPUT,
    WITHIN_FLOOR,
    WITHIN_TARGET,
    GroundTruth,
    MeasuredRequest,
    load_ground_truth,
    measured_throughput,
    run_floor,
    verdict,
)

LATENCY_ROWS = [f"{m}_{s}" for m in ("ttft", "tpot", "e2e") for s in ("mean", "p50", "p90")]


def _run(ttfts: list[float], tpot_s: float, outputs: int = 5) -> GroundTruth:
    """Request i arrives at i seconds, waits ttfts[i] for its first token, then a token every tpot_s."""
    requests = []
    for i, ttft in enumerate(ttfts):
        times = [i + ttft + k * tpot_s for k in range(outputs)]
        requests.append(MeasuredRequest(f"r{i}", float(i), times[0], times[-1], 100, outputs, times))
    return GroundTruth(requests, [])


def _validate(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["validate", MODEL, "--analytic", *args, "--output", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _rows(report: dict) -> dict[str, dict]:
    return {row["statistic"]: row for row in report["summary"]["rows"]}


def test_floor_is_the_largest_relative_difference_between_two_runs():
    first = _run([0.10, 0.20, 0.30, 0.40], tpot_s=0.020)
    second = _run([0.11, 0.22, 0.33, 0.44], tpot_s=0.025)
    floor = run_floor([first, second])
    # Every TTFT 10% longer: 10% between the runs (|0.1 - 0.11| / 0.1), the larger of the two directions.
    for statistic in ("mean", "p50", "p90"):
        assert floor[f"ttft_{statistic}"] == pytest.approx(10.0)
        assert floor[f"tpot_{statistic}"] == pytest.approx(25.0)
    assert floor[THROUGHPUT] == pytest.approx(
        abs(measured_throughput(second) - measured_throughput(first)) / min(measured_throughput(first),
                                                                              measured_throughput(second)) * 100)
    assert run_floor([first]) == {} and run_floor([first, first])["ttft_mean"] == 0.0


def test_measured_throughput_counts_output_tokens_from_first_arrival_to_last_finish():
    run = _run([0.5, 0.5], tpot_s=0.1, outputs=5)  # arrivals 0 and 1, last finish 1 + 0.5 + 0.4
    assert measured_throughput(run) == pytest.approx(10 / 1.9)


@pytest.mark.parametrize("error, floor, expected", [
    (-5.0, None, WITHIN_TARGET), (7.9, 20.0, WITHIN_TARGET), (-12.0, 15.0, WITHIN_FLOOR),
    (12.0, 10.0, MISS), (12.0, None, MISS), (None, 3.0, NO_DATA),
])
def test_verdict(error, floor, expected):
    assert verdict(error, floor, 8.0) == expected


def test_validate_summary_carries_the_floor_of_two_synthetic_runs(tmp_path):
    """The simulation is the reference run stretched back: every latency 1/1.05 of measured, an
    error of -4.8%; the repeat is 1.12x where the reference is 1.05x, a floor of 6.7%."""
    reference = write_truth(tmp_path / "r1", settings={}, stretch=1.05)
    repeat = write_truth(tmp_path / "r2", settings={}, stretch=1.12)
    alone = _rows(_validate("--ground-truth", str(reference), "--target-pct", "1"))
    both_report = _validate("--ground-truth", str(reference), "--ground-truth", str(repeat), "--target-pct", "1")
    both = _rows(both_report)
    assert both_report["summary"]["runs"] == 2 and both_report["summary"]["target_pct"] == 1.0
    assert list(both)[:len(LATENCY_ROWS)] == LATENCY_ROWS and list(both)[-1] == THROUGHPUT
    expected_floor = run_floor([load_ground_truth(reference), load_ground_truth(repeat)])
    for key in LATENCY_ROWS:
        row = both[key]
        assert row["error_pct"] == pytest.approx((1 / 1.05 - 1) * 100, rel=1e-6)
        assert row["floor_pct"] == pytest.approx((1.12 / 1.05 - 1) * 100, rel=1e-6) == pytest.approx(expected_floor[key])
        assert row["verdict"] == WITHIN_FLOOR
        assert alone[key]["floor_pct"] is None and alone[key]["verdict"] == MISS
        assert alone[key]["measured"] == row["measured"] and alone[key]["predicted"] == row["predicted"]
    assert both[THROUGHPUT]["floor_pct"] == pytest.approx(expected_floor[THROUGHPUT])
    # The default target (8%) holds the same errors within target.
    assert {r["verdict"] for r in _validate("--ground-truth", str(reference))["summary"]["rows"]} == {WITHIN_TARGET}


def test_validate_text_leads_with_the_summary_table(tmp_path):
    reference = write_truth(tmp_path / "r1", settings={}, stretch=1.05)
    repeat = write_truth(tmp_path / "r2", settings={}, stretch=1.12)
    result = CliRunner().invoke(cli, ["validate", MODEL, "--analytic", "--ground-truth", str(reference),
                                      "--ground-truth", str(repeat), "--target-pct", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Summary: measured = ") and "2 runs" in lines[0]
    assert lines[1].split() == ["statistic", "measured", "predicted", "error", "%", "engine", "floor", "%", "verdict"]
    ttft_mean = next(line for line in lines if line.startswith("TTFT mean (ms)"))
    assert ttft_mean.rstrip().endswith("within floor") and "-4.8%" in ttft_mean and "6.7%" in ttft_mean
    assert any(line.startswith("throughput (output tok/s)") for line in lines)
    # The per-request lines follow the summary.
    assert result.stdout.index("Summary:") < result.stdout.index("Per request") < result.stdout.index("Distribution across")


def test_validate_refuses_a_repeat_of_another_cell(tmp_path):
    reference = write_truth(tmp_path / "r1", settings={"num_blocks": 512})
    other_settings = write_truth(tmp_path / "r2", settings={"num_blocks": 256})
    result = CliRunner().invoke(cli, ["validate", MODEL, "--analytic", "--ground-truth", str(reference),
                                      "--ground-truth", str(other_settings)])
    assert result.exit_code == 2 and "is not a repeat" in result.stderr and "num_blocks" in result.stderr
    other_requests = tmp_path / "r3"
    other_requests.mkdir()
    table_path = reference / "requests.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(table_path)
    pq.write_table(table.slice(1), other_requests / "requests.parquet")
    (other_requests / "engine.json").write_text(json.dumps({"num_blocks": 512}))
    result = CliRunner().invoke(cli, ["validate", MODEL, "--analytic", "--ground-truth", str(reference),
                                      "--ground-truth", str(other_requests)])
    assert result.exit_code == 2 and "is not a repeat" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
