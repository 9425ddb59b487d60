"""The server's cost per CUDA-graph capture (dooly.sim.server_capture_term): paired step for step,
pooled per layer, carried by the record, added to the capture cost of the served model."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from dooly.sim.server_capture_term import CaptureSample, CaptureTerm, fit_capture_term, paired_capture_samples
from dooly.sim.server_costs import ServerCosts, measure_server_costs
from dooly.sim.step_model import CpuOverheadModel, StepKind, StepPath
from dooly.sim.validate import load_ground_truth
from tests.sim.test_server_step_term import (
    INPROCESS_HOST_S,
    MODEL_LAYERS,
    _analytic,
    _paired_cell,
    _step,
)

LEASE7 = Path(__file__).resolve().parents[2] / "data" / "h100" / "experiments" / "engine_paths" / "lease7"
ASYNC_HEAVY = "Llama-3.1-8B.paged-sdpa.async.heavy"
# What the synthetic server adds to each capture: seconds per layer and sequence of its step.
PER_LAYER_SEQ_S = 1e-5
CAPTURE_EVERY = 10


def test_only_steps_both_engines_captured_on_are_paired():
    inprocess = [_step(0, 4, 0.2, captured=True), _step(1, 4, INPROCESS_HOST_S), _step(2, 4, 0.1, captured=True)]
    http = [_step(0, 4, 0.23, captured=True), _step(1, 4, INPROCESS_HOST_S + 0.5), _step(2, 4, 0.1)]
    samples = paired_capture_samples(http, inprocess, MODEL_LAYERS)
    assert samples == [CaptureSample(pytest.approx(0.03), MODEL_LAYERS, 4)]


def test_runs_of_other_steps_give_no_capture_sample():
    inprocess = [_step(0, 4, 0.2, captured=True), _step(1, 4, INPROCESS_HOST_S)]
    http = [_step(0, 5, 0.3, captured=True), _step(1, 4, INPROCESS_HOST_S)]
    assert paired_capture_samples(http, inprocess, MODEL_LAYERS) == []
    assert paired_capture_samples(http[:1], inprocess, MODEL_LAYERS) == []


def test_the_term_is_pooled_over_layers_and_sequences_and_scales_with_both():
    term = fit_capture_term([CaptureSample(0.016, 16, 64), CaptureSample(0.028, 28, 32), CaptureSample(0.0, 16, 2)])
    assert term is not None and term.captures == 3 and term.layer_seqs == 16 * 64 + 28 * 32 + 16 * 2
    assert term.per_layer_seq_s == pytest.approx(0.044 / term.layer_seqs)
    base = CpuOverheadModel(graph_capture_s=0.04, source="calibration")
    served = term.overhead(base, 32)
    assert served.graph_capture_s == base.graph_capture_s
    assert served.graph_capture_per_seq_s == pytest.approx(32 * term.per_layer_seq_s)
    assert "capture term" in served.source and "32 layers" in served.source
    assert fit_capture_term([]) is None


def test_a_capture_pays_the_term_for_the_sequences_of_its_step():
    path = StepPath(StepKind.MIXED, cuda_graph=True, padded_tokens=2048, engine_path="varlen")
    served = CpuOverheadModel(graph_capture_s=0.04, graph_capture_per_seq_s=0.0003)
    captured: set = set()
    assert served.sync_capture_seconds(path, captured, 50) == pytest.approx(0.04 + 50 * 0.0003)
    assert served.sync_capture_seconds(path, captured, 50) == 0.0  # the graph is captured once
    assert CpuOverheadModel.from_dict(served.to_dict()).graph_capture_per_seq_s == pytest.approx(0.0003)


def test_a_term_below_zero_is_withheld():
    term = CaptureTerm(-3e-6, 35, 71680)
    base = CpuOverheadModel(graph_capture_s=0.04)
    assert not term.applied and term.per_sequence_s(32) == 0.0
    assert term.overhead(base, 32) is base
    assert "not applied: below zero" in term.describe(32)


def test_measured_from_a_pair_carried_by_the_record_and_added_to_captures(tmp_path):
    http, inprocess = _paired_cell(tmp_path)
    # Every CAPTURE_EVERY-th step captured on both sides; behind the server it took PER_LAYER_SEQ_S
    # per layer and sequence longer than in-process (its ordinary steps keep the step term's extra).
    partner = load_ground_truth(inprocess).steps
    captured = [index % CAPTURE_EVERY == 0 for index in range(len(partner))]
    for directory, per_layer_seq in ((inprocess, 0.0), (http, PER_LAYER_SEQ_S)):
        steps = load_ground_truth(directory).steps
        durations = [p.duration_s + per_layer_seq * MODEL_LAYERS * p.sizes()[0] if c else s.duration_s
                     for s, p, c in zip(steps, partner, captured, strict=True)]
        rows = pl.read_parquet(directory / "steps.parquet")
        rows.with_columns(pl.Series("duration_s", durations), pl.Series("graph_captured", captured)).write_parquet(
            directory / "steps.parquet")
    costs = measure_server_costs([http], [inprocess], _analytic)
    assert costs.capture_term is not None
    assert costs.capture_term.captures == len(load_ground_truth(http).steps[::CAPTURE_EVERY])
    assert costs.capture_term.per_layer_seq_s == pytest.approx(PER_LAYER_SEQ_S)
    loaded = ServerCosts.from_dict(costs.as_dict(), "record")
    assert loaded.capture_term == costs.capture_term
    served = loaded.overhead(CpuOverheadModel.zero(), 16)
    assert served.graph_capture_per_seq_s == pytest.approx(16 * PER_LAYER_SEQ_S)
    assert "per graph capture" in loaded.describe()
    assert loaded.applied_payload()["capture_term"]["per_layer_seq_s"] == pytest.approx(PER_LAYER_SEQ_S)


def test_a_record_written_before_the_term_adds_none(tmp_path):
    http, inprocess = _paired_cell(tmp_path)
    document = measure_server_costs([http], [inprocess], _analytic).as_dict()
    assert document["capture_term"] is None  # the synthetic pair captured no graph
    del document["capture_term"]
    loaded = ServerCosts.from_dict(document, "older record")
    base = CpuOverheadModel(graph_capture_s=0.04)
    assert loaded.capture_term is None
    served = loaded.overhead(base, MODEL_LAYERS)  # the step term only
    assert (served.graph_capture_s, served.graph_capture_per_seq_s) == (base.graph_capture_s, 0.0)


def test_lease7s_async_heavy_captures_took_longer_behind_the_server():
    """The committed 8B pair the term was found on: its 35 captures, on the same steps, were
    0.89 s of the HTTP engine's 1.18 s lead over its pair."""
    http = load_ground_truth(LEASE7 / "http" / ASYNC_HEAVY).steps
    inprocess = load_ground_truth(LEASE7 / "pairs" / ASYNC_HEAVY).steps
    samples = paired_capture_samples(http, inprocess, MODEL_LAYERS)
    assert len(samples) == 35 and all(s.num_layers == MODEL_LAYERS and s.num_seqs > 0 for s in samples)
    assert sum(s.extra_s for s in samples) == pytest.approx(0.889, abs=0.01)
    term = fit_capture_term(samples)
    assert term is not None and term.applied


@pytest.mark.parametrize("store", ["h100", "h200"])
def test_the_committed_graph_records_carry_the_capture_term_they_were_measured_with(store):
    """Every committed record of a graph path, newest generation, was re-measured with the term;
    the no-graph record captures nothing and carries none."""
    from dooly.sim.server_costs import list_server_costs, read_server_costs
    from dooly.store.backends import open_store

    opened = open_store(str(Path(__file__).resolve().parents[2] / "data" / store / "db"), create=False)
    keys = list_server_costs(opened)
    assert keys
    for key in keys:
        record = read_server_costs(opened, key)
        assert record is not None
        if key.cuda_graphs:
            assert record.capture_term is not None and record.capture_term.applied, key
            assert 5e-6 < record.capture_term.per_layer_seq_s < 20e-6, key
        else:
            assert record.capture_term is None, key
