"""A model profiled once is named by its id or model key alone, its config file gone (#20).

`dooly profile` stores the config beside the model's inventories; then `trace`, `plan`,
`profile`, `bench`, `predict` and `simulate` all take the model's id or model key with the store,
the predicting commands trace it from the stored config for a backend the store has no inventory
of, and a store written before configs were kept refuses such a name in one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.models.registry import ModelSpec, model_key
from dooly.models.stored import (
    CONFIG_SCHEMA,
    NoStoredConfig,
    find_stored_model,
    resolve_model_with_store,
    write_model_config,
)
from dooly.store.backends import open_store
from dooly.store.keys import inventory_key, model_config_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "profile"))
from profile_helpers import MODEL_A, MODEL_B, SMALL_GRID_ARGS  # noqa: E402

MODEL_ID = "tiny-stored"
BACKEND = "paged|sdpa"
OTHER_BACKEND = "paged|eager"
FOLDS = 2
COMMITTED_STORE = Path(__file__).resolve().parents[2] / "data" / "h100" / "db"
# A model of the committed H100 store (meta-llama/Llama-3.1-8B): inventories, no stored config.
COMMITTED_MODEL_KEY = "c8d6b5edb411"
SIM_ARGS = ("--requests", "4", "--rate", "50", "--prompt-len", "12", "--output-len", "3",
            "--set", "num_blocks=64", "--set", "block_size=16")
BENCH_ARGS = ("--requests", "2", "--rate", "50", "--prompt-len", "8", "--output-len", "2", "--dtype", "float32",
              "--warmup-requests", "0", "--set", "num_blocks=16", "--set", "block_size=16")


@dataclass(frozen=True)
class Profiled:
    """A fitted store holding one model profiled from a config file that no longer exists."""

    root: str
    model_key: str
    platform: str


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> Profiled:
    folder = tmp_path_factory.mktemp("configs") / MODEL_ID
    folder.mkdir()
    config = folder / "config.json"
    config.write_text(json.dumps(MODEL_A))
    root = str(tmp_path_factory.mktemp("db"))
    runner = CliRunner()
    result = runner.invoke(cli, ["profile", str(config), "--store", root, *SMALL_GRID_ARGS, "--output", "json"])
    assert result.exit_code == 0, result.output
    for command in (["merge", "--store", root], ["fit", "--store", root, "--folds", str(FOLDS)]):
        result = runner.invoke(cli, command)
        assert result.exit_code == 0, result.output
    shutil.rmtree(folder)
    platform = next(Path(root, "shards").iterdir()).name.removeprefix("platform=")
    return Profiled(root=root, model_key=model_key(ModelSpec(MODEL_ID, MODEL_A, "test")), platform=platform)


@pytest.fixture
def old_store(profiled, tmp_path) -> str:
    """The same store as one written before configs were kept: inventories, no config."""
    root = tmp_path / "old-db"
    shutil.copytree(profiled.root, root)
    (root / model_config_key(profiled.model_key)).unlink()
    return str(root)


def store_files(root: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def fitted_args(profiled: Profiled, backend: str = BACKEND) -> list[str]:
    return ["--store", profiled.root, "--platform", profiled.platform, "--backend", backend]


def test_profile_stores_the_config_beside_the_inventories(profiled):
    document = json.loads(Path(profiled.root, model_config_key(profiled.model_key)).read_text())
    assert document["schema"] == CONFIG_SCHEMA
    assert (document["model_id"], document["model_key"], document["config"]) == (MODEL_ID, profiled.model_key, MODEL_A)
    assert document["source"].endswith(f"{MODEL_ID}/config.json")
    assert Path(profiled.root, inventory_key(profiled.model_key, BACKEND)).is_file()


def test_writing_the_same_config_again_changes_nothing(profiled, tmp_path):
    root = tmp_path / "db"
    shutil.copytree(profiled.root, root)
    path = root / model_config_key(profiled.model_key)
    before = path.read_bytes()
    store = open_store(str(root), create=False)
    write_model_config(store, resolve_model_with_store(MODEL_ID, store))
    assert path.read_bytes() == before
    # Profiling it again by its id alone: nothing is missing, and the config is the same bytes.
    code, output = invoke("profile", MODEL_ID, "--store", str(root), *SMALL_GRID_ARGS, "--output", "json")
    assert code == 0, output
    assert json.loads(output)["measured_points"] == 0
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["id", "key", "upper-case id"])
def test_trace_plan_and_predict_take_the_stored_name(profiled, name):
    model = {"id": MODEL_ID, "key": profiled.model_key, "upper-case id": MODEL_ID.upper()}[name]
    before = store_files(profiled.root)
    code, output = invoke("trace", model, "--store", profiled.root, "--output", "json")
    assert code == 0, output
    assert json.loads(output)["model"] == MODEL_ID
    code, output = invoke("plan", model, "--store", profiled.root, "--platform", profiled.platform,
                          *SMALL_GRID_ARGS, "--output", "json")
    assert code == 0, output
    planned = json.loads(output)
    assert planned["signatures"] > 0 and planned["missing_signatures"] == 0
    code, output = invoke("predict", "--model", model, *fitted_args(profiled), "--decode", "32", "--output", "json")
    assert code == 0, output
    assert json.loads(output)["inventory"] == "store"
    assert store_files(profiled.root) == before


def test_simulate_and_bench_take_the_stored_key(profiled, tmp_path):
    before = store_files(profiled.root)
    code, output = invoke("simulate", profiled.model_key, *fitted_args(profiled), *SIM_ARGS, "--no-cpu-overhead",
                          "--output", "json")
    assert code == 0, output
    assert json.loads(output)["num_finished"] == 4
    out = tmp_path / "gt"
    code, output = invoke("bench", profiled.model_key, "--store", profiled.root, "--out", str(out), *BENCH_ARGS,
                          "--output", "json")
    assert code == 0, output
    assert json.loads((out / "bench.json").read_text())["model"] == MODEL_ID
    assert store_files(profiled.root) == before


def test_a_backend_without_an_inventory_is_traced_from_the_stored_config(profiled, tmp_path):
    from dooly.fit.resolve import ORIGIN_TRACED, resolve_inventory

    root = tmp_path / "db"
    shutil.copytree(profiled.root, root)
    (root / inventory_key(profiled.model_key, BACKEND)).unlink()
    before = store_files(str(root))
    code, output = invoke("predict", "--model", MODEL_ID, "--store", str(root), "--platform", profiled.platform,
                          "--backend", BACKEND, "--decode", "32", "--output", "json")
    assert code == 0, output
    assert json.loads(output)["inventory"] == "traced on the CPU"
    eager = resolve_inventory(open_store(str(root), create=False), profiled.model_key, backend=OTHER_BACKEND)
    assert eager.origin == ORIGIN_TRACED and eager.inventory["backend"] == OTHER_BACKEND
    assert eager.model_key == profiled.model_key
    assert store_files(str(root)) == before


def test_a_name_nothing_knows_is_one_error_line(profiled):
    before = store_files(profiled.root)
    for args in (["trace", "no-such-model", "--store", profiled.root],
                 ["plan", "no-such-model", "--store", profiled.root, "--platform", profiled.platform],
                 ["predict", "--model", "no-such-model", *fitted_args(profiled), "--decode", "8"],
                 ["trace", MODEL_ID]):  # without the store, its id is no model either
        code, output = invoke(*args)
        assert code == 2, (args, output)
        assert one_error_line(output).startswith("error: unknown model"), (args, output)
    assert store_files(profiled.root) == before


def test_a_store_without_configs_says_how_to_store_one(profiled, old_store):
    from dooly.fit.resolve import resolve_inventory

    before = store_files(old_store)
    for args in (["trace", MODEL_ID, "--store", old_store],
                 ["plan", profiled.model_key, "--store", old_store],
                 ["profile", MODEL_ID, "--store", old_store, *SMALL_GRID_ARGS]):
        code, output = invoke(*args)
        assert code == 2, (args, output)
        line = one_error_line(output)
        assert "no config to build it from" in line and f"dooly profile CONFIG --store {old_store}" in line, line
    # A backend it has no inventory for cannot be traced; its own inventory still serves its own.
    with pytest.raises(DoolyError, match=rf"no inventory of '{MODEL_ID}' for --tp 1 and paged\|eager .*no config"):
        resolve_inventory(open_store(old_store, create=False), MODEL_ID, backend=OTHER_BACKEND)
    code, output = invoke("predict", "--model", MODEL_ID, "--store", old_store, "--platform", profiled.platform,
                          "--backend", BACKEND, "--decode", "8", "--output", "json")
    assert code == 0, output
    assert json.loads(output)["inventory"] == "store"
    assert store_files(old_store) == before


def test_the_committed_store_holds_no_configs_and_says_so():
    code, output = invoke("trace", COMMITTED_MODEL_KEY, "--store", str(COMMITTED_STORE))
    assert code == 2
    assert "no config to build it from" in one_error_line(output)


def test_a_name_of_two_stored_configs_is_refused_and_a_tampered_config_ignored(tmp_path):
    store = open_store(str(tmp_path / "db"))
    first, second = ModelSpec(MODEL_ID, MODEL_A, "a"), ModelSpec(MODEL_ID, MODEL_B, "b")
    write_model_config(store, first)
    write_model_config(store, second)
    with pytest.raises(DoolyError, match=f"names 2 configs in .*{model_key(first)}.*name one by its model key"):
        find_stored_model(store, MODEL_ID)
    assert find_stored_model(store, model_key(second)) == second
    tampered = tmp_path / "db" / model_config_key(model_key(second))
    document = json.loads(tampered.read_text())
    document["config"]["hidden_size"] *= 2
    tampered.write_text(json.dumps(document))
    assert find_stored_model(store, model_key(second)) is None
    assert find_stored_model(store, MODEL_ID) == first


def test_a_store_only_name_without_a_store_is_the_resolver_s_error(tmp_path):
    store = open_store(str(tmp_path / "db"))
    with pytest.raises(DoolyError, match="unknown model"):
        resolve_model_with_store(MODEL_ID, None)
    with pytest.raises(DoolyError, match="unknown model") as raised:
        resolve_model_with_store(MODEL_ID, store)
    assert not isinstance(raised.value, NoStoredConfig)
