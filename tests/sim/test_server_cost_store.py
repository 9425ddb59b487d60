"""Server-cost records in the store: generations, `dooly server-costs --save`, `dooly simulate
--client http` and `dooly validate --server-costs store`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.fit import synthetic as syn
from dooly.sim.server_costs import (
    STORE_ROOT,
    ServerCosts,
    find_server_costs,
    list_server_costs,
    measure_server_costs,
    read_server_costs,
    store_key,
    write_server_costs,
)
from dooly.sim.server_step_term import CONSTANT, DEFAULT_KEY, KindTerm, StepTerm
from tests.sim.test_server_costs import LIGHT, STACK, TPOT_COST_S, TTFT_COST_S, _bench, _cell

TOY = syn.TOY_MODELS[0]
# The synthetic store's key (the fitted models' platform and backend).
TOY_STACK = {"platform": syn.PLATFORM, "engine": "transformers", "engine_version": "5.17.0", "backend": syn.BACKEND}
STEP_TERM_S = 0.004


def _store(root: Path) -> Any:
    from dooly.store.backends import open_store

    return open_store(str(root))


def _record(tmp_path: Path, ttft_s: float = TTFT_COST_S, tpot_s: float = TPOT_COST_S,
            stack: dict[str, Any] = STACK, name: str = "light") -> tuple[ServerCosts, Path]:
    http, inprocess = _cell(tmp_path, name, LIGHT, ttft_s, tpot_s)
    if stack is not STACK:
        _bench(http, "http", LIGHT, stack=stack)
        _bench(inprocess, "inprocess", LIGHT, stack=stack)
    return measure_server_costs([http], [inprocess]), http


def test_records_round_trip_as_generations_newest_wins(tmp_path):
    store = _store(tmp_path / "db")
    first, _ = _record(tmp_path)
    key = write_server_costs(store, first)
    assert key == (f"{STORE_ROOT}platform=TEST-GPU/engine=transformers/engine_version=5.17.0/backend=paged~7Csdpa/"
                   "graphs=off/gen-000001.json")
    second, _ = _record(tmp_path, ttft_s=2 * TTFT_COST_S, name="again")
    assert write_server_costs(store, second).endswith("gen-000002.json") and second.generation == 2
    found = find_server_costs(store, platform="TEST-GPU", engine="transformers", backend="paged|sdpa", cuda_graphs=False)
    assert found is not None and found.generation == 2
    assert found.ttft.median_s == pytest.approx(2 * TTFT_COST_S) and found.key == first.key
    assert read_server_costs(store, store_key(first.key)).generation == 2
    # Other graph mode, loop or engine version: none; the newest version wins where none is named.
    assert find_server_costs(store, platform="TEST-GPU", engine="transformers", backend="paged|sdpa",
                             cuda_graphs=True) is None
    assert find_server_costs(store, platform="TEST-GPU", engine="transformers", backend="paged|sdpa",
                             cuda_graphs=False, async_batching=True) is None
    newer, _ = _record(tmp_path, ttft_s=3 * TTFT_COST_S, stack={**STACK, "engine_version": "5.18.0"}, name="newer")
    write_server_costs(store, newer)
    assert len(list_server_costs(store)) == 2
    latest = find_server_costs(store, platform="TEST-GPU", engine="transformers", backend="paged|sdpa",
                               cuda_graphs=False)
    assert latest.key["engine_version"] == "5.18.0"
    pinned = find_server_costs(store, platform="TEST-GPU", engine="transformers", backend="paged|sdpa",
                               cuda_graphs=False, engine_version="5.17.0")
    assert pinned.generation == 2


def test_an_async_record_has_a_key_and_folder_of_its_own(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    for run in (http, inprocess):
        (run / "engine.json").write_text(json.dumps({"use_async_batching": True}))
    costs = measure_server_costs([http], [inprocess])
    assert costs.key["async_batching"] is True
    assert write_server_costs(_store(tmp_path / "db"), costs).endswith("graphs=off/async=on/gen-000001.json")


def test_a_negative_record_is_never_written(tmp_path):
    store = _store(tmp_path / "db")
    costs, _ = _record(tmp_path, ttft_s=-TTFT_COST_S)
    with pytest.raises(DoolyError, match="median TTFT offset -20.00 ms below zero"):
        write_server_costs(store, costs)
    assert not list(store.list_keys(STORE_ROOT))


def _server_costs_cli(http: Path, inprocess: Path, *extra: str) -> Any:
    return CliRunner().invoke(cli, ["server-costs", "--http", str(http), "--inprocess", str(inprocess), "--analytic",
                                    *extra])


def test_save_writes_the_next_generation_and_says_where(tmp_path):
    root = tmp_path / "db"
    _store(root)
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    text = _server_costs_cli(http, inprocess, "--save-store", str(root))
    assert text.exit_code == 0, text.output
    assert "saved: store" in text.output and "gen-000001.json (generation 1 of TEST-GPU / transformers 5.17.0" in text.output
    payload = _server_costs_cli(http, inprocess, "--save-store", str(root), "--output", "json")
    assert payload.exit_code == 0, payload.output
    saved = json.loads(payload.stdout)["saved"]
    assert saved["generation"] == 2 and saved["object"].endswith("graphs=off/gen-000002.json")
    assert _server_costs_cli(http, inprocess, "--save").exit_code == 2  # no store to save into


def test_save_refuses_a_negative_record_in_one_line(tmp_path):
    root = tmp_path / "db"
    _store(root)
    http, inprocess = _cell(tmp_path, "light", LIGHT, -TTFT_COST_S, TPOT_COST_S)
    out = tmp_path / "costs.json"
    result = _server_costs_cli(http, inprocess, "--save-store", str(root), "--out", str(out))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "median TTFT offset -20.00 ms below zero" in errors[0]
    assert not list(_store(root).list_keys(STORE_ROOT)) and not out.exists()


# ---------------------------------------------------------------------------------------------
# simulate --client http, validate --server-costs store (on a fitted synthetic store)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fitted_store(tmp_path_factory) -> Path:
    """A local store with one synthetic model's shards and inventory, merged and fitted (fresh per
    test: the tests write server-cost records into it)."""
    from dooly.store.documents import write_json
    from dooly.store.merge import merge_store
    from dooly.store.shards import write_shard

    root = tmp_path_factory.mktemp("db")
    store = _store(root)
    write_shard(store, syn.snapshot_table((TOY,)), run_id="synthetic", chunk_index=0)
    write_json(store, syn.inventory_store_key(TOY), syn.inventory(TOY))
    merge_store(store)
    result = CliRunner().invoke(cli, ["fit", "--store", str(root), "--folds", "2", "--output", "json"])
    assert result.exit_code == 0, result.output
    return root


def _simulate(store: Path, *extra: str) -> Any:
    return CliRunner().invoke(cli, ["simulate", TOY.model_id, "--store", str(store), "--platform", syn.PLATFORM,
                                    "--backend", syn.BACKEND, "--requests", "30", "--rate", "20", "--no-cpu-overhead",
                                    *extra])


def _toy_record(tmp_path: Path, step_term: StepTerm | None = None) -> tuple[ServerCosts, Path]:
    costs, http = _record(tmp_path, stack=TOY_STACK)
    costs.step_term = step_term
    return costs, http


def test_simulate_http_adds_the_stores_record(fitted_store, tmp_path):
    missing = _simulate(fitted_store, "--client", "http")
    assert missing.exit_code == 2
    errors = [line for line in missing.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no server-cost record" in errors[0] and "dooly server-costs" in errors[0]
    assert syn.PLATFORM in errors[0]

    store = _store(fitted_store)
    write_server_costs(store, _toy_record(tmp_path)[0])
    plain = _simulate(fitted_store, "--output", "json")
    http = _simulate(fitted_store, "--client", "http", "--output", "json")
    assert plain.exit_code == 0 and http.exit_code == 0, http.output
    plain_json, http_json = json.loads(plain.stdout), json.loads(http.stdout)
    assert plain_json["server_costs"] is None and plain_json["client"] == "inprocess"
    assert http_json["server_costs"]["generation"] == 1 and http_json["client"] == "http"
    # Offsets only: the engine's schedule is unchanged, every request moved by the record's terms.
    for name, cost in (("ttft_s", TTFT_COST_S), ("tpot_s", TPOT_COST_S)):
        for statistic in ("mean", "p50", "p90"):
            assert http_json[name][statistic] == pytest.approx(plain_json[name][statistic] + cost)
    assert http_json["steps"] == plain_json["steps"]

    # A newer generation with a step term: every step pays it, so the engine itself is slower.
    term = StepTerm(CONSTANT, {DEFAULT_KEY: KindTerm(STEP_TERM_S, 0.0)})
    write_server_costs(store, _toy_record(tmp_path / "gen2", term)[0])
    stepped = _simulate(fitted_store, "--client", "http")
    assert stepped.exit_code == 0, stepped.output
    line = next(line for line in stepped.output.splitlines() if line.startswith("server costs:"))
    assert line.startswith("server costs: added a host term per engine step (") and " and +20.0 ms TTFT" in line
    assert "generation 2" in line and f"{syn.PLATFORM} / transformers 5.17.0 / {syn.BACKEND} / graphs off" in line
    stepped_json = json.loads(_simulate(fitted_store, "--client", "http", "--output", "json").stdout)
    assert stepped_json["server_costs"]["step_term"]["form"] == CONSTANT
    assert "the server's step term" in stepped_json["cpu_overhead"]
    assert stepped_json["tpot_s"]["mean"] > http_json["tpot_s"]["mean"] + 0.5 * STEP_TERM_S


def test_validate_reads_the_stores_record(fitted_store, tmp_path):
    costs, http = _toy_record(tmp_path)

    def validate(*extra: str) -> Any:
        return CliRunner().invoke(cli, ["validate", TOY.model_id, "--ground-truth", str(http), "--store", str(fitted_store),
                                        "--platform", syn.PLATFORM, "--backend", syn.BACKEND, "--no-cpu-overhead",
                                        "--output", "json", *extra])

    missing = validate("--server-costs", "store")
    assert missing.exit_code == 2
    errors = [line for line in missing.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no server-cost record" in errors[0]
    record = tmp_path / "costs.json"
    costs.save(record)
    write_server_costs(_store(fitted_store), costs)
    from_store, from_file, plain = validate("--server-costs", "store"), validate("--server-costs", str(record)), validate()
    assert from_store.exit_code == 0 and from_file.exit_code == 0 and plain.exit_code == 0, from_store.output
    store_json, file_json = json.loads(from_store.stdout), json.loads(from_file.stdout)
    assert store_json["server_costs"].startswith("added +20.0 ms TTFT") and "gen-000001.json" in store_json["server_costs"]
    assert store_json["summary"]["rows"] == file_json["summary"]["rows"]
    assert json.loads(plain.stdout)["server_costs"].startswith("none added")
    assert validate("--server-costs", str(tmp_path / "absent.json")).exit_code == 2
