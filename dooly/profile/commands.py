"""`dooly plan` and `dooly profile`: what is missing from the latency database, and measuring it."""

from __future__ import annotations

import sys
from typing import Any

import click

from dooly.errors import DoolyError
from dooly.models.validation import allow_defaults_option
from dooly.output import emit_json, format_table, output_option
from dooly.profile.grid import (
    ATTENTION_DESIGNS,
    DEFAULT_MAX_CONTEXT,
    DEFAULT_MAX_KV,
    DEFAULT_MAX_SEQS,
    DEFAULT_MAX_TOKENS,
    GridSpec,
    widen,
)

# The interconnect label of a platform planned from elsewhere: nothing held matches it.
UNKNOWN_INTERCONNECT = "unknown"


def _common(func):
    options = [
        click.argument("models", nargs=-1, required=True),
        click.option("--store", "store_uri", required=True,
                     help="Latency database: a directory (created if missing) or s3://bucket/prefix."),
        click.option("--endpoint-url", default=None, help="S3 endpoint (else $DOOLY_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL)."),
        click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers",
                     show_default=True, help="Serving engine whose forward and attention are profiled."),
        click.option("--attention", "backend", default=None,
                     help="Attention backend (transformers: paged|sdpa [default], paged|eager, paged|flex_attention "
                          "[profile only: the engine cannot serve it]; vllm: the one its build runs, CPU_ATTN on a "
                          "CPU)."),
        click.option("--dtype", default="bfloat16", show_default=True, help="Model dtype."),
        click.option("--tp", type=int, default=1, show_default=True,
                     help="Tensor-parallel degree: profile one rank's operations and its collectives "
                          "(a trace file keeps its own tp)."),
        click.option("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, show_default=True,
                     help="Largest tokens-per-step point of the sweep."),
        click.option("--max-seqs", type=int, default=DEFAULT_MAX_SEQS, show_default=True,
                     help="Largest sequences-per-step point."),
        click.option("--max-kv", type=int, default=DEFAULT_MAX_KV, show_default=True,
                     help="Largest KV tokens read in one step."),
        click.option("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, show_default=True,
                     help="Longest per-sequence context of the attention batches."),
        click.option("--token-budget", "token_budgets", type=int, multiple=True, metavar="N",
                     help="An engine token budget you serve at (transformers' max_batch_tokens, vLLM's "
                          "max_num_batched_tokens; repeatable): a loaded engine's steps hold exactly N query "
                          "tokens, so the sweep reaches N tokens and attention gains mixed and prefill points that "
                          "fill N. The default grid fills 512 and 2048; transformers' own default budget is 8192."),
        click.option("--context", "contexts", type=int, multiple=True, metavar="N",
                     help="A context length your requests reach, prompt plus output (repeatable): attention gains "
                          "chunked-prefill, decode and mixed points at context N, and --max-context is raised so "
                          "decode batches of mean context N fit (--max-kv is not: their KV totals stop at it)."),
        click.option("--attention-grid", type=click.Choice(sorted(ATTENTION_DESIGNS)), default="full", show_default=True,
                     help="Attention batch design: thin-mixed or thin-all measure a subset of the full grid's points "
                          "(about 1/2 or 1/3 of attention's device time), enough to serve a new attention layout; a "
                          "later full plan measures only the rest (docs/unseen.md)."),
        output_option,
        allow_defaults_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _grid(max_tokens: int, max_seqs: int, max_kv: int, max_context: int, attention_grid: str = "full",
          token_budgets: tuple[int, ...] = (), contexts: tuple[int, ...] = ()) -> GridSpec:
    for name, value in (("--max-tokens", max_tokens), ("--max-seqs", max_seqs), ("--max-kv", max_kv),
                        ("--max-context", max_context), *(("--token-budget", b) for b in token_budgets),
                        *(("--context", c) for c in contexts)):
        if value < 1:
            raise DoolyError(f"{name} must be >= 1, got {value}")
    grid = GridSpec(max_tokens=max_tokens, max_seqs=max_seqs, max_kv=max_kv, max_context=max_context,
                    attention=ATTENTION_DESIGNS[attention_grid])
    return widen(grid, token_budgets, contexts)


@click.command("plan")
@_common
@click.option("--platform", default="auto", show_default=True,
              help="Plan for this machine (auto) or name another platform (its rows of any software version count).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def plan_command(models: tuple[str, ...], store_uri: str, endpoint_url: str | None, engine: str, backend: str,
                 dtype: str, tp: int, max_tokens: int, max_seqs: int, max_kv: int, max_context: int,
                 token_budgets: tuple[int, ...], contexts: tuple[int, ...], attention_grid: str, output_format: str,
                 platform: str, device: str) -> None:
    """What profiling MODEL... would measure, and what it would reuse from the store. Measures nothing.

    Each missing point is priced in device-seconds by the kernel latency the store's fitted models
    predict for it (a point past its class's memory wall as one that runs out of memory); a store
    not fitted yet prices every point at its class's mean cost, and the output says which.

    \b
    Examples:
      dooly plan meta-llama/Llama-3.1-8B mistralai/Mistral-7B-v0.3 --store ./db
      dooly plan Qwen/Qwen2.5-7B --store s3://dooly/db --platform NVIDIA-H100-80GB-HBM3 --output json
    """
    from dooly.engines.registry import engine_kind
    from dooly.profile.plan import build_plan
    from dooly.profile.provenance import check_platform_name, current_stack, detect_device, detect_platform
    from dooly.profile.run import trace_all
    from dooly.store.backends import open_store

    kind = engine_kind(engine)
    backend = backend or kind.default_backend
    grid = _grid(max_tokens, max_seqs, max_kv, max_context, attention_grid, token_budgets, contexts)
    device_type = detect_device(device)
    named = platform not in ("auto", "")
    name = check_platform_name(platform) if named else detect_platform(device_type)
    store = open_store(store_uri, endpoint_url=endpoint_url, create=False)
    if tp < 1:
        raise DoolyError(f"--tp must be >= 1, got {tp}")
    traces = trace_all(list(models), backend, dtype, engine, tp, store=store)
    stack = current_stack(device=device_type if not named else "cuda", platform=name, engine=kind.name,
                          engine_version=kind.version(), backend=backend, dtype=dtype, block_size=kind.block_size)
    plan = build_plan(traces, store, stack, grid, software_agnostic=named,
                      comm=_plan_comm_stack(traces, stack, device_type, named))
    summary = {**plan.summary(), "attention_grid": attention_grid, "token_budgets": sorted(set(token_budgets)),
               "contexts": sorted(set(contexts))}
    if output_format == "json":
        emit_json(summary)
        return
    widened = f", token budgets {', '.join(map(str, summary['token_budgets']))}" if token_budgets else ""
    widened += f", contexts {', '.join(map(str, summary['contexts']))}" if contexts else ""
    click.echo(f"platform {summary['platform']}, backend {backend}, attention grid {attention_grid}{widened}: "
               f"{summary['signatures']} signatures, "
               f"{summary['missing_signatures']} missing ({summary['missing_points']} points, about "
               f"{summary['expected_refinement_points']} more where latency bends), "
               f"{summary['held_points']} points held, ~{summary['estimated_device_seconds']:.1f} device-seconds to go")
    estimate = summary["estimate"]
    startups = "".join(f", {c} {seconds:.1f} s" for c, seconds in estimate["startups"].items())
    click.echo(f"estimate: phases {', '.join(estimate['phases'])} of every measurement, priced from {estimate['source']}"
               + (f"; a run's first attention measurement builds the backend's path once (start-up{startups})"
                  if startups else "")
               + (f"; each signature's first point draws its weights ({estimate['builds']['device_seconds']:.1f} s "
                  f"over {estimate['builds']['signatures']} signatures)" if estimate["builds"]["signatures"] else "")
               + f"; not included: {estimate['excludes']}")
    oom = summary["expected_oom_points"]
    click.echo(f"point costs: {estimate['latencies']}"
               + (f"; {oom} points predicted past their class's memory wall, priced as out of memory" if oom else ""))
    failures = summary["expected_failures"]
    if failures["points"] or failures["never_held_points"] or failures["failed_before_points"]:
        click.echo(f"expected failures: {failures['points']} points, {failures['device_seconds']:.1f} device-s of the "
                   f"estimate ({failures['never_held_points']} points of signatures setting a feature no attempt here "
                   f"survived, {failures['failed_before_points']} points that failed before; profile attempts them "
                   f"all); from {estimate['failures']}")
        if failures["causes"]:
            click.echo(f"failure causes in the store: {_causes_text(failures['causes'])}")
    else:
        click.echo(f"expected failures: none among the missing points; from {estimate['failures']}")
    rows = [(m["model"], m["signatures"], m["profiled_signatures"], m["reused_signatures"]) for m in summary["models"]]
    click.echo(format_table(["model", "signatures", "to profile", "reused"], rows))


def _causes_text(causes: list[dict[str, Any]]) -> str:
    """The plan's causes (`Plan.expected_failures`) on one line: each class once, then its causes,
    each with the failed rows it accounts for out of the class's."""
    by_class: dict[str, list[str]] = {}
    for cause in causes:
        by_class.setdefault(cause["op_class"], []).append(
            f"\"{cause['cause']}\" ({cause['attempts']} of {cause['failed_attempts']} failed attempts)")
    return "; ".join(f"{op_class}: {', '.join(texts)}" for op_class, texts in by_class.items())


def _plan_comm_stack(traces: list, stack: Any, device_type: str, named: bool) -> Any:
    """Where collectives would be measured: this machine's interconnect, or for another platform
    an unknown one (its topology cannot be read from here, so its collectives count as missing)."""
    from dooly.distributed import BACKEND_NCCL, detect_topology
    from dooly.profile.provenance import comm_stack

    world = max([trace.tp for trace in traces if trace.collectives] or [0])
    if not world:
        return None
    if named:
        return comm_stack(stack, UNKNOWN_INTERCONNECT, BACKEND_NCCL, "")
    topology = detect_topology(device_type, world)
    return comm_stack(stack, topology.label, topology.backend, topology.comm_version)


@click.command("profile")
@_common
@click.option("--platform", default="auto", show_default=True,
              help="auto names this machine; an explicit name must match it (a GPU cannot be measured remotely).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--samples", type=int, default=None, help="Timed samples per point (default 15 on CUDA, 5 on CPU).")
@click.option("--shard-index", type=int, default=0, show_default=True, help="This worker's index (Indexed Jobs).")
@click.option("--shard-count", type=int, default=1, show_default=True, help="Workers splitting the missing work.")
@click.option("--run-id", default=None, help="Run id stamped on rows and shard names (default: time + random).")
@click.option("--chunk-rows", type=int, default=512, show_default=True, help="Rows per flushed shard.")
@click.option("--progress-interval", type=float, default=None,
              help="Without a terminal, log progress (done/total, device-seconds, ETA) this often, in seconds "
                   "(default $DOOLY_PROGRESS_INTERVAL_S or 30).")
def profile_command(models: tuple[str, ...], store_uri: str, endpoint_url: str | None, engine: str, backend: str,
                    dtype: str, tp: int, max_tokens: int, max_seqs: int, max_kv: int, max_context: int,
                    token_budgets: tuple[int, ...], contexts: tuple[int, ...], attention_grid: str, output_format: str,
                    platform: str, device: str, samples: int | None, shard_index: int, shard_count: int,
                    run_id: str | None, chunk_rows: int, progress_interval: float | None) -> None:
    """Profile MODEL... into the store, measuring only what it does not hold yet.

    Each model is traced (no weights), its operation signatures looked up in the store for this
    platform and software stack, and only the missing (signature, request point) pairs are
    measured: CUDA events on a GPU, process timers on the CPU. Attention is built and run through
    the engine's own code (model attention module, paged KV cache, packed inputs). Rows are
    flushed as Parquet shards as work completes, so a killed run resumes where it stopped.

    \b
    Examples:
      dooly profile meta-llama/Llama-3.1-8B --store ./db
      dooly profile meta-llama/Llama-3.2-1B Qwen/Qwen2.5-7B --store s3://dooly/db --attention paged|eager
      dooly profile ./tiny/config.json --store ./db --max-tokens 64 --max-kv 512 --output json
      dooly profile Qwen/Qwen2.5-0.5B --engine vllm --dtype float32 --store ./db
    """
    from dooly.engines.registry import default_backend
    from dooly.profile.run import ProfileOptions, execute, prepare, total_points
    from dooly.progress import ProgressLog, interval_from_env
    from dooly.store.backends import open_store

    if shard_count < 1:
        raise DoolyError(f"--shard-count must be >= 1, got {shard_count}")
    if samples is not None and samples < 1:
        raise DoolyError(f"--samples must be >= 1, got {samples}")
    if tp < 1:
        raise DoolyError(f"--tp must be >= 1, got {tp}")
    if chunk_rows < 1:
        raise DoolyError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    if progress_interval is not None and not progress_interval > 0:
        raise DoolyError(f"--progress-interval must be > 0 seconds, got {progress_interval}")
    interval = progress_interval if progress_interval is not None else interval_from_env()
    options = ProfileOptions(
        backend=backend or default_backend(engine), engine=engine, dtype=dtype, device=device, platform=platform,
        grid=_grid(max_tokens, max_seqs, max_kv, max_context, attention_grid, token_budgets, contexts), samples=samples,
        shard_index=shard_index, shard_count=shard_count, run_id=run_id, chunk_rows=chunk_rows, tp=tp,
    )
    # Made by the first write: a bad model, name or number found while tracing leaves nothing behind.
    store = open_store(store_uri, endpoint_url=endpoint_url, create=True, defer_create=True)
    plan, device_type = prepare(list(models), store, options)
    if sys.stderr.isatty() and output_format == "text":
        with click.progressbar(length=total_points(plan, options), label="profiling", file=sys.stderr) as bar:
            report = execute(plan, device_type, store, options, progress=lambda points, _seconds: bar.update(points))
    else:
        # No terminal (a pod's log, a pipe): a steady log line instead of a bar.
        progress_log = ProgressLog(total_points(plan, options), interval_s=interval)
        report = execute(plan, device_type, store, options, progress=progress_log)
        progress_log.finish()
    payload = report.to_dict()
    if output_format == "json":
        emit_json(payload)
        return
    _print_report(payload)


def _print_report(payload: dict[str, Any]) -> None:
    click.echo(
        f"run {payload['run_id']} on {payload['platform']} ({payload['backend']}): "
        f"{payload['profiled_signatures']} signatures profiled, {payload['reused_signatures']} reused; "
        f"{payload['measured_points']} points measured ({payload['planned_points']} planned, "
        f"{payload['refinement_points']} refinements; {payload['oom_points']} OOM, {payload['error_points']} errors) "
        f"in {payload['device_seconds']:.1f} device-seconds; profiling each model alone would take "
        f"{payload['baseline_device_seconds']:.1f} ({payload['saving']:.0%} saved)"
    )
    rows = [(m["model"], m["signatures"], m["profiled_signatures"], m["reused_signatures"], m["device_seconds"],
             m["baseline_device_seconds"]) for m in payload["models"]]
    click.echo(format_table(["model", "signatures", "profiled", "reused", "device s", "alone s"], rows))
    phases = payload["device_seconds_by_phase"]
    if phases:
        click.echo("device time by phase: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()))
    click.echo(f"{len(payload['shards'])} shards written")
