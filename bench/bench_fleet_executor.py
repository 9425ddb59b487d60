"""How much the local executor adds to running pods as processes, and how fast `render` is.

Runs an Indexed Job of trivial Python pods through LocalExecutor and the same processes through a
bare thread pool of subprocess.run, with the same parallelism; prints the medians and their ratio.
Also times building and checking every manifest of the bundled default fleet.

    .venv/bin/python bench/bench_fleet_executor.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from dooly.fleet import checks, jobs
from dooly.fleet.executor import LocalExecutor
from dooly.fleet.spec import FleetSpec

PODS = 8
PARALLELISM = 2
REPEATS = 5
RENDER_REPEATS = 20
SCRIPT = "import os; print(os.environ.get('JOB_COMPLETION_INDEX', ''))"


def _job() -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "completionMode": "Indexed",
            "completions": PODS,
            "parallelism": PARALLELISM,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "command": [sys.executable, "-c", SCRIPT]}],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                }
            },
        },
    }


def _bare() -> None:
    def one(index: int) -> None:
        subprocess.run([sys.executable, "-c", SCRIPT], env={"JOB_COMPLETION_INDEX": str(index)},
                       capture_output=True, check=True)

    with ThreadPoolExecutor(max_workers=PARALLELISM) as pool:
        list(pool.map(one, range(PODS)))


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    executor = LocalExecutor()
    job = _job()
    local = [_timed(lambda: executor.run_job(job, env={})) for _ in range(REPEATS)]
    bare = [_timed(_bare) for _ in range(REPEATS)]
    spec = FleetSpec.load(None)

    def render() -> None:
        manifests = jobs.build_run_manifests(spec, run_id="20250101-020000") + jobs.build_setup_manifests(spec)
        checks.require_valid(manifests)
        jobs.to_yaml(manifests)

    renders = [_timed(render) for _ in range(RENDER_REPEATS)]
    local_median, bare_median = statistics.median(local), statistics.median(bare)
    print(f"{PODS} pods, parallelism {PARALLELISM}, median of {REPEATS}:")
    print(f"  LocalExecutor.run_job     {local_median * 1000:8.1f} ms")
    print(f"  bare subprocess pool      {bare_median * 1000:8.1f} ms")
    print(f"  ratio                     {local_median / bare_median:8.2f} x")
    print(f"  overhead per pod          {(local_median - bare_median) / PODS * 1000:8.1f} ms")
    print(f"render + check default fleet (median of {RENDER_REPEATS}): {statistics.median(renders) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
