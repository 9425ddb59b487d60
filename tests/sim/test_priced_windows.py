"""Decode windows priced whole (`decode_steps`, `CpuOverheadModel.kv_terms`) and recorded whole
(`DecodeRun`): the same step costs, step log, compositions and coverage as step by step."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.fit import synthetic as syn
from dooly.sim.schedulers import TransformersCBScheduler
from dooly.sim.simulator import SimResult, simulate
from dooly.sim.step_model import AnalyticStepModel, CpuOverheadModel, OverheadTerms, StepKind, StepPath
from dooly.workload import LengthSpec, WorkloadSpec, generate_requests

TOY = syn.TOY_MODELS[0]
OVERHEAD = CpuOverheadModel(
    terms={"decode": OverheadTerms(1e-3, 2e-5, 1e-7, 3e-9), "default": OverheadTerms(2e-3, 1e-5, 2e-7, 1e-9)},
)
CONFIGS: dict[str, dict[str, Any]] = {
    "fifo": {"num_blocks": 96, "block_size": 16},
    "roomy": {"num_blocks": 4096, "block_size": 16},
    "graphs": {"num_blocks": 512, "block_size": 32, "use_cuda_graph": True},
}


class FittedEachStep:
    """A fitted step model without `decode_steps`: every window step priced from its contexts."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def step_seconds(self, prefill: list[tuple[int, int]], decode_ctx: list[int], full_reads: bool = False) -> float:
        return self.inner.step_seconds(prefill, decode_ctx, full_reads=full_reads)


class AnalyticEachStep:
    """The analytic model without `decode_steps`."""

    def __init__(self) -> None:
        self.inner = AnalyticStepModel()

    def step_seconds(self, prefill: list[tuple[int, int]], decode_ctx: list[int], *, path: StepPath | None = None) -> float:
        return self.inner.step_seconds(prefill, decode_ctx, path=path)


@pytest.fixture(scope="module")
def toy_step(tmp_path_factory) -> Any:
    """The step predictor of a synthetic model's shards, merged and fitted."""
    from dooly.fit.commands import find_inventory
    from dooly.fit.persist import load_predictor
    from dooly.store.backends import open_store
    from dooly.store.documents import write_json
    from dooly.store.merge import merge_store
    from dooly.store.shards import write_shard

    root = str(tmp_path_factory.mktemp("db"))
    store = open_store(root)
    write_shard(store, syn.snapshot_table((TOY,)), run_id="synthetic", chunk_index=0)
    write_json(store, syn.inventory_store_key(TOY), syn.inventory(TOY))
    merge_store(store)
    result = CliRunner().invoke(cli, ["fit", "--store", root, "--folds", "2", "--output", "json"])
    assert result.exit_code == 0, result.output
    predictor = load_predictor(store, platform=syn.PLATFORM, engine=syn.ENGINE, backend=syn.BACKEND, dtype=syn.DTYPE)
    return predictor.step_predictor(find_inventory(store, TOY.model_id, syn.BACKEND))


def _requests(rate: float):
    spec = WorkloadSpec(
        num_requests=200,
        rate=rate,
        prompt=LengthSpec("uniform", low=8, high=400),
        output=LengthSpec("uniform", low=1, high=300),
        seed=5,
    )
    return generate_requests(spec)


def _same_runs(reference: SimResult, priced: SimResult) -> None:
    assert priced.steps == reference.steps
    assert [dataclasses.astuple(r) for r in priced.requests] == [dataclasses.astuple(r) for r in reference.requests]
    assert priced.token_times == reference.token_times
    assert priced.batches == reference.batches


@pytest.mark.parametrize("rate", [5.0, 200.0])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fitted_windows_priced_whole_change_nothing(toy_step, name: str, rate: float) -> None:
    runs = [
        simulate(_requests(rate), TransformersCBScheduler(CONFIGS[name]), model, OVERHEAD, record_token_times=True,
                 record_batches=True)
        for model in (FittedEachStep(toy_step), toy_step)
    ]
    _same_runs(*runs)
    priced = runs[1]
    assert priced.batches
    assert toy_step.coverage_of_phases(priced.batch_phases()) == toy_step.coverage_by_phase(priced.batches)


@pytest.mark.parametrize("rate", [5.0, 200.0])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_analytic_windows_priced_whole_change_nothing(name: str, rate: float) -> None:
    runs = [
        simulate(_requests(rate), TransformersCBScheduler(CONFIGS[name]), model, OVERHEAD, record_token_times=True,
                 record_batches=True)
        for model in (AnalyticEachStep(), AnalyticStepModel())
    ]
    _same_runs(*runs)


def test_decode_steps_are_step_seconds(toy_step) -> None:
    ctx = [1, 17, 300, 4095, 20000]
    fitted = toy_step.decode_steps(ctx)
    assert fitted is not None
    for step in (0, 1, 7, 300):
        assert fitted(step) == toy_step.step_seconds([], [c + step for c in ctx])
    assert toy_step.decode_steps([0, 5]) is None  # a decode that reads nothing changes D after one step


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("path", [StepPath(StepKind.DECODE, padded_tokens=8), StepPath(StepKind.DECODE, cuda_graph=True)])
def test_analytic_decode_steps_are_step_seconds(tp: int, path: StepPath) -> None:
    ctx = [1, 17, 300, 4095, 20000]
    analytic = AnalyticStepModel(tp=tp)
    roofline = analytic.decode_steps(ctx, path=path)
    assert roofline is not None
    for step in (0, 1, 7, 300, 100000):
        assert roofline(step) == analytic.step_seconds([], [c + step for c in ctx], path=path)


def test_kv_terms_are_seconds() -> None:
    path = StepPath(StepKind.DECODE)
    for model in (OVERHEAD, CpuOverheadModel.zero(), CpuOverheadModel(terms={"mixed": OverheadTerms(1.0)})):
        host, per_kv = model.kv_terms(path, 7, 7)
        for kv in (0, 13, 123457):
            assert host + per_kv * kv == model.seconds(path, 7, 7, kv)


def test_decode_runs_are_their_steps() -> None:
    """`DecodeRuns` as flat rows and as sums: what the steps they stand for give."""
    import numpy as np

    from dooly.fit.features import decode_sums_aggregates, seqs_aggregates
    from dooly.fit.predictor import DecodeRuns, flatten_steps

    runs = DecodeRuns([[3, 0, 5], [7], [40000, 2, 9, 1]], [3, 1, 4])
    steps: list[tuple[list[tuple[int, int]], list[int]]] = [
        ([], [c + i for c in ctx]) for ctx, count in zip(runs.contexts, runs.steps, strict=True) for i in range(count)
    ]
    q, ctx, step, n_steps = runs.flat()
    for flat, reference in zip((q, ctx, step), flatten_steps(steps), strict=True):
        np.testing.assert_array_equal(flat, reference)
    assert n_steps == len(steps)
    expected = seqs_aggregates(q, ctx, step, n_steps, np.zeros(len(q), dtype=np.int64), 4.125)
    got = decode_sums_aggregates(*runs.sums(), 4.125)
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)


class BrokenDecodes(AnalyticEachStep):
    """Decode windows priced at `bad` seconds from their third step on."""

    def __init__(self, bad: float) -> None:
        super().__init__()
        self.bad = bad

    def decode_steps(self, decode_ctx: list[int], *, path: StepPath | None = None) -> Any:
        return lambda step: self.bad if step >= 2 else 1e-3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-3])
def test_a_window_priced_at_nonsense_stops_the_run(bad: float) -> None:
    from dooly.sim.schedulers import SimulationError

    with pytest.raises(SimulationError, match=f"returned {bad!r} seconds"):
        simulate(_requests(5.0), TransformersCBScheduler(CONFIGS["roomy"]), BrokenDecodes(bad), OVERHEAD)
