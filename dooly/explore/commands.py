"""`dooly explore`: which configuration serves a workload under an SLO at the lowest price."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from dooly.errors import DoolyError
from dooly.output import emit_json, output_option
from dooly.workload import workload_options_except

logger = logging.getLogger(__name__)

RESULT_FILE = "explore.json"
TABLE_FILE = "explore.txt"
CSV_FILE = "candidates.csv"
REPORTS_PREFIX = "reports/"
DEFAULT_REPORT_NAME = "explore"
GENERATION_DIGITS = 6
PROGRESS_LOG_EVERY_S = 5.0
# Where the SLO statistics are timed (`--client`; `dooly simulate --client` names them alike).
INPROCESS_CLIENT = "inprocess"
HTTP_CLIENT = "http"
# The status of a candidate `--client http` skips: the store holds no server-cost record for its key.
NO_RECORD_STATUS = "no_server_costs"
COVERAGE_NOTE = ("share of the predicted device time at each candidate's capacity that is measured (the rest: class "
                 "regressors for signatures never profiled, the family fallback for op classes never profiled on "
                 "the platform); 'traced': the store holds no inventory of the model, traced on the CPU")


def parse_overheads(items: tuple[str, ...]) -> dict[str, str]:
    """`--overhead [PLATFORM:]BACKEND[:graphs|nographs]=FILE`, `--overhead *:graphs=FILE` or
    `--overhead FILE` (every candidate) -> lookup keys of `SearchContext.overhead_for`."""
    from dooly.explore.search import GRAPHS, NO_GRAPHS
    from dooly.sim.step_model import CpuOverheadModel

    found: dict[str, str] = {}
    for item in items:
        key, sep, path = item.rpartition("=")
        if not sep:
            key, path = "*", item
        parts = key.split(":")
        if not key or len(parts) > 3 or not all(parts) or (len(parts) == 3 and parts[2] not in (GRAPHS, NO_GRAPHS)):
            raise DoolyError(f"--overhead {item!r}: expected [PLATFORM:]BACKEND[:graphs|nographs]=FILE or FILE")
        if not Path(path).is_file():
            raise DoolyError(f"--overhead {item!r}: file {path} does not exist")
        CpuOverheadModel.load(path)  # malformed files fail here, before any simulation
        found[key] = path
    return found


@click.command("explore")
@click.argument("models", nargs=-1, required=True)
@click.option("--store", "store_uri", required=True, metavar="URI", help="Latency database with fitted models.")
@click.option("--slo", "slos", multiple=True, metavar="METRIC=SECONDS",
              help="Objective, repeatable: {ttft,tpot,e2e}_{mean,p50,p90,p99}=SECONDS, e.g. ttft_p90=0.5.")
@click.option("--platform", "platforms", multiple=True, metavar="P", help="Platform to consider (repeat) [default: all fitted].")
@click.option("--backend", "backends", multiple=True, metavar="B", help="Attention backend (repeat) [default: all fitted].")
@click.option("--engine", "engines", multiple=True, metavar="E", help="Engine (repeat) [default: all fitted].")
@click.option("--dtype", "dtypes", multiple=True, help="Model dtype (repeat) [default: all fitted].")
@click.option("--tp", "tp_text", default="1", show_default=True, metavar="N,N,...",
              help="Tensor-parallel degrees; degrees > 1 need collectives measured on the platform.")
@click.option("--set", "settings", multiple=True, metavar="KEY=V1,V2,...",
              help="Engine setting values to cross (repeat), e.g. num_blocks=2048,4096 use_cuda_graph=false,true.")
@click.option("--prices", "prices_path", type=click.Path(dir_okay=False),
              help="YAML of USD per GPU-hour per platform [default: the packaged EXAMPLE table].")
@click.option("--overhead", "overheads", multiple=True, metavar="[PLATFORM:]BACKEND[:graphs|nographs]=FILE",
              help="Host-overhead file (dooly.cpu_overhead/1) per platform/backend, optionally per CUDA-graph "
                   "mode (use_cuda_graph on or off), or FILE for all (repeat; the most specific key wins); it "
                   "overrides the store's calibration [default: the store's calibration per candidate].")
@click.option("--no-cpu-overhead", is_flag=True,
              help="Add no host overhead (warns): device time only, as `dooly simulate --no-cpu-overhead`.")
@click.option("--client", type=click.Choice([INPROCESS_CLIENT, HTTP_CLIENT]), default=INPROCESS_CLIENT, show_default=True,
              help="Where the SLO statistics are timed: in the engine's process, or at a client of its HTTP server "
                   "(`transformers serve`): each candidate gets the store's server-cost record for its key (platform, "
                   "engine, backend, graph mode, loop; newest version and generation), its step term added to every "
                   "step and its checked offsets to every request, as `dooly simulate --client http`. A candidate whose "
                   "key has no record is skipped and listed with the reason; none with one: exit 2.")
@workload_options_except("rate")
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="Stop bisecting when the bracket's hi/lo <= 1 + tolerance.")
@click.option("--min-rate", type=float, help="Lowest rate tried, req/s [default: saturation / 256].")
@click.option("--max-rate", type=float, help="Highest rate considered, req/s [default: saturation throughput].")
@click.option("--jobs", type=int, default=None, help="Worker processes [default: available cores].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help=f"Write {RESULT_FILE}, {TABLE_FILE}, {CSV_FILE} and PNG plots here.")
@click.option("--report", is_flag=True, help="Also write the results to the store's reports/gen-N/NAME/.")
@click.option("--report-name", default=DEFAULT_REPORT_NAME, show_default=True, help="NAME under reports/gen-N/.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write PNG plots with the files.")
@output_option
def explore_command(
    models: tuple[str, ...], store_uri: str, slos: tuple[str, ...], platforms: tuple[str, ...], backends: tuple[str, ...],
    engines: tuple[str, ...], dtypes: tuple[str, ...], tp_text: str, settings: tuple[str, ...], prices_path: str | None,
    overheads: tuple[str, ...], no_cpu_overhead: bool, client: str, workload_args: dict[str, Any], tolerance: float, min_rate: float | None,
    max_rate: float | None, jobs: int | None, out_dir: str | None, report: bool, report_name: str, plots: bool,
    output_format: str,
) -> None:
    """Find the configuration that serves the most under an SLO per dollar.

    Candidates: the cross product of what the store's fitted models can predict (platforms,
    engines, backends, dtypes; TP degrees where collectives are measured) and the engine settings
    given. For each, the largest request rate whose simulated SLO statistics hold (bisection on
    the rate; the workload's lengths and arrival process kept), goodput per GPU and per dollar,
    KV-cache memory and whether weights + KV fit the GPU. The answer: a ranked table, the
    cost-latency Pareto frontier, JSON, CSV and PNG plots. Candidates the store cannot predict are
    listed with the reason.

    A model the store holds no inventory of is traced on the CPU and predicted (coverage beside
    each candidate: the share of its predicted device time that is measured). Host overhead is
    the store's calibration for the candidate's platform, engine, backend and CUDA-graph mode
    (--overhead FILE overrides it; a candidate with neither is listed as unpredictable).

    Planners' SLOs are usually on what their users see at the server's HTTP client: --client http
    adds the store's server-cost record of each candidate's key (docs/server-costs.md) before the
    SLO statistics are computed; candidates whose key the store measured no record for are skipped,
    each listed with the reason, and if none has one the command exits 2.

    \b
    Example:
      dooly explore meta-llama/Llama-3.1-8B Qwen/Qwen2.5-7B --store ./db \\
          --slo ttft_p90=0.5 --slo tpot_p90=0.05 --backend 'paged|sdpa' --backend 'paged|eager' \\
          --set num_blocks=512,1024 --set use_cuda_graph=false,true --requests 200 --out explore/
    """
    from dooly.explore.candidates import build_space, parse_setting_grid, parse_tp, read_store_facts
    from dooly.explore.hardware import load_prices
    from dooly.explore.search import RateWorkload, SearchContext, default_jobs, parse_slos
    from dooly.models.stored import configs_read_once
    from dooly.workload import spec_from_options

    started = time.perf_counter()
    slo_list = parse_slos(slos)
    tps = parse_tp(tp_text)
    grid = parse_setting_grid(settings)
    prices = load_prices(prices_path)
    overhead_files = parse_overheads(overheads)
    if overhead_files and no_cpu_overhead:
        raise DoolyError("--overhead and --no-cpu-overhead exclude each other")
    if no_cpu_overhead:
        logger.warning("--no-cpu-overhead: the engine's host time per step is left out; capacities run high")
    if not tolerance > 0:
        raise DoolyError(f"--tolerance must be > 0, got {tolerance}")
    for name, value in (("--min-rate", min_rate), ("--max-rate", max_rate)):
        if value is not None and not value > 0:
            raise DoolyError(f"{name} must be a positive rate in requests/s, got {value}")
    if min_rate and max_rate and min_rate >= max_rate:
        raise DoolyError(f"--min-rate {min_rate} must be below --max-rate {max_rate}")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise DoolyError(f"--jobs must be >= 1, got {jobs}")
    if report and not report_name.replace("-", "").replace("_", "").isalnum():
        raise DoolyError(f"--report-name {report_name!r}: use letters, digits, '-' and '_'")
    workload = RateWorkload.from_spec(spec_from_options(**workload_args))

    # A config the store keeps is read once per run, not at every use (KV block groups, memory, inventory,
    # layer count per candidate); the workers forked for the search inherit what was read.
    with configs_read_once():
        facts = read_store_facts(store_uri)
        space = build_space(facts, models, platforms=platforms, engines=engines, backends=backends, dtypes=dtypes,
                            tps=tps, settings=grid)
        if not space.runnable:
            reasons = sorted({reason for _, reason in space.unpredictable})
            detail = "; ".join(reasons[:3]) if reasons else "nothing asked for"
            raise DoolyError(f"empty candidate set: the store can predict none of the {len(space.unpredictable)} "
                             f"candidates ({detail})")
        _check_settings(space.runnable)
        logger.info("explore: %d candidates to search, %d unpredictable (%.1f s)", len(space.runnable),
                    len(space.unpredictable), time.perf_counter() - started)
        context = SearchContext(store=store_uri, slos=slo_list, workload=workload, overheads=overhead_files,
                                model_settings={m: _model_groups(m, store_uri) for m in models}, tolerance=tolerance,
                                min_rate=min_rate, max_rate=max_rate, no_overhead=no_cpu_overhead, client=client)
        memory = _memory(space.runnable, prices, store_uri)
        to_search = [c for c in space.runnable if memory[c].get("fits") is not False]
        skipped = _client_records(to_search, context)
        to_search = [c for c in to_search if c not in skipped]
        logger.info("explore: model settings and memory ready (%.1f s)", time.perf_counter() - started)
        results = _search(to_search, context, jobs)
        logger.info("explore: search done (%.1f s)", time.perf_counter() - started)
        by_candidate = dict(zip(to_search, results, strict=True))
        document = _document(models, store_uri, facts.generation, slo_list, workload, prices, space, memory,
                             by_candidate, time.perf_counter() - started, jobs, skipped)
        if client == HTTP_CLIENT:
            _add_client(document, context, skipped)
    files: list[str] = []
    if out_dir or report:
        files = _write(document, Path(out_dir) if out_dir else None, plots, store_uri if report else None,
                       f"{REPORTS_PREFIX}gen-{facts.generation:0{GENERATION_DIGITS}d}/{report_name}/")
    document["files"] = files
    if output_format == "json":
        emit_json(document)
        return
    from dooly.explore.report import text_report

    click.echo(text_report(document))
    for f in files:
        click.echo(f"wrote {f}")


def _client_records(candidates: list[Any], context: Any) -> dict[Any, str]:
    """`--client http`: the store's server-cost records of the candidates' keys, read once per key
    into `context` (the workers get them with it); returns the candidates skipped, each with why.
    When every candidate would be skipped: one refusing line (exit 2). In-process: nothing."""
    from dooly.explore.search import describe_client_key, resolve_server_costs

    if context.client != HTTP_CLIENT or not candidates:
        return {}
    context.server_costs, skipped = resolve_server_costs(candidates, context)
    if len(skipped) == len(candidates):
        reasons = sorted(set(skipped.values()))
        raise DoolyError(f"--client http: store {context.store} holds no usable server-cost record for any candidate "
                         f"({'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''}); measure one with `dooly "
                         f"server-costs --http DIR --inprocess DIR --store {context.store} --save`")
    for candidate, reason in skipped.items():
        logger.warning("explore --client http: skipping %s: %s", candidate.label(), reason)
    logger.info("explore --client http: server-cost records of %s", ", ".join(
        describe_client_key(k) for k in sorted(context.server_costs)))
    return skipped


def _add_client(document: dict[str, Any], context: Any, skipped: dict[Any, str]) -> None:
    """What `--client http` adds to the document: the client, the records applied (one per key,
    as `dooly simulate` describes them) and the candidates skipped for want of one (listed with
    the unpredictable ones, status `no_server_costs`). In-process documents are left as before."""
    from dooly.explore.search import describe_client_key

    document["client"] = HTTP_CLIENT
    document["server_costs"] = [{"candidates_key": describe_client_key(key), **costs.applied_payload()}
                                for key, costs in sorted(context.server_costs.items())]
    document["unpredictable"] += [{"candidate": c.to_dict(), "label": c.label(), "status": NO_RECORD_STATUS,
                                   "reason": reason, "capacity_rps": None} for c, reason in skipped.items()]


def _check_settings(candidates: list[Any]) -> None:
    """Every engine/settings pair is modelled by the simulator (`dooly.sim.engine_settings`) and
    builds a scheduler (unknown keys, settings not modelled, bad values: exit 2 up front)."""
    from dooly.sim.engine_settings import check_modelled
    from dooly.sim.schedulers import make_scheduler

    for engine, settings_json in sorted({(c.engine, c.settings_json) for c in candidates}):
        values = json.loads(settings_json)
        check_modelled(engine, values, "--set")
        make_scheduler(engine, values)


def _model_groups(model: str, store_uri: str) -> dict[str, Any]:
    """How MODEL's layer groups charge KV blocks (transformers; sliding-window models). MODEL's
    config is its file, its bundled facts or, for a model only the store knows, the config the
    store keeps (read only).

    Only a config with a sliding window in force needs the engine's own grouping, which imports
    transformers (about 10 s on a loaded 2-core machine); full-attention models need nothing."""
    from dooly.sim.options import model_spec

    try:
        config = model_spec(model, store_uri).config
    except DoolyError:
        return {}
    layer_types = config.get("layer_types") or []
    window = config.get("sliding_window")
    if "sliding_attention" not in layer_types and (not window or config.get("use_sliding_window") is False):
        return {}
    from dooly.sim.commands import _with_model_groups

    return _with_model_groups(model, "transformers", {}, store_uri)


def _memory(candidates: list[Any], prices: Any, store_uri: str) -> dict[Any, dict[str, Any]]:
    from dooly.explore.hardware import kv_cache_tokens, memory_verdict, model_memory

    facts: dict[tuple[str, str], Any] = {}
    out = {}
    for c in candidates:
        if (c.model, c.dtype) not in facts:
            facts[(c.model, c.dtype)] = model_memory(c.model, c.dtype, store_uri)
        platform_bytes, source = prices.memory_bytes(c.platform)
        verdict = memory_verdict(facts[(c.model, c.dtype)], platform_bytes, c.tp, kv_cache_tokens(c.engine, c.settings))
        verdict["memory_source"] = source
        out[c] = verdict
    return out


def _search(candidates: list[Any], context: Any, jobs: int) -> list[dict[str, Any]]:
    """run_search with a progress bar on a terminal, log lines otherwise."""
    from dooly.explore.search import run_search

    total = len(candidates)
    if sys.stderr.isatty():
        with click.progressbar(length=total, label="exploring", file=sys.stderr, show_pos=True) as bar:
            return run_search(candidates, context, jobs=jobs, on_done=bar.update)
    done = [0]
    last = [time.perf_counter()]

    def log(n: int) -> None:
        done[0] += n
        now = time.perf_counter()
        if now - last[0] >= PROGRESS_LOG_EVERY_S or done[0] == total:
            logger.info("explore: %d/%d candidates searched", done[0], total)
            last[0] = now

    return run_search(candidates, context, jobs=jobs, on_done=log)


def _document(models, store_uri, generation, slos, workload, prices, space, memory, by_candidate, wall_s, jobs,
              skipped=None) -> dict[str, Any]:
    from dooly.explore.report import SCHEMA, closest_candidate, frontier, price_result, rank

    results = []
    unpredictable = [{"candidate": c.to_dict(), "label": c.label(), "status": "unpredictable", "reason": reason,
                      "capacity_rps": None} for c, reason in space.unpredictable]
    for c in space.runnable:
        if skipped and c in skipped:
            continue  # --client http without a server-cost record: listed by `_add_client`
        found = by_candidate.get(c)
        if found is not None and found["status"] == "unpredictable":
            unpredictable.append(found)
            continue
        if found is None:
            found = {"candidate": c.to_dict(), "label": c.label(), "status": "does_not_fit", "capacity_rps": 0.0,
                     "reason": memory[c].get("reason"), "points": []}
        found["memory"] = memory[c]
        if c in space.notes:
            found["note"] = space.notes[c]
        price_result(found, prices)
        results.append(found)
    ranked = rank(results)
    best = next((r for r in ranked if r.get("rank") == 1), None)
    memo = [r.get("memo", {}) for r in results]
    hits, misses = sum(m.get("hits", 0) for m in memo), sum(m.get("misses", 0) for m in memo)
    return {
        "schema": SCHEMA,
        "models": list(models),
        "store": store_uri,
        "generation": generation,
        "slo": [{"name": s.name, "metric": s.metric, "stat": s.stat, "limit_s": s.limit_s} for s in slos],
        "workload": {**workload.spec, "rate": "searched"},
        "prices": prices.to_dict(),
        "coverage_note": COVERAGE_NOTE,
        "candidates": ranked,
        "unpredictable": unpredictable,
        "best": best,
        "no_candidate_meets_slo": best is None,
        "closest": closest_candidate(results) if best is None else None,
        "frontier": frontier(ranked, prices, slos[0].name),
        "search": {"wall_s": wall_s, "jobs": jobs, "simulations": sum(len(r.get("points", [])) + 1 for r in by_candidate.values()),
                   "step_memo_hits": hits, "step_memo_misses": misses},
    }


def _write(document: dict[str, Any], out_dir: Path | None, plots: bool, store_uri: str | None, prefix: str) -> list[str]:
    """All files appear together (staged, then moved); with a store they are uploaded under `prefix`."""
    from dooly.explore.report import csv_text, text_report

    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dooly-explore-", dir=out_dir))
    written: list[str] = []
    try:
        names = [RESULT_FILE, TABLE_FILE, CSV_FILE]
        (staging / TABLE_FILE).write_text(text_report(document) + "\n")
        (staging / CSV_FILE).write_text(csv_text(document["candidates"], document["unpredictable"],
                                                 server_costs=bool(document.get("client"))))
        if plots and document["best"] is not None:
            from dooly.explore.plots import plot_capacity, plot_frontier

            names += [plot_capacity(document, staging).name, plot_frontier(document, staging).name]
        (staging / RESULT_FILE).write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
        if store_uri:
            from dooly.store.backends import open_store

            store = open_store(store_uri, create=False)
            for name in names:
                store.put_bytes(prefix + name, (staging / name).read_bytes())
                written.append(f"{store_uri.rstrip('/')}/{prefix}{name}")
        if out_dir:
            for name in names:
                os.replace(staging / name, out_dir / name)
                written.append(str(out_dir / name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
