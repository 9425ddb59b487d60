"""Server costs: measured from paired HTTP/in-process runs, checked, and added by `dooly validate`."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.sim.server_costs import MS_PER_S, ServerCosts, measure_server_costs
from tests.sim.validate_support import MODEL, write_truth

# A server that adds 20 ms before the first token and 1.5 ms to every later one.
TTFT_COST_S = 0.020
TPOT_COST_S = 0.0015
SETTINGS = {"num_blocks": 64, "max_batch_tokens": 256}
STACK = {"platform": "TEST-GPU", "engine": "transformers", "engine_version": "5.17.0", "backend": "paged|sdpa"}
LIGHT = {"kind": "light"}
HEAVY = {"kind": "heavy"}
OTHER_MODEL = "meta-llama/Llama-3.2-1B"


def _bench(directory: Path, client: str, workload: dict[str, Any], settings: dict[str, Any] = SETTINGS,
           stack: dict[str, Any] = STACK, model: str = MODEL) -> None:
    (directory / "bench.json").write_text(json.dumps({
        "client": client, "model": model, "stack": stack, "requested_settings": settings, "workload": workload}))
    # The analytic engine's default settings: what write_truth simulated.
    (directory / "engine.json").write_text(json.dumps({}))


def _shift(directory: Path, ttft_s: float, tpot_s: float) -> None:
    """Every request's first token later by ttft_s, every later token by tpot_s more per token."""
    table = pq.read_table(directory / "requests.parquet").to_pylist()
    for row in table:
        row["token_times_s"] = [t + ttft_s + k * tpot_s for k, t in enumerate(row["token_times_s"])]
        row["first_token_s"] = row["token_times_s"][0]
        row["finished_s"] = row["token_times_s"][-1]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table), directory / "requests.parquet")


def _cell(root: Path, name: str, workload: dict[str, Any], ttft_s: float, tpot_s: float,
          model: str = MODEL) -> tuple[Path, Path]:
    """An in-process run and an HTTP run of it whose client saw the given extra costs."""
    inprocess = write_truth(root / f"{name}.inprocess")
    _bench(inprocess, "inprocess", workload, model=model)
    http = write_truth(root / f"{name}.http")
    _shift(http, ttft_s, tpot_s)
    _bench(http, "http", workload, model=model)
    return http, inprocess


def test_the_terms_are_what_the_server_added(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    costs = measure_server_costs([http], [inprocess])
    assert costs.ttft.median_s == pytest.approx(TTFT_COST_S, abs=1e-9)
    assert costs.tpot.median_s == pytest.approx(TPOT_COST_S, abs=1e-9)
    assert costs.ttft.sd_s == pytest.approx(0.0, abs=1e-9)
    assert costs.consistent
    assert costs.key == {**STACK, "cuda_graphs": False}


def test_cells_of_two_loads_with_one_cost_pass_and_pool(tmp_path):
    light = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    heavy = _cell(tmp_path, "heavy", HEAVY, TTFT_COST_S, TPOT_COST_S)
    costs = measure_server_costs([light[0], heavy[0]], [light[1], heavy[1]])
    assert len(costs.cells) == 2
    assert costs.ttft.n == 2 * costs.cells[0].ttft.n
    assert costs.consistent


def test_an_http_run_faster_than_the_engine_is_not_a_server_cost(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, -TTFT_COST_S, -TPOT_COST_S)
    costs = measure_server_costs([http], [inprocess])
    assert not costs.consistent
    assert any("negative" in p and "TTFT" in p for p in costs.problems)
    assert any("negative" in p and "TPOT" in p for p in costs.problems)


def test_validate_refuses_a_record_whose_offsets_are_negative(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, -TTFT_COST_S, TPOT_COST_S)
    record = tmp_path / "costs.json"
    measure_server_costs([http], [inprocess]).save(record)
    result = _validate(http, "--server-costs", str(record))
    assert result.exit_code == 2, result.output
    assert "median TTFT offset -20.00 ms below zero" in result.output
    assert "TPOT" not in result.output.split("below zero")[0]


def test_offsets_that_move_with_the_load_fail_the_check(tmp_path):
    light = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    heavy = _cell(tmp_path, "heavy", HEAVY, 50 * TTFT_COST_S, TPOT_COST_S)
    costs = measure_server_costs([light[0], heavy[0]], [light[1], heavy[1]])
    assert any("TTFT offset depends on the load" in p for p in costs.problems)
    assert not any("TPOT offset depends on the load" in p for p in costs.problems)


def test_an_offset_that_moves_with_the_load_is_withheld_the_other_applied(tmp_path):
    from tests.sim.validate_support import simulated_run

    light = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    heavy = _cell(tmp_path, "heavy", HEAVY, 50 * TTFT_COST_S, TPOT_COST_S)
    costs = measure_server_costs([light[0], heavy[0]], [light[1], heavy[1]])
    assert costs.withheld_offsets == {"TTFT": "it depends on the load or model: 2 failed check(s)"}
    assert costs.applied_offsets() == (0.0, pytest.approx(TPOT_COST_S))
    assert "not applied: the TTFT offset (it depends on the load or model: 2 failed check(s))" in costs.describe()
    # What a command says it added leads with what it applied: the withheld TTFT offset is not in it.
    added = costs.applied_line().split(" (measured: ")[0]
    assert added == f"added {TPOT_COST_S * MS_PER_S:+.2f} ms TPOT per request"
    assert costs.applied_line().endswith("not applied: the TTFT offset (it depends on the load or model: 2 failed check(s))")
    records = simulated_run().requests
    for before, after in zip(records, costs.apply(records)):
        assert after.ttft_s == pytest.approx(before.ttft_s)
        assert after.tpot_s == pytest.approx(before.tpot_s + TPOT_COST_S)
    costs.save(tmp_path / "costs.json")
    assert ServerCosts.load(tmp_path / "costs.json").withheld_offsets == costs.withheld_offsets


def test_a_residual_offset_below_zero_is_withheld(tmp_path):
    # A step term that over-explains the pair leaves a negative residual: no server cost.
    http, inprocess = _cell(tmp_path, "heavy", HEAVY, TTFT_COST_S, TPOT_COST_S)
    costs = measure_server_costs([http], [inprocess])
    assert costs.withheld_offsets == {}
    costs.ttft = replace(costs.ttft, median_s=-TTFT_COST_S)
    assert costs.withheld_offsets == {"TTFT": "it is below zero: -20.00 ms"}
    assert costs.applied_offsets() == (0.0, pytest.approx(TPOT_COST_S))
    assert "not applied: the TTFT offset (it is below zero: -20.00 ms)" in costs.describe()
    costs.tpot = replace(costs.tpot, median_s=-TPOT_COST_S)
    assert costs.applied_line().startswith("added no per-request offset (measured: -20.0 ms TTFT")


def test_each_http_run_pairs_with_its_own_models_runs(tmp_path):
    # Two models served the same workload; the second one's server added more. Each HTTP run is
    # compared with its own model's in-process run, never with the other model's.
    first = _cell(tmp_path, "first", LIGHT, TTFT_COST_S, TPOT_COST_S)
    second = _cell(tmp_path, "second", LIGHT, 50 * TTFT_COST_S, TPOT_COST_S, model=OTHER_MODEL)
    costs = measure_server_costs([first[0], second[0]], [first[1], second[1]])
    assert [cell.inprocess for cell in costs.cells] == [[str(first[1])], [str(second[1])]]
    assert [cell.model for cell in costs.cells] == [MODEL, OTHER_MODEL]
    assert costs.cells[0].ttft.median_s == pytest.approx(TTFT_COST_S, abs=1e-9)
    assert costs.cells[1].ttft.median_s == pytest.approx(50 * TTFT_COST_S, abs=1e-9)
    assert any("TTFT offset depends on the model:" in p for p in costs.problems)
    costs.save(tmp_path / "costs.json")
    assert ServerCosts.load(tmp_path / "costs.json").cells[1].model == OTHER_MODEL
    with pytest.raises(DoolyError, match=f"no in-process run of {OTHER_MODEL}"):
        measure_server_costs([second[0]], [first[1]])


def test_pairs_that_are_not_one_cell_are_refused(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    with pytest.raises(DoolyError, match="not timed at an HTTP client"):
        measure_server_costs([inprocess], [inprocess])
    with pytest.raises(DoolyError, match="not timed in-process"):
        measure_server_costs([http], [http])
    _bench(inprocess, "inprocess", LIGHT, settings={**SETTINGS, "num_blocks": 128})
    with pytest.raises(DoolyError, match="other engine settings"):
        measure_server_costs([http], [inprocess])
    _bench(inprocess, "inprocess", HEAVY)
    with pytest.raises(DoolyError, match="no in-process run of .* served the workload"):
        measure_server_costs([http], [inprocess])


def test_apply_moves_ttft_tpot_and_e2e(tmp_path):
    from tests.sim.validate_support import simulated_run

    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    costs = measure_server_costs([http], [inprocess])
    records = simulated_run().requests
    served = costs.apply(records)
    for before, after in zip(records, served):
        assert after.ttft_s == pytest.approx(before.ttft_s + TTFT_COST_S)
        assert after.tpot_s == pytest.approx(before.tpot_s + TPOT_COST_S)
        later = before.output_tokens - 1
        assert after.e2e_s == pytest.approx(before.e2e_s + TTFT_COST_S + TPOT_COST_S * later)
        assert after.arrival_s == before.arrival_s


def test_record_round_trips_and_refuses_another_schema(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    costs = measure_server_costs([http], [inprocess])
    path = tmp_path / "costs.json"
    costs.save(path)
    loaded = ServerCosts.load(path)
    assert loaded.ttft == costs.ttft and loaded.tpot == costs.tpot and loaded.key == costs.key
    assert loaded.cells[0].inprocess == [str(inprocess)]
    path.write_text(json.dumps({"schema": "dooly.cpu_overhead/1"}))
    with pytest.raises(DoolyError, match="not a dooly.server_costs/2"):
        ServerCosts.load(path)


def test_a_record_written_before_pairing_was_kept_loads(tmp_path):
    # Cells of such a record were paired step for step where they paired any step, else not at all.
    light = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    heavy = _cell(tmp_path, "heavy", HEAVY, TTFT_COST_S, TPOT_COST_S)
    document = measure_server_costs([light[0], heavy[0]], [light[1], heavy[1]]).as_dict()
    assert [cell["pairing"] for cell in document["cells"]] == ["", ""]
    for cell in document["cells"]:
        del cell["pairing"]
    document["cells"][1]["steps"] = 236
    path = tmp_path / "before.json"
    path.write_text(json.dumps(document))
    loaded = ServerCosts.load(path)
    assert [(cell.steps, cell.pairing) for cell in loaded.cells] == [(0, ""), (236, "step")]
    assert loaded.schema == document["schema"]


def _validate(truth: Path, *extra: str) -> Any:
    result = CliRunner().invoke(cli, ["validate", MODEL, "--ground-truth", str(truth), "--analytic",
                                      "--output", "json", *extra])
    return result


def _row(payload: dict[str, Any], statistic: str) -> dict[str, Any]:
    return next(r for r in payload["summary"]["rows"] if r["statistic"] == statistic)


def test_validate_adds_the_terms_to_an_http_ground_truth(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    record = tmp_path / "costs.json"
    measure_server_costs([http], [inprocess]).save(record)
    plain = _validate(http)
    added = _validate(http, "--server-costs", str(record))
    assert plain.exit_code == 0, plain.output
    assert added.exit_code == 0, added.output
    plain_json, added_json = json.loads(plain.stdout), json.loads(added.stdout)
    assert plain_json["server_costs"].startswith("none added")
    assert added_json["server_costs"].startswith("added +20.0 ms TTFT")
    for statistic, cost in (("ttft_mean", TTFT_COST_S), ("tpot_mean", TPOT_COST_S)):
        before, after = _row(plain_json, statistic)["predicted"], _row(added_json, statistic)["predicted"]
        assert after == pytest.approx(before + cost)
    # The synthetic HTTP run is the analytic engine plus exactly these costs: with them, exact.
    assert added_json["requests"]["ttft"]["mape"] == pytest.approx(0.0, abs=1e-6)
    assert not math.isclose(plain_json["requests"]["ttft"]["mape"], 0.0, abs_tol=1e-6)


def test_validate_refuses_server_costs_for_an_inprocess_truth_or_another_key(tmp_path):
    http, inprocess = _cell(tmp_path, "light", LIGHT, TTFT_COST_S, TPOT_COST_S)
    record = tmp_path / "costs.json"
    measure_server_costs([http], [inprocess]).save(record)
    result = _validate(inprocess, "--server-costs", str(record))
    assert result.exit_code == 2
    assert "timed in-process" in result.output
    _bench(http, "http", LIGHT, stack={**STACK, "backend": "paged|eager"})
    result = _validate(http, "--server-costs", str(record))
    assert result.exit_code == 2
    assert "backend='paged|sdpa'" in result.output
