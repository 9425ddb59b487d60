"""`dooly calibrate`, and how simulate/validate find the store's host-overhead calibration.

A calibration run is a `dooly bench` of a calibration workload (device/workloads/calib.json). The
runs themselves are data too: `--record-only` copies them into the store under
`calibration-runs/` (the profiling pod does that, before any model is fitted), and a later
`--from-store` (the merge Job, after `dooly fit`) fits every recorded run of a key together.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from dooly.errors import DoolyError
from dooly.output import emit_json, format_table, output_option
from dooly.sim.calibration import (
    DEFAULT_KV_REGRESSORS,
    KV_GROUPS,
    KV_REGRESSORS,
    KV_TOKENS,
    MIN_MODELS_FOR_CHOICE,
    CacheGroups,
    Calibration,
    CalibrationKey,
    HostSample,
    find_calibration,
    fit_calibration,
    missing_calibration,
    scheduler_uses_async,
    scheduler_uses_graphs,
    write_calibration,
)
from dooly.sim.step_model import CpuOverheadModel

logger = logging.getLogger(__name__)

T = TypeVar("T")

RUNS_PREFIX = "calibration-runs/"
BENCH_FILE = "bench.json"
ENGINE_FILE = "engine.json"
RUN_FILES = ("requests.parquet", "steps.parquet", BENCH_FILE, ENGINE_FILE)
RUN_DIGEST_CHARS = 16
# A run that records no dtype ran the bench's default.
DEFAULT_RUN_DTYPE = "bfloat16"
# How an async-batching calibration prices CUDA-graph captures: `single`, one capture cost over
# every capture; `split`, the capture cost on shapes the engine had run, and the eager run's
# first-shape host time apart (`new_shape_eager_s`; docs/calibration.md says why it is not the
# default: fitted on one calib run per platform it regresses most async cells).
ASYNC_CAPTURES_SINGLE = "single"
ASYNC_CAPTURES_SPLIT = "split"
ASYNC_CAPTURES = (ASYNC_CAPTURES_SINGLE, ASYNC_CAPTURES_SPLIT)
# How a synchronous calibration prices CUDA-graph captures: `single` (the default), one capture
# cost over every capture; `split`, the capture cost on attention shapes the engine had run
# (another longest-sequence key of the same padded query and KV tokens) and the first run of a
# new attention shape apart (`new_shape_eager_s`; lab/capture_cost.py: a light cell's captures are
# a third known-shape, a calib run's a tenth; it helps the H200 grid, not the H100's 1B light cell).
SYNC_CAPTURES_SINGLE = "single"
SYNC_CAPTURES_SPLIT = "split"
SYNC_CAPTURES = (SYNC_CAPTURES_SINGLE, SYNC_CAPTURES_SPLIT)
ATTENTION_KIND = "attention"
US_PER_S = 1e6
MS_PER_S = 1e3
NS_PER_S = 1e9
BYTES_PER_GB = 1e9


@dataclass
class CalibrationRun:
    """One `dooly bench` calibration run and what it says about itself."""

    directory: Path
    name: str
    model: str
    key: CalibrationKey
    dtype: str
    settings: dict[str, Any]
    warm: bool = False  # served the workload unrecorded first (known once its steps are read)
    # Async batching: extra device time of each step launched after a capture, and the input
    # copy fitted on the run with the bytes its engine copies per launch (known once read).
    stalls: list[float] = field(default_factory=list)
    input_copy: tuple[float, int] | None = None
    # Async batching: its captures at never-run attention shapes, (layers, launch s, device s).
    new_shapes: list[tuple[int, float, float]] = field(default_factory=list)
    # Synchronous loops: per capture, whether its attention shape was new to the engine.
    capture_new: list[bool] = field(default_factory=list)
    # The host it was served from (bench.json `host`; empty for runs recorded before it).
    host: dict[str, Any] = field(default_factory=dict)
    # The store (URI) that names the model where no config file or bundled id does: the config
    # `dooly profile` kept beside its inventories (read only).
    store: str | None = None

    @classmethod
    def load(cls, directory: Path, name: str | None = None, store: str | None = None) -> CalibrationRun:
        """The run in DIRECTORY; its model's KV layer groups come from its config, which STORE
        (a URI) supplies for a model only the store knows (`dooly.sim.options.model_spec`)."""
        from dooly.jsonfile import read_json_object
        from dooly.sim.options import with_model_groups
        from dooly.sim.schedulers import make_scheduler

        bench_path = directory / BENCH_FILE
        if not bench_path.is_file():
            raise DoolyError(f"calibration run {directory} has no {BENCH_FILE} (is it a `dooly bench` output?)")
        bench = read_json_object(bench_path, "bench record")
        engine_path = directory / ENGINE_FILE
        settings = read_json_object(engine_path, "engine settings") if engine_path.is_file() else {}
        stack = bench.get("stack") or {}
        try:
            model, platform, backend, engine = (str(bench[k]) for k in ("model", "platform", "backend", "engine"))
        except KeyError as exc:
            raise DoolyError(f"{bench_path} lacks {exc.args[0]!r}") from None
        # Records of `dooly bench --engine vllm` before it wrote `stack` (data/cpu-vllm's) keep the
        # version at the top and the dtype among the engine arguments.
        version = str(stack.get("engine_version") or bench.get("engine_version") or "")
        if not version:
            raise DoolyError(f"{bench_path} does not record the engine version (stack.engine_version)")
        dtype = str(bench.get("dtype") or (bench.get("settings") or {}).get("dtype") or DEFAULT_RUN_DTYPE)
        scheduler = make_scheduler(engine, with_model_groups(model, engine, settings, store))
        key = CalibrationKey(platform, engine, version, backend, scheduler_uses_graphs(scheduler),
                             scheduler_uses_async(scheduler))
        host = bench.get("host")
        return cls(directory, name or directory.name, model, key, dtype, settings,
                   host=dict(host) if isinstance(host, dict) else {}, store=store)

    def scheduler(self) -> Any:
        from dooly.sim.options import with_model_groups
        from dooly.sim.schedulers import make_scheduler

        return make_scheduler(self.key.engine, with_model_groups(self.model, self.key.engine, self.settings, self.store))


def model_layers(model: str, inventory: dict[str, Any] | None = None, store: str | None = None) -> int:
    """Decoder layers of MODEL: from its config where Dooly knows it (a config file, a bundled id,
    or the config STORE keeps of a model only the store knows; read only), else from its inventory
    in the store (one attention call per layer)."""
    from dooly.sim.options import model_spec

    try:
        return int(model_spec(model, store).config["num_hidden_layers"])
    except (DoolyError, KeyError, TypeError, ValueError):
        if inventory is None:
            raise DoolyError(f"the layer count of {model} is unknown: give a config Dooly can resolve") from None
    count = sum(int(op.get("count", 0)) for op in inventory.get("operations", [])
                if op.get("kind") == ATTENTION_KIND or str(op.get("op_class", "")).startswith(f"{ATTENTION_KIND}:"))
    if count < 1:
        raise DoolyError(f"the store's inventory of {model} holds no attention call to count its layers by")
    return count


def run_samples(run: CalibrationRun, fitted_store: str, cache: dict[tuple[str, ...], Any] | None = None,
                split_new_shapes: bool = False) -> tuple[list[HostSample], list[tuple[HostSample, Any]], int]:
    """Host samples of one run against the fitted step model of its model (cached per model and
    backend across runs), and the model's layer count. An async-batching run's samples come from
    the probe's split (`async_host_samples`, its captures at never-run shapes apart with
    `split_new_shapes`); its post-capture device stalls are in `run.stalls`, its input copy in
    `run.input_copy`."""
    from dooly.fit.source import FittedSource, open_fitted_step
    from dooly.sim.validate import async_host_samples, host_samples, load_ground_truth

    cache = {} if cache is None else cache
    source = FittedSource(store=fitted_store, platform=run.key.platform, backend=run.key.backend, engine=run.key.engine,
                          dtype=run.dtype)
    ident = (fitted_store, run.model, run.key.platform, run.key.backend, run.key.engine, run.dtype)
    if ident not in cache:
        fitted = open_fitted_step(source, run.model)
        cache[ident] = (fitted.step, model_layers(run.model, fitted.inventory, fitted_store))
    step_model, layers = cache[ident]
    truth = load_ground_truth(run.directory)
    if run.key.async_batching:
        scheduler = run.scheduler()
        measured = async_host_samples(truth, scheduler, step_model, num_layers=layers, model=run.model,
                                      split_new_shapes=split_new_shapes)
        samples, captures, run.stalls = measured.samples, measured.captures, measured.stalls
        run.input_copy = (measured.input_copy_s, scheduler.async_input_bytes)
        run.new_shapes = [(layers, launch, device) for launch, device in measured.new_shapes]
    else:
        samples, captures = host_samples(truth, run.scheduler(), step_model, num_layers=layers, model=run.model)
        run.capture_new = capture_novelty([path for _, path in captures])
    run.warm = truth.warm_passes > 0
    return samples, captures, layers


def calibrate_runs(runs: Iterable[CalibrationRun], fitted_store: str, kv_regressors: str = DEFAULT_KV_REGRESSORS,
                   async_captures: str = ASYNC_CAPTURES_SINGLE,
                   sync_captures: str = SYNC_CAPTURES_SINGLE) -> list[Calibration]:
    """One calibration per key among the runs, each fitted on all of that key's runs with the
    KV regressors `kv_regressors` (KV_REGRESSORS) and the capture form, `async_captures`
    (ASYNC_CAPTURES) for async batching, else `sync_captures` (SYNC_CAPTURES)."""
    by_key: dict[CalibrationKey, list[CalibrationRun]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    cache: dict[tuple[str, ...], Any] = {}
    calibrations = []
    for key, group in sorted(by_key.items(), key=lambda item: item[0].label()):
        # Per run, not per name: runs from --ground-truth directories of one basename (repeats of
        # one calib run) share their name.
        group = sorted(group, key=lambda r: r.name)
        measured = [run_samples(run, fitted_store, cache, async_captures == ASYNC_CAPTURES_SPLIT) for run in group]
        inputs = []
        for run, (steps, first_seen, layers) in zip(group, measured, strict=True):
            inputs.append({"run": run.name, "model": run.model, "num_layers": layers, "steps": len(steps) + len(first_seen),
                           "warm": run.warm, **({"host": run.host} if run.host else {})})
        samples, captures = pool_samples([(run.warm, *run_measured[:2]) for run, run_measured in zip(group, measured, strict=True)])
        logger.info("calibrating %s on %d runs (%d steps)", key.label(), len(group), len(samples))
        stalls = [stall for run in group for stall in run.stalls]
        copies = [run.input_copy for run in group if run.input_copy is not None]
        new_shapes = prefer_cold((run.warm, run.new_shapes) for run in group)
        # Aligned with `captures`: prefer_cold keeps the same runs' items.
        capture_new = (prefer_cold((run.warm, run.capture_new) for run in group)
                       if sync_captures == SYNC_CAPTURES_SPLIT and not key.async_batching else [])
        calibrations.append(fit_calibration(key, samples, captures, inputs=inputs, post_capture=stalls,
                                            kv_regressors=kv_regressors, input_copies=copies, new_shapes=new_shapes,
                                            capture_new=capture_new))
    return calibrations


def capture_novelty(paths: Iterable[Any]) -> list[bool]:
    """Per capture of one run, in step order: whether no earlier capture of the run was of its
    attention shape (`CpuOverheadModel.attention_shape`: engine path, padded query and KV tokens).
    Every graph-replayed step's shape was captured first, so that is the engine's first run of it."""
    from dooly.sim.step_model import CpuOverheadModel

    seen: set[tuple[str, int, int]] = set()
    out = []
    for path in paths:
        shape = CpuOverheadModel.attention_shape(path)
        out.append(shape not in seen)
        seen.add(shape)
    return out


def pool_samples(runs: Iterable[tuple[bool, list[HostSample], list[tuple[HostSample, Any]]]]
                 ) -> tuple[list[HostSample], list[tuple[HostSample, Any]]]:
    """All runs' ordinary steps, and the graph captures to price captures by (`prefer_cold`)."""
    runs = list(runs)
    samples = [sample for _, steps, _ in runs for sample in steps]
    return samples, prefer_cold((warm, first_seen) for warm, _, first_seen in runs)


def prefer_cold(runs: Iterable[tuple[bool, Sequence[T]]]) -> list[T]:
    """The capture observations (captures, first-shape launches) to price by, from (warm, items)
    per run: a run served warm (`dooly bench --warm-passes`) captured most shapes before recording,
    so its first-seen shapes are captures or not depending on the warm pass's timing. Its items are
    left out when a cold run of the key has any; without one they are the only ones there are."""
    runs = list(runs)
    cold = any(items for warm, items in runs if not warm)
    return [item for warm, items in runs if not (warm and cold) for item in items]


# ---------------------------------------------------------------------------------------------
# Calibration runs kept in the store
# ---------------------------------------------------------------------------------------------


def _run_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in RUN_FILES:
        path = directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:RUN_DIGEST_CHARS]


def record_run(store: Any, run: CalibrationRun) -> str:
    """Copy a run into the store (content-addressed: recording it twice writes it once). The
    bench record goes last, so a run is listed only once its tables are there."""
    from dooly.store.keys import escape_value

    prefix = f"{RUNS_PREFIX}{run.key.prefix()[len('calibrations/'):]}{escape_value(run.name)}-{_run_digest(run.directory)}/"
    for name in RUN_FILES:
        path = run.directory / name
        if path.is_file():
            store.put_file(prefix + name, path)
    return prefix


def stored_runs(store: Any, workdir: Path, models_store: str | None = None) -> list[CalibrationRun]:
    """Every complete run recorded in the store, downloaded under `workdir`; their models named
    as `CalibrationRun.load` names them with `models_store`."""
    prefixes = sorted({key.rsplit("/", 1)[0] + "/" for key in store.list_keys(RUNS_PREFIX) if key.endswith("/" + BENCH_FILE)})
    runs = []
    for index, prefix in enumerate(prefixes):
        local = workdir / f"run-{index:05d}"
        local.mkdir(parents=True)
        for name in RUN_FILES:
            try:
                (local / name).write_bytes(store.get_bytes(prefix + name))
            except FileNotFoundError:
                continue
        runs.append(CalibrationRun.load(local, name=prefix[len(RUNS_PREFIX):].rstrip("/").rsplit("/", 1)[-1],
                                        store=models_store))
    return runs


# ---------------------------------------------------------------------------------------------
# dooly calibrate
# ---------------------------------------------------------------------------------------------


@click.command("calibrate")
@click.option("--store", required=True, metavar="URI", help="Latency database to write the calibration to.")
@click.option("--ground-truth", "truth_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Calibration run from `dooly bench` (repeat the flag; runs of several models make one calibration).")
@click.option("--from-store", is_flag=True, help=f"Also fit every run recorded in the store ({RUNS_PREFIX}).")
@click.option("--record-only", is_flag=True, help="Copy the --ground-truth runs into the store and fit nothing "
              "(a profiling pod, before the models are fitted; a later --from-store fits them).")
@click.option("--fitted-store", metavar="URI", help="Store whose fitted models predict the device time [default: --store].")
@click.option("--endpoint-url", help="S3 endpoint (else $DOOLY_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL).")
@click.option("--dry-run", is_flag=True, help="Fit and report; write nothing to the store.")
@click.option("--kv-regressors", type=click.Choice(list(KV_REGRESSORS)), default=DEFAULT_KV_REGRESSORS, show_default=True,
              help=f"What the host time per KV token scales with: `{KV_GROUPS}`, the KV index entries of the model's "
                   f"cache layer groups (sliding groups capped at their window); `{KV_TOKENS}`, the KV tokens read "
                   "and those times the layer count (the form of calibrations before it).")
@click.option("--async-captures", type=click.Choice(list(ASYNC_CAPTURES)), default=ASYNC_CAPTURES_SINGLE,
              show_default=True,
              help=f"Async batching's CUDA-graph captures: `{ASYNC_CAPTURES_SINGLE}`, one capture cost over all; "
                   f"`{ASYNC_CAPTURES_SPLIT}`, the capture cost on shapes the engine had run and the first run of a new "
                   "attention shape apart (needs calib runs of several layer counts; docs/calibration.md).")
@click.option("--sync-captures", type=click.Choice(list(SYNC_CAPTURES)), default=SYNC_CAPTURES_SINGLE, show_default=True,
              help=f"A synchronous loop's CUDA-graph captures: `{SYNC_CAPTURES_SINGLE}`, one capture cost over all; "
                   f"`{SYNC_CAPTURES_SPLIT}`, the capture cost on attention shapes the engine had run and the first run "
                   "of a new attention shape apart (docs/calibration.md).")
@output_option
def calibrate_command(store: str, truth_dirs: tuple[str, ...], from_store: bool, record_only: bool,
                      fitted_store: str | None, endpoint_url: str | None, dry_run: bool, kv_regressors: str,
                      async_captures: str, sync_captures: str, output_format: str) -> None:
    """Fit the engine's host overhead for a whole platform from calibration runs of several models.

    For every step of every run: its wall time minus the device time the store's fitted models
    predict for that batch on the engine's path. The residuals of all runs that share a platform,
    engine version, backend and CUDA-graph mode are fitted together, per path, as constant + per
    layer + per sequence + per token + per KV index entry of the model's cache layer groups (+ per
    entry of its sliding groups; `--kv-regressors tokens`: per KV token, + per KV token per layer),
    so that `dooly simulate` and `dooly validate` serve any model of that platform with it, one
    never run included.
    Each call writes a new generation (docs/calibration.md).

    \b
    Example:
      dooly bench meta-llama/Llama-3.2-1B --out gt/1b.calib --workload device/workloads/calib.json
      dooly bench meta-llama/Llama-3.1-8B --out gt/8b.calib --workload device/workloads/calib.json
      dooly calibrate --store ./db --ground-truth gt/1b.calib --ground-truth gt/8b.calib
    """
    from dooly.store.backends import open_store

    if not truth_dirs and not from_store:
        raise DoolyError("give calibration runs with --ground-truth DIR, or --from-store")
    if record_only and (from_store or dry_run):
        raise DoolyError("--record-only copies runs into the store: it does not combine with --from-store or --dry-run")
    target = open_store(store, endpoint_url=endpoint_url, create=False)
    # The fitted store holds the models' inventories, and the configs of models only it knows.
    models_store = fitted_store or store
    runs = [CalibrationRun.load(Path(d), store=models_store) for d in truth_dirs]
    if record_only:
        recorded = [record_run(target, run) for run in runs]
        if output_format == "json":
            emit_json({"recorded": recorded})
            return
        for prefix in recorded:
            click.echo(f"recorded {prefix}")
        return
    with tempfile.TemporaryDirectory(prefix="dooly-calib-") as workdir:
        if from_store:
            runs += stored_runs(target, Path(workdir), models_store)
        if not runs:
            raise DoolyError(f"store {store} records no calibration runs under {RUNS_PREFIX}")
        calibrations = calibrate_runs(runs, models_store, kv_regressors, async_captures, sync_captures)
    written = {} if dry_run else {id(c): write_calibration(target, c) for c in calibrations}
    if output_format == "json":
        emit_json({"calibrations": [{**c.to_dict(), "generation": c.generation, "object": written.get(id(c))}
                                    for c in calibrations]})
        return
    for calibration in calibrations:
        click.echo(calibration_text(calibration))
        click.echo(f"wrote {written[id(calibration)]}" if id(calibration) in written else "(dry run: nothing written)")
        click.echo("")


def calibration_text(calibration: Calibration) -> str:
    """A calibration's terms and per-model fit, as tables."""
    groups = calibration.fit.get("kv_regressors") == KV_GROUPS
    rows = [
        (path, f"{t.constant_s * MS_PER_S:.3f}", f"{t.per_layer_s * US_PER_S:.2f}", f"{t.per_sequence_s * US_PER_S:.2f}",
         f"{t.per_token_s * US_PER_S:.3f}",
         *((f"{t.per_kv_group_token_s * NS_PER_S:.3f}", f"{t.per_kv_sliding_token_s * NS_PER_S:.3f}") if groups else
           (f"{t.per_kv_token_s * NS_PER_S:.3f}", f"{t.per_kv_token_layer_s * NS_PER_S:.4f}")))
        for path, t in sorted(calibration.terms.items())
    ]
    kv_headers = (["per KV group entry (ns)", "per sliding entry (ns)"] if groups
                  else ["per KV token (ns)", "per KV token-layer (ns)"])
    fit_rows = [(model, s["steps"], f"{s['mean_host_ms']:.3f}", f"{s['mean_error_ms']:+.3f}")
                for model, s in calibration.fit.get("models", {}).items()]
    scores = calibration.fit.get("leave_one_model_out_host_error") or {}
    choice = (f"per-layer terms: {'kept' if calibration.fit.get('layer_terms') else 'not used'}"
              + (f" (a left-out model's mean host time off by {100 * scores.get('with_layer_terms', 0):.1f}% with them, "
                 f"{100 * scores.get('pooled', 0):.1f}% pooled)" if scores else f" (fewer than {MIN_MODELS_FOR_CHOICE} models)")
              + f"; KV regressors: {calibration.fit.get('kv_regressors', KV_TOKENS)}")
    return "\n".join([
        calibration.describe(),
        format_table(["path", "constant (ms)", "per layer (us)", "per seq (us)", "per token (us)", *kv_headers], rows),
        f"graph capture: {calibration.graph_capture_s * MS_PER_S:.3f} ms + {calibration.graph_capture_per_layer_s * MS_PER_S:.4f} ms/layer"
        + (f"; device time of the step after a capture: +{calibration.post_capture_device_s * MS_PER_S:.2f} ms"
           f"; input copy per launch: {calibration.input_copy_s * MS_PER_S:.2f} ms at "
           f"{calibration.input_copy_bytes / BYTES_PER_GB:.3f} GB"
           f"; eager run at a new attention shape: {calibration.new_shape_eager_s * MS_PER_S:.2f} ms from its launch"
           if calibration.key.async_batching else
           f"; a new attention shape's capture: +{calibration.new_shape_eager_s * MS_PER_S:.2f} ms"
           if calibration.new_shape_eager_s else ""),
        choice,
        format_table(["model", "steps", "mean host (ms)", "fitted - measured (ms)"], fit_rows),
    ])


# ---------------------------------------------------------------------------------------------
# The overhead simulate and validate add
# ---------------------------------------------------------------------------------------------


def resolve_overhead(path: str | None, no_overhead: bool, step_choice: Any, engine: str, scheduler: Any,
                     model: str | None) -> CpuOverheadModel:
    """The host overhead a simulation adds, and (in its `source`) which one it is.

    --cpu-overhead FILE wins; --no-cpu-overhead adds none, with a warning; the analytic step model
    (tests, demos) adds none; otherwise the store's calibration for the platform, engine, backend
    and the settings' CUDA-graph mode, or an error when the store has none: a prediction without
    the host's share of a step is 10-60% fast, and silently so."""
    if path and no_overhead:
        raise DoolyError("--cpu-overhead and --no-cpu-overhead exclude each other")
    if path:
        model_file = CpuOverheadModel.load(path)
        model_file.source = f"file {path}: {model_file.source}" if model_file.source else f"file {path}"
        return model_file
    if no_overhead:
        logger.warning("--no-cpu-overhead: the engine's host time per step is left out; predictions run fast")
        return CpuOverheadModel.zero()
    if step_choice.analytic or not step_choice.store:
        return CpuOverheadModel(source="none: the analytic step model adds no host overhead unless --cpu-overhead is given")
    from dooly.store.backends import open_store

    graphs = scheduler_uses_graphs(scheduler)
    asynchronous = scheduler_uses_async(scheduler)
    store = open_store(step_choice.store, create=False)
    calibration = find_calibration(store, platform=step_choice.platform or "", engine=engine,
                                   backend=step_choice.backend or "", cuda_graphs=graphs, async_batching=asynchronous)
    if calibration is None:
        raise DoolyError(missing_calibration(platform=step_choice.platform or "", engine=engine,
                                             backend=step_choice.backend or "", cuda_graphs=graphs,
                                             async_batching=asynchronous, file_flag="--cpu-overhead")
                         + f" (store {step_choice.store})")
    if model is None:
        raise DoolyError("the store's calibration needs the MODEL argument (its layer count)")
    inventory = None
    try:
        layers = model_layers(model, store=step_choice.store)
    except DoolyError:
        from dooly.fit.source import open_inventory

        inventory = open_inventory(step_choice.fitted(engine), model)
        layers = model_layers(model, inventory, step_choice.store)
    return calibration.for_model(layers, model, CacheGroups.from_scheduler(scheduler))
