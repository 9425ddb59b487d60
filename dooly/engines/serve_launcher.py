"""`transformers serve` started the way the in-process harness starts its engine, and made to say
what it resolved.

Run as `python -m dooly.engines.serve_launcher --report PATH --settings JSON MODEL_DIR ...` by
`dooly.engines.http_bench`. The HTTP front end, its handlers and the engine are transformers' own,
unmodified; three things differ from a bare `transformers serve --continuous-batching`, each so an
HTTP cell runs the engine an in-process cell runs:

- the engine settings reach the server as the in-process harness passes them,
  `ContinuousBatchingConfig(**settings)`, not through the `--cb-*` flags (which cover five fields);
- the continuous-batching manager is built, warmed up (`manager.warmup()`, its CUDA graphs
  pre-captured at the largest shapes) and started before the server answers /health, as the
  in-process harness does before its first request, not lazily on the first request (whose
  generation config would then be the manager's and whose latency would carry the start-up);
- the handlers tokenize with the harness's word-level tokenizer, loaded by its own class (the
  model manager's AutoProcessor picks the model type's class, which for qwen2 reads it as a BPE
  and turns every prompt into zero tokens), and the report says whether a probe prompt
  round-trips through the tokenizer the handlers hold;
- before the server answers, the manager as it resolved is written to the report: the attention
  implementation the model runs, its dtype and device, the resolved `ContinuousBatchingConfig`
  (the engine settings in the names the simulator takes, and every field) and the generation
  config. The client refuses a run whose report differs from what it asked
  (`http_bench.settings_mismatches`).

With `--steps PATH`, the engine's steps are recorded as the in-process harness records them (the
same probe: composition, CUDA graph path, host phases, device time from CUDA events) and written
to PATH as JSON when the server is terminated (SIGTERM stops the engine, resolves the events,
writes, exits). The client keeps the steps of its recorded pass, so an HTTP cell carries the
server's engine steps beside the client's timings: the two harnesses can be compared step by step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

REPORT_SCHEMA = "dooly.http_server_resolved/1"
TORCH_PREFIX = "torch."
LOG_LEVEL = "info"
STEPS_SCHEMA = "dooly.http_server_steps/1"
# How often the main thread wakes from waiting on the server thread, so SIGTERM's handler runs.
JOIN_POLL_S = 0.5


def resolved_report(manager: Any, tokenizer: Any) -> dict[str, Any]:
    """What the server's engine runs, read off the live manager after its warm-up (the KV cache is
    built then, so num_blocks and max_batch_tokens are the concrete values), and whether the
    handlers' `tokenizer` gives the engine the prompts the client sends."""
    import transformers

    from dooly.engines.transformers_bench import plain_values, scheduler_settings
    from dooly.engines.word_tokenizer import tokenizer_round_trips

    model = manager.model
    config = manager.continuous_batching_config
    return {
        "schema": REPORT_SCHEMA,
        "attn_implementation": str(model.config._attn_implementation),
        "dtype": str(model.dtype).removeprefix(TORCH_PREFIX),
        "device": str(model.device),
        "engine_settings": scheduler_settings(config),
        "continuous_batching_config": json.loads(json.dumps(plain_values(vars(config)))),
        "generation_config": json.loads(json.dumps(manager.generation_config.to_diff_dict(), default=str)),
        "warmed_up": bool(manager.warmed_up),
        "tokenizer": {"class": type(tokenizer).__name__,
                      "round_trip": tokenizer_round_trips(tokenizer, int(model.config.get_text_config().vocab_size))},
        "transformers_version": transformers.__version__,
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    """Written whole or not at all: the client reads it as soon as /health answers."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(report, indent=2, sort_keys=True))
    os.replace(partial, path)


def write_steps(steps: list[Any], path: Path) -> None:
    """The server engine's step records, written whole (`dooly.engines.groundtruth.StepRecord` fields)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"schema": STEPS_SCHEMA, "steps": [dataclasses.asdict(s) for s in steps]}))
    os.replace(partial, path)


def read_steps(path: Path) -> list[Any]:
    """The step records a launcher wrote with `write_steps`."""
    from dooly.engines.groundtruth import StepRecord

    document = json.loads(path.read_text())
    return [StepRecord(**{**raw, "prefill": [tuple(p) for p in raw["prefill"]]}) for raw in document["steps"]]


def _stop_and_write_on_sigterm(manager: Any, probe: Any, steps_path: Path) -> None:
    """On SIGTERM: stop the engine (its CUDA events resolve only once it is idle), write the steps,
    exit. The handler runs in the main thread, which waits on the server thread in short joins."""
    from dooly.engines.transformers_bench import ENGINE_STOP_TIMEOUT_S

    def handler(signum: int, frame: Any) -> None:
        manager.stop(block=True, timeout=ENGINE_STOP_TIMEOUT_S, keep_for_next_session=False)
        probe.gc_clock.stop()
        write_steps(probe.finish(), steps_path)
        os._exit(0)

    signal.signal(signal.SIGTERM, handler)


def _wait(thread: threading.Thread) -> None:
    while thread.is_alive():
        thread.join(timeout=JOIN_POLL_S)


def serve(model_dir: str, *, attn_implementation: str, device: str, dtype: str, host: str, port: int,
          settings: dict[str, Any], report_path: Path, steps_path: Path | None = None) -> None:
    """Build transformers' server, start its engine as the in-process harness starts one, write
    the report, then serve until terminated."""
    from transformers import GenerationConfig
    from transformers.cli.serve import Serve
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # The manager's generation config is the in-process harness's (greedy, EOS disabled); each
    # request still carries its own max_new_tokens and eos_token_id to add_request.
    from dooly.engines.transformers_bench import NO_EOS_GENERATION, cpu_settings
    from dooly.engines.word_tokenizer import load_word_tokenizer

    if device == "cpu":
        settings = cpu_settings(settings, ContinuousBatchingConfig().block_size)

    class _DeferredServe(Serve):  # type: ignore[misc]
        """Serve, built with non_blocking=True, whose uvicorn thread starts once the engine is up."""

        def start_server(self) -> None:
            return None

    server = _DeferredServe(force_model=model_dir, continuous_batching=True, attn_implementation=attn_implementation,
                            device=device, dtype=dtype, host=host, port=port, log_level=LOG_LEVEL, non_blocking=True)
    model_id = server._model_manager.process_model_name(model_dir)
    model: Any = server._model_manager.load_model_and_processor(model_id)[0]
    server._model_manager.loaded_models[model_id].processor = load_word_tokenizer(Path(model_dir))
    handlers_tokenizer = server._model_manager.load_model_and_processor(model_id)[1]
    # The handlers' continuous-batching wrapper: holding the started manager, it never builds one.
    cb_generate: Any = server._generation_state.get_manager(model_id, use_cb=True)
    manager = model.init_continuous_batching(generation_config=GenerationConfig(**NO_EOS_GENERATION),
                                             continuous_batching_config=ContinuousBatchingConfig(**settings))
    manager.warmup()
    cb_generate._cb = manager
    if steps_path is not None:
        import torch

        from dooly.engines.transformers_bench import StepProbe

        probe = StepProbe(manager, torch.device(device))
        probe.install(manager.batch_processor)
        probe.recording = True
        _stop_and_write_on_sigterm(manager, probe, steps_path)
    manager.start()
    write_report(resolved_report(manager, handlers_tokenizer), report_path)
    Serve.start_server(server)
    _wait(server._thread)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dooly.engines.serve_launcher", description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--settings", required=True, help="JSON object: ContinuousBatchingConfig fields")
    parser.add_argument("--attn-implementation", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--steps", type=Path, help="record the engine's steps; written here as JSON on SIGTERM")
    args = parser.parse_args(argv)
    serve(args.model_dir, attn_implementation=args.attn_implementation, device=args.device, dtype=args.dtype,
          host=args.host, port=args.port, settings=json.loads(args.settings), report_path=args.report,
          steps_path=args.steps)


if __name__ == "__main__":
    main()
