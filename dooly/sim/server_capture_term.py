"""The HTTP server's cost per CUDA-graph capture: extra seconds per layer and sequence of the step.

A capture is host-bound work (the engine records every kernel of the step into a graph), and behind
`transformers serve` the engine thread shares the interpreter with the server's event loop, as for
every step (`dooly.sim.server_step_term`), whose event loop streams the tokens of every sequence in
flight. The step term leaves captures out (a capture is not an ordinary step of its kind); measured on
their own, the steps both engines captured on took longer behind the server in 16 of the 17 cells
of the H100 and H200 leases (lease3-7, lease_d) whose two engines ran the same steps: per capture up
to +39 ms, growing with the layers the graph records and with the sequences the loop streams
meanwhile (lab/server_capture_cost.py, 408 paired captures:
-0.29 ms per layer in steps of under 8 sequences, +0.69 in steps of 48 or more; the light cells'
captures, few sequences, cost no more behind the server). On lease7's 8B async heavy pair the 35
captures were 0.89 s of the HTTP engine's 1.18 s lead over its pair, and most of the requests' TTFT
gap: the captures come first, so every later request waits for them.

Measured step for step only (the two engines ran the same steps): per step both captured on, the
HTTP run's wall minus the in-process run's; the term is their sum over the layers times sequences
of those steps (pooled: weighted as the simulator sums captures). Added to each simulated capture
as that many seconds per layer of the served model and per sequence of the step
(`CpuOverheadModel.graph_capture_per_seq_s`). A term below zero is withheld, as a negative offset
is: a server adds time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from dooly.errors import DoolyError
from dooly.sim.server_step_term import other_steps
from dooly.sim.step_model import CpuOverheadModel
from dooly.sim.validate import MeasuredStep

MS_PER_S = 1e3
US_PER_S = 1e6
# The sequences a capture's cost is shown at in `describe`: a heavy cell's typical step.
SHOWN_SEQS = 64


@dataclass(frozen=True)
class CaptureSample:
    """One step both engines captured a graph on: the HTTP run's extra wall seconds, the served
    model's decoder layers (what a capture records) and the step's sequences (what the server's
    loop streams meanwhile)."""

    extra_s: float
    num_layers: int
    num_seqs: int


@dataclass(frozen=True)
class CaptureTerm:
    """Extra seconds of a capture behind the server per decoder layer and per sequence of its
    step, from `captures` paired captures over `layer_seqs` layers x sequences in all."""

    per_layer_seq_s: float
    captures: int
    layer_seqs: int

    @property
    def applied(self) -> bool:
        """Whether the term is added: only where it is above zero (a server adds time)."""
        return self.per_layer_seq_s > 0

    def per_sequence_s(self, num_layers: int) -> float:
        """Extra seconds of one capture per sequence of its step, for a model of `num_layers`
        layers (0 where withheld)."""
        return self.per_layer_seq_s * num_layers if self.applied else 0.0

    def overhead(self, base: CpuOverheadModel, num_layers: int) -> CpuOverheadModel:
        """`base` with each capture costing `per_sequence_s(num_layers)` more per sequence of its step."""
        extra = self.per_sequence_s(num_layers)
        if not extra:
            return base
        source = f"{base.source or 'no host overhead'} + the server's capture term ({self.describe(num_layers)})"
        return replace(base, graph_capture_per_seq_s=base.graph_capture_per_seq_s + extra, source=source)

    def describe(self, num_layers: int | None = None) -> str:
        """`+11.9 us per layer and sequence of a capture (+24.4 ms at 32 layers, 64 sequences; 70
        paired captures)`, or why withheld."""
        text = f"{self.per_layer_seq_s * US_PER_S:+.1f} us per layer and sequence of a capture"
        if num_layers is not None and self.applied:
            text += (f" ({self.per_sequence_s(num_layers) * SHOWN_SEQS * MS_PER_S:+.1f} ms at {num_layers} layers, "
                     f"{SHOWN_SEQS} sequences)")
        text += f"; {self.captures} paired captures"
        return text if self.applied else text + "; not applied: below zero"

    def as_dict(self) -> dict[str, Any]:
        return {"per_layer_seq_s": self.per_layer_seq_s, "captures": self.captures, "layer_seqs": self.layer_seqs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptureTerm:
        """The `capture_term` entry of a `dooly.server_costs/2` record."""
        try:
            term = cls(float(data["per_layer_seq_s"]), int(data["captures"]), int(data["layer_seqs"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DoolyError(f"malformed capture term ({exc})") from None
        if not math.isfinite(term.per_layer_seq_s):
            raise DoolyError("capture term is not finite")
        return term


def paired_capture_samples(http: Sequence[MeasuredStep], inprocess: Sequence[MeasuredStep],
                           num_layers: int) -> list[CaptureSample]:
    """Per step both engines captured a graph on, the HTTP step's wall minus the in-process one's;
    none where the two ran other steps (a capture's shape then has no partner to be timed against)."""
    if other_steps(http, inprocess):
        return []
    return [CaptureSample(ours.duration_s - theirs.duration_s, num_layers, len(ours.prefill) + len(ours.decode_ctx))
            for ours, theirs in zip(http, inprocess, strict=True)
            if ours.graph_captured and theirs.graph_captured and math.isfinite(ours.duration_s - theirs.duration_s)]


def fit_capture_term(samples: Sequence[CaptureSample]) -> CaptureTerm | None:
    """The pooled term: every paired capture's extra seconds over their layers x sequences (None
    for none)."""
    layer_seqs = sum(s.num_layers * s.num_seqs for s in samples)
    if not samples or layer_seqs <= 0:
        return None
    return CaptureTerm(sum(s.extra_s for s in samples) / layer_seqs, len(samples), layer_seqs)
