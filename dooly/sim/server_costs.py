"""The serving front end's per-request costs, measured from paired runs, and added by `dooly validate`.

The simulator models the engine: its scheduler, its steps, its host time per step. A user of the
engine's HTTP server (`dooly bench --client http`) also pays what the server adds on the request's
path: tokenizing the prompt, the hand-off from the engine thread to the event loop, detokenizing
each token, SSE framing and the socket. None of that is in a step, so no calibration on the
engine's steps can see it. It is measured instead, on paired runs of one cell: the same workload
(same requests, same arrivals, same prompts) served once in-process and once behind the server,
on the same device and settings. Per request, the HTTP run's TTFT minus the in-process run's is
the server's TTFT offset, and the difference of TPOT is its per-token offset; their medians over
all requests of all pairs are the terms, stored with their spread.

At load most of what the client sees is not per request: the engine thread shares the interpreter
with the server's event loop, and each engine step takes more host time (`dooly.sim.server_step_term`).
Where both runs record the engine's steps, a record (`dooly.server_costs/2`) carries that per-step
host term, measured from the pair's steps (step for step where the two engines ran the same steps,
else batch-matched; each cell says which, `pairing`), and per-request offsets measured after it:
the raw offsets less what the step term does to each request when simulated (the HTTP run's
workload simulated with and without it), so that the two together reproduce the pair's difference
and neither counts the other's share. The raw offsets are kept beside them (`raw_ttft`, `raw_tpot`).
A `/1` record (offsets only) still loads and applies as before.

The terms are a server cost only where the engine behind the server ran as it ran in-process.
Two checks say when the pairs do not show that, and the record carries what they found
(`problems`): a negative median offset (the client saw the engine faster than the engine itself
ran: another engine path, not a cost), and residual offsets that depend on the load (a per-request
cost does not change between a light and a heavy cell of the same settings) or, where the pairs are
of several models, on the model (one record then serves them all). Each HTTP run is paired with the
in-process runs of its own model and workload. With one workload paired the load check cannot run,
and the record says so (`not_run`). `dooly validate` applies a record's step term, and each
per-request offset only where that offset passed its load and model checks (`applied_offsets`): an
offset that moves with the load or the model beyond its own spread is not a per-request cost, and
at heavy load a residual is mostly what the queue made of the step term's error. Held out by model
(lab/server_cost_offsets.py; H200 lease_d and H100 lease5 pairs), the pooled offsets of records
that failed those checks passed 4 of 15 HTTP cells (mean TTFT error of the light cells 21.7%), the
records as applied here 5 (8.7%). A residual offset below zero is withheld too: a server adds
time, and a negative residual says the step term over-explains the pair. A record whose raw median offset is negative
it refuses (it would take time off every request, down to a negative TTFT, for what was another
engine run's slowness).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dooly.engines.groundtruth import BENCH_FILE, ENGINE_FILE
from dooly.errors import DoolyError
from dooly.jsonfile import read_json_object
from dooly.sim.calibration import (
    CalibrationKey,
    list_generation_keys,
    newest_version_key,
    read_newest_generation,
    write_generation,
)
from dooly.sim.schedulers import Scheduler
from dooly.sim.server_capture_term import CaptureSample, CaptureTerm, fit_capture_term, paired_capture_samples
from dooly.sim.server_step_term import (
    BATCH_PAIRING,
    NO_PAIRING,
    STEP_PAIRING,
    StepSample,
    StepTerm,
    choose_step_term,
    step_samples,
)
from dooly.sim.simulator import RequestRecord
from dooly.sim.step_model import CpuOverheadModel, StepLatencyModel
from dooly.sim.validate import GroundTruth, MeasuredRequest, check_repeat, load_ground_truth, validate

logger = logging.getLogger(__name__)

SCHEMA = "dooly.server_costs/2"
# Offsets only, no step term: still loaded, and applied as before.
SCHEMA_V1 = "dooly.server_costs/1"
HTTP_CLIENT = "http"
INPROCESS_CLIENT = "inprocess"
# The spread reported beside each term: the 10th and 90th percentile of the per-request offsets.
LOW_QUANTILE, HIGH_QUANTILE = 0.10, 0.90
# What must match between the runs of a pair (bench.json `stack`), and what a record is keyed by.
KEY_FIELDS = ("platform", "engine", "engine_version", "backend")
MS_PER_S = 1e3
# Below this two offsets are one (the clocks behind them resolve about a microsecond).
RESOLUTION_S = 1e-6
# Cells of this many workloads (loads) are what the load-dependence check compares.
MIN_LOAD_WORKLOADS = 2
# The engine setting of transformers' async batching loop, and the key field a record gets for it.
ASYNC_SETTING = "use_async_batching"
ASYNC_KEY = "async_batching"
# Where a store keeps the records: the calibrations' layout under this root (docs/server-costs.md).
STORE_ROOT = "server-costs/"


@dataclass(frozen=True)
class OffsetStats:
    """One term's per-request offsets (seconds): the median is the term, the rest its spread."""

    median_s: float
    mean_s: float
    sd_s: float
    p10_s: float
    p90_s: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> OffsetStats:
        clean = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
        if clean.size == 0:
            raise DoolyError("no request of the paired runs has a value on both sides")
        return cls(float(np.median(clean)), float(clean.mean()), float(clean.std()),
                   float(np.quantile(clean, LOW_QUANTILE)), float(np.quantile(clean, HIGH_QUANTILE)), int(clean.size))

    def contains(self, value: float) -> bool:
        """Whether `value` lies within this spread (p10..p90, to the clocks' resolution)."""
        return self.p10_s - RESOLUTION_S <= value <= self.p90_s + RESOLUTION_S


@dataclass
class CellOffsets:
    """One paired cell: the HTTP run, the in-process run(s) it was compared with, its offsets
    (residual after the step term where one was measured; raw: HTTP minus in-process), how
    many of its steps were paired for the step term and how (`pairing`: "step" for step,
    "batch"-matched, "" none), and the served model (bench.json `model`; empty in records written
    before it was kept)."""

    http: str
    inprocess: list[str]
    workload: dict[str, Any]
    ttft: OffsetStats
    tpot: OffsetStats
    raw_ttft: OffsetStats | None = None
    raw_tpot: OffsetStats | None = None
    steps: int = 0
    model: str = ""
    pairing: str = NO_PAIRING

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellOffsets:
        """A cell of a /1 or /2 record (a /1 cell's offsets are its raw ones; a cell written before
        batch-matched pairing was paired step for step if it paired any step)."""
        ttft, tpot = OffsetStats(**data["ttft"]), OffsetStats(**data["tpot"])
        raw_ttft = OffsetStats(**data["raw_ttft"]) if data.get("raw_ttft") else ttft
        raw_tpot = OffsetStats(**data["raw_tpot"]) if data.get("raw_tpot") else tpot
        steps = int(data.get("steps", 0))
        pairing = str(data.get("pairing", STEP_PAIRING if steps > 0 else NO_PAIRING))
        return cls(data["http"], list(data["inprocess"]), dict(data["workload"]), ttft, tpot, raw_ttft, raw_tpot,
                   steps, str(data.get("model", "")), pairing)


@dataclass
class ServerCosts:
    """What the engine's HTTP server adds, for one key: a per-step host term (None where the runs
    recorded no steps, and in a /1 record) and per-request TTFT and TPOT offsets (the residual after
    the step term; `raw_ttft`/`raw_tpot`: HTTP minus in-process as measured)."""

    key: dict[str, Any]
    ttft: OffsetStats
    tpot: OffsetStats
    cells: list[CellOffsets]
    problems: list[str] = field(default_factory=list)
    created_at: str = ""
    source: str = ""
    raw_ttft: OffsetStats | None = None
    raw_tpot: OffsetStats | None = None
    step_term: StepTerm | None = None
    # The server's extra cost per CUDA-graph capture (`dooly.sim.server_capture_term`); None where no
    # pair captured on the same steps, and in records written before it was measured.
    capture_term: CaptureTerm | None = None
    # Checks that could not run on these pairs, and why (e.g. one workload: no load dependence).
    not_run: list[str] = field(default_factory=list)
    schema: str = SCHEMA
    generation: int = 0  # set when read from (or written to) a store

    @property
    def consistent(self) -> bool:
        return not self.problems

    @property
    def withheld_offsets(self) -> dict[str, str]:
        """The per-request offsets `apply` leaves out (`TTFT`, `TPOT`), each with why. One that
        depends on the load or the model (it failed those checks) is not a cost per request: its
        pooled median would move every request by what one cell's queue made of it. One below
        zero is not a cost either (a server adds time; a negative residual says the step term
        already over-explains the pair): lease3's one heavy cell, whose checks cannot run, left
        -98.6 ms of TTFT that took about 0.1 s off every light request."""
        withheld = {name.upper(): f"it depends on the load or model: {len(problems)} failed check(s)"
                    for name, problems in dependent_offsets(self.cells).items() if problems}
        for name, stats in (("TTFT", self.ttft), ("TPOT", self.tpot)):
            if name not in withheld and stats.median_s < 0:
                withheld[name] = f"it is below zero: {stats.median_s * MS_PER_S:+.2f} ms"
        return withheld

    def applied_offsets(self) -> tuple[float, float]:
        """The TTFT and TPOT offsets (seconds) `apply` adds: each term's median, or zero where it
        is withheld (`withheld_offsets`)."""
        withheld = self.withheld_offsets
        return (0.0 if "TTFT" in withheld else self.ttft.median_s, 0.0 if "TPOT" in withheld else self.tpot.median_s)

    def describe(self) -> str:
        """One line: the terms, what they were measured on, and whether they passed their checks."""
        text = self._measured_offsets()
        if self.step_term is not None:
            text += f" after a host term per engine step: {self.step_term.describe()}"
        if self.capture_term is not None:
            text += f" and per graph capture: {self.capture_term.describe()}"
        return text + self._provenance()

    def applied_line(self) -> str:
        """What a command that adds this record added, first: the step term and the offsets it
        applied (none where every offset was withheld), then what was measured, from where, and
        what was withheld and why. A reader of `describe` alone would take a withheld offset for
        an added one."""
        ttft_s, tpot_s = self.applied_offsets()
        withheld = self.withheld_offsets
        offsets = [f"{value * MS_PER_S:+.{digits}f} ms {name}" for name, value, digits in
                   (("TTFT", ttft_s, 1), ("TPOT", tpot_s, 2)) if name not in withheld]
        added = f"{', '.join(offsets)} per request" if offsets else "no per-request offset"
        if self.capture_term is not None and self.capture_term.applied:
            added = f"a term per graph capture ({self.capture_term.describe()}) and {added}"
        if self.step_term is not None:
            added = f"a host term per engine step ({self.step_term.describe()}) and {added}"
        return f"added {added} (measured: {self._measured_offsets()})" + self._provenance()

    def _measured_offsets(self) -> str:
        return (f"{self.ttft.median_s * MS_PER_S:+.1f} ms TTFT, {self.tpot.median_s * MS_PER_S:+.2f} ms TPOT per request "
                f"(median of {self.ttft.n} paired requests in {len(self.cells)} cell(s); p10..p90 TTFT "
                f"{self.ttft.p10_s * MS_PER_S:+.1f}..{self.ttft.p90_s * MS_PER_S:+.1f} ms, TPOT "
                f"{self.tpot.p10_s * MS_PER_S:+.2f}..{self.tpot.p90_s * MS_PER_S:+.2f} ms)")

    def _provenance(self) -> str:
        """Where the record came from, its failed checks, and the offsets withheld and why."""
        text = f" from {self.source}" if self.source else ""
        if self.problems:
            text += f"; FAILED {len(self.problems)} check(s), first: {self.problems[0]}"
        withheld = self.withheld_offsets
        if withheld:
            text += "; not applied: " + ", ".join(f"the {name} offset ({why})" for name, why in withheld.items())
        return text

    def applied_payload(self) -> dict[str, Any]:
        """What a command that added this record says of it (JSON): which record (generation and
        key), the line, the offsets it applied and those it withheld, its step term."""
        ttft_s, tpot_s = self.applied_offsets()
        return {"record": f"generation {self.generation} of {describe_key(self.key)}",
                "line": self.applied_line(), "source": self.source, "generation": self.generation,
                "key": self.key, "applied_ttft_s": ttft_s, "applied_tpot_s": tpot_s,
                "step_term": self.step_term.as_dict() if self.step_term is not None else None,
                "capture_term": self.capture_term.as_dict() if self.capture_term is not None else None,
                "withheld_offsets": self.withheld_offsets}

    def negative_offsets(self) -> list[str]:
        """The raw median offsets (HTTP minus in-process, as measured) below zero, described: a server
        cannot make its engine faster, so such a record measured two engine runs apart, not a cost."""
        return [f"median {name} offset {stats.median_s * MS_PER_S:+.2f} ms"
                for name, stats in (("TTFT", self.raw_ttft or self.ttft), ("TPOT", self.raw_tpot or self.tpot))
                if stats.median_s < 0]

    def overhead(self, base: CpuOverheadModel, num_layers: int) -> CpuOverheadModel:
        """The host overhead model of the server's engine serving a model of `num_layers` decoder
        layers: `base` plus the step term and the capture term, where the record has them."""
        return served_overhead(base, self.step_term, self.capture_term, num_layers)

    def overhead_for(self, base: CpuOverheadModel, model: str, store: str | None) -> CpuOverheadModel:
        """`overhead` for MODEL, its layer count read (as `dooly.sim.calibration_commands.model_layers`
        reads it) only where the record has a capture term to scale."""
        from dooly.sim.calibration_commands import model_layers

        return self.overhead(base, model_layers(model, store=store) if self.capture_term is not None else 0)

    def apply(self, requests: Iterable[RequestRecord]) -> list[RequestRecord]:
        """The simulated requests as a client of the server would time them: TTFT plus the TTFT
        term, TPOT plus the per-token term, E2E plus both (the latter once per token after the
        first), each term as `applied_offsets` gives it. Arrivals and the engine's own schedule are
        unchanged: the terms are off the engine's path (the step term, on it, is simulated: `overhead`)."""
        ttft_s, tpot_s = self.applied_offsets()
        out = []
        for record in requests:
            later_tokens = max(record.output_tokens - 1, 0)
            extra_e2e = ttft_s + tpot_s * later_tokens
            out.append(replace(record, ttft_s=record.ttft_s + ttft_s,
                               tpot_s=record.tpot_s + tpot_s,
                               first_token_s=record.first_token_s + ttft_s,
                               finish_s=record.finish_s + extra_e2e, e2e_s=record.e2e_s + extra_e2e))
        return out

    def check_key(self, key: dict[str, Any], what: str) -> None:
        """Refuse terms measured for another platform, engine version, backend or graph mode."""
        differing = sorted(k for k in self.key if key.get(k) != self.key[k])
        if differing:
            raise DoolyError(f"server costs {self.source or ''} were measured for "
                             f"{', '.join(f'{k}={self.key[k]!r}' for k in differing)}, not for {what}'s "
                             f"{', '.join(f'{k}={key.get(k)!r}' for k in differing)}")

    def as_dict(self) -> dict[str, Any]:
        """The `dooly.server_costs/2` document (a record loaded from /1 is written as /2, its raw
        offsets equal to its offsets and no step term)."""
        raw_ttft, raw_tpot = self.raw_ttft or self.ttft, self.raw_tpot or self.tpot
        return {"schema": SCHEMA, "key": self.key, "terms": {"ttft_s": self.ttft.median_s, "tpot_s": self.tpot.median_s},
                "step_term": self.step_term.as_dict() if self.step_term is not None else None,
                "capture_term": self.capture_term.as_dict() if self.capture_term is not None else None,
                "ttft": asdict(self.ttft), "tpot": asdict(self.tpot), "raw_ttft": asdict(raw_ttft),
                "raw_tpot": asdict(raw_tpot), "consistent": self.consistent, "problems": list(self.problems),
                "not_run": list(self.not_run), "cells": [asdict(c) for c in self.cells], "created_at": self.created_at}

    def save(self, path: str | Path) -> None:
        try:
            Path(path).write_text(json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise DoolyError(f"cannot write server costs to {path}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> ServerCosts:
        """A /2 record, or a /1 one (offsets only: its raw offsets are its offsets, no step term)."""
        return cls.from_dict(read_json_object(Path(path), "server costs"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str, generation: int = 0) -> ServerCosts:
        """A record's document (`as_dict`), read from `source` (a file, or a store's object)."""
        schema = data.get("schema")
        if schema not in (SCHEMA, SCHEMA_V1):
            raise DoolyError(f"{source}: not a {SCHEMA} (or {SCHEMA_V1}) document (schema {schema!r})")
        try:
            ttft, tpot = OffsetStats(**data["ttft"]), OffsetStats(**data["tpot"])
            step_term = StepTerm.from_dict(data["step_term"]) if data.get("step_term") else None
            capture_term = CaptureTerm.from_dict(data["capture_term"]) if data.get("capture_term") else None
            return cls(dict(data["key"]), ttft, tpot, [CellOffsets.from_dict(c) for c in data["cells"]],
                       list(data.get("problems", [])), str(data.get("created_at", "")), source=source,
                       raw_ttft=OffsetStats(**data["raw_ttft"]) if data.get("raw_ttft") else ttft,
                       raw_tpot=OffsetStats(**data["raw_tpot"]) if data.get("raw_tpot") else tpot,
                       step_term=step_term, capture_term=capture_term, not_run=list(data.get("not_run", [])),
                       schema=str(schema),
                       generation=generation)
        except (KeyError, TypeError, AttributeError) as exc:
            raise DoolyError(f"{source}: malformed {schema} document ({exc})") from None

    def refuse_negative(self) -> None:
        """Refuse a record whose raw median offset is below zero (one line): its HTTP runs were
        faster than their in-process pairs, so it measured two engine runs apart, not a cost."""
        negative = self.negative_offsets()
        if negative:
            raise DoolyError(f"server costs {self.source or '(unsaved)'}: {', '.join(negative)} below zero: its HTTP "
                             "runs were faster than their in-process pairs, so it measured two engine runs apart, not "
                             "what the server costs; measure it on other pairs")


@dataclass
class EngineModels:
    """What simulates one HTTP run's engine: its scheduler, step model and host overhead (the
    in-process engine's, as `dooly validate` would resolve them for that run)."""

    scheduler: Scheduler
    step_model: StepLatencyModel
    overhead: CpuOverheadModel
    num_layers: int  # the served model's decoder layers (what the capture term scales with)


# Builds the engine models of one HTTP run (its directory), for simulating the step term's effect.
EngineModelsFor = Callable[[Path], EngineModels]


@dataclass
class _Run:
    directory: Path
    bench: dict[str, Any]
    engine: dict[str, Any]
    truth: GroundTruth

    @property
    def client(self) -> str:
        return str(self.bench.get("client") or INPROCESS_CLIENT)

    @property
    def workload(self) -> dict[str, Any]:
        return dict(self.bench.get("workload") or {})

    @property
    def model(self) -> str:
        return str(self.bench.get("model") or "")


def run_key(bench: dict[str, Any], engine_settings: dict[str, Any]) -> dict[str, Any]:
    """What a server-cost record is keyed by: the stack's platform, engine, engine version and
    backend, whether CUDA graphs were on (any path), and `async_batching: true` where the engine
    ran transformers' async batching loop (absent otherwise)."""
    stack = bench.get("stack") or {}
    key: dict[str, Any] = {name: stack.get(name, bench.get(name)) for name in KEY_FIELDS}
    graphs = engine_settings.get("use_cuda_graph", False)
    key["cuda_graphs"] = any(graphs) if isinstance(graphs, list) else bool(graphs)
    if engine_settings.get(ASYNC_SETTING):
        # Only where on, so that the keys of synchronous records stay as they were written.
        key[ASYNC_KEY] = True
    return key


def read_run(directory: str | Path) -> _Run:
    """A `dooly bench` directory with its bench.json (which client timed it) and engine.json."""
    directory = Path(directory)
    bench_path = directory / BENCH_FILE
    if not bench_path.is_file():
        raise DoolyError(f"{directory} has no {BENCH_FILE}: cannot tell which client timed it")
    engine_path = directory / ENGINE_FILE
    engine = read_json_object(engine_path, "engine settings") if engine_path.is_file() else {}
    return _Run(directory, read_json_object(bench_path, "bench record"), engine, load_ground_truth(directory))


def is_http_run(directory: str | Path) -> bool:
    """Whether `dooly bench --client http` recorded this ground truth (bench.json `client`)."""
    bench_path = Path(directory) / BENCH_FILE
    return bench_path.is_file() and read_json_object(bench_path, "bench record").get("client") == HTTP_CLIENT


def request_offsets(http: Sequence[MeasuredRequest], inprocess: Sequence[Sequence[MeasuredRequest]]
                    ) -> tuple[list[float], list[float]]:
    """Per request: the HTTP run's TTFT and TPOT minus the mean of the in-process runs' (seconds)."""
    by_run = [{r.request_id: r for r in run} for run in inprocess]
    ttft, tpot = [], []
    for request in http:
        others = [run[request.request_id] for run in by_run if request.request_id in run]
        if len(others) != len(by_run):
            raise DoolyError(f"request {request.request_id} of the HTTP run is missing from an in-process run")
        ttft.append(request.ttft_s - float(np.mean([o.ttft_s for o in others])))
        tpot.append(request.tpot_s - float(np.mean([o.tpot_s for o in others])))
    return ttft, tpot


def served_overhead(base: CpuOverheadModel, term: StepTerm | None, capture: CaptureTerm | None,
                    num_layers: int) -> CpuOverheadModel:
    """`base` plus the step term and the capture term (for `num_layers` layers), each where given."""
    served = base if term is None else term.overhead(base)
    return served if capture is None else capture.overhead(served, num_layers)


def step_term_effect(truth: GroundTruth, models: EngineModels, term: StepTerm | None,
                     capture: CaptureTerm | None = None) -> dict[str, tuple[float, float]]:
    """Per request: what the step and capture terms add to its simulated TTFT and TPOT (the run's
    workload simulated as `dooly validate` simulates it, with the terms and without)."""
    overhead = served_overhead(models.overhead, term, capture, models.num_layers)
    without = validate(truth, models.scheduler.fresh(), models.step_model, models.overhead).result.requests
    served = validate(truth, models.scheduler.fresh(), models.step_model, overhead).result.requests
    plain = {r.request_id: r for r in without}
    return {r.request_id: (r.ttft_s - plain[r.request_id].ttft_s, r.tpot_s - plain[r.request_id].tpot_s)
            for r in served if r.request_id in plain}


def residual_offsets(http: Sequence[MeasuredRequest], raw_ttft: Sequence[float], raw_tpot: Sequence[float],
                     effect: dict[str, tuple[float, float]]) -> tuple[list[float], list[float]]:
    """The raw per-request offsets less what the simulated step term already adds to each request
    (a request the simulation lost, or whose TPOT it cannot time, keeps no residual: NaN)."""
    ttft, tpot = [], []
    for request, t, p in zip(http, raw_ttft, raw_tpot, strict=True):
        added = effect.get(request.request_id, (math.nan, math.nan))
        ttft.append(t - added[0])
        tpot.append(p - added[1])
    return ttft, tpot


def _paired_steps(http: _Run, partners: Sequence[_Run]) -> tuple[list[StepSample], str, str | None]:
    """The HTTP run's steps paired with each in-process partner's (step for step, else
    batch-matched: `step_samples`), how (batch if any partner's were batch-matched), or why they
    cannot be (no steps recorded, no device time, no sample either way): then the cell gives the
    step term nothing."""
    if not http.truth.steps or not all(p.truth.steps for p in partners):
        return [], NO_PAIRING, f"{http.directory}: the runs record no engine steps (steps.parquet)"
    samples: list[StepSample] = []
    pairings: set[str] = set()
    try:
        for partner in partners:
            partner_samples, pairing = step_samples(http.truth.steps, partner.truth.steps,
                                                    asynchronous=bool(http.engine.get(ASYNC_SETTING)))
            samples += partner_samples
            pairings.add(pairing)
    except DoolyError as exc:
        return [], NO_PAIRING, f"{http.directory}: {exc}"
    return samples, BATCH_PAIRING if BATCH_PAIRING in pairings else STEP_PAIRING, None


def measure_server_costs(http_dirs: Sequence[str | Path], inprocess_dirs: Sequence[str | Path],
                         models_for: EngineModelsFor | None = None) -> ServerCosts:
    """Pair every HTTP run with the in-process runs of the same workload and settings; measure the
    step term from the pairs' steps, then the per-request offsets left once it is simulated (with
    `models_for`'s engine of each HTTP run; needed whenever a step term is measured), over all
    pairs (see the module docstring for the checks)."""
    if not http_dirs or not inprocess_dirs:
        raise DoolyError("server costs need at least one HTTP run and one in-process run of the same cell")
    https, inprocs = [read_run(d) for d in http_dirs], [read_run(d) for d in inprocess_dirs]
    for run in https:
        if run.client != HTTP_CLIENT:
            raise DoolyError(f"{run.directory} was not timed at an HTTP client (bench.json client {run.client!r})")
    for run in inprocs:
        if run.client != INPROCESS_CLIENT:
            raise DoolyError(f"{run.directory} was not timed in-process (bench.json client {run.client!r})")
    key = run_key(https[0].bench, https[0].engine)
    if models_for is not None:
        models_for = _cached(models_for)
    pairs: list[tuple[_Run, list[_Run]]] = []
    captures: list[CaptureSample] = []
    samples: list[StepSample] = []
    not_run: list[str] = []
    steps_per_cell: list[tuple[int, str]] = []
    for http in https:
        http_key = run_key(http.bench, http.engine)
        if http_key != key:
            raise DoolyError(f"{http.directory} is another key ({http_key}) than {https[0].directory} ({key})")
        partners = [run for run in inprocs if run.workload == http.workload and run.model == http.model]
        if not partners:
            raise DoolyError(f"no in-process run of {http.model or 'the same model'} served the workload of "
                             f"{http.directory}")
        for partner in partners:
            _check_pair(http, partner, key)
        pairs.append((http, partners))
        cell_samples, pairing, why_not = _paired_steps(http, partners)
        if why_not:
            not_run.append(f"step term on {why_not}")
        samples += cell_samples
        steps_per_cell.append((len(cell_samples), pairing))
        if models_for is not None and http.truth.steps:
            layers = models_for(http.directory).num_layers
            captures += [sample for partner in partners
                         for sample in paired_capture_samples(http.truth.steps, partner.truth.steps, layers)]
    unused = [str(r.directory) for r in inprocs if not any(r is p for _, partners in pairs for p in partners)]
    if unused:
        raise DoolyError(f"in-process run(s) {', '.join(unused)} served no workload of the HTTP runs")
    step_term = choose_step_term(samples) if samples else None
    capture_term = fit_capture_term(captures)
    if capture_term is not None:
        logger.info("server capture term: %s", capture_term.describe())
    if step_term is not None and models_for is None:
        raise DoolyError("the runs record their engine's steps, so the server's step term is measured, and the "
                         "per-request offsets left after it need it simulated: give a step model (--store, or --analytic)")
    costs = _pooled_costs(key, pairs, steps_per_cell, step_term, capture_term, models_for)
    costs.not_run = not_run + costs.not_run
    for problem in costs.problems:
        logger.warning("server costs: %s", problem)
    for check in costs.not_run:
        logger.info("server costs, not run: %s", check)
    return costs


def _cached(models_for: EngineModelsFor) -> EngineModelsFor:
    """`models_for`, built once per run directory (the capture term and the step term's effect
    both need a run's engine models)."""
    built: dict[Path, EngineModels] = {}

    def models(directory: Path) -> EngineModels:
        if directory not in built:
            built[directory] = models_for(directory)
        return built[directory]

    return models


def _pooled_costs(key: dict[str, Any], pairs: Sequence[tuple[_Run, list[_Run]]],
                  steps_per_cell: Sequence[tuple[int, str]], step_term: StepTerm | None,
                  capture_term: CaptureTerm | None, models_for: EngineModelsFor | None) -> ServerCosts:
    """Each cell's raw and residual offsets, and their pooled statistics, checked (`steps_per_cell`:
    each cell's paired steps and how they were paired)."""
    cells: list[CellOffsets] = []
    pooled: dict[str, list[float]] = {"ttft": [], "tpot": [], "raw_ttft": [], "raw_tpot": []}
    for (http, partners), (steps, pairing) in zip(pairs, steps_per_cell, strict=True):
        raw_ttft, raw_tpot = request_offsets(http.truth.requests, [p.truth.requests for p in partners])
        ttft, tpot = raw_ttft, raw_tpot
        if (step_term is not None or capture_term is not None) and models_for is not None:
            effect = step_term_effect(http.truth, models_for(http.directory), step_term, capture_term)
            ttft, tpot = residual_offsets(http.truth.requests, raw_ttft, raw_tpot, effect)
        cells.append(CellOffsets(str(http.directory), [str(p.directory) for p in partners], http.workload,
                                 OffsetStats.of(ttft), OffsetStats.of(tpot), OffsetStats.of(raw_ttft),
                                 OffsetStats.of(raw_tpot), steps, http.model, pairing))
        for name, values in (("ttft", ttft), ("tpot", tpot), ("raw_ttft", raw_ttft), ("raw_tpot", raw_tpot)):
            pooled[name] += values
    costs = ServerCosts(key, OffsetStats.of(pooled["ttft"]), OffsetStats.of(pooled["tpot"]), cells,
                        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                        raw_ttft=OffsetStats.of(pooled["raw_ttft"]), raw_tpot=OffsetStats.of(pooled["raw_tpot"]),
                        step_term=step_term, capture_term=capture_term)
    costs.problems, costs.not_run = consistency_problems(costs)
    return costs


def _check_pair(http: _Run, inprocess: _Run, key: dict[str, Any]) -> None:
    """Refuse a pair that is not one cell: other key, model, engine settings or requests."""
    if inprocess.model != http.model:
        raise DoolyError(f"{inprocess.directory} served {inprocess.model!r}, {http.directory} {http.model!r}")
    other = run_key(inprocess.bench, inprocess.engine)
    if other != key:
        raise DoolyError(f"{inprocess.directory} ({other}) is not the key of {http.directory} ({key})")
    requested = http.bench.get("requested_settings") or {}
    theirs = inprocess.bench.get("requested_settings") or {}
    if requested != theirs:
        raise DoolyError(f"{http.directory} and {inprocess.directory} were asked for other engine settings "
                         f"({requested} vs {theirs})")
    check_repeat(http.truth, inprocess.truth, f"in-process run {inprocess.directory}")


def consistency_problems(costs: ServerCosts) -> tuple[list[str], list[str]]:
    """Why these terms are not a server's costs, if they are not (empty: they pass), and the
    checks that could not run.

    A cost the server adds cannot be negative: a negative raw median offset says the engine behind
    the server ran otherwise than in-process. A per-request cost cannot depend on the load: a
    cell whose residual median lies outside another cell's p10..p90 says the offsets carry what
    the step term should (needs cells of two workloads; with one it is `not_run`). Cells of several
    models are compared too, since one record serves them all: the problem then names what differs
    between the two cells (the load, the model, or both)."""
    problems = [f"{offset} is negative: the client saw the engine faster than it ran in-process, which no server "
                "cost explains" for offset in costs.negative_offsets()]
    workloads = {json.dumps(cell.workload, sort_keys=True) for cell in costs.cells}
    not_run = []
    if len(workloads) < MIN_LOAD_WORKLOADS:
        not_run.append(f"load dependence of the per-request offsets: only {len(workloads)} workload paired "
                       f"(needs HTTP/in-process pairs of {MIN_LOAD_WORKLOADS} loads)")
    for dependent in dependent_offsets(costs.cells).values():
        problems += dependent
    return problems, not_run


def dependent_offsets(cells: Sequence[CellOffsets]) -> dict[str, list[str]]:
    """Per offset (`ttft`, `tpot`): each pair of cells, differing in load or model, where one cell's
    residual median lies outside the other's p10..p90, described (empty: it passed)."""
    found: dict[str, list[str]] = {}
    for name in ("ttft", "tpot"):
        found[name] = []
        for cell in cells:
            for other in cells:
                differs = _what_differs(cell, other)
                median, band = getattr(other, name).median_s, getattr(cell, name)
                if other is not cell and differs and not band.contains(median):
                    found[name].append(f"{name.upper()} offset depends on {differs}: {other.http} has median "
                                       f"{median * MS_PER_S:+.2f} ms, outside {cell.http}'s p10..p90 "
                                       f"{band.p10_s * MS_PER_S:+.2f}..{band.p90_s * MS_PER_S:+.2f} ms")
    return found


def _what_differs(cell: CellOffsets, other: CellOffsets) -> str:
    """What sets two cells of one record apart: their load (workload), their model, both, or
    nothing (empty: repeats of one cell, which the checks do not compare)."""
    differs = [what for what, differ in (("the load", cell.workload != other.workload),
                                         ("the model", cell.model != other.model)) if differ]
    return " and ".join(differs)


# ---------------------------------------------------------------------------------------------
# Store: server-costs/platform=<P>/engine=<E>/engine_version=<V>/backend=<B>/graphs=<on|off>/
# [async=on/]gen-<NNNNNN>.json, the calibrations' layout and generations (dooly.sim.calibration)
# ---------------------------------------------------------------------------------------------


def store_key(key: dict[str, Any]) -> CalibrationKey:
    """Where a record of this key (`run_key`) lives in a store."""
    return CalibrationKey(str(key.get("platform") or ""), str(key.get("engine") or ""),
                          str(key.get("engine_version") or ""), str(key.get("backend") or ""),
                          bool(key.get("cuda_graphs")), bool(key.get(ASYNC_KEY)))


def describe_key(key: dict[str, Any]) -> str:
    """A record key in words, as the store lays it out."""
    return store_key(key).label()


def write_server_costs(store: Any, costs: ServerCosts) -> str:
    """Write `costs` as the next generation of its key (atomic create-if-absent, as calibrations);
    a record whose raw median offset is negative is refused (`ServerCosts.refuse_negative`), as
    `dooly validate` refuses it. Returns the object key; sets `costs.generation`."""
    costs.refuse_negative()
    object_key, costs.generation = write_generation(store, store_key(costs.key), costs.as_dict(), STORE_ROOT,
                                                    "server-cost")
    return object_key


def read_server_costs(store: Any, key: CalibrationKey) -> ServerCosts | None:
    """The newest generation of the record of `key`, or None where the store holds none."""
    found = read_newest_generation(store, key, STORE_ROOT)
    if found is None:
        return None
    data, object_key, generation = found
    return ServerCosts.from_dict(data, f"store {store.uri} {object_key}", generation)


def find_server_costs(store: Any, *, platform: str, engine: str, backend: str, cuda_graphs: bool,
                      engine_version: str | None = None, async_batching: bool = False) -> ServerCosts | None:
    """The store's server-cost record for this platform, engine, backend, graph mode and loop: of
    `engine_version` when given, else of the newest engine version the store holds one for; the
    newest generation of it. None where it holds none."""
    key = newest_version_key(store, STORE_ROOT, platform=platform, engine=engine, backend=backend,
                             cuda_graphs=cuda_graphs, engine_version=engine_version, async_batching=async_batching)
    return None if key is None else read_server_costs(store, key)


def list_server_costs(store: Any) -> list[CalibrationKey]:
    """Every key the store holds a server-cost record of."""
    return list_generation_keys(store, STORE_ROOT)
