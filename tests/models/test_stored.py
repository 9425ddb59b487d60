"""A model profiled once is named by its id or model key alone, its config file gone (#20).

`dooly profile` stores the config beside the model's inventories; then `trace`, `plan`,
`profile`, `bench`, `predict`, `simulate`, `explore`, `calibrate`, `measure-steps`, `models` and
the fleet all take the model's id or model key with the store,
the predicting commands trace it from the stored config for a backend the store has no inventory
of, and a store written before configs were kept refuses such a name in one line.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    stored_configs,
    write_model_config,
)
from dooly.store.backends import Store, open_store
from dooly.store.keys import inventory_key, model_config_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "profile"))
from profile_helpers import MODEL_A, MODEL_B, SMALL_GRID_ARGS  # noqa: E402

MODEL_ID = "tiny-stored"
BACKEND = "paged|sdpa"
OTHER_BACKEND = "paged|eager"
FOLDS = 2
DATA = Path(__file__).resolve().parents[2] / "data"
COMMITTED_STORES = (DATA / "h100" / "db", DATA / "h200" / "db")
# A model of the committed H100 store, by its model key (meta-llama/Llama-3.1-8B).
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


def test_only_a_name_the_store_knows_by_its_inventories_is_warned_of_as_known_to_it(profiled, old_store, caplog):
    """The KV block groups of a model without a config fall back to full attention. That is worth a
    warning where the store knows the model by its inventories only (`NoStoredConfig`, served by
    that inventory); a name no store knows, or a store-only name given without its store, is
    refused by the command in one error line, which a warning claiming the store knows it would
    contradict."""
    from dooly.sim.options import with_model_groups

    settings = {"num_blocks": 64}
    for model, store in (("no-such-model", None), ("no-such-model", profiled.root), (MODEL_ID, None)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dooly.sim.options"):
            assert with_model_groups(model, "transformers", settings, store) == settings
        assert caplog.records == [], (model, store, caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code, output = invoke("simulate", "no-such-model", *fitted_args(profiled), *SIM_ARGS, "--no-cpu-overhead")
    assert code == 2 and one_error_line(output).startswith("error: unknown model"), output
    assert "known to the store" not in caplog.text and FULL_ATTENTION_WARNING not in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dooly.sim.options"):
        assert with_model_groups(MODEL_ID, "transformers", settings, old_store) == settings
    [record] = caplog.records
    assert record.levelno == logging.WARNING, record
    assert "known to the store by its inventories only" in record.getMessage()
    assert FULL_ATTENTION_WARNING in record.getMessage()


def test_the_committed_stores_keep_every_model_s_config_so_its_key_names_it():
    for root in COMMITTED_STORES:
        store = open_store(str(root), create=False)
        folders = sorted(path.name for path in (root / "inventories").iterdir())
        assert sorted(stored_configs(store)) == folders, root
    code, output = invoke("models", COMMITTED_MODEL_KEY, "--store", str(COMMITTED_STORES[0]), "--output", "json")
    assert code == 0, output
    assert "meta-llama/Llama-3.1-8B" in output


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


# ---------------------------------------------------------------------------------------------
# explore, calibrate, measure-steps, models and the fleet take the stored name too
# ---------------------------------------------------------------------------------------------

# MODEL_A with every layer sliding over a window shorter than the contexts of `write_calib_run`.
SLIDING_ID = "tiny-sliding"
SLIDING = {**MODEL_A, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16}
FULL_ATTENTION_WARNING = "its KV blocks are charged as for full attention"
EXPLORE_ARGS = ("--slo", "ttft_p90=10", "--no-cpu-overhead", "--requests", "4", "--prompt-len", "12",
                "--output-len", "3", "--set", "num_blocks=64", "--jobs", "1", "--no-plots", "--output", "json")


def write_calib_run(directory: Path, model: str, platform: str) -> Path:
    """A `dooly bench` calibration run of MODEL in the bench's schema, its steps' wall times made up."""
    from dooly.engines.groundtruth import RequestRecord, StepRecord, write_ground_truth

    steps, clock = [], 0.0
    for i in range(24):
        prefill, decode = ([(24, 0)], [32 + i]) if i % 8 == 0 else ([], [40 + 3 * i, 20 + i, 10 + 2 * i][: 1 + i % 3])
        duration = 1.0 + 1e-3 * len(decode) + 1e-4 * sum(decode)
        steps.append(StepRecord(step=i, start_s=clock, duration_s=duration, prefill=prefill, decode_ctx=decode))
        clock += duration
    requests = [RequestRecord(request_id="r0", arrived_at_s=0.0, first_token_s=0.01, finished_s=clock,
                              prompt_tokens=24, output_tokens=2, token_times_s=[0.01, clock])]
    write_ground_truth(directory, requests, steps, {"use_cuda_graph": False, "num_blocks": 64, "block_size": 16},
                       {"model": model, "platform": platform, "backend": BACKEND, "engine": "transformers",
                        "dtype": "bfloat16", "stack": {"engine_version": "5.17.0"}})
    return directory


@pytest.fixture
def sliding_store(profiled, tmp_path) -> str:
    """The profiled store plus the stored config of a sliding-window model it never profiled."""
    root = tmp_path / "db"
    shutil.copytree(profiled.root, root)
    write_model_config(open_store(str(root), create=False), ModelSpec(SLIDING_ID, SLIDING, "test"))
    return str(root)


def test_explore_takes_the_stored_name_and_sizes_its_weights(profiled):
    from dooly.explore.hardware import parameter_count

    before = store_files(profiled.root)
    code, output = invoke("explore", MODEL_ID, "--store", profiled.root, "--platform", profiled.platform,
                          "--backend", BACKEND, *EXPLORE_ARGS)
    assert code == 0, output
    [candidate] = json.loads(output)["candidates"]
    assert candidate["candidate"]["model"] == MODEL_ID
    # Its config comes from the store: weights and KV cache are known, not "no config for the model".
    assert candidate["memory"]["parameters"] == parameter_count(MODEL_A)
    assert candidate["memory"]["kv_cache_gib_per_gpu"] > 0
    assert store_files(profiled.root) == before


def test_calibrate_reads_a_stored_model_s_layers_and_cache_groups(sliding_store, profiled, tmp_path, caplog):
    """A calibration run of a model only the store knows is charged by its stored config: its
    sliding-window KV groups, not full attention, and the same calibration as its config file gives."""
    from dooly.sim.calibration import CacheGroups
    from dooly.sim.calibration_commands import CalibrationRun

    config = tmp_path / f"{SLIDING_ID}.json"
    config.write_text(json.dumps(SLIDING))
    by_id = write_calib_run(tmp_path / "by-id", SLIDING_ID, profiled.platform)
    by_file = write_calib_run(tmp_path / "by-file", str(config), profiled.platform)
    expected = CacheGroups.from_scheduler(CalibrationRun.load(by_file).scheduler())
    assert expected.sliding > 0
    before = store_files(sliding_store)
    fitted = {}
    for name, run in (("id", by_id), ("file", by_file)):
        caplog.clear()
        code, output = invoke("calibrate", "--store", sliding_store, "--ground-truth", str(run), "--dry-run",
                              "--output", "json")
        assert code == 0, output
        assert FULL_ATTENTION_WARNING not in caplog.text, name
        [fitted[name]] = json.loads(output)["calibrations"]
    assert fitted["id"]["inputs"][0]["num_layers"] == SLIDING["num_hidden_layers"]
    assert fitted["id"]["terms"] == fitted["file"]["terms"]
    stored = CalibrationRun.load(by_id, store=sliding_store)
    assert CacheGroups.from_scheduler(stored.scheduler()) == expected
    assert store_files(sliding_store) == before


def test_measure_steps_and_models_take_the_stored_name(profiled):
    before = store_files(profiled.root)
    code, output = invoke("models", profiled.model_key, "--store", profiled.root, "--output", "json")
    assert code == 0, output
    [row] = json.loads(output)["models"]
    assert (row["model_id"], row["layers"]) == (MODEL_ID, MODEL_A["num_hidden_layers"])
    code, output = invoke("measure-steps", MODEL_ID, "--store", profiled.root, "--device", "cpu", "--dtype", "float32",
                          "--compositions", "small", "--samples", "1", "--no-graphs", "--output", "json")
    assert code == 0, output
    measured = json.loads(output)
    assert measured["model_id"] == MODEL_ID and measured["steps"]
    for args in (["models", MODEL_ID], ["measure-steps", MODEL_ID, "--device", "cpu"]):  # no store: no such model
        code, output = invoke(*args)
        assert code == 2 and one_error_line(output).startswith("error: unknown model"), (args, output)
    assert store_files(profiled.root) == before


def test_explore_reads_a_stored_config_once_over_its_candidates(profiled: Profiled, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explore run uses a model's config at every turn (its KV block groups, the weights and
    KV-cache memory of each candidate, the inventory each predictor is opened with): the config the
    store keeps is read once per run, whatever the number of candidates, and read again after."""
    import dooly.store.documents as documents
    from dooly.store.keys import MODEL_CONFIG_NAME

    reads: list[str] = []
    read_json = documents.read_json

    def counted(store: Store, key: str) -> dict[str, Any] | None:
        if key.endswith(f"/{MODEL_CONFIG_NAME}"):
            reads.append(key)
        return read_json(store, key)

    monkeypatch.setattr(documents, "read_json", counted)
    blocks = ("64", "128", "256")
    args = [f"num_blocks={','.join(blocks)}" if arg.startswith("num_blocks=") else arg for arg in EXPLORE_ARGS]
    code, output = invoke("explore", MODEL_ID, "--store", profiled.root, "--platform", profiled.platform,
                          "--backend", BACKEND, *args)
    assert code == 0, output
    candidates = json.loads(output)["candidates"]
    assert sorted(str(c["candidate"]["settings"]["num_blocks"]) for c in candidates) == sorted(blocks)
    assert all(c["memory"]["parameters"] > 0 for c in candidates)
    assert reads == [model_config_key(profiled.model_key)]
    # Outside a run nothing is remembered: a config stored since is seen.
    assert find_stored_model(open_store(profiled.root, create=False), MODEL_ID) is not None
    assert len(reads) == 2


def test_the_fleet_profiles_a_stored_model_by_its_name(profiled):
    from dooly.fleet import jobs
    from dooly.fleet.spec import FleetSpec

    before = store_files(profiled.root)
    spec = FleetSpec.load(None, store=profiled.root).select(models=[MODEL_ID])
    assert spec.models == (MODEL_ID,)
    manifests = jobs.build_run_manifests(spec, run_id="20250101-020000")
    containers = [c for m in manifests if m["kind"] == "Job"
                  for c in m["spec"]["template"]["spec"].get("initContainers", []) + m["spec"]["template"]["spec"]["containers"]]
    profile = next(c["args"] for c in containers if c["args"][0] == "profile")
    assert MODEL_ID in profile and profile[profile.index("--store") + 1] == profiled.root
    bench = next(c["args"] for c in containers if c["args"][0] == "bench")
    assert bench[1] == MODEL_ID and bench[bench.index("--store") + 1] == profiled.root
    code, output = invoke("fleet", "render", "--setup", "--store", profiled.root, "--model", MODEL_ID, "--output", "json")
    assert code == 0, output
    code, output = invoke("fleet", "render", "--setup", "--store", profiled.root, "--model", "no-such-model")
    assert code == 2
    line = one_error_line(output)
    assert "unknown model 'no-such-model'" in line and f"{profiled.root} keeps no config" in line, line
    assert store_files(profiled.root) == before
