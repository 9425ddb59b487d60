"""Scheduler models that make the same per-step decisions as real serving engines.

Each model mirrors one engine's scheduling code, decision for decision, on token counts instead of
token ids, so that the simulated batches are the batches the engine would run:

- `TransformersCBScheduler`: transformers 5.17 continuous batching (`generation/continuous_batching`:
  `scheduler.py` FIFO and prefill-first schedulers, `cache.py` block allocation,
  `offloading_manager.py` eviction, `continuous_api.py` the loop around them). Every step walks the
  candidates in priority order (FIFO: decoding, then split prefills, then waiting requests;
  prefill-first: split prefills first), chunks a prompt to the remaining `max_batch_tokens`,
  allocates KV blocks with the engine's formula, stops admitting prefills when free blocks fall
  under `safety_margin * num_blocks`, and when an active request cannot get blocks evicts the
  newest starved requests (CPU offload when a swap pool is configured, else a "soft reset": the
  request is re-queued with its generated tokens appended to the prompt and recomputed).
- `VllmScheduler`: vLLM v1 (`v1/core/sched/scheduler.py`): running requests first in FCFS order
  (decodes and the remaining chunks of partial prefills), each capped by the token budget; on
  block exhaustion the last running request is preempted by recompute (blocks freed, put back at
  the head of the waiting queue); waiting requests are admitted only in steps with no preemption,
  up to `max_num_seqs`, with chunked prefill under `max_num_batched_tokens`.

transformers' layer groups are modelled (`cache.py` `group_layers_by_attn_type`, `blocks_needed`):
every group draws from one block pool, a full-attention group one block per requested block, a
sliding-window group at most the blocks of one window per request; gemma-2's alternating layers
make two groups, so a short request holds twice the blocks a Llama's does.

Not modelled (both engines): prefix caching / block sharing (synthetic prompts share no prefix),
vLLM's sliding-window block freeing, parallel sampling (`num_children`), speculative decoding, the
time of CPU<->GPU KV copies.

Token accounting shared by both: `computed` tokens are in the KV cache (advanced when a step is
scheduled, as both engines do), `num_tokens` counts prompt + generated + the token a scheduled step
will sample (a placeholder until the step completes), `generated` counts tokens delivered.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field, fields
from itertools import chain, repeat
from typing import Any

from dooly.errors import DoolyError
from dooly.sim.step_model import StepKind, StepPath

# Request status, the transformers names (vLLM's WAITING/PREEMPTED map to PENDING, RUNNING to
# PREFILLING or DECODING).
PENDING, PREFILLING, DECODING = 0, 1, 2


class SimulationError(DoolyError):
    """The configured engine cannot serve the workload (e.g. a request larger than the KV cache)."""


class Seq:
    """One request's scheduling state during a simulation."""

    __slots__ = (
        "arrival_s",
        "blocks",
        "computed",
        "cpu_blocks",
        "epoch",
        "finish_s",
        "finished",
        "first_token_s",
        "generated",
        "held",
        "num_tokens",
        "offloaded",
        "preemptions",
        "prompt",
        "rid",
        "status",
        "target",
        "token_times",
    )

    def __init__(self, rid: str, arrival_s: float, prompt: int, target: int) -> None:
        self.rid = rid
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.target = target
        self.generated = 0
        self.num_tokens = prompt
        self.computed = 0
        # Logical blocks (the engine's `allocated_blocks`), and the physical blocks they hold
        # across the engine's layer groups (transformers; vLLM counts logical blocks only).
        self.blocks = 0
        self.held = 0
        self.cpu_blocks = 0
        self.status = PENDING
        self.offloaded = False
        self.preemptions = 0
        # Bumped when the request's in-flight work is thrown away (recompute, offload roll-back):
        # a step scheduled under an older epoch delivers no token.
        self.epoch = 0
        self.finished = False
        self.first_token_s = math.nan
        self.finish_s = math.nan
        self.token_times: list[float] | None = None


@dataclass(slots=True)
class ScheduledBatch:
    """What one step runs: the step model's inputs plus who samples a token."""

    prefill: list[tuple[int, int]]
    decode_ctx: list[int]
    samplers: list[tuple[Seq, int]]
    path: StepPath
    num_tokens: int
    kv_tokens: int
    preempted: int = 0
    # (request, query tokens, context before them) of the requests after the head, in the
    # engine's batch order (`entries` has them all).
    rest: list[tuple[Seq, int, int]] = field(default_factory=list)
    # The first `certain` samplers are requests of a decode group (`_DecodeGroup`): each is handed
    # its token (none is wasted, none is its first), `finishing` those for which it is the last.
    certain: int = 0
    finishing: list[Seq] = field(default_factory=list)
    # A head of decodes taken in one go (`_certain_decodes`): the first of `decode_ctx` are theirs.
    head: list[Seq] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.prefill) + len(self.decode_ctx)

    @property
    def entries(self) -> list[tuple[Seq, int, int]]:
        """(request, query tokens, context before them) in the engine's batch order (built on
        demand: a step's head holds dozens of decodes, and nothing needs their entries but a
        parity check)."""
        if not self.head:
            return self.rest
        return [*zip(self.head, repeat(1), self.decode_ctx), *self.rest]


@dataclass(slots=True)
class DecodeWindow:
    """Steps ahead that are certain to run the same requests, each decoding one token more.

    Most steps of a loaded replica are such steps, and scheduling them one by one was most of a
    simulation's time (issue #25): the simulator runs a window's steps without calling `schedule`
    for each, with the same costs, clock and step log, then `Scheduler.advance_decodes` leaves the
    scheduler where step-by-step scheduling would have. `seqs`: the requests in batch order (`contexts`: their cached tokens; `due`: at
    least those whose next block boundary falls within the window);
    `steps`: how many steps are certain (none fails a block allocation or changes the batch, and
    only the last may deliver requests' last tokens); `admits_waiting`: whether a request arriving meanwhile
    would join a batch (the caller ends the window at the next arrival); `path`: the steps' path
    when it is the same for all of them, else None (then `path_for` each step's contexts)."""

    seqs: list[Seq]
    steps: int
    admits_waiting: bool
    path: StepPath | None
    contexts: list[int]
    due: list[Seq]


class _DecodeGroup:
    """The requests that decode, and when each will next need a block and deliver its last token,
    kept while they all decode one token a step (windows, and steps that take them as a head of
    certain decodes), so that `decode_window` need not look at each of them every time: on a
    loaded replica it runs after nearly every step that admits a request, and its look at every
    request was a sixth of a simulation.

    `tick` counts the group's steps. Each member's last token is due at a fixed tick (it gets one
    token a step), and so is its next block boundary until it takes a block (then the boundary
    moves later): two heaps of (tick, id, request), whose entries of members gone or moved are
    corrected when they come up. Requests that start decoding join at the next window
    (`joining`); one that finishes leaves; anything else (an eviction, a step that schedules its
    decodes one by one) drops the group, and the next window looks at every request again."""

    __slots__ = ("boundaries", "finishes", "joining", "members", "tick")

    def __init__(self) -> None:
        self.tick = 0
        self.members: dict[int, Seq] = {}
        self.finishes: list[tuple[int, int, Seq]] = []
        self.boundaries: list[tuple[int, int, Seq]] = []
        self.joining: list[Seq] = []

    def join(self, seq: Seq, block_size: int) -> None:
        key = id(seq)
        self.members[key] = seq
        heapq.heappush(self.finishes, (self.tick + seq.target - seq.generated, key, seq))
        heapq.heappush(self.boundaries, (self.tick + seq.blocks * block_size - seq.computed, key, seq))

    def fewest_left(self) -> int:
        """The fewest tokens a member has left to deliver (the group is not empty)."""
        finishes, members = self.finishes, self.members
        while finishes[0][1] not in members:
            heapq.heappop(finishes)
        return finishes[0][0] - self.tick

    def finishing(self) -> list[Seq]:
        """The members with no token left to deliver once the tokens of the group's steps so far
        are (they are about to leave)."""
        finishes, members, tick = self.finishes, self.members, self.tick
        done: list[Seq] = []
        while finishes and finishes[0][0] <= tick:
            _, key, seq = heapq.heappop(finishes)
            if key in members:
                done.append(seq)
        return done

    def due(self, horizon: int, block_size: int) -> list[Seq]:
        """The members whose next block boundary is fewer than `horizon` steps away."""
        boundaries, members, tick = self.boundaries, self.members, self.tick
        due: list[Seq] = []
        kept: list[tuple[int, int, Seq]] = []
        while boundaries and boundaries[0][0] < tick + horizon:
            entry = heapq.heappop(boundaries)
            _, key, seq = entry
            if key not in members:
                continue
            boundary = tick + seq.blocks * block_size - seq.computed
            if boundary != entry[0]:  # it took a block since: its boundary moved later
                heapq.heappush(boundaries, (boundary, key, seq))
                continue
            due.append(seq)
            kept.append(entry)
        for entry in kept:
            heapq.heappush(boundaries, entry)
        return due


# The path of a batch whose composition is still being formed (`TransformersCBScheduler` sets the
# real one once the batch is final).
_UNSET_PATH = StepPath(StepKind.DECODE)


class Scheduler(ABC):
    """One replica's scheduler: requests come in with `add`, each `schedule` forms the next step's
    batch (advancing the scheduler's own state as the engine does), `finish` releases a request
    that delivered its last token."""

    engine: str = ""
    async_scheduling: bool = False
    # How the asynchronous loop runs (`dooly.sim.simulator`): CUDA-graph buffer sets the steps
    # alternate between (each captures its own graphs), and whether a step's tokens are handed out
    # only after the next step is launched (transformers) or as soon as the device is done.
    async_io_pairs: int = 1
    async_handoff_after_launch: bool = False
    # Bytes the asynchronous loop copies to the device at every launch (0: none known); the
    # calibration's `input_copy_s` is scaled by it (`CpuOverheadModel.input_copy_seconds`).
    async_input_bytes: int = 0

    @abstractmethod
    def add(self, seq: Seq) -> None: ...

    @abstractmethod
    def schedule(self) -> ScheduledBatch | None:
        """The next batch, or None when nothing can run now."""

    @abstractmethod
    def finish(self, seq: Seq) -> None: ...

    @abstractmethod
    def has_unfinished(self) -> bool: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The settings in force, for result files and `--output json`."""

    @abstractmethod
    def path_for(self, prefill: list[tuple[int, int]], decode_ctx: list[int]) -> StepPath:
        """The execution path the engine takes for a batch of this composition."""

    @abstractmethod
    def stall_message(self) -> str:
        """Why unfinished requests cannot make progress (raised by the simulator)."""

    def fresh(self) -> Scheduler:
        """A scheduler with the same settings and no state: each simulated run needs its own."""
        return type(self)(self.config)  # type: ignore[attr-defined, call-arg]

    def decode_window(self) -> DecodeWindow | None:
        """The certain pure-decode steps ahead (`DecodeWindow`), or None: schedule step by step.
        A scheduler that does not model windows schedules every step."""
        return None

    def advance_decodes(self, window: DecodeWindow, steps: int) -> list[Seq]:
        """Leave the scheduler as `steps` of the window's steps, scheduled one by one, would have;
        returns the requests whose last token the last of them samples (the caller finishes them)."""
        raise NotImplementedError(f"{type(self).__name__} models no decode windows")

    def _build(self, entries: list[tuple[Seq, int]], preempted: int = 0) -> ScheduledBatch:
        """Advance the scheduled requests and collect the step model's inputs.

        A chunk that reaches the end of the known tokens samples one token; its placeholder is
        counted right away, as both engines do, so asynchronous scheduling sees it."""
        prefill: list[tuple[int, int]] = []
        decode_ctx: list[int] = []
        samplers: list[tuple[Seq, int]] = []
        ordered: list[tuple[Seq, int, int]] = []
        add_prefill, add_decode, add_sampler, add_ordered = prefill.append, decode_ctx.append, samplers.append, ordered.append
        kv_tokens = 0
        num_tokens = 0
        for seq, q in entries:
            ctx = seq.computed
            add_ordered((seq, q, ctx))
            if q == 1:
                add_decode(ctx)
            else:
                add_prefill((q, ctx))
            done = ctx + q
            kv_tokens += done
            num_tokens += q
            seq.computed = done
            if done == seq.num_tokens:
                seq.num_tokens = done + 1
                add_sampler((seq, seq.epoch))
        path = self.path_for(prefill, decode_ctx)
        return ScheduledBatch(prefill, decode_ctx, samplers, path, num_tokens, kv_tokens, preempted, ordered)


def _config_from_dict(cls: type, data: dict[str, Any], engine: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DoolyError(f"{engine} engine settings: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**data)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DoolyError(message)


# ------------------------------------------------------------------------------------------------
# transformers continuous batching
# ------------------------------------------------------------------------------------------------

# Defaults of transformers 5.17 (ContinuousBatchingConfig and continuous_batching/initialization.py).
TF_DEFAULT_BLOCK_SIZE = 256
TF_DEFAULT_MAX_BATCH_TOKENS = 8192  # PagedAttentionMemoryHandler._default_max_batch_tokens
TF_DEFAULT_MAX_REQUESTS_PER_BATCH = 1024  # FALLBACK_DEFAULTS["max_requests_per_batch"]
TF_DEFAULT_Q_PADDING = 64  # FALLBACK_DEFAULTS["q_padding_interval_size"]
TF_DEFAULT_KV_PADDING = 64 * 256  # FALLBACK_DEFAULTS["kv_padding_interval_size"]
# transformers pads the longest sequence's KV length to a power of two, at least this, under graphs.
TF_MIN_PADDED_SEQLEN_K = 1024
TF_SAFETY_MARGIN = {"fifo": 0.15, "prefill_first": 0.0}  # the scheduler classes' defaults
# Bytes of one attention-mask element: the model's dtype, 16-bit on every run Dooly has (bfloat16);
# the engine settings do not carry the dtype.
TF_MASK_ELEMENT_BYTES = 2
# The engine sizes num_blocks from free GPU memory; a simulation needs it given. This default is
# 131072 KV tokens: read the real value from the engine's log ("Paged cache initialized").
TF_DEFAULT_NUM_BLOCKS = 512


@dataclass
class TransformersCBConfig:
    """The `ContinuousBatchingConfig` settings that change scheduling decisions or the step path.

    `use_cuda_graph` is a bool or `[varlen, decode]`; `max_blocks_per_request > 0` enables the
    decode fast path (flash-attention only); `cpu_offload_blocks` sizes the CPU swap pool in
    blocks (the engine's `cpu_offload_space` GiB divided by the bytes of one block; 0 = soft reset).
    The three group fields are the model's, not the engine's: its layer groups by attention kind,
    and its sliding window in tokens (`dooly.models.layout.cache_groups_from_facts`; the engine-side reference is
    `dooly.engines.transformers_cb.cache_groups`).
    """

    scheduler_type: str = "fifo"
    block_size: int = TF_DEFAULT_BLOCK_SIZE
    num_blocks: int = TF_DEFAULT_NUM_BLOCKS
    max_batch_tokens: int = TF_DEFAULT_MAX_BATCH_TOKENS
    max_requests_per_batch: int = TF_DEFAULT_MAX_REQUESTS_PER_BATCH
    safety_margin: float | None = None
    use_cuda_graph: bool | list[bool] = False
    use_async_batching: bool = False
    max_blocks_per_request: int = 0
    q_padding_interval_size: int = TF_DEFAULT_Q_PADDING
    kv_padding_interval_size: int = TF_DEFAULT_KV_PADDING
    cpu_offload_blocks: int = 0
    full_attention_groups: int = 1
    sliding_attention_groups: int = 0
    sliding_window: int = 0

    def __post_init__(self) -> None:
        _require(self.scheduler_type in TF_SAFETY_MARGIN, f"transformers scheduler_type must be one of {sorted(TF_SAFETY_MARGIN)}, got {self.scheduler_type!r}")
        _require(self.block_size >= 4, f"block_size must be >= 4 (transformers' minimum), got {self.block_size}")
        _require(self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}")
        _require(self.max_batch_tokens >= 1, f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        _require(self.max_requests_per_batch >= 1, f"max_requests_per_batch must be >= 1, got {self.max_requests_per_batch}")
        if self.safety_margin is None:
            self.safety_margin = TF_SAFETY_MARGIN[self.scheduler_type]
        _require(0.0 <= self.safety_margin <= 1.0, f"safety_margin must be in [0, 1], got {self.safety_margin}")
        if isinstance(self.use_cuda_graph, (list, tuple)):
            _require(len(self.use_cuda_graph) == 2, "use_cuda_graph as a list is [varlen, decode]")
            self.use_cuda_graph = [bool(v) for v in self.use_cuda_graph]
        else:
            self.use_cuda_graph = bool(self.use_cuda_graph)
        _require(self.max_blocks_per_request >= 0, "max_blocks_per_request must be >= 0")
        _require(self.cpu_offload_blocks >= 0, "cpu_offload_blocks must be >= 0")
        _require(self.full_attention_groups >= 0 and self.sliding_attention_groups >= 0,
                 "attention group counts must be >= 0")
        _require(self.full_attention_groups + self.sliding_attention_groups >= 1, "a model has at least one layer group")
        _require(self.sliding_window >= (1 if self.sliding_attention_groups else 0),
                 "sliding_window must be >= 1 when there are sliding-window groups")

    @property
    def cuda_graph_booleans(self) -> tuple[bool, bool]:
        if isinstance(self.use_cuda_graph, list):
            return self.use_cuda_graph[0], self.use_cuda_graph[1]
        return self.use_cuda_graph, self.use_cuda_graph

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformersCBConfig:
        return _config_from_dict(cls, data, "transformers")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def async_mask_bytes(config: TransformersCBConfig) -> int:
    """What transformers' async batching copies to the device at every launch, in bytes, for the
    eager and SDPA backends: `ContinuousBatchingIOs._transfer_inputs` copies the whole host-side
    attention mask, one per layer type (full, sliding), each max_batch_tokens x (cache tokens +
    max_batch_tokens), whatever the batch holds (2048 x 264192 bfloat16: 1.08 GB, ~20 ms on the
    H100 runs). The other inputs it copies (token ids, index lists) are under 1% of that. A
    flash-attention engine copies no mask; its own calibration measures what its copy costs."""
    layer_types = int(config.full_attention_groups > 0) + int(config.sliding_attention_groups > 0)
    columns = config.num_blocks * config.block_size + config.max_batch_tokens
    return layer_types * config.max_batch_tokens * columns * TF_MASK_ELEMENT_BYTES


class TransformersCBScheduler(Scheduler):
    """transformers 5.17 continuous batching, FIFO or prefill-first (see the module docstring)."""

    engine = "transformers"
    # `ContinuousBatchingAsyncIOs`: two IO pairs, and the loop prepare(N+1) -> launch(N+1) -> update(N).
    async_io_pairs = 2
    async_handoff_after_launch = True

    def __init__(self, config: TransformersCBConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = TransformersCBConfig()
        elif isinstance(config, dict):
            config = TransformersCBConfig.from_dict(config)
        self.config = config
        self.async_scheduling = config.use_async_batching
        self.block_size = config.block_size
        self.num_blocks = config.num_blocks
        self.num_pages = config.num_blocks * config.block_size
        self.free_blocks = config.num_blocks
        self.free_cpu_blocks = config.cpu_offload_blocks
        self.prefill_first = config.scheduler_type == "prefill_first"
        margin = config.safety_margin
        assert margin is not None, "TransformersCBConfig.__post_init__ resolves the default margin"
        self.safety_blocks = margin * config.num_blocks
        # A sliding-window group holds at most one window's blocks per request; a model without
        # full-attention layers reads at most one window per request (`Scheduler.read_cache_limit`).
        self.window_blocks = -(-config.sliding_window // config.block_size) if config.sliding_attention_groups else 0
        self.read_limit = config.sliding_window if config.sliding_attention_groups and not config.full_attention_groups else 0
        self.decode_fast_path_on = config.max_blocks_per_request > 0
        self.max_fast_path_len = config.max_blocks_per_request * config.block_size
        self.graph_varlen, self.graph_decode = config.cuda_graph_booleans
        self.pad_inputs = self.graph_varlen or self.graph_decode
        self.async_input_bytes = async_mask_bytes(config)
        self.active: dict[int, Seq] = {}
        self.waiting: OrderedDict[int, Seq] = OrderedDict()
        self.num_offloaded_waiting = 0
        self.block_new_requests = False
        self.starved: list[tuple[Seq, int]] = []
        # Every path met so far, by its fields: most steps of a run take a path met before, and
        # building a frozen StepPath each time was a twentieth of a simulation.
        self._paths: dict[tuple[StepKind, bool, int, bool, int, int], StepPath] = {}
        self._group: _DecodeGroup | None = None

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, **self.config.to_dict()}

    def add(self, seq: Seq) -> None:
        self.waiting[id(seq)] = seq

    def has_unfinished(self) -> bool:
        return bool(self.active or self.waiting)

    def finish(self, seq: Seq) -> None:
        self._release(seq)
        self.block_new_requests = False
        if self._group is not None:
            self._group.members.pop(id(seq), None)

    def schedule(self) -> ScheduledBatch | None:
        """`ContinuousBatchProcessor.prepare_next_batch`: schedule, evict until something fits,
        then evict ahead for starved requests, then restore CPU-offloaded ones."""
        if not self.active and not self.waiting:
            return None
        batch = self._schedule_batch()
        preempted = 0
        while batch is None:
            evicted = self._offload_requests()
            if evicted == 0:
                raise SimulationError(self.stall_message())
            preempted += evicted
            batch = self._schedule_batch()
        if not batch.rest and not batch.head:
            return None
        if self.starved:
            preempted += self._offload_requests()
        # A request that decodes is never offloaded, unless an eviction just now took it.
        for seq, _, _ in batch.entries if preempted else batch.rest:
            if seq.offloaded:
                seq.offloaded = False
                self.free_cpu_blocks += seq.cpu_blocks
                seq.cpu_blocks = 0
        batch.preempted = preempted
        if preempted:  # an eviction may have taken a request of the head: its token is wasted
            batch.certain = 0
        batch.path = self.path_for(batch.prefill, batch.decode_ctx)
        return batch

    # -- scheduler.py: FIFOScheduler / PrefillFirstScheduler.schedule_batch + _process_candidates --

    def _candidates(self, decoding: list[Seq], splitting: list[Seq]):
        """Active requests in priority order, then (unless blocked) the waiting ones."""
        first = splitting + decoding if self.prefill_first else decoding + splitting
        if self.block_new_requests:
            return first
        return chain(first, self._waiting_candidates())

    def _all_decode(self) -> bool:
        """Whether every active request is known to decode (all of them in the decode group)."""
        group = self._group
        return group is not None and not group.joining and len(group.members) == len(self.active)

    def _active_by_status(self, all_decode: bool) -> tuple[list[Seq], list[Seq]]:
        """The active requests that decode and those whose prompt is split, in admission order."""
        if all_decode:
            return list(self.active.values()), []
        decoding: list[Seq] = []
        splitting: list[Seq] = []
        for seq in self.active.values():
            if seq.status == DECODING:
                decoding.append(seq)
            elif seq.status == PREFILLING:
                splitting.append(seq)
        return decoding, splitting

    def _certain_decodes(
        self, decoding: list[Seq], all_decode: bool
    ) -> tuple[list[int], list[tuple[Seq, int]], int] | None:
        """Schedule the decoding requests at the head of a batch in one go, where
        `_process_candidates` would take each of them as it comes: every one decodes one token,
        none is skipped for the cache budget, none fails its block allocation and no budget runs
        out on the way (the batch goes on with the candidates after them). Most steps that admit
        a request are such (a loaded replica decodes dozens of requests beside a new prompt), and
        taking the decodes one by one was most of their scheduling. Returns (decode contexts,
        samplers, KV tokens read) with the requests advanced and their blocks allocated, or None
        (nothing changed) where one of those is not certain. `all_decode`: they are the decode
        group's, which knows which of them are at a block boundary."""
        n = len(decoding)
        cfg = self.config
        if self.read_limit or n >= cfg.max_batch_tokens or n >= cfg.max_requests_per_batch:
            return None
        contexts = [seq.computed for seq in decoding]
        reads = sum(contexts)
        if reads >= self.num_pages:
            return None
        block_size = self.block_size
        if all_decode:
            assert self._group is not None, "all_decode comes from the decode group"
            boundary = self._group.due(1, block_size)
        else:
            # A decoding request has a token to process (`num_tokens` is at least `computed` + 1),
            # so n more tokens than contexts in all means exactly one each (the group's always do).
            if sum([seq.num_tokens for seq in decoding]) - reads != n:
                return None
            boundary = [seq for seq in decoding if seq.blocks * block_size <= seq.computed]
        # The decodes whose blocks are full allocate (`_allocate`'s formula); when the pool holds
        # all they take together, each of them succeeds in turn.
        if boundary:
            group_blocks = self._group_blocks
            needed = [group_blocks(seq.blocks, (2 - seq.blocks * block_size + seq.computed) // block_size + 1)[0]
                      for seq in boundary]
            if sum(needed) > self.free_blocks:
                return None
            allocate = self._allocate
            for seq in boundary:
                allocate(seq, 1)
        for seq, computed in zip(decoding, contexts, strict=True):
            seq.computed = computed + 1
            seq.num_tokens = computed + 2
        return contexts, [(seq, seq.epoch) for seq in decoding], reads

    def _waiting_candidates(self):
        """CPU-offloaded requests first, interleaved one-for-one with fresh ones. The waiting
        queue is not changed while this runs (admitted requests leave it after the loop)."""
        if not self.num_offloaded_waiting:
            yield from self.waiting.values()
            return
        offloaded = deque(s for s in self.waiting.values() if s.offloaded)
        fresh = deque(s for s in self.waiting.values() if not s.offloaded)
        while offloaded or fresh:
            if offloaded:
                yield offloaded.popleft()
            if fresh:
                yield fresh.popleft()

    def _schedule_batch(self) -> ScheduledBatch | None:
        """`_process_candidates`, decision for decision (locals bound for speed), advancing each
        scheduled request as `Scheduler._build` does in the same pass (one pass over the batch
        instead of two: this loop is most of a simulation's time). The batch's path and preempted
        count are left for `schedule` to set; None when nothing fits and an allocation failed."""
        cfg = self.config
        token_budget = cfg.max_batch_tokens
        cache_budget = self.num_pages
        request_budget = cfg.max_requests_per_batch
        fast_path = self.decode_fast_path_on
        max_fast = self.max_fast_path_len
        safety = self.safety_blocks
        block_size = self.block_size
        read_limit = self.read_limit
        admitted: list[Seq] = []
        allocation_failed = False
        self.starved = []
        prefill: list[tuple[int, int]] = []
        decode_ctx: list[int] = []
        samplers: list[tuple[Seq, int]] = []
        ordered: list[tuple[Seq, int, int]] = []
        add_prefill, add_decode, add_sampler, add_ordered = prefill.append, decode_ctx.append, samplers.append, ordered.append
        kv_tokens = 0
        num_tokens = 0
        certain = 0
        finishing: list[Seq] = []
        taken: list[Seq] = []  # the head's requests (their entries are not in `ordered`)
        all_decode = self._all_decode()
        decoding, splitting = self._active_by_status(all_decode)
        head = None if splitting and self.prefill_first else self._certain_decodes(decoding, all_decode)
        group = self._group
        if head is None:
            # Decodes taken one by one may skip one: the group's ticks no longer hold.
            group = self._group = None
            candidates = self._candidates(decoding, splitting)
        else:
            if group is not None:
                group.tick += 1
                if all_decode:
                    certain = len(decoding)
                    finishing = group.finishing()
            candidates = self._candidates([], splitting)
            decode_ctx, samplers, reads = head
            add_decode, add_sampler = decode_ctx.append, samplers.append
            taken = decoding
            n = len(decoding)
            fast_path = fast_path and (not decode_ctx or max(decode_ctx) < max_fast)
            token_budget -= n
            cache_budget -= reads
            request_budget -= n
            kv_tokens = reads + n
            num_tokens = n
        for seq in candidates:
            status = seq.status
            free_now = self.free_blocks
            if free_now < safety and (ordered or taken) and status != DECODING:
                break
            computed = seq.computed
            remaining = seq.num_tokens - computed
            request_len = remaining if remaining < token_budget else token_budget  # noqa: FURB136 (hot loop)
            read = computed if not read_limit or computed < read_limit else read_limit
            if cache_budget < read and not (fast_path and request_len == 1 and computed < max_fast):
                continue
            blocks = seq.blocks
            if (blocks == 0 or blocks * block_size - computed < request_len) and not self._allocate(seq, request_len):
                allocation_failed = True
                if free_now == 0 and status == PENDING:
                    break
                continue
            if status == PENDING:
                self.active[id(seq)] = seq
                admitted.append(seq)
            # Scheduler._build, inlined: a chunk that reaches the end of the known tokens samples
            # one token, whose placeholder is counted right away.
            if remaining <= token_budget:
                if status != DECODING:
                    seq.status = DECODING
                    if group is not None:
                        group.joining.append(seq)
                q = remaining
                done = computed + q
                seq.num_tokens = done + 1
                add_sampler((seq, seq.epoch))
            else:
                seq.status = PREFILLING
                q = token_budget
                done = computed + q
            fast_path = fast_path and q == 1 and computed < max_fast
            token_budget -= q
            cache_budget -= read
            request_budget -= 1
            add_ordered((seq, q, computed))
            if q == 1:
                add_decode(computed)
            else:
                add_prefill((q, computed))
            kv_tokens += done
            num_tokens += q
            seq.computed = done
            if token_budget == 0 or (cache_budget <= 0 and not fast_path) or request_budget <= 0:
                break
        for seq in admitted:
            del self.waiting[id(seq)]
            if seq.offloaded:
                self.num_offloaded_waiting -= 1
        if not ordered and not taken and allocation_failed:
            return None
        return ScheduledBatch(prefill, decode_ctx, samplers, _UNSET_PATH, num_tokens, kv_tokens, 0, ordered, certain,
                              finishing, taken)

    def _allocate(self, seq: Seq, num_tokens: int) -> bool:
        """`Scheduler._allocate_blocks_if_needed`, with its exact block formula, and
        `PagedAttentionCache.blocks_needed` / `allocate_blocks` across the layer groups."""
        occupancy = seq.blocks * self.block_size - seq.computed
        if occupancy < num_tokens or seq.blocks == 0:
            requested = (num_tokens - occupancy + 1) // self.block_size + 1
            needed, logical = self._group_blocks(seq.blocks, requested)
            if needed > self.free_blocks:
                if seq.status != PENDING:
                    self.starved.append((seq, needed))
                return False
            self.free_blocks -= needed
            seq.held += needed
            seq.blocks += logical
        return True

    def _group_blocks(self, blocks: int, requested: int) -> tuple[int, int]:
        """`PagedAttentionCache.blocks_needed` across the layer groups, for a request holding
        `blocks` that asks for `requested` more: (physical blocks taken, logical blocks gained)."""
        cfg = self.config
        window_left = min(max(self.window_blocks - blocks, 0), requested)
        needed = requested * cfg.full_attention_groups + window_left * cfg.sliding_attention_groups
        return needed, requested if cfg.full_attention_groups else window_left

    # -- decode windows (`DecodeWindow`): the steps `_schedule_batch` would form unchanged --

    def decode_window(self) -> DecodeWindow | None:
        """Every active request decodes, all fit one batch, no waiting request can join (or none
        waits), and the steps up to the first that delivers a request's last token (included)
        or that would fail an allocation or could skip a request for the cache budget (excluded)
        are certain. Models without a
        full-attention group (whose blocks stop growing) are scheduled step by step."""
        active = self.active
        n = len(active)
        cfg = self.config
        if self.async_scheduling or not n or not cfg.full_attention_groups:
            return None
        if n > cfg.max_batch_tokens or n > cfg.max_requests_per_batch:
            return None
        full_batch = n == cfg.max_batch_tokens or n == cfg.max_requests_per_batch
        blocked = self.block_new_requests or self.free_blocks < self.safety_blocks or full_batch
        if self.waiting and not blocked:
            return None
        seqs = list(active.values())
        block_size = self.block_size
        group = self._group
        if group is None:
            group = self._group = _DecodeGroup()
            group.joining = seqs
        if not self._join(group) or len(group.members) != n:
            return None
        contexts = [seq.computed for seq in seqs]
        context = sum(contexts)
        # Each step's reads (at most the contexts) stay under the cache budget, so no request is
        # skipped and the batch loop never stops early.
        horizon = min(self.num_pages, group.fewest_left(), (self.num_pages - 1 - context) // n + 1)
        due = group.due(horizon, block_size)
        horizon = self._allocations_within(due, horizon)
        if horizon <= 0:
            return None
        # Without padding or the decode fast path, `path_for` of n decodes depends on n alone.
        path = None if self.pad_inputs or self.decode_fast_path_on else self._path(StepKind.DECODE, False, n, False, 0, 0)
        return DecodeWindow(seqs, horizon, not blocked, path, contexts, due)

    def _join(self, group: _DecodeGroup) -> bool:
        """Whether the requests that started decoding since the group last looked can join it:
        each decodes one token a step (one token to process, one delivered already); they join.
        A request that cannot stays waiting to join (the window is refused meanwhile)."""
        active, block_size = self.active, self.block_size
        pending: list[Seq] = []
        for seq in group.joining:
            key = id(seq)
            if key not in active or key in group.members:
                continue
            if seq.status != DECODING or seq.num_tokens - seq.computed != 1 or not seq.generated:
                pending.append(seq)
                continue
            group.join(seq, block_size)
        group.joining = pending
        return not pending

    def _allocations_within(self, seqs: list[Seq], horizon: int) -> int:
        """The steps before `horizon` whose block allocations (a decode takes a block when its
        context reaches the end of its last one) all succeed, in the engine's order (`seqs` in
        batch order: at least every request with a block boundary before `horizon`)."""
        block_size = self.block_size
        events: list[tuple[int, int]] = []
        for seq in seqs:
            step = seq.blocks * block_size - seq.computed
            blocks = seq.blocks
            while step < horizon:
                needed, logical = self._group_blocks(blocks, 1)
                events.append((step, needed))
                blocks += logical
                step += block_size
        if not events:
            return horizon
        events.sort(key=lambda event: event[0])
        free = self.free_blocks
        for step, needed in events:
            free -= needed
            if free < 0:
                return step
        return horizon

    def advance_decodes(self, window: DecodeWindow, steps: int) -> list[Seq]:
        """Each request's context grows by `steps` tokens, with the blocks `_allocate` gives it
        at each block boundary on the way (all certain to succeed: `_allocations_within`; only
        the window's `due` requests meet one). The decode group (which made the window) knows
        whose last token the last step samples."""
        block_size = self.block_size
        for seq in window.due:
            done = seq.computed + steps
            while seq.blocks * block_size < done:
                seq.computed = seq.blocks * block_size
                self._allocate(seq, 1)
        for seq, computed in zip(window.seqs, window.contexts, strict=True):
            seq.computed = computed + steps
            seq.num_tokens = computed + steps + 1
        self.starved = []
        group = self._group
        assert group is not None, "a decode window comes from the decode group"
        group.tick += steps
        return group.finishing()

    def _release(self, seq: Seq) -> None:
        self.free_blocks += seq.held
        seq.blocks = seq.held = 0
        self.active.pop(id(seq), None)

    # -- offloading_manager.py: OffloadingManager.offload_requests --

    def _offload_requests(self) -> int:
        starved = self.starved
        if not starved:
            return 0
        free = self.free_blocks
        demand = sum(needed for _, needed in starved)
        num_active = len(self.active)
        victims: list[Seq] = []
        while demand > free and starved and num_active - len(victims) > 1:
            seq, needed = starved.pop()
            victims.append(seq)
            demand -= needed
            free += seq.held
        if not victims:
            return 0
        self._group = None
        victims.reverse()
        pool = self.free_cpu_blocks
        to_cpu: set[int] = set()
        for seq in victims:
            if seq.held and seq.held <= pool:
                pool -= seq.held
                to_cpu.add(id(seq))
        for seq in victims:
            if id(seq) in to_cpu:
                self._offload_to_cpu(seq)
            else:
                self._soft_reset(seq)
            self._release(seq)
            self.waiting[id(seq)] = seq
            seq.preemptions += 1
        self.block_new_requests = True
        return len(victims)

    def _offload_to_cpu(self, seq: Seq) -> None:
        seq.cpu_blocks = seq.held
        self.free_cpu_blocks -= seq.held
        if seq.status == DECODING and seq.computed == seq.prompt + seq.generated:
            # Asynchronous mode: the step in flight processed the last known token; its output
            # will be discarded, so roll back one token and re-process it on restore.
            seq.num_tokens = seq.computed
            seq.computed -= 1
            seq.epoch += 1
        seq.offloaded = True
        seq.status = PENDING
        self.num_offloaded_waiting += 1

    def _soft_reset(self, seq: Seq) -> None:
        """`RequestState.create_equivalent_initial_request`: prompt + generated tokens become the
        new prompt and are recomputed; a token in flight is lost."""
        seq.num_tokens = seq.prompt + seq.generated
        seq.computed = 0
        seq.epoch += 1
        seq.status = PENDING

    # -- the step's execution path (input_outputs.py / model_runner.py) --

    def path_for(self, prefill: list[tuple[int, int]], decode_ctx: list[int]) -> StepPath:
        """Decode fast path when every sequence decodes one token below the block-table limit
        (the scheduler's `decode_fast_path` flag); padding only when CUDA graphs are on."""
        fast = self.decode_fast_path_on and not prefill and all(c < self.max_fast_path_len for c in decode_ctx)
        num_tokens = len(decode_ctx) + sum(q for q, _ in prefill)
        graph = self.graph_decode if fast else self.graph_varlen
        padded = num_tokens
        padded_kv = padded_seqlen = 0
        if self.pad_inputs:
            cfg = self.config
            if fast:
                padded = _pad_to_pow2(num_tokens, cfg.max_requests_per_batch)
            else:
                cached = sum(c for _, c in prefill) + sum(decode_ctx)
                longest = max([q + c for q, c in prefill] + [c + 1 for c in decode_ctx], default=0)
                padded, padded_kv, padded_seqlen = self._varlen_shape(num_tokens, cached, longest)
        return self._path(StepKind.of(prefill, decode_ctx), graph, padded, fast, padded_kv, padded_seqlen if graph else 0)

    def _path(self, kind: StepKind, graph: bool, padded: int, fast: bool, padded_kv: int, padded_seqlen: int) -> StepPath:
        """The StepPath of these fields (`path_for`), built once per run."""
        key = (kind, graph, padded, fast, padded_kv, padded_seqlen)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = StepPath(
                kind,
                cuda_graph=graph,
                padded_tokens=padded,
                engine_path="decode_fast_path" if fast else "varlen",
                padded_kv=padded_kv,
                padded_seqlen_k=padded_seqlen,
            )
        return path

    def _varlen_shape(self, num_tokens: int, cached: int, longest: int) -> tuple[int, int, int]:
        """Padded query tokens, KV tokens attention spans (the padded cached read, the engine's
        `max_kv_read`, plus the padded new tokens) and longest sequence (`pad_to_pow2`, part of
        a captured graph's key)."""
        cfg = self.config
        padded = _pad_to_interval(num_tokens, cfg.q_padding_interval_size, cfg.max_batch_tokens)
        padded_kv = _pad_to_interval(cached, cfg.kv_padding_interval_size, self.num_pages) + padded
        padded_seqlen = _pad_to_pow2(longest, self.num_pages, TF_MIN_PADDED_SEQLEN_K)
        return padded, padded_kv, padded_seqlen

    def stall_message(self) -> str:
        biggest = max(self.active.values(), key=lambda s: s.num_tokens, default=None)
        detail = f" (request {biggest.rid} holds {biggest.num_tokens} tokens)" if biggest else ""
        return (
            f"no request can be scheduled and none can be evicted: the KV cache of {self.num_blocks} "
            f"blocks x {self.block_size} tokens is too small for this workload{detail}; raise num_blocks"
        )


def _pad_to_pow2(value: int, max_value: int, min_value: int = 1) -> int:
    """transformers' `pad_to_pow2`: the next power of two, at least `min_value`, capped at `max_value`."""
    return min(1 << (max(value, min_value) - 1).bit_length(), max_value)


def _pad_to_interval(size: int, interval: int, max_value: int) -> int:
    """transformers' `pad_to_interval`: the next multiple of `interval`, capped at `max_value`."""
    if interval <= 0:
        return max_value
    padded = -(-size // interval) * interval if size > 0 else interval
    return min(padded, max_value)


# ------------------------------------------------------------------------------------------------
# vLLM v1
# ------------------------------------------------------------------------------------------------

VLLM_DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
VLLM_DEFAULT_MAX_NUM_SEQS = 256
VLLM_DEFAULT_BLOCK_SIZE = 16
# vLLM sizes the cache from gpu_memory_utilization; read "# GPU blocks" from its log. This default
# is the same 131072 KV tokens as the transformers default.
VLLM_DEFAULT_NUM_GPU_BLOCKS = 8192
VLLM_DEFAULT_MAX_CAPTURE_SIZE = 512
VLLM_NULL_BLOCKS = 1
CUDAGRAPH_MODES = ("none", "piecewise", "full", "full_decode_only", "full_and_piecewise")
_FULL_GRAPH_MODES = ("full", "full_decode_only", "full_and_piecewise")
_PIECEWISE_MODES = ("piecewise", "full_and_piecewise")
# vLLM's default capture sizes: 1, 2, 4, then steps of 8 up to 256, then steps of 16.
_CAPTURE_SMALL = (1, 2, 4)
_CAPTURE_STEP_SMALL, _CAPTURE_STEP_LARGE, _CAPTURE_SWITCH = 8, 16, 256


@dataclass
class VllmConfig:
    """vLLM v1 scheduler and CUDA-graph settings (`SchedulerConfig`, `CacheConfig`,
    `CompilationConfig`); `num_gpu_blocks` is what the engine logs after profiling memory."""

    max_num_batched_tokens: int = VLLM_DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = VLLM_DEFAULT_MAX_NUM_SEQS
    block_size: int = VLLM_DEFAULT_BLOCK_SIZE
    num_gpu_blocks: int = VLLM_DEFAULT_NUM_GPU_BLOCKS
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    cudagraph_mode: str = "full_and_piecewise"
    max_cudagraph_capture_size: int = VLLM_DEFAULT_MAX_CAPTURE_SIZE
    async_scheduling: bool = False
    # SchedulerConfig.scheduler_reserve_full_isl (vLLM >= 0.1x, default on): a waiting request is
    # admitted only when blocks for its whole known sequence are free, not just its first chunk.
    scheduler_reserve_full_isl: bool = True
    # SchedulerConfig.watermark: fraction of the blocks kept free when admitting waiting requests
    # while others run.
    watermark: float = 0.0
    capture_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _require(0.0 <= self.watermark < 1.0, "watermark must be in [0, 1)")
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.block_size >= 1, "block_size must be >= 1")
        _require(self.num_gpu_blocks >= 2, "num_gpu_blocks must be >= 2 (vLLM keeps one as its null block)")
        _require(self.long_prefill_token_threshold >= 0, "long_prefill_token_threshold must be >= 0")
        _require(self.cudagraph_mode in CUDAGRAPH_MODES, f"cudagraph_mode must be one of {CUDAGRAPH_MODES}, got {self.cudagraph_mode!r}")
        if not self.capture_sizes:
            sizes = list(_CAPTURE_SMALL)
            sizes += list(range(_CAPTURE_STEP_SMALL, _CAPTURE_SWITCH, _CAPTURE_STEP_SMALL))
            sizes += list(range(_CAPTURE_SWITCH, self.max_cudagraph_capture_size + 1, _CAPTURE_STEP_LARGE))
            self.capture_sizes = [s for s in sizes if s <= self.max_cudagraph_capture_size]
        self.capture_sizes = sorted({int(s) for s in self.capture_sizes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VllmConfig:
        return _config_from_dict(cls, data, "vllm")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("capture_sizes")
        return data


class VllmScheduler(Scheduler):
    """vLLM v1 FCFS scheduler with chunked prefill and preemption by recompute."""

    engine = "vllm"

    def __init__(self, config: VllmConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = VllmConfig()
        elif isinstance(config, dict):
            config = VllmConfig.from_dict(config)
        self.config = config
        self.async_scheduling = config.async_scheduling
        self.block_size = config.block_size
        # vLLM's BlockPool keeps one block aside as the null block (padding in block tables).
        self.free_blocks = config.num_gpu_blocks - VLLM_NULL_BLOCKS
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self._bisect_sizes = config.capture_sizes
        self.watermark_blocks = int(config.watermark * config.num_gpu_blocks)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, **self.config.to_dict()}

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def finish(self, seq: Seq) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
        self.running.remove(seq)

    def schedule(self) -> ScheduledBatch | None:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        threshold = cfg.long_prefill_token_threshold
        running = self.running
        entries: list[tuple[Seq, int]] = []
        preempted = 0
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            if self.async_scheduling and seq.num_tokens - seq.prompt >= seq.target:
                index += 1
                continue
            new = seq.num_tokens - seq.computed
            if 0 < threshold < new:
                new = threshold
            new = min(new, budget)
            if new <= 0:
                index += 1
                continue
            scheduled = True
            while not self._allocate(seq, new):
                victim = running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            entries.append((seq, new))
            budget -= new
            index += 1
        if not preempted:
            while self.waiting and budget > 0:
                if len(running) == cfg.max_num_seqs:
                    break
                seq = self.waiting[0]
                new = seq.num_tokens - seq.computed
                if 0 < threshold < new:
                    new = threshold
                if not cfg.enable_chunked_prefill and new > budget:
                    break
                new = min(new, budget)
                reserve = self.watermark_blocks if running else 0
                if cfg.scheduler_reserve_full_isl and not self._fits(seq, seq.num_tokens, reserve):
                    break
                if not self._allocate(seq, new, reserve):
                    break
                self.waiting.popleft()
                running.append(seq)
                seq.status = PREFILLING
                entries.append((seq, new))
                budget -= new
        if not entries:
            return None
        return self._build(entries, preempted)

    def _fits(self, seq: Seq, tokens: int, reserve: int = 0) -> bool:
        """Whether blocks for `tokens` tokens of `seq` could be allocated now (reserve kept free)."""
        return -(-tokens // self.block_size) - seq.blocks + reserve <= self.free_blocks

    def _allocate(self, seq: Seq, new_tokens: int, reserve: int = 0) -> bool:
        """`KVCacheManager.allocate_slots`: blocks to hold computed + new tokens, or nothing."""
        required = -(-(seq.computed + new_tokens) // self.block_size)
        needed = required - seq.blocks
        if needed + reserve > self.free_blocks:
            return False
        if needed > 0:
            self.free_blocks -= needed
            seq.blocks = required
        return True

    def _preempt(self, seq: Seq) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
        seq.computed = 0
        seq.num_tokens = seq.prompt + seq.generated
        seq.status = PENDING
        seq.preemptions += 1
        seq.epoch += 1
        self.waiting.appendleft(seq)

    def path_for(self, prefill: list[tuple[int, int]], decode_ctx: list[int]) -> StepPath:
        """Up to the largest captured size: a full CUDA graph for decode-only batches (for every
        batch in mode `full`), piecewise graphs for the others (modes with `piecewise`); eager
        above it or without graphs. The default mode is vLLM's FULL_AND_PIECEWISE."""
        mode = self.config.cudagraph_mode
        num_tokens = len(decode_ctx) + sum(q for q, _ in prefill)
        kind = StepKind.of(prefill, decode_ctx)
        sizes = self._bisect_sizes
        if mode == "none" or not sizes or num_tokens > sizes[-1]:
            return StepPath(kind, cuda_graph=False, padded_tokens=num_tokens, engine_path="eager")
        padded = sizes[bisect_left(sizes, num_tokens)]
        if mode == "full" or (kind is StepKind.DECODE and mode in _FULL_GRAPH_MODES):
            return StepPath(kind, cuda_graph=True, padded_tokens=padded, engine_path="full_graph")
        if mode in _PIECEWISE_MODES:
            return StepPath(kind, cuda_graph=True, padded_tokens=padded, engine_path="piecewise_graph")
        return StepPath(kind, cuda_graph=False, padded_tokens=num_tokens, engine_path="eager")

    def stall_message(self) -> str:
        return (
            f"a request cannot be scheduled even alone: the KV cache of {self.config.num_gpu_blocks} "
            f"blocks x {self.block_size} tokens is too small for it; raise num_gpu_blocks"
        )



ENGINES = ("transformers", "vllm")


def make_scheduler(engine: str, settings: dict[str, Any] | None = None) -> Scheduler:
    """A scheduler model by engine name, configured from a settings dict (JSON-friendly)."""
    settings = dict(settings or {})
    if engine == "transformers":
        return TransformersCBScheduler(TransformersCBConfig.from_dict(settings))
    if engine == "vllm":
        return VllmScheduler(VllmConfig.from_dict(settings))
    raise DoolyError(f"engine {engine!r} has no scheduler model; choose one of {ENGINES}")
