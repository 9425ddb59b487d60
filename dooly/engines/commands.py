"""`dooly bench`: the real engine on a workload, recorded as ground truth for `dooly validate`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click

from dooly.engines.base import parse_engine_settings
from dooly.engines.served_model_cache import (
    BYTES_PER_GB,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_GB,
    MODEL_CACHE_ENV,
    MODEL_CACHE_MAX_GB_ENV,
)
from dooly.errors import DoolyError
from dooly.models.validation import allow_defaults_option
from dooly.output import emit_json, format_table, output_option
from dooly.outputs import check_output_dir, writable_dir
from dooly.workload import workload_options

log = logging.getLogger(__name__)

ENGINE_CHOICES = ("transformers", "vllm")
# How the run is measured: in the engine's process, or at a client of its HTTP server (http_bench).
CLIENTS = ("inprocess", "http")
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
MS_PER_S = 1e3


@click.command("bench")
@allow_defaults_option
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), callback=writable_dir,
              help="Directory for requests.parquet, steps.parquet, engine.json and bench.json.")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="transformers", show_default=True,
              help="Serving engine to run.")
@click.option("--attention", "backend", default=None,
              help="Attention backend (transformers: paged|sdpa [default], paged|eager; not paged|flex_attention, "
                   "which is profile only; vllm: the one its build runs, CPU_ATTN on a CPU).")
@click.option("--device", default="auto", show_default=True, help="auto, cuda or cpu.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16", show_default=True, help="Model dtype.")
@click.option("--engine-config", type=click.Path(dir_okay=False),
              help="JSON object of engine settings (transformers: ContinuousBatchingConfig fields; vllm: "
                   "max_num_batched_tokens, max_num_seqs, block_size, max_model_len, kv_cache_bytes, ...).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="One engine setting, e.g. use_cuda_graph=true, num_blocks=512, scheduler_type=prefill_first.")
@click.option("--warmup-requests", type=int, default=4, show_default=True,
              help="Short requests served before the measured ones (not recorded).")
@click.option("--model-seed", type=int, default=0, show_default=True, help="Seed of the random weights and prompt tokens.")
@click.option("--warm-passes", type=int, default=0, show_default=True,
              help="Serve the workload this many times first, unrecorded, on the same engine: CUDA graphs and "
                   "kernel plans for the shapes it meets are built there, as on a server that has been running. "
                   "Recorded in bench.json; `dooly validate` simulates the same passes.")
@click.option("--client", type=click.Choice(CLIENTS), default="inprocess", show_default=True,
              help="inprocess: the engine in this process, its own token timestamps, per-step records. http: the "
                   "engine's OpenAI-compatible server (`transformers serve --continuous-batching`, or vLLM's "
                   "`vllm serve` with --engine vllm), streaming requests timed at the client (docs/simulate.md).")
@click.option("--server-url", default=None, metavar="URL",
              help="With --client http: an already running server to send the requests to, instead of starting one.")
@click.option("--model-cache", type=click.Path(path_type=Path), envvar=MODEL_CACHE_ENV,
              show_envvar=True, default=None, metavar="DIR",
              help="With --client http: keep the served model (random weights and tokenizer, saved for the server) "
                   "in DIR, one entry per config, dtype, seed, device kind and transformers/torch versions, and serve "
                   "it again in later runs instead of building and saving it each time (an 8B in bfloat16 is 16 GB; "
                   "DIR is kept under --model-cache-max-gb; `dooly model-cache list|clear` shows or empties it). "
                   "Without it, and without the variable, the model is saved to a temporary directory removed after "
                   "the run. The variable is ignored by the other clients and by --server-url.")
@click.option("--model-cache-max-gb", type=click.FloatRange(min=0, min_open=True), envvar=MODEL_CACHE_MAX_GB_ENV,
              show_envvar=True, default=DEFAULT_MAX_GB, show_default=True, metavar="GB",
              help="With --model-cache: the most DIR holds, in GB (10^9 bytes). Before a model is saved there, the "
                   "least recently used entries that no other run is using are evicted until it fits; a model that "
                   "cannot fit (larger than the cap, or the rest held by running runs) is served from a directory of "
                   "the run instead, uncached (bench.json: served_model_cache uncached).")
@click.option("--store", "store_uri", metavar="URI", default=None,
              help="Latency database to look MODEL up in when it is an id or model key only the store knows "
                   "(the config `dooly profile` stored); read only.")
@click.option("--model-index", type=click.IntRange(min=0), default=None, metavar="N",
              help="With several MODELs: serve the one at N modulo their count (a fleet's profiling pods pass their "
                   "shard index, so their calibration runs rotate over the fleet's models).")
@workload_options
@output_option
def bench_command(
    models: tuple[str, ...],
    out_dir: Path,
    engine: str,
    backend: str | None,
    device: str,
    dtype: str,
    engine_config: str | None,
    settings: tuple[str, ...],
    warmup_requests: int,
    model_seed: int,
    warm_passes: int,
    client: str,
    server_url: str | None,
    model_cache: Path | None,
    model_cache_max_gb: float,
    store_uri: str | None,
    model_index: int | None,
    workload_args: dict[str, Any],
    output_format: str,
) -> None:
    """Serve a workload on the real engine and record ground truth (needs the engine; a GPU for
    numbers that mean anything).

    MODEL (a bundled id, a config.json, a directory holding one, or with --store the id or model
    key of a model profiled into it) is built from its config with random weights: timing
    does not depend on the weights, and EOS is disabled so each request generates exactly its
    output length. Requests arrive at their workload times (open loop), described by the same
    flags as `dooly simulate`. Recorded per request: arrival, every token's time, lengths; per
    engine step: the batch composition (prefill chunks with their context, decode contexts), its
    wall time and its split into host preparation, forward and device busy time (CUDA events).
    Several MODELs with --model-index N serve one of them, the N-th modulo their count.

    \b
    Examples:
      dooly bench meta-llama/Llama-3.2-1B --out gt/1b-light --requests 200 --rate 4 \\
          --prompt-len uniform:128:1024 --output-len uniform:32:256
      dooly bench meta-llama/Llama-3.1-8B --attention 'paged|eager' --out gt/8b-heavy \\
          --workload heavy.json --set use_cuda_graph=true
      dooly validate meta-llama/Llama-3.2-1B --ground-truth gt/1b-light --store ./db ...
      dooly bench meta-llama/Llama-3.2-1B --client http --out gt/1b-light-http --workload light.json \\
          --set num_blocks=4096 --set max_batch_tokens=2048
      dooly bench Qwen/Qwen2.5-0.5B --engine vllm --dtype float32 --out gt/vllm-light \
          --workload light.json --set max_num_batched_tokens=256 --set max_num_seqs=16
    """
    from dooly.engines.groundtruth import summarize, write_ground_truth
    from dooly.engines.host_machine import host_machine
    from dooly.models.stored import resolve_model_with_store
    from dooly.store.backends import open_store
    from dooly.workload import generate_requests, spec_from_options

    model = choose_model(models, model_index)
    if warmup_requests < 0:
        raise DoolyError("--warmup-requests must be >= 0")
    if warm_passes < 0:
        raise DoolyError("--warm-passes must be >= 0")
    if warm_passes and engine != "transformers":
        raise DoolyError("--warm-passes applies to the transformers engine (vLLM captures its graphs at start-up)")
    if server_url is not None and client != "http":
        raise DoolyError("--server-url needs --client http")
    if engine != "transformers" and _given("model_cache"):
        raise DoolyError("--model-cache keeps the models transformers serve loads; vLLM's server draws dummy weights "
                         "from the config, so it has none to keep")
    model_cache = served_model_cache_root(model_cache, client, server_url) if engine == "transformers" else None
    if model_cache is None and _given("model_cache_max_gb"):
        raise DoolyError("--model-cache-max-gb needs --client http with --model-cache DIR (or DOOLY_MODEL_CACHE)")
    spec = spec_from_options(**workload_args)
    requests = generate_requests(spec)
    if not requests:
        raise DoolyError("the workload holds no requests")
    store = open_store(store_uri, create=False) if store_uri is not None else None
    model_spec = resolve_model_with_store(model, store)
    engine_settings = parse_engine_settings(engine_config, settings)
    if backend is None:
        from dooly.engines.registry import default_backend

        backend = default_backend(engine)
    if engine == "transformers":
        check_engine_backend(backend)
    started = time.time()
    host = host_machine()
    if engine == "vllm":
        run, provenance = _run_vllm(model_spec, backend, device, dtype, engine_settings, requests, model_seed,
                                    warmup_requests, client, server_url)
    elif client == "http":
        run, provenance = _run_http(model_spec, backend, device, dtype, engine_settings, requests, model_seed,
                                    warmup_requests, warm_passes, server_url, model_cache,
                                    int(model_cache_max_gb * BYTES_PER_GB))
    else:
        run, provenance = _run(engine, model_spec, backend, device, dtype, engine_settings, requests, model_seed,
                               warmup_requests, warm_passes)
    summary = summarize(run.requests, run.steps)
    provenance.update(
        model=model_spec.model_id,
        engine=engine,
        backend=backend,
        dtype=dtype,
        workload=spec.to_dict(),
        requested_settings=engine_settings,
        warm_passes=warm_passes,
        warmup=_warmup_record(engine, warmup_requests),
        client=client,
        host=host,
        engine_details=run.engine_details,
        started_at_unix=started,
        wall_s=time.time() - started,
        summary=summary,
    )
    written = write_ground_truth(out_dir, run.requests, run.steps, run.engine_settings, provenance)
    if summary["failed"] or summary["finished"] < summary["requests"]:
        raise DoolyError(
            f"{summary['requests'] - summary['finished']} of {summary['requests']} requests did not finish "
            f"(files kept in {out_dir} for inspection)"
        )
    payload = {"files": [str(p) for p in written], **summary, "model": model_spec.model_id,
               "platform": provenance["platform"]}
    if output_format == "json":
        emit_json(payload)
        return
    rows = [
        ("requests", f"{summary['finished']}/{summary['requests']}"),
        ("steps", str(summary["steps"])),
        ("TTFT p50 (ms)", _ms(summary["ttft_p50_s"])),
        ("TPOT p50 (ms)", _ms(summary["tpot_p50_s"])),
        ("step p50 (ms)", _ms(summary["step_p50_s"])),
        ("graph captures in run", str(summary["graph_captures"])),
        ("platform", provenance["platform"]),
    ]
    click.echo(format_table(["", model_spec.model_id], rows))
    click.echo(f"wrote {out_dir}")


def served_model_cache_root(model_cache: Path | None, client: str, server_url: str | None) -> Path | None:
    """The served-model cache of a run that starts its own server, checked writable; None for the
    other runs. --model-cache given on the command line to a run that saves no model is refused;
    DOOLY_MODEL_CACHE (exported for whole campaigns) is ignored by such runs."""
    if model_cache is None:
        return None
    if client != "http" or server_url is not None:
        if _given("model_cache"):
            raise DoolyError("--model-cache needs --client http and a server this command starts (not --server-url)")
        return None
    return check_output_dir(model_cache, "--model-cache")


def _given(parameter: str) -> bool:
    """Whether the command line named `parameter` (not its variable or default): a flag is refused
    where it does nothing, a variable exported for a whole campaign is not."""
    import click.core

    return click.get_current_context().get_parameter_source(parameter) == click.core.ParameterSource.COMMANDLINE


def choose_model(models: tuple[str, ...] | list[str], index: int | None) -> str:
    """The MODEL a bench serves: the only one, or with several the one at `index` modulo their
    count (a fleet's shard pods pass their completion index: shard i serves models[i % n])."""
    if not models:
        raise DoolyError("give a MODEL")
    if index is None:
        if len(models) > 1:
            raise DoolyError(f"{len(models)} MODELs given: pick one with --model-index N")
        return models[0]
    if index < 0:
        raise DoolyError("--model-index must be >= 0")
    return models[index % len(models)]


def _run(engine: str, model_spec: Any, backend: str, device: str, dtype: str, engine_settings: dict[str, Any],
         requests: list[Any], seed: int, warmup: int, warm_passes: int = 0) -> tuple[Any, dict[str, Any]]:
    """The transformers engine in this process (dooly.engines.transformers_bench); returns its BenchRun and
    the provenance of where it ran."""
    import torch

    from dooly.models.registry import build_hf_config
    from dooly.profile.provenance import current_stack, detect_device, detect_platform

    resolved_device = detect_device(device)
    platform = detect_platform(resolved_device)
    from dooly.engines.transformers_bench import run_transformers_bench
    from dooly.engines.transformers_cb import engine_version

    hf_config = build_hf_config(model_spec)
    try:
        run = run_transformers_bench(
            hf_config,
            backend,
            requests,
            settings=engine_settings,
            device=resolved_device,
            dtype=getattr(torch, DTYPES[dtype]),
            seed=seed,
            warmup_requests=warmup,
            warm_passes=warm_passes,
        )
    except TypeError as exc:
        raise DoolyError(f"engine settings rejected by ContinuousBatchingConfig: {exc}") from None
    stack = current_stack(
        device=resolved_device,
        platform=platform,
        engine=engine,
        engine_version=engine_version(),
        backend=backend,
        dtype=dtype,
        block_size=int(run.engine_settings.get("block_size", 0)),
    )
    return run, {"platform": platform, "stack": stack.columns()}


def _run_http(model_spec: Any, backend: str, device: str, dtype: str, engine_settings: dict[str, Any],
              requests: list[Any], seed: int, warmup: int, warm_passes: int,
              server_url: str | None, model_cache: Path | None = None,
              model_cache_max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Any, dict[str, Any]]:
    """The transformers engine behind its own HTTP server (dooly.engines.http_bench)."""
    from dooly.engines.http_bench import run_http_bench
    from dooly.engines.transformers_cb import engine_version
    from dooly.models.registry import build_hf_config
    from dooly.profile.provenance import current_stack, detect_device, detect_platform

    resolved_device = detect_device(device)
    platform = detect_platform(resolved_device)
    run = run_http_bench(build_hf_config(model_spec), backend, requests, settings=engine_settings,
                         device=resolved_device, dtype=DTYPES[dtype], seed=seed, warmup_requests=warmup,
                         warm_passes=warm_passes, server_url=server_url, model_cache=model_cache,
                         model_cache_max_bytes=model_cache_max_bytes)
    stack = current_stack(device=resolved_device, platform=platform, engine="transformers",
                          engine_version=engine_version(), backend=backend, dtype=dtype,
                          block_size=int(run.engine_settings.get("block_size", 0)))
    return run, {"platform": platform, "stack": stack.columns()}


def check_engine_backend(backend: str) -> None:
    """Refuse, before anything is built or written, a backend the continuous-batching engine cannot
    serve: ground truth must come from the real engine, and a profile-only backend has none."""
    from dooly.engines.transformers_cb import ENGINE_BACKENDS, PROFILE_ONLY_BACKENDS

    if backend in PROFILE_ONLY_BACKENDS:
        raise DoolyError(f"the engine cannot run {backend}: profile only (it runs {', '.join(ENGINE_BACKENDS)})")
    if backend not in ENGINE_BACKENDS:
        raise DoolyError(f"the continuous-batching engine runs {', '.join(ENGINE_BACKENDS)}, not {backend!r}")


def _run_vllm(model_spec: Any, backend: str, device: str, dtype: str, engine_settings: dict[str, Any],
              requests: list[Any], seed: int, warmup: int, client: str = "inprocess",
              server_url: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The real vLLM engine, in this process (dooly.engines.vllm_bench) or behind its own server
    (dooly.engines.vllm_http_bench): the build installed picks the device."""
    from dooly.engines.vllm_bench import run_vllm_bench, settings_from
    from dooly.engines.vllm_engine import engine_version, platform_backend
    from dooly.engines.vllm_http_bench import run_vllm_http_bench
    from dooly.profile.provenance import current_stack, detect_device, detect_platform

    resolved_device = detect_device(device)
    platform = detect_platform(resolved_device)
    runs = platform_backend()
    if backend != runs:
        raise DoolyError(f"the installed vLLM runs the {runs} attention backend, not {backend!r}")
    try:
        vllm_settings = settings_from(engine_settings, DTYPES[dtype], seed)
    except TypeError as exc:
        raise DoolyError(f"vllm engine settings rejected: {exc}") from None
    if client == "http":
        run = run_vllm_http_bench(model_spec.config, requests, settings=vllm_settings, seed=seed,
                                  warmup_requests=warmup, server_url=server_url)
    else:
        run = run_vllm_bench(model_spec.config, requests, settings=vllm_settings, seed=seed, warmup_requests=warmup)
    stack = current_stack(device=resolved_device, platform=platform, engine="vllm", engine_version=engine_version(),
                          backend=backend, dtype=dtype, block_size=vllm_settings.block_size)
    return run, {"platform": platform, "stack": stack.columns()}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * MS_PER_S:.1f}"


def _warmup_record(engine: str, requests: int) -> dict[str, int] | None:
    """The warm-up requests the harness served before the recorded ones (bench.json `warmup`), for
    the engine whose warm-up is such requests: `dooly validate` serves them first in the simulation,
    so the recorded pass starts with the CUDA graphs they captured, as the engine's did."""
    if engine != "transformers":
        return None
    from dooly.engines.groundtruth import WARMUP_OUTPUT_TOKENS, WARMUP_PROMPT_TOKENS

    return {"requests": requests, "prompt_tokens": WARMUP_PROMPT_TOKENS, "output_tokens": WARMUP_OUTPUT_TOKENS}


# ---------------------------------------------------------------------------------------------
# dooly model-cache
# ---------------------------------------------------------------------------------------------


def _model_cache_dir_option(func: Any) -> Any:
    return click.option("--model-cache", "root", type=click.Path(file_okay=False, path_type=Path), required=True,
                        envvar=MODEL_CACHE_ENV, show_envvar=True, metavar="DIR",
                        help="The served-model cache, as given to `dooly bench --model-cache`.")(func)


def _existing_cache(root: Path) -> Path:
    """A cache root that exists: a mistyped DIR is an error, not an empty cache."""
    root = root.expanduser()
    if not root.is_dir():
        raise DoolyError(f"--model-cache {root}: no such directory")
    return root


def _entries(count: int) -> str:
    return f"{count} {'entry' if count == 1 else 'entries'}"


@click.group("model-cache")
def model_cache_group() -> None:
    """The served-model cache of `dooly bench --client http --model-cache DIR`: list or clear it.

    Each entry is one saved random-weight model (config, dtype, seed, device kind, versions). A run
    that saves a new entry first evicts the least recently used ones until the cache fits under its
    --model-cache-max-gb; an entry a running bench is serving or building is never removed.

    \b
    Examples:
      dooly model-cache list --model-cache /tmp/dooly-model-cache
      DOOLY_MODEL_CACHE=/tmp/dooly-model-cache dooly model-cache clear --output json
    """


@model_cache_group.command("list")
@_model_cache_dir_option
@click.option("--model-cache-max-gb", type=click.FloatRange(min=0, min_open=True), envvar=MODEL_CACHE_MAX_GB_ENV,
              show_envvar=True, default=DEFAULT_MAX_GB, show_default=True, metavar="GB",
              help="The cap the cache's runs keep it under, shown beside its total.")
@output_option
def model_cache_list_command(root: Path, model_cache_max_gb: float, output_format: str) -> None:
    """List the cache's entries, least recently used (the next evicted) first: size, last use, and
    whether a running bench is using it (in use: never evicted) or it is damaged (rebuilt when next
    served)."""
    from dooly.engines.served_model_cache import entry_complete, entry_in_use, format_bytes, list_entries, marker_inputs

    root = _existing_cache(root)
    max_bytes = int(model_cache_max_gb * BYTES_PER_GB)
    rows: list[dict[str, Any]] = []
    for entry in list_entries(root):
        inputs = marker_inputs(entry.path)
        rows.append({
            "name": entry.name,
            "path": str(entry.path),
            "bytes": entry.bytes,
            "last_used_unix": entry.last_used,
            "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used)),
            "in_use": entry_in_use(root, entry.name),
            "complete": inputs is not None and entry_complete(entry.path, inputs),
        })
    total = sum(row["bytes"] for row in rows)
    if output_format == "json":
        emit_json({"root": str(root), "max_bytes": max_bytes, "total_bytes": total, "entries": rows})
        return
    states = [("in use" if r["in_use"] else "idle") + ("" if r["complete"] else ", damaged") for r in rows]
    click.echo(format_table(["entry", "size", "last used", "state"],
                            [(r["name"], format_bytes(r["bytes"]), r["last_used"], state) for r, state in zip(rows, states)]))
    click.echo(f"{_entries(len(rows))}, {format_bytes(total)} of the {format_bytes(max_bytes)} cap in {root}")


@model_cache_group.command("clear")
@_model_cache_dir_option
@output_option
def model_cache_clear_command(root: Path, output_format: str) -> None:
    """Remove every entry no running bench is using, and what crashed runs left half built. Entries
    in use are kept and listed; the next run of a removed model builds it again. The entries' empty
    lock files stay (a waiting run may hold one open)."""
    from dooly.engines.served_model_cache import clear, format_bytes

    root = _existing_cache(root)
    cleared = clear(root)
    evicted_bytes = sum(e.bytes for e in cleared.evicted)
    if output_format == "json":
        emit_json({"root": str(root), "evicted": [e.name for e in cleared.evicted], "evicted_bytes": evicted_bytes,
                   "in_use": [e.name for e in cleared.in_use], "leftover_bytes": cleared.leftover_bytes})
        return
    click.echo(f"removed {_entries(len(cleared.evicted))} ({format_bytes(evicted_bytes)}) and "
               f"{format_bytes(cleared.leftover_bytes)} left by crashed runs from {root}")
    for entry in cleared.in_use:
        click.echo(f"kept {entry.name} ({format_bytes(entry.bytes)}): in use by a running bench")
