"""The transformers scheduler model against the engine's recorded steps (lab/schedule_fidelity.py).

test_transformers_parity.py drives the model beside the real transformers scheduler on random
workloads; here it is driven on the clock of committed engine-grid runs (each step formed from the
requests that had arrived when the engine began preparing it) and must form every step the engine
recorded: synchronous and asynchronous loops, heavy and light load, the eager path's 512-token
budget (where a chunk boundary once leaves a prompt's last token alone). The lab's attribution of
the recorded chunks and decodes to requests, and its replay of them on the simulator's clock, are
checked on the same runs. No store is needed: nothing is priced but by a constant step model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dooly.sim.options import with_model_groups
from dooly.sim.schedulers import Scheduler, make_scheduler
from dooly.sim.simulator import simulate
from dooly.sim.validate import GroundTruth, load_ground_truth

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "lab"))

import schedule_fidelity as fidelity  # noqa: E402

RUNS = (
    "data/h200/experiments/engine_grid/r1/Llama-3.2-1B.paged-sdpa.graphs.heavy",
    "data/h200/experiments/engine_grid/r1/Llama-3.2-1B.paged-sdpa.async.heavy",
    "data/h200/experiments/engine_grid/r2/Llama-3.1-8B.paged-eager.graphs.light",
    "data/h100/experiments/engine_grid/r1/Llama-3.2-3B.paged-sdpa.default.light",
)
STEP_S = 0.01


def _run(path: str) -> tuple[GroundTruth, Scheduler]:
    run = ROOT / path
    assert (run / "steps.parquet").is_file(), f"{path} is a committed run"
    model = str(json.loads((run / "bench.json").read_text())["model"])
    settings = json.loads((run / "engine.json").read_text())
    return load_ground_truth(run), make_scheduler("transformers", with_model_groups(model, "transformers", settings))


@pytest.mark.parametrize("path", RUNS)
def test_model_forms_every_recorded_step_on_the_engines_clock(path: str) -> None:
    truth, scheduler = _run(path)
    same, first_diff = fidelity.on_engine_clock(truth, scheduler)
    assert first_diff is None
    assert same == len(truth.steps)


@pytest.mark.parametrize("path", RUNS)
def test_recorded_steps_are_attributed_to_whole_requests(path: str) -> None:
    truth, scheduler = _run(path)
    schedule = fidelity.measured_schedule(truth)
    prompts = {r.request_id: r.prompt_tokens for r in truth.requests}
    assert set(schedule.first) == set(schedule.last) == set(prompts)
    decodes = {rid: 0 for rid in prompts}
    for entries in schedule.steps:
        for rid, q, ctx in entries:
            if ctx >= prompts[rid]:
                assert q == 1
                decodes[rid] += 1
    for r in truth.requests:
        # A synchronous loop decodes each later token once; an asynchronous one may schedule a
        # finished request once more (a wasted slot).
        extra = decodes[r.request_id] - (r.output_tokens - 1)
        assert extra == 0 if not scheduler.async_scheduling else extra in (0, 1)


def test_replay_runs_the_recorded_steps_in_order() -> None:
    """The measured schedule on the simulator's clock: one step per recorded step, each request's
    first token at the end of its last prefill step (a constant step price, no host time)."""
    truth, scheduler = _run(RUNS[0])
    schedule = fidelity.measured_schedule(truth)
    result = simulate(truth.workload(), fidelity.ReplayScheduler(schedule, scheduler), _Constant())
    assert result.num_steps == len(truth.steps)
    ends = [start + STEP_S for start in result.step_column("start_s")]
    by_id = {r.request_id: r for r in result.requests}
    for r in truth.requests:
        assert by_id[r.request_id].first_token_s == pytest.approx(ends[schedule.last[r.request_id]])
        assert by_id[r.request_id].output_tokens == r.output_tokens


class _Constant:
    """A step model of STEP_S a step."""

    def step_seconds(self, prefill: list[tuple[int, int]], decode_ctx: list[int]) -> float:
        return STEP_S
