"""Timing one operation at one request point, honestly.

On CUDA: warm-up calls first (kernel selection, allocator, lazy module loading), then `reps` calls
are captured in one CUDA graph and `samples` replays are timed with a CUDA-event pair each; the
per-call figure is a replay's time over `reps`, and `reps` makes one replay last at least
MIN_SAMPLE_S. Graph replay measures what the GPU spends on the op, without the host's launch
jitter (back-to-back eager launches of a 5 us kernel measure the Python dispatcher, +-15%). The
host side of an engine step (Python, launches, scheduling) is a property of the engine, not of an
op: the simulator's step model adds it from its own measurements, per step path (CUDA-graph decode
or eager). An op that cannot be captured (it synchronises with the host) falls back to event pairs
around `reps` back-to-back eager calls. Caches are not flushed: in a real forward each op reads
activations its predecessor just wrote (hot in L2) and weights too large to stay there, which is
what repeated calls see too.

On the CPU: the same scheme with `time.perf_counter`.

Rows report the median, p10 and p90 of the per-call sample values and n = samples, plus the wall
time the whole measurement held the device (device_seconds), warm-up and input building included.
The timer also adds that wall time up per phase (building the call, warm-up, sizing the capture,
the capture, the timed samples): where a campaign's device time goes, in `dooly profile`'s report.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dooly.trace.schema import ORIGIN_REQUEST, Operation, TensorSpec

log = logging.getLogger(__name__)

WARMUP_CALLS = 3
MIN_SAMPLE_S = 2e-4
MAX_REPS = 200
DEFAULT_SAMPLES_CUDA = 15
# Outputs of the captured calls stay allocated in the graph's pool: bound what reps may hold.
GRAPH_MEMORY_BUDGET_BYTES = 4 * 2**30
PILOT_GRAPH_REPS = 10
MAX_GRAPH_REPS = 1000
MIN_GRAPH_SAMPLE_S = 1e-3
DEFAULT_SAMPLES_CPU = 5
# Long calls are what a campaign's device time goes to (attention reading 100K KV tokens runs
# 5-30 ms a call), and they need fewer samples than short ones once settled: on the H100 the first
# 4-5 replays of a freshly captured 6-20 ms call ran up to 13% slow, whatever the call's length,
# then every sample agreed within 0.2% (data/h100/experiments/timer_budget/). So with the default
# sample count, a call of LONG_SAMPLE_S or more is warmed up once, its graph replayed
# GRAPH_WARM_REPLAYS times, then sampled until its last SETTLED_SAMPLES samples agree within
# SETTLED_SPREAD; those samples are the measurement (the ones before were warm-up), and one that
# never settles keeps all its samples. An explicit sample count (`--samples`) is honoured exactly.
LONG_SAMPLE_S = 2e-3
GRAPH_WARM_REPLAYS = 5
SETTLED_SAMPLES = 5
SETTLED_SPREAD = 0.01
# CUDA events report milliseconds.
MS_PER_S = 1e3
SEED = 1234
# Random activations are scaled down so long reductions stay finite in bf16.
ACTIVATION_SCALE = 0.1
P10, P90 = 10, 90

STATUS_OK = "ok"
STATUS_OOM = "oom"
STATUS_ERROR = "error"
# How much of a failed measurement's "Type: message" text a row keeps (the shard's `error` column):
# the cause and its first details; inductor's multi-page tracebacks are cut.
ERROR_CHARS = 500
# Where a measurement's wall time goes (Timer.phase_seconds).
PHASE_BUILD = "build"
PHASE_WARMUP = "warmup"
PHASE_CALIBRATE = "calibrate"
PHASE_CAPTURE = "capture"
PHASE_SAMPLES = "samples"
PHASE_FAILED = "failed"
PHASES = (PHASE_BUILD, PHASE_WARMUP, PHASE_CALIBRATE, PHASE_CAPTURE, PHASE_SAMPLES, PHASE_FAILED)


@dataclass
class Measurement:
    median_s: float | None
    p10_s: float | None
    p90_s: float | None
    mean_s: float | None
    n: int
    status: str
    device_seconds: float
    error: str = ""
    # The per-call sample values themselves (seconds), for studies of the statistics.
    samples_s: tuple[float, ...] = ()

    @classmethod
    def of_samples(cls, values: list[float], device_seconds: float) -> Measurement:
        """A successful measurement: the statistics every shard row carries, from its samples."""
        return cls(
            median_s=percentile(values, 50),
            p10_s=percentile(values, P10),
            p90_s=percentile(values, P90),
            mean_s=sum(values) / len(values),
            n=len(values),
            status=STATUS_OK,
            device_seconds=device_seconds,
            samples_s=tuple(values),
        )


def timed_seconds(device: str, call: Callable[[], Any], reps: int) -> float:
    """Seconds that `reps` back-to-back calls take: CUDA events around them on a GPU (the device's
    time, not the host's), the host clock on a CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / MS_PER_S
    begin = time.perf_counter()
    for _ in range(reps):
        call()
    return time.perf_counter() - begin


class Timer:
    def __init__(self, device: str, samples: int | None = None) -> None:
        self.device = device
        self.samples = samples or (DEFAULT_SAMPLES_CUDA if device == "cuda" else DEFAULT_SAMPLES_CPU)
        # With the default count, long calls are sampled until they settle (see LONG_SAMPLE_S).
        self.adaptive = samples is None
        # Only the phases that took time appear (a failed call charges `failed` alone).
        self.phase_seconds: dict[str, float] = {}
        self._lap_started = time.perf_counter()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _lap(self, phase: str, sync: bool = True) -> None:
        """Charge the wall time since the previous lap to `phase`, once the device has caught up."""
        if sync:
            self.sync()
        now = time.perf_counter()
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + now - self._lap_started
        self._lap_started = now

    def measure(self, build: Callable[[], Callable[[], Any]]) -> Measurement:
        """Build the call (inputs included), then time it. OOM at any stage is a result, not a crash."""
        started = self._lap_started = time.perf_counter()
        try:
            call = build()
            self._lap(PHASE_BUILD)
            values = self._samples(call)
        except torch.OutOfMemoryError:
            self._lap(PHASE_FAILED, sync=False)
            self._recover()
            return Measurement(None, None, None, None, 0, STATUS_OOM, time.perf_counter() - started)
        except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as exc:
            self._lap(PHASE_FAILED, sync=False)
            if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
                self._recover()
                return Measurement(None, None, None, None, 0, STATUS_OOM, time.perf_counter() - started)
            log.warning("measurement failed: %s: %s", type(exc).__name__, str(exc).splitlines()[0][:200])
            self._recover()
            return Measurement(None, None, None, None, 0, STATUS_ERROR, time.perf_counter() - started,
                               error=f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])
        return Measurement.of_samples(values, time.perf_counter() - started)

    def take_samples(self, sample: Callable[[], float], sample_s: float) -> list[float]:
        """`self.samples` values of `sample()`, or for a long one (see LONG_SAMPLE_S) the first
        SETTLED_SAMPLES in a row that agree within SETTLED_SPREAD."""
        if not self.adaptive or sample_s < LONG_SAMPLE_S:
            return [sample() for _ in range(self.samples)]
        values: list[float] = []
        while len(values) < self.samples:
            values.append(sample())
            window = values[-SETTLED_SAMPLES:]
            if len(window) == SETTLED_SAMPLES and max(window) <= min(window) * (1.0 + SETTLED_SPREAD):
                return window
        return values

    def _warm_up(self, call: Callable[[], Any]) -> None:
        """WARMUP_CALLS calls, or one when the timer is adaptive and that one is long."""
        first = timed_seconds(self.device, call, 1)
        if self.adaptive and first >= LONG_SAMPLE_S:
            return
        for _ in range(WARMUP_CALLS - 1):
            call()

    def _samples(self, call: Callable[[], Any]) -> list[float]:
        if self.device == "cuda":
            return self._graph_samples(call)
        self._warm_up(call)
        self._lap(PHASE_WARMUP)
        return self._eager_samples(call)

    def _eager_samples(self, call: Callable[[], Any]) -> list[float]:
        """Samples of `reps` back-to-back calls, `reps` sized so a sample lasts MIN_SAMPLE_S."""
        one = self._timed(call, 1)
        reps = max(1, min(MAX_REPS, math.ceil(MIN_SAMPLE_S / max(one, 1e-9))))
        self._lap(PHASE_CALIBRATE)
        samples = self.take_samples(lambda: self._timed(call, reps), one * reps)
        self._lap(PHASE_SAMPLES)
        return samples

    def _graph_samples(self, call: Callable[[], Any]) -> list[float]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        before = torch.cuda.memory_allocated()
        calls_before = _CallCounter(call)
        with torch.cuda.stream(side):
            self._warm_up(calls_before)
        torch.cuda.current_stream().wait_stream(side)
        self._lap(PHASE_WARMUP)
        per_call_bytes = max(torch.cuda.memory_allocated() - before, 0) / calls_before.count
        most = MAX_GRAPH_REPS
        if per_call_bytes:
            most = max(1, min(most, int(GRAPH_MEMORY_BUDGET_BYTES // per_call_bytes)))
        # An eager call (launch gaps included: never shorter than the op) sizes the pilot, so an op
        # that alone lasts MIN_GRAPH_SAMPLE_S is captured once, not PILOT_GRAPH_REPS times per sample.
        eager_call = self._timed(call, 1)
        pilot_reps = min(PILOT_GRAPH_REPS, most, max(1, math.ceil(MIN_GRAPH_SAMPLE_S / max(eager_call, 1e-9))))
        try:
            pilot = _capture(call, pilot_reps)
        except RuntimeError as exc:  # the op syncs with the host (e.g. .item()): time it eagerly
            log.debug("graph capture failed, timing eagerly: %s", str(exc).splitlines()[0][:200])
            self.sync()
            return self._eager_samples(call)
        pilot.replay()
        # A long call has been timed already (its eager call) and takes one call per replay.
        long_call = self.adaptive and eager_call >= LONG_SAMPLE_S
        per_call = eager_call if long_call else self._timed(pilot.replay, 1) / pilot_reps
        # One replay must dwarf the graph's own launch cost (a few microseconds).
        reps = max(pilot_reps, min(most, math.ceil(MIN_GRAPH_SAMPLE_S / max(per_call, 1e-9))))
        self._lap(PHASE_CALIBRATE)
        graph = pilot
        if reps != pilot_reps:
            del pilot
            graph = _capture(call, reps)
            graph.replay()
        if long_call:
            for _ in range(GRAPH_WARM_REPLAYS - 1):
                graph.replay()
        self._lap(PHASE_CAPTURE)
        sample = functools.partial(self._replay_seconds, graph, reps)
        del graph
        samples = self.take_samples(sample, per_call * reps)
        del sample
        self._lap(PHASE_SAMPLES)
        return samples

    def _replay_seconds(self, graph: Any, reps: int) -> float:
        """Seconds per call of one replay of a graph of `reps` calls."""
        return self._timed(graph.replay, 1) / reps

    def _timed(self, call: Callable[[], Any], reps: int) -> float:
        return timed_seconds(self.device, call, reps) / reps

    def _recover(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()


class _CallCounter:
    """A call that counts how often it ran (the warm-up's length varies: see Timer._warm_up)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.count = 0

    def __call__(self) -> Any:
        self.count += 1
        return self.call()


def _capture(call: Callable[[], Any], reps: int) -> Any:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    return graph


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---------------------------------------------------------------------------------------------
# Rebuilding an aten call from its trace record.

_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
)}
_REQUEST_NAME = re.compile(r"\b[TBKS]\b")
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
                   "channels_last": torch.channels_last}


def evaluate(expr: str, values: dict[str, int]) -> int:
    """A request dim's size at a point: expressions are our own trace's (sympy text over T, B, K, S)."""
    result = eval(expr, {"__builtins__": {}}, values)  # noqa: S307 - trace expressions only
    return int(result)


def tensor_shape(spec: TensorSpec, values: dict[str, int]) -> list[int]:
    return [evaluate(d.expr, values) if d.origin == ORIGIN_REQUEST else d.value for d in spec.dims]


def build_aten_call(op: Operation, values: dict[str, int], device: str,
                    fixed_inputs: dict[int, torch.Tensor] | None = None) -> Callable[[], Any]:
    """The recorded aten op, with deterministic inputs of the point's sizes and in-range indices.

    `fixed_inputs` keeps the inputs whose every dim is config-fixed (weights, the KV cache) from one
    point of a signature to the next: generating a 150k-row embedding table per point costs more
    than measuring it."""
    func = _resolve(op.op)
    generator = torch.Generator(device=device).manual_seed(SEED)
    shapes = [tensor_shape(spec, values) for spec in op.inputs]
    tensors = _make_inputs(op, shapes, device, generator, fixed_inputs)
    special = _ENGINE_INPUTS.get(op.op)
    if special is not None:
        special(op, tensors)
    if fixed_inputs is not None:
        for index, spec in enumerate(op.inputs):
            if all(d.origin != ORIGIN_REQUEST for d in spec.dims):
                tensors[index] = fixed_inputs.setdefault(index, tensors[index])
    kwargs = _arguments(func, op, tensors, values, device)

    def call() -> Any:
        return func(**kwargs)

    return call


def _onednn_inputs(op: Operation, tensors: list[torch.Tensor]) -> None:
    """vLLM's `_C.onednn_mm(out [M,N], x [M,K], bias?, handler)`: the handler is built from a [K, N]
    weight by vLLM's own `create_onednn_mm`, as its linear layers do when they load."""
    from dooly.engines.vllm_engine import onednn_handler_tensor

    out, x = tensors[0], tensors[1]
    tensors[-1] = onednn_handler_tensor(x.shape[-1], out.shape[-1], x.dtype)


# Engine ops whose inputs are not all data (a handler to a prebuilt kernel): how to make them.
_ENGINE_INPUTS = {"_C.onednn_mm.default": _onednn_inputs}
# Op namespaces a serving engine's library defines: loaded before such an op is resolved.
_ENGINE_NAMESPACES = {"_C", "vllm", "_C_cache_ops", "_moe_C"}


def _resolve(name: str) -> Any:
    namespace, op_name, overload = name.split(".")
    if namespace in _ENGINE_NAMESPACES:
        from dooly.engines.vllm_engine import load_custom_ops

        load_custom_ops()
    return getattr(getattr(getattr(torch.ops, namespace), op_name), overload)


def _make_inputs(op: Operation, shapes: list[list[int]], device: str, generator: torch.Generator,
                 known: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for index, (spec, shape) in enumerate(zip(op.inputs, shapes)):
        if known and index in known:
            tensors.append(known[index])
            continue
        dtype = _DTYPES[spec.dtype]
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * ACTIVATION_SCALE
            tensors.append(tensor.to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, generator=generator, device=device).bool())
        else:
            tensors.append(_index_tensor(op, index, shape, shapes, dtype, device))
    return tensors


def _index_tensor(op: Operation, index: int, shape: list[int], shapes: list[list[int]], dtype: torch.dtype,
                  device: str) -> torch.Tensor:
    """Integer inputs are indices or offsets: always in range, distinct where the op writes by index."""
    count = math.prod(shape)
    if op.op == "aten._grouped_mm.default":
        rows = shapes[0][0]
        groups = max(count, 1)
        offsets = [round(rows * (g + 1) / groups) for g in range(groups)]
        return torch.tensor(offsets, dtype=dtype, device=device).reshape(shape)
    dim = op.scalars.get("dim", 0)
    if index > 0 and shapes[0]:
        axis = dim if isinstance(dim, int) and -len(shapes[0]) <= dim < len(shapes[0]) else 0
        bound = shapes[0][axis]
    else:
        bound = count
    bound = max(bound, 1)
    return (torch.arange(count, device=device, dtype=torch.int64) % bound).to(dtype).reshape(shape)


def _arguments(func: Any, op: Operation, tensors: list[torch.Tensor], values: dict[str, int], device: str) -> dict:
    letters = op.layout.split(".") if op.layout else []
    supplied: Iterator[torch.Tensor] = iter(tensors)
    kwargs: dict[str, Any] = {}
    for argument, letter in zip(func._schema.arguments, letters):
        if letter == "t":
            kwargs[argument.name] = next(supplied)
        elif letter.startswith("l"):
            kwargs[argument.name] = [next(supplied) if element == "t" else None for element in letter[1:]]
        elif letter == "n" and not argument.has_default_value():
            kwargs[argument.name] = None  # an optional tensor passed as None (a linear without bias)
        elif letter == "s" and argument.name in op.scalars:
            kwargs[argument.name] = _scalar(op.scalars[argument.name], values)
    for argument in func._schema.arguments:
        if argument.name == "device" and "device" not in kwargs:
            kwargs["device"] = torch.device(device)
    return kwargs


def _scalar(value: Any, values: dict[str, int]) -> Any:
    if isinstance(value, list):
        return [_scalar(v, values) for v in value]
    if isinstance(value, str):
        if value in _DTYPES:
            return _DTYPES[value]
        if value in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[value]
        if value == "strided":
            return torch.strided
        if _REQUEST_NAME.search(value):
            return evaluate(value, values)
    return value
