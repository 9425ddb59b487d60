"""`dooly bench --client http`: the transformers engine behind its own `transformers serve` (a real
subprocess on loopback, CPU, the tiny Llama), timed at the client, written as ground truth that
`dooly validate` reads; and the inputs it refuses in one line."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from tiny_configs import TINY_LLAMA

from dooly.cli import cli
from dooly.engines.http_bench import build_tokenizer, prompt_text, serve_flags
from dooly.errors import DoolyError
from dooly.workload import generate_requests, spec_from_options

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
    result = CliRunner().invoke(
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


def test_engine_settings_map_to_serve_flags_or_are_refused():
    assert serve_flags({"num_blocks": 48, "block_size": 16, "max_batch_tokens": 64, "use_cuda_graph": [True, True]}) == [
        "--cb-num-blocks", "48", "--cb-block-size", "16", "--cb-max-batch-tokens", "64", "--cb-use-cuda-graph"]
    assert serve_flags({"use_cuda_graph": False}) == ["--no-cb-use-cuda-graph"]
    with pytest.raises(DoolyError, match="no flag for engine setting 'scheduler_type'"):
        serve_flags({"scheduler_type": "fifo"})
    with pytest.raises(DoolyError, match="one switch for both paths"):
        serve_flags({"use_cuda_graph": [False, True]})


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
def test_the_record_says_http_with_the_server_command_and_no_steps(http_dir):
    assert pq.read_table(http_dir / "steps.parquet").num_rows == 0
    assert json.loads((http_dir / "engine.json").read_text()) == {"num_blocks": 48, "block_size": 16, "max_batch_tokens": 64}
    bench = json.loads((http_dir / "bench.json").read_text())
    assert bench["client"] == "http" and bench["engine_details"]["client"] == "http"
    command = bench["engine_details"]["server_command"]
    assert command[command.index("serve") + 2:command.index("serve") + 5] == ["--continuous-batching", "--attn-implementation", "sdpa"]
    assert ["--cb-num-blocks", "48"] == command[command.index("--cb-num-blocks"):][:2]
    assert bench["summary"]["finished"] == 6 and bench["summary"]["steps"] == 0


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
        (["--client", "http", "--set", "scheduler_type=fifo"], 2, "transformers serve has no flag for engine setting"),
        (["--client", "http", "--set", "use_cuda_graph=[false,true]"], 2, "one switch for both paths"),
        (["--server-url", "http://127.0.0.1:1"], 2, "--server-url needs --client http"),
        (["--client", "http", "--engine", "vllm"], 2, "serves the transformers engine for now"),
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

    from dooly.engines.http_bench import save_served_model, started_server, transformers_serve_command
    from dooly.models.registry import build_hf_config, resolve_model

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    model_dir = tmp_path / "served"
    save_served_model(build_hf_config(resolve_model(str(config))), "paged|sdpa", "cpu", torch.float32, 0, model_dir)
    command = lambda port: transformers_serve_command(model_dir, port, "paged|sdpa", "cpu", "float32", SERVE_SETTINGS)  # noqa: E731
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
    assert details == {"client": "http", "server_url": server.url, "server_command": None}
    assert json.loads((out / "engine.json").read_text()) == SERVE_SETTINGS
