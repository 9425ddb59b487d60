"""Fixtures for the simulator tests: a scheduler driver without a clock, simple step models."""

from __future__ import annotations

from typing import Any

import pytest

from dooly.sim.schedulers import Scheduler, Seq


class ConstantStepModel:
    """Every step takes the same device time, whatever it holds."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def step_seconds(self, prefill, decode_ctx) -> float:
        return self.seconds


class RecordingPathModel:
    """Path-aware model that remembers the paths it was told about."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.paths: list[Any] = []

    def step_seconds(self, prefill, decode_ctx, *, path=None) -> float:
        self.paths.append(path)
        return self.seconds


@pytest.fixture
def constant_model():
    return ConstantStepModel


@pytest.fixture
def recording_model():
    return RecordingPathModel


@pytest.fixture
def drive():
    """Run a scheduler step by step with no clock: requests `(id, prompt, output, arrival_step)`
    are added when their step comes; every sampled token is delivered right after its step.
    Returns (steps, seqs): steps = [[(id, q, ctx), ...] per step], seqs by id."""

    def run(scheduler: Scheduler, requests, max_steps: int = 10_000):
        seqs = {rid: Seq(rid, float(arrival), prompt, output) for rid, prompt, output, arrival in requests}
        pending = sorted(requests, key=lambda r: r[3])
        steps: list[list[tuple[str, int, int]]] = []
        step = 0
        unfinished = len(seqs)
        while unfinished and step < max_steps:
            while pending and pending[0][3] <= step:
                scheduler.add(seqs[pending.pop(0)[0]])
            batch = scheduler.schedule()
            step += 1
            if batch is None:
                steps.append([])
                continue
            steps.append([(seq.rid, q, ctx) for seq, q, ctx in batch.entries])
            for seq, epoch in batch.samplers:
                if seq.finished or seq.epoch != epoch:
                    continue
                seq.generated += 1
                if seq.generated >= seq.target:
                    seq.finished = True
                    unfinished -= 1
                    scheduler.finish(seq)
        return steps, seqs

    return run
