"""`dooly bench --client http`: the transformers engine behind its own `transformers serve` (a real
subprocess on loopback, CPU, the tiny Llama, started through dooly.engines.serve_launcher), timed
at the client, written as ground truth that `dooly validate` reads with the settings the server's
engine resolved; the runs it refuses (a server whose engine is not the one asked for, requests that
did not generate their length) and the inputs it refuses, each in one line."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from tiny_configs import TINY_LLAMA

from dooly.cli import cli
from dooly.engines.http_bench import settings_mismatches
from dooly.engines.openai_client import Timing, token_count_errors
from dooly.engines.word_tokenizer import build_tokenizer, load_word_tokenizer, prompt_text, tokenizer_round_trips
from dooly.workload import Request, generate_requests, spec_from_options

WORKLOAD = ["--requests", "6", "--rate", "20", "--prompt-len", "uniform:8:40", "--output-len", "uniform:2:6", "--seed", "4"]
SETTINGS = ["--set", "num_blocks=48", "--set", "block_size=16", "--set", "max_batch_tokens=64"]
# The same, as the engine settings a server is started with (small buffers: a fast start on a CPU).
SERVE_SETTINGS = {"num_blocks": 48, "block_size": 16, "max_batch_tokens": 64}


@pytest.fixture(scope="module")
def http_dir(tmp_path_factory) -> Path:
    """One run through a real `transformers serve` subprocess, shared by the module (it takes ~20 s)."""
    root = tmp_path_factory.mktemp("http-bench")
    config = root / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = root / "gt"
    # No served-model cache: the model is saved for this run only (test_served_model_cache has the cache).
    result = CliRunner(env={"DOOLY_MODEL_CACHE": None}).invoke(
        cli,
        ["bench", str(config), "--client", "http", "--out", str(out), "--dtype", "float32", "--warmup-requests", "1",
         *SETTINGS, *WORKLOAD, "--output", "json"],
    )
    assert result.exit_code == 0, result.output
    return out


def test_a_prompt_of_n_ids_round_trips_through_the_tokenizer_to_the_same_n_ids():
    tokenizer = build_tokenizer(TINY_LLAMA["vocab_size"])
    ids = np.random.default_rng(0).integers(1, TINY_LLAMA["vocab_size"], size=300).tolist()
    assert tokenizer(prompt_text(ids))["input_ids"] == ids
    # Every id decodes to a word: each generated token is one non-empty streamed chunk.
    assert all(tokenizer.decode([i]) for i in range(TINY_LLAMA["vocab_size"]))


# A Qwen2-type model: transformers' AutoProcessor maps its model type to Qwen2Tokenizer, which reads
# the word-level tokenizer as a BPE and tokenizes every prompt to nothing.
TINY_QWEN2 = {**TINY_LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


def test_the_served_tokenizer_round_trips_whatever_the_model_type(tmp_path):
    from transformers import AutoProcessor

    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN2))
    build_tokenizer(TINY_QWEN2["vocab_size"]).save_pretrained(tmp_path)
    # What the server's model manager would hand its handlers: not ours, and it loses the prompts.
    assert not tokenizer_round_trips(AutoProcessor.from_pretrained(str(tmp_path)), TINY_QWEN2["vocab_size"])
    # What the launcher hands them instead.
    assert tokenizer_round_trips(load_word_tokenizer(tmp_path), TINY_QWEN2["vocab_size"])


# What dooly.engines.serve_launcher reports of an engine that is the one asked for (on a GPU).
RESOLVED_CONFIG: dict[str, Any] = {"num_blocks": 1024, "max_batch_tokens": 2048, "use_cuda_graph": [True, True],
                                   "use_async_batching": False}
RESOLVED: dict[str, Any] = {
    "attn_implementation": "paged|sdpa",
    "dtype": "bfloat16",
    "continuous_batching_config": RESOLVED_CONFIG,
    "generation_config": {"do_sample": False, "eos_token_id": -1, "pad_token_id": 0, "max_new_tokens": 8},
    "warmed_up": True,
    "tokenizer": {"class": "TokenizersBackend", "round_trip": True},
}
ASKED = {"num_blocks": 1024, "max_batch_tokens": 2048, "use_cuda_graph": True}


def test_a_server_that_resolved_what_was_asked_has_no_mismatch():
    assert settings_mismatches(RESOLVED, "paged|sdpa", "bfloat16", ASKED) == []
    assert settings_mismatches(RESOLVED, "paged|sdpa", "bfloat16", {"use_cuda_graph": [True, True]}) == []


@pytest.mark.parametrize(
    ("change", "asked", "expected"),
    [
        ({"attn_implementation": "paged|flash_attention_2"}, ASKED, "attention paged|flash_attention_2 (asked paged|sdpa)"),
        ({"dtype": "float16"}, ASKED, "dtype float16 (asked bfloat16)"),
        ({"continuous_batching_config": {**RESOLVED_CONFIG, "use_cuda_graph": [False, False]}},
         ASKED, "use_cuda_graph=[false, false] (asked [true, true])"),
        ({"continuous_batching_config": {**RESOLVED_CONFIG, "num_blocks": 600}},
         ASKED, "num_blocks=600 (asked 1024)"),
        ({}, {**ASKED, "use_async_batching": True}, "use_async_batching=false (asked true)"),
        ({"generation_config": {"do_sample": False, "eos_token_id": 151643}}, ASKED, "generation eos_token_id=151643"),
        ({"warmed_up": False}, ASKED, "not warmed up"),
        ({"tokenizer": {"class": "Qwen2Tokenizer", "round_trip": False}}, ASKED,
         "the server's tokenizer (Qwen2Tokenizer) does not turn a prompt's text back into its ids"),
        ({"tokenizer": None}, ASKED, "does not turn a prompt's text back"),
    ],
)
def test_a_server_whose_engine_differs_is_named_in_each_setting(change, asked, expected):
    found = settings_mismatches({**RESOLVED, **change}, "paged|sdpa", "bfloat16", asked)
    assert len(found) == 1 and expected in found[0]


def test_a_request_served_otherwise_than_its_workload_is_named():
    requests = [Request(rid, 0.0, 8, 3) for rid in "abcd"]
    timings = {
        "a": Timing(arrived_s=0.0, token_times_s=[1.0, 2.0, 3.0], prompt_tokens=8, completion_tokens=3),
        "b": Timing(arrived_s=0.0, token_times_s=[1.0, 2.0], prompt_tokens=8, completion_tokens=3),
        "c": Timing(arrived_s=0.0, token_times_s=[1.0, 2.0, 3.0], prompt_tokens=8, completion_tokens=None),
        "d": Timing(arrived_s=0.0, token_times_s=[1.0, 2.0, 3.0], prompt_tokens=0, completion_tokens=3),
    }
    assert token_count_errors(requests, timings) == [
        "b streamed 2 token(s), the server counted 3, the workload asked 3",
        "c streamed 3 token(s), the server counted None, the workload asked 3",
        "d's prompt of 8 token(s) was counted as 0 by the server",
    ]


@pytest.mark.slow
def test_every_request_streams_exactly_its_tokens_timed_at_the_client(http_dir):
    rows = {r["request_id"]: r for r in pq.read_table(http_dir / "requests.parquet").to_pylist()}
    spec = spec_from_options(requests=6, rate=20.0, prompt_len="uniform:8:40", output_len="uniform:2:6", seed=4)
    planned = {r.request_id: r for r in generate_requests(spec)}
    assert set(rows) == set(planned)
    for rid, row in rows.items():
        assert row["error"] == ""
        assert row["prompt_tokens"] == planned[rid].prompt_tokens
        assert row["output_tokens"] == planned[rid].output_tokens == len(row["token_times_s"])
        assert row["token_times_s"] == sorted(row["token_times_s"])
        assert row["arrived_at_s"] < row["first_token_s"] <= row["token_times_s"][-1] <= row["finished_s"]


@pytest.mark.slow
def test_the_record_holds_the_server_engines_steps_of_the_recorded_pass(http_dir):
    steps = pq.read_table(http_dir / "steps.parquet").to_pylist()
    requests = pq.read_table(http_dir / "requests.parquet").to_pylist()
    assert steps, "the server's engine recorded no steps"
    first_arrival = min(r["arrived_at_s"] for r in requests)
    assert [s["step"] for s in steps] == list(range(len(steps)))
    assert all(s["start_s"] >= first_arrival for s in steps)
    # The recorded pass, and nothing else, is in them: each prompt token prefilled once, each token
    # after a request's first from one decode query (warm-up requests would add to both).
    assert sum(chunk["q"] for s in steps for chunk in s["prefill"]) == sum(r["prompt_tokens"] for r in requests)
    assert sum(len(s["decode_ctx"]) for s in steps) == sum(r["output_tokens"] - 1 for r in requests)
    bench = json.loads((http_dir / "bench.json").read_text())
    assert bench["client"] == "http" and bench["engine_details"]["client"] == "http"
    details = bench["engine_details"]
    command = details["server_command"]
    assert command[1:3] == ["-m", "dooly.engines.serve_launcher"]
    assert json.loads(command[command.index("--settings") + 1]) == SERVE_SETTINGS
    assert command[command.index("--attn-implementation") + 1] == "sdpa"
    resolved = details["server_resolved"]
    assert details["settings_verified"] is True
    # Without a model cache, the model was saved in the run's directory, beside the server's files,
    # and all of it was removed after the run.
    assert details["served_model_cache"] == "off"
    model_dir = Path(command[3])
    assert model_dir.parent == Path(command[command.index("--report") + 1]).parent and not model_dir.parent.exists()
    assert (resolved["attn_implementation"], resolved["dtype"], resolved["warmed_up"]) == ("paged|sdpa", "float32", True)
    assert resolved["generation_config"]["eos_token_id"] == -1 and resolved["generation_config"]["do_sample"] is False
    # engine.json: the settings the server's engine resolved, in the in-process harness's names and form.
    engine = json.loads((http_dir / "engine.json").read_text())
    assert engine == resolved["engine_settings"]
    assert {k: engine[k] for k in SERVE_SETTINGS} == SERVE_SETTINGS
    assert engine["use_cuda_graph"] == [False, False] and engine["scheduler_type"] == "fifo"
    assert bench["summary"]["finished"] == 6 and bench["summary"]["steps"] == len(steps)


@pytest.mark.slow
def test_validate_reads_the_http_ground_truth(http_dir):
    result = CliRunner().invoke(
        cli, ["validate", str(http_dir.parent / "config.json"), "--analytic", "--ground-truth", str(http_dir),
              "--no-cpu-overhead", "--output", "json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["requests"]["ttft"]["n"] == 6 and report["requests"]["unmatched_requests"] == 0
    assert report["simulation"]["settings"]["num_blocks"] == 48


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--client", "http", "--server-url", f"http://127.0.0.1:{_closed_port()}"], 75, "is unreachable"),
        (["--client", "http", "--set", "no_such_setting=1"], 2, "engine settings rejected by ContinuousBatchingConfig"),
        (["--server-url", "http://127.0.0.1:1"], 2, "--server-url needs --client http"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, code, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "gt"
    result = CliRunner().invoke(cli, ["bench", str(config), "--out", str(out), "--requests", "2", "--dtype", "float32", *extra])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_server_url_sends_the_workload_to_a_server_already_running(tmp_path):
    """A server started outside the command (here with the harness's own helpers, as a user would
    with `transformers serve DIR`): the command only connects, and records no server command."""
    import torch

    from dooly.engines.http_bench import RESOLVED_REPORT_NAME, save_served_model, transformers_serve_command
    from dooly.engines.openai_client import started_server
    from dooly.models.registry import build_hf_config, resolve_model

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    model_dir = tmp_path / "served"
    save_served_model(build_hf_config(resolve_model(str(config))), "paged|sdpa", "cpu", torch.float32, 0, model_dir)
    command = lambda port: transformers_serve_command(  # noqa: E731
        model_dir, port, "paged|sdpa", "cpu", "float32", SERVE_SETTINGS, tmp_path / RESOLVED_REPORT_NAME,
        tmp_path / "steps.json")
    out = tmp_path / "gt"
    with started_server(command, tmp_path) as server:
        result = CliRunner().invoke(
            cli, ["bench", str(config), "--client", "http", "--server-url", server.url, "--out", str(out),
                  "--warmup-requests", "0", "--requests", "3", "--rate", "20", "--prompt-len", "12", "--output-len", "4",
                  *SETTINGS, "--output", "json"],
        )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "requests.parquet").to_pylist()
    assert [(r["prompt_tokens"], r["output_tokens"], len(r["token_times_s"])) for r in rows] == [(12, 4, 4)] * 3
    details = json.loads((out / "bench.json").read_text())["engine_details"]
    assert details == {"client": "http", "server_url": server.url, "server_command": None, "server_resolved": None,
                       "settings_verified": False}
    assert json.loads((out / "engine.json").read_text()) == SERVE_SETTINGS


@pytest.mark.slow
def test_a_server_whose_engine_resolved_other_settings_is_refused_before_any_request(tmp_path):
    """CUDA graphs asked on a CPU: the server's engine turns them off, so the run would not be the
    engine asked for. Refused in one line once the server reports, and nothing is written."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "gt"
    result = CliRunner().invoke(
        cli, ["bench", str(config), "--client", "http", "--out", str(out), "--dtype", "float32", "--warmup-requests", "0",
              "--requests", "2", *SETTINGS, "--set", "use_cuda_graph=true"],
    )
    assert result.exit_code == 2, result.output
    # One error line, the last (the model's save may print a progress bar before it).
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: the server's engine resolved other settings than the run asked")
    assert "use_cuda_graph=[false, false] (asked [true, true])" in last and result.output.count("error:") == 1
    assert not out.exists()
