"""The trace cache of the predicting commands (dooly/fit/trace_cache.py): a model the store holds no
inventory of is traced on the CPU once, and the next question about it is answered from the cache,
with the very inventory a fresh trace gives; anything the trace depends on that changes misses, a
damaged entry is traced again and rewritten, `off` writes nothing, and a cache that cannot be written
never fails the answer. The cache is kept under its cap, stale entries evicted first, then the least
recently used, and `dooly trace-cache list|clear` shows and empties it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest

from dooly.errors import DoolyError
from dooly.fit import trace_cache
from dooly.fit.resolve import INVENTORY_PHASE, ORIGIN_TRACED, resolve_inventory, traced_inventory
from dooly.models.registry import ModelSpec, model_key
from dooly.trace import tracer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from tiny_configs import TINY_LLAMA  # noqa: E402

MODEL_ID = "tiny-cached"
BACKEND = "paged|sdpa"
ENGINE = "transformers"
DTYPE = "bfloat16"
# What a trace is asked for; each test changes one part of it.
ASKED: dict[str, Any] = {"backend": BACKEND, "engine": ENGINE, "dtype": DTYPE, "tp": 1}
# TINY_LLAMA has 4 query heads over 2 KV heads: tp 2 divides both.
OTHER_TP = 2
RESOLVE_LOGGER = "dooly.fit.resolve"
CACHE_LOGGER = "dooly.fit.trace_cache"
# A shape field the config leaves to transformers' default, which a library call accepts (and warns of).
DEFAULTED_FIELD = "vocab_size"


def spec_of(config: dict[str, Any] = TINY_LLAMA, model_id: str = MODEL_ID) -> ModelSpec:
    return ModelSpec(model_id=model_id, config=dict(config), source="test")


@pytest.fixture
def traces(monkeypatch) -> list[str]:
    """The model ids trace_model is called for, in order (the tracer itself runs as usual)."""
    calls: list[str] = []
    real = tracer.trace_model

    def counted(model: Any, **kwargs: Any) -> Any:
        calls.append(model.model_id if isinstance(model, ModelSpec) else str(model))
        return real(model, **kwargs)

    monkeypatch.setattr(tracer, "trace_model", counted)
    return calls


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A cache directory of the test's own."""
    directory = tmp_path / "traces"
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, str(directory))
    return directory


def entries(directory: Path) -> list[Path]:
    return sorted(directory.rglob(f"*{trace_cache.ENTRY_SUFFIX}")) if directory.exists() else []


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def entry_of(directory: Path, spec: ModelSpec, **asked: Any) -> Path:
    parts = {**ASKED, **asked}
    key = trace_cache.trace_key(spec, phase=INVENTORY_PHASE, **parts)
    return trace_cache.entry_path(directory, key)


def test_a_hit_is_the_inventory_of_a_fresh_trace(cache_dir, traces, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, trace_cache.CACHE_OFF)
    fresh = traced_inventory(spec_of(), **ASKED)
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, str(cache_dir))
    with caplog.at_level(logging.INFO, logger=RESOLVE_LOGGER):
        missed = traced_inventory(spec_of(), **ASKED)
        assert "traced on the CPU in" in caplog.text and f"(cached to {cache_dir}" in caplog.text
        caplog.clear()
        hit = traced_inventory(spec_of(), **ASKED)
        assert f"trace of {MODEL_ID} reused from the cache ({cache_dir}" in caplog.text
    assert traces == [MODEL_ID, MODEL_ID]  # the cache-off trace and the miss; the hit traced nothing
    assert hit == missed == fresh
    assert json.dumps(hit) == json.dumps(fresh)  # the same keys in the same order, not only equal
    assert entries(cache_dir) == [entry_of(cache_dir, spec_of())]


def test_the_resolver_serves_a_hit_as_a_cpu_trace_and_never_writes_the_store(cache_dir, traces, tmp_path):
    from dooly.store.backends import open_store

    config = tmp_path / MODEL_ID / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_LLAMA))
    root = tmp_path / "db"
    store = open_store(str(root))
    before = files_under(root)
    first, second = (resolve_inventory(store, str(config), backend=BACKEND) for _ in range(2))
    assert first.origin == second.origin == ORIGIN_TRACED
    assert first.inventory == second.inventory and first.model_key == model_key(spec_of())
    assert traces == [MODEL_ID]
    assert files_under(root) == before


@pytest.mark.parametrize(
    ("change", "asked"),
    [
        ("backend", {"backend": "paged|eager"}),
        ("dtype", {"dtype": "float32"}),
        ("tp", {"tp": OTHER_TP}),
    ],
)
def test_another_backend_dtype_or_tp_misses(cache_dir, traces, change, asked):
    base = traced_inventory(spec_of(), **ASKED)
    other = traced_inventory(spec_of(), **{**ASKED, **asked})
    assert traces == [MODEL_ID, MODEL_ID], change
    assert other[change] == asked[change] and base[change] == ASKED[change]
    assert len(entries(cache_dir)) == 2
    assert traced_inventory(spec_of(), **{**ASKED, **asked}) == other and len(traces) == 2


@pytest.mark.parametrize(
    ("change", "spec"),
    [
        ("a shape", spec_of({**TINY_LLAMA, "intermediate_size": 2 * TINY_LLAMA["intermediate_size"]})),
        # transformers reads the file metadata the model key leaves out.
        ("the file metadata", spec_of({**TINY_LLAMA, "transformers_version": "0.0.1"})),
        ("the name", spec_of(model_id="tiny-renamed")),
    ],
)
def test_a_changed_config_or_name_misses(cache_dir, traces, change, spec):
    base = traced_inventory(spec_of(), **ASKED)
    other = traced_inventory(spec, **ASKED)
    assert len(traces) == 2, change
    assert other["model_id"] == spec.model_id and len(entries(cache_dir)) == 2
    if change == "a shape":
        assert other != base


def test_changed_code_or_packages_miss(cache_dir, traces, monkeypatch):
    traced_inventory(spec_of(), **ASKED)
    monkeypatch.setattr(trace_cache, "code_digest", lambda: "changed code")
    traced_inventory(spec_of(), **ASKED)
    versions = (("torch", "0.0.1"), ("transformers", "0.0.1"))
    monkeypatch.setattr(trace_cache, "package_versions", lambda engine: versions)
    traced_inventory(spec_of(), **ASKED)
    assert len(traces) == 3 and len(entries(cache_dir)) == 3


def test_the_code_digest_covers_the_tracer_the_models_the_engines_and_the_inventory(tmp_path):
    sources = {p.relative_to(Path(trace_cache.__file__).parents[1]).as_posix()
               for p in trace_cache.traced_sources()}
    assert {"trace/tracer.py", "models/registry.py", "engines/transformers_cb.py", "profile/run.py",
            "fit/resolve.py", "fit/trace_cache.py"} <= sources
    source = tmp_path / "module.py"
    source.write_text("A = 1\n")
    before = trace_cache.source_digest([source])
    source.write_text("A = 2\n")
    assert trace_cache.source_digest([source]) != before


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # a write cut short
        lambda text: "",
        lambda text: json.dumps({**json.loads(text), "schema": "another"}),
        lambda text: json.dumps({**json.loads(text), "inventory": {"operations": "none"}}),
        lambda text: json.dumps({**json.loads(text), "key": {"model_key": "another"}}),
        lambda text: "\udcff",  # not UTF-8 once written
    ],
    ids=["truncated", "empty", "schema", "inventory", "key", "undecodable"],
)
def test_a_damaged_entry_is_traced_again_and_rewritten(cache_dir, traces, caplog, damage: Callable[[str], str]):
    good = traced_inventory(spec_of(), **ASKED)
    [entry] = entries(cache_dir)
    entry.write_bytes(damage(entry.read_text(encoding="utf-8")).encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        rebuilt = traced_inventory(spec_of(), **ASKED)
    assert rebuilt == good and len(traces) == 2
    assert str(entry) in caplog.text and "traced again" in caplog.text
    assert traced_inventory(spec_of(), **ASKED) == good and len(traces) == 2  # the rewritten entry is served
    assert entries(cache_dir) == [entry]


def test_an_unreadable_entry_is_traced_again_and_rewritten(cache_dir, traces, caplog, monkeypatch):
    good = traced_inventory(spec_of(), **ASKED)
    [entry] = entries(cache_dir)
    read_text = Path.read_text

    def refused(path: Path, *args: Any, **kwargs: Any) -> str:
        if path == entry:  # what a file of another user's, mode 0600, does (root reads anything)
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(trace_cache, "_reported", set())
    entry.write_text("stale")
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        patch.setattr(Path, "read_text", refused)
        rebuilt = traced_inventory(spec_of(), **ASKED)
    assert rebuilt == good and len(traces) == 2
    assert f"cannot read {entry}" in caplog.text and "traced again" in caplog.text
    assert json.loads(entry.read_text(encoding="utf-8"))["inventory"] == good  # rewritten
    assert traced_inventory(spec_of(), **ASKED) == good and len(traces) == 2
    assert rebuilt == good and len(traces) == 2
    assert str(entry) in caplog.text and "traced again" in caplog.text
    assert traced_inventory(spec_of(), **ASKED) == good and len(traces) == 2  # the rewritten entry is served
    assert entries(cache_dir) == [entry]


def test_off_writes_nothing(traces, monkeypatch, tmp_path):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv(trace_cache.XDG_CACHE_HOME_ENV, str(tmp_path / "xdg"))
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, trace_cache.CACHE_OFF.upper())
    assert trace_cache.cache_directory() is None
    first, second = (traced_inventory(spec_of(), **ASKED) for _ in range(2))
    assert first == second and len(traces) == 2
    assert not (home / ".cache" / "dooly").exists() and not (tmp_path / "xdg" / "dooly").exists()
    assert list(tmp_path.rglob(f"*{trace_cache.ENTRY_SUFFIX}")) == []


def test_the_cache_lives_in_the_user_cache_directory_unless_named(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(trace_cache.TRACE_CACHE_ENV, raising=False)
    monkeypatch.delenv(trace_cache.XDG_CACHE_HOME_ENV, raising=False)
    assert trace_cache.cache_directory() == tmp_path / "home" / ".cache" / "dooly" / "traces"
    monkeypatch.setenv(trace_cache.XDG_CACHE_HOME_ENV, str(tmp_path / "xdg"))
    assert trace_cache.cache_directory() == tmp_path / "xdg" / "dooly" / "traces"
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, "~/traces")
    assert trace_cache.cache_directory() == tmp_path / "home" / "traces"


def test_a_cache_that_cannot_be_written_still_answers_and_says_so_once(traces, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    unwritable = blocker / "traces"  # below a file: no user, root included, can create it
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, str(unwritable))
    monkeypatch.setattr(trace_cache, "_reported", set())
    with caplog.at_level(logging.INFO):
        first, second = (traced_inventory(spec_of(), **ASKED) for _ in range(2))
    assert first == second and len(traces) == 2
    warnings = [r for r in caplog.records if r.name == CACHE_LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"cannot write to {unwritable}" in warnings[0].getMessage()
    assert caplog.text.count("(not cached)") == 2
    assert files_under(tmp_path) == [blocker]


def test_a_trace_s_warnings_are_logged_again_on_a_hit(cache_dir, traces, caplog):
    defaulted = spec_of({k: v for k, v in TINY_LLAMA.items() if k != DEFAULTED_FIELD})
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            traced_inventory(defaulted, **ASKED)
        assert f"lacks {DEFAULTED_FIELD}" in caplog.text and "using transformers' defaults" in caplog.text
    assert len(traces) == 1


def test_a_config_refused_without_allow_defaults_is_not_served_a_permissive_trace(cache_dir, traces):
    defaulted = spec_of({k: v for k, v in TINY_LLAMA.items() if k != DEFAULTED_FIELD})
    traced_inventory(defaulted, **ASKED)  # a library call accepts transformers' defaults
    with click.Context(click.Command("simulate")).scope(), pytest.raises(DoolyError, match="--allow-defaults"):
        traced_inventory(defaulted, **ASKED)  # the CLI without --allow-defaults refuses the config
    assert len(traces) == 2 and len(entries(cache_dir)) == 1


# ---------------------------------------------------------------------------------------------
# The cap: eviction, staleness, `dooly trace-cache list|clear`
# ---------------------------------------------------------------------------------------------

# What a fake entry's inventory is padded with, so its size dwarfs the differences between keys
# (a stale code digest, another model name) and a cap of N and a half entries is unambiguous.
PADDING_BYTES = 4000
# Last uses long past, in increasing order: a fake entry is stamped with one after it is written.
OLDEST = 1_000_000.0
SECOND = 2_000_000.0
THIRD = 3_000_000.0
FOURTH = 4_000_000.0
STALE_CODE_DIGEST = "0" * 64
STALE_VERSIONS = (("torch", "0.0.1"), ("transformers", "0.0.1"))


@pytest.fixture
def uncapped(cache_dir, monkeypatch) -> Path:
    """The test's cache under the default cap (nothing evicted), whatever the developer's shell sets."""
    monkeypatch.delenv(trace_cache.MAX_MB_ENV, raising=False)
    monkeypatch.setattr(trace_cache, "_reported", set())
    return cache_dir


def fake_key(name: str, *, code: str | None = None,
             versions: tuple[tuple[str, str], ...] | None = None) -> trace_cache.TraceKey:
    """The key of a trace of a model NAME, current unless given another code digest or versions."""
    return trace_cache.TraceKey(
        model_key=f"key-{name}", config_digest=f"config-{name}", model_id=name, engine=ENGINE, backend=BACKEND,
        dtype=DTYPE, tp=1, phase=INVENTORY_PHASE, defaults_allowed=False,
        versions=trace_cache.package_versions(ENGINE) if versions is None else versions,
        code=trace_cache.code_digest() if code is None else code)


def fake_entry(directory: Path, name: str, last_used: float | None = None, **stale: Any) -> Path:
    """An entry written by the cache's own writer (no trace), stamped as last used at LAST_USED."""
    path = trace_cache.write_entry(directory, fake_key(name, **stale),
                                   {"operations": [], "padding": "x" * PADDING_BYTES}, ())
    assert path is not None
    if last_used is not None:
        os.utime(path, (last_used, last_used))
    return path


def cap_at(monkeypatch, entries: float, entry: Path) -> None:
    """Cap the cache at ENTRIES entries the size of ENTRY, through the environment."""
    max_bytes = entries * entry.stat().st_size
    monkeypatch.setenv(trace_cache.MAX_MB_ENV, str(max_bytes / trace_cache.BYTES_PER_MB))


def models_in(directory: Path) -> set[str]:
    return {json.loads(path.read_text())["key"]["model_id"] for path in entries(directory)}


def test_the_least_recently_used_entries_are_evicted_first(uncapped, monkeypatch):
    first = fake_entry(uncapped, "m-a", OLDEST)
    fake_entry(uncapped, "m-b", THIRD)
    fake_entry(uncapped, "m-c", SECOND)
    fake_entry(uncapped, "m-d", FOURTH)
    assert models_in(uncapped) == {"m-a", "m-b", "m-c", "m-d"}  # the default cap evicts nothing
    cap_at(monkeypatch, 3.5, first)  # five entries over 3.5: down to 0.9 of it, so two go
    fake_entry(uncapped, "m-e")
    assert models_in(uncapped) == {"m-b", "m-d", "m-e"}
    assert not (uncapped / fake_key("m-a").model_key).exists()  # an emptied model folder goes too


def test_a_hit_makes_an_entry_the_most_recently_used(uncapped, monkeypatch):
    first = fake_entry(uncapped, "m-a", OLDEST)
    fake_entry(uncapped, "m-b", SECOND)
    served = trace_cache.read_entry(uncapped, fake_key("m-a"))
    assert served is not None and served.path == first and first.stat().st_mtime > SECOND
    cap_at(monkeypatch, 2.5, first)
    fake_entry(uncapped, "m-c")
    assert models_in(uncapped) == {"m-a", "m-c"}


def test_the_entry_just_written_is_kept_even_above_the_cap(uncapped, monkeypatch):
    first = fake_entry(uncapped, "m-a", OLDEST)
    fake_entry(uncapped, "m-b", SECOND)
    cap_at(monkeypatch, 0.5, first)
    written = fake_entry(uncapped, "m-c")
    assert entries(uncapped) == [written]


def test_stale_entries_are_evicted_first_whatever_their_recency(uncapped, monkeypatch):
    first = fake_entry(uncapped, "m-current-old", OLDEST)
    fake_entry(uncapped, "m-current-new", SECOND)
    fake_entry(uncapped, "m-stale-code", FOURTH, code=STALE_CODE_DIGEST)
    fake_entry(uncapped, "m-stale-versions", FOURTH, versions=STALE_VERSIONS)
    # An entry of an older layout records no key this code reads: stale too.
    older = fake_entry(uncapped, "m-older-layout", THIRD)
    older.write_text(json.dumps({**json.loads(older.read_text()), "schema": "dooly-trace-cache/0"}))
    os.utime(older, (FOURTH, FOURTH))
    order = [d.key["model_id"] if d.key else None for d in trace_cache.eviction_order(
        [trace_cache.describe(e) for e in trace_cache.scan_entries(uncapped)])]
    assert order[3:] == ["m-current-old", "m-current-new"] and None in order[:3]
    cap_at(monkeypatch, 3.5, first)  # six entries over 3.5: three go, the stale ones
    fake_entry(uncapped, "m-new")
    assert models_in(uncapped) == {"m-current-old", "m-current-new", "m-new"}


def test_eviction_beside_another_process_or_an_unremovable_entry_never_fails_the_write(uncapped, monkeypatch, caplog):
    first = fake_entry(uncapped, "m-a", OLDEST)
    second = fake_entry(uncapped, "m-b", SECOND)
    third = fake_entry(uncapped, "m-c", THIRD)
    unlink = Path.unlink

    def contended(path: Path, *args: Any, **kwargs: Any) -> None:
        if path == first:  # another process evicted it a moment before
            unlink(path)
            raise FileNotFoundError(2, "No such file or directory", str(path))
        if path == second:  # another user's, in a shared cache
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, *args, **kwargs)

    cap_at(monkeypatch, 1.5, first)
    monkeypatch.setattr(Path, "unlink", contended)
    with caplog.at_level(logging.DEBUG, logger=CACHE_LOGGER):
        fake_entry(uncapped, "m-d")  # evicts m-a (already gone) and m-c; m-b refuses
        fake_entry(uncapped, "m-e")  # m-b refuses again (not logged again); m-d goes
    assert models_in(uncapped) == {"m-b", "m-e"} and not third.exists() and not first.exists()
    refusals = [r for r in caplog.records if "cannot remove" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.DEBUG and str(second) in refusals[0].getMessage()


@pytest.mark.parametrize(
    ("configured", "expected_mb", "warned"),
    [(None, trace_cache.DEFAULT_MAX_MB, False), ("2.5", 2.5, False), (" 100 ", 100.0, False),
     ("0", trace_cache.DEFAULT_MAX_MB, True), ("-1", trace_cache.DEFAULT_MAX_MB, True),
     ("inf", trace_cache.DEFAULT_MAX_MB, True), ("lots", trace_cache.DEFAULT_MAX_MB, True)],
)
def test_the_cap_comes_from_the_environment(uncapped, monkeypatch, caplog, configured, expected_mb, warned):
    if configured is not None:
        monkeypatch.setenv(trace_cache.MAX_MB_ENV, configured)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        caps = {trace_cache.max_cache_bytes() for _ in range(2)}
    assert caps == {round(expected_mb * trace_cache.BYTES_PER_MB)}
    assert len(caplog.records) == warned  # a bad value is said once, and the command goes on
    if warned:
        assert trace_cache.MAX_MB_ENV in caplog.text and "default" in caplog.text


def dooly(*args: str) -> Any:
    from click.testing import CliRunner

    from dooly.cli import cli

    return CliRunner().invoke(cli, ["trace-cache", *args])


def dooly_json(*args: str) -> dict[str, Any]:
    result = dooly(*args, "--output", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_list_shows_each_entry_stale_first_then_least_recently_used(uncapped):
    fake_entry(uncapped, "m-new", THIRD)
    fake_entry(uncapped, "m-old", OLDEST)
    stale = fake_entry(uncapped, "m-stale", FOURTH, code=STALE_CODE_DIGEST, versions=STALE_VERSIONS)
    listed = dooly_json("list")
    rows = listed["entries"]
    assert [(r["model"], r["state"], r["stale_because"]) for r in rows] == [
        ("m-stale", "stale", [trace_cache.STALE_CODE, trace_cache.STALE_VERSIONS]),
        ("m-old", "current", []), ("m-new", "current", [])]
    assert {(r["engine"], r["backend"], r["dtype"], r["tp"], r["phase"]) for r in rows} == {
        (ENGINE, BACKEND, DTYPE, 1, INVENTORY_PHASE)}
    assert rows[0]["path"] == str(stale) and rows[0]["last_used_unix"] == FOURTH
    assert listed["total_bytes"] == sum(p.stat().st_size for p in entries(uncapped))
    assert listed["stale_bytes"] == stale.stat().st_size and listed["directory"] == str(uncapped)
    assert listed["max_bytes"] == round(trace_cache.DEFAULT_MAX_MB * trace_cache.BYTES_PER_MB)
    text = dooly("list")
    assert text.exit_code == 0
    assert text.output.splitlines()[-1].startswith("3 entries, ") and f"in {uncapped}; 1 stale" in text.output


def test_clear_stale_keeps_the_current_entries_and_clear_removes_all(uncapped):
    current = fake_entry(uncapped, "m-current", OLDEST)
    stale = fake_entry(uncapped, "m-stale", FOURTH, code=STALE_CODE_DIGEST)
    cleared = dooly_json("clear", "--stale")
    assert cleared["removed"] == [str(stale)] and cleared["kept"] == [str(current)] and cleared["failed"] == []
    assert entries(uncapped) == [current]
    cleared = dooly_json("clear")
    assert cleared["removed"] == [str(current)] and cleared["removed_bytes"] > PADDING_BYTES
    assert entries(uncapped) == [] and dooly_json("list")["entries"] == []


def died_writing(directory: Path, name: str, monkeypatch) -> Path:
    """The temporary file a writer leaves when it dies between creating it and renaming it into place."""
    before = set(directory.rglob(f"*{trace_cache.TEMP_SUFFIX}"))
    with monkeypatch.context() as patched:
        patched.setattr(trace_cache.os, "replace", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            fake_entry(directory, name)
    (left,) = set(directory.rglob(f"*{trace_cache.TEMP_SUFFIX}")) - before
    return left


def test_clear_removes_what_dead_writers_left_and_not_what_a_live_one_writes(uncapped, monkeypatch):
    dead = died_writing(uncapped, "m-dead", monkeypatch)
    hour_ago = dead.stat().st_mtime - trace_cache.LEFTOVER_AGE_S - 1
    os.utime(dead, (hour_ago, hour_ago))
    live = died_writing(uncapped, "m-live", monkeypatch)
    # Neither is an entry: listed nowhere, counted nowhere.
    assert dooly_json("list")["entries"] == []
    cleared = dooly_json("clear", "--stale")
    assert cleared["leftovers_removed"] == [str(dead)] and cleared["leftover_bytes"] > PADDING_BYTES
    assert not dead.exists() and not dead.parent.exists() and live.exists()
    text = dooly("clear")
    assert text.exit_code == 0 and "temporary" not in text.output and live.exists()


def test_an_off_or_missing_cache_is_one_line(uncapped, monkeypatch, tmp_path):
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, str(tmp_path / "never-written"))
    for command in ("list", "clear"):
        result = dooly(command)
        assert result.exit_code == 0 and len(result.output.splitlines()) == 1, result.output
        assert "nothing" in result.output and str(tmp_path / "never-written") in result.output
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, trace_cache.CACHE_OFF)
    result = dooly("list")
    assert (result.exit_code, result.output) == (0, "the trace cache is off (DOOLY_TRACE_CACHE=off): nothing is cached\n")
    assert dooly_json("list")["enabled"] is False
    result = dooly("clear")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert result.output.startswith("error: the trace cache is off")


def test_a_cache_that_is_a_file_or_a_bad_cap_is_an_error_line(uncapped, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a cache")
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, str(blocker))
    result = dooly("list")
    assert (result.exit_code, result.output) == (2, f"error: the trace cache {blocker} (DOOLY_TRACE_CACHE) is not a directory\n")
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, str(uncapped))
    monkeypatch.setenv(trace_cache.MAX_MB_ENV, "nan")
    result = dooly("list")
    assert result.exit_code == 2 and result.output.startswith("error: ") and "--max-mb" in result.output
    assert len(result.output.splitlines()) == 1
