"""Decode windows (`DecodeWindow`): running certain pure-decode steps without scheduling each
changes nothing a simulation reports, step for step and request for request."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dooly.sim.schedulers import DecodeWindow, TransformersCBScheduler
from dooly.sim.simulator import simulate
from dooly.sim.step_model import AnalyticStepModel, CpuOverheadModel, OverheadTerms
from dooly.workload import LengthSpec, WorkloadSpec, generate_requests


class StepByStep(TransformersCBScheduler):
    """The same scheduler with decode windows off: every step is scheduled."""

    def decode_window(self) -> DecodeWindow | None:
        return None


class EachCandidate(StepByStep):
    """Every step scheduled and every candidate taken one by one (no head of certain decodes)."""

    def _certain_decodes(self, decoding: list, all_decode: bool) -> None:
        return None


OVERHEAD = CpuOverheadModel(
    terms={"decode": OverheadTerms(1e-3, 2e-5, 1e-7, 3e-9), "default": OverheadTerms(2e-3, 1e-5, 2e-7, 1e-9)},
    graph_capture_s=0.02,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "fifo": {"num_blocks": 96, "block_size": 16},
    "roomy": {"num_blocks": 4096, "block_size": 16},
    "prefill-first": {"num_blocks": 96, "block_size": 16, "scheduler_type": "prefill_first"},
    "offload": {"num_blocks": 64, "block_size": 16, "cpu_offload_blocks": 48},
    "graphs": {"num_blocks": 512, "block_size": 32, "use_cuda_graph": True},
    "fast-path": {"num_blocks": 512, "block_size": 32, "use_cuda_graph": True, "max_blocks_per_request": 8},
    "small-batches": {"num_blocks": 2048, "block_size": 16, "max_requests_per_batch": 6, "max_batch_tokens": 256},
    "sliding": {"num_blocks": 256, "block_size": 16, "full_attention_groups": 1, "sliding_attention_groups": 1,
                "sliding_window": 64},
}


def _requests(rate: float):
    spec = WorkloadSpec(
        num_requests=250,
        rate=rate,
        prompt=LengthSpec("uniform", low=8, high=400),
        output=LengthSpec("uniform", low=1, high=300),
        seed=11,
    )
    return generate_requests(spec)


@pytest.mark.parametrize("rate", [5.0, 200.0])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_windows_change_nothing(name: str, rate: float) -> None:
    requests = _requests(rate)
    model = AnalyticStepModel()
    runs = [
        simulate(requests, cls(CONFIGS[name]), model, OVERHEAD, record_token_times=True, record_batches=True)
        for cls in (StepByStep, TransformersCBScheduler)
    ]
    reference, windowed = runs
    assert windowed.steps == reference.steps
    assert [dataclasses.astuple(r) for r in windowed.requests] == [dataclasses.astuple(r) for r in reference.requests]
    assert windowed.token_times == reference.token_times
    assert windowed.batches == reference.batches


def test_windows_run_most_decode_steps() -> None:
    """At light load nearly every step is one of a window (what makes the loop fast)."""
    scheduler = TransformersCBScheduler(CONFIGS["roomy"])
    calls = []
    original = scheduler.advance_decodes

    def counted(window: DecodeWindow, steps: int) -> list:
        calls.append(steps)
        return original(window, steps)

    scheduler.advance_decodes = counted  # type: ignore[method-assign]
    result = simulate(_requests(5.0), scheduler, AnalyticStepModel())
    assert sum(calls) > result.num_steps // 2


@pytest.mark.parametrize("rate", [5.0, 200.0])
@pytest.mark.parametrize("name", [*sorted(CONFIGS), "async"])
def test_certain_decodes_change_nothing(name: str, rate: float) -> None:
    """A batch's head of decodes taken in one go (`_certain_decodes`) forms the same batches."""
    config = {**CONFIGS["fifo"], "use_async_batching": True} if name == "async" else CONFIGS[name]
    requests = _requests(rate)
    model = AnalyticStepModel()
    reference, together = (
        simulate(requests, cls(config), model, OVERHEAD, record_token_times=True, record_batches=True)
        for cls in (EachCandidate, StepByStep)
    )
    assert together.steps == reference.steps
    assert [dataclasses.astuple(r) for r in together.requests] == [dataclasses.astuple(r) for r in reference.requests]
    assert together.token_times == reference.token_times
    assert together.batches == reference.batches


@pytest.mark.parametrize("name", ["roomy", "graphs", "small-batches"])
def test_decode_group_is_kept_between_windows(monkeypatch, name: str) -> None:
    """Windows on a loaded replica with room in its cache (no evictions, which drop the group)
    mostly follow one another through the same decode group (`_DecodeGroup`): looking at every
    request again for each window is what it saves."""
    from dooly.sim import schedulers

    built = []
    original_init = schedulers._DecodeGroup.__init__

    def counted_init(self) -> None:
        built.append(self)
        original_init(self)

    monkeypatch.setattr(schedulers._DecodeGroup, "__init__", counted_init)
    scheduler = TransformersCBScheduler(CONFIGS[name])
    windows = []
    original = scheduler.advance_decodes

    def counted(window: DecodeWindow, steps: int) -> list:
        windows.append(steps)
        return original(window, steps)

    scheduler.advance_decodes = counted  # type: ignore[method-assign]
    simulate(_requests(200.0), scheduler, AnalyticStepModel())
    assert len(windows) > 4 * len(built), (len(windows), len(built))
