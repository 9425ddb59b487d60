"""`dooly simulate`, `dooly validate` and `dooly export vidur`."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dooly.engines.base import parse_engine_settings
from dooly.errors import DoolyError
from dooly.fit.coverage import require_measured_option
from dooly.jsonfile import read_json_object
from dooly.models.validation import allow_defaults_option
from dooly.output import emit_json, format_table, output_option
from dooly.outputs import writable_dir, writable_file
from dooly.sim.options import StepChoice, model_dims, model_spec, step_model_options
from dooly.sim.options import with_model_groups as _with_model_groups  # dooly.explore.commands imports it from here
from dooly.sim.validate import DEFAULT_TARGET_PCT
from dooly.workload import workload_options

if TYPE_CHECKING:
    from dooly.sim.server_costs import ServerCosts

logger = logging.getLogger(__name__)

DEFAULT_DTYPE = "bfloat16"
REQUESTS_FILE = "requests.parquet"
STEPS_FILE = "steps.parquet"
SUMMARY_FILE = "summary.json"
WORKLOAD_FILE = "workload.json"
SCATTER_FILE = "validation_scatter.png"
# Engine settings `dooly bench` recorded beside its ground truth; used unless --engine-config is given.
BENCH_ENGINE_FILE = "engine.json"
MS_PER_S = 1e3
# `--server-costs store`: the record the --store holds for the ground truth's key.
SERVER_COSTS_FROM_STORE = "store"
INPROCESS_CLIENT = "inprocess"
HTTP_CLIENT = "http"


# ---------------------------------------------------------------------------------------------
# Shared options
# ---------------------------------------------------------------------------------------------


def _engine_options(func):
    options = [
        click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True, help="Which engine's scheduler to mirror."),
        click.option("--engine-config", type=click.Path(dir_okay=False), help="JSON object of engine settings (see `--set`)."),
        click.option(
            "--set",
            "settings",
            multiple=True,
            metavar="KEY=VALUE",
            help="One engine setting, e.g. num_blocks=512, scheduler_type=prefill_first, use_cuda_graph=true "
            "(transformers) or max_num_seqs=128 (vllm); overrides --engine-config.",
        ),
        click.option("--cpu-overhead", type=click.Path(dir_okay=False),
                     help="CPU overhead model JSON (dooly.cpu_overhead/1) [default: the store's calibration for the platform, "
                          "engine, backend and CUDA-graph mode; docs/calibration.md]."),
        click.option("--no-cpu-overhead", is_flag=True, help="Add no host overhead (warns): device time only."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _cpu_overhead(path: str | None, no_overhead: bool, step_choice: StepChoice, engine: str, scheduler: Any,
                  model: str | None) -> Any:
    """--cpu-overhead, else the store's calibration (dooly.sim.calibration_commands.resolve_overhead)."""
    from dooly.sim.calibration_commands import resolve_overhead

    return resolve_overhead(path, no_overhead, step_choice, engine, scheduler, model)


def _checked_settings(engine: str, engine_config: str | None, settings: tuple[str, ...],
                      config_origin: str | None = None) -> dict[str, Any]:
    """--engine-config (or a ground truth's engine.json) merged with --set, every setting checked
    against what the simulator models (`dooly.sim.engine_settings`): one refusing line otherwise."""
    from dooly.sim.engine_settings import check_modelled

    from_file = parse_engine_settings(engine_config, ())
    check_modelled(engine, from_file, config_origin or f"--engine-config {engine_config}")
    flags = parse_engine_settings(None, settings)
    check_modelled(engine, flags, "--set")
    return {**from_file, **flags}


def _clean(value: Any) -> Any:
    """JSON-ready: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * MS_PER_S:.1f}"


def _ms3(value: float | None) -> str:
    return "-" if value is None else f"{value * MS_PER_S:.3f}"


# ---------------------------------------------------------------------------------------------
# dooly simulate
# ---------------------------------------------------------------------------------------------


@click.command("simulate")
@allow_defaults_option
@click.argument("model", required=False)
@step_model_options
@_engine_options
@workload_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), callback=writable_dir, help=f"Write {REQUESTS_FILE}, {STEPS_FILE}, {SUMMARY_FILE}, {WORKLOAD_FILE} here.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), callback=writable_dir, help="Write PNG charts (latency CDFs, batch size over time) here.")
@click.option("--client", type=click.Choice([INPROCESS_CLIENT, HTTP_CLIENT]), default=INPROCESS_CLIENT, show_default=True,
              help="Where requests are timed: in the engine's process, or at a client of its HTTP server (`transformers "
                   "serve`): the --store's server-cost record for the run's key added (its step term to every step, "
                   "its checked offsets to every request; docs/server-costs.md).")
@require_measured_option
@output_option
def simulate_command(
    model: str | None, step_choice: StepChoice, engine: str, engine_config: str | None, settings: tuple[str, ...],
    cpu_overhead: str | None, no_cpu_overhead: bool, workload_args: dict[str, Any], out_dir: str | None,
    plot_dir: str | None, client: str, require_measured: bool, output_format: str,
) -> None:
    """Simulate one serving replica on a workload: TTFT, TPOT, E2E and throughput.

    A discrete-event simulation: requests arrive, a model of the engine's scheduler forms each
    step's batch (chunked prefills, decodes, KV-block allocation, preemption), and the step takes
    the predicted device time for that exact batch plus the engine's CPU overhead.

    \b
    Examples:
      dooly simulate --analytic --requests 1000 --rate 5 --prompt-len uniform:128:2048
      dooly simulate meta-llama/Llama-3.1-8B --store ./db --platform NVIDIA-H100-80GB-HBM3 \\
          --backend 'paged|sdpa' --workload chat.json --set num_blocks=2048 --out results/
      dooly simulate --analytic --engine vllm --set max_num_seqs=128 --trace splitwise_conv.csv
      dooly simulate ./my-moe/config.json --store ./db --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa'

    MODEL is a bundled id, a config.json, a directory holding one, or an id the store holds; a
    model the store has no inventory of is traced on the CPU (nothing is written to the store).
    With --store, the output says per phase how much of the simulated device time is measured
    and which operations are estimated (class regressor, or the family fallback for an op class
    never profiled on the platform); --require-measured makes any estimate an error.
    """
    from dooly.sim.schedulers import make_scheduler
    from dooly.sim.simulator import simulate
    from dooly.workload import generate_requests, spec_from_options

    spec = spec_from_options(**workload_args)
    from dooly.sim.engine_settings import platform_defaults

    checked = {**platform_defaults(engine, step_choice.backend), **_checked_settings(engine, engine_config, settings)}
    scheduler = make_scheduler(engine, _with_model_groups(model, engine, checked, step_choice.store))
    step_model = step_choice.step_model(model, engine)
    fitted = hasattr(step_model, "coverage_by_phase")
    if require_measured:
        if not fitted:
            raise DoolyError("--require-measured needs fitted models (--store), not --analytic")
        from dooly.fit.coverage import check_measured

        check_measured(step_model, str(model), step_choice.fitted(engine))
    overhead = _cpu_overhead(cpu_overhead, no_cpu_overhead, step_choice, engine, scheduler, model)
    server_costs = _client_server_costs(client, step_choice, engine, scheduler)
    if server_costs is not None:
        overhead = server_costs.overhead_for(overhead, str(model), step_choice.store)
    reqs = generate_requests(spec)
    result = simulate(reqs, scheduler, step_model, overhead, record_batches=fitted)
    if server_costs is not None:
        result.requests = server_costs.apply(result.requests)
    summary = _clean(result.summary())
    summary["workload"] = spec.to_dict()
    summary["cpu_overhead"] = overhead.source
    summary["client"] = client
    summary["server_costs"] = _server_costs_payload(server_costs)
    if fitted:
        from dooly.fit.coverage import coverage_payload

        coverage = step_model.coverage_of_phases(result.batch_phases())
        summary["coverage"] = coverage_payload(coverage)
    if out_dir:
        _write_results(Path(out_dir), result, summary, spec)
    if plot_dir:
        from dooly.sim.plots import plot_simulation

        summary["plots"] = [str(p) for p in plot_simulation(result, plot_dir)]
    if output_format == "json":
        emit_json(summary)
        return
    click.echo(_summary_text(summary))
    if fitted:
        from dooly.fit.coverage import coverage_lines

        click.echo("\n".join(coverage_lines(coverage, plan=_plan_command(model, step_choice))))


def _plan_command(model: str | None, step_choice: StepChoice) -> str:
    """The `dooly plan` command that prices measuring what this prediction of MODEL lacks."""
    from dooly.fit.coverage import plan_command

    return plan_command(str(model), step_choice.store, step_choice.platform, step_choice.backend)


def _summary_text(summary: dict[str, Any]) -> str:
    rows = [
        (name.upper(), _ms(stats["mean"]), _ms(stats["p50"]), _ms(stats["p90"]), _ms(stats["p99"]))
        for name, stats in (("ttft", summary["ttft_s"]), ("tpot", summary["tpot_s"]), ("e2e", summary["e2e_s"]))
    ]
    thr = summary["throughput"]
    steps = summary["steps"]
    lines = [
        format_table(["metric (ms)", "mean", "p50", "p90", "p99"], rows),
        "",
        (
            f"requests: {summary['num_finished']}/{summary['num_requests']} finished in {summary['makespan_s']:.2f} s "
            f"({thr['requests_per_s']:.2f} req/s, {thr['output_tokens_per_s']:.0f} output tok/s, "
            f"{thr['total_tokens_per_s']:.0f} total tok/s)"
        ),
        (
            f"steps: {steps['count']} ({steps['decode']} decode, {steps['prefill']} prefill, {steps['mixed']} mixed; "
            f"{steps['cuda_graph']} CUDA graph), mean {steps['mean_seqs']:.1f} sequences/step; "
            f"preemptions: {summary['preemptions']}"
        ),
        f"engine: {summary['settings']['engine']}; simulated in {summary['simulation_wall_s']:.2f} s",
        f"host overhead: {summary.get('cpu_overhead') or 'none'}",
    ]
    costs = summary.get("server_costs")
    if costs:
        lines.append(f"server costs: {costs['line']} ({costs['record']})")
    return "\n".join(lines)


def _client_server_costs(client: str, step_choice: StepChoice, engine: str, scheduler: Any) -> ServerCosts | None:
    """For `--client http`, the --store's server-cost record for the run's key (the newest engine
    version and generation the store holds, as for its calibration); None in-process."""
    from dooly.sim.calibration import scheduler_uses_async, scheduler_uses_graphs

    if client != HTTP_CLIENT:
        return None
    key = {"platform": step_choice.platform, "engine": engine, "engine_version": None, "backend": step_choice.backend,
           "cuda_graphs": scheduler_uses_graphs(scheduler), "async_batching": scheduler_uses_async(scheduler)}
    costs = _stored_server_costs(step_choice.store, key, "--client http")
    costs.refuse_negative()
    return costs


def _server_costs_payload(costs: ServerCosts | None) -> dict[str, Any] | None:
    """What `dooly simulate` says of the server-cost record it added (None: in-process)."""
    return None if costs is None else costs.applied_payload()


def _write_results(out_dir: Path, result, summary: dict[str, Any], spec) -> None:
    """All result files appear together: written to a temporary directory, then moved in."""
    from dooly.parquetfile import write_compact

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dooly-sim-", dir=out_dir))
    try:
        write_compact(result.requests_table(), staging / REQUESTS_FILE)
        write_compact(result.steps_table(), staging / STEPS_FILE)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        spec.save(staging / WORKLOAD_FILE)
        for name in (REQUESTS_FILE, STEPS_FILE, SUMMARY_FILE, WORKLOAD_FILE):
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# dooly validate
# ---------------------------------------------------------------------------------------------


@click.command("overhead")
@allow_defaults_option
@click.argument("model")
@click.option("--ground-truth", "truth_dirs", required=True, multiple=True, type=click.Path(file_okay=False),
              help="Calibration run(s) from `dooly bench` (repeat the flag for several); each uses its own engine.json.")
@step_model_options
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True, help="Engine whose scheduler model picks each step's path.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), callback=writable_file, help="Write the CPU overhead model JSON here.")
@output_option
def overhead_command(model: str, truth_dirs: tuple[str, ...], step_choice: StepChoice, engine: str, out_path: str, output_format: str) -> None:
    """Measure the engine's per-step overhead from a calibration benchmark.

    For every recorded step: its measured wall time minus the device time the step model
    predicts for that exact batch, on the path the engine took (CUDA graph or not, padding).
    What remains (scheduling, input preparation, launch gaps, sampling, output handling) is
    fitted per path as constant + per sequence + per token + per KV token (non-negative least
    squares), and `dooly simulate` / `dooly validate` add it with --cpu-overhead. Calibrate on
    a workload you do not validate on.

    \b
    Example:
      dooly bench meta-llama/Llama-3.2-1B --out gt/calib --workload device/workloads/calib.json
      dooly overhead meta-llama/Llama-3.2-1B --ground-truth gt/calib --store ./db \\
          --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa' --out overhead.json
      dooly validate meta-llama/Llama-3.2-1B --ground-truth gt/light --cpu-overhead overhead.json ...
    """
    from dooly.sim.schedulers import make_scheduler
    from dooly.sim.validate import calibrate_overhead, load_ground_truth

    step_model = step_choice.step_model(model, engine)
    truths = []
    for directory in truth_dirs:
        recorded = Path(directory) / BENCH_ENGINE_FILE
        settings = read_json_object(recorded, "engine settings") if recorded.is_file() else {}
        scheduler = make_scheduler(engine, _with_model_groups(model, engine, settings, step_choice.store))
        truths.append((load_ground_truth(Path(directory)), scheduler))
    step_source = "the analytic step model" if step_choice.analytic else f"models fitted for {step_choice.platform} / {step_choice.backend}"
    source = f"calibrated on {', '.join(Path(d).name for d in truth_dirs)} against {step_source}"
    fitted = calibrate_overhead(truths, step_model, engine=engine, platform=step_choice.platform or "", source=source)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fitted.save(out)
    payload = {"file": str(out), **fitted.to_dict()}
    if hasattr(step_model, "coverage_by_phase"):
        from dooly.fit.coverage import coverage_payload

        # The device time subtracted from every measured step: how much of it is measured.
        measured_steps = [(s.prefill, s.decode_ctx) for truth, _ in truths for s in truth.steps]
        payload["coverage"] = coverage_payload(step_model.coverage_by_phase(measured_steps))
    if output_format == "json":
        emit_json(payload)
        return
    rows = [
        (key, _ms3(t.constant_s), f"{t.per_sequence_s * 1e6:.2f}", f"{t.per_token_s * 1e6:.3f}", f"{t.per_kv_token_s * 1e9:.3f}")
        for key, t in sorted(fitted.terms.items())
    ]
    click.echo(format_table(["path", "constant (ms)", "per seq (us)", "per token (us)", "per KV token (ns)"], rows))
    if payload.get("coverage"):
        from dooly.fit.coverage import payload_lines

        click.echo("\n".join(payload_lines(payload["coverage"], _plan_command(model, step_choice))))
    click.echo(f"wrote {out}")


@click.command("validate")
@allow_defaults_option
@click.argument("model")
@click.option("--ground-truth", "truth_dirs", required=True, multiple=True, type=click.Path(file_okay=False),
              help=f"Directory from `dooly bench` with {REQUESTS_FILE} and {STEPS_FILE}. Repeat the flag with other runs "
                   "of the same cell: the first is simulated, all give the engine's run-to-run floor.")
@step_model_options
@_engine_options
@click.option("--target-pct", type=float, default=DEFAULT_TARGET_PCT, show_default=True,
              help="Error (percent) within which a summary statistic is 'within target'.")
@click.option("--server-costs", "server_costs_path", metavar="FILE|store",
              help="Server-cost record (`dooly server-costs`; `store`: the --store's record for the ground truth's "
                   "key, `dooly server-costs --save`): its step term added to every simulated step and "
                   "its offsets to every simulated request (each only where it passed its load and model checks and is not "
                   "below zero), "
                   "when the ground truth was timed at an HTTP client. A record whose raw median offset is below "
                   "zero (its HTTP runs were the faster) is refused.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=writable_file, help="Write the predicted-vs-measured scatter PNG here.")
@output_option
def validate_command(
    model: str, truth_dirs: tuple[str, ...], step_choice: StepChoice, engine: str, engine_config: str | None,
    settings: tuple[str, ...], cpu_overhead: str | None, no_cpu_overhead: bool, target_pct: float,
    server_costs_path: str | None, plot_path: str | None, output_format: str,
) -> None:
    """Compare the simulator with a real-engine benchmark of the same workload.

    Re-simulates the measured requests (same arrivals and lengths, same engine settings: the
    ground truth's engine.json unless --engine-config is given; --set overrides either) and
    leads with what planners read: mean, p50 and p90 of TTFT, TPOT and E2E and throughput,
    measured against predicted, beside the engine's own run-to-run floor (the largest difference
    between the runs given with --ground-truth) and a verdict: within target (--target-pct),
    within floor (the miss is the engine's noise), or miss. Then the MAPE of per-request TTFT,
    TPOT and E2E; the error of their distribution (mean, p50, p90, p99); and, replaying every
    measured batch composition through the step model, the MAPE of per-step latency.

    A ground truth recorded with an engine setting the simulator does not model (e.g. vLLM
    async_scheduling=true) is refused, as are such settings given with --engine-config/--set.

    A ground truth timed at an HTTP client (`dooly bench --client http`) also carries the server's
    costs: --server-costs FILE (`dooly server-costs`) adds its per-step host term to every simulated
    step (a /2 record) and its per-request offsets to every simulated request, each offset only
    where it passed its load and model checks and is not below zero (the output says which, and why).

    \b
    Example:
      dooly validate meta-llama/Llama-3.1-8B --ground-truth bench/h100-sdpa --ground-truth bench/h100-sdpa-r2 \\
          --store ./db --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa' --plot scatter.png
    """
    from dooly.sim.engine_settings import check_modelled
    from dooly.sim.schedulers import make_scheduler
    from dooly.sim.validate import check_repeat, load_ground_truth, plot_scatter, validate

    if not target_pct > 0:
        raise DoolyError(f"--target-pct must be > 0, got {target_pct}")
    recorded: list[dict[str, Any]] = []
    for directory in truth_dirs:
        path = Path(directory) / BENCH_ENGINE_FILE
        values = read_json_object(path, "engine settings") if path.is_file() else {}
        check_modelled(engine, values, f"ground truth {path}")
        recorded.append(values)
    for directory, values in zip(truth_dirs[1:], recorded[1:]):
        differing = sorted(k for k in set(values) | set(recorded[0]) if values.get(k) != recorded[0].get(k))
        if differing:
            raise DoolyError(f"--ground-truth {directory} is not a repeat of {truth_dirs[0]}: its engine.json differs in "
                             f"{', '.join(differing)}")
    truths = [load_ground_truth(Path(d)) for d in truth_dirs]
    for directory, repeat in zip(truth_dirs[1:], truths[1:]):
        check_repeat(truths[0], repeat, f"--ground-truth {directory}")
    first_recorded = Path(truth_dirs[0]) / BENCH_ENGINE_FILE
    if engine_config is None and first_recorded.is_file():
        user_settings = _checked_settings(engine, str(first_recorded), settings, f"ground truth {first_recorded}")
    else:
        user_settings = _checked_settings(engine, engine_config, settings)
    scheduler = make_scheduler(engine, _with_model_groups(model, engine, user_settings, step_choice.store))
    step_model = step_choice.step_model(model, engine)
    overhead = _cpu_overhead(cpu_overhead, no_cpu_overhead, step_choice, engine, scheduler, model)
    server_costs, server_costs_line = _server_costs(truth_dirs[0], user_settings, server_costs_path, step_choice.store)
    if server_costs is not None:
        overhead = server_costs.overhead_for(overhead, str(model), step_choice.store)
    report = validate(truths[0], scheduler, step_model, overhead, repeats=truths[1:], target_pct=target_pct)
    if server_costs is not None:
        from dooly.sim.validate import compare_latencies

        report.requests = compare_latencies(truths[0].requests, server_costs.apply(report.result.requests))
    payload = _clean(report.as_dict())
    payload["cpu_overhead"] = overhead.source
    payload["server_costs"] = server_costs_line
    payload["summary"]["ground_truth"] = list(truth_dirs)
    if plot_path:
        payload["plot"] = str(plot_scatter(report, plot_path))
    if output_format == "json":
        emit_json(payload)
        return
    click.echo(_validation_summary_text(payload["summary"]))
    click.echo("")
    rows = []
    for label, stats in (("TTFT", payload["requests"]["ttft"]), ("TPOT", payload["requests"]["tpot"]), ("E2E", payload["requests"]["e2e"]), ("step latency", payload["steps"])):
        if stats:
            rows.append((label, stats["n"], _pct(stats["mape"]), _pct(stats["p50_ape"]), _pct(stats["p90_ape"]), _pct(stats["bias"])))
    click.echo(f"host overhead: {overhead.source or 'none'}")
    if server_costs_line:
        click.echo(f"server costs: {server_costs_line}")
    click.echo("Per request (each request's simulated value against its measured one):")
    click.echo(format_table(["quantity", "n", "MAPE", "p50 APE", "p90 APE", "bias"], rows))
    click.echo("")
    click.echo("Distribution across requests (simulated statistic against measured; error > 0: simulated slower):")
    click.echo(format_table(["statistic", "n", "simulated (ms)", "measured (ms)", "error"], _distribution_rows(payload["distribution"])))
    if payload.get("coverage"):
        from dooly.fit.coverage import payload_lines

        click.echo("")
        click.echo("\n".join(payload_lines(payload["coverage"], _plan_command(model, step_choice))))


def _server_costs(truth_dir: str, settings: dict[str, Any], path: str | None,
                  store: str | None = None) -> tuple[ServerCosts | None, str | None]:
    """For a ground truth timed at an HTTP client, the server's measured terms to simulate
    (`dooly.sim.server_costs`: a per-step host term, added to the host overhead, and per-request
    offsets, added to the simulated requests) and the line that says so; (None, None) for an
    in-process ground truth. `path` is a record's file, or `store`: the record `store` holds for
    the ground truth's key. Terms for another key, or for an in-process ground truth, are refused."""
    from dooly.engines.groundtruth import BENCH_FILE
    from dooly.sim.server_costs import ServerCosts, is_http_run, run_key

    http = is_http_run(truth_dir)
    if path is None:
        return None, ("none added: the ground truth was timed at an HTTP client, the simulation is the engine's alone "
                      "(--server-costs FILE or store adds the server's measured terms)") if http else None
    if not http:
        raise DoolyError(f"--server-costs applies to a ground truth timed at an HTTP client; {truth_dir} was timed "
                         "in-process (its bench.json client is not 'http')")
    key = run_key(read_json_object(Path(truth_dir) / BENCH_FILE, "bench record"), settings)
    if path == SERVER_COSTS_FROM_STORE:
        costs = _stored_server_costs(store, key, f"--server-costs {SERVER_COSTS_FROM_STORE}")
    elif Path(path).is_file():
        costs = ServerCosts.load(path)
    else:
        raise DoolyError(f"--server-costs {path}: no such file (give a record's file, or "
                         f"'{SERVER_COSTS_FROM_STORE}' for the --store's record)")
    costs.check_key(key, truth_dir)
    costs.refuse_negative()
    for problem in costs.problems:
        logger.warning("server costs %s: %s", costs.source, problem)
    return costs, costs.applied_line()


def _stored_server_costs(store: str | None, key: dict[str, Any], what: str) -> ServerCosts:
    """The store's newest record for `key` (its platform, engine, backend, graph mode and loop; of
    the key's engine version where it names one, else the newest version), or one refusing line."""
    from dooly.sim.server_costs import describe_key, find_server_costs
    from dooly.store.backends import open_store

    if not store:
        raise DoolyError(f"{what} reads the server-cost record of a store: give --store")
    label = describe_key(key)
    costs = find_server_costs(open_store(store, create=False), platform=str(key.get("platform") or ""),
                              engine=str(key.get("engine") or ""), backend=str(key.get("backend") or ""),
                              cuda_graphs=bool(key.get("cuda_graphs")), engine_version=key.get("engine_version") or None,
                              async_batching=bool(key.get("async_batching")))
    if costs is None:
        raise DoolyError(f"store {store} holds no server-cost record for {label}: measure one with `dooly server-costs "
                         f"--http DIR --inprocess DIR --store {store} --save`")
    return costs


def _validation_summary_text(summary: dict[str, Any]) -> str:
    """The planner's table: statistic | measured | predicted | error | engine floor | verdict."""
    from dooly.sim.validate import LATENCY_UNIT

    runs = summary["runs"]
    floor_note = (f"engine floor: the largest difference between the {runs} runs given" if runs > 1
                  else "engine floor: give the cell's repeated runs with --ground-truth to see it")
    rows = []
    for row in summary["rows"]:
        latency = row["unit"] == LATENCY_UNIT
        metric, _, statistic = row["statistic"].partition("_")
        label = f"{metric.upper()} {statistic} (ms)" if latency else f"{row['statistic']} ({row['unit']})"
        value = _ms if latency else _rate_text
        rows.append((label, value(row["measured"]), value(row["predicted"]), _signed_pct(row["error_pct"]),
                     _pct(row["floor_pct"]), row["verdict"]))
    header = (f"Summary: measured = {summary['ground_truth'][0]}; error > 0: simulated slower (latency) or faster "
              f"(throughput); target {summary['target_pct']:g}%; {floor_note}")
    table = format_table(["statistic", "measured", "predicted", "error %", "engine floor %", "verdict"], rows)
    return f"{header}\n{table}"


def _rate_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _distribution_rows(distribution: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row per (latency, statistic) of a validation report's `distribution`."""
    from dooly.sim.validate import DISTRIBUTION_STATISTICS

    rows = []
    for label, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("E2E", "e2e")):
        metric = distribution[key]
        for statistic in DISTRIBUTION_STATISTICS:
            error = metric[statistic] or {}
            rows.append((f"{label} {statistic}", metric["n"], _ms(error.get("predicted_s")), _ms(error.get("measured_s")),
                         _signed_pct(error.get("error_pct"))))
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _signed_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


# ---------------------------------------------------------------------------------------------
# dooly export vidur
# ---------------------------------------------------------------------------------------------


@click.group("export")
def export_group() -> None:
    """Export Dooly's predictions in other simulators' formats."""


def _fitted_export_source(step_choice: StepChoice, engine: str, model: str) -> Any:
    """The fitted models, inventory and a fast per-operation evaluator for an export. MODEL is
    resolved as `dooly simulate` resolves it: the store's inventory, else a CPU trace."""
    from dooly.sim.export_ops import FittedOpSeconds

    fitted = step_choice.fitted_step(model, engine)
    return fitted, FittedOpSeconds(fitted.predictor, fitted.inventory)


def _export_provenance(step_choice: StepChoice, engine: str, fitted: Any, ops: Any) -> dict[str, Any]:
    """What an export's numbers are: the source, and how many operations are estimated."""
    if fitted is None:
        return {"source": "analytic roofline (tests and demos only)"}
    source = fitted.source
    return {
        "source": "fitted",
        "store": source.store,
        "platform": source.platform,
        "engine": source.engine,
        "backend": source.backend,
        "dtype": source.dtype,
        "tp": source.tp,
        "generation": getattr(fitted.predictor, "generation", None),
        "inventory_model_id": fitted.inventory.get("model_id"),
        # Set when the resolver traced the model on the CPU (a model the store never ran).
        "inventory_origin": getattr(fitted, "inventory_origin", "") or "store",
        "op_count": ops.op_count,
        "unseen_count": ops.unseen_count,
    }


def _coverage_text(coverage: dict[str, float | None]) -> str:
    return ", ".join(f"{name} {'-' if share is None else f'{100 * share:.1f}%'}" for name, share in sorted(coverage.items()))


@export_group.command("vidur")
@allow_defaults_option
@click.argument("model")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=writable_dir, help="Vidur checkout (or any directory): files go under data/profiling/.")
@click.option("--device", required=True, help="Vidur device name, e.g. h100 or a100.")
@step_model_options
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True, help="Engine the fitted models were measured on.")
@click.option("--vidur-model", help="Model name as Vidur knows it [default: MODEL].")
@click.option("--network-device", help="Vidur network device name for all_reduce.csv (e.g. h200_pair_nvlink); needed with --tp > 1.")
@click.option("--tables", type=click.Choice(["all", "compute", "network"]), default="all", show_default=True,
              help="Which profiles to write: compute (mlp.csv, attention.csv), network (all_reduce.csv; --tp > 1) or both.")
@click.option("--block-size", type=int, default=16, show_default=True, help="KV block size written to attention.csv (Vidur filters on it).")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Largest token count in mlp.csv and all_reduce.csv.")
@click.option("--max-seq-len", type=int, default=4096, show_default=True, help="Largest context in attention.csv.")
@click.option("--max-batch-size", type=int, default=128, show_default=True, help="Largest decode batch in attention.csv.")
@output_option
def export_vidur_command(
    model: str, out_dir: str, device: str, step_choice: StepChoice, engine: str, vidur_model: str | None,
    network_device: str | None, tables: str, block_size: int, max_tokens: int, max_seq_len: int, max_batch_size: int,
    output_format: str,
) -> None:
    """Write Vidur's profiles (mlp.csv, attention.csv, all_reduce.csv) from Dooly's predictions.

    Vidur then simulates MODEL on DEVICE from Dooly's latency database instead of its own
    profiling runs: point its `--random_forrest_execution_time_predictor_config_*_input_file`
    (or the defaults data/profiling/compute/{DEVICE}/{MODEL} and
    data/profiling/network/{NETWORK_DEVICE}) at the written files. Make the sweep cover Vidur's
    `prediction_max_*` settings (--max-tokens, --max-seq-len and --max-batch-size at least as
    large), or Vidur extrapolates. With --tp N, compute rows are one rank's (key column
    num_tensor_parallel_workers = N) and all_reduce.csv holds the measured collective of N ranks.

    Every column Vidur's own profiler fills is filled (attention_backend holds sarathi's
    AttentionBackend.FLASHINFER; Dooly's backend, the coverage of each file and the Vidur flags
    to set are in dooly_export.json beside the tables). Set Vidur's GQA batching surcharges to 0
    (the flags to pass are printed and kept in dooly_export.json): Dooly's attention rows already
    price the whole batch.

    \b
    Examples:
      dooly export vidur meta-llama/Llama-3.1-8B --device h100 --out ~/vidur \\
          --vidur-model meta-llama/Meta-Llama-3-8B \\
          --store ./db --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa'
      dooly export vidur meta-llama/Llama-3.1-8B --device h200 --network-device h200_pair_nvlink \\
          --tp 2 --tables network --out ~/vidur --store ./db --platform NVIDIA-H200 --backend 'paged|sdpa'
    """
    from dooly.sim.step_model import AnalyticStepModel
    from dooly.sim.vidur import (
        VIDUR_ATTENTION_BACKEND,
        VidurCollectivePredictor,
        VidurOpPredictor,
        VidurSweep,
        analytic_collective_seconds,
        analytic_op_predictor,
        export_vidur,
        export_vidur_network,
        fitted_op_predictor,
        store_collective_predictor,
        vidur_attention_backend,
        vidur_predictor_flags,
        write_export_info,
    )

    tp = step_choice.tp
    if min(block_size, max_tokens, max_seq_len, max_batch_size, tp) < 1:
        raise DoolyError("--block-size, --max-tokens, --max-seq-len, --max-batch-size and --tp must be >= 1")
    network = tables in ("all", "network") and tp > 1
    if tables == "network" and tp < 2:
        raise DoolyError("--tables network needs --tp 2 or more: all_reduce.csv is a tensor-parallel profile")
    if network and not network_device:
        raise DoolyError("--tp > 1 writes all_reduce.csv: name Vidur's network device with --network-device")
    dims = model_dims(model, step_choice.store)
    step_choice.check()
    # Each table's predictor; the compute one is left unset when only the network table is asked for.
    predict: VidurOpPredictor | None = None
    collective: VidurCollectivePredictor
    fitted = ops = None
    if step_choice.analytic:
        analytic_model = AnalyticStepModel(dims=dims, tp=tp)
        predict = analytic_op_predictor(analytic_model)
        collective = functools.partial(analytic_collective_seconds, analytic_model)
        backend_cell = VIDUR_ATTENTION_BACKEND
    else:
        fitted, ops = _fitted_export_source(step_choice, engine, model)
        if tables != "network":
            predict = fitted_op_predictor(ops, fitted.inventory, dims.num_layers)
        collective = store_collective_predictor(fitted.predictor, fitted.inventory)
        backend_cell = vidur_attention_backend(step_choice.backend or "")
    sweep = VidurSweep(max_tokens=max_tokens, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    name = vidur_model or dims.name
    written = []
    if tables in ("all", "compute"):
        assert predict is not None, "set above for every table choice but network"
        written += export_vidur(predict, dims, out_dir, device, name, block_size=block_size, backend=backend_cell,
                                sweep=sweep, tp=tp)
    if network:
        assert network_device is not None, "checked above: --tp > 1 needs --network-device"
        written += export_vidur_network(collective, dims, out_dir, network_device, tp, sweep=sweep)
    coverage = dict(predict.coverage.as_dict()) if predict is not None and hasattr(predict, "coverage") else {}
    info = {
        **_export_provenance(step_choice, engine, fitted, ops),
        "model": dims.name or model,
        "vidur_model": name,
        "device": device,
        "network_device": network_device,
        "attention_backend": backend_cell,
        "coverage": coverage,
        "vidur_flags": [
            "--replica_config_model_name", name, "--replica_config_device", device,
            "--replica_config_tensor_parallel_size", str(tp),
            *vidur_predictor_flags(max_tokens=max_seq_len, max_batch_size=max_batch_size, max_chunk=max_tokens),
        ],
        "files": [str(p) for p in written],
    }
    if written:
        info_path = write_export_info(written[0].parent, info)
        info["files"].append(str(info_path))
    if output_format == "json":
        emit_json({**info, "files": info["files"], "tp": tp})
        return
    for path in info["files"]:
        click.echo(f"wrote {path}")
    if coverage:
        click.echo(f"measured share of predicted time: {_coverage_text(coverage)} "
                   f"({info['unseen_count']} of {info['op_count']} operations estimated)")
    click.echo("Vidur flags: " + " ".join(info["vidur_flags"]))


@export_group.command("llmservingsim")
@click.argument("model")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="LLMServingSim checkout (or any directory): files go under profiler/perf/ and configs/model/.")
@click.option("--hardware", required=True, help="LLMServingSim hardware label (the cluster config's `hardware`), e.g. H100.")
@step_model_options
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True, help="Engine the fitted models were measured on.")
@click.option("--sim-model", help="Model name as LLMServingSim knows it (its configs/model/ path) [default: MODEL's id].")
@click.option("--max-tokens", type=int, default=8192, show_default=True, help="Largest token count in dense.csv (LLMServingSim's max_num_batched_tokens).")
@click.option("--max-seqs", type=int, default=256, show_default=True, help="Largest sequence count in per_sequence.csv and decode count in attention.csv.")
@click.option("--max-chunk", type=int, default=2048, show_default=True, help="Largest prefill chunk in attention.csv.")
@click.option("--max-kv", type=int, default=16384, show_default=True, help="Largest cached context in attention.csv.")
@click.option("--block-size", type=int, default=16, show_default=True, help="KV block size recorded in meta.yaml.")
@output_option
def export_llmservingsim_command(
    model: str, out_dir: str, hardware: str, step_choice: StepChoice, engine: str, sim_model: str | None,
    max_tokens: int, max_seqs: int, max_chunk: int, max_kv: int, block_size: int, output_format: str,
) -> None:
    """Write an LLMServingSim profile bundle (dense, per-sequence and attention latencies) from
    Dooly's fitted models.

    LLMServingSim then prices GPU iterations of MODEL on HARDWARE from Dooly's database instead
    of its vLLM profiler: run it with `--hardware HARDWARE --model-name SIM_MODEL` and the
    cluster config's `hardware` set to HARDWARE. Per-layer times are one rank's for --tp N (in
    tp{N}/); LLMServingSim adds the all-reduces itself from its network model. The decode-skew
    correction is off (skew_fit.enabled: false in meta.yaml).

    \b
    Example:
      dooly export llmservingsim meta-llama/Llama-3.1-8B --hardware H100 --out ~/LLMServingSim \\
          --store ./db --platform NVIDIA-H100-80GB-HBM3 --backend 'paged|sdpa'
    """
    from dooly.sim.llmservingsim import BundleTarget, ServingSimGrid, export_llmservingsim, variant_of

    if step_choice.analytic:
        raise DoolyError("export llmservingsim needs fitted models (--store): its tables are per-operation sums")
    if block_size < 1:
        raise DoolyError("--block-size must be >= 1")
    grid = ServingSimGrid(max_tokens=max_tokens, max_seqs=max_seqs, max_chunk=max_chunk, max_kv=max_kv)
    spec = model_spec(model, step_choice.store)
    step_choice.check()
    fitted, ops = _fitted_export_source(step_choice, engine, model)
    name = sim_model or spec.model_id
    target = BundleTarget(Path(out_dir), hardware, name, variant_of(step_choice.dtype), step_choice.tp)
    provenance = _export_provenance(step_choice, engine, fitted, ops)
    written, coverage = export_llmservingsim(ops, fitted.inventory, spec.config, target, grid=grid,
                                             block_size=block_size, provenance=provenance)
    payload = {**provenance, "model": spec.model_id, "sim_model": name, "hardware": hardware,
               "variant": target.variant, "coverage": coverage, "files": [str(p) for p in written]}
    if output_format == "json":
        emit_json(payload)
        return
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"measured share of predicted time: {_coverage_text(coverage)} "
               f"({ops.unseen_count} of {ops.op_count} operations estimated)")


# ---------------------------------------------------------------------------------------------
# dooly validate-steps
# ---------------------------------------------------------------------------------------------


@click.command("validate-steps")
@allow_defaults_option
@click.argument("measured", type=click.Path(dir_okay=False))
@click.option("--analytic", is_flag=True, help="Use the built-in roofline step model (tests and demos only).")
@click.option("--store", metavar="URI", help="Latency database with fitted models.")
@click.option("--model", "model", metavar="MODEL", help="Model whose inventory to use [default: the measured document's].")
@click.option("--platform", metavar="P", help="Platform of the fitted models [default: where the steps were measured].")
@click.option("--backend", metavar="B", help="Attention backend [default: the measured document's].")
@click.option("--dtype", help="Model dtype [default: the measured document's].")
@click.option("--tp", type=int, help="Tensor-parallel degree [default: the measured document's].")
@click.option("--interconnect", metavar="LABEL", help="Topology label of the collectives [default: the measured machine's].")
@click.option("--engine", default="transformers", show_default=True, help="Engine the fitted models were measured on.")
@click.option("--timing", type=click.Choice(["graph", "eager"]), default="graph", show_default=True,
              help="Compare with CUDA-graph replays (device time) or eager steps.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), callback=writable_file, help="Write the comparison JSON here.")
@output_option
def validate_steps_command(measured, analytic, store, model, platform, backend, dtype, tp, interconnect, engine, timing,
                           out_path, output_format) -> None:
    """Compare composed step predictions with real engine steps from `dooly measure-steps`.

    Each measured batch composition is predicted by the step model (for --tp N: one rank's ops
    from a --tp N trace plus its collectives) and compared with the measured step; the report
    gives the MAPE over all compositions and per kind (prefill, decode, mixed).

    \b
    Example:
      dooly validate-steps steps.tp2.json --store ./db     # platform, backend, tp from the file
    """
    from dooly.sim.validate import compare_measured_steps, read_measured_steps

    document = read_measured_steps(measured)
    model = model or document["model_id"]
    tp = tp or int(document.get("tp", 1))
    backend = backend or document.get("backend")
    dtype = dtype or document.get("dtype", DEFAULT_DTYPE)
    platform = platform or document.get("platform")
    if interconnect is None and tp > 1 and store:
        interconnect = (document.get("topology") or {}).get("label")
    choice = StepChoice(analytic=analytic, store=store, platform=platform, backend=backend, dtype=dtype, tp=tp,
                        interconnect=interconnect)
    report = compare_measured_steps(document, choice.step_model(model, engine), timing)
    report.update({"model_id": document["model_id"], "tp": tp, "platform": platform, "backend": backend,
                   "interconnect": interconnect, "measured": str(measured)})
    report = _clean(report)
    if out_path:
        Path(out_path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if output_format == "json":
        emit_json(report)
        return
    rows = [
        (r["name"], r["kind"], _ms3(r["measured_s"]), _ms3(r["predicted_s"]),
         "-" if r["ape_pct"] is None else f"{r['ape_pct']:.1f}%")
        for r in report["steps"]
    ]
    click.echo(f"{report['model_id']} x{tp} on {platform} ({backend}), measured {timing} steps vs composed prediction")
    click.echo(format_table(["composition", "kind", "measured ms", "predicted ms", "APE"], rows))
    summary_rows = [(kind, s["n"], _pct(s["mape"]), _pct(s["p50_ape"]), _pct(s["bias"])) for kind, s in report["summary"].items()]
    click.echo("")
    click.echo(format_table(["steps", "n", "MAPE", "p50 APE", "bias"], summary_rows))
