"""Ground truth on the real transformers continuous-batching engine.

The model is built from its config with random weights, on the device, and served by the engine's
own `ContinuousBatchingManager` (its background generation thread, scheduler, paged cache and model
runner, unmodified). Requests are added when their arrival time comes (open loop: a slow engine
does not slow the arrivals down), with random prompt tokens and EOS disabled, so each request
generates exactly its `output_tokens`. The engine records every token's timestamp itself
(`record_timestamps`).

Per step, we observe the engine from outside by wrapping four of its methods on the live objects:
the batch preparation (start of a step, and the composition the scheduler chose: each request's
past length and query length), the generation step (host time of the forward, and CUDA events on
the engine's compute stream around it), and the batch update (end of the step).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import numpy as np
import torch

from dooly.engines.groundtruth import (
    DEFAULT_WARMUP_REQUESTS,
    WARMUP_OUTPUT_TOKENS,
    WARMUP_PROMPT_TOKENS,
    BenchRun,
    RequestRecord,
    StepRecord,
)
from dooly.workload import Request

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
# Token ids are drawn from [1, vocab - 1]: 0 is often padding and never changes timing.
FIRST_PROMPT_TOKEN = 1
# How long the collector waits for one more result before it checks whether the engine died.
RESULT_POLL_S = 0.5
# A request that produces no result for this long after the last arrival means the engine stalled.
STALL_TIMEOUT_S = 600.0
ENGINE_STOP_TIMEOUT_S = 60.0
# Request ids of an unrecorded warm pass end with this and the pass number.
WARM_PASS_SUFFIX = "~warm"
MS_PER_S = 1e3
# On the CPU an unset max_batch_tokens is sized by transformers from the host's free memory (the
# rule it has for a GPU's), and the engine's IO buffers hold about max_batch_tokens squared mask
# entries: 22 GB for a two-layer test model on a 23 GB machine. A batch holds no more query tokens
# than the cache has slots, so with num_blocks given the cache bounds it; without, this does (the
# value the engine-path grids serve with on the GPU).
CPU_MAX_BATCH_TOKENS = 2048
# The engine's generation config: greedy, EOS disabled (-1), so each request generates exactly
# its max_new_tokens. The HTTP harness sends the same per request and builds its server's manager
# with it (dooly.engines.serve_launcher).
NO_EOS_GENERATION: dict[str, Any] = {"do_sample": False, "eos_token_id": -1, "pad_token_id": 0}


class StepProbe:
    """Collects one `StepRecord` per engine step from wrapped engine methods."""

    def __init__(self, manager: Any, device: torch.device) -> None:
        self.manager = manager
        self.device = device
        self.steps: list[StepRecord] = []
        self.events: list[tuple[Any, Any] | None] = []
        self.recording = False
        self._pending: dict[str, Any] = {}
        self.gc_clock = GcClock()

    def install(self, processor: Any) -> None:
        io = processor.inputs_and_outputs
        runner = processor.model_runner
        prepare_next_batch = processor.prepare_next_batch
        prepare_batch_tensors = io.prepare_batch_tensors
        update_batch = processor.update_batch
        generation_step = self.manager._generation_step

        def timed_prepare() -> bool:
            start = time.perf_counter()
            gc_before = self.gc_clock.seconds
            ready = prepare_next_batch()
            if ready:
                self._pending["start"] = start
                self._pending["gc_before"] = gc_before
                self._pending["prepare_s"] = time.perf_counter() - start
            return ready

        def capture_composition(requests_in_batch: list[Any], *args: Any, **kwargs: Any) -> Any:
            prefill, decode = [], []
            for future in requests_in_batch:
                state = future.state
                past = int(state.position_offset)
                # The engine flags a request DECODING as soon as its last prefill chunk is
                # scheduled; a decode is one query token after the whole prompt is cached.
                if future.query_length == 1 and past >= len(state.initial_tokens):
                    decode.append(past)
                else:
                    prefill.append((int(future.query_length), past))
            fast = bool(kwargs.get("use_decode_fast_path", False))
            self._pending.update(
                prefill=prefill,
                decode_ctx=decode,
                engine_path="decode_fast_path" if fast else "varlen",
                cuda_graph=bool(runner.use_cuda_graph_decode if fast else runner.use_cuda_graph_varlen),
                padded_tokens=int(kwargs.get("num_q_tokens", 0)),
            )
            return prepare_batch_tensors(requests_in_batch, *args, **kwargs)

        capture_graph = runner._capture_graph

        def flagged_capture(*args: Any, **kwargs: Any) -> None:
            self._pending["graph_captured"] = True
            capture_graph(*args, **kwargs)

        def timed_step() -> None:
            stream = getattr(io, "compute_stream", None)
            events = None
            if stream is not None and self.device.type == "cuda":
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                stream.record_event(events[0])
            start = time.perf_counter()
            generation_step()
            if stream is not None and events is not None:
                stream.record_event(events[1])
            self._pending["forward_s"] = time.perf_counter() - start
            self._pending["events"] = events

        def timed_update() -> None:
            start = time.perf_counter()
            update_batch()
            end = time.perf_counter()
            pending, self._pending = self._pending, {}
            if not self.recording or "start" not in pending:
                return
            self.steps.append(
                StepRecord(
                    step=len(self.steps),
                    start_s=pending["start"],
                    duration_s=end - pending["start"],
                    prefill=pending.get("prefill", []),
                    decode_ctx=pending.get("decode_ctx", []),
                    engine_path=pending.get("engine_path", ""),
                    cuda_graph=pending.get("cuda_graph", False),
                    padded_tokens=pending.get("padded_tokens", 0),
                    prepare_s=pending["prepare_s"],
                    forward_s=pending.get("forward_s", 0.0),
                    update_s=end - start,
                    graph_captured=pending.get("graph_captured", False),
                    gc_s=self.gc_clock.seconds - pending["gc_before"],
                )
            )
            self.events.append(pending.get("events"))

        processor.prepare_next_batch = timed_prepare
        io.prepare_batch_tensors = capture_composition
        processor.update_batch = timed_update
        self.manager._generation_step = timed_step
        runner._capture_graph = flagged_capture

    def finish(self) -> list[StepRecord]:
        """Resolve the CUDA events into device seconds (after the engine stopped: no sync needed
        while it ran)."""
        for record, events in zip(self.steps, self.events):
            if events is not None:
                events[1].synchronize()
                record.device_s = events[0].elapsed_time(events[1]) / MS_PER_S
        return self.steps


class GcClock:
    """Adds up the wall time of Python's garbage collections while installed.

    Each engine step builds Python lists as long as the KV tokens it reads, and a collection that
    lands in a step adds to its host time whichever thread triggered it. The steps record it
    (`StepRecord.gc_s`), so a step's host time can be told apart from the collector's: on the
    H100 runs it came to 3-5 ms in a whole run (data/h100/experiments/host_cost/)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: float | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


def build_random_model(hf_config: Any, backend: str, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """The model from its config, weights drawn at random directly on the device."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=backend, dtype=dtype)
    return model.eval()


def run_transformers_bench(
    hf_config: Any,
    backend: str,
    requests: list[Request],
    *,
    settings: dict[str, Any],
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    warmup_requests: int = DEFAULT_WARMUP_REQUESTS,
    warm_passes: int = 0,
) -> BenchRun:
    """Serve `requests` on the real engine and record what happened.

    `warm_passes`: serve the same workload this many times first, unrecorded, on the same engine
    (`_serve`): the batch shapes it meets get their CUDA graphs captured (and kernel plans built)
    there, as on a server that has been running, so the recorded pass measures steady state rather
    than the one-off cost of each first-seen shape, which lands on different requests run to run."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    torch_device = torch.device(device)
    model = build_random_model(hf_config, backend, torch_device, dtype, seed)
    vocab = int(hf_config.get_text_config().vocab_size)
    generation_config = GenerationConfig(**NO_EOS_GENERATION)
    if torch_device.type == "cpu":
        settings = cpu_settings(settings, ContinuousBatchingConfig().block_size)
    cb_config = ContinuousBatchingConfig(**settings)
    manager = model.init_continuous_batching(generation_config=generation_config, continuous_batching_config=cb_config)
    manager.warmup()
    probe = StepProbe(manager, torch_device)
    probe.install(manager.batch_processor)
    rng = np.random.default_rng(seed)
    manager.start()
    try:
        _run_warmup(manager, rng, vocab, warmup_requests)
        for index in range(warm_passes):
            _serve(manager, requests, rng, vocab, suffix=f"{WARM_PASS_SUFFIX}{index}")
        probe.recording = True
        outputs, arrivals = _serve(manager, requests, rng, vocab)
        probe.recording = False
    finally:
        probe.gc_clock.stop()
        manager.stop(block=True, timeout=ENGINE_STOP_TIMEOUT_S, keep_for_next_session=False)
    records = [_request_record(r, outputs.get(r.request_id), arrivals.get(r.request_id)) for r in requests]
    return BenchRun(
        requests=records,
        steps=probe.finish(),
        engine_settings=scheduler_settings(manager.continuous_batching_config),
        engine_details={"continuous_batching_config": plain_values(vars(manager.continuous_batching_config))},
    )


def _prompt(rng: np.random.Generator, vocab: int, length: int) -> list[int]:
    return rng.integers(FIRST_PROMPT_TOKEN, vocab, size=length).tolist()


def _run_warmup(manager: Any, rng: np.random.Generator, vocab: int, count: int) -> None:
    ids = [
        manager.add_request(_prompt(rng, vocab, WARMUP_PROMPT_TOKENS), request_id=f"warmup-{i}", max_new_tokens=WARMUP_OUTPUT_TOKENS)
        for i in range(count)
    ]
    pending = set(ids)
    while pending:
        result = manager.get_result(timeout=STALL_TIMEOUT_S)
        if result is None:
            raise RuntimeError("the engine produced no warm-up result: it stopped or stalled")
        pending.discard(result.request_id)


def _serve(manager: Any, requests: list[Request], rng: np.random.Generator, vocab: int,
           suffix: str = "") -> tuple[dict[str, Any], dict[str, float]]:
    """Add each request at its arrival time while collecting results; wait for the last. The
    engine sees each request id with `suffix` appended (a warm pass reuses the workload)."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    prompts = {r.request_id: _prompt(rng, vocab, r.prompt_tokens) for r in ordered}
    outputs: dict[str, Any] = {}
    arrivals: dict[str, float] = {}

    def collect(result: Any) -> None:
        outputs[result.request_id.removesuffix(suffix) if suffix else result.request_id] = result

    origin = time.perf_counter()
    for request in ordered:
        due = origin + request.arrival_s
        while (wait := due - time.perf_counter()) > 0:
            result = manager.get_result(timeout=wait)
            if result is not None:
                collect(result)
        arrivals[request.request_id] = time.perf_counter()
        manager.add_request(
            prompts.pop(request.request_id),
            request_id=request.request_id + suffix,
            max_new_tokens=request.output_tokens,
            record_timestamps=True,
        )
    last_progress = time.perf_counter()
    while len(outputs) < len(ordered):
        result = manager.get_result(timeout=RESULT_POLL_S)
        if result is not None:
            collect(result)
            last_progress = time.perf_counter()
        elif not manager.is_running() or time.perf_counter() - last_progress > STALL_TIMEOUT_S:
            log.error("engine stopped with %d of %d requests unfinished", len(ordered) - len(outputs), len(ordered))
            break
    return outputs, arrivals


def _request_record(request: Request, output: Any, added_at: float | None) -> RequestRecord:
    if output is None:
        return RequestRecord(request.request_id, added_at or float("nan"), None, None, request.prompt_tokens, 0, [], "no result")
    times = [float(t) for t in (output.timestamps or [])]
    return RequestRecord(
        request_id=request.request_id,
        arrived_at_s=float(output.created_time),
        first_token_s=times[0] if times else None,
        finished_s=float(output.lifespan[1]) if output.lifespan[1] > 0 else None,
        prompt_tokens=len(output.prompt_ids) or request.prompt_tokens,
        output_tokens=len(output.generated_tokens),
        token_times_s=times,
        error=str(output.error or ""),
    )


def cpu_settings(settings: dict[str, Any], default_block_size: int) -> dict[str, Any]:
    """SETTINGS with max_batch_tokens bounded for a CPU run where the user left it unset: the
    cache's slots (num_blocks x block_size) when num_blocks is given, else CPU_MAX_BATCH_TOKENS
    (see there: transformers would size it from the host's memory)."""
    if settings.get("max_batch_tokens") is not None:
        return settings
    num_blocks = settings.get("num_blocks")
    if num_blocks is None:
        bound = CPU_MAX_BATCH_TOKENS
    else:
        bound = int(num_blocks) * int(settings.get("block_size") or default_block_size)
    log.info("CPU run: max_batch_tokens unset, bounded at %d", bound)
    return {**settings, "max_batch_tokens": bound}


def scheduler_settings(cb_config: Any) -> dict[str, Any]:
    """The resolved engine settings in the names `TransformersCBConfig` (the simulator) takes: what
    engine.json holds, for the in-process harness and for the server behind the HTTP one alike."""
    varlen_graph, decode_graph = cb_config.cuda_graph_booleans
    settings = {
        "scheduler_type": cb_config.scheduler_type,
        "block_size": int(cb_config.block_size),
        "num_blocks": int(cb_config.num_blocks),
        "max_batch_tokens": int(cb_config.max_batch_tokens),
        "max_requests_per_batch": int(cb_config.max_requests_per_batch),
        "use_cuda_graph": [bool(varlen_graph), bool(decode_graph)],
        "use_async_batching": bool(cb_config.use_async_batching),
        "max_blocks_per_request": int(cb_config.max_blocks_per_request or 0),
        "q_padding_interval_size": int(cb_config.q_padding_interval_size),
        "kv_padding_interval_size": int(cb_config.kv_padding_interval_size),
    }
    if cb_config.safety_margin is not None:
        settings["safety_margin"] = float(cb_config.safety_margin)
    return settings


def plain_values(values: dict[str, Any]) -> dict[str, Any]:
    """A config's fields as JSON can hold them (anything else as its repr), for bench.json."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v) for k, v in values.items()}
