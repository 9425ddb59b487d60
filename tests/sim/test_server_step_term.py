"""The server's per-step host term: its form chosen on held-out step classes, measured from paired
runs' steps, simulated by `dooly validate`; and dooly.server_costs/1 records still load."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.sim.server_costs import SCHEMA_V1, EngineModels, ServerCosts, measure_server_costs
from dooly.sim.server_step_term import (
    BATCH_PAIRING,
    CONSTANT,
    DEFAULT_KEY,
    MIN_PARTNER_STEPS,
    PER_KIND_CONSTANT,
    PER_KIND_PER_SEQUENCE,
    STEP_PAIRING,
    KindTerm,
    OtherStepsError,
    StepSample,
    StepTerm,
    batch_matched_samples,
    choose_step_term,
    paired_step_samples,
    step_samples,
)
from dooly.sim.step_model import CpuOverheadModel, OverheadTerms, StepKind, StepPath
from dooly.sim.validate import MeasuredStep
from tests.sim.test_server_costs import LIGHT, TPOT_COST_S, TTFT_COST_S, _cell
from tests.sim.validate_support import MODEL

# MODEL's decoder layers (Llama-3.1-8B): what a record's capture term is scaled by.
MODEL_LAYERS = 32

DECODE, MIXED = StepKind.DECODE.value, StepKind.MIXED.value
# The synthetic server: per kind, extra host seconds per step = constant + slope x sequences.
TRUE_TERMS = {DECODE: KindTerm(0.002, 0.0002), MIXED: KindTerm(0.001, 0.0001)}
STEPS = 120
MAX_SEQS = 64
# Batch-matched cells draw their steps' sizes from fewer values, so that most classes hold enough steps.
BATCH_SIZES = 12
DEVICE_S = 0.010
INPROCESS_HOST_S = 0.001
# An async-batching row's host work (prepare, launch, update), under DEVICE_S: the loop is device-bound.
ASYNC_PREPARE_S, ASYNC_LAUNCH_S, ASYNC_UPDATE_S = 0.004, 0.0005, 0.001
SEED = 7


def _samples(terms: dict[str, KindTerm], noise_s: float = 0.0) -> list[StepSample]:
    """Decode and mixed steps of many sizes whose extra host time follows `terms`."""
    rng = random.Random(SEED)
    out = []
    for index in range(STEPS):
        kind = DECODE if index % 3 else MIXED
        seqs = rng.randint(1, MAX_SEQS)
        out.append(StepSample(kind, seqs, terms[kind].seconds(seqs) + rng.gauss(0.0, noise_s)))
    return out


@pytest.mark.parametrize(("terms", "form"), [
    ({DECODE: KindTerm(0.002), MIXED: KindTerm(0.002)}, CONSTANT),
    ({DECODE: KindTerm(0.002), MIXED: KindTerm(0.001)}, PER_KIND_CONSTANT),
    (TRUE_TERMS, PER_KIND_PER_SEQUENCE),
])
def test_the_held_out_classes_choose_the_form_the_steps_follow(terms, form):
    chosen = choose_step_term(_samples(terms))
    assert chosen.form == form
    assert set(chosen.selection) == {CONSTANT, PER_KIND_CONSTANT, PER_KIND_PER_SEQUENCE}
    for kind, term in terms.items():
        assert chosen.seconds(kind, 10) == pytest.approx(term.seconds(10), abs=1e-9)


def test_noise_does_not_hide_a_per_sequence_cost_and_its_terms_are_recovered():
    chosen = choose_step_term(_samples(TRUE_TERMS, noise_s=0.0005))
    assert chosen.form == PER_KIND_PER_SEQUENCE
    for kind, term in TRUE_TERMS.items():
        assert chosen.terms[kind].per_sequence_s == pytest.approx(term.per_sequence_s, rel=0.1)
    assert chosen.steps == STEPS and chosen.classes > 2


def test_a_kind_with_too_few_steps_gets_the_pooled_term():
    samples = _samples(TRUE_TERMS) + [StepSample(StepKind.PREFILL.value, 1, 0.5)]
    chosen = choose_step_term(samples)
    assert StepKind.PREFILL.value not in chosen.terms
    assert chosen.term_of(StepKind.PREFILL.value) == chosen.terms[DEFAULT_KEY]


def _step(index: int, seqs: int, host_s: float, *, mixed: bool = False, captured: bool = False) -> MeasuredStep:
    prefill = [(32, 0)] if mixed else []
    return MeasuredStep(index, 0.0, DEVICE_S + host_s, prefill, [100] * seqs, device_s=DEVICE_S,
                        graph_captured=captured)


def test_paired_steps_are_differences_of_host_time_and_skip_captures():
    inprocess = [_step(0, 4, INPROCESS_HOST_S, captured=True), _step(1, 4, INPROCESS_HOST_S),
                 _step(2, 8, INPROCESS_HOST_S, mixed=True)]
    http = [_step(0, 4, 0.5, captured=True), _step(1, 4, INPROCESS_HOST_S + 0.003),
            _step(2, 8, INPROCESS_HOST_S + 0.002, mixed=True)]
    samples = paired_step_samples(http, inprocess)
    assert [(s.kind, s.num_seqs) for s in samples] == [(DECODE, 4), (MIXED, 9)]
    assert [s.extra_s for s in samples] == pytest.approx([0.003, 0.002])
    with pytest.raises(DoolyError, match="other batches"):
        paired_step_samples(http, [_step(0, 4, 0.0), _step(1, 5, 0.0), _step(2, 8, 0.0, mixed=True)])
    with pytest.raises(DoolyError, match="ran 3 and 2 steps"):
        paired_step_samples(http, inprocess[:2])


def test_batch_matched_samples_take_each_class_median_and_skip_thin_classes_and_captures():
    # The in-process run: decode steps of 4 sequences of three host times (median 2 ms), a capture
    # of that class far slower (not a partner), mixed steps of 8 + 1 sequences (median 1 ms), and
    # decode steps of 8 sequences, one fewer than a class needs.
    inprocess = [_step(0, 4, 0.001), _step(1, 4, 0.002), _step(2, 4, 0.004), _step(3, 4, 0.5, captured=True),
                 _step(4, 8, 0.001, mixed=True), _step(5, 8, 0.001, mixed=True), _step(6, 8, 0.003, mixed=True),
                 *[_step(7 + i, 8, 0.001) for i in range(MIN_PARTNER_STEPS - 1)]]
    # The HTTP run, another number of steps: each class's extra known; its capture, its decode steps of
    # 8 (too few partners) and of 16 (none) give no sample.
    http = [_step(0, 4, 0.002 + 0.003), _step(1, 4, 0.002 + 0.004), _step(2, 4, 0.9, captured=True),
            _step(3, 8, 0.001 + 0.0015, mixed=True), _step(4, 8, 0.001 + 0.007), _step(5, 16, 0.02)]
    samples = batch_matched_samples(http, inprocess)
    assert [(s.kind, s.num_seqs) for s in samples] == [(DECODE, 4), (DECODE, 4), (MIXED, 9)]
    assert [s.extra_s for s in samples] == pytest.approx([0.003, 0.004, 0.0015])
    # Step for step refuses these runs (other steps), so the pair falls back to batch-matched.
    with pytest.raises(OtherStepsError, match="ran 6 and 9 steps"):
        paired_step_samples(http, inprocess)
    assert step_samples(http, inprocess) == (samples, BATCH_PAIRING)
    with pytest.raises(DoolyError, match="step for step, nor batch-matched: no step of the HTTP run"):
        step_samples(http, inprocess[:2])


def test_step_for_step_comes_first_and_no_device_time_is_no_fallback():
    inprocess = [_step(i, 4, INPROCESS_HOST_S) for i in range(MIN_PARTNER_STEPS + 1)]
    http = [_step(i, 4, INPROCESS_HOST_S + 0.001 * i) for i in range(MIN_PARTNER_STEPS + 1)]
    samples, pairing = step_samples(http, inprocess)
    # Exact, step for step: each step's own difference, not the class median's.
    assert pairing == STEP_PAIRING
    assert [s.extra_s for s in samples] == pytest.approx([0.001 * i for i in range(MIN_PARTNER_STEPS + 1)])
    unprobed = [replace(step, device_s=math.nan) for step in inprocess]
    with pytest.raises(DoolyError, match="no step with a device time") as refused:
        step_samples(http, unprobed)
    assert not isinstance(refused.value, OtherStepsError) and "batch-matched" not in str(refused.value)


def _async_steps(prepare_s: float, count: int = 4) -> list[MeasuredStep]:
    """An async-batching run's rows, device-bound: each step's wall is its device time (the host's
    prepare, launch and update overlap the previous step's device work)."""
    return [MeasuredStep(i, i * DEVICE_S, DEVICE_S, [], [100] * 4, prepare_s=prepare_s, forward_s=ASYNC_LAUNCH_S,
                         update_s=ASYNC_UPDATE_S, device_s=DEVICE_S) for i in range(count)]


def test_an_async_pair_is_paired_on_the_host_share_of_its_cycle_not_on_wall_minus_device():
    # Behind the server the async loop's prepare takes 3 ms longer; its wall is the device's on both
    # sides, so wall minus device sees nothing, where the host's share of the cycle sees the 3 ms.
    inprocess, http = _async_steps(ASYNC_PREPARE_S), _async_steps(ASYNC_PREPARE_S + 0.003)
    assert [s.extra_s for s in step_samples(http, inprocess)[0]] == pytest.approx([0.0] * 4)
    samples, pairing = step_samples(http, inprocess, asynchronous=True)
    assert pairing == STEP_PAIRING
    assert [s.extra_s for s in samples] == pytest.approx([0.003] * 4)
    matched = batch_matched_samples(http, inprocess[:MIN_PARTNER_STEPS], asynchronous=True)
    assert [s.extra_s for s in matched] == pytest.approx([0.003] * 4)


def test_the_step_term_is_added_to_every_path_of_the_host_model():
    base = CpuOverheadModel(terms={"decode_graph": OverheadTerms(0.001, 1e-5), "default": OverheadTerms(0.004)})
    term = StepTerm(PER_KIND_PER_SEQUENCE, dict(TRUE_TERMS))
    served = term.overhead(base)
    for kind, graph in ((StepKind.DECODE, True), (StepKind.MIXED, False), (StepKind.MIXED, True)):
        path = StepPath(kind, cuda_graph=graph, padded_tokens=16)
        before = base.seconds(path, 12, 16, 1000)
        assert served.seconds(path, 12, 16, 1000) == pytest.approx(before + TRUE_TERMS[kind.value].seconds(12))
    assert "step term" in served.source


def _write_steps(directory: Path, steps: list[MeasuredStep]) -> None:
    pq.write_table(pa.Table.from_pylist([
        {"step": s.step, "start_s": s.start_s, "duration_s": s.duration_s,
         "prefill": [{"q": q, "ctx": c} for q, c in s.prefill], "decode_ctx": s.decode_ctx, "device_s": s.device_s,
         "graph_captured": s.graph_captured} for s in steps]), directory / "steps.parquet")


def _paired_cell(root: Path) -> tuple[Path, Path]:
    """The synthetic cell of test_server_costs, its two engines having run the same steps, the
    HTTP one with TRUE_TERMS' extra host time on each."""
    http, inprocess = _cell(root, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    rng = random.Random(SEED)
    sizes = [(rng.randint(1, MAX_SEQS), index % 3 == 0) for index in range(STEPS)]
    _write_steps(inprocess, [_step(i, n, INPROCESS_HOST_S, mixed=m) for i, (n, m) in enumerate(sizes)])
    extra = [TRUE_TERMS[MIXED if m else DECODE].seconds(n + m) for n, m in sizes]
    _write_steps(http, [_step(i, n, INPROCESS_HOST_S + e, mixed=m) for i, ((n, m), e) in enumerate(zip(sizes, extra))])
    return http, inprocess


def _batch_cell(root: Path) -> tuple[Path, Path]:
    """The synthetic cell, its engines having run other steps (another count, other batches): the
    in-process one at a constant host time, the HTTP one with TRUE_TERMS' extra on each step."""
    http, inprocess = _cell(root, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    for directory, seed, count in ((inprocess, SEED, STEPS), (http, SEED + 1, STEPS + 17)):
        rng = random.Random(seed)
        sizes = [(rng.randint(1, BATCH_SIZES), index % 3 == 0) for index in range(count)]
        extra = [TRUE_TERMS[MIXED if m else DECODE].seconds(n + m) if directory == http else 0.0 for n, m in sizes]
        _write_steps(directory, [_step(i, n, INPROCESS_HOST_S + e, mixed=m) for i, ((n, m), e) in enumerate(zip(sizes, extra))])
    return http, inprocess


def _analytic(directory: Path) -> EngineModels:
    from dooly.sim.options import StepChoice
    from dooly.sim.schedulers import make_scheduler

    return EngineModels(make_scheduler("transformers"), StepChoice(analytic=True).step_model(MODEL, "transformers"),
                        CpuOverheadModel.zero(), MODEL_LAYERS)


def test_paired_steps_give_a_step_term_and_offsets_left_after_it(tmp_path):
    http, inprocess = _paired_cell(tmp_path)
    with pytest.raises(DoolyError, match="give a step model"):
        measure_server_costs([http], [inprocess])
    costs = measure_server_costs([http], [inprocess], _analytic)
    assert costs.step_term is not None and costs.step_term.form == PER_KIND_PER_SEQUENCE
    assert costs.step_term.terms[DECODE].constant_s == pytest.approx(TRUE_TERMS[DECODE].constant_s, abs=1e-9)
    assert costs.raw_ttft is not None and costs.raw_ttft.median_s == pytest.approx(TTFT_COST_S, abs=1e-9)
    # The simulated step term delays every request: what is left per request is less than the raw offset.
    assert costs.ttft.median_s < costs.raw_ttft.median_s
    assert costs.cells[0].steps == STEPS
    assert costs.consistent
    assert any("only 1 workload" in check for check in costs.not_run)
    path = tmp_path / "costs.json"
    costs.save(path)
    loaded = ServerCosts.load(path)
    assert loaded.step_term == costs.step_term and loaded.raw_ttft == costs.raw_ttft and loaded.ttft == costs.ttft


def test_runs_of_other_steps_give_a_batch_matched_step_term(tmp_path):
    http, inprocess = _batch_cell(tmp_path)
    costs = measure_server_costs([http], [inprocess], _analytic)
    assert costs.step_term is not None and costs.step_term.form == PER_KIND_PER_SEQUENCE
    for kind, term in TRUE_TERMS.items():
        assert costs.step_term.terms[kind].constant_s == pytest.approx(term.constant_s, abs=1e-9)
        assert costs.step_term.terms[kind].per_sequence_s == pytest.approx(term.per_sequence_s, abs=1e-9)
    cell = costs.cells[0]
    assert cell.pairing == BATCH_PAIRING and 0 < cell.steps <= STEPS + 17
    assert not any("step term" in check for check in costs.not_run)
    path = tmp_path / "costs.json"
    costs.save(path)
    assert json.loads(path.read_text())["cells"][0]["pairing"] == BATCH_PAIRING
    assert ServerCosts.load(path).cells[0].pairing == BATCH_PAIRING
    # The same steps on both sides: paired step for step, as before.
    (tmp_path / "same").mkdir()
    same_http, same_inprocess = _paired_cell(tmp_path / "same")
    same = measure_server_costs([same_http], [same_inprocess], _analytic)
    assert same.cells[0].pairing == STEP_PAIRING and same.cells[0].steps == STEPS


def test_server_costs_shows_each_cells_pairing(tmp_path):
    http, inprocess = _batch_cell(tmp_path)
    flags = ["server-costs", "--http", str(http), "--inprocess", str(inprocess), "--analytic"]
    text = CliRunner().invoke(cli, flags)
    assert text.exit_code == 0, text.output
    row = next(line for line in text.output.splitlines() if line.startswith(str(http)))
    assert row.split()[4] == BATCH_PAIRING  # run, in-process runs, requests, paired steps, pairing
    document = CliRunner().invoke(cli, [*flags, "--output", "json"])
    assert document.exit_code == 0, document.output
    assert json.loads(document.stdout)["cells"][0]["pairing"] == BATCH_PAIRING


def _validate(truth: Path, *extra: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["validate", MODEL, "--ground-truth", str(truth), "--analytic",
                                      "--output", "json", *extra])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def _predicted(payload: dict[str, Any], statistic: str) -> float:
    return float(next(r for r in payload["summary"]["rows"] if r["statistic"] == statistic)["predicted"])


def test_validate_simulates_the_step_term_as_host_time(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    offsets_only = measure_server_costs([http], [inprocess])
    with_term = measure_server_costs([http], [inprocess])
    with_term.step_term = StepTerm(PER_KIND_PER_SEQUENCE, dict(TRUE_TERMS))
    offsets_only.save(tmp_path / "offsets.json")
    with_term.save(tmp_path / "term.json")
    plain = _validate(http, "--server-costs", str(tmp_path / "offsets.json"))
    served = _validate(http, "--server-costs", str(tmp_path / "term.json"))
    # Every later token waits for one more step, each at least the decode term's constant longer.
    assert _predicted(served, "tpot_mean") >= _predicted(plain, "tpot_mean") + TRUE_TERMS[DECODE].constant_s
    assert "step term" in served["cpu_overhead"] and "step term" not in plain["cpu_overhead"]
    assert "host term per engine step" in served["server_costs"]


def test_a_version_1_record_still_loads_and_applies_its_offsets(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    document = measure_server_costs([http], [inprocess]).as_dict()
    for name in ("step_term", "raw_ttft", "raw_tpot", "not_run"):
        del document[name]
    for cell in document["cells"]:
        for name in ("raw_ttft", "raw_tpot", "steps"):
            del cell[name]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({**document, "schema": SCHEMA_V1}))
    loaded = ServerCosts.load(path)
    assert loaded.schema == SCHEMA_V1 and loaded.step_term is None
    assert loaded.raw_ttft == loaded.ttft and loaded.cells[0].raw_tpot == loaded.cells[0].tpot
    base = CpuOverheadModel.zero()
    assert loaded.overhead(base, MODEL_LAYERS) is base
    plain, added = _validate(http), _validate(http, "--server-costs", str(path))
    assert _predicted(added, "ttft_mean") == pytest.approx(_predicted(plain, "ttft_mean") + TTFT_COST_S)
    assert _predicted(added, "tpot_mean") == pytest.approx(_predicted(plain, "tpot_mean") + TPOT_COST_S)
