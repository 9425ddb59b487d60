"""The served-model cache of `dooly bench --client http`: the model the server loads is saved once
per (config, dtype, seed, device kind, versions) and reused by later runs; an entry is whole or
rebuilt; the run's own files stay out of it; without a cache, the run's directory is removed as
before. The cache logic on the real tiny model saved on a CPU, and two runs through a real
`transformers serve` subprocess. The size cap: least recently used entries evicted before a new one
is built, never one another process is serving; a model that cannot fit served uncached; `dooly
model-cache list|clear`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tiny_configs import TINY_LLAMA

from dooly.cli import cli
from dooly.engines import commands, http_bench
from dooly.engines.served_model_cache import (
    BUILDING_PREFIX,
    HIT,
    LOCK_SUFFIX,
    MARKER_NAME,
    MISS,
    MODEL_CACHE_ENV,
    MODEL_CACHE_MAX_GB_ENV,
    OFF,
    ROOT_LOCK_NAME,
    UNCACHED,
    USE_LOCK_SUFFIX,
    Eviction,
    ServedModel,
    cache_inputs,
    cached_model_dir,
    entry_complete,
    entry_name,
    format_bytes,
    list_entries,
)
from dooly.errors import DoolyError
from dooly.models.registry import build_hf_config, resolve_model

BACKEND = "paged|sdpa"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def _config(tmp_path: Path, **changes: Any) -> Any:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.json')))}.json"
    path.write_text(json.dumps({**TINY_LLAMA, **changes}))
    return build_hf_config(resolve_model(str(path)))


@pytest.fixture
def saves(monkeypatch) -> list[Path]:
    """Every directory the real `save_served_model` saved a model into, in order."""
    saved: list[Path] = []
    real = http_bench.save_served_model

    def counted(hf_config, backend, device, dtype, seed, directory):
        saved.append(Path(directory))
        real(hf_config, backend, device, dtype, seed, directory)

    monkeypatch.setattr(http_bench, "save_served_model", counted)
    return saved


def _float32() -> Any:
    import torch

    return torch.float32


def _serve(tmp_path: Path, cache: Path | None, hf_config: Any, *, dtype: str = "float32", seed: int = 0,
           backend: str = BACKEND) -> tuple[Path, str]:
    work = tmp_path / f"work-{len(list(tmp_path.glob('work-*')))}"
    work.mkdir()
    with http_bench.served_model(hf_config, backend, "cpu", dtype, seed, work, cache) as served:
        return served


def _with_locks(*entries: str) -> list[str]:
    """A cache root's listing: the entries, each one's build and use lock files, and the root's lock."""
    return sorted([ROOT_LOCK_NAME, *[f"{e}{suffix}" for e in entries for suffix in ("", LOCK_SUFFIX, USE_LOCK_SUFFIX)]])


def test_the_same_model_is_saved_once_and_reused(tmp_path, saves, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="dooly")
    first, status = _serve(tmp_path, cache, _config(tmp_path))
    assert status == MISS and first.parent == cache and len(saves) == 1
    assert {p.name for p in first.iterdir()} >= MODEL_FILES | {MARKER_NAME}
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    # A later run builds its own config object: the same model, found whole, not saved again.
    second, status = _serve(tmp_path, cache, _config(tmp_path))
    assert (second, status) == (first, HIT) and len(saves) == 1
    # The model's files are untouched; the marker's time is the entry's last use, which eviction reads.
    reused = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert reused[MARKER_NAME] > stamps.pop(MARKER_NAME) and {n: reused[n] for n in stamps} == stamps
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("served model:")]
    assert len(lines) == 2 and lines[1] == f"served model: reusing {first}"
    assert lines[0].startswith(f"served model: saved to {first} (evicted nothing; the cache holds ")
    assert lines[0].endswith(" of its 40.0 GB cap)")
    # Only the entry and its lock files: nothing was left being built.
    assert sorted(p.name for p in cache.iterdir()) == _with_locks(first.name)


@pytest.mark.parametrize(
    ("changes", "dtype", "seed"),
    [({}, "float32", 1), ({}, "bfloat16", 0), ({"num_hidden_layers": 1}, "float32", 0),
     ({"vocab_size": 128}, "float32", 0)],
)
def test_another_seed_dtype_or_config_is_another_entry(tmp_path, saves, changes, dtype, seed):
    cache = tmp_path / "cache"
    base, _ = _serve(tmp_path, cache, _config(tmp_path))
    other, status = _serve(tmp_path, cache, _config(tmp_path, **changes), dtype=dtype, seed=seed)
    assert status == MISS and other != base and len(saves) == 2
    assert entry_complete(base, json.loads((base / MARKER_NAME).read_text())["inputs"])


def test_the_attention_backend_is_not_in_the_saved_bytes_so_not_in_the_key(tmp_path, saves):
    """config.json holds no attention implementation (the server is given --attn-implementation)
    and the weights drawn are the same whatever the backend: one entry serves both."""
    sdpa = tmp_path / "sdpa"
    eager = tmp_path / "eager"
    http_bench.save_served_model(_config(tmp_path), "paged|sdpa", "cpu", _float32(), 0, sdpa)
    http_bench.save_served_model(_config(tmp_path), "paged|eager", "cpu", _float32(), 0, eager)
    assert not [k for k in json.loads((sdpa / "config.json").read_text()) if "attn" in k]
    assert {p.name: p.read_bytes() for p in sdpa.iterdir()} == {p.name: p.read_bytes() for p in eager.iterdir()}
    cache = tmp_path / "cache"
    first, _ = _serve(tmp_path, cache, _config(tmp_path), backend="paged|sdpa")
    assert _serve(tmp_path, cache, _config(tmp_path), backend="paged|eager") == (first, HIT)


def test_the_key_does_not_change_when_a_build_writes_its_dtype_into_the_config(tmp_path):
    hf_config = _config(tmp_path)
    before = cache_inputs(hf_config, "float32", 0, "cpu")
    http_bench.save_served_model(hf_config, BACKEND, "cpu", _float32(), 0, tmp_path / "model")
    assert cache_inputs(hf_config, "float32", 0, "cpu") == before
    assert cache_inputs(hf_config, "float32", 0, "cuda:0")["device"] == "cuda"
    assert entry_name(before).startswith("llama-float32-cpu-seed0-")


def _damage_missing_marker(entry: Path) -> None:
    (entry / MARKER_NAME).unlink()


def _damage_truncated_weights(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _damage_other_inputs(entry: Path) -> None:
    marker = json.loads((entry / MARKER_NAME).read_text())
    marker["inputs"]["seed"] = 7
    (entry / MARKER_NAME).write_text(json.dumps(marker))


def _damage_partial_copy(entry: Path) -> None:
    for path in entry.iterdir():
        if path.name != "config.json":
            path.unlink()


@pytest.mark.parametrize("damage", [_damage_missing_marker, _damage_truncated_weights, _damage_other_inputs,
                                    _damage_partial_copy])
def test_an_incomplete_or_damaged_entry_is_rebuilt_not_served(tmp_path, saves, damage):
    cache = tmp_path / "cache"
    entry, _ = _serve(tmp_path, cache, _config(tmp_path))
    good = (entry / "model.safetensors").read_bytes()
    damage(entry)
    again, status = _serve(tmp_path, cache, _config(tmp_path))
    assert (again, status) == (entry, MISS) and len(saves) == 2
    assert (entry / "model.safetensors").read_bytes() == good
    assert entry_complete(entry, json.loads((entry / MARKER_NAME).read_text())["inputs"])
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_concurrent_runs_of_one_model_build_it_once(tmp_path):
    """Two runs asking for the same entry at once: the second waits for the first's entry and
    reuses it; what a crashed run left being built is removed."""
    cache = tmp_path / "cache"
    inputs = cache_inputs(_config(tmp_path), "float32", 0, "cpu")
    cache.mkdir()
    stale = cache / f"{BUILDING_PREFIX}{entry_name(inputs)}-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    built: list[Path] = []

    def build(directory: Path) -> None:
        built.append(directory)
        time.sleep(0.3)
        (directory / "model.safetensors").write_bytes(b"weights")

    results: list[tuple[Path, str]] = []

    def run() -> None:
        with cached_model_dir(cache, inputs, build, scratch=tmp_path / "scratch") as served:
            results.append((served.directory, served.status))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1
    assert sorted(status for _, status in results) == [HIT, MISS] and len({d for d, _ in results}) == 1
    assert sorted(p.name for p in cache.iterdir()) == _with_locks(entry_name(inputs))


def test_a_failed_build_leaves_no_entry_and_nothing_being_built(tmp_path):
    cache = tmp_path / "cache"
    inputs = cache_inputs(_config(tmp_path), "float32", 0, "cpu")

    def build(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), cached_model_dir(cache, inputs, build, scratch=tmp_path / "scratch"):
        pass
    name = entry_name(inputs)
    assert sorted(p.name for p in cache.iterdir()) == sorted([ROOT_LOCK_NAME, f"{name}{LOCK_SUFFIX}", f"{name}{USE_LOCK_SUFFIX}"])


def test_without_a_cache_the_model_is_saved_in_the_runs_directory(tmp_path, saves):
    model_dir, status = _serve(tmp_path, None, _config(tmp_path))
    assert status == OFF and model_dir.parent.name.startswith("work-") and saves == [model_dir]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model-cache"], "--model-cache needs --client http"),
        (["--client", "http", "--server-url", "http://127.0.0.1:1", "--model-cache"],
         "--model-cache needs --client http and a server this command starts"),
    ],
)
def test_model_cache_where_no_model_is_saved_is_refused(tmp_path, extra, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    cache, out = tmp_path / "cache", tmp_path / "gt"
    result = CliRunner().invoke(cli, ["bench", str(config), "--out", str(out), "--requests", "2", *extra, str(cache)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not cache.exists() and not out.exists()


@pytest.mark.parametrize("client", ["inprocess", "http"])
def test_the_variable_is_ignored_by_a_run_that_saves_no_model(tmp_path, client):
    """DOOLY_MODEL_CACHE is exported for whole campaigns: in-process cells (and --server-url ones)
    go on, here to the workload's own refusal, where the flag itself is refused; it is never
    created for them."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    cache = tmp_path / "cache"
    args = ["bench", str(config), "--out", str(tmp_path / "gt"), "--requests", "0", "--client", client]
    if client == "http":
        args += ["--server-url", "http://127.0.0.1:1"]
    result = CliRunner(env={MODEL_CACHE_ENV: str(cache)}).invoke(cli, args)
    assert result.exit_code == 2 and "num_requests must be >= 1" in result.output, result.output
    result = CliRunner(env={MODEL_CACHE_ENV: None}).invoke(cli, [*args, "--model-cache", str(cache)])
    assert result.exit_code == 2 and "--model-cache needs --client http" in result.output, result.output
    assert not cache.exists()


def test_a_cache_that_is_a_file_is_refused_in_one_line(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    cache = tmp_path / "cache"
    cache.write_text("")
    result = CliRunner(env={MODEL_CACHE_ENV: str(cache)}).invoke(
        cli, ["bench", str(config), "--client", "http", "--out", str(tmp_path / "gt"), "--requests", "2"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: --model-cache {cache} exists and is not a directory"


WORKLOAD = ["--requests", "3", "--rate", "20", "--prompt-len", "12", "--output-len", "3", "--seed", "1",
            "--set", "num_blocks=48", "--set", "block_size=16", "--set", "max_batch_tokens=64",
            "--dtype", "float32", "--warmup-requests", "0"]


@pytest.mark.slow
def test_two_runs_serve_one_cached_model_and_keep_their_own_files_out_of_it(tmp_path, saves):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    cache = tmp_path / "cache"
    details = []
    for index, args in enumerate((["--model-cache", str(cache)], [])):
        out = tmp_path / f"gt{index}"
        # The second run takes the cache from the variable.
        result = CliRunner(env={MODEL_CACHE_ENV: str(cache)} if not args else {MODEL_CACHE_ENV: None}).invoke(
            cli, ["bench", str(config), "--client", "http", "--out", str(out), *args, *WORKLOAD, "--output", "json"])
        assert result.exit_code == 0, result.output
        details.append(json.loads((out / "bench.json").read_text())["engine_details"])
    assert [d["served_model_cache"] for d in details] == [MISS, HIT] and len(saves) == 1
    commands = [d["server_command"] for d in details]
    model_dirs = {Path(c[3]) for c in commands}
    [entry] = model_dirs
    assert entry.parent == cache and saves[0].parent == cache
    # The cached entry survives its runs and holds the model only; each run's report, steps and
    # server log were in the run's own directory, removed after it.
    assert MODEL_FILES | {MARKER_NAME} <= {p.name for p in entry.iterdir()} <= MODEL_FILES | {MARKER_NAME, "chat_template.jinja"}
    for command in commands:
        report = Path(command[command.index("--report") + 1])
        steps = Path(command[command.index("--steps") + 1])
        assert report.parent == steps.parent and cache not in report.parents and not report.parent.exists()
    assert sorted(p.name for p in cache.iterdir()) == _with_locks(entry.name)


# The size cap, on entries of a few bytes written by a stand-in build: two of them (weights and
# marker) fit under CAP_BYTES, a third does not.
WEIGHT_BYTES = 100_000
CAP_BYTES = 250_000
# An older last use, in seconds before now, so that the test sets the order eviction reads.
OLDER_S, OLD_S = 200.0, 100.0


@pytest.fixture
def keyed(tmp_path) -> Any:
    """The inputs of one tiny model under another seed each: a distinct entry per seed."""
    base = cache_inputs(_config(tmp_path), "float32", 0, "cpu")
    return lambda seed: {**base, "seed": seed}


def _cached(tmp_path: Path, cache: Path, inputs: dict[str, Any], *, size: int = WEIGHT_BYTES,
            expected: int = WEIGHT_BYTES, max_bytes: int = CAP_BYTES, built: list[Path] | None = None) -> ServedModel:
    """One run's use of the cache, over once it returns (its use lock released)."""
    def build(directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        if built is not None:
            built.append(directory)
        (directory / "model.safetensors").write_bytes(b"\0" * size)

    scratch = tmp_path / f"scratch-{len(list(tmp_path.glob('scratch-*')))}"
    with cached_model_dir(cache, inputs, build, scratch=scratch, max_bytes=max_bytes, expected_bytes=expected) as served:
        return served


def _last_used(entry: Path, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(entry / MARKER_NAME, (stamp, stamp))


def _entries(cache: Path) -> list[str]:
    return [e.name for e in list_entries(cache)]


@contextmanager
def _served_by_another_process(cache: Path, entry: Path) -> Iterator[None]:
    """Another process holding the entry's use lock shared, as a running bench does while its
    server loads and serves the entry."""
    code = ("import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_SH); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(cache / f"{entry.name}{USE_LOCK_SUFFIX}")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_the_least_recently_used_entry_is_evicted_before_a_new_one_is_built(tmp_path, keyed, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="dooly")
    first = _cached(tmp_path, cache, keyed(1))
    second = _cached(tmp_path, cache, keyed(2))
    _last_used(first.directory, OLDER_S)
    _last_used(second.directory, OLD_S)
    # Reusing the first makes it the most recently used: the second is now the one to go.
    assert _cached(tmp_path, cache, keyed(1)).status == HIT
    [second_bytes] = [e.bytes for e in list_entries(cache) if e.path == second.directory]
    on_disk_at_build = []

    def build(directory: Path) -> None:
        on_disk_at_build.append(_entries(cache))
        (directory / "model.safetensors").write_bytes(b"\0" * WEIGHT_BYTES)

    with cached_model_dir(cache, keyed(3), build, scratch=tmp_path / "scratch", max_bytes=CAP_BYTES,
                          expected_bytes=WEIGHT_BYTES) as third:
        assert third.status == MISS and third.evicted == Eviction(1, second_bytes)
    assert on_disk_at_build == [[first.directory.name]]
    assert sorted(_entries(cache)) == sorted([first.directory.name, third.directory.name])
    assert sum(e.bytes for e in list_entries(cache)) <= CAP_BYTES
    messages = [r.getMessage() for r in caplog.records]
    assert f"served model cache: evicted {second.directory} ({format_bytes(second_bytes)}, least recently used)" in messages
    [saved] = [m for m in messages if m.startswith(f"served model: saved to {third.directory}")]
    assert f"(evicted 1 least recently used entry ({format_bytes(second_bytes)}); the cache holds " in saved
    assert saved.endswith(f" of its {format_bytes(CAP_BYTES)} cap)")


def test_an_entry_another_process_is_serving_is_never_evicted(tmp_path, keyed, caplog):
    cache = tmp_path / "cache"
    first = _cached(tmp_path, cache, keyed(1))
    second = _cached(tmp_path, cache, keyed(2))
    _last_used(first.directory, OLDER_S)
    _last_used(second.directory, OLD_S)
    one_entry = CAP_BYTES - WEIGHT_BYTES
    with _served_by_another_process(cache, first.directory):
        # The first is the least recently used, but in use: the second goes instead.
        third = _cached(tmp_path, cache, keyed(3))
        assert third.status == MISS and third.evicted.count == 1
        assert sorted(_entries(cache)) == sorted([first.directory.name, third.directory.name])
        # Under a cap of one entry, the one in use leaves no room: served uncached, nothing evicted.
        caplog.set_level(logging.WARNING, logger="dooly")
        built = []
        fourth = _cached(tmp_path, cache, keyed(4), max_bytes=one_entry, built=built)
        assert fourth.status == UNCACHED and fourth.evicted == Eviction() and built == [fourth.directory]
        assert fourth.directory.parent == tmp_path and not fourth.directory.exists()
        assert sorted(_entries(cache)) == sorted([first.directory.name, third.directory.name])
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith(f"served model: not cached in {cache}: entries other runs are using hold ")
        assert f"of the {format_bytes(one_entry)} cap" in warning
    # Once that run is over, the entry is evictable like any other.
    fifth = _cached(tmp_path, cache, keyed(5), max_bytes=one_entry)
    assert fifth.status == MISS and fifth.evicted.count == 2 and _entries(cache) == [fifth.directory.name]


def test_a_model_larger_than_the_cap_is_served_uncached_and_evicts_nothing(tmp_path, keyed, caplog):
    cache = tmp_path / "cache"
    kept = _cached(tmp_path, cache, keyed(1))
    caplog.set_level(logging.WARNING, logger="dooly")
    built = []
    large = _cached(tmp_path, cache, keyed(2), size=3 * WEIGHT_BYTES, expected=3 * WEIGHT_BYTES, built=built)
    # Its expected size says so before the build: built straight into the run's directory.
    assert large.status == UNCACHED and built == [large.directory] and large.directory.parent == tmp_path
    assert not large.directory.exists() and _entries(cache) == [kept.directory.name]
    assert [r.getMessage() for r in caplog.records] == [
        f"served model: not cached in {cache}: its {format_bytes(3 * WEIGHT_BYTES)} exceed the "
        f"{format_bytes(CAP_BYTES)} cap (--model-cache-max-gb); saved to {large.directory} for this run only"]


def test_a_model_found_larger_than_the_cap_once_built_is_served_uncached(tmp_path, keyed):
    """No size expected (or too small a one): the measured size decides, after the build."""
    cache = tmp_path / "cache"
    kept = _cached(tmp_path, cache, keyed(1))
    scratch = tmp_path / "scratch"

    def build(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"\0" * 3 * WEIGHT_BYTES)

    with cached_model_dir(cache, keyed(2), build, scratch=scratch, max_bytes=CAP_BYTES) as large:
        assert (large.directory, large.status) == (scratch, UNCACHED)
        assert (scratch / "model.safetensors").stat().st_size == 3 * WEIGHT_BYTES
    assert not scratch.exists() and _entries(cache) == [kept.directory.name]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_the_served_models_size_is_expected_before_it_is_built(tmp_path, saves):
    """The harness counts the weights on the meta device, so a model over the cap is never written
    into the cache at all."""
    hf_config = _config(tmp_path)
    model_dir, _ = _serve(tmp_path, tmp_path / "loose", hf_config)
    weights = (model_dir / "model.safetensors").stat().st_size
    assert abs(http_bench.served_model_bytes(hf_config, "float32") - weights) < 0.01 * weights
    work = tmp_path / "work"
    work.mkdir()
    cache = tmp_path / "cache"
    with http_bench.served_model(hf_config, BACKEND, "cpu", "float32", 0, work, cache, weights // 2) as (directory, status):
        assert status == UNCACHED and directory == work / http_bench.SERVED_MODEL_DIR_NAME
        assert saves[-1] == directory and (directory / "model.safetensors").is_file()
    assert not directory.exists() and _entries(cache) == []


@pytest.mark.parametrize(
    ("env", "args", "expected_bytes"),
    [({}, [], 40 * 10**9), ({MODEL_CACHE_MAX_GB_ENV: "2.5"}, [], 25 * 10**8),
     ({MODEL_CACHE_MAX_GB_ENV: "2.5"}, ["--model-cache-max-gb", "0.5"], 5 * 10**8)],
)
def test_the_cap_reaches_the_run_from_the_flag_or_the_variable(tmp_path, monkeypatch, env, args, expected_bytes):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    received = []

    def stop(*run_args: Any) -> Any:
        received.extend(run_args)
        raise DoolyError("stopped before the server starts")

    monkeypatch.setattr(commands, "_run_http", stop)
    result = CliRunner(env={MODEL_CACHE_ENV: None, MODEL_CACHE_MAX_GB_ENV: None, **env}).invoke(
        cli, ["bench", str(config), "--client", "http", "--out", str(tmp_path / "gt"), "--requests", "2",
              "--model-cache", str(tmp_path / "cache"), *args])
    assert "stopped before the server starts" in result.output, result.output
    assert received[-2:] == [tmp_path / "cache", expected_bytes]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--client", "http", "--model-cache-max-gb", "10"], "--model-cache-max-gb needs --client http with --model-cache"),
     (["--model-cache-max-gb", "10"], "--model-cache-max-gb needs --client http with --model-cache"),
     (["--client", "http", "--model-cache", "cache", "--model-cache-max-gb", "0"], "--model-cache-max-gb")],
)
def test_a_cap_without_a_cache_or_of_nothing_is_refused(tmp_path, extra, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    result = CliRunner(env={MODEL_CACHE_ENV: None}).invoke(
        cli, ["bench", str(config), "--out", str(tmp_path / "gt"), "--requests", "2", *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_model_cache_list_and_clear(tmp_path, keyed):
    cache = tmp_path / "cache"
    older = _cached(tmp_path, cache, keyed(1))
    newer = _cached(tmp_path, cache, keyed(2))
    _last_used(older.directory, OLDER_S)
    _last_used(newer.directory, OLD_S)
    crashed = cache / f"{BUILDING_PREFIX}{older.directory.name}-crashed"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half")
    unrelated = cache / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("not an entry")
    runner = CliRunner(env={MODEL_CACHE_ENV: str(cache), MODEL_CACHE_MAX_GB_ENV: None})
    assert "list" in runner.invoke(cli, ["model-cache", "--help"]).output
    with _served_by_another_process(cache, newer.directory):
        listed = runner.invoke(cli, ["model-cache", "list", "--output", "json"])
        assert listed.exit_code == 0, listed.output
        report = json.loads(listed.output)
        assert [(e["name"], e["in_use"], e["complete"]) for e in report["entries"]] == [
            (older.directory.name, False, True), (newer.directory.name, True, True)]
        assert report["total_bytes"] == sum(e.bytes for e in list_entries(cache)) and report["max_bytes"] == 40 * 10**9
        text = runner.invoke(cli, ["model-cache", "list", "--model-cache-max-gb", "1"]).output
        assert "idle" in text and "in use" in text and text.strip().endswith(f"of the 1.0 GB cap in {cache}")
        cleared = runner.invoke(cli, ["model-cache", "clear", "--output", "json"])
        assert cleared.exit_code == 0, cleared.output
        summary = json.loads(cleared.output)
        assert summary["evicted"] == [older.directory.name] and summary["in_use"] == [newer.directory.name]
        assert summary["leftover_bytes"] == len(b"half")
    assert _entries(cache) == [newer.directory.name] and not crashed.exists() and unrelated.is_dir()
    missing = runner.invoke(cli, ["model-cache", "list", "--model-cache", str(tmp_path / "typo")])
    assert missing.exit_code == 2 and missing.output.strip() == f"error: --model-cache {tmp_path / 'typo'}: no such directory"
