"""Per-operation latencies of a fitted model inventory, fast enough to fill other simulators' tables.

The exporters (`dooly export vidur`, `dooly export llmservingsim`) need, at every point of a
profile grid, the seconds of each inventory operation on its own, so they can charge it to the
target simulator's timer (Vidur's `mlp_up_proj`, LLMServingSim's `gate_up_proj`...). The fitted
step model answers per-operation questions through `StepPredictor.op_seconds`, which re-derives
every operation's terms on each call (about 40 ms per point for an 8B model): a Vidur or
LLMServingSim grid holds thousands of points. A one-operation step model per signature answers
the same question in microseconds, with the same fitted models and the same numbers (checked in
tests/sim/test_export_vidur.py), so the exporters use this instead.

Coverage: each operation is either measured (its own signature was profiled on the platform) or
estimated (a class regressor or a fallback). `CoverageTally` sums, per exported file, the
predicted seconds of each kind, so every file says how much of it rests on measurements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# What a StepPredictor entry's third element says for an operation measured on the platform: the
# current predictor stores `unseen` (False = measured); the coverage-aware one names its source.
SOURCE_MEASURED = "measured"


class OneOpStep(Protocol):
    """The part of a `StepPredictor` built on a one-operation inventory that is used here."""

    entries: Sequence[tuple[Any, int, Any]]

    def step_seconds(self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int]) -> float: ...


class StepPredictorFactory(Protocol):
    """`dooly.fit.predictor.Predictor`: builds step models from inventories."""

    def step_predictor(self, inventory: Mapping[str, Any]) -> Any: ...


def is_measured(flag: Any) -> bool:
    """Whether a StepPredictor entry's flag (`unseen` bool, or a source name) means measured."""
    if isinstance(flag, bool):
        return not flag
    return str(flag) == SOURCE_MEASURED


class FittedOpSeconds:
    """`op_seconds(prefill, decode_ctx)` rows (signature, seconds per execution, measured) from a
    fitted predictor and an inventory, one one-operation step model per signature."""

    def __init__(self, predictor: StepPredictorFactory, inventory: Mapping[str, Any]) -> None:
        self.model_id = str(inventory.get("model_id", ""))
        self._steps: dict[str, OneOpStep] = {}
        self.measured: dict[str, bool] = {}
        for entry in inventory.get("operations", []):
            signature = str(entry["signature"])
            if signature in self._steps:
                continue
            single = {key: value for key, value in inventory.items() if key != "operations"}
            single["operations"] = [{**entry, "count": 1}]
            step = predictor.step_predictor(single)
            self._steps[signature] = step
            self.measured[signature] = is_measured(step.entries[0][2])

    @property
    def op_count(self) -> int:
        return len(self._steps)

    @property
    def unseen_count(self) -> int:
        return sum(1 for measured in self.measured.values() if not measured)

    def op_seconds(self, prefill: Sequence[tuple[int, int]], decode_ctx: Sequence[int]) -> list[dict[str, Any]]:
        """Seconds of one execution of every inventory signature in the step (prefill chunks of
        (new tokens, cached context), decode contexts)."""
        return [
            {"signature": signature, "seconds": step.step_seconds(prefill, decode_ctx), "measured": self.measured[signature]}
            for signature, step in self._steps.items()
        ]


@dataclass
class CoverageTally:
    """Predicted seconds per exported file, split into measured and estimated."""

    measured_s: dict[str, float] = field(default_factory=dict)
    total_s: dict[str, float] = field(default_factory=dict)

    def add(self, file: str, seconds: float, measured: bool) -> None:
        self.total_s[file] = self.total_s.get(file, 0.0) + seconds
        if measured:
            self.measured_s[file] = self.measured_s.get(file, 0.0) + seconds

    def share(self, file: str) -> float | None:
        """Measured share of the file's predicted seconds (None: nothing predicted)."""
        total = self.total_s.get(file, 0.0)
        return self.measured_s.get(file, 0.0) / total if total > 0 else None

    def as_dict(self) -> dict[str, float | None]:
        return {file: self.share(file) for file in sorted(self.total_s)}
