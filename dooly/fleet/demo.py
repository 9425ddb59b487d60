"""`dooly demo`: the whole pipeline on this machine's CPU, through the Job manifests a cluster runs.

The demo fleet (`demo_fleet.yaml`) has one CPU pool, two attention backends and three small bundled
models. Its profiling Jobs, merge Job and simulate Jobs are built by the same functions as
`dooly fleet render` and run by the local executor: the profiling pods trace the models and
profile only the signatures the store lacks, each pod one shard; the merge Job compacts the shards
and fits the regressors; one simulate Job per (model, backend) serves a workload on them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dooly.errors import DoolyError
from dooly.fleet import checks, jobs
from dooly.fleet.executor import JobResult, LocalExecutor
from dooly.fleet.spec import DEMO_FLEET_RESOURCE, FleetSpec

log = logging.getLogger(__name__)

DEMO_OUT_DIR = "demo-out"
DEMO_STORE_DIR = "db"
PROFILE_CONTAINER = "profile"
SIMULATE_CONTAINER = "simulate"
# A workload a 2-core CPU serves without an ever-growing queue: short prompts, a few requests a
# minute. (A GPU fleet simulates its own workloads; this one only shows the pipeline end to end.)
DEMO_WORKLOAD_ARGS = ("--requests", "40", "--rate", "0.05", "--prompt-len", "uniform:16:64",
                      "--output-len", "uniform:4:16", "--seed", "0")
MAX_DEMO_SHARDS = 16
# Figures the result table prefers when a simulation reports many (matched as substrings).
PREFERRED_METRICS = ("ttft", "tpot", "e2e", "throughput", "latency")
MAX_METRIC_COLUMNS = 6
NESTED_METRIC_DEPTH = 2


@dataclass
class ProfileTotals:
    """What the profiling pods of the run report, over shards and backends.

    Device-seconds are the pods' own (each shard measures a disjoint part): they add up. Signature
    counts are the whole Job's plan: each pod lists them per model (the first model to need a
    signature profiles it, later ones reuse it), the same on every shard, so one pod per Job tells
    them; a pod without that list contributes its own counts.
    """

    profiled_signatures: int = 0
    reused_signatures: int = 0
    device_seconds: float = 0.0
    baseline_device_seconds: float = 0.0
    pods: int = 0

    def add_job(self, payloads: Sequence[Mapping[str, Any]]) -> None:
        """Account the outputs of one profiling Job's pods."""
        for payload in payloads:
            self.device_seconds += float(payload.get("device_seconds") or 0.0)
            self.baseline_device_seconds += float(payload.get("baseline_device_seconds") or 0.0)
            self.pods += 1
        per_model = payloads[0].get("models") if payloads else None
        if per_model:
            self.profiled_signatures += sum(_count(m.get("profiled_signatures")) for m in per_model)
            self.reused_signatures += sum(_count(m.get("reused_signatures")) for m in per_model)
            return
        for payload in payloads:
            self.profiled_signatures += _count(payload.get("profiled_signatures"))
            self.reused_signatures += _count(payload.get("reused_signatures"))

    @property
    def saved_seconds(self) -> float:
        return self.baseline_device_seconds - self.device_seconds

    @property
    def saved_fraction(self) -> float:
        if self.baseline_device_seconds <= 0:
            return 0.0
        return self.saved_seconds / self.baseline_device_seconds

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "saved_device_seconds": self.saved_seconds,
            "saved_fraction": self.saved_fraction,
        }


@dataclass
class Simulation:
    model: str
    backend: str
    result: dict[str, Any]


@dataclass
class DemoReport:
    run_id: str
    store: str
    models: tuple[str, ...]
    backends: tuple[str, ...]
    jobs: list[JobResult] = field(default_factory=list)
    totals: ProfileTotals = field(default_factory=ProfileTotals)
    simulations: list[Simulation] = field(default_factory=list)
    failed: JobResult | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "store": self.store,
            "models": list(self.models),
            "backends": list(self.backends),
            "succeeded": self.failed is None,
            "failed_job": self.failed.name if self.failed else None,
            "jobs": [
                {"name": j.name, "succeeded": j.succeeded, "reason": j.reason, "seconds": j.seconds, "pods": len(j.pods)}
                for j in self.jobs
            ],
            "profile": self.totals.to_json(),
            "simulations": [dataclasses.asdict(s) for s in self.simulations],
        }


def demo_spec(
    store: str, *, models: Sequence[str] = (), backends: Sequence[str] = (), shards: int | None = None
) -> FleetSpec:
    """The bundled demo fleet, writing to `store`, optionally narrowed and re-sharded."""
    spec = FleetSpec.bundled(DEMO_FLEET_RESOURCE).with_store(store).select(models=models, backends=backends)
    if shards is not None:
        if not 1 <= shards <= MAX_DEMO_SHARDS:
            raise DoolyError(f"--shards must be 1..{MAX_DEMO_SHARDS}, got {shards}")
        parallel = max(1, min(shards, os.cpu_count() or 1))
        spec = dataclasses.replace(
            spec,
            gpu_types=tuple(dataclasses.replace(g, completions=shards, parallelism=parallel) for g in spec.gpu_types),
        )
    return spec


def run_demo(
    spec: FleetSpec, *, executor: LocalExecutor, env: Mapping[str, str], run_id: str, platform: str
) -> DemoReport:
    """Profile (sharded), merge and fit, then simulate every (model, backend); stops at the first failed Job.

    `platform` is this machine's platform name, the one the profiling pods record with
    `--platform auto`: the simulations use the regressors fitted for it.
    """
    pairs = list(dict.fromkeys((t.engine.name, t.backend) for t in spec.targets()))
    backends = tuple(dict.fromkeys(backend for _, backend in pairs))
    report = DemoReport(run_id=run_id, store=spec.store, models=spec.models, backends=backends)
    profile_jobs = jobs.build_profile_jobs(spec, run_id=run_id)
    merge_job = jobs.build_merge_job(spec, run_id=run_id, suspend=False)
    simulate_jobs = [
        (
            model,
            backend,
            jobs.build_simulate_job(
                spec, run_id=run_id, model=model, engine=engine, backend=backend, platform=platform,
                workload_args=DEMO_WORKLOAD_ARGS,
                # The demo's CPU pool profiles but records no calibration run (GPU pools do).
                host_overhead=any(t.gpu.gpus for t in spec.targets()),
            ),
        )
        for engine, backend in pairs
        for model in spec.models
    ]
    everything = profile_jobs + [merge_job] + [job for _, _, job in simulate_jobs]
    checks.require_valid(everything)
    for manifest in everything:
        executor.check_job(manifest, env=env)

    for manifest in [*profile_jobs, merge_job]:
        result = executor.run_job(manifest, env=env)
        report.jobs.append(result)
        if not result.succeeded:
            report.failed = result
            return report
        if manifest is not merge_job:
            report.totals.add_job([_parse_json(out, result.name) for out in result.outputs(PROFILE_CONTAINER)])

    workers = max(1, min(len(simulate_jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simulate") as pool:
        results = list(pool.map(lambda item: executor.run_job(item[2], env=env), simulate_jobs))
    for (model, backend, _), result in zip(simulate_jobs, results):
        report.jobs.append(result)
        if not result.succeeded:
            report.failed = report.failed or result
            continue
        outputs = result.outputs(SIMULATE_CONTAINER)
        report.simulations.append(Simulation(model, backend, _parse_json(outputs[-1], result.name)))
    return report


def metric_columns(simulations: Sequence[Simulation]) -> list[str]:
    """Which numeric figures of the simulations the result table shows (dotted keys)."""
    keys: dict[str, None] = {}
    for simulation in simulations:
        keys.update(dict.fromkeys(flatten_numbers(simulation.result)))
    preferred = [k for k in keys if any(p in k.lower() for p in PREFERRED_METRICS)]
    chosen = preferred or list(keys)
    return chosen[:MAX_METRIC_COLUMNS]


def flatten_numbers(payload: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric leaves of a JSON object, two levels deep, keyed `a.b`."""
    flat: dict[str, float] = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            flat[name] = value
        elif isinstance(value, Mapping) and depth + 1 < NESTED_METRIC_DEPTH:
            flat.update(flatten_numbers(value, f"{name}.", depth + 1))
    return flat


def _count(value: Any) -> int:
    if isinstance(value, (list, tuple, set, dict)):
        return len(value)
    return int(value or 0)


def _parse_json(text: str, job: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise DoolyError(f"Job {job} printed no JSON document on stdout: {text[:80]!r}") from exc
    if not isinstance(payload, dict):
        raise DoolyError(f"Job {job} printed JSON that is not an object")
    return payload
