"""Workloads: which requests arrive when, with how many prompt and output tokens.

One `WorkloadSpec` (a small JSON document) drives both the simulator and the real-engine benchmark
(`dooly bench`), so a validation compares the two on exactly the same requests: the spec is seeded,
and the same spec always yields the same request list.

Two sources:
- synthetic: Poisson or gamma arrivals (rate in requests/s, coefficient of variation for gamma) or
  all requests at t=0 ("burst"); prompt and output lengths fixed, uniform, zipf, or sampled from a
  length trace;
- a trace file in Vidur's format (CSV or Parquet with columns `arrived_at`, `num_prefill_tokens`,
  `num_decode_tokens`), replayed as is (`load_trace`) or named in a spec (`trace`, with optional
  time scaling).

`num_decode_tokens` is the number of generated tokens, the first one included: it is what the
request's `max_new_tokens` is set to in the benchmark.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click
import numpy as np

from dooly.errors import DoolyError
from dooly.jsonfile import read_json

# What `dooly simulate` and `dooly bench` run when no workload option is given.
DEFAULT_REQUESTS = 100
DEFAULT_RATE = 1.0
DEFAULT_PROMPT_LEN = "512"
DEFAULT_OUTPUT_LEN = "128"

logger = logging.getLogger(__name__)

SPEC_SCHEMA = "dooly.workload/1"

ARRIVAL_KINDS = ("poisson", "gamma", "burst")
LENGTH_KINDS = ("fixed", "uniform", "zipf", "trace")

TRACE_ARRIVAL_COLUMN = "arrived_at"
TRACE_PROMPT_COLUMN = "num_prefill_tokens"
TRACE_OUTPUT_COLUMN = "num_decode_tokens"
TRACE_COLUMN_FOR = {"prompt": TRACE_PROMPT_COLUMN, "output": TRACE_OUTPUT_COLUMN}

DEFAULT_ZIPF_THETA = 1.0
# Seed streams: arrivals and the two length draws use independent child seeds, so changing the
# prompt distribution does not move the arrival times of the same seed.
_STREAM_ARRIVALS, _STREAM_PROMPT, _STREAM_OUTPUT = 0, 1, 2
_NUM_STREAMS = 3


@dataclass(slots=True)
class Request:
    """One request as the simulator and the benchmark see it."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class LengthSpec:
    """How many tokens: `fixed` (value), `uniform` (low..high inclusive), `zipf` (low..high, theta:
    P(v) ~ (v - low + 1)^-theta, so short lengths dominate), `trace` (sampled with replacement
    from a column of a trace file; `column` defaults to the Vidur column for prompt/output)."""

    kind: str = "fixed"
    value: int = 0
    low: int = 0
    high: int = 0
    theta: float = DEFAULT_ZIPF_THETA
    path: str = ""
    column: str = ""

    def to_dict(self) -> dict[str, Any]:
        keep = {
            "fixed": ("value",),
            "uniform": ("low", "high"),
            "zipf": ("low", "high", "theta"),
            "trace": ("path", "column"),
        }[self.kind]
        return {"kind": self.kind, **{name: getattr(self, name) for name in keep}}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | int, where: str) -> LengthSpec:
        if isinstance(data, int) and not isinstance(data, bool):
            data = {"kind": "fixed", "value": data}
        if not isinstance(data, dict):
            raise DoolyError(f"workload {where}: expected an object or an integer, got {data!r}")
        spec = cls(**_known_fields(cls, data, where))
        spec.validate(where)
        return spec

    @classmethod
    def parse(cls, text: str, where: str) -> LengthSpec:
        """Parse the command-line form: `512`, `uniform:128:1024`, `zipf:128:4096[:theta]`,
        `trace:FILE[:column]`."""
        parts = text.split(":")
        try:
            if len(parts) == 1:
                spec = cls(kind="fixed", value=int(parts[0]))
            elif parts[0] == "uniform" and len(parts) == 3:
                spec = cls(kind="uniform", low=int(parts[1]), high=int(parts[2]))
            elif parts[0] == "zipf" and len(parts) in (3, 4):
                theta = float(parts[3]) if len(parts) == 4 else DEFAULT_ZIPF_THETA
                spec = cls(kind="zipf", low=int(parts[1]), high=int(parts[2]), theta=theta)
            elif parts[0] == "trace" and len(parts) in (2, 3):
                spec = cls(kind="trace", path=parts[1], column=parts[2] if len(parts) == 3 else "")
            else:
                raise ValueError(text)
        except ValueError:
            raise DoolyError(
                f"{where} {text!r}: expected N, uniform:LOW:HIGH, zipf:LOW:HIGH[:THETA] or "
                "trace:FILE[:COLUMN]"
            ) from None
        spec.validate(where)
        return spec

    def validate(self, where: str) -> None:
        if self.kind not in LENGTH_KINDS:
            raise DoolyError(f"workload {where}: kind {self.kind!r} is not one of {LENGTH_KINDS}")
        if self.kind == "fixed" and self.value < 1:
            raise DoolyError(f"workload {where}: a fixed length must be >= 1, got {self.value}")
        if self.kind in ("uniform", "zipf") and not 1 <= self.low <= self.high:
            raise DoolyError(
                f"workload {where}: needs 1 <= low <= high, got low={self.low} high={self.high}"
            )
        if self.kind == "zipf" and self.theta <= 0:
            raise DoolyError(f"workload {where}: zipf theta must be > 0, got {self.theta}")
        if self.kind == "trace" and not self.path:
            raise DoolyError(f"workload {where}: a trace length needs a path")


@dataclass
class WorkloadSpec:
    """A serialisable, seeded workload definition (see the module docstring)."""

    num_requests: int = 100
    arrival: str = "poisson"
    rate: float = 1.0
    cv: float = 1.0
    prompt: LengthSpec = field(default_factory=lambda: LengthSpec(kind="fixed", value=512))
    output: LengthSpec = field(default_factory=lambda: LengthSpec(kind="fixed", value=128))
    seed: int = 0
    trace: str = ""
    time_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": SPEC_SCHEMA, "seed": self.seed}
        if self.trace:
            data.update(trace=self.trace, time_scale=self.time_scale)
            if self.num_requests:
                data["num_requests"] = self.num_requests
            return data
        data.update(
            num_requests=self.num_requests,
            arrival=self.arrival,
            rate=self.rate,
            prompt=self.prompt.to_dict(),
            output=self.output.to_dict(),
        )
        if self.arrival == "gamma":
            data["cv"] = self.cv
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkloadSpec:
        if not isinstance(data, dict):
            raise DoolyError(f"a workload spec is a JSON object, got {type(data).__name__}")
        data = dict(data)
        schema = data.pop("schema", SPEC_SCHEMA)
        if schema != SPEC_SCHEMA:
            raise DoolyError(f"workload schema {schema!r} is not supported (expected {SPEC_SCHEMA})")
        values = _known_fields(cls, data, "spec")
        if "prompt" in values:
            values["prompt"] = LengthSpec.from_dict(values["prompt"], "prompt")
        if "output" in values:
            values["output"] = LengthSpec.from_dict(values["output"], "output")
        if values.get("trace") and "num_requests" not in values:
            values["num_requests"] = 0
        spec = cls(**values)
        spec.validate()
        return spec

    @classmethod
    def load(cls, path: str | Path) -> WorkloadSpec:
        path = Path(path)
        spec = cls.from_dict(read_json(path, "workload"))
        spec._resolve_paths(path.parent)
        return spec

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def validate(self) -> None:
        if self.trace:
            if self.time_scale <= 0:
                raise DoolyError(f"workload time_scale must be > 0, got {self.time_scale}")
            if self.num_requests < 0:
                raise DoolyError(f"workload num_requests must be >= 0, got {self.num_requests}")
            return
        if self.num_requests < 1:
            raise DoolyError(f"workload num_requests must be >= 1, got {self.num_requests}")
        if self.arrival not in ARRIVAL_KINDS:
            raise DoolyError(f"workload arrival {self.arrival!r} is not one of {ARRIVAL_KINDS}")
        if self.arrival != "burst" and not self.rate > 0:
            raise DoolyError(f"workload rate must be > 0 requests/s, got {self.rate}")
        if self.arrival == "gamma" and not self.cv > 0:
            raise DoolyError(f"workload cv must be > 0 for gamma arrivals, got {self.cv}")
        self.prompt.validate("prompt")
        self.output.validate("output")

    def _resolve_paths(self, base: Path) -> None:
        """Relative trace paths in a spec file are relative to the spec file, not to the cwd."""
        if self.trace and not Path(self.trace).is_absolute():
            self.trace = str(base / self.trace)
        for length in (self.prompt, self.output):
            if length.kind == "trace" and not Path(length.path).is_absolute():
                length.path = str(base / length.path)


def generate_requests(spec: WorkloadSpec) -> list[Request]:
    """The spec's requests, sorted by arrival; the same spec always gives the same list."""
    spec.validate()
    if spec.trace:
        requests = load_trace(spec.trace, time_scale=spec.time_scale)
        if spec.num_requests:
            requests = requests[: spec.num_requests]
        return requests
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(_NUM_STREAMS)]
    n = spec.num_requests
    arrivals = _arrivals(spec, streams[_STREAM_ARRIVALS], n)
    tables: dict[str, dict[str, np.ndarray]] = {}
    joint = (
        spec.prompt.kind == "trace"
        and spec.output.kind == "trace"
        and spec.prompt.path == spec.output.path
    )
    if joint:
        # Same trace for both: sample whole rows so prompt and output lengths stay correlated.
        columns = _read_table(spec.prompt.path)
        p_col = spec.prompt.column or TRACE_PROMPT_COLUMN
        o_col = spec.output.column or TRACE_OUTPUT_COLUMN
        _require_columns(columns, (p_col, o_col), spec.prompt.path)
        rows = streams[_STREAM_PROMPT].integers(0, len(columns[p_col]), size=n)
        prompts = np.maximum(columns[p_col][rows].astype(np.int64), 1)
        outputs = np.maximum(columns[o_col][rows].astype(np.int64), 1)
    else:
        prompts = _lengths(spec.prompt, "prompt", streams[_STREAM_PROMPT], n, tables)
        outputs = _lengths(spec.output, "output", streams[_STREAM_OUTPUT], n, tables)
    return [
        Request(f"r{i}", float(arrivals[i]), int(prompts[i]), int(outputs[i])) for i in range(n)
    ]


def load_trace(path: str | Path, time_scale: float = 1.0) -> list[Request]:
    """Replay a Vidur-format trace (CSV or Parquet): arrival times relative to the first request,
    multiplied by `time_scale` (0.5 doubles the request rate); lengths clipped to >= 1 as Vidur does."""
    columns = _read_table(path)
    needed = (TRACE_ARRIVAL_COLUMN, TRACE_PROMPT_COLUMN, TRACE_OUTPUT_COLUMN)
    _require_columns(columns, needed, path)
    arrivals = columns[TRACE_ARRIVAL_COLUMN].astype(np.float64)
    if len(arrivals) == 0:
        raise DoolyError(f"trace {path} has no rows")
    if not np.all(np.isfinite(arrivals)):
        raise DoolyError(f"trace {path}: column {TRACE_ARRIVAL_COLUMN} has empty or non-finite values")
    order = np.argsort(arrivals, kind="stable")
    arrivals = (arrivals[order] - arrivals[order[0]]) * time_scale
    prompts = np.maximum(columns[TRACE_PROMPT_COLUMN][order].astype(np.int64), 1)
    outputs = np.maximum(columns[TRACE_OUTPUT_COLUMN][order].astype(np.int64), 1)
    return [
        Request(f"r{int(i)}", float(a), int(p), int(o))
        for i, a, p, o in zip(order, arrivals, prompts, outputs)
    ]


def requests_summary(requests: list[Request]) -> dict[str, float]:
    """A few numbers that describe a request list (for logs and `--output json`)."""
    if not requests:
        return {"num_requests": 0}
    arrivals = np.array([r.arrival_s for r in requests])
    span = float(arrivals.max() - arrivals.min())
    return {
        "num_requests": len(requests),
        "span_s": span,
        "offered_rate_rps": (len(requests) - 1) / span if span > 0 else math.inf,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in requests])),
        "mean_output_tokens": float(np.mean([r.output_tokens for r in requests])),
    }


def _arrivals(spec: WorkloadSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    if spec.arrival == "burst":
        return np.zeros(n)
    if spec.arrival == "poisson":
        gaps = rng.exponential(1.0 / spec.rate, size=n)
    else:
        # Gamma with mean 1/rate and coefficient of variation cv: shape k = 1/cv^2, scale = cv^2/rate.
        shape = 1.0 / spec.cv**2
        gaps = rng.gamma(shape, 1.0 / (spec.rate * shape), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def _lengths(
    spec: LengthSpec,
    role: str,
    rng: np.random.Generator,
    n: int,
    tables: dict[str, dict[str, np.ndarray]],
) -> np.ndarray:
    if spec.kind == "fixed":
        return np.full(n, spec.value, dtype=np.int64)
    if spec.kind == "uniform":
        return rng.integers(spec.low, spec.high + 1, size=n)
    if spec.kind == "zipf":
        ranks = np.arange(1, spec.high - spec.low + 2, dtype=np.float64)
        weights = ranks**-spec.theta
        return spec.low + rng.choice(len(ranks), size=n, p=weights / weights.sum())
    if spec.path not in tables:
        tables[spec.path] = _read_table(spec.path)
    column = spec.column or TRACE_COLUMN_FOR[role]
    _require_columns(tables[spec.path], (column,), spec.path)
    values = tables[spec.path][column]
    if len(values) == 0:
        raise DoolyError(f"length trace {spec.path} has no rows")
    return np.maximum(values[rng.integers(0, len(values), size=n)].astype(np.int64), 1)


def _read_table(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a CSV or Parquet file as numpy arrays (pyarrow for Parquet, csv module for CSV,
    so this runs where polars is absent)."""
    path = Path(path)
    if not path.exists():
        raise DoolyError(f"trace file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise DoolyError(f"trace file {path} is not readable Parquet: {exc}") from None
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DoolyError(f"trace file {path} is not readable CSV: {exc}") from None
    if not rows:
        raise DoolyError(f"trace file {path} has no rows")
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        try:
            columns[name] = np.array([float(row[name]) for row in rows])
        except (TypeError, ValueError):
            continue
    return columns


def _require_columns(columns: dict[str, np.ndarray], needed: tuple[str, ...], path: str | Path) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DoolyError(
            f"trace file {path} lacks numeric column(s) {', '.join(missing)} "
            f"(has: {', '.join(sorted(columns)) or 'none'})"
        )


def _known_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DoolyError(f"workload {where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dict(data)


# ---------------------------------------------------------------------------------------------
# Command-line options shared by `dooly simulate` and `dooly bench`: the same flags describe the
# same requests to both, which is what makes a validation compare like with like.
# ---------------------------------------------------------------------------------------------

_WORKLOAD_OPTIONS = (
    click.option("--workload", type=click.Path(dir_okay=False), help="Workload spec JSON (dooly.workload/1), shared by `dooly simulate` and `dooly bench`."),
    click.option("--trace", type=click.Path(dir_okay=False), help="Vidur trace (CSV/Parquet: arrived_at, num_prefill_tokens, num_decode_tokens)."),
    click.option("--requests", type=int, help=f"Number of requests [default: {DEFAULT_REQUESTS}]."),
    click.option("--rate", type=float, help=f"Arrival rate, requests/s [default: {DEFAULT_RATE}]."),
    click.option("--arrival", type=click.Choice(["poisson", "gamma", "burst"]), help="Arrival process [default: poisson]."),
    click.option("--cv", type=float, help="Coefficient of variation of gamma inter-arrival times."),
    click.option("--prompt-len", metavar="SPEC", help=f"N, uniform:LO:HI, zipf:LO:HI[:THETA] or trace:FILE[:COL] [default: {DEFAULT_PROMPT_LEN}]."),
    click.option("--output-len", metavar="SPEC", help=f"Same forms as --prompt-len [default: {DEFAULT_OUTPUT_LEN}]."),
    click.option("--seed", type=int, help="Workload seed [default: 0]."),
    click.option("--time-scale", type=float, help="Multiply trace arrival times (0.5 doubles the rate)."),
)
_WORKLOAD_PARAMS = ("workload", "trace", "requests", "rate", "arrival", "cv", "prompt_len", "output_len", "seed", "time_scale")


def workload_options(func: Any) -> Any:
    """Add the workload flags to a click command; they reach it as one `workload_args` dict, to be
    passed to `spec_from_options`."""
    return workload_options_except()(func)


def workload_options_except(*excluded: str) -> Any:
    """`workload_options` without some flags (by parameter name): `dooly explore` searches the
    rate, so it takes every workload flag but `--rate`."""
    import functools

    unknown = sorted(set(excluded) - set(_WORKLOAD_PARAMS))
    if unknown:
        raise ValueError(f"unknown workload option(s) {unknown}")
    params = [name for name in _WORKLOAD_PARAMS if name not in excluded]
    options = [opt for name, opt in zip(_WORKLOAD_PARAMS, _WORKLOAD_OPTIONS, strict=True) if name not in excluded]

    def decorate(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs["workload_args"] = {name: kwargs.pop(name) for name in params}
            return func(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def spec_from_options(
    workload: str | None = None,
    trace: str | None = None,
    requests: int | None = None,
    rate: float | None = None,
    arrival: str | None = None,
    cv: float | None = None,
    prompt_len: str | None = None,
    output_len: str | None = None,
    seed: int | None = None,
    time_scale: float | None = None,
) -> WorkloadSpec:
    """The workload the flags describe: a spec file or a trace, with single fields overridden."""
    if workload and trace:
        raise DoolyError("give --workload or --trace, not both")
    if workload:
        spec = WorkloadSpec.load(workload)
    elif trace:
        spec = WorkloadSpec(num_requests=0, trace=trace)
    else:
        spec = WorkloadSpec(
            num_requests=DEFAULT_REQUESTS,
            rate=DEFAULT_RATE,
            prompt=LengthSpec.parse(DEFAULT_PROMPT_LEN, "--prompt-len"),
            output=LengthSpec.parse(DEFAULT_OUTPUT_LEN, "--output-len"),
        )
    overrides = {"num_requests": requests, "rate": rate, "arrival": arrival, "cv": cv, "seed": seed, "time_scale": time_scale}
    for name, value in overrides.items():
        if value is not None:
            setattr(spec, name, value)
    if prompt_len is not None:
        spec.prompt = LengthSpec.parse(prompt_len, "--prompt-len")
    if output_len is not None:
        spec.output = LengthSpec.parse(output_len, "--output-len")
    spec.validate()
    return spec
