"""The simulator's vLLM scheduler model against vLLM's own v1 scheduler, step by step.

Both are driven side by side on random open-loop workloads: the real `vllm.v1.core.sched.scheduler.
Scheduler` (built from the tiny engine's config and KV cache config, with its own KV cache
manager and block pool; no forward pass: each step's sampled tokens are handed back through
`update_from_output` as the model runner would) and `dooly.sim.schedulers.VllmScheduler`. Every
step must schedule the same requests in the same order with the same query lengths and contexts,
and the free KV blocks must agree after every step; small caches force preemption.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from dooly.sim.schedulers import Seq, VllmScheduler

MAX_STEPS = 4000
VOCAB = 512
SEEDS = range(6)
REQUESTS = 24


def _real_scheduler(engine, block_size: int, num_blocks: int, max_tokens: int, max_seqs: int):
    from vllm.v1.core.sched.scheduler import Scheduler

    core = engine.llm.llm_engine.engine_core.engine_core
    vllm_config = copy.copy(core.vllm_config)
    vllm_config.scheduler_config = copy.copy(vllm_config.scheduler_config)
    vllm_config.scheduler_config.max_num_batched_tokens = max_tokens
    vllm_config.scheduler_config.max_num_seqs = max_seqs
    vllm_config.cache_config = copy.copy(vllm_config.cache_config)
    vllm_config.cache_config.block_size = block_size
    kv_config = copy.deepcopy(engine.runner.kv_cache_config)
    kv_config.num_blocks = num_blocks
    for group in kv_config.kv_cache_groups:
        group.kv_cache_spec = dataclasses.replace(group.kv_cache_spec, block_size=block_size)
    return Scheduler(vllm_config=vllm_config, kv_cache_config=kv_config,
                     structured_output_manager=core.structured_output_manager, block_size=block_size)


def _entries(output) -> list[tuple[str, int, int]]:
    scheduled = output.num_scheduled_tokens
    found = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
    cached = output.scheduled_cached_reqs
    found.update(zip(cached.req_ids, cached.num_computed_tokens))
    return [(rid, q, found[rid]) for rid, q in scheduled.items()]


def _update(scheduler, output, rng):
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for rid in req_ids:
        request = scheduler.requests[rid]
        sampled.append([rng.randrange(VOCAB)] if request.num_computed_tokens >= request.num_tokens else [])
    result = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                               sampled_token_ids=sampled)
    scheduler.update_from_output(output, result)


@pytest.mark.parametrize(
    "block_size, num_blocks, max_tokens, max_seqs",
    [(32, 14, 96, 8), (32, 60, 128, 16), (64, 9, 200, 4), (32, 400, 64, 32)],
)
def test_same_batches_as_vllm(tiny_vllm, block_size, num_blocks, max_tokens, max_seqs):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    preemptions = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        real = _real_scheduler(tiny_vllm, block_size, num_blocks, max_tokens, max_seqs)
        model = VllmScheduler({"block_size": block_size, "num_gpu_blocks": num_blocks,
                               "max_num_batched_tokens": max_tokens, "max_num_seqs": max_seqs})
        arrivals = sorted(((f"q{i}", rng.randint(1, 300), rng.randint(1, 40), rng.randint(0, 30))
                           for i in range(REQUESTS)), key=lambda r: r[3])
        seqs: dict[str, Seq] = {}
        for step in range(MAX_STEPS):
            while arrivals and arrivals[0][3] <= step:
                rid, prompt, output, _ = arrivals.pop(0)
                params = SamplingParams(max_tokens=output, ignore_eos=True, temperature=0.0)
                real.add_request(Request(rid, [rng.randrange(VOCAB) for _ in range(prompt)], params, None))
                seqs[rid] = Seq(rid, 0.0, prompt, output)
                model.add(seqs[rid])
            if not real.has_requests() and not arrivals:
                break
            output = real.schedule()
            mine = model.schedule()
            got = [] if mine is None else [(s.rid, q, ctx) for s, q, ctx in mine.entries]
            assert got == _entries(output), f"seed {seed} step {step}"
            _update(real, output, rng)
            for seq, epoch in [] if mine is None else mine.samplers:
                if seq.epoch == epoch and not seq.finished:
                    seq.generated += 1
                    if seq.generated >= seq.target:
                        seq.finished = True
                        model.finish(seq)
            assert model.free_blocks == real.kv_cache_manager.block_pool.get_num_free_blocks(), f"seed {seed} step {step}"
        assert all(seq.finished for seq in seqs.values()), f"seed {seed}: unfinished after {MAX_STEPS} steps"
        preemptions += sum(seq.preemptions for seq in seqs.values())
    if num_blocks == 14:
        assert preemptions > 0, "the small-cache case must exercise preemption"
