"""Workload specs: determinism, arrival statistics, length distributions, traces."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dooly.errors import DoolyError
from dooly.workload import LengthSpec, WorkloadSpec, generate_requests, load_trace

STAT_SAMPLES = 20_000


def test_same_seed_same_requests_other_seed_other_requests():
    spec = WorkloadSpec(num_requests=50, rate=3.0, prompt=LengthSpec("uniform", low=1, high=999), seed=7)
    first, again = generate_requests(spec), generate_requests(WorkloadSpec.from_dict(spec.to_dict()))
    assert first == again
    other = generate_requests(WorkloadSpec.from_dict({**spec.to_dict(), "seed": 8}))
    assert [r.arrival_s for r in other] != [r.arrival_s for r in first]


def test_changing_lengths_keeps_arrivals():
    base = WorkloadSpec(num_requests=30, rate=2.0, seed=1)
    longer = WorkloadSpec(num_requests=30, rate=2.0, seed=1, prompt=LengthSpec("fixed", value=4000))
    assert [r.arrival_s for r in generate_requests(base)] == [r.arrival_s for r in generate_requests(longer)]


def test_poisson_arrivals_have_the_requested_rate():
    requests = generate_requests(WorkloadSpec(num_requests=STAT_SAMPLES, rate=50.0, seed=2))
    gaps = np.diff([r.arrival_s for r in requests])
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_arrivals_have_the_requested_rate_and_cv(cv):
    requests = generate_requests(WorkloadSpec(num_requests=STAT_SAMPLES, arrival="gamma", rate=10.0, cv=cv, seed=4))
    gaps = np.diff([r.arrival_s for r in requests])
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_burst_arrives_at_once():
    requests = generate_requests(WorkloadSpec(num_requests=5, arrival="burst"))
    assert {r.arrival_s for r in requests} == {0.0}


def test_length_distributions_stay_in_bounds():
    uniform = generate_requests(WorkloadSpec(num_requests=2000, prompt=LengthSpec("uniform", low=10, high=20)))
    values = [r.prompt_tokens for r in uniform]
    assert min(values) == 10 and max(values) == 20
    zipf = generate_requests(WorkloadSpec(num_requests=5000, output=LengthSpec("zipf", low=5, high=50, theta=1.2)))
    counts = np.bincount([r.output_tokens for r in zipf], minlength=51)[5:]
    assert min(r.output_tokens for r in zipf) >= 5 and max(r.output_tokens for r in zipf) <= 50
    # Zipf: the shortest length is the most frequent, and mass falls off with length.
    assert counts[0] == counts.max()
    assert counts[:5].sum() > counts[-5:].sum() * 5


def _write_trace(path, rows):
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "".join(f"{a},{p},{d}\n" for a, p, d in rows))


def test_trace_replay_csv_and_parquet(tmp_path):
    rows = [(10.0, 100, 5), (10.5, 0, 7), (12.0, 30, 1)]
    csv_path = tmp_path / "t.csv"
    _write_trace(csv_path, rows)
    requests = load_trace(csv_path)
    assert [r.arrival_s for r in requests] == [0.0, 0.5, 2.0]
    assert [r.prompt_tokens for r in requests] == [100, 1, 30]  # clipped to >= 1 as Vidur does
    parquet_path = tmp_path / "t.parquet"
    pq.write_table(
        pa.table({"arrived_at": [a for a, _, _ in rows], "num_prefill_tokens": [p for _, p, _ in rows], "num_decode_tokens": [d for _, _, d in rows]}),
        parquet_path,
    )
    assert load_trace(parquet_path) == requests
    halved = load_trace(csv_path, time_scale=0.5)
    assert [r.arrival_s for r in halved] == [0.0, 0.25, 1.0]


def test_trace_sampled_lengths_keep_rows_together(tmp_path):
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{100 * i},{i}\n" for i in range(1, 11)))
    spec = WorkloadSpec(
        num_requests=200,
        prompt=LengthSpec("trace", path=str(path)),
        output=LengthSpec("trace", path=str(path)),
        seed=5,
    )
    requests = generate_requests(spec)
    assert all(r.prompt_tokens == 100 * r.output_tokens for r in requests)
    assert len({r.output_tokens for r in requests}) > 5


def test_spec_file_round_trip_and_relative_paths(tmp_path):
    _write_trace(tmp_path / "trace.csv", [(0.0, 10, 2), (1.0, 20, 3)])
    (tmp_path / "spec.json").write_text(json.dumps({"schema": "dooly.workload/1", "trace": "trace.csv"}))
    spec = WorkloadSpec.load(tmp_path / "spec.json")
    assert len(generate_requests(spec)) == 2
    synthetic = WorkloadSpec(num_requests=9, arrival="gamma", rate=2.0, cv=3.0, prompt=LengthSpec("zipf", low=1, high=9, theta=0.9))
    synthetic.save(tmp_path / "synthetic.json")
    assert WorkloadSpec.load(tmp_path / "synthetic.json") == synthetic


@pytest.mark.parametrize(
    "data, message",
    [
        ({"num_requests": 0}, "num_requests"),
        ({"rate": -1}, "rate"),
        ({"arrival": "weibull"}, "arrival"),
        ({"prompt": {"kind": "uniform", "low": 9, "high": 3}}, "low <= high"),
        ({"output": {"kind": "fixed", "value": 0}}, "fixed length"),
        ({"requests": 3}, "unknown field"),
        ({"schema": "other/9"}, "schema"),
    ],
)
def test_bad_specs_are_user_errors(data, message):
    with pytest.raises(DoolyError, match=message):
        WorkloadSpec.from_dict(data)


def test_missing_trace_columns_are_user_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,tokens\n0,1\n")
    with pytest.raises(DoolyError, match="lacks numeric column"):
        load_trace(path)
    with pytest.raises(DoolyError, match="does not exist"):
        load_trace(tmp_path / "absent.csv")


def test_command_line_length_forms():
    assert LengthSpec.parse("512", "x") == LengthSpec("fixed", value=512)
    assert LengthSpec.parse("uniform:1:9", "x") == LengthSpec("uniform", low=1, high=9)
    assert LengthSpec.parse("zipf:1:9:1.5", "x") == LengthSpec("zipf", low=1, high=9, theta=1.5)
    with pytest.raises(DoolyError, match="expected N"):
        LengthSpec.parse("normal:3:4", "--prompt-len")
