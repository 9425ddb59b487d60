"""Targets the collective tests start on spawned ranks (importable by name from every rank), and
the small operation records they measure."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dooly.distributed import SAFE_ENV, RankContext
from dooly.trace.schema import Dim, Operation, TensorSpec

HIDDEN = 8
WORLD = 2
# A rank-1-only delay per call: the measured collective must report the slowest rank's time.
SLOW_RANK_DELAY_S = 0.004


def collective_op(kind: str, variable: str = "T", hidden: int = HIDDEN, world: int = WORLD,
                  dtype: str = "float32") -> Operation:
    """A collective as `dooly trace --tp` records it: input [1, <request var>, hidden]."""
    dims = (Dim("config", 1, "1"), Dim("request", 4, variable), Dim("config", hidden, "hidden_size", ("hidden_size",)))
    spec = TensorSpec(dims=dims, dtype=dtype)
    return Operation(op=f"collective.{kind}", kind="collective", module="model.layers.*.mlp.down_proj",
                     inputs=[spec], outputs=[spec], scalars={"collective": kind, "world_size": world})


def report_environment(ctx: RankContext, payload: dict[str, Any]) -> None:
    """Each rank writes what it sees of the no-multicast variables (and its process id)."""
    seen = {name: os.environ.get(name) for name in SAFE_ENV}
    Path(payload["dir"], f"rank{ctx.rank}.json").write_text(json.dumps({"env": seen, "pid": os.getpid()}))
    ctx.report(("rank0", seen))


def time_with_slow_rank(ctx: RankContext, payload: dict[str, Any]) -> None:
    """Times a call that is slow on rank 1 only, through the collective timer's sampling."""
    from dooly.profile.collectives import CollectiveTimer

    timer = CollectiveTimer(ctx, payload["samples"])
    delay = SLOW_RANK_DELAY_S if ctx.rank == 1 else 0.0
    samples = timer._samples(lambda: time.sleep(delay) if delay else None)
    Path(payload["dir"], f"rank{ctx.rank}.json").write_text(json.dumps(samples))


def fail_on_rank_one(ctx: RankContext, payload: dict[str, Any]) -> None:
    if ctx.rank == 1:
        raise ValueError("rank one refuses")
