"""Ground truth for composed step predictions: real engine steps of a whole model, timed.

It records a GPU engine's own steps, so it sits with the engine adapters (like `dooly bench`); its
output is ground truth for the simulator's `validate-steps`, which reads the JSON, not this module.

`dooly measure-steps MODEL --tp N` starts N ranks (`dooly.distributed.launch`), builds the whole
model with random weights through the engine's own code (transformers' tensor-parallel loading
for N > 1, so its TP plan's all_reduce and all_gather run as in serving), the paged KV cache and
the step inputs for each batch composition, and times the engine's model-runner step (forward,
logits, sampling: `TransformersCBEngine.run_step`), the very work a trace records.

Per composition, on CUDA:
- `graph`: the step captured once in a CUDA graph (collectives included) and replayed; CUDA
  events around each replay. This is device time, what the composed prediction (per-rank
  compute ops measured by graph replay + collectives) stands for;
- `eager`: CUDA events around one eager step: device time plus whatever host launch time the
  GPU waits for. transformers runs `paged|sdpa` and `paged|eager` steps eagerly, so this is what
  the engine's forward costs there; the simulator adds host overhead separately.
Before each sample the ranks meet at a host barrier; a sample is the maximum over ranks; rows
report the median, p10 and p90 over samples. On the CPU (gloo) only `eager` exists, timed with
the process clock.

The output is one JSON document (`dooly.measured_steps/1`), read by `dooly validate-steps`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import click

from dooly.distributed import RankContext
from dooly.engines.base import Batch
from dooly.engines.transformers_cb import DEFAULT_BLOCK_SIZE as KV_BLOCK_SIZE
from dooly.errors import DoolyError
from dooly.models.validation import allow_defaults_option
from dooly.output import emit_json, format_table, output_option
from dooly.outputs import writable_file

log = logging.getLogger(__name__)

SCHEMA = "dooly.measured_steps/1"
WARMUP_STEPS = 3
DEFAULT_SAMPLES = 10
# Blocks beyond the largest composition: per-sequence rounding, and room to spare.
BLOCK_HEADROOM = 2
P10, P90 = 10, 90
MS_PER_S = 1e3
LOG_CHARS = 200
# NCCL must not serialise graph and non-graph launches of one communicator (transformers asks
# for the same when it runs continuous batching with tensor parallelism).
STEP_ENV = {"NCCL_GRAPH_MIXING_SUPPORT": "0"}

# Batch compositions: (name, prefill chunks as (new tokens, context), decode contexts). The
# default set stays inside the profiler's default grid (<= 4096 tokens, <= 65536 KV tokens), so
# the prediction interpolates rather than extrapolates.
COMPOSITIONS: dict[str, list[tuple[str, list[tuple[int, int]], list[int]]]] = {
    "default": [
        ("prefill-128", [(128, 0)], []),
        ("prefill-512", [(512, 0)], []),
        ("prefill-2048", [(2048, 0)], []),
        ("prefill-4x256", [(256, 0)] * 4, []),
        ("chunk-512-after-2048", [(512, 2048)], []),
        ("decode-8x1024", [], [1024] * 8),
        ("decode-32x1024", [], [1024] * 32),
        ("decode-16x3000", [], [3000] * 16),
        ("decode-128x256", [], [256] * 128),
        ("mixed-256+16x1024", [(256, 0)], [1024] * 16),
        ("mixed-512@1024+32x1024", [(512, 1024)], [1024] * 32),
        ("mixed-1024+64x512", [(1024, 0)], [512] * 64),
    ],
    # For CPU dry runs with tiny models: every kind, a few tokens each.
    "small": [
        ("prefill-8", [(8, 0)], []),
        ("prefill-2x4", [(4, 0)] * 2, []),
        ("decode-4x16", [], [16] * 4),
        ("mixed-4+2x8", [(4, 0)], [8] * 2),
    ],
}


def step_kind(prefill: list[tuple[int, int]], decode: list[int]) -> str:
    if prefill and decode:
        return "mixed"
    return "prefill" if prefill else "decode"


def compositions(name_or_path: str) -> list[dict[str, Any]]:
    """A named preset or a JSON file: [{"name", "prefill": [[q, ctx], ...], "decode": [ctx, ...]}]."""
    entries: Any
    if name_or_path in COMPOSITIONS:
        entries = [{"name": n, "prefill": [list(p) for p in pf], "decode": list(d)} for n, pf, d in COMPOSITIONS[name_or_path]]
    else:
        path = Path(name_or_path)
        try:
            entries = json.loads(path.read_text())
        except FileNotFoundError:
            raise DoolyError(
                f"compositions {name_or_path!r}: neither a preset ({', '.join(COMPOSITIONS)}) nor a file"
            ) from None
        except json.JSONDecodeError as exc:
            raise DoolyError(f"compositions file {path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise DoolyError(f"compositions {name_or_path!r}: expected a non-empty list")
    for index, entry in enumerate(entries):
        try:
            prefill = [(int(q), int(c)) for q, c in entry.get("prefill", [])]
            decode = [int(c) for c in entry.get("decode", [])]
        except (AttributeError, TypeError, ValueError):
            raise DoolyError(f"composition {index} must hold prefill [[q, ctx], ...] and decode [ctx, ...]") from None
        if not prefill and not decode or any(q < 1 or c < 0 for q, c in prefill) or any(c < 1 for c in decode):
            raise DoolyError(f"composition {index}: an empty step, a chunk of no tokens or a decode without context")
        entry.setdefault("name", f"step-{index}")
        entry["prefill"], entry["decode"] = [list(p) for p in prefill], decode
    return entries


def _batch(entry: dict[str, Any]) -> Batch:
    return Batch.of(prefill=[tuple(p) for p in entry["prefill"]], decode_ctx=list(entry["decode"]))


def cache_geometry(entries: list[dict[str, Any]]) -> dict[str, int]:
    batches = [_batch(e) for e in entries]
    blocks = max(sum(-(-s.kv // KV_BLOCK_SIZE) for s in b.seqs) for b in batches)
    return {
        "num_blocks": BLOCK_HEADROOM * blocks + 1,
        "max_batch_tokens": max(b.tokens for b in batches),
        "max_requests": max(b.num_seqs for b in batches),
    }


def rank_worker(ctx: RankContext, payload: dict[str, Any]) -> None:
    """Each rank: build the engine (its shard of the model), then time every composition."""
    import torch
    import transformers

    from dooly.engines.transformers_cb import TransformersCBEngine
    from dooly.models.registry import ModelSpec, build_hf_config
    from dooly.trace.tracer import DTYPES

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(payload["seed"])
    spec = ModelSpec(model_id=payload["model_id"], config=payload["config"], source=payload["model_id"])
    geometry = payload["geometry"]
    built = time.perf_counter()
    engine = TransformersCBEngine(
        build_hf_config(spec), attention=payload["backend"], dtype=DTYPES[payload["dtype"]], device=ctx.torch_device,
        block_size=KV_BLOCK_SIZE, num_blocks=geometry["num_blocks"], max_batch_tokens=geometry["max_batch_tokens"],
        tp_size=ctx.world_size,
    )
    with torch.no_grad():
        engine.build_model()
        engine.build_cache(max_requests=geometry["max_requests"])
    ctx.report(("built", time.perf_counter() - built))
    timer = _StepTimer(ctx, payload["samples"])
    # Eager steps of every composition first: a graph capture that fails later cannot spoil them.
    for index, entry in enumerate(payload["entries"]):
        with torch.no_grad():
            result = timer.eager(engine, _batch(entry))
        ctx.report(("step", index, {**entry, "kind": step_kind(entry["prefill"], entry["decode"]), **result}))
    if not (payload["graphs"] and ctx.device == "cuda"):
        return
    for index, entry in enumerate(payload["entries"]):
        with torch.no_grad():
            graphed = timer.graph(engine, _batch(entry))
        if graphed is None:
            ctx.report(("graphs-off", index, None))
            return
        ctx.report(("graph", index, graphed))


# cudaStreamCaptureModeThreadLocal: other threads (NCCL's watchdog) may keep calling CUDA.
CAPTURE_MODE = "thread_local"


class _StepTimer:
    def __init__(self, ctx: RankContext, samples: int) -> None:
        self.ctx = ctx
        self.samples = samples

    def eager(self, engine: Any, batch: Batch) -> dict[str, Any]:
        kwargs = engine.step_inputs(batch)

        def step() -> None:
            engine.run_step(kwargs)

        for _ in range(WARMUP_STEPS):
            step()
        self._sync()
        result: dict[str, Any] = {"tokens": batch.tokens, "seqs": batch.num_seqs, "kv_tokens": batch.kv_tokens}
        result.update(_stats("eager", self._samples(step)))
        engine.release()
        return result

    def graph(self, engine: Any, batch: Batch) -> dict[str, Any] | None:
        """Graph-replay statistics, or None on every rank when any rank could not capture."""
        import torch

        kwargs = engine.step_inputs(batch)

        def step() -> None:
            engine.run_step(kwargs)

        graph = self._capture(step)
        if graph is None:
            engine.release()
            return None
        result = _stats("graph", self._samples(graph.replay))
        del graph
        engine.release()
        torch.cuda.empty_cache()
        return result

    def _capture(self, step: Any) -> Any:
        import torch

        graph = torch.cuda.CUDAGraph()
        ok = 1.0
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
                step()
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - any capture failure means eager timing only
            log.warning("step graph capture failed on rank %d: %s", self.ctx.rank, str(exc).splitlines()[0][:LOG_CHARS])
            ok = 0.0
        flag = torch.tensor([ok], dtype=torch.float64)
        self._reduce(flag, "min")
        return graph if flag.item() >= 1.0 else None

    def _samples(self, call: Any) -> list[float]:
        import torch

        values = []
        for _ in range(self.samples):
            self._sync()
            self._barrier()
            values.append(self._timed(call))
        maxima = torch.tensor(values, dtype=torch.float64)
        self._reduce(maxima, "max")
        return maxima.tolist()

    def _timed(self, call: Any) -> float:
        import torch

        if self.ctx.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / MS_PER_S
        begin = time.perf_counter()
        call()
        return time.perf_counter() - begin

    def _reduce(self, tensor: Any, how: str) -> None:
        import torch.distributed as dist

        op = dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.MIN
        dist.all_reduce(tensor, op=op, group=self.ctx.control)

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.ctx.control)

    def _sync(self) -> None:
        if self.ctx.device == "cuda":
            import torch

            torch.cuda.synchronize()


def _stats(prefix: str, values: list[float]) -> dict[str, float]:
    from dooly.profile.measure import percentile

    return {
        f"{prefix}_s": percentile(values, 50),
        f"{prefix}_p10_s": percentile(values, P10),
        f"{prefix}_p90_s": percentile(values, P90),
        f"{prefix}_n": len(values),
    }


def measure_steps(model: str, *, tp: int, backend: str, dtype: str, device: str, preset: str,
                  samples: int = DEFAULT_SAMPLES, graphs: bool = True, seed: int = 0,
                  on_step: Any = None, store_uri: str | None = None) -> dict[str, Any]:
    """Measure real engine steps of MODEL on `tp` ranks; the `dooly.measured_steps/1` document.
    MODEL may be the id or model key of a config STORE_URI keeps (read only).

    `on_step(document)` is called after each composition with the document so far (a run cut
    short still leaves what it measured)."""
    import torch
    import transformers

    from dooly.distributed import check_world, detect_topology, launch
    from dooly.profile.provenance import detect_device, detect_platform
    from dooly.profile.run import load_model_source

    device = detect_device(device)
    if tp < 1:
        raise DoolyError(f"--tp must be >= 1, got {tp}")
    if samples < 1:
        raise DoolyError(f"--samples must be >= 1, got {samples}")
    spec, model_id, traced = load_model_source(model, backend, dtype, tp, store_uri)
    entries = compositions(preset)
    check_world(device, tp, f"measuring {model_id} with --tp {tp}")
    payload = {
        "model_id": model_id, "config": spec.config, "backend": backend, "dtype": dtype, "seed": seed,
        "samples": samples, "graphs": graphs, "entries": entries, "geometry": cache_geometry(entries),
    }
    started = time.perf_counter()
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "model_id": model_id,
        "source": model,
        "traced": traced,
        "tp": tp,
        "backend": backend,
        "dtype": dtype,
        "device": device,
        "platform": detect_platform(device),
        "topology": detect_topology(device, tp).to_dict(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "samples": samples,
        "build_seconds": None,
        "seconds": 0.0,
        "steps": [],
    }

    def on_message(message: tuple) -> None:
        if message[0] == "built":
            document["build_seconds"] = message[1]
            return
        kind, index, body = message
        if kind == "step":
            document["steps"].append(body)
            log.info("%s: eager %.3f ms", body["name"], body["eager_s"] * MS_PER_S)
        elif kind == "graph":
            document["steps"][index].update(body)
            log.info("%s: graph %.3f ms", document["steps"][index]["name"], body["graph_s"] * MS_PER_S)
        else:
            document["graphs"] = f"capture failed at composition {index}: it and later ones have eager timings only"
            log.warning("%s", document["graphs"])
        document["seconds"] = time.perf_counter() - started
        if on_step is not None:
            on_step(document)

    launch(rank_worker, payload, world_size=tp, device=device, on_message=on_message, extra_env=STEP_ENV)
    document["seconds"] = time.perf_counter() - started
    return document


@click.command("measure-steps")
@allow_defaults_option
@click.argument("model")
@click.option("--tp", type=int, default=None, help="Tensor-parallel ranks (default: a trace file's, else 1).")
@click.option("--attention", "backend", default=None, help="Attention backend (default: a trace file's, else paged|sdpa).")
@click.option("--dtype", default=None, help="Model dtype (default: a trace file's, else bfloat16).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--compositions", "preset", default="default", show_default=True,
              help=f"Batch compositions: a preset ({', '.join(COMPOSITIONS)}) or a JSON file.")
@click.option("--samples", type=int, default=DEFAULT_SAMPLES, show_default=True, help="Timed steps per composition.")
@click.option("--no-graphs", is_flag=True, help="Time eager steps only (no CUDA-graph replay).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), callback=writable_file, help="Write the JSON document here.")
@click.option("--store", "store_uri", metavar="URI", default=None,
              help="Latency database to look MODEL up in when it is an id or model key only the store knows "
                   "(the config `dooly profile` stored); read only.")
@output_option
def measure_steps_command(model: str, tp: int | None, backend: str | None, dtype: str | None, device: str, preset: str,
                          samples: int, no_graphs: bool, out_path: str | None, store_uri: str | None,
                          output_format: str) -> None:
    """Time real engine steps of MODEL (random weights) for a set of batch compositions.

    MODEL is a bundled id, a config.json, a trace file from `dooly trace --out` (its tp,
    backend and dtype are then the defaults) or, with --store, the id or model key of a model
    profiled into it. With --tp N, N ranks run transformers' own tensor-parallel model; the
    result is the ground truth `dooly validate-steps` compares the composed prediction (one
    rank's ops + collectives) with.

    \b
    Examples:
      dooly measure-steps data/traces/Llama-3.1-8B.tp2.paged-sdpa.json --out steps.tp2.json
      dooly measure-steps ./tiny.json --tp 2 --device cpu --compositions small --samples 3
      dooly measure-steps my-model --store ./db --tp 2 --out steps.tp2.json
    """
    from dooly.profile.run import trace_defaults

    tp, backend, dtype = trace_defaults(model, tp, backend, dtype)

    def save(document: dict[str, Any]) -> None:
        if out_path:
            staged = Path(f"{out_path}.tmp")
            staged.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
            staged.replace(out_path)

    document = measure_steps(model, tp=tp, backend=backend, dtype=dtype, device=device, preset=preset,
                             samples=samples, graphs=not no_graphs, on_step=save, store_uri=store_uri)
    save(document)
    if output_format == "json":
        emit_json(document)
        return
    rows = [
        (s["name"], s["kind"], s["tokens"], s["seqs"], f"{s['eager_s'] * MS_PER_S:.3f}",
         f"{s['graph_s'] * MS_PER_S:.3f}" if "graph_s" in s else "-")
        for s in document["steps"]
    ]
    click.echo(f"{document['model_id']} on {document['platform']} x{document['tp']} ({document['topology']['label']}), "
               f"{document['backend']}, {document['dtype']}")
    click.echo(format_table(["composition", "kind", "tokens", "seqs", "eager ms", "graph ms"], rows))
