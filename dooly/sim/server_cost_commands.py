"""`dooly server-costs`: measure the HTTP server's costs (a per-step host term and per-request
offsets) from paired runs of one cell."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dooly.engines.base import parse_engine_settings
from dooly.engines.groundtruth import BENCH_FILE, ENGINE_FILE
from dooly.errors import DoolyError
from dooly.jsonfile import read_json_object
from dooly.output import emit_json, format_table, output_option
from dooly.sim.options import StepChoice, step_model_options, with_model_groups
from dooly.sim.server_costs import (
    MS_PER_S,
    SCHEMA,
    EngineModels,
    EngineModelsFor,
    OffsetStats,
    ServerCosts,
    describe_key,
    measure_server_costs,
    write_server_costs,
)


def engine_models_for(step_choice: StepChoice, model: str | None, cpu_overhead: str | None) -> EngineModelsFor | None:
    """How to simulate an HTTP run's engine as `dooly validate` would: its engine.json settings,
    its bench.json model (unless MODEL is given) and the step model and host calibration of the
    store for its platform and backend (unless --platform/--backend say otherwise). None when no
    step model was chosen."""
    if not (step_choice.analytic or step_choice.store):
        return None

    def models(directory: Path) -> EngineModels:
        from dooly.sim.calibration_commands import model_layers, resolve_overhead
        from dooly.sim.engine_settings import check_modelled
        from dooly.sim.schedulers import make_scheduler

        bench = read_json_object(directory / BENCH_FILE, "bench record")
        engine = str(bench.get("engine") or "transformers")
        name = model or bench.get("model")
        if not name:
            raise DoolyError(f"{directory / BENCH_FILE} names no model: give --model")
        settings_path = directory / ENGINE_FILE
        settings = parse_engine_settings(str(settings_path), ()) if settings_path.is_file() else {}
        check_modelled(engine, settings, f"ground truth {settings_path}")
        stack = bench.get("stack") or {}
        choice = step_choice.with_(platform=step_choice.platform or stack.get("platform") or bench.get("platform"),
                                   backend=step_choice.backend or stack.get("backend") or bench.get("backend"))
        scheduler = make_scheduler(engine, with_model_groups(str(name), engine, settings, choice.store))
        step_model = choice.step_model(str(name), engine)
        overhead = resolve_overhead(cpu_overhead, False, choice, engine, scheduler, str(name))
        return EngineModels(scheduler, step_model, overhead, model_layers(str(name), store=choice.store))

    return models


def _spread(stats: OffsetStats, digits: int) -> tuple[str, str]:
    """The median and the p10..p90 of one offset, in ms."""
    return (f"{stats.median_s * MS_PER_S:+.{digits}f}",
            f"{stats.p10_s * MS_PER_S:+.{digits}f}..{stats.p90_s * MS_PER_S:+.{digits}f}")


@click.command("server-costs")
@click.option("--http", "http_dirs", multiple=True, required=True, type=click.Path(file_okay=False, exists=True),
              help="A run of `dooly bench --client http` (repeat the flag: one per workload and model).")
@click.option("--inprocess", "inprocess_dirs", multiple=True, required=True,
              type=click.Path(file_okay=False, exists=True),
              help="An in-process run of the same cell (repeat the flag; repeats of one workload are averaged).")
@click.option("--model", help="The served model, to simulate the step term with [default: each HTTP run's bench.json].")
@step_model_options
@click.option("--cpu-overhead", type=click.Path(dir_okay=False, exists=True),
              help="CPU overhead model JSON to simulate with [default: the store's calibration, as `dooly validate`].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help=f"Write the {SCHEMA} record here.")
@click.option("--save", is_flag=True,
              help="Also write the record into the --store as its key's next generation (server-costs/...: what "
                   "`dooly simulate --client http` and `dooly validate --server-costs store` read). A record whose raw "
                   "median offset is negative is refused.")
@click.option("--save-store", metavar="URI",
              help="Write the record into this store instead of the --store (e.g. the unfitted store a fitted copy "
                   "was made from); implies --save.")
@output_option
def server_costs_command(http_dirs: tuple[str, ...], inprocess_dirs: tuple[str, ...], model: str | None,
                         step_choice: StepChoice, cpu_overhead: str | None, out_path: str | None, save: bool,
                         save_store: str | None, output_format: str) -> None:
    """Measure what the engine's HTTP server adds, for `dooly validate --server-costs`.

    Each HTTP run is paired with the in-process runs of its model and workload (same requests,
    same settings, same stack); runs of several models give one record for them all. Where both
    record the engine's steps, the HTTP engine's extra host time per step is the step term (a
    constant, a constant per step kind, or that plus a per-sequence slope: whichever predicts
    held-out classes of steps best), its steps paired step for step where the two engines ran the
    same steps, else batch-matched (each HTTP step against the median in-process step of its kind
    and sequence count; the table's `pairing`). The steps both engines captured a CUDA graph on
    (step for step only) give the capture term: the HTTP capture's extra seconds per decoder layer
    and sequence of its step. Per request, TTFT and TPOT at the HTTP client minus in-process are
    the raw offsets; less what the two terms add to each request when simulated (the step model:
    --store or --analytic, the same `dooly validate` will use), the residual offsets, whose
    medians are the per-request terms.
    The record keeps their spread, each cell's own, the checks it failed (a negative offset, or
    one that moves with the load: docs/server-costs.md) and those it could not run.

    With --save the record also goes into the store (--store, or --save-store) as the next
    generation of its key, where `dooly simulate --client http` and `dooly validate --server-costs
    store` find it (docs/server-costs.md).

    \b
    Example:
      dooly server-costs --http gt/http.heavy --inprocess gt/heavy --store ./db --out server-costs.json
      dooly server-costs --http gt/http.heavy --inprocess gt/heavy --store ./db --save
    """
    target = save_store or (step_choice.store if save else None)
    if save and not target:
        raise DoolyError("--save writes the record into a store: give --store (or --save-store URI)")
    costs = measure_server_costs(http_dirs, inprocess_dirs, engine_models_for(step_choice, model, cpu_overhead))
    if target:
        # Refused before anything is written: a negative record goes nowhere.
        costs.refuse_negative()
    if out_path:
        costs.save(out_path)
        costs.source = out_path
    saved = _save(costs, target) if target else None
    if output_format == "json":
        emit_json({**costs.as_dict(), "saved": saved})
        return
    rows: list[tuple[Any, ...]] = []
    for cell in costs.cells:
        raw_ttft, raw_tpot = cell.raw_ttft or cell.ttft, cell.raw_tpot or cell.tpot
        rows.append((cell.http, len(cell.inprocess), cell.ttft.n, cell.steps, cell.pairing or "none",
                     *_spread(raw_ttft, 1), *_spread(cell.ttft, 1), *_spread(raw_tpot, 2), *_spread(cell.tpot, 2)))
    click.echo(format_table(["HTTP run", "in-process runs", "requests", "paired steps", "pairing", "raw TTFT offset (ms)",
                             "p10..p90", "residual TTFT (ms)", "p10..p90", "raw TPOT offset (ms)", "p10..p90",
                             "residual TPOT (ms)", "p10..p90"], rows))
    click.echo(f"server costs: {costs.describe()}")
    for check in costs.not_run:
        click.echo(f"not run: {check}")
    if saved:
        click.echo(f"saved: store {saved['store']} {saved['object']} (generation {saved['generation']} of "
                   f"{saved['key']})")


def _save(costs: ServerCosts, store_uri: str) -> dict[str, Any]:
    """Write `costs` into the store as its key's next generation; where it went."""
    from dooly.store.backends import open_store

    object_key = write_server_costs(open_store(store_uri, create=False), costs)
    return {"store": store_uri, "object": object_key, "generation": costs.generation, "key": describe_key(costs.key)}
