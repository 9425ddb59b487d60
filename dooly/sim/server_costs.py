"""The serving front end's per-request costs, measured from paired runs, and added by `dooly validate`.

The simulator models the engine: its scheduler, its steps, its host time per step. A user of the
engine's HTTP server (`dooly bench --client http`) also pays what the server adds on the request's
path: tokenizing the prompt, the hand-off from the engine thread to the event loop, detokenizing
each token, SSE framing and the socket. None of that is in a step, so no calibration on the
engine's steps can see it. It is measured instead, on paired runs of one cell: the same workload
(same requests, same arrivals, same prompts) served once in-process and once behind the server,
on the same device and settings. Per request, the HTTP run's TTFT minus the in-process run's is
the server's TTFT offset, and the difference of TPOT is its per-token offset; their medians over
all requests of all pairs are the terms (`dooly.server_costs/1`), stored with their spread.

The terms are a server cost only where the engine behind the server ran as it ran in-process.
Two checks say when the pairs do not show that, and the record carries what they found
(`problems`): a negative median offset (the client saw the engine faster than the engine itself
ran: another engine path, not a cost), and offsets that depend on the load (a per-request cost
does not change between a light and a heavy cell of the same settings). `dooly validate` still
adds such a record when asked, and says in its output that the record failed its checks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dooly.engines.groundtruth import BENCH_FILE, ENGINE_FILE
from dooly.errors import DoolyError
from dooly.jsonfile import read_json_object
from dooly.sim.simulator import RequestRecord
from dooly.sim.validate import GroundTruth, MeasuredRequest, check_repeat, load_ground_truth

logger = logging.getLogger(__name__)

SCHEMA = "dooly.server_costs/1"
HTTP_CLIENT = "http"
INPROCESS_CLIENT = "inprocess"
# The spread reported beside each term: the 10th and 90th percentile of the per-request offsets.
LOW_QUANTILE, HIGH_QUANTILE = 0.10, 0.90
# What must match between the runs of a pair (bench.json `stack`), and what a record is keyed by.
KEY_FIELDS = ("platform", "engine", "engine_version", "backend")
MS_PER_S = 1e3
# Below this two offsets are one (the clocks behind them resolve about a microsecond).
RESOLUTION_S = 1e-6


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
    """One paired cell: the HTTP run, the in-process run(s) it was compared with, its offsets."""

    http: str
    inprocess: list[str]
    workload: dict[str, Any]
    ttft: OffsetStats
    tpot: OffsetStats


@dataclass
class ServerCosts:
    """The server's per-request TTFT offset and per-token TPOT offset for one key, as measured."""

    key: dict[str, Any]
    ttft: OffsetStats
    tpot: OffsetStats
    cells: list[CellOffsets]
    problems: list[str] = field(default_factory=list)
    created_at: str = ""
    source: str = ""

    @property
    def consistent(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """One line: the terms, what they were measured on, and whether they passed their checks."""
        text = (f"{self.ttft.median_s * MS_PER_S:+.1f} ms TTFT, {self.tpot.median_s * MS_PER_S:+.2f} ms TPOT per request "
                f"(median of {self.ttft.n} paired requests in {len(self.cells)} cell(s); p10..p90 TTFT "
                f"{self.ttft.p10_s * MS_PER_S:+.1f}..{self.ttft.p90_s * MS_PER_S:+.1f} ms, TPOT "
                f"{self.tpot.p10_s * MS_PER_S:+.2f}..{self.tpot.p90_s * MS_PER_S:+.2f} ms)")
        if self.source:
            text += f" from {self.source}"
        if self.problems:
            text += f"; FAILED {len(self.problems)} check(s), first: {self.problems[0]}"
        return text

    def apply(self, requests: Iterable[RequestRecord]) -> list[RequestRecord]:
        """The simulated requests as a client of the server would time them: TTFT plus the TTFT
        term, TPOT plus the per-token term, E2E plus both (the latter once per token after the
        first). Arrivals and the engine's own schedule are unchanged: the terms are off the
        engine's path."""
        from dataclasses import replace

        out = []
        for record in requests:
            later_tokens = max(record.output_tokens - 1, 0)
            extra_e2e = self.ttft.median_s + self.tpot.median_s * later_tokens
            out.append(replace(record, ttft_s=record.ttft_s + self.ttft.median_s,
                               tpot_s=record.tpot_s + self.tpot.median_s,
                               first_token_s=record.first_token_s + self.ttft.median_s,
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
        return {"schema": SCHEMA, "key": self.key, "terms": {"ttft_s": self.ttft.median_s, "tpot_s": self.tpot.median_s},
                "ttft": asdict(self.ttft), "tpot": asdict(self.tpot), "consistent": self.consistent,
                "problems": list(self.problems), "cells": [asdict(c) for c in self.cells], "created_at": self.created_at}

    def save(self, path: str | Path) -> None:
        try:
            Path(path).write_text(json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise DoolyError(f"cannot write server costs to {path}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> ServerCosts:
        data = read_json_object(Path(path), "server costs")
        if data.get("schema") != SCHEMA:
            raise DoolyError(f"{path}: not a {SCHEMA} document (schema {data.get('schema')!r})")
        try:
            cells = [CellOffsets(c["http"], list(c["inprocess"]), dict(c["workload"]), OffsetStats(**c["ttft"]),
                                 OffsetStats(**c["tpot"])) for c in data["cells"]]
            return cls(dict(data["key"]), OffsetStats(**data["ttft"]), OffsetStats(**data["tpot"]), cells,
                       list(data.get("problems", [])), str(data.get("created_at", "")), source=str(path))
        except (KeyError, TypeError) as exc:
            raise DoolyError(f"{path}: malformed {SCHEMA} document ({exc})") from None


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


def run_key(bench: dict[str, Any], engine_settings: dict[str, Any]) -> dict[str, Any]:
    """What a server-cost record is keyed by: the stack's platform, engine, engine version and
    backend, and whether CUDA graphs were on (any path)."""
    stack = bench.get("stack") or {}
    key: dict[str, Any] = {name: stack.get(name, bench.get(name)) for name in KEY_FIELDS}
    graphs = engine_settings.get("use_cuda_graph", False)
    key["cuda_graphs"] = any(graphs) if isinstance(graphs, list) else bool(graphs)
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


def measure_server_costs(http_dirs: Sequence[str | Path], inprocess_dirs: Sequence[str | Path]) -> ServerCosts:
    """Pair every HTTP run with the in-process runs of the same workload and settings, and measure
    the terms over all pairs (see the module docstring for the checks)."""
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
    cells: list[CellOffsets] = []
    all_ttft: list[float] = []
    all_tpot: list[float] = []
    for http in https:
        http_key = run_key(http.bench, http.engine)
        if http_key != key:
            raise DoolyError(f"{http.directory} is another key ({http_key}) than {https[0].directory} ({key})")
        partners = [run for run in inprocs if run.workload == http.workload]
        if not partners:
            raise DoolyError(f"no in-process run served the workload of {http.directory}")
        for partner in partners:
            _check_pair(http, partner, key)
        ttft, tpot = request_offsets(http.truth.requests, [p.truth.requests for p in partners])
        cells.append(CellOffsets(str(http.directory), [str(p.directory) for p in partners], http.workload,
                                 OffsetStats.of(ttft), OffsetStats.of(tpot)))
        all_ttft += ttft
        all_tpot += tpot
    unused = [str(r.directory) for r in inprocs if not any(str(r.directory) in c.inprocess for c in cells)]
    if unused:
        raise DoolyError(f"in-process run(s) {', '.join(unused)} served no workload of the HTTP runs")
    costs = ServerCosts(key, OffsetStats.of(all_ttft), OffsetStats.of(all_tpot), cells,
                        created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    costs.problems = consistency_problems(costs)
    for problem in costs.problems:
        logger.warning("server costs: %s", problem)
    return costs


def _check_pair(http: _Run, inprocess: _Run, key: dict[str, Any]) -> None:
    """Refuse a pair that is not one cell: other key, other engine settings, other requests."""
    other = run_key(inprocess.bench, inprocess.engine)
    if other != key:
        raise DoolyError(f"{inprocess.directory} ({other}) is not the key of {http.directory} ({key})")
    requested = http.bench.get("requested_settings") or {}
    theirs = inprocess.bench.get("requested_settings") or {}
    if requested != theirs:
        raise DoolyError(f"{http.directory} and {inprocess.directory} were asked for other engine settings "
                         f"({requested} vs {theirs})")
    check_repeat(http.truth, inprocess.truth, f"in-process run {inprocess.directory}")


def consistency_problems(costs: ServerCosts) -> list[str]:
    """Why these offsets are not a server's per-request costs, if they are not (empty: they pass).

    A cost the server adds cannot be negative, and a per-request cost cannot depend on the load:
    a negative median, or a cell whose median lies outside another cell's p10..p90, says the
    engine behind the server ran otherwise than in-process."""
    problems = []
    for name, stats in (("TTFT", costs.ttft), ("TPOT", costs.tpot)):
        if stats.median_s < 0:
            problems.append(f"median {name} offset {stats.median_s * MS_PER_S:+.2f} ms is negative: the client saw "
                            "the engine faster than it ran in-process, which no server cost explains")
    for name in ("ttft", "tpot"):
        for cell in costs.cells:
            for other in costs.cells:
                median, band = getattr(other, name).median_s, getattr(cell, name)
                if other is not cell and not band.contains(median):
                    problems.append(f"{name.upper()} offset depends on the load: {other.http} has median "
                                    f"{median * MS_PER_S:+.2f} ms, outside {cell.http}'s p10..p90 "
                                    f"{band.p10_s * MS_PER_S:+.2f}..{band.p90_s * MS_PER_S:+.2f} ms")
    return problems
