"""Measuring the collectives a tensor-parallel rank issues, across the N ranks of one host.

A trace made with `--tp N` lists the collectives of one rank (`collective.all_reduce` after
rowwise layers, `collective.all_gather` of vocab-parallel logits), each with its input shape
labelled like any op, e.g. [1, T, hidden_size], and the world size among its scalars. Their
signatures are planned like any op's; the missing points are measured here by N spawned ranks
(`dooly.distributed.launch`): NCCL on GPUs, gloo on the CPU.

Per point, every rank builds the same buffers (zeros: a collective's time does not depend on the
values), warms up, and times `reps` back-to-back calls:
- on CUDA, captured once in a CUDA graph and replayed (as compute ops are), with a CUDA-event
  pair around each replay; where capture fails on any rank, all ranks time eager calls instead;
- on the CPU, with the process timer.
`reps` is sized so one sample lasts at least MIN_SAMPLE_S. Before each sample the ranks meet at a
host barrier, so none starts early; a sample's value is the maximum over ranks (a collective is as
slow as its slowest rank), and a row reports the median, p10 and p90 of those maxima. Every rank
computes the same statistics from the same maxima, so they agree on refinement points too.

Kinds: `all_reduce` (in place), `all_gather` (into a world-size times larger buffer),
`reduce_scatter` (the input split over the ranks) and `send_recv` (a pipeline stage boundary:
rank r sends its tensor to r+1 and receives one from r-1).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from dooly.distributed import RankContext
from dooly.profile.grid import refinement_points
from dooly.profile.measure import (
    ERROR_CHARS,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OOM,
    Measurement,
    tensor_shape,
    timed_seconds,
)
from dooly.trace.schema import Operation

log = logging.getLogger(__name__)

ALL_REDUCE = "all_reduce"
ALL_GATHER = "all_gather"
REDUCE_SCATTER = "reduce_scatter"
SEND_RECV = "send_recv"
COLLECTIVE_KINDS = (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, SEND_RECV)
COLLECTIVE_PREFIX = "collective."
WORLD_SIZE_SCALAR = "world_size"
WARMUP_CALLS = 5
PILOT_CALLS = 5
MIN_SAMPLE_S = 1e-3
MAX_REPS = 500
DEFAULT_SAMPLES_CUDA = 15
DEFAULT_SAMPLES_CPU = 5
STATUS_CODES = {STATUS_OK: 0, STATUS_ERROR: 1, STATUS_OOM: 2}
LOG_CHARS = 200


def collective_kind(op: Operation) -> str:
    kind = str(op.scalars.get("collective") or op.op.removeprefix(COLLECTIVE_PREFIX))
    if kind not in COLLECTIVE_KINDS:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(COLLECTIVE_KINDS)}")
    return kind


def world_size_of(op: Operation) -> int:
    return int(op.scalars.get(WORLD_SIZE_SCALAR, 1))


def work_payload(items: list[Any], device: str, samples: int | None) -> dict[str, Any]:
    """What the ranks need to measure plan items: plain data only (it crosses a process spawn)."""
    return {
        "device": device,
        "samples": samples or (DEFAULT_SAMPLES_CUDA if device == "cuda" else DEFAULT_SAMPLES_CPU),
        "items": [
            {"signature": item.signature, "op": item.op.to_dict(), "points": [list(p.values) for p in item.missing]}
            for item in items
        ],
    }


def rank_worker(ctx: RankContext, payload: dict[str, Any]) -> None:
    """Every rank runs this: measure each item's points, then its refinement points, in the same
    order on all ranks. Rank 0 reports each measured point and each finished item."""
    timer = CollectiveTimer(ctx, payload["samples"])
    for entry in payload["items"]:
        _measure_entry(ctx, timer, entry)


def _measure_entry(ctx: RankContext, timer: CollectiveTimer, entry: dict[str, Any]) -> None:
    """One item on every rank: its planned points, then the refinement points they call for (every
    rank computes the same ones from the same rows, so the ranks stay in step)."""
    op = Operation.from_dict(entry["op"])
    rows: list[dict[str, Any]] = []

    def measure(values: dict[str, int]) -> None:
        measurement = timer.measure(op, values)
        ctx.report(("point", entry["signature"], sorted(values.items()), asdict(measurement)))
        rows.append({**values, "status": measurement.status, "latency_median_s": measurement.median_s})

    for values in entry["points"]:
        measure(dict(values))
    for point in refinement_points(op, rows):
        measure(point.as_dict)
    ctx.report(("item", entry["signature"], None, None))


class CollectiveTimer:
    """Times one collective at one request point on every rank (see the module docstring)."""

    def __init__(self, ctx: RankContext, samples: int) -> None:
        self.ctx = ctx
        self.samples = samples

    def measure(self, op: Operation, values: dict[str, int]) -> Measurement:
        import torch

        started = time.perf_counter()
        status = STATUS_OK
        error = ""
        call: Callable[[], Any] | None = None
        try:
            call = self._build(op, values)
        except torch.OutOfMemoryError:
            status = STATUS_OOM
        except (RuntimeError, ValueError, MemoryError) as exc:
            status, error = _failure(exc)
        status = self._agree(status)
        if status != STATUS_OK or call is None:
            self._recover()
            return Measurement(None, None, None, None, 0, status, self._held(started), error=error)
        try:
            values_s = self._samples(call)
        except torch.OutOfMemoryError:
            self._recover()
            return Measurement(None, None, None, None, 0, STATUS_OOM, self._held(started))
        return Measurement.of_samples(values_s, self._held(started))

    # -- building ----------------------------------------------------------------------------

    def _build(self, op: Operation, values: dict[str, int]) -> Callable[[], Any]:
        import torch
        import torch.distributed as dist

        from dooly.profile.measure import _DTYPES

        kind = collective_kind(op)
        expected = world_size_of(op)
        if expected != self.ctx.world_size:
            raise ValueError(f"{op.op} was traced for {expected} ranks; {self.ctx.world_size} are running")
        spec = op.inputs[0]
        numel = math.prod(tensor_shape(spec, values))
        dtype = _DTYPES[spec.dtype]
        device = self.ctx.torch_device
        world, rank = self.ctx.world_size, self.ctx.rank
        source = torch.zeros(numel, dtype=dtype, device=device)
        if kind == ALL_REDUCE:
            return lambda: dist.all_reduce(source)
        if kind == ALL_GATHER:
            gathered = torch.zeros(numel * world, dtype=dtype, device=device)
            # torch 2.13 renamed all_gather_into_tensor (the device image's torch 2.11 lacks the new name)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            return lambda: gather(gathered, source)
        if kind == REDUCE_SCATTER:
            share = -(-numel // world)
            padded = torch.zeros(share * world, dtype=dtype, device=device)
            scattered = torch.zeros(share, dtype=dtype, device=device)
            return lambda: dist.reduce_scatter_tensor(scattered, padded)
        received = torch.zeros(numel, dtype=dtype, device=device)
        peers = []
        if rank + 1 < world:
            peers.append(("send", rank + 1))
        if rank > 0:
            peers.append(("recv", rank - 1))

        def send_recv() -> None:
            ops = [
                dist.P2POp(dist.isend, source, peer) if way == "send" else dist.P2POp(dist.irecv, received, peer)
                for way, peer in peers
            ]
            for request in dist.batch_isend_irecv(ops) if ops else []:
                request.wait()

        return send_recv

    # -- timing ------------------------------------------------------------------------------

    def _samples(self, call: Callable[[], Any]) -> list[float]:
        import torch

        for _ in range(WARMUP_CALLS):
            call()
        self._sync()
        per_call = self._max(self._timed(call, PILOT_CALLS) / PILOT_CALLS)
        reps = max(1, min(MAX_REPS, math.ceil(MIN_SAMPLE_S / max(per_call, 1e-9))))
        replay = call
        graph = None
        if self.ctx.device == "cuda":
            graph = self._capture(call, reps)
            replay = graph.replay if graph is not None else call
        calls = 1 if graph is not None else reps
        samples = []
        for _ in range(self.samples):
            self._sync()
            self._barrier()
            samples.append(self._timed(replay, calls) / reps)
        maxima = torch.tensor(samples, dtype=torch.float64)
        self._all_max(maxima)
        del graph
        return maxima.tolist()

    def _capture(self, call: Callable[[], Any], reps: int) -> Any:
        """A CUDA graph of `reps` calls, or None on every rank when any rank could not capture."""
        import torch

        graph = None
        ok = 1.0
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                call()
            torch.cuda.current_stream().wait_stream(side)
            # Thread-local capture mode: NCCL's watchdog thread keeps querying its events meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                for _ in range(reps):
                    call()
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - any capture failure means eager timing
            log.info("collective graph capture failed, timing eagerly: %s", str(exc).splitlines()[0][:LOG_CHARS])
            graph, ok = None, 0.0
        flag = torch.tensor([ok], dtype=torch.float64)
        self._all_min(flag)
        if flag.item() < 1.0:
            return None
        return graph

    def _timed(self, call: Callable[[], Any], reps: int) -> float:
        return timed_seconds(self.ctx.device, call, reps)

    # -- agreement between ranks (host side, on the control group) ---------------------------

    def _agree(self, status: str) -> str:
        import torch

        code = torch.tensor([STATUS_CODES[status]], dtype=torch.float64)
        self._all_max(code)
        by_code = {v: k for k, v in STATUS_CODES.items()}
        return by_code[int(code.item())]

    def _max(self, value: float) -> float:
        import torch

        tensor = torch.tensor([value], dtype=torch.float64)
        self._all_max(tensor)
        return float(tensor.item())

    def _all_max(self, tensor: Any) -> None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.ctx.control)

    def _all_min(self, tensor: Any) -> None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.ctx.control)

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.ctx.control)

    def _sync(self) -> None:
        if self.ctx.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def _recover(self) -> None:
        if self.ctx.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _held(self, started: float) -> float:
        """Device-seconds: every rank's device was held for the measurement's wall time."""
        return (time.perf_counter() - started) * self.ctx.world_size


def _failure(exc: BaseException) -> tuple[str, str]:
    if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
        return STATUS_OOM, ""
    return STATUS_ERROR, f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
