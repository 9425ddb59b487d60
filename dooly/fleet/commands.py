"""`dooly fleet render|submit|status|wait|logs` and `dooly demo`.

Only click and the light fleet modules are imported here; the kubernetes client is imported when a
command talks to a cluster, so `dooly --help` stays fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dooly.errors import DoolyError
from dooly.fleet import checks, jobs
from dooly.fleet.executor import JobResult, LocalExecutor
from dooly.fleet.spec import FleetSpec
from dooly.output import emit_json, format_table, output_option

log = logging.getLogger(__name__)

EXECUTOR_LOCAL = "local"
EXECUTOR_KUBERNETES = "kubernetes"
# Exit code of a run that ended with a failed Job or ran out of time (bad input exits with 2).
RUN_FAILED_EXIT_CODE = 1
DEFAULT_WAIT_TIMEOUT_S = 12 * 3600


def _fleet_options(func: Callable) -> Callable:
    """--fleet and the options that narrow a fleet; shared by render and submit."""
    options = [
        click.option("--fleet", "fleet_file", type=click.Path(dir_okay=False),
                     help="Fleet file (YAML); default: the bundled dooly/fleet/default_fleet.yaml."),
        click.option("--gpu", "gpus", multiple=True, help="Only this GPU type of the fleet (repeatable)."),
        click.option("--backend", "backends", multiple=True, help="Only this attention backend (repeatable)."),
        click.option("--engine", "engines", multiple=True, help="Only this engine (repeatable)."),
        click.option("--model", "models", multiple=True, help="Profile these models instead of the fleet's (repeatable)."),
        click.option("--store", default=None, help="Store URI instead of the fleet's (s3://BUCKET/PREFIX or a directory)."),
        click.option("--run-id", default=None, help="Run id (default: the UTC time, e.g. 20250101-020000)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _cluster_options(func: Callable) -> Callable:
    options = [
        click.option("--fleet", "fleet_file", type=click.Path(dir_okay=False),
                     help="Fleet file whose namespace to use (default: the bundled default)."),
        click.option("--namespace", default=None, help="Namespace instead of the fleet file's."),
        click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
                     help="kubeconfig file (default: in-cluster config inside a pod, else $KUBECONFIG or ~/.kube/config)."),
        click.option("--context", default=None, help="kubeconfig context (default: the current one)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load_spec(fleet_file, gpus, backends, engines, models, store) -> FleetSpec:
    spec = FleetSpec.load(fleet_file, store=store)
    return spec.select(gpus=gpus, backends=backends, engines=engines, models=models)


def _cluster_spec(spec: FleetSpec) -> None:
    if not spec.is_s3:
        raise DoolyError(
            f"pods in a cluster need an s3:// store, not {spec.store!r} (use --executor local for a directory)"
        )


@click.group("fleet")
def fleet_group() -> None:
    """Run profiling for a fleet of GPU types: Kubernetes Jobs, or the same Jobs as local processes.

    One Indexed Job per (GPU type x engine x attention backend) profiles only the signatures the
    store lacks, split into shards between its pods; then a CPU Job merges the shards and fits.

    \b
    Examples:
      dooly fleet render > run.yaml                      the Jobs `submit` would create
      dooly fleet render --setup | kubectl apply -f -    namespace, RBAC, ConfigMap, CronJob
      dooly fleet submit --executor kubernetes --wait    submit to the cluster and follow it
      dooly fleet submit --gpu h100-80gb --store ./db    run the same pods here, as processes
      dooly fleet status            dooly fleet wait            dooly fleet logs --job NAME
    """


@fleet_group.command("render")
@_fleet_options
@click.option("--setup", is_flag=True,
              help="Print the one-time objects instead (namespace, RBAC, fleet ConfigMap, CronJob), as in k8s/.")
@output_option
def render_command(fleet_file, gpus, backends, engines, models, store, run_id, setup, output_format) -> None:
    """Print the manifests `dooly fleet submit` would create (multi-document YAML, kubectl-compatible).

    \b
    Examples:
      dooly fleet render --fleet my-fleet.yaml --gpu h100-80gb > run.yaml
      dooly fleet render --setup --fleet my-fleet.yaml | kubectl apply -f -
      dooly fleet render --output json | jq '.items[].metadata.name'
    """
    spec = _load_spec(fleet_file, gpus, backends, engines, models, store)
    if setup:
        manifests = jobs.build_setup_manifests(spec)
    else:
        _cluster_spec(spec)
        manifests = jobs.build_run_manifests(spec, run_id=jobs.check_run_id(run_id or jobs.new_run_id()))
    checks.require_valid(manifests)
    if output_format == "json":
        emit_json({"apiVersion": "v1", "kind": "List", "items": manifests})
    else:
        click.echo(jobs.to_yaml(manifests), nl=False)


@fleet_group.command("submit")
@_fleet_options
@click.option("--executor", type=click.Choice([EXECUTOR_LOCAL, EXECUTOR_KUBERNETES]), default=EXECUTOR_LOCAL,
              show_default=True, help="local: run the pods here as processes; kubernetes: create the Jobs.")
@click.option("--wait", "wait_", is_flag=True, help="kubernetes: follow the run to its end (resumes the merge Job).")
@click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_WAIT_TIMEOUT_S, show_default=True,
              help="Seconds --wait waits at most.")
@click.option("--poll", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              help="Seconds between status polls while waiting.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="kubeconfig file.")
@click.option("--context", default=None, help="kubeconfig context.")
@click.option("--secrets-file", type=click.Path(dir_okay=False), default=None,
              help="local: YAML {secret: {key: value}} for Secret-sourced env (else the same-named env variables).")
@output_option
def submit_command(
    fleet_file, gpus, backends, engines, models, store, run_id, executor, wait_, timeout, poll, kubeconfig, context,
    secrets_file, output_format,
) -> None:
    """Run one profiling round: the profiling Jobs, then merge and fit.

    Everything is validated before the first API call or process; a bad fleet file, an unknown
    GPU type, backend or model, or an unreachable cluster exits with code 2 and creates nothing.
    A run that ends with a failed Job exits with code 1.

    \b
    Examples:
      dooly fleet submit --executor kubernetes --fleet my-fleet.yaml
      dooly fleet submit --executor kubernetes --wait --timeout 43200     (what the CronJob runs)
      dooly fleet submit --gpu h100-80gb --backend paged|sdpa --store ./db   (here, as processes)
    """
    spec = _load_spec(fleet_file, gpus, backends, engines, models, store)
    run_id = jobs.check_run_id(run_id or jobs.new_run_id())
    if executor == EXECUTOR_LOCAL:
        _submit_local(spec, run_id, secrets_file, output_format)
        return
    _cluster_spec(spec)
    manifests = jobs.build_run_manifests(spec, run_id=run_id)
    checks.require_valid(manifests)
    from dooly.fleet.controller import FleetController

    controller = FleetController.connect(spec.namespace, kubeconfig=kubeconfig, context=context)
    names = controller.submit(manifests)
    if not wait_:
        if output_format == "json":
            emit_json({"run_id": run_id, "namespace": spec.namespace, "jobs": names})
        else:
            click.echo(f"run {run_id}: created {len(names)} Jobs in namespace {spec.namespace}")
            click.echo(f"follow it (and start the merge when profiling ends): dooly fleet wait --run-id {run_id}")
        return
    _wait_and_report(controller, run_id, timeout, poll, output_format)


def _submit_local(spec: FleetSpec, run_id: str, secrets_file: str | None, output_format: str) -> None:
    if len(spec.gpu_types) > 1:
        names = ", ".join(g.name for g in spec.gpu_types)
        raise DoolyError(f"the local executor runs on this machine only: pick one GPU type with --gpu ({names})")
    manifests = [*jobs.build_profile_jobs(spec, run_id=run_id), jobs.build_merge_job(spec, run_id=run_id)]
    checks.require_valid(manifests)
    executor = LocalExecutor(secrets_file=secrets_file)
    env = dict(os.environ)
    for manifest in manifests:
        executor.check_job(manifest, env=env)
    # Like the cluster: the merge runs after every profiling Job, whatever became of them.
    results = [executor.run_job(manifest, env=env) for manifest in manifests]
    _report_local(run_id, results, output_format)
    if not all(r.succeeded for r in results):
        raise click.exceptions.Exit(RUN_FAILED_EXIT_CODE)


def _report_local(run_id: str, results: list[JobResult], output_format: str) -> None:
    if output_format == "json":
        emit_json({
            "run_id": run_id,
            "succeeded": all(r.succeeded for r in results),
            "jobs": [
                {"name": r.name, "succeeded": r.succeeded, "reason": r.reason, "seconds": r.seconds,
                 "failed_indexes": r.failed_indexes, "error": _failure_tail(r).removeprefix(": ") or None}
                for r in results
            ],
        })
    else:
        rows = [
            (r.name, r.reason, len(r.pods), ",".join(map(str, r.failed_indexes)) or "-", r.seconds) for r in results
        ]
        click.echo(f"run {run_id} (local)")
        click.echo(format_table(["job", "result", "pods", "failed indexes", "seconds"], rows))
    for result in results:
        if not result.succeeded:
            click.echo(f"error: Job {result.name} failed ({result.reason}){_failure_tail(result)}", err=True)


def _controller(fleet_file, namespace, kubeconfig, context):
    from dooly.fleet.controller import FleetController

    namespace = namespace or FleetSpec.load(fleet_file).namespace
    if not checks.is_dns1123_label(namespace):
        raise DoolyError(f"namespace {namespace!r} is not a DNS-1123 label")
    return FleetController.connect(namespace, kubeconfig=kubeconfig, context=context)


def _status_rows(run) -> list[tuple]:
    return [
        (j.name, j.component, j.gpu_type or "-", j.backend or "-", f"{j.succeeded}/{j.completions}",
         j.failed_indexes or "-", j.phase + (f" ({j.reason})" if j.reason else ""))
        for j in run.jobs
    ]


def _print_status(run, output_format: str) -> None:
    if output_format == "json":
        emit_json(run.to_json())
        return
    state = "timed out" if run.timed_out else ("succeeded" if run.succeeded else ("failed" if run.finished else "running"))
    click.echo(f"run {run.run_id}: {state}")
    click.echo(format_table(["job", "component", "gpu", "backend", "done", "failed indexes", "state"], _status_rows(run)))


def _wait_and_report(controller, run_id: str, timeout: float, poll: float, output_format: str) -> None:
    def progress(run) -> None:
        done = sum(1 for j in run.jobs if j.finished)
        log.info("run %s: %d/%d Jobs finished", run.run_id, done, len(run.jobs))

    run = controller.wait(run_id, timeout_s=timeout, poll_s=poll, on_change=progress)
    _print_status(run, output_format)
    if not run.succeeded:
        raise click.exceptions.Exit(RUN_FAILED_EXIT_CODE)


def _run_id_option(func: Callable) -> Callable:
    return click.option("--run-id", default=None, help="Run id (default: the newest run in the namespace).")(func)


@fleet_group.command("status")
@_cluster_options
@_run_id_option
@output_option
def status_command(fleet_file, namespace, kubeconfig, context, run_id, output_format) -> None:
    """Show the Jobs of a run: shards done, failed indexes, state.

    \b
    Examples:
      dooly fleet status
      dooly fleet status --run-id 20250101-020000 --output json
    """
    controller = _controller(fleet_file, namespace, kubeconfig, context)
    _print_status(controller.status(run_id or controller.latest_run_id()), output_format)


@fleet_group.command("wait")
@_cluster_options
@_run_id_option
@click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_WAIT_TIMEOUT_S, show_default=True,
              help="Seconds to wait at most.")
@click.option("--poll", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              help="Seconds between status polls.")
@output_option
def wait_command(fleet_file, namespace, kubeconfig, context, run_id, timeout, poll, output_format) -> None:
    """Wait for a run: resume its merge Job once every profiling Job has finished, then wait for it.

    Exits 0 when every Job succeeded, 1 when one failed or the timeout passed.

    \b
    Examples:
      dooly fleet wait
      dooly fleet wait --run-id 20250101-020000 --timeout 3600
    """
    controller = _controller(fleet_file, namespace, kubeconfig, context)
    _wait_and_report(controller, run_id or controller.latest_run_id(), timeout, poll, output_format)


@fleet_group.command("logs")
@_cluster_options
@_run_id_option
@click.option("--job", default=None, help="Only the pods of this Job.")
@click.option("--index", type=click.IntRange(min=0), default=None, help="Only the pods of this completion index.")
@output_option
def logs_command(fleet_file, namespace, kubeconfig, context, run_id, job, index, output_format) -> None:
    """Print the logs of a run's pods, every container (init containers first).

    \b
    Examples:
      dooly fleet logs --job dooly-20250101-020000-merge
      dooly fleet logs --run-id 20250101-020000 --index 3 --output json
    """
    controller = _controller(fleet_file, namespace, kubeconfig, context)
    logs = controller.logs(run_id or controller.latest_run_id(), job=job, index=index)
    if output_format == "json":
        emit_json([{"pod": entry.pod, "container": entry.container, "log": entry.text} for entry in logs])
        return
    for entry in logs:
        click.echo(f"==> {entry.pod}/{entry.container} <==")
        click.echo(entry.text, nl=not entry.text.endswith("\n"))


@click.command("demo")
@click.option("--store", default=None,
              help="Store URI (a directory or s3://BUCKET/PREFIX); default: ./demo-out/db.")
@click.option("--model", "models", multiple=True, help="Models instead of the demo's three (repeatable).")
@click.option("--backend", "backends", multiple=True, help="Only this attention backend (repeatable).")
@click.option("--shards", type=int, default=None, help="Pods per profiling Job (default: the demo fleet's 2).")
@click.option("--secrets-file", type=click.Path(dir_okay=False), default=None,
              help="For an s3:// store: YAML {secret: {key: value}} (else AWS_* environment variables).")
@output_option
def demo_command(store, models, backends, shards, secrets_file, output_format) -> None:
    """The whole pipeline on this machine's CPU, run as the Jobs a cluster would run.

    Profiles three small bundled models for two attention backends (each Job split into shards run
    as parallel processes), merges and fits, simulates serving each model, and prints the results
    and the device-seconds that reusing shared operations saved. Running it again reuses everything.

    \b
    Examples:
      dooly demo
      dooly demo --store ./my-db --shards 4 --output json
    """
    from dooly.fleet.demo import DEMO_OUT_DIR, DEMO_STORE_DIR, demo_spec, run_demo
    from dooly.profile.provenance import detect_platform

    store = store or str(Path(DEMO_OUT_DIR) / DEMO_STORE_DIR)
    spec = demo_spec(store, models=models, backends=backends, shards=shards)
    report = run_demo(
        spec,
        executor=LocalExecutor(secrets_file=secrets_file),
        env=dict(os.environ),
        run_id=jobs.new_run_id(),
        platform=detect_platform("cpu"),
    )
    if output_format == "json":
        emit_json(report.to_json())
    else:
        _print_demo(report)
    if report.failed is not None:
        failed = report.failed
        click.echo(f"error: Job {failed.name} failed ({failed.reason}){_failure_tail(failed)}", err=True)
        raise click.exceptions.Exit(RUN_FAILED_EXIT_CODE)


def _failure_tail(result: JobResult) -> str:
    """': <last stderr line of the failed container>' of the Job's last failed pod that said
    something, or ''. Pods stopped by the Job's failure policy after another pod failed may have
    printed nothing yet: the pod that failed first is the one whose words explain the Job."""
    for pod in reversed([p for p in result.pods if not p.succeeded]):
        text = pod.stderr.get(pod.failed_container or "", "") or "".join(pod.stderr.values())
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            return f": {lines[-1]}"
    return ""


def _print_demo(report) -> None:
    from dooly.fleet.demo import flatten_numbers, metric_columns

    click.echo(
        f"dooly demo, run {report.run_id}: {len(report.models)} models x {len(report.backends)} backends, "
        f"store {report.store}"
    )
    click.echo(format_table(
        ["job", "result", "pods", "seconds"], [(j.name, j.reason, len(j.pods), j.seconds) for j in report.jobs]
    ))
    if report.simulations:
        columns = metric_columns(report.simulations)
        rows: list[list[Any]] = []
        for simulation in report.simulations:
            figures = flatten_numbers(simulation.result)
            rows.append([simulation.model, simulation.backend, *(figures.get(c, "-") for c in columns)])
        click.echo("")
        click.echo(format_table(["model", "backend", *columns], rows))
    totals = report.totals
    click.echo("")
    click.echo(
        f"profiled {totals.profiled_signatures} signatures, reused {totals.reused_signatures}; "
        f"device-seconds spent {totals.device_seconds:.1f}, per-model profiling would spend "
        f"{totals.baseline_device_seconds:.1f}: saved {totals.saved_seconds:.1f} "
        f"({100 * totals.saved_fraction:.1f}%) by reuse"
    )
