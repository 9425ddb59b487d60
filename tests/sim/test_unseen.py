"""A model the store has never run: resolved, traced on the CPU, predicted with coverage (#20).

The store is a small synthetic one (dooly.fit.synthetic: mm, mul, silu and paged|sdpa attention
of one toy model), so every real config traced here brings signatures it never measured and op
classes it never measured (embedding, rsqrt, a MoE router's sigmoid...): the class regressors and
the family fallback answer them, and the coverage says so.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.fit import synthetic as syn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trace"))
from trace_configs import TINY_LLAMA, TINY_QWEN2_MOE, TINY_STARCODER2  # noqa: E402

TOY = syn.TOY_MODELS[0]
FOLDS = 2
SIM_ARGS = ("--requests", "6", "--rate", "50", "--prompt-len", "12", "--output-len", "3",
            "--set", "num_blocks=64", "--set", "block_size=16")


@pytest.fixture(scope="module")
def fitted_store(tmp_path_factory) -> str:
    """A local store with one synthetic model's shards and inventory, merged and fitted."""
    from dooly.store.backends import open_store
    from dooly.store.documents import write_json
    from dooly.store.merge import merge_store
    from dooly.store.shards import write_shard

    root = str(tmp_path_factory.mktemp("db"))
    store = open_store(root)
    write_shard(store, syn.snapshot_table((TOY,)), run_id="synthetic", chunk_index=0)
    write_json(store, syn.inventory_store_key(TOY), syn.inventory(TOY))
    merge_store(store)
    result = CliRunner().invoke(cli, ["fit", "--store", root, "--folds", str(FOLDS), "--output", "json"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("configs")
    paths = {}
    for name, payload in (("llama", TINY_LLAMA), ("moe", TINY_QWEN2_MOE), ("starcoder2", TINY_STARCODER2)):
        directory = folder / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(payload))
        paths[name] = directory / "config.json"
    return paths


def store_files(root: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


def fitted_args(store: str) -> list[str]:
    return ["--store", store, "--platform", syn.PLATFORM, "--backend", syn.BACKEND]


@pytest.mark.parametrize("name", ["llama", "moe", "starcoder2"])
def test_unseen_configs_simulate_with_coverage_and_write_nothing(fitted_store, configs, name):
    before = store_files(fitted_store)
    result = CliRunner().invoke(cli, ["simulate", str(configs[name]), *fitted_args(fitted_store), *SIM_ARGS, "--no-cpu-overhead",
                                      "--output", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_finished"] == 6
    coverage = summary["coverage"]
    assert set(coverage) <= {"prefill", "decode", "mixed"} and coverage
    for phase in coverage.values():
        shares = phase["measured_share"] + phase["class_regressor_share"] + phase["fallback_share"]
        assert shares == pytest.approx(1.0)
        # Nothing of a real config is measured in a synthetic store; classes it never measured
        # (embedding, norms...) come from the fallback, and the estimated list accounts for all.
        assert phase["measured_share"] == 0.0 and phase["fallback_share"] > 0.0
        assert sum(e["share"] for e in phase["estimated"]) == pytest.approx(1.0)
    assert store_files(fitted_store) == before


def test_moe_router_sigmoid_is_estimated_by_the_fallback(fitted_store, configs):
    result = CliRunner().invoke(cli, ["predict", "--model", str(configs["moe"]), *fitted_args(fitted_store),
                                      "--decode", "100", "--decode", "300", "--per-op", "--output", "json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["inventory"] == "traced on the CPU"
    assert list(payload["coverage"]) == ["decode"]
    sources = {o["op_class"]: o["source"] for o in payload["operations"]}
    assert sources["aten.sigmoid.default"] == "fallback"
    assert sources["attention:paged|sdpa"] == "class-regressor"
    assert all(o["seconds"] > 0 for o in payload["operations"] if o["source"] == "fallback" and o["op"] != "aten.empty_like.default")


def test_require_measured_is_one_error_line_with_exit_2(fitted_store, configs):
    result = CliRunner().invoke(cli, ["simulate", str(configs["llama"]), *fitted_args(fitted_store), *SIM_ARGS,
                                      "--require-measured"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --require-measured:")
    assert "dooly plan" in lines[0] and "fallback" in lines[0]


def test_the_store_s_own_model_is_fully_measured(fitted_store):
    result = CliRunner().invoke(cli, ["predict", "--model", TOY.model_id, *fitted_args(fitted_store),
                                      "--prefill", "64:0", "--require-measured", "--output", "json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["inventory"] == "store"
    assert payload["coverage"]["prefill"]["measured_share"] == 1.0
    assert payload["coverage"]["prefill"]["estimated"] == []


def test_unresolvable_model_is_one_error_line(fitted_store):
    before = store_files(fitted_store)
    result = CliRunner().invoke(cli, ["simulate", "no-such-model", *fitted_args(fitted_store), *SIM_ARGS])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'no-such-model'")
    assert store_files(fitted_store) == before


def test_an_inventory_is_never_used_for_another_backend(fitted_store, configs, tmp_path):
    """A config with only a paged|sdpa inventory in the store is traced for paged|eager; a name
    only the store knows, without an inventory for that backend, is one error line."""
    import shutil

    from dooly.fit.resolve import ORIGIN_STORE, ORIGIN_TRACED, resolve_inventory
    from dooly.profile.run import write_inventory
    from dooly.store.backends import open_store
    from dooly.trace.tracer import trace_model

    root = tmp_path / "db"
    shutil.copytree(fitted_store, root)
    store = open_store(str(root), create=False)
    path = str(configs["llama"])
    write_inventory(store, trace_model(path, phase="mixed", backend="paged|sdpa"))
    sdpa = resolve_inventory(store, path, backend="paged|sdpa")
    assert sdpa.origin == ORIGIN_STORE and sdpa.inventory["backend"] == "paged|sdpa"
    by_folder = resolve_inventory(store, str(configs["llama"].parent), backend="paged|sdpa")
    assert by_folder.origin == ORIGIN_STORE and by_folder.model_key == sdpa.model_key
    by_name = resolve_inventory(store, "llama", backend="paged|sdpa")  # the id `dooly profile` stored it under
    assert by_name.origin == ORIGIN_STORE and by_name.model_key == sdpa.model_key
    eager = resolve_inventory(store, path, backend="paged|eager")
    assert eager.origin == ORIGIN_TRACED and eager.inventory["backend"] == "paged|eager"
    with pytest.raises(DoolyError, match=r"no inventory of 'toy/alpha-1b' for --tp 1 and paged\|eager"):
        resolve_inventory(store, TOY.model_id, backend="paged|eager")


def test_models_fitted_over_another_feature_set_are_refused_in_one_line(fitted_store):
    import numpy as np

    from dooly.fit.persist import check_feature_widths
    from dooly.fit.source import FittedSource, open_predictor

    predictor = open_predictor(FittedSource(store=fitted_store, platform=syn.PLATFORM, backend=syn.BACKEND))
    check_feature_widths(predictor, fitted_store)
    regressor = predictor.group.classes[syn.ATTENTION_CLASS].regressor
    if regressor.coef is not None:
        regressor.coef = np.append(regressor.coef, 0.0)
    else:
        regressor.regime_coef = np.zeros((regressor.regime_coef.shape[0], regressor.regime_coef.shape[1] - 3))
    with pytest.raises(DoolyError, match="run `dooly fit --store"):
        check_feature_widths(predictor, fitted_store)


def test_plan_prices_exactly_the_estimated_signatures(fitted_store, configs):
    """What `--require-measured` refuses is what `dooly plan` would profile."""
    runner = CliRunner()
    predicted = runner.invoke(cli, ["predict", "--model", str(configs["moe"]), *fitted_args(fitted_store),
                                    "--decode", "64", "--per-op", "--output", "json"])
    assert predicted.exit_code == 0, predicted.output
    estimated = {o["signature"] for o in json.loads(predicted.stdout)["operations"] if o["source"] != "measured"}
    planned = runner.invoke(cli, ["plan", str(configs["moe"]), "--store", fitted_store, "--platform", syn.PLATFORM,
                                  "--attention", syn.BACKEND, "--output", "json"])
    assert planned.exit_code == 0, planned.output
    summary = json.loads(planned.stdout)
    assert summary["missing_signatures"] == len(estimated) > 0
    assert summary["estimated_device_seconds"] > 0


def _simulated(result) -> dict:
    """A simulate command's JSON summary, less its own wall time."""
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    summary.pop("simulation_wall_s")
    return summary


def test_the_next_question_about_an_unseen_model_is_answered_from_the_trace_cache(
    fitted_store, configs, tmp_path, monkeypatch, caplog
):
    """The model is traced once: `simulate` again and `predict` reuse the trace (dooly/fit/trace_cache.py),
    the answers are the same, and the cache sits outside the store, which stays untouched."""
    from dooly.fit.trace_cache import ENTRY_SUFFIX, TRACE_CACHE_ENV

    cache = tmp_path / "traces"
    monkeypatch.setenv(TRACE_CACHE_ENV, str(cache))
    before = store_files(fitted_store)
    simulate = ["simulate", str(configs["starcoder2"]), *fitted_args(fitted_store), *SIM_ARGS, "--no-cpu-overhead",
                "--output", "json"]
    with caplog.at_level(logging.INFO, logger="dooly.fit.resolve"):
        traced = _simulated(CliRunner().invoke(cli, simulate))
        assert "traced on the CPU in" in caplog.text and f"(cached to {cache}" in caplog.text
        caplog.clear()
        reused = _simulated(CliRunner().invoke(cli, simulate))
        assert "reused from the cache" in caplog.text and "traced on the CPU in" not in caplog.text
        caplog.clear()
        predicted = CliRunner().invoke(cli, ["predict", "--model", str(configs["starcoder2"]),
                                             *fitted_args(fitted_store), "--decode", "64", "--output", "json"])
        assert predicted.exit_code == 0, predicted.output
        assert json.loads(predicted.stdout)["inventory"] == "traced on the CPU"
        assert "reused from the cache" in caplog.text
    assert reused == traced
    assert len(list(cache.rglob(f"*{ENTRY_SUFFIX}"))) == 1
    assert store_files(fitted_store) == before


def test_a_trace_cache_that_cannot_be_written_still_answers(fitted_store, configs, tmp_path, monkeypatch, caplog):
    from dooly.fit.trace_cache import CACHE_OFF, TRACE_CACHE_ENV

    simulate = ["simulate", str(configs["llama"]), *fitted_args(fitted_store), *SIM_ARGS, "--no-cpu-overhead",
                "--output", "json"]
    monkeypatch.setenv(TRACE_CACHE_ENV, CACHE_OFF)
    uncached = _simulated(CliRunner().invoke(cli, simulate))
    blocker = tmp_path / "a-file"
    blocker.write_text("a cache directory cannot be made below a file")
    monkeypatch.setenv(TRACE_CACHE_ENV, str(blocker / "traces"))
    with caplog.at_level(logging.WARNING, logger="dooly.fit.trace_cache"):
        assert _simulated(CliRunner().invoke(cli, simulate)) == uncached
    assert f"cannot write to {blocker / 'traces'}" in caplog.text
