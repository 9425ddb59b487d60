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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


@dataclass(slots=True)
class BenchRequest:
    request_id: str
    arrived_at_s: float
    first_token_s: float | None
    finished_s: float | None
    prompt_tokens: int
    output_tokens: int
    token_times_s: list[float] = field(default_factory=list)
    error: str = ""


@dataclass(slots=True)
class BenchStep:
    step: int
    start_s: float
    duration_s: float
    prefill: list[tuple[int, int]]
    decode_ctx: list[int]
    engine_path: str = "eager"
    cuda_graph: bool = False
    padded_tokens: int = 0
    prepare_s: float = 0.0
    forward_s: float = 0.0
    device_s: float | None = None
    update_s: float = 0.0


@dataclass
class VllmBenchResult:
    requests: list[BenchRequest]
    steps: list[BenchStep]
    engine_settings: dict[str, Any]
    provenance: dict[str, Any]


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
                   seed: int = 0, model_id: str = "") -> VllmBenchResult:
    """Serve `requests` (dooly.sim.workload.Request: id, arrival, prompt and output lengths) on the
    real vLLM engine open-loop, and record the ground truth (see the module docstring)."""
    import tempfile

    require_vllm()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    settings = settings or VllmSettings(kv_cache_bytes=DEFAULT_BENCH_KV_BYTES, seed=seed)
    longest = max((r.prompt_tokens + r.output_tokens for r in requests), default=0)
    if longest > settings.max_model_len:
        raise DoolyError(f"a request of {longest} tokens exceeds max_model_len={settings.max_model_len}")
    vocab = int(config["vocab_size"])
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="dooly-vllm-bench-") as workdir:
        llm = start_llm(write_model_dir(config, Path(workdir)), settings)
        engine = llm.llm_engine
        _warm_up(engine, rng, vocab, settings)
        prompt_lens = {r.request_id: r.prompt_tokens for r in requests}
        probe = _StepProbe(llm, prompt_lens)
        records = {r.request_id: BenchRequest(r.request_id, r.arrival_s, None, None, r.prompt_tokens,
                                               r.output_tokens) for r in requests}
        pending = sorted(requests, key=lambda r: r.arrival_s)
        steps: list[BenchStep] = []
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
                steps.append(BenchStep(
                    step=len(steps), start_s=start - origin, duration_s=end - start, prefill=prefill,
                    decode_ctx=decode, padded_tokens=scheduled.total_num_scheduled_tokens, forward_s=forward,
                    update_s=max(end - start - forward, 0.0),
                ))
        finally:
            probe.remove()
        engine_settings = engine_settings_of(llm, settings)
        provenance = bench_provenance(model_id, settings)
        _shutdown(llm)
    for record in records.values():
        if len(record.token_times_s) != record.output_tokens:
            record.error = f"produced {len(record.token_times_s)} of {record.output_tokens} tokens"
    return VllmBenchResult(list(records.values()), steps, engine_settings, provenance)


def _warm_up(engine: Any, rng: np.random.Generator, vocab: int, settings: VllmSettings) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    longest = min(settings.max_num_batched_tokens * 2, settings.max_model_len - WARMUP_OUTPUT_TOKENS)
    for index in range(WARMUP_REQUESTS):
        length = max(1, longest >> index)
        tokens = rng.integers(0, vocab, size=length).tolist()
        params = SamplingParams(max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True, temperature=0.0, detokenize=False)
        engine.add_request(f"warmup-{index}", TokensPrompt(prompt_token_ids=tokens), params)
    while engine.has_unfinished_requests():
        engine.step()


def engine_settings_of(llm: Any, settings: VllmSettings) -> dict[str, Any]:
    """The settings the simulator's vLLM scheduler model takes (dooly.sim.schedulers.VllmConfig),
    read back from the engine, which may have adjusted what it was given."""
    config = llm.llm_engine.vllm_config
    scheduler_config = config.scheduler_config
    pool = engine_scheduler(llm).kv_cache_manager.block_pool
    return {
        "max_num_batched_tokens": int(scheduler_config.max_num_batched_tokens),
        "max_num_seqs": int(scheduler_config.max_num_seqs),
        "block_size": int(config.cache_config.block_size),
        "num_gpu_blocks": int(pool.num_gpu_blocks),
        "enable_chunked_prefill": bool(scheduler_config.enable_chunked_prefill),
        "long_prefill_token_threshold": int(scheduler_config.long_prefill_token_threshold or 0),
        "cudagraph_mode": "none",
        "async_scheduling": bool(scheduler_config.async_scheduling),
    }


def bench_provenance(model_id: str, settings: VllmSettings) -> dict[str, Any]:
    import platform as platform_module

    import torch

    from dooly.profile.provenance import detect_platform

    return {
        "engine": "vllm",
        "engine_version": engine_version(),
        "backend": platform_backend(),
        "model": model_id,
        "platform": detect_platform("cpu" if not torch.cuda.is_available() else "cuda"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform_module.python_version(),
        "settings": asdict(settings),
    }


def _shutdown(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except (RuntimeError, AttributeError) as exc:
        log.debug("vLLM shutdown: %s", exc)


def write_result(out_dir: str | Path, result: VllmBenchResult) -> list[Path]:
    """requests.parquet, steps.parquet, engine.json and bench.json, as `dooly validate` reads them."""
    import json
    import os
    import shutil
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunk = pa.struct([("q", pa.int64()), ("ctx", pa.int64())])
    requests = pa.Table.from_pylist([asdict(r) for r in result.requests], schema=pa.schema([
        ("request_id", pa.string()), ("arrived_at_s", pa.float64()), ("first_token_s", pa.float64()),
        ("finished_s", pa.float64()), ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()),
        ("token_times_s", pa.list_(pa.float64())), ("error", pa.string()),
    ]))
    rows = [{**asdict(s), "prefill": [{"q": q, "ctx": c} for q, c in s.prefill]} for s in result.steps]
    steps = pa.Table.from_pylist(rows, schema=pa.schema([
        ("step", pa.int64()), ("start_s", pa.float64()), ("duration_s", pa.float64()), ("prefill", pa.list_(chunk)),
        ("decode_ctx", pa.list_(pa.int64())), ("engine_path", pa.string()), ("cuda_graph", pa.bool_()),
        ("padded_tokens", pa.int64()), ("prepare_s", pa.float64()), ("forward_s", pa.float64()),
        ("device_s", pa.float64()), ("update_s", pa.float64()),
    ]))
    staging = Path(tempfile.mkdtemp(prefix=".dooly-bench-", dir=out))
    names = ("requests.parquet", "steps.parquet", "engine.json", "bench.json")
    try:
        pq.write_table(requests, staging / names[0])
        pq.write_table(steps, staging / names[1])
        (staging / names[2]).write_text(json.dumps(result.engine_settings, indent=2, sort_keys=True) + "\n")
        (staging / names[3]).write_text(json.dumps(result.provenance, indent=2, sort_keys=True, default=str) + "\n")
        for name in names:
            os.replace(staging / name, out / name)
        return [out / name for name in names]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
