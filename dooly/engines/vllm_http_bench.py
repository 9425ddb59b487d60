"""Ground truth at a client of vLLM's own OpenAI-compatible server (`vllm serve`).

The in-process harness (`dooly.engines.vllm_bench`) drives `LLMEngine.step()` itself and stamps
tokens when a step returns; a user runs `vllm serve` and measures at the client, paying what the
server adds: the API process and its event loop, the hand-off to the engine core's own process,
detokenization, SSE framing, the socket. This harness starts that server (the module `vllm serve`
runs, `vllm.entrypoints.openai.api_server`: the CPU build's `vllm` command cannot find its own
package metadata) as a subprocess on loopback with the in-process harness's engine arguments
(dummy weights from the same seed, the same dtype, cache size, batch limits, eager, synchronous
scheduling) and a word-level tokenizer beside the config (dooly.engines.word_tokenizer), so every
generated token detokenizes to one word as a real tokenizer's would. Its engine core runs in its
own process, as `vllm serve` runs it, whatever this process's VLLM_ENABLE_V1_MULTIPROCESSING.

Requests are token-id prompts drawn from the same seed in the same order as the in-process
harness draws them (warm-up first), sent open loop by `dooly.engines.openai_client` with
`ignore_eos`, `min_tokens` = `max_tokens` (exactly the output length) and `return_token_ids`, so
that a chunk carrying several tokens (a client the server got ahead of) counts each.

What the server resolved is read back from it (`/server_info`, which it serves with
VLLM_SERVER_DEV_MODE=1, set here; the server only listens on loopback): a server whose engine
differs from the asked one in any argument that shapes a step (`settings_mismatches`) is refused
before any request, and engine.json holds the scheduler settings and KV blocks it reported, as the
in-process harness writes its engine's. The engine core's steps are in another process: the run
records none (steps.parquet empty), as with `--server-url`, whose server is not checked either
(recorded as unverified, with a warning).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dooly.engines.groundtruth import BenchRun
from dooly.engines.openai_client import LOOPBACK, running_server, serve_workload, started_server
from dooly.engines.vllm_bench import WARMUP_OUTPUT_TOKENS, simulator_settings, warmup_lengths
from dooly.engines.vllm_engine import VllmSettings, engine_version, platform_backend, require_vllm, write_model_dir
from dooly.engines.word_tokenizer import build_tokenizer
from dooly.errors import DoolyError
from dooly.workload import Request

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
SERVER_INFO_PATH = "/server_info?config_format=json"
# The name the started server serves its model under (requests name it).
SERVED_MODEL_NAME = "dooly-served"
MODEL_DIR_NAME = "model"
# What the server's environment needs besides this process's: /server_info (a development endpoint,
# on loopback only), and no hub lookups for a model directory that holds only a config.
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1"}
# The server's engine core in its own process, as `vllm serve` runs it.
IN_PROCESS_ENGINE_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# vLLM's CUDAGraphMode.NONE, as /server_info writes it: eager, as the in-process harness runs.
CUDAGRAPH_MODE_NONE = 0
INFO_TIMEOUT_S = 30.0
# The engine arguments given as flags, and those this harness sets otherwise (the tokenizer is
# needed to detokenize; the server logs its stats as `vllm serve` does by default).
NOT_FLAGS = ("skip_tokenizer_init", "disable_log_stats")


def serve_command(model_dir: Path, port: int, settings: VllmSettings, python: str = sys.executable) -> list[str]:
    """The server with the in-process harness's engine arguments (`VllmSettings.engine_args`),
    each as its flag: a boolean as `--name`/`--no-name`, others as `--name value`."""
    command = [python, "-m", SERVER_MODULE, "--model", str(model_dir), "--served-model-name", SERVED_MODEL_NAME,
               "--host", LOOPBACK, "--port", str(port), "--disable-uvicorn-access-log"]
    for name, value in settings.engine_args().items():
        if name in NOT_FLAGS:
            continue
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            command.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            command += [f"--{flag}", str(value)]
    return command


def server_env() -> dict[str, str]:
    """This process's environment (vLLM's thread settings included: the server computes as the
    in-process harness does) with the server's own needs, and its engine core in its own process."""
    require_vllm()
    env = {**os.environ, **SERVER_ENV}
    env.pop(IN_PROCESS_ENGINE_ENV, None)
    return env


def request_body(prompt: list[int], output_tokens: int) -> dict[str, Any]:
    """A token-id prompt, greedy, exactly `output_tokens` generated (EOS ignored, and the word-level
    tokenizer has no other stop token), streamed with the usage at the end and the ids of the
    tokens in each chunk. No `min_tokens`: its logits processor indexes the tokenizer's missing EOS
    past the vocabulary and kills the engine core (vLLM 0.32)."""
    return {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": output_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}


def read_server_config(url: str) -> dict[str, Any]:
    """The server's resolved VllmConfig, as it serves it on /server_info."""
    import httpx

    try:
        response = httpx.get(url + SERVER_INFO_PATH, timeout=INFO_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise DoolyError(f"the vLLM server did not answer /server_info: {exc}") from None
    if response.status_code != httpx.codes.OK:
        raise DoolyError(f"the vLLM server answered /server_info with {response.status_code} (it serves it with "
                         "VLLM_SERVER_DEV_MODE=1)")
    config: dict[str, Any] = response.json()["vllm_config"]
    return config


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section: dict[str, Any] = config.get(name) or {}
    return section


def resolved_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """The engine arguments the server resolved, named as `VllmSettings` names them."""
    model, cache = _section(config, "model_config"), _section(config, "cache_config")
    scheduler = _section(config, "scheduler_config")
    return {
        "dtype": str(model.get("dtype", "")).removeprefix("torch."),
        "max_model_len": model.get("max_model_len"),
        "seed": model.get("seed"),
        "load_format": _section(config, "load_config").get("load_format"),
        "block_size": cache.get("block_size"),
        "kv_cache_bytes": cache.get("kv_cache_memory_bytes"),
        "enable_prefix_caching": cache.get("enable_prefix_caching"),
        "max_num_batched_tokens": scheduler.get("max_num_batched_tokens"),
        "max_num_seqs": scheduler.get("max_num_seqs"),
        "enable_chunked_prefill": scheduler.get("enable_chunked_prefill"),
        "async_scheduling": scheduler.get("async_scheduling"),
        "cudagraph_mode": _section(config, "compilation_config").get("cudagraph_mode"),
    }


def settings_mismatches(resolved: dict[str, Any], settings: VllmSettings) -> list[str]:
    """Where the server's engine differs from the in-process harness's for the same settings: an
    engine argument resolved otherwise, weights that are not the seeded dummy ones, CUDA graphs or
    async scheduling on. Empty when the two are the same engine."""
    asked = {**asdict(settings), "load_format": "dummy", "async_scheduling": False,
             "cudagraph_mode": CUDAGRAPH_MODE_NONE}
    return [f"{name}={resolved.get(name)!r} (asked {value!r})" for name, value in sorted(asked.items())
            if name in resolved and resolved[name] != value]


def engine_settings(config: dict[str, Any]) -> dict[str, Any]:
    """engine.json: the scheduler settings and KV blocks the server reported."""
    cache = _section(config, "cache_config")
    if not cache.get("num_gpu_blocks"):
        raise DoolyError("the vLLM server reported no KV cache blocks (cache_config.num_gpu_blocks)")
    return simulator_settings(_section(config, "scheduler_config"), int(cache["block_size"]),
                              int(cache["num_gpu_blocks"]))


def run_vllm_http_bench(config: dict[str, Any], requests: list[Request], *, settings: VllmSettings, seed: int,
                        warmup_requests: int, server_url: str | None = None) -> BenchRun:
    """Serve `requests` through vLLM's server (started here unless `server_url`) and record what the
    client saw (see the module docstring)."""
    longest = max((r.prompt_tokens + r.output_tokens for r in requests), default=0)
    if longest > settings.max_model_len:
        raise DoolyError(f"a request of {longest} tokens exceeds max_model_len={settings.max_model_len}")
    vocab = int(config["vocab_size"])
    rng = np.random.default_rng(seed)
    warmup = [Request(f"warmup-{index}", 0.0, length, WARMUP_OUTPUT_TOKENS)
              for index, length in enumerate(warmup_lengths(settings, warmup_requests))]

    def prompt_for(length: int) -> list[int]:
        tokens: list[int] = rng.integers(0, vocab, size=length).tolist()
        return tokens

    details: dict[str, Any] = {"client": "http", "engine_version": engine_version(), "backend": platform_backend(),
                               "engine_args": asdict(settings)}
    if server_url is not None:
        url = running_server(server_url, details, "dtype, cache, batch limits, weights, CUDA graphs, scheduling")
        records = serve_workload(url, requests, prompt_for=prompt_for, body_for=request_body, warmup=warmup,
                                 warm_passes=0)
        return BenchRun(requests=records, steps=[], engine_settings={}, engine_details=details)
    work_dir = Path(tempfile.mkdtemp(prefix="dooly-vllm-http-bench-"))
    try:
        model_dir = write_model_dir(config, work_dir / MODEL_DIR_NAME)
        build_tokenizer(vocab).save_pretrained(model_dir)
        with started_server(lambda port: serve_command(model_dir, port, settings), work_dir, server_env()) as server:
            server_config = read_server_config(server.url)
            resolved = resolved_arguments(server_config)
            found = settings_mismatches(resolved, settings)
            if found:
                raise DoolyError(f"the vLLM server resolved other settings than the run asked: {'; '.join(found)} "
                                 "(an HTTP cell is only paired with an in-process cell of the same engine)")
            details.update(server_url=server.url, server_command=server.command, server_resolved=resolved,
                           settings_verified=True)
            resolved_settings = engine_settings(server_config)
            records = serve_workload(server.url, requests, prompt_for=prompt_for, body_for=request_body,
                                     warmup=warmup, warm_passes=0, server=server)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return BenchRun(requests=records, steps=[], engine_settings=resolved_settings, engine_details=details)
