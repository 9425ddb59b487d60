"""Running the independent pieces of a fit (held-out checks, final fits, leave-one-model-out
refits) on several processes.

Every piece is a deterministic function of its arguments (fold assignments and trees are seeded),
so where it runs changes nothing it returns: a fit on N processes writes the same models and
reports as on one. Processes, not threads: the pieces are thousands of small numpy / scikit-learn
calls whose time is Python overhead, which holds the GIL.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Default cap on worker processes: an H100 fit's phases hold a few hundred pieces of which the
# largest take about a second; beyond this many processes the last pieces make the wall time and
# each further process only adds its start-up.
MAX_DEFAULT_JOBS = 8
# Modules the fork server imports once, so every worker forked from it starts warm (importing
# scikit-learn's trees takes about a second per process otherwise).
PRELOAD = ["dooly.fit.selection"]


def default_jobs() -> int:
    """Processes a fit uses unless told: the CPUs this process may run on, at most MAX_DEFAULT_JOBS."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, MAX_DEFAULT_JOBS))


def _context() -> Any:
    """A fork server where the platform has one: workers forked from a clean server process that
    never ran an OpenMP region (GNU OpenMP is not fork-safe once its threads exist; forking the
    caller, a test process that fitted before, could hang), yet start without re-importing."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


class TaskRunner:
    """Calls a module-level function over argument tuples and returns the results in order: in
    this process for one job, else on a pool of `jobs` processes started at the first call with
    more than one piece and shut down on exit. Pieces are handed out largest first (by the
    caller's cost estimates) so that no large piece starts last and holds up the rest."""

    def __init__(self, jobs: int = 1) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1 (got {jobs})")
        self.jobs = jobs
        self._pool: Executor | None = None

    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(
        self, function: Callable[..., T], arguments: Sequence[tuple[Any, ...]], costs: Sequence[float] | None = None
    ) -> list[T]:
        """[function(*args) for args in arguments], computed on the runner's processes."""
        if self.jobs == 1 or len(arguments) < 2:
            return [function(*args) for args in arguments]
        if self._pool is None:
            logger.info("fitting on %d processes", self.jobs)
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=_context())
        order: Sequence[int] = range(len(arguments))
        if costs is not None:
            order = sorted(order, key=lambda i: -costs[i])
        futures: dict[int, Future[T]] = {i: self._pool.submit(function, *arguments[i]) for i in order}
        return [futures[i].result() for i in range(len(arguments))]
