"""Ground truth on the real vLLM engine: a workload served open-loop, every step and token timed.

The engine is vLLM's own `LLMEngine` (through `vllm.LLM`, in this process), with dummy weights and
token-id prompts, built from the model's full config. Requests are added when they arrive on the
workload's clock (the driver adds every request whose arrival time has passed before each
`step()`, and sleeps when the engine is idle until the next arrival), so the arrivals are the
workload's, not a batch submitted up front.

Recorded per request: arrival (the workload time), the first token's and every token's time
(when the `step()` that produced it returned), prompt and output lengths. Per engine step: the
batch composition as vLLM's scheduler made it (prefill chunks as (new tokens, context already
computed), decodes as their context), the step's wall time (schedule, forward, sampling, output
processing: the whole `LLMEngine.step()`) and the part inside the model executor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dooly.engines.groundtruth import BenchRun, RequestRecord, StepRecord
from dooly.engines.vllm_engine import (
    VllmSettings,
    engine_scheduler,
    engine_version,
    platform_backend,
    require_vllm,
    start_llm,
    write_model_dir,
)
from dooly.errors import DoolyError

log = logging.getLogger(__name__)

# Warm-up before the measured run: oneDNN builds a primitive per GEMM shape on first use, and the
# first steps allocate; these requests cover prefill, chunked prefill and decode shapes.
WARMUP_REQUESTS = 4
WARMUP_OUTPUT_TOKENS = 4
# How long the driver sleeps at most while idle before looking at the clock again.
IDLE_POLL_S = 0.005
# The KV cache the bench runs with unless told: enough for the small configs on a CPU.
DEFAULT_BENCH_KV_BYTES = 512 * 2**20


def settings_from(values: dict[str, Any], dtype: str, seed: int) -> VllmSettings:
    """Engine arguments from `dooly bench --set KEY=VALUE` (VllmSettings fields)."""
    from dataclasses import fields

    known = {f.name for f in fields(VllmSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DoolyError(f"vllm engine settings: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    merged = {"kv_cache_bytes": DEFAULT_BENCH_KV_BYTES, **values, "dtype": dtype, "seed": seed}
    return VllmSettings(**merged)


def _composition(scheduler_output: Any, prompt_lens: dict[str, int]) -> tuple[list[tuple[int, int]], list[int]]:
    """(prefill chunks, decode contexts) of a scheduler output: a sequence scheduled for one token
    after its whole prompt is a decode; anything else is a prefill chunk (new tokens, context)."""
    prefill: list[tuple[int, int]] = []
    decode: list[int] = []
    scheduled = scheduler_output.num_scheduled_tokens
    entries = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
    cached = scheduler_output.scheduled_cached_reqs
    entries += list(zip(cached.req_ids, cached.num_computed_tokens))
    for request_id, computed in entries:
        query = scheduled[request_id]
        if query == 1 and computed >= prompt_lens.get(request_id, 0):
            decode.append(computed)
        else:
            prefill.append((query, computed))
    return prefill, decode


class _StepProbe:
    """Wraps the engine core's scheduler and model executor to see each step's batch and time."""

    def __init__(self, llm: Any, prompt_lens: dict[str, int]) -> None:
        self.core = llm.llm_engine.engine_core.engine_core
        self.prompt_lens = prompt_lens
        self.last: Any = None
        self.forward_s = 0.0
        self._installed: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        scheduler = self.core.scheduler
        executor = self.core.model_executor
        schedule, execute, sample = scheduler.schedule, executor.execute_model, executor.sample_tokens

        def traced_schedule(*args: Any, **kwargs: Any) -> Any:
            self.last = schedule(*args, **kwargs)
            return self.last

        def timed_execute(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return execute(*args, **kwargs)
            finally:
                self.forward_s += time.perf_counter() - begin

        def timed_sample(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return sample(*args, **kwargs)
            finally:
                self.forward_s += time.perf_counter() - begin

        for target, name, replacement in ((scheduler, "schedule", traced_schedule),
                                          (executor, "execute_model", timed_execute),
                                          (executor, "sample_tokens", timed_sample)):
            self._installed.append((target, name, getattr(target, name)))
            setattr(target, name, replacement)

    def remove(self) -> None:
        for target, name, original in reversed(self._installed):
            setattr(target, name, original)
        self._installed = []

    def take(self) -> tuple[Any, float]:
        scheduled, forward = self.last, self.forward_s
        self.last, self.forward_s = None, 0.0
        return scheduled, forward


def run_vllm_bench(config: dict[str, Any], requests: list[Any], *, settings: VllmSettings | None = None,
                   seed: int = 0, warmup_requests: int = WARMUP_REQUESTS) -> BenchRun:
    """Serve `requests` (dooly.workload.Request: id, arrival, prompt and output lengths) on the
    real vLLM engine open-loop, and record the ground truth (see the module docstring)."""
    import tempfile

    require_vllm()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    settings = settings or settings_from({}, "float32", seed)
    longest = max((r.prompt_tokens + r.output_tokens for r in requests), default=0)
    if longest > settings.max_model_len:
        raise DoolyError(f"a request of {longest} tokens exceeds max_model_len={settings.max_model_len}")
    vocab = int(config["vocab_size"])
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="dooly-vllm-bench-") as workdir:
        llm = start_llm(write_model_dir(config, Path(workdir)), settings)
        engine = llm.llm_engine
        _warm_up(engine, rng, vocab, settings, warmup_requests)
        prompt_lens = {r.request_id: r.prompt_tokens for r in requests}
        probe = _StepProbe(llm, prompt_lens)
        records = {r.request_id: RequestRecord(r.request_id, r.arrival_s, None, None, r.prompt_tokens,
                                               r.output_tokens) for r in requests}
        pending = sorted(requests, key=lambda r: r.arrival_s)
        steps: list[StepRecord] = []
        probe.install()
        origin = time.perf_counter()
        cursor = 0
        try:
            while cursor < len(pending) or engine.has_unfinished_requests():
                now = time.perf_counter() - origin
                while cursor < len(pending) and pending[cursor].arrival_s <= now:
                    request = pending[cursor]
                    params = SamplingParams(max_tokens=request.output_tokens, min_tokens=request.output_tokens,
                                            ignore_eos=True, temperature=0.0, detokenize=False,
                                            output_kind=RequestOutputKind.DELTA)
                    tokens = rng.integers(0, vocab, size=request.prompt_tokens).tolist()
                    engine.add_request(request.request_id, TokensPrompt(prompt_token_ids=tokens), params)
                    cursor += 1
                if not engine.has_unfinished_requests():
                    wait = pending[cursor].arrival_s - (time.perf_counter() - origin)
                    time.sleep(min(max(wait, 0.0), IDLE_POLL_S))
                    continue
                start = time.perf_counter()
                outputs = engine.step()
                end = time.perf_counter()
                scheduled, forward = probe.take()
                stamp = end - origin
                for output in outputs:
                    record = records.get(output.request_id)
                    if record is None:
                        continue
                    new = len(output.outputs[0].token_ids) if output.outputs else 0
                    if new and record.first_token_s is None:
                        record.first_token_s = stamp
                    record.token_times_s.extend([stamp] * new)
                    if output.finished:
                        record.finished_s = stamp
                if scheduled is None or scheduled.total_num_scheduled_tokens == 0:
                    continue
                prefill, decode = _composition(scheduled, prompt_lens)
                steps.append(StepRecord(
                    step=len(steps), start_s=start - origin, duration_s=end - start, prefill=prefill,
                    decode_ctx=decode, engine_path="eager", padded_tokens=scheduled.total_num_scheduled_tokens,
                    forward_s=forward, update_s=max(end - start - forward, 0.0),
                ))
        finally:
            probe.remove()
        engine_settings = engine_settings_of(llm, settings)
        details = engine_details(settings)
        _shutdown(llm)
    for record in records.values():
        if len(record.token_times_s) != record.output_tokens:
            record.error = f"produced {len(record.token_times_s)} of {record.output_tokens} tokens"
    return BenchRun(list(records.values()), steps, engine_settings, details)


def _warm_up(engine: Any, rng: np.random.Generator, vocab: int, settings: VllmSettings, count: int) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for index, length in enumerate(warmup_lengths(settings, count)):
        tokens = rng.integers(0, vocab, size=length).tolist()
        params = SamplingParams(max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True, temperature=0.0, detokenize=False)
        engine.add_request(f"warmup-{index}", TokensPrompt(prompt_token_ids=tokens), params)
    while engine.has_unfinished_requests():
        engine.step()


def warmup_lengths(settings: VllmSettings, count: int) -> list[int]:
    """The warm-up requests' prompt lengths: twice the token budget (a chunked prefill), then
    halving, so that prefill, chunked prefill and decode shapes are met before the recorded run."""
    longest = min(settings.max_num_batched_tokens * 2, settings.max_model_len - WARMUP_OUTPUT_TOKENS)
    return [max(1, longest >> index) for index in range(count)]


def engine_settings_of(llm: Any, settings: VllmSettings) -> dict[str, Any]:
    """The settings the simulator's vLLM scheduler model takes (dooly.sim.schedulers.VllmConfig),
    read back from the engine, which may have adjusted what it was given."""
    config = llm.llm_engine.vllm_config
    scheduler_config = config.scheduler_config
    pool = engine_scheduler(llm).kv_cache_manager.block_pool
    scheduler = {name: getattr(scheduler_config, name, None) for name in SCHEDULER_FIELDS}
    return simulator_settings(scheduler, int(config.cache_config.block_size), int(pool.num_gpu_blocks))


# The scheduler config fields the simulator's vLLM scheduler model reads.
SCHEDULER_FIELDS = ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "long_prefill_token_threshold",
                    "async_scheduling", "scheduler_reserve_full_isl", "watermark")


def simulator_settings(scheduler: dict[str, Any], block_size: int, num_gpu_blocks: int) -> dict[str, Any]:
    """engine.json of a vLLM run, from the scheduler config's fields (`SCHEDULER_FIELDS`, a missing
    one None) and the KV cache the engine sized: the in-process harness reads them from its engine,
    the HTTP harness from what the server reports (dooly.engines.vllm_http_bench)."""
    return {
        "max_num_batched_tokens": int(scheduler["max_num_batched_tokens"]),
        "max_num_seqs": int(scheduler["max_num_seqs"]),
        "block_size": block_size,
        "num_gpu_blocks": num_gpu_blocks,
        "enable_chunked_prefill": bool(scheduler["enable_chunked_prefill"]),
        "long_prefill_token_threshold": int(scheduler.get("long_prefill_token_threshold") or 0),
        "cudagraph_mode": "none",
        "async_scheduling": bool(scheduler.get("async_scheduling")),
        "scheduler_reserve_full_isl": bool(scheduler.get("scheduler_reserve_full_isl") or False),
        "watermark": float(scheduler.get("watermark") or 0.0),
    }


def engine_details(settings: VllmSettings) -> dict[str, Any]:
    """What else describes the run: the engine arguments, the backend and the thread setup."""
    import os

    import torch

    return {
        "engine_version": engine_version(),
        "backend": platform_backend(),
        "engine_args": asdict(settings),
        "torch_threads": torch.get_num_threads(),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
    }


def _shutdown(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except (RuntimeError, AttributeError) as exc:
        log.debug("vLLM shutdown: %s", exc)

