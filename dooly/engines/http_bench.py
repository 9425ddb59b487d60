"""Ground truth as users take it: transformers behind its own OpenAI-compatible server, timed at the client.

The in-process harness (`dooly.engines.transformers_bench`) reads the engine's own token
timestamps; a user measures at the client, through the server's HTTP front end, which adds its
costs (tokenization, detokenization, the event loop, SSE framing, the socket). This harness keeps
everything else the same: the model is the same random-weight model (same seed, same device, same
dtype), saved with a word-level tokenizer built here (token id `i` is the word `t{i}`, so a prompt
of N ids is N words and tokenizes back to exactly those N ids: the server sees the same prompts the
in-process harness adds), into a directory of the run removed after it, or with a model cache
(`--model-cache`) into the cache's entry for that model, reused by every later run of the same
model (dooly.engines.served_model_cache). The server must tokenize with that very
tokenizer: transformers' AutoProcessor picks a tokenizer class by model type, and for some (qwen2)
that class rebuilds a BPE from the vocabulary which turns every prompt into zero tokens. So the
launcher hands the handlers the word-level tokenizer by its own class and reports whether a probe
prompt round-trips through what the handlers hold; the client refuses a server whose tokenizer
does not, and a request whose server-counted prompt tokens (`usage.prompt_tokens`) differ from
its workload's.

The server is transformers' own (`transformers serve --continuous-batching`: its FastAPI app,
handlers and engine), started as a subprocess through `dooly.engines.serve_launcher`, which gives
its engine the in-process harness's `ContinuousBatchingConfig(**settings)`, warms it up and starts
it before the server answers, and writes what the engine resolved (attention implementation,
dtype, CUDA graphs, padding, num_blocks, max_batch_tokens, async batching, the generation config).
The run is refused when that differs from what was asked (`settings_mismatches`): an HTTP cell is
only paired with an in-process cell when both ran the same engine. engine.json holds the settings
the server resolved, as the in-process harness writes its own. Or `--server-url` points at a
server already running, whose settings cannot be read from outside: recorded as unverified, with
a warning.

Requests arrive open loop at their workload times, each a streaming `/v1/completions` request
(the client, `dooly.engines.openai_client`, is vLLM's HTTP harness's too); the client stamps its
arrival, every streamed token chunk, and the end. EOS is disabled per
request (`generation_config` with `eos_token_id=-1`, what the in-process harness gives the
engine), so each request generates exactly its output length; a request whose streamed tokens or
whose server-counted tokens (`usage.completion_tokens`) differ from it fails the run.

The server's engine records its steps as the in-process harness records its own (the launcher's
`--steps`, written when the server is stopped); steps.parquet holds those of the recorded pass
(the steps that started at or after its first arrival, on the machine's monotonic clock that both
processes read). With `--server-url` there are none to read: steps.parquet is written empty.
bench.json says `client: http`.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dooly.engines import served_model_cache
from dooly.engines.groundtruth import BenchRun, RequestRecord, StepRecord
from dooly.engines.openai_client import (
    HEALTH_PATH,
    LOOPBACK,
    ServerProcess,
    running_server,
    serve_workload,
    started_server,
)
from dooly.engines.transformers_bench import NO_EOS_GENERATION
from dooly.engines.word_tokenizer import build_tokenizer, prompt_text
from dooly.errors import DoolyError
from dooly.workload import Request

log = logging.getLogger(__name__)

# The serve CLI takes the attention kernel without the paged prefix; the engine adds it.
PAGED_PREFIX = "paged|"
# What the server's engine resolved, written by dooly.engines.serve_launcher beside its log.
RESOLVED_REPORT_NAME = "server_resolved.json"
SERVER_STEPS_NAME = "server_steps.json"
# Without a model cache, the served model is saved under the run's directory, removed with it.
SERVED_MODEL_DIR_NAME = "model"
SERVE_LAUNCHER_MODULE = "dooly.engines.serve_launcher"
# use_cuda_graph as the engine resolves it: one switch per path (varlen, decode).
CUDA_GRAPH_SETTING = "use_cuda_graph"
CUDA_GRAPH_PATHS = 2
# The generation settings that change what the engine runs: sampling, and EOS (off in every cell).
CHECKED_GENERATION_KEYS = ("do_sample", "eos_token_id")


def check_settings(settings: dict[str, Any]) -> None:
    """Refuse, before a model is built, settings the engine's config rejects: the server would
    only fail on its first request."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    try:
        ContinuousBatchingConfig(**settings)
    except TypeError as exc:
        raise DoolyError(f"engine settings rejected by ContinuousBatchingConfig: {exc}") from None


def serve_attention(backend: str) -> str:
    """The `--attn-implementation` the server is given for a paged backend. The engine adds the
    paged prefix back, but switches to flash attention where flash attention is installed: such a
    run would not be the backend asked for, so it is refused."""
    from transformers.utils.import_utils import is_flash_attn_2_available, is_flash_attn_3_available

    kernel = backend.removeprefix(PAGED_PREFIX)
    if is_flash_attn_3_available(kernels_fallback_ok=True) or is_flash_attn_2_available(kernels_fallback_ok=True):
        raise DoolyError(f"transformers serve would run flash attention instead of {backend} here (flash attention "
                         "is installed and its continuous batching switches to it); use --client inprocess")
    return kernel


def require_serve() -> None:
    """`transformers serve` needs FastAPI and uvicorn, which a plain transformers install lacks:
    say so in one line before a model is built and saved."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise DoolyError("transformers serve needs its serving extras (pip install 'transformers[serving]': "
                         "fastapi, uvicorn, openai)")


def save_served_model(hf_config: Any, backend: str, device: str, dtype: Any, seed: int, directory: Path) -> None:
    """The in-process harness's random-weight model (same seed, drawn on the same device) and the
    word-level tokenizer, saved where `transformers serve` loads them from."""
    import torch

    from dooly.engines.transformers_bench import build_random_model

    model = build_random_model(hf_config, backend, torch.device(device), dtype, seed)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    build_tokenizer(int(hf_config.get_text_config().vocab_size)).save_pretrained(directory)
    # Hand the device memory back: the server sizes its KV cache from the free memory it finds.
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def transformers_serve_command(model_dir: Path, port: int, backend: str, device: str, dtype: str,
                               settings: dict[str, Any], report_path: Path, steps_path: Path) -> list[str]:
    """transformers' server through the launcher that starts its engine as the in-process harness
    does, with these settings, writes what it resolved to `report_path`, and its engine's steps to
    `steps_path` when stopped."""
    return [
        sys.executable, "-m", SERVE_LAUNCHER_MODULE, str(model_dir), "--report", str(report_path),
        "--settings", json.dumps(settings, sort_keys=True), "--attn-implementation", serve_attention(backend),
        "--device", device, "--dtype", dtype, "--host", LOOPBACK, "--port", str(port), "--steps", str(steps_path),
    ]


def recorded_steps(steps_path: Path, records: list[RequestRecord]) -> list[StepRecord]:
    """The server engine's steps of the recorded pass: those that started at or after its first
    arrival (warm-up and warm passes ran before it). A server that wrote no steps fails the run:
    its cell would lack what an in-process cell has."""
    from dooly.engines.serve_launcher import read_steps

    if not steps_path.is_file():
        raise DoolyError(f"the server was stopped without writing its engine steps ({steps_path.name})")
    first_arrival = min(r.arrived_at_s for r in records)
    steps = [s for s in read_steps(steps_path) if s.start_s >= first_arrival]
    return [replace(s, step=index) for index, s in enumerate(steps)]


def read_resolved(report_path: Path) -> dict[str, Any]:
    """The launcher's report of what the server's engine resolved (written before /health answers)."""
    if not report_path.is_file():
        raise DoolyError(f"the server answered {HEALTH_PATH} without writing {report_path.name}: it was not started "
                         "through dooly.engines.serve_launcher")
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report


def _as_resolved(key: str, value: Any) -> Any:
    """A requested setting in the form the resolved config holds it (JSON-plain)."""
    if key == CUDA_GRAPH_SETTING and isinstance(value, bool):
        value = [value] * CUDA_GRAPH_PATHS
    return json.loads(json.dumps(value))


def settings_mismatches(resolved: dict[str, Any], backend: str, dtype: str, settings: dict[str, Any]) -> list[str]:
    """Where the server's engine differs from what the in-process harness runs for the same
    request: another attention implementation or dtype, a requested setting resolved otherwise,
    sampling or EOS on, or no warm-up. Empty when the two are the same engine."""
    found = []
    if resolved.get("attn_implementation") != backend:
        found.append(f"attention {resolved.get('attn_implementation')} (asked {backend})")
    if resolved.get("dtype") != dtype:
        found.append(f"dtype {resolved.get('dtype')} (asked {dtype})")
    config = resolved.get("continuous_batching_config", {})
    for key, value in sorted(settings.items()):
        wanted = _as_resolved(key, value)
        if config.get(key) != wanted:
            found.append(f"{key}={json.dumps(config.get(key))} (asked {json.dumps(wanted)})")
    generation = resolved.get("generation_config", {})
    for key in CHECKED_GENERATION_KEYS:
        if generation.get(key) != NO_EOS_GENERATION[key]:
            found.append(f"generation {key}={json.dumps(generation.get(key))} "
                         f"(the in-process harness runs {json.dumps(NO_EOS_GENERATION[key])})")
    if not resolved.get("warmed_up"):
        found.append("the engine was not warmed up before serving (the in-process harness warms it up)")
    tokenizer = resolved.get("tokenizer") or {}
    if tokenizer.get("round_trip") is not True:
        found.append(f"the server's tokenizer ({tokenizer.get('class')}) does not turn a prompt's text back into its "
                     "ids (the engine would be served other prompts than the workload's)")
    return found


def check_resolved(resolved: dict[str, Any], backend: str, dtype: str, settings: dict[str, Any]) -> None:
    """Refuse, before any request, a server whose engine is not the one asked for: its cell would
    be paired with an in-process cell of another engine."""
    found = settings_mismatches(resolved, backend, dtype, settings)
    if found:
        raise DoolyError(f"the server's engine resolved other settings than the run asked: {'; '.join(found)} "
                         "(an HTTP cell is only paired with an in-process cell of the same engine)")


def _request_body(prompt: list[int], output_tokens: int) -> dict[str, Any]:
    """transformers serve takes the prompt as text only, and EOS off through a per-request
    generation config (it has no `ignore_eos`/`min_tokens`, vLLM's way)."""
    return {"prompt": prompt_text(prompt), "max_tokens": output_tokens, "stream": True,
            "generation_config": json.dumps(NO_EOS_GENERATION)}


def replay_workload(url: str, requests: list[Request], rng: np.random.Generator, vocab: int, *,
                    warmup_requests: int, warm_passes: int, server: ServerProcess | None = None) -> list[RequestRecord]:
    """Warm-up requests (as the in-process harness sends them, same prompts from the same seed),
    the unrecorded warm passes, then the recorded pass."""
    from dooly.engines.transformers_bench import WARMUP_OUTPUT_TOKENS, WARMUP_PROMPT_TOKENS, _prompt

    warmup = [Request(f"warmup-{i}", 0.0, WARMUP_PROMPT_TOKENS, WARMUP_OUTPUT_TOKENS) for i in range(warmup_requests)]
    return serve_workload(url, requests, prompt_for=lambda length: _prompt(rng, vocab, length),
                          body_for=_request_body, warmup=warmup, warm_passes=warm_passes, server=server)


def run_http_bench(
    hf_config: Any,
    backend: str,
    requests: list[Request],
    *,
    settings: dict[str, Any],
    device: str,
    dtype: str,
    seed: int,
    warmup_requests: int,
    warm_passes: int,
    server_url: str | None = None,
    model_cache: Path | None = None,
    model_cache_max_bytes: int = served_model_cache.DEFAULT_MAX_BYTES,
) -> BenchRun:
    """Serve `requests` through the engine's HTTP server (started here unless `server_url`) and
    record what the client saw. The prompts are drawn from the same seed, in the same order, as the
    in-process harness draws them. With `model_cache`, the served model is taken from (or saved
    into) that cache (dooly.engines.served_model_cache), kept under `model_cache_max_bytes`, instead
    of saved for this run only."""
    vocab = int(hf_config.get_text_config().vocab_size)
    rng = np.random.default_rng(seed)
    details: dict[str, Any] = {"client": "http"}
    if server_url is not None:
        url = running_server(server_url, details, "attention, CUDA graphs, num_blocks, max_batch_tokens, dtype")
        records = replay_workload(url, requests, rng, vocab, warmup_requests=warmup_requests, warm_passes=warm_passes)
        return BenchRun(requests=records, steps=[], engine_settings=dict(settings), engine_details=details)
    require_serve()
    check_settings(settings)
    serve_attention(backend)
    # The run's own files (the server's log, its report, its steps) in a directory of the run,
    # removed after it; the model in a cached entry, kept, or (no cache) in the run's directory.
    work_dir = Path(tempfile.mkdtemp(prefix="dooly-http-bench-"))
    report_path = work_dir / RESOLVED_REPORT_NAME
    steps_path = work_dir / SERVER_STEPS_NAME
    try:
        # The cached entry is held in use until the server has stopped: no other run evicts it meanwhile.
        with served_model(hf_config, backend, device, dtype, seed, work_dir, model_cache,
                          model_cache_max_bytes) as (model_dir, cache_status):
            details["served_model_cache"] = cache_status
            command = lambda port: transformers_serve_command(  # noqa: E731
                model_dir, port, backend, device, dtype, settings, report_path, steps_path)
            with started_server(command, work_dir) as server:
                resolved = read_resolved(report_path)
                check_resolved(resolved, backend, dtype, settings)
                details.update(server_url=server.url, server_command=server.command, server_resolved=resolved,
                               settings_verified=True)
                records = replay_workload(server.url, requests, rng, vocab, warmup_requests=warmup_requests,
                                          warm_passes=warm_passes, server=server)
        steps = recorded_steps(steps_path, records)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return BenchRun(requests=records, steps=steps, engine_settings=resolved["engine_settings"], engine_details=details)


@contextmanager
def served_model(hf_config: Any, backend: str, device: str, dtype: str, seed: int, work_dir: Path,
                 model_cache: Path | None,
                 model_cache_max_bytes: int = served_model_cache.DEFAULT_MAX_BYTES) -> Iterator[tuple[Path, str]]:
    """The directory the server loads the model from while the block runs, and where it came from
    (bench.json's `served_model_cache`): the cache's entry for this model, reused (`hit`) or saved
    now (`miss`), or a directory of the run, removed with it, without a cache (`off`) or where the
    model does not fit under the cache's cap (`uncached`)."""
    import torch

    def build(directory: Path) -> None:
        save_served_model(hf_config, backend, device, getattr(torch, dtype), seed, directory)

    model_dir = work_dir / SERVED_MODEL_DIR_NAME
    if model_cache is None:
        build(model_dir)
        log.info("served model: saved to %s (removed after the run; --model-cache keeps it)", model_dir)
        yield model_dir, served_model_cache.OFF
        return
    inputs = served_model_cache.cache_inputs(hf_config, dtype, seed, device)
    with served_model_cache.cached_model_dir(Path(model_cache).expanduser(), inputs, build, scratch=model_dir,
                                             max_bytes=model_cache_max_bytes,
                                             expected_bytes=served_model_bytes(hf_config, dtype)) as served:
        yield served.directory, served.status


def served_model_bytes(hf_config: Any, dtype: str) -> int:
    """The bytes the saved weights take (the tokenizer and config add little), counted on the model
    built on the meta device, which allocates and draws nothing: the cache makes room for them before
    the build writes any. Tied weights are one tensor, saved once."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    # A build writes its dtype back into the config it is given: this one is a copy.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), dtype=getattr(torch, dtype))
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())
