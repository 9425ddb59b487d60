"""The HTTP server's cost per engine step: extra host time, measured from paired runs' steps.

Behind `transformers serve` the engine thread shares the interpreter with the server's event loop,
which streams every token of every request: at load the engine's steps each take more host time
than in-process (the lease3 H100 pair: median 23.1 against 11.1 ms, same steps, same device time).
That cost is per step and grows with the sequences in the step, so it delays every request in
flight and feeds back into the queue; a per-request offset added after the simulation cannot
represent it. It is measured here from paired runs, as a function of the step. Where the two
engines ran the same steps, step for step (exact): per step (no graph capture on either side), the
HTTP run's host time (wall minus device) minus the in-process run's. Where they ran other steps
(always at light load, where requests reach the server's engine at other instants: 728 against 778
steps), batch-matched: each HTTP step (no graph capture) against the median host time of the
in-process steps of its batch class (step kind and number of sequences), given at least
MIN_PARTNER_STEPS of them. The class is what the term is a function of, so the median in-process
step of the class stands in for the step the in-process engine would have run; that this is sound
is checked on the heavy pairs, where both pairings run and agree (H200 lease_d decode terms, ms
+ ms per sequence, batch-matched against step for step: 8B +1.03 + 0.111 against +1.16 + 0.106,
1B +0.24 + 0.162 against +0.12 + 0.171, 3B +0.30 + 0.214 against +0.32 + 0.224; the H100 lease4 8B
no-graph heavy pair -0.81 + 0.178 against -0.73 + 0.154). Step for step is used whenever the runs
allow it; runs without the probe's device time get neither. An async-batching loop's host work
overlaps the device's, so its wall minus device time is about zero on both sides and hides the
server: there a step's host time is the host's share of its cycle (`host_times`), which is also
what the simulated async loop sets against the device's (docs/server-costs.md).

Three forms compete: one constant; a constant per step kind (decode, mixed, prefill); a constant
per kind plus a per-sequence slope. The form is chosen by leave-one-step-class-out: steps are
grouped by kind and by quantile of their sequence count, every class is predicted by the form
fitted without it, and the form with the smallest mean absolute error over all held-out steps wins
(the simpler one unless beaten by more than the clocks' resolution). A kind with too few steps of
its own gets the form's pooled fit (`default`). `StepTerm.overhead` adds the chosen term to a host
overhead model, which is how `dooly validate --server-costs` simulates the server's engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dooly.errors import DoolyError
from dooly.sim.step_model import GRAPH_SUFFIX, OVERHEAD_KEYS, CpuOverheadModel, OverheadTerms, StepKind
from dooly.sim.validate import MeasuredStep, async_timeline

logger = logging.getLogger(__name__)

CONSTANT = "constant"
PER_KIND_CONSTANT = "per_kind_constant"
PER_KIND_PER_SEQUENCE = "per_kind_constant_per_sequence"
# Simplest first: on equal held-out error (within TIE_S) the earlier form wins.
FORMS = (CONSTANT, PER_KIND_CONSTANT, PER_KIND_PER_SEQUENCE)
DEFAULT_KEY = "default"
# A kind needs this many paired steps for terms of its own (as CpuOverheadModel.fit asks).
MIN_KIND_STEPS = 8
# Batch-matched pairing: an HTTP step's batch class (kind, sequences) needs this many in-process
# steps for their median to stand in for its partner; with fewer the step gives no sample.
MIN_PARTNER_STEPS = 3
# How a cell's steps were paired: step for step (exact), batch-matched (the fallback), or not at all.
STEP_PAIRING, BATCH_PAIRING, NO_PAIRING = "step", "batch", ""
# Sequence-count quantile classes per kind: what the held-out classes are cut along, so that the
# per-sequence slope is judged on sizes it was not fitted on.
SIZE_CLASSES = 4
# A form must beat a simpler one's held-out error by more than this (seconds per step, about the
# resolution of the step clocks) to be chosen: on equal footing the simpler form wins.
TIE_S = 1e-6
MS_PER_S = 1e3


@dataclass(frozen=True)
class StepSample:
    """One paired step: its kind, its sequences, and the HTTP run's extra host seconds."""

    kind: str
    num_seqs: int
    extra_s: float


@dataclass(frozen=True)
class KindTerm:
    """Extra host seconds of one step of a kind: constant + per sequence."""

    constant_s: float = 0.0
    per_sequence_s: float = 0.0

    def seconds(self, num_seqs: int) -> float:
        return self.constant_s + self.per_sequence_s * num_seqs


@dataclass
class StepTerm:
    """The server's extra host time per engine step, per kind (`default` for kinds not fitted),
    in the form leave-one-step-class-out chose; `selection` holds each form's held-out mean
    absolute error (seconds)."""

    form: str
    terms: dict[str, KindTerm]
    steps: int = 0
    classes: int = 0
    selection: dict[str, float] = field(default_factory=dict)

    def term_of(self, kind: str) -> KindTerm:
        """The kind's own term, else `default`, else none."""
        return self.terms.get(kind) or self.terms.get(DEFAULT_KEY) or KindTerm()

    def seconds(self, kind: str, num_seqs: int) -> float:
        """Extra host seconds of one step of `kind` holding `num_seqs` sequences."""
        return self.term_of(kind).seconds(num_seqs)

    def overhead(self, base: CpuOverheadModel) -> CpuOverheadModel:
        """`base` with this term added to every path's host time: what the server's engine pays
        per step. Every path key gets explicit terms, so a key `base` resolves through its kind or
        `default` gets the term of its own kind, not of the key it fell back to."""
        terms: dict[str, OverheadTerms] = {}
        for key in (*OVERHEAD_KEYS, DEFAULT_KEY):
            own = base.terms.get(key) or base.terms.get(key.removesuffix(GRAPH_SUFFIX)) or base.terms.get(DEFAULT_KEY)
            extra = self.term_of(key.removesuffix(GRAPH_SUFFIX))
            own = own or OverheadTerms()
            terms[key] = replace(own, constant_s=own.constant_s + extra.constant_s,
                                 per_sequence_s=own.per_sequence_s + extra.per_sequence_s)
        source = f"{base.source or 'no host overhead'} + the server's step term ({self.describe()})"
        return replace(base, terms=terms, source=source)

    def describe(self) -> str:
        """`decode +2.14 ms + 0.207 ms/seq, mixed ...` and the form's name."""
        parts = []
        for kind, term in sorted(self.terms.items()):
            text = f"{kind} {term.constant_s * MS_PER_S:+.2f} ms"
            if self.form == PER_KIND_PER_SEQUENCE:
                text += f" {term.per_sequence_s * MS_PER_S:+.3f} ms/seq"
            parts.append(text)
        return f"{', '.join(parts)} per step ({self.form.replace('_', ' ')}, {self.steps} paired steps)"

    def as_dict(self) -> dict[str, Any]:
        return {"form": self.form, "steps": self.steps, "classes": self.classes, "selection_mae_s": dict(self.selection),
                "terms": {k: {"constant_s": t.constant_s, "per_sequence_s": t.per_sequence_s}
                          for k, t in sorted(self.terms.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepTerm:
        """The `step_term` entry of a `dooly.server_costs/2` record."""
        form = data.get("form")
        if form not in FORMS:
            raise DoolyError(f"step term form {form!r} is not one of {', '.join(FORMS)}")
        allowed = {kind.value for kind in StepKind} | {DEFAULT_KEY}
        terms: dict[str, KindTerm] = {}
        for kind, values in dict(data.get("terms") or {}).items():
            if kind not in allowed:
                raise DoolyError(f"step term kind {kind!r} is not one of {sorted(allowed)}")
            term = KindTerm(float(values.get("constant_s", 0.0)), float(values.get("per_sequence_s", 0.0)))
            if not (math.isfinite(term.constant_s) and math.isfinite(term.per_sequence_s)):
                raise DoolyError(f"step term of {kind!r} is not finite")
            terms[kind] = term
        return cls(str(form), terms, int(data.get("steps", 0)), int(data.get("classes", 0)),
                   {str(k): float(v) for k, v in dict(data.get("selection_mae_s") or {}).items()})


class OtherStepsError(DoolyError):
    """The paired engines ran other steps (another count, or a step holding other batches): their
    host times cannot be paired step for step, only batch-matched."""


def host_seconds(step: MeasuredStep) -> float:
    """The step's host time: its wall time minus the device time the bench probe measured."""
    return step.duration_s - step.device_s


def host_times(steps: Sequence[MeasuredStep], asynchronous: bool = False) -> list[float]:
    """Each step's host time. A synchronous loop's is its wall minus its device time
    (`host_seconds`). An async-batching loop's host work overlaps the device's, so its wall minus
    device time is about zero on both sides of a pair and hides the server: there it is the host's
    share of the cycle that `validate.async_timeline` rebuilds (prepare + launch + the update's own
    work), which is the time the simulator's async loop sets against the device's."""
    if asynchronous:
        return [timing.host_s for timing in async_timeline(steps)]
    return [host_seconds(step) for step in steps]


def batch_class(step: MeasuredStep) -> tuple[str, int]:
    """What a step's extra host time is a function of: its kind and its number of sequences."""
    return StepKind.of(step.prefill, step.decode_ctx).value, len(step.prefill) + len(step.decode_ctx)


def other_steps(http: Sequence[MeasuredStep], inprocess: Sequence[MeasuredStep]) -> str:
    """Why the two engines did not run the same steps (another count, or a step holding other
    batches), or "" where they did: only then can their steps be paired step for step."""
    if len(http) != len(inprocess):
        return f"the paired engines ran {len(http)} and {len(inprocess)} steps"
    for ours, theirs in zip(http, inprocess, strict=True):
        if ours.prefill != theirs.prefill or ours.decode_ctx != theirs.decode_ctx:
            return f"step {ours.step} holds other batches in the two runs"
    return ""


def paired_step_samples(http: Sequence[MeasuredStep], inprocess: Sequence[MeasuredStep],
                        asynchronous: bool = False) -> list[StepSample]:
    """Per step the two engines both ran without capturing a graph: the HTTP step's host time
    minus the in-process one's. Refused unless the two ran the same steps (same batches in the same
    order; else OtherStepsError) with the probe's device time: only then is the difference the
    server's, step for step."""
    why = other_steps(http, inprocess)
    if why:
        raise OtherStepsError(f"{why}: their host times cannot be paired step for step")
    samples = []
    for ours, theirs, our_host, their_host in zip(http, inprocess, host_times(http, asynchronous),
                                                  host_times(inprocess, asynchronous), strict=True):
        if ours.graph_captured or theirs.graph_captured:
            continue
        extra = our_host - their_host
        if math.isfinite(extra):
            samples.append(StepSample(*batch_class(ours), extra))
    if not samples:
        raise DoolyError("the paired runs hold no step with a device time on both sides (steps.parquet device_s)")
    return samples


def batch_matched_samples(http: Sequence[MeasuredStep], inprocess: Sequence[MeasuredStep],
                          min_partner_steps: int = MIN_PARTNER_STEPS, asynchronous: bool = False) -> list[StepSample]:
    """Per HTTP step without a graph capture: its host time minus the median host time of the
    in-process steps of its batch class (kind, sequences; no capture, a device time), where that
    class holds at least `min_partner_steps` of them (else the step gives no sample). For runs
    that ran other steps; refused when no HTTP step finds its class."""
    partners: dict[tuple[str, int], list[float]] = {}
    for step, host in zip(inprocess, host_times(inprocess, asynchronous), strict=True):
        if not step.graph_captured and math.isfinite(host):
            partners.setdefault(batch_class(step), []).append(host)
    medians = {cls: float(np.median(hosts)) for cls, hosts in partners.items() if len(hosts) >= min_partner_steps}
    samples = []
    for step, host in zip(http, host_times(http, asynchronous), strict=True):
        cls = batch_class(step)
        if not step.graph_captured and math.isfinite(host) and cls in medians:
            samples.append(StepSample(*cls, host - medians[cls]))
    if not samples:
        raise DoolyError(f"no step of the HTTP run (with a device time, no capture) has {min_partner_steps} in-process "
                         "steps of its batch class (kind and sequences) to be batch-matched with")
    return samples


def step_samples(http: Sequence[MeasuredStep], inprocess: Sequence[MeasuredStep],
                 asynchronous: bool = False) -> tuple[list[StepSample], str]:
    """The pair's samples and how they were paired: step for step (STEP_PAIRING) whenever the two
    ran the same steps, batch-matched (BATCH_PAIRING) where they ran other ones. Refused where
    neither gives a sample, or where the steps lack the device time (no fallback for that)."""
    try:
        return paired_step_samples(http, inprocess, asynchronous), STEP_PAIRING
    except OtherStepsError as exc:
        try:
            return batch_matched_samples(http, inprocess, asynchronous=asynchronous), BATCH_PAIRING
        except DoolyError as matched:
            raise DoolyError(f"{exc}, nor batch-matched: {matched}") from None


def _least_squares(samples: Sequence[StepSample], per_sequence: bool) -> KindTerm:
    """Mean extra time, or the least-squares line over the step's sequences (a constant when the
    steps all hold the same count, which pins down no slope)."""
    extra = np.array([s.extra_s for s in samples])
    sizes = np.array([s.num_seqs for s in samples], dtype=float)
    if not per_sequence or np.ptp(sizes) == 0:
        return KindTerm(float(extra.mean()))
    constant, slope = np.linalg.lstsq(np.c_[np.ones_like(sizes), sizes], extra, rcond=None)[0]
    return KindTerm(float(constant), float(slope))


def fit_form(form: str, samples: Sequence[StepSample]) -> dict[str, KindTerm]:
    """The form's terms on `samples`: `default` (pooled) always, and each kind with enough steps
    its own under the per-kind forms."""
    if form not in FORMS:
        raise DoolyError(f"unknown step-term form {form!r}")
    per_sequence = form == PER_KIND_PER_SEQUENCE
    terms = {DEFAULT_KEY: _least_squares(samples, per_sequence)}
    if form != CONSTANT:
        for kind in sorted({s.kind for s in samples}):
            own = [s for s in samples if s.kind == kind]
            if len(own) >= MIN_KIND_STEPS:
                terms[kind] = _least_squares(own, per_sequence)
    return terms


def step_classes(samples: Sequence[StepSample], size_classes: int = SIZE_CLASSES) -> list[tuple[str, int]]:
    """Each sample's class: its kind and the quantile of its sequence count within the kind."""
    edges: dict[str, np.ndarray] = {}
    for kind in {s.kind for s in samples}:
        sizes = np.array([s.num_seqs for s in samples if s.kind == kind], dtype=float)
        edges[kind] = np.unique(np.quantile(sizes, np.linspace(0, 1, size_classes + 1)[1:-1]))
    return [(s.kind, int(np.searchsorted(edges[s.kind], s.num_seqs, side="right"))) for s in samples]


def held_out_error(form: str, samples: Sequence[StepSample], classes: Sequence[tuple[str, int]]) -> float:
    """Mean absolute error (seconds) of the form over every step, each predicted by the form
    fitted on the steps of the other classes (none of the class's own)."""
    errors = []
    for held in sorted(set(classes)):
        train = [s for s, c in zip(samples, classes) if c != held]
        test = [s for s, c in zip(samples, classes) if c == held]
        if not train:
            continue
        fitted = StepTerm(form, fit_form(form, train))
        errors += [abs(fitted.seconds(s.kind, s.num_seqs) - s.extra_s) for s in test]
    return float(np.mean(errors)) if errors else math.inf


def choose_step_term(samples: Sequence[StepSample],
                     error_of: Callable[[str, Sequence[StepSample], Sequence[tuple[str, int]]], float] = held_out_error,
                     ) -> StepTerm:
    """The form with the smallest leave-one-step-class-out error, fitted on all samples."""
    if not samples:
        raise DoolyError("no paired step to measure the server's step term on")
    classes = step_classes(samples)
    selection = {form: error_of(form, samples, classes) for form in FORMS}
    lowest = min(selection.values())
    best = next(form for form in FORMS if selection[form] <= lowest + TIE_S)
    logger.info("server step term: held-out MAE %s; chose %s",
                ", ".join(f"{f} {e * MS_PER_S:.3f} ms" for f, e in selection.items()), best)
    return StepTerm(best, fit_form(best, samples), len(samples), len(set(classes)), selection)
