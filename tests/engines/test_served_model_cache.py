"""The served-model cache of `dooly bench --client http`: the model the server loads is saved once
per (config, dtype, seed, device kind, versions) and reused by later runs; an entry is whole or
rebuilt; the run's own files stay out of it; without a cache, the run's directory is removed as
before. The cache logic on the real tiny model saved on a CPU, and two runs through a real
`transformers serve` subprocess."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tiny_configs import TINY_LLAMA

from dooly.cli import cli
from dooly.engines import http_bench
from dooly.engines.served_model_cache import (
    BUILDING_PREFIX,
    HIT,
    MARKER_NAME,
    MISS,
    MODEL_CACHE_ENV,
    OFF,
    cache_inputs,
    cached_model_dir,
    entry_complete,
    entry_name,
)
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
    return http_bench.served_model(hf_config, backend, "cpu", dtype, seed, work, cache)


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
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("served model:")]
    assert lines == [f"served model: saved to {first}", f"served model: reusing {first}"]
    # Only the entry and its lock file: nothing was left being built.
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, f"{first.name}.lock"])


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
    threads = [threading.Thread(target=lambda: results.append(cached_model_dir(cache, inputs, build)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1
    assert sorted(status for _, status in results) == [HIT, MISS] and len({d for d, _ in results}) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted([entry_name(inputs), f"{entry_name(inputs)}.lock"])


def test_a_failed_build_leaves_no_entry_and_nothing_being_built(tmp_path):
    cache = tmp_path / "cache"
    inputs = cache_inputs(_config(tmp_path), "float32", 0, "cpu")

    def build(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cached_model_dir(cache, inputs, build)
    assert [p.name for p in cache.iterdir()] == [f"{entry_name(inputs)}.lock"]


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
    assert sorted(p.name for p in cache.iterdir()) == sorted([entry.name, f"{entry.name}.lock"])
