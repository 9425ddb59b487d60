"""Bad input through the CLI: one `error:` line, the documented exit code, and the store untouched.

Every case runs a real `dooly` command line (click's runner, in process) and asserts three things
(docs/errors.md): the exit code (2 bad input, 65 a refused shrinking merge, 75 a store unreachable
past its retry deadline), exactly one line on stderr, starting `error: `, with nothing on stdout,
and the store listing unchanged: every file under the test's directory, or every bucket and object
on the S3 server the tests start (moto; SeaweedFS with signatures enforced for the credential case).
Nothing here patches boto3: an unreachable store is a closed loopback port or the flaky proxy.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import EXIT_BAD_INPUT, EXIT_SHRINK_REFUSED, EXIT_TRANSIENT
from dooly.store.backends import MARKER_KEY, open_store
from dooly.store.merge import merge_store
from dooly.store.shards import write_shard

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
}
# The config of issue #22: profiled silently with transformers' defaults (hidden 4096, vocab 32000).
DEFAULTED_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2}
TINY_MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
FAST_PROFILE = ["--device", "cpu", "--dtype", "float32", "--samples", "2", "--max-tokens", "16",
                "--max-seqs", "4", "--max-kv", "512", "--max-context", "128"]
# Short deadlines so "unreachable" costs seconds, not the five-minute production default.
SHORT_DEADLINE_S = "2"


@dataclass
class Paths:
    """What a case may refer to: config files, a blocked path, and the stores of this test."""

    root: Path
    local_store: str
    s3_store: str
    s3_endpoint: str

    def config(self, name: str, payload: object | str) -> str:
        path = self.root / "configs" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
        return str(path)

    @property
    def tiny(self) -> str:
        return self.config("tiny", TINY_LLAMA)

    @property
    def a_file(self) -> Path:
        """A regular file, so `<it>/anything` can never be created (whoever runs the tests)."""
        path = self.root / "plain-file"
        path.write_text("not a directory")
        return path


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Paths], list[str]]
    says: str  # a fragment the error line must hold
    code: int = EXIT_BAD_INPUT


def _truncated(payload: dict) -> str:
    text = json.dumps(payload, indent=2)
    return text[: len(text) // 2]


CASES = [
    # -- model configs: missing, malformed, truncated, incomplete, inconsistent -----------------
    Case("missing-config-file", lambda p: ["profile", str(p.root / "nope" / "config.json"), "--store",
                                            p.local_store, *FAST_PROFILE], "no such file"),
    Case("malformed-json", lambda p: ["profile", p.config("bad", "{hidden_size: 64,}"), "--store", p.local_store,
                                       *FAST_PROFILE], "is not valid JSON"),
    Case("truncated-json", lambda p: ["profile", p.config("cut", _truncated(TINY_LLAMA)), "--store", p.local_store,
                                       *FAST_PROFILE], "is not valid JSON"),
    Case("json-list-not-object", lambda p: ["trace", p.config("list", [TINY_LLAMA])], "must hold a JSON object"),
    Case("no-model-type-nor-architectures", lambda p: ["trace", p.config("anon", {"hidden_size": 64})],
         "neither `model_type` nor `architectures`"),
    Case("defaults-would-be-used-profile", lambda p: ["profile", p.config("defaulted", DEFAULTED_LLAMA), "--store",
                                                      p.local_store, *FAST_PROFILE], "lacks hidden_size"),
    Case("defaults-would-be-used-trace", lambda p: ["trace", p.config("defaulted", DEFAULTED_LLAMA)],
         "vocab_size (transformers' default: 32000)"),
    Case("defaults-would-be-used-plan", lambda p: ["plan", p.config("defaulted", DEFAULTED_LLAMA), "--store",
                                                   p.local_store], "--allow-defaults"),
    Case("moe-config-lacks-experts", lambda p: ["trace", p.config("moe", {
        k: v for k, v in TINY_MIXTRAL.items() if k != "num_local_experts"})], "lacks num_local_experts"),
    Case("unknown-model-type", lambda p: ["trace", p.config("typo", {**TINY_LLAMA, "model_type": "llamma",
                                                                     "architectures": None})], "'llamma'"),
    Case("unknown-architecture", lambda p: ["trace", p.config("arch", {**TINY_LLAMA,
                                                                       "architectures": ["LlamaForCausalLN"]})],
         "LlamaForCausalLN"),
    Case("negative-hidden-size", lambda p: ["trace", p.config("neg", {**TINY_LLAMA, "hidden_size": -64})],
         "hidden_size must be a positive integer"),
    Case("heads-do-not-divide-hidden", lambda p: ["trace", p.config("div", {**TINY_LLAMA, "hidden_size": 66})],
         "not divisible"),
    Case("more-experts-per-token-than-experts", lambda p: ["trace", p.config("moe2", {
        **TINY_MIXTRAL, "num_experts_per_tok": 8})], "exceeds num_local_experts"),
    Case("unknown-bundled-model", lambda p: ["profile", "Llama-9.9-8B", "--store", p.local_store, *FAST_PROFILE],
         "unknown model"),
    # -- unknown names and bad numbers ------------------------------------------------------------
    Case("unknown-engine", lambda p: ["profile", p.tiny, "--store", p.local_store, "--engine", "sglang"],
         "'sglang' is not one of"),
    Case("unknown-backend", lambda p: ["profile", p.tiny, "--store", p.local_store, *FAST_PROFILE,
                                       "--attention", "paged|flash9"], "paged|flash9"),
    Case("invalid-platform-name", lambda p: ["plan", p.tiny, "--store", p.local_store, "--platform", "H100 80GB!"],
         "invalid platform name"),
    Case("unknown-dtype", lambda p: ["trace", p.tiny, "--dtype", "int4"], "unknown dtype"),
    Case("zero-max-tokens", lambda p: ["profile", p.tiny, "--store", p.local_store, *FAST_PROFILE,
                                       "--max-tokens", "0"], "--max-tokens must be >= 1"),
    Case("non-numeric-max-kv", lambda p: ["profile", p.tiny, "--store", p.local_store, "--max-kv", "lots"],
         "'lots' is not a valid integer"),
    Case("shard-index-out-of-range", lambda p: ["profile", p.tiny, "--store", p.local_store, *FAST_PROFILE,
                                                "--shard-index", "3", "--shard-count", "2"], "--shard-index 3"),
    Case("zero-samples", lambda p: ["profile", p.tiny, "--store", p.local_store, *FAST_PROFILE, "--samples", "0"],
         "--samples must be >= 1"),
    Case("zero-progress-interval", lambda p: ["profile", p.tiny, "--store", p.local_store, *FAST_PROFILE,
                                              "--progress-interval", "0"], "--progress-interval"),
    Case("tp-does-not-divide-heads", lambda p: ["profile", p.tiny, "--store", p.local_store, *FAST_PROFILE,
                                                "--tp", "3"], "--tp 3 does not divide"),
    # -- store locations ---------------------------------------------------------------------------
    Case("store-is-a-file", lambda p: ["profile", p.tiny, "--store", str(p.a_file), *FAST_PROFILE],
         "is not a directory"),
    Case("store-under-a-file", lambda p: ["profile", p.tiny, "--store", str(p.a_file / "db"), *FAST_PROFILE],
         "not writable"),
    Case("store-unsupported-scheme", lambda p: ["profile", p.tiny, "--store", "gs://bucket/db", *FAST_PROFILE],
         "unsupported scheme"),
    Case("store-s3-without-bucket", lambda p: ["merge", "--store", "s3:///db"], "no bucket name"),
    Case("merge-store-missing", lambda p: ["merge", "--store", str(p.root / "never-made")], "does not exist"),
    Case("bad-retry-deadline", lambda p: ["merge", "--store", p.s3_store, "--endpoint-url", p.s3_endpoint],
         "DOOLY_S3_RETRY_DEADLINE_S"),
    # -- unwritable outputs: refused before any work -----------------------------------------------
    Case("trace-out-under-a-file", lambda p: ["trace", p.tiny, "--out", str(p.a_file / "t.json")],
         "is not a directory"),
    Case("trace-out-is-a-directory", lambda p: ["trace", p.tiny, "--out", str(p.root)], "is a directory"),
    Case("simulate-out-under-a-file", lambda p: ["simulate", "Llama-3.1-8B", "--analytic", "--out",
                                                 str(p.a_file / "sim")], "--out"),
    Case("simulate-plot-under-a-file", lambda p: ["simulate", "Llama-3.1-8B", "--analytic", "--plot",
                                                  str(p.a_file / "plots")], "--plot"),
    Case("overhead-out-under-a-file", lambda p: ["overhead", "Llama-3.1-8B", "--ground-truth", str(p.root),
                                                 "--analytic", "--out", str(p.a_file / "o.json")], "--out"),
    Case("export-vidur-out-under-a-file", lambda p: ["export", "vidur", "Llama-3.1-8B", "--analytic", "--out",
                                                     str(p.a_file / "vidur")], "--out"),
]


def _local_listing(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def _s3_listing(client) -> dict[str, list[str]]:
    listing = {}
    for bucket in client.list_buckets().get("Buckets", []):
        objects = client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", [])
        listing[bucket["Name"]] = sorted(o["Key"] for o in objects)
    return listing


def _assert_one_error_line(result, code: int, says: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert says in lines[0], lines[0]


@pytest.fixture
def paths(tmp_path, moto_endpoint, aws_env, raw_s3, monkeypatch) -> Paths:
    """An existing local store (its marker only) and an S3 one like it on moto."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DOOLY_S3_ENDPOINT_URL", moto_endpoint)
    bucket = f"dooly-bad-{uuid.uuid4().hex[:12]}"
    open_store(str(tmp_path / "db"))
    raw_s3(moto_endpoint).create_bucket(Bucket=bucket)
    raw_s3(moto_endpoint).put_object(Bucket=bucket, Key=f"db/{MARKER_KEY}", Body=b'{"schema_version": 1}')
    return Paths(root=tmp_path, local_store=str(tmp_path / "db"), s3_store=f"s3://{bucket}/db",
                 s3_endpoint=moto_endpoint)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, paths, moto_endpoint, raw_s3, monkeypatch):
    argv = case.argv(paths)  # writes the case's config files before the listings are taken
    if case.name == "bad-retry-deadline":
        monkeypatch.setenv("DOOLY_S3_RETRY_DEADLINE_S", "soon")
    local_before = _local_listing(paths.root)
    s3_before = _s3_listing(raw_s3(moto_endpoint))

    result = CliRunner().invoke(cli, argv)

    _assert_one_error_line(result, case.code, case.says)
    assert _local_listing(paths.root) == local_before
    assert _s3_listing(raw_s3(moto_endpoint)) == s3_before


def test_enough_cases():
    assert len(CASES) + len(S3_CASES) >= 30


# -- S3: failing commands leave no bucket, marker or object on the server --------------------------

S3_CASES = ["missing-config", "defaulted-config", "unknown-backend"]


@pytest.mark.s3
@pytest.mark.parametrize("what", S3_CASES)
def test_a_failing_profile_leaves_no_bucket_and_no_marker_on_s3(what, tmp_path, moto_endpoint, aws_env, raw_s3):
    paths = Paths(tmp_path, str(tmp_path / "db"), "", moto_endpoint)
    model = {
        "missing-config": str(tmp_path / "missing.json"),
        "defaulted-config": paths.config("defaulted", DEFAULTED_LLAMA),
        "unknown-backend": paths.tiny,
    }[what]
    extra = ["--attention", "paged|nope"] if what == "unknown-backend" else []
    before = _s3_listing(raw_s3(moto_endpoint))

    result = CliRunner().invoke(cli, ["profile", model, "--store", "s3://dooly-never-made/stray/prefix",
                                      "--endpoint-url", moto_endpoint, *FAST_PROFILE, *extra])

    _assert_one_error_line(result, EXIT_BAD_INPUT, "")
    assert _s3_listing(raw_s3(moto_endpoint)) == before


@pytest.mark.s3
def test_an_unreachable_store_is_the_transient_code(tmp_path, aws_env, unused_port, moto_endpoint, raw_s3,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _s3_listing(raw_s3(moto_endpoint))
    result = CliRunner().invoke(cli, ["merge", "--store", "s3://dooly-nowhere/db", "--endpoint-url",
                                      f"http://127.0.0.1:{unused_port}"])
    _assert_one_error_line(result, EXIT_TRANSIENT, "unreachable")
    assert _s3_listing(raw_s3(moto_endpoint)) == before and _local_listing(tmp_path) == []


@pytest.mark.s3
def test_refused_credentials_are_bad_input_on_seaweedfs(seaweed, aws_env, raw_s3, monkeypatch, tmp_path):
    """SeaweedFS checks signatures: a wrong secret is a 403, which no retry fixes (exit 2)."""
    client = raw_s3(seaweed.endpoint)
    bucket = "dooly-refused"
    if bucket not in _s3_listing(client):
        client.create_bucket(Bucket=bucket)
    before = _s3_listing(client)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    result = CliRunner().invoke(cli, ["profile", Paths(tmp_path, "", "", "").tiny, "--store", f"s3://{bucket}/db",
                                      "--endpoint-url", seaweed.endpoint, *FAST_PROFILE])
    _assert_one_error_line(result, EXIT_BAD_INPUT, "HTTP 403")
    assert _s3_listing(client) == before


# -- shards: corrupt and foreign --------------------------------------------------------------------

def _store_conftest():
    """tests/store/conftest.py's shard builder, loaded by path (several conftest modules exist)."""
    location = Path(__file__).parent / "store" / "conftest.py"
    spec = importlib.util.spec_from_file_location("dooly_store_test_support", location)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def shard_table():
    return _store_conftest().make_shard_table


def _store_with_generation(root: Path, shard_table) -> tuple[str, list[str]]:
    uri = str(root / "db")
    store = open_store(uri)
    keys = [write_shard(store, shard_table(), run_id="run-a", chunk_index=0),
            write_shard(store, shard_table([("op-c", 1), ("op-c", 2)]), run_id="run-a", chunk_index=1)]
    merge_store(store)
    return uri, keys


def test_a_corrupt_shard_that_would_shrink_the_snapshot_is_refused(tmp_path, shard_table):
    uri, keys = _store_with_generation(tmp_path, shard_table)
    (Path(uri) / keys[1]).write_bytes(b"PAR1 not really")
    before = _local_listing(tmp_path)
    result = CliRunner().invoke(cli, ["merge", "--store", uri])
    _assert_one_error_line(result, EXIT_SHRINK_REFUSED, keys[1])
    assert _local_listing(tmp_path) == before


def test_a_foreign_schema_store_is_refused(tmp_path, shard_table):
    uri, _keys = _store_with_generation(tmp_path, shard_table)
    (Path(uri) / MARKER_KEY).write_text(json.dumps({"schema_version": 99}))
    before = _local_listing(tmp_path)
    for argv in (["merge", "--store", uri], ["profile", Paths(tmp_path, "", "", "").tiny, "--store", uri,
                                              *FAST_PROFILE]):
        before = _local_listing(tmp_path)
        result = CliRunner().invoke(cli, argv)
        _assert_one_error_line(result, EXIT_BAD_INPUT, "schema version 99")
        assert _local_listing(tmp_path) == before


def test_a_marker_that_is_not_json_is_refused(tmp_path, shard_table):
    uri, _keys = _store_with_generation(tmp_path, shard_table)
    (Path(uri) / MARKER_KEY).write_text("{")
    before = _local_listing(tmp_path)
    result = CliRunner().invoke(cli, ["merge", "--store", uri])
    _assert_one_error_line(result, EXIT_BAD_INPUT, "is not valid JSON")
    assert _local_listing(tmp_path) == before


def test_only_foreign_shards_are_refused_without_quarantining_them(tmp_path):
    uri = str(tmp_path / "db")
    store = open_store(uri)
    store.put_bytes("shards/platform=p/engine=e/backend=b/dtype=d/foreign.parquet", b"someone else's file")
    before = _local_listing(tmp_path)
    result = CliRunner().invoke(cli, ["merge", "--store", uri])
    _assert_one_error_line(result, EXIT_BAD_INPUT, "no readable shards")
    assert _local_listing(tmp_path) == before


# -- the defaults, allowed on purpose ---------------------------------------------------------------

def test_allow_defaults_uses_and_reports_them(tmp_path, caplog):
    config = Paths(tmp_path, "", "", "").config("defaulted", DEFAULTED_LLAMA)
    result = CliRunner().invoke(cli, ["models", config, "--allow-defaults", "--output", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["models"][0]["hidden_size"] == 4096
    assert "using transformers' defaults" in caplog.text and "hidden_size" in caplog.text
