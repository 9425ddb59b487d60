"""`dooly plan` counts the points `dooly profile` then measures, and prices them from the store's
own measurements on the platform."""

from __future__ import annotations

import json
import re

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from profile_helpers import MODEL_B, SMALL_GRID_ARGS, write_model

from dooly.cli import cli
from dooly.profile.costs import (
    CAUSE_CHARS,
    DEFAULT_REFINEMENT_RATE,
    FAILED_STATUS,
    MIN_CLASS_ROWS,
    PointCosts,
    failure_cause,
)
from dooly.profile.measure import STATUS_ERROR, Measurement
from dooly.trace.schema import KIND_ATTENTION

FLEX = "attention:paged|flex_attention"
# What a failed attempt costs in the failing-profile test (a measurement's device-seconds).
FAILED_ATTEMPT_SECONDS = 0.5


def _json(*args: str) -> dict:
    result = CliRunner().invoke(cli, [*args, "--output", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_plan_counts_the_points_profile_measures(tmp_path, models):
    model_a, model_b = models
    store = str(tmp_path / "db")
    _json("profile", model_a, "--store", store, *SMALL_GRID_ARGS)
    plan = _json("plan", model_b, "--store", store, *SMALL_GRID_ARGS)
    assert plan["missing_points"] > 0
    assert "samples" in plan["estimate"]["phases"] and "build" in plan["estimate"]["phases"]
    assert plan["estimate"]["source"].startswith("the mean cost per point")
    # A's run drew the weights of each of its signatures once: B's new ones are priced the same way.
    builds = plan["estimate"]["builds"]
    assert 0 < builds["signatures"] <= plan["missing_signatures"] and builds["device_seconds"] > 0
    spent = _json("profile", model_b, "--store", store, *SMALL_GRID_ARGS)
    # Every point the plan listed is measured, and only refinements come on top.
    assert spent["planned_points"] == plan["missing_points"]
    assert spent["measured_points"] + spent["oom_points"] + spent["error_points"] == (
        spent["planned_points"] + spent["refinement_points"])
    again = _json("plan", model_b, "--store", store, *SMALL_GRID_ARGS)
    assert again["missing_points"] == 0 and again["estimated_device_seconds"] == 0


def _row(op_class: str, seconds: float, point: dict, status: str = "ok", signature: str = "",
         scalars: dict | None = None) -> dict:
    return {"op_class": op_class, "device_seconds": seconds, "point_key": json.dumps(point),
            "signature": signature or op_class, "status": status,
            "signature_json": json.dumps({"scalars": scalars or {}})}


def test_point_costs_are_class_means_with_kind_and_default_fallbacks():
    # A skewed class: the median point (0.01 s) is a tenth of the mean, which is what a plan sums.
    rows = [_row("aten.mm.default", 0.01, {"T": 2**i}) for i in range(8)] + [_row("aten.mm.default", 0.73, {"T": 256})]
    rows += [_row("attention:paged|sdpa", 0.3, {"seqs": [[8, 0]]}) for _ in range(10)]
    rows += [_row("aten.mm.default", 0.01, {"T": t}) for t in (5, 7)]  # off the ladder: refinements
    costs = PointCosts.fit(rows, 0.05, "GPU-X")
    assert costs.seconds("aten.mm.default") == pytest.approx((0.08 + 0.73 + 0.02) / 11)
    assert costs.seconds("attention:paged|eager") == pytest.approx(0.3)  # an unseen backend: attention's mean
    assert costs.seconds("aten.bmm.default") == pytest.approx(costs.means["kind:other"])  # too few rows of its own
    assert costs.refinement_rates["aten.mm.default"] == pytest.approx(2 / 9)
    fresh = PointCosts.fit([], 0.05, "GPU-X")
    assert fresh.seconds("aten.mm.default") == 0.05 and fresh.default_refinement_rate == DEFAULT_REFINEMENT_RATE
    assert "no points measured on GPU-X" in fresh.source


def test_a_thin_attention_grid_is_a_subset_of_the_full_one_and_a_full_plan_measures_only_the_rest():
    from dooly.profile.grid import ATTENTION_DESIGNS, GridSpec, attention_points

    full = {point.key for point in attention_points(GridSpec())}
    for name, design in ATTENTION_DESIGNS.items():
        keys = {point.key for point in attention_points(GridSpec(attention=design))}
        assert keys <= full, name
        assert len(keys) < len(full) or name == "full"


def test_plan_and_profile_take_a_thin_attention_grid(tmp_path, models):
    from dooly.store.backends import open_store

    model, _ = models
    store = str(tmp_path / "db")
    open_store(store, create=True)
    thin = _json("plan", model, "--store", store, "--attention-grid", "thin-all", *SMALL_GRID_ARGS)
    full = _json("plan", model, "--store", store, *SMALL_GRID_ARGS)
    assert thin["attention_grid"] == "thin-all" and full["attention_grid"] == "full"
    assert 0 < thin["missing_points"] < full["missing_points"]
    spent = _json("profile", model, "--store", store, "--attention-grid", "thin-all", *SMALL_GRID_ARGS)
    assert spent["planned_points"] == thin["missing_points"]
    rest = _json("plan", model, "--store", store, *SMALL_GRID_ARGS)
    assert rest["missing_points"] == full["missing_points"] - thin["missing_points"]


def test_failures_are_priced_from_the_stores_failed_attempts():
    # One flex signature held everywhere, a third of its points after one failed attempt each; a
    # soft-capped one whose every attempt failed (gemma-2's flex on the H100: 1,196 of 1,196).
    plain = {"scaling": 0.1, "is_causal": True, "dropout": 0.0}
    held = [_row(FLEX, 0.4, {"seqs": [[t, 0]]}, signature="plain", scalars=plain) for t in range(16)]
    retried = [_row(FLEX, seconds, {"seqs": [[1, 100 + c]]}, status, "plain", plain)
               for c in range(8) for seconds, status in ((0.2, FAILED_STATUS), (0.4, "ok"))]
    softcap = {**plain, "softcap": 50.0}
    doomed = [_row(FLEX, 0.5, {"seqs": [[1, c]]}, FAILED_STATUS, "capped", softcap) for c in range(4) for _ in range(2)]
    costs = PointCosts.fit(held + retried + doomed, 0.05, "GPU-X")
    failures = costs.failures
    assert failures.never_held == {f"{FLEX}[softcap]": 8}  # scaling and is_causal were held: no rule
    assert failures.first_rates[FLEX] == pytest.approx(8 / 24)  # the doomed points left out
    assert failures.retry_rates[FLEX] == 0.0
    failed = (8 * 0.2 + 8 * 0.5) / 16
    assert costs.seconds(FLEX) == pytest.approx(0.4)  # held rows only
    assert costs.failed_seconds(FLEX) == pytest.approx(failed)
    assert costs.attempt(FLEX, failures.dooms(FLEX, {**softcap, "sliding_window": 4096}), False) == (
        1.0, pytest.approx(failed))
    assert costs.attempt(FLEX, failures.dooms(FLEX, plain), False) == (
        pytest.approx(1 / 3), pytest.approx(failed / 3 + 0.4 * 2 / 3))
    assert costs.attempt(FLEX, False, True) == (0.0, pytest.approx(0.4))
    # A class with no failures of its own: a failed attempt costs what a held point does.
    assert costs.failed_seconds("attention:paged|sdpa") == costs.seconds("attention:paged|sdpa")
    assert "8 failed attempts" not in failures.source and "16 failed attempts among" in failures.source
    assert MIN_CLASS_ROWS <= 8  # the soft-capped feature's 8 attempts are enough to condemn it


def test_a_failed_point_is_planned_again_and_priced_as_a_failure(tmp_path, models, monkeypatch):
    """Failed points are not held: the next plan lists them, prices them at what a failed attempt
    cost, and the next profile attempts every one of them (point counts stay equal)."""
    import dooly.profile.run as run

    measure = run._measure

    def attention_fails(item, point, *args, **kwargs):
        if item.op.kind == KIND_ATTENTION:
            return Measurement(None, None, None, None, 0, STATUS_ERROR, FAILED_ATTEMPT_SECONDS, error="RuntimeError")
        return measure(item, point, *args, **kwargs)

    monkeypatch.setattr(run, "_measure", attention_fails)
    model, _ = models
    store = str(tmp_path / "db")
    first = _json("profile", model, "--store", store, *SMALL_GRID_ARGS)
    assert first["error_points"] >= MIN_CLASS_ROWS
    plan = _json("plan", model, "--store", store, *SMALL_GRID_ARGS)
    failures = plan["expected_failures"]
    assert plan["missing_points"] == first["error_points"]
    assert failures["points"] == failures["never_held_points"] == plan["missing_points"]
    assert plan["estimated_device_seconds"] == pytest.approx(plan["missing_points"] * FAILED_ATTEMPT_SECONDS)
    assert failures["device_seconds"] == pytest.approx(plan["estimated_device_seconds"])
    assert "failed" in plan["estimate"]["phases"] and "never held" in plan["estimate"]["failures"]
    text = CliRunner().invoke(cli, ["plan", model, "--store", store, *SMALL_GRID_ARGS], catch_exceptions=False)
    assert f"expected failures: {plan['missing_points']} points" in text.output
    again = _json("profile", model, "--store", store, *SMALL_GRID_ARGS)
    assert again["planned_points"] == plan["missing_points"] == again["error_points"]


def test_a_failure_cause_is_the_first_line_without_its_numbers_and_addresses():
    assert failure_cause("RuntimeError: size 128 != 64 at 0x7f3a2c00b0\n  File ...") == (
        "RuntimeError: size <n> != <n> at <addr>")
    assert failure_cause("\n  ValueError: bf16 tile of 16x16 unsupported") == "ValueError: bf16 tile of 16x16 unsupported"
    assert failure_cause("RuntimeError: " + "x" * 1000) == ("RuntimeError: " + "x" * 1000)[:CAUSE_CHARS]
    assert failure_cause("") == failure_cause(None) == ""


def test_failure_causes_are_counted_per_class_most_common_first():
    rows = [{**_row(FLEX, 0.5, {"seqs": [[1, c]]}, FAILED_STATUS, "capped"), "error": f"RuntimeError: bad shape {c}"}
            for c in range(6)]
    rows += [{**_row(FLEX, 0.5, {"seqs": [[2, c]]}, FAILED_STATUS, "capped"), "error": "TypeError: no kernel"}
             for c in range(2)]
    rows += [_row(FLEX, 0.5, {"seqs": [[3, c]]}, FAILED_STATUS, "capped") for c in range(3)]  # no text: older shards
    rows += [_row(FLEX, 0.4, {"seqs": [[4, c]]}) for c in range(8)]
    failures = PointCosts.fit(rows, 0.05, "GPU-X").failures
    assert failures.causes == {FLEX: [("RuntimeError: bad shape <n>", 6), ("TypeError: no kernel", 2)]}
    assert failures.failed_attempts == {FLEX: 11}
    untold = PointCosts.fit([r for r in rows if "error" not in r], 0.05, "GPU-X").failures
    assert untold.causes == {} and untold.failed_attempts == {FLEX: 3}


# The op whose every measurement raises in the error-text test, and what it raises (the values and
# an address vary by point; the cause does not).
FAILING_OP = "aten.silu.default"


def test_a_failed_measurements_text_reaches_the_shards_the_merged_store_and_the_plan(tmp_path, models, monkeypatch):
    """The Timer's "Type: message" of a point that raised is the row's `error` in its shard and in
    the merged snapshot (null on every other row); the next plan names it, grouped, as the cause of
    the class it expects to fail. Shards rewritten without the column (how the committed stores
    are) still plan the same failures, and the plan then names no cause."""
    import dooly.profile.run as run
    from dooly.store.backends import LocalStore
    from dooly.store.merge import merge_store, read_snapshot

    build = run.build_aten_call

    def silu_raises(op, values, *args, **kwargs):
        if op.op == FAILING_OP:
            raise RuntimeError(f"silu rejected {sorted(values.items())} at 0x{id(values):x}\nsecond line")
        return build(op, values, *args, **kwargs)

    monkeypatch.setattr(run, "build_aten_call", silu_raises)
    model, _ = models
    store = tmp_path / "db"
    first = _json("profile", model, "--store", str(store), *SMALL_GRID_ARGS)
    assert first["error_points"] > 0
    shards = sorted(store.rglob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(path) for path in shards]).to_pylist()
    failed = [row for row in rows if row["status"] == STATUS_ERROR]
    assert len(failed) == first["error_points"] and {row["op"] for row in failed} == {FAILING_OP}
    assert all(re.fullmatch(r"RuntimeError: silu rejected \[.*\] at 0x[0-9a-f]+\nsecond line", row["error"])
               for row in failed)
    assert all(row["error"] is None for row in rows if row["status"] != STATUS_ERROR)

    merge_store(LocalStore(store))
    snapshot, _ = read_snapshot(LocalStore(store))
    assert sorted(snapshot.filter(pl.col("error").is_not_null())["error"].to_list()) == sorted(r["error"] for r in failed)
    assert snapshot.filter(pl.col("status") != STATUS_ERROR)["error"].null_count() == len(rows) - len(failed)

    plan = _json("plan", model, "--store", str(store), *SMALL_GRID_ARGS)
    cause = "RuntimeError: silu rejected [('T', <n>)] at <addr>"
    assert plan["expected_failures"]["causes"] == [
        {"op_class": FAILING_OP, "cause": cause, "attempts": len(failed), "failed_attempts": len(failed)}]
    text = CliRunner().invoke(cli, ["plan", model, "--store", str(store), *SMALL_GRID_ARGS], catch_exceptions=False)
    assert (f'failure causes in the store: {FAILING_OP}: "{cause}" ({len(failed)} of {len(failed)} failed attempts)'
            in text.output)

    for path in shards:
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["error"]).replace_schema_metadata(table.schema.metadata), path)
    untold = _json("plan", model, "--store", str(store), *SMALL_GRID_ARGS)
    assert untold["expected_failures"]["causes"] == []
    assert {k: v for k, v in untold["expected_failures"].items() if k != "causes"} == {
        k: v for k, v in plan["expected_failures"].items() if k != "causes"}
    text = CliRunner().invoke(cli, ["plan", model, "--store", str(store), *SMALL_GRID_ARGS], catch_exceptions=False)
    assert "expected failures:" in text.output and "failure causes" not in text.output


def _run_rows(run: str, first_seconds: float, seconds: float, points: int) -> list[dict]:
    """One profile run's attention rows: its first measurement carries the backend's start-up."""
    rows = [_row("attention:paged|sdpa", first_seconds, {"seqs": [[8, 0]]})]
    rows += [_row("attention:paged|sdpa", seconds, {"seqs": [[16 * (i + 1), 0]]}) for i in range(points - 1)]
    for row in rows:
        row["run_id"] = run
    return rows


def test_a_runs_attention_start_up_is_priced_once_per_run_and_left_out_of_the_point_mean():
    rows = _run_rows("r1", 5.2, 0.2, 10) + _run_rows("r2", 4.2, 0.2, 10) + _run_rows("r3", 6.2, 0.2, 10)
    rows += [_row("aten.mm.default", 0.05, {"T": 2**i}) for i in range(MIN_CLASS_ROWS)]
    costs = PointCosts.fit(rows, 0.05, "GPU-X")
    # The start-up is the median run's costliest row over its median row; points cost what the rest do.
    assert costs.startup_seconds("attention:paged|sdpa") == pytest.approx(5.0)
    assert costs.seconds("attention:paged|sdpa") == pytest.approx(0.2)
    assert costs.startup_seconds("attention:paged|eager") == pytest.approx(5.0)  # another backend: the kind's
    assert costs.startup_seconds("aten.mm.default") == 0.0
    # Too few runs to tell a start-up from a costly point: none, and every row stays in the mean.
    few = PointCosts.fit(_run_rows("r1", 5.2, 0.2, 10) + _run_rows("r2", 4.2, 0.2, 10), 0.05, "GPU-X")
    assert few.startup_seconds("attention:paged|sdpa") == 0.0
    assert few.seconds("attention:paged|sdpa") == pytest.approx((5.2 + 4.2 + 18 * 0.2) / 20)


def test_a_plan_adds_one_start_up_per_attention_class_it_measures(tmp_path, models):
    model_a, model_b = models
    store = str(tmp_path / "db")
    _json("profile", model_a, "--store", store, *SMALL_GRID_ARGS)
    plan = _json("plan", model_b, "--store", store, *SMALL_GRID_ARGS)
    # One run profiled the store: too few to learn a start-up from, so the plan prices none.
    assert plan["estimate"]["startups"] == {}


def _timed_row(op_class: str, latency: float, seconds: float, tokens: int) -> dict:
    return {**_row(op_class, seconds, {"T": tokens}), "latency_median_s": latency}


def test_a_point_with_a_known_latency_costs_a_fixed_part_plus_a_multiple_of_it():
    # Measuring runs the kernel again and again: 0.05 s fixed plus 20 times its latency.
    rows = [_timed_row("aten.mm.default", latency, 0.05 + 20 * latency, t)
            for t, latency in enumerate((1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2))]
    costs = PointCosts.fit(rows, 0.05, "GPU-X")
    assert costs.latency_terms["aten.mm.default"] == (pytest.approx(0.05), pytest.approx(20.0))
    # A model whose kernels run longer than those measured costs more than the class's mean says.
    assert costs.seconds("aten.mm.default", 0.2) == pytest.approx(4.05)
    assert costs.seconds("aten.mm.default", 0.2) > 2 * costs.seconds("aten.mm.default")
    # Without a latency, the mean; a class with too few rows of its own takes its kind's line.
    assert costs.seconds("aten.mm.default") == pytest.approx(costs.means["aten.mm.default"])
    assert costs.seconds("aten.bmm.default", 0.2) == pytest.approx(4.05)
    assert costs.seconds("attention:paged|sdpa", 0.2) == costs.seconds("attention:paged|sdpa")  # no attention rows


def test_latency_terms_stay_non_negative():
    from dooly.profile.costs import fit_latency_terms

    latencies = [1e-3 * 2**i for i in range(MIN_CLASS_ROWS)]
    # A steep line whose free fit crosses zero above the origin: through the origin instead.
    steep = [_timed_row("aten.mm.default", x, max(30 * x - 0.01, 0.001), i) for i, x in enumerate(latencies)]
    fixed, slope = fit_latency_terms(steep)["aten.mm.default"]
    assert fixed == 0.0 and slope > 0
    # Costs that fall as the kernel grows (noise): every point at the mean, whatever its latency.
    falling = [_timed_row("aten.mm.default", x, 0.5 - x, i) for i, x in enumerate(latencies)]
    assert fit_latency_terms(falling)["aten.mm.default"] == (pytest.approx(sum(0.5 - x for x in latencies) / len(
        latencies)), 0.0)
    # Too few rows with a latency (failed rows have none): no line.
    assert "aten.mm.default" not in fit_latency_terms(steep[: MIN_CLASS_ROWS - 1])


class _MatmulOp:
    """What pricing reads of a work item's operation: a matmul over T with a [rows, 64] weight."""

    kind = "kernel"

    def __init__(self, rows: int = 64) -> None:
        self.rows = rows
        self.scalars: dict[str, object] = {}

    def op_class(self) -> str:
        return "aten.mm.default"

    def request_vars(self) -> list[str]:
        return ["T"]

    def signature_payload(self) -> dict:
        return _signature(self.rows)


def test_a_work_items_points_and_refinements_are_priced_by_their_predicted_latencies():
    from dooly.profile.grid import Point
    from dooly.profile.plan import WorkItem

    rows = [_timed_row("aten.mm.default", latency, 0.05 + 20 * latency, t)
            for t, latency in enumerate((1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2))]
    costs = PointCosts.fit(rows, 0.05, "GPU-X")

    missing = [Point(values=(("T", t),)) for t in (8, 16)]
    item = WorkItem("sig", _MatmulOp(), "m", None, missing, missing, latencies=[0.1, None])  # type: ignore[arg-type]
    refinements = costs.refinements(item)
    assert refinements > 0
    expected = (0.05 + 2.0) + costs.seconds("aten.mm.default") + refinements * (0.05 + 2.0)
    assert costs.item_seconds(item) == pytest.approx(expected)


def test_a_plan_on_a_fitted_store_prices_its_points_by_the_latencies_the_store_predicts(tmp_path, models):
    model_a, _ = models
    # A wider MLP and another head layout than A: new GEMMs and a new attention signature.
    model_b = write_model(tmp_path, "model-c", {**MODEL_B, "num_attention_heads": 8, "num_key_value_heads": 4})
    store = str(tmp_path / "db")
    _json("profile", model_a, "--store", store, *SMALL_GRID_ARGS)
    unfitted = _json("plan", model_b, "--store", store, *SMALL_GRID_ARGS)
    assert unfitted["estimate"]["latencies"].startswith("no fitted models for")
    CliRunner().invoke(cli, ["merge", "--store", store], catch_exceptions=False)
    result = CliRunner().invoke(cli, ["fit", "--store", store, "--repeats", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fitted = _json("plan", model_b, "--store", store, *SMALL_GRID_ARGS)
    missing = fitted["missing_points"]
    assert missing == unfitted["missing_points"] > 0
    assert fitted["estimate"]["latencies"].startswith(f"kernel latencies of {missing} of {missing} missing points")
    # Its attention is among them (B, with A's head layout, misses fewer points), and every point is
    # priced by what its kernel is predicted to take, not at its class's mean cost.
    assert _json("plan", models[1], "--store", store, *SMALL_GRID_ARGS)["missing_points"] < missing
    assert fitted["estimated_device_seconds"] != unfitted["estimated_device_seconds"]


def test_a_point_predicted_past_its_classs_memory_wall_is_priced_as_out_of_memory():
    eager = "attention:paged|eager"
    held = [{**_row(eager, 0.05 + 20 * x, {"seqs": [[i + 1, 0]]}), "latency_median_s": x}
            for i, x in enumerate([0.001 * 2**k for k in range(7)] * 2)]  # 1-64 ms, all held
    ooms = [_row(eager, 0.3, {"seqs": [[1, 1000 + i]]}, status="oom") for i in range(MIN_CLASS_ROWS)]
    seen: list[list[dict]] = []

    def predict(rows: list[dict]) -> list[float | None]:
        seen.append(rows)
        return [0.08 + 0.01 * i for i in range(len(rows))]  # the fitted models' latencies for them

    costs = PointCosts.fit(held + ooms, 0.05, "GPU-X", predict=predict)
    assert seen == [ooms]  # only the out-of-memory rows are predicted
    assert costs.memory_walls[eager] == pytest.approx(0.08)
    assert costs.expects_oom(eager, 0.1) and not costs.expects_oom(eager, 0.064)
    assert costs.seconds(eager, 0.1) == pytest.approx(0.3)  # what an out-of-memory point costs
    assert costs.seconds(eager, 0.064) == pytest.approx(0.05 + 20 * 0.064)
    # Without predictions (no fitted models), or too few out-of-memory rows: no wall.
    assert PointCosts.fit(held + ooms, 0.05, "GPU-X").memory_walls == {}
    assert PointCosts.fit(held + ooms[:-1], 0.05, "GPU-X", predict=predict).memory_walls == {}


# A signature's first point in a run draws its weights: this much, and this much per element, more.
BUILD_SECONDS, BUILD_PER_ELEMENT = 1e-3, 1e-8


def _signature(rows: int) -> dict:
    """A matmul's readable signature: a [rows, 64] weight (config dims) and a [T, 64] input."""
    return {"op": "aten.mm.default", "inputs": [["float32", [rows, 64]], ["float32", ["T", 64]]], "scalars": {}}


def _built_rows(run: str, rows: int, points: int = 5) -> list[dict]:
    """One run's points of one signature, 0.001 s plus 5 times their latency, the first also
    drawing the weights."""
    signature = _signature(rows)
    found = []
    for index in range(points):
        latency = 1e-3 * (index + 1)
        seconds = 1e-3 + 5 * latency + (BUILD_SECONDS + BUILD_PER_ELEMENT * rows * 64 if index == 0 else 0.0)
        found.append({**_timed_row("aten.mm.default", latency, seconds, index + 1), "run_id": run,
                      "signature": f"mm-{rows}", "signature_json": json.dumps(signature)})
    return found


def test_a_signatures_first_point_in_a_run_pays_for_its_weights_once():
    from dooly.profile.costs import fixed_elements

    assert fixed_elements(_signature(1000)) == 64_000  # the [T, 64] input is drawn at every point
    sizes = (1_000, 10_000, 100_000, 1_000_000)
    rows = [row for run in ("r1", "r2", "r3") for size in sizes for row in _built_rows(run, size)]
    costs = PointCosts.fit(rows, 0.05, "CPU-X")
    fixed, per_element = costs.build_terms
    assert fixed == pytest.approx(BUILD_SECONDS, rel=0.2) and per_element == pytest.approx(BUILD_PER_ELEMENT, rel=0.05)
    # The build rows are out of the point line: points cost what the others do.
    assert costs.latency_terms["aten.mm.default"] == (pytest.approx(1e-3), pytest.approx(5.0))
    assert costs.build_seconds("attention:paged|sdpa", _signature(10**6)) == 0.0  # attention builds per run
    # A model with larger weights pays for them, once per signature it measures.
    from dooly.profile.grid import Point
    from dooly.profile.plan import WorkItem

    missing = [Point(values=(("T", t),)) for t in (8, 16)]
    item = WorkItem("sig", _MatmulOp(4_000_000), "m", None, missing, missing,  # type: ignore[arg-type]
                    latencies=[1e-3, 2e-3])
    build = costs.build_seconds("aten.mm.default", _signature(4_000_000))
    assert build == pytest.approx(fixed + per_element * 256_000_000)
    assert costs.item_build_seconds(item) == build
    points = costs.seconds("aten.mm.default", 1e-3) + costs.seconds("aten.mm.default", 2e-3)
    refinements = costs.refinements(item) * points / 2
    assert costs.item_seconds(item) == pytest.approx(points + refinements + build)
    # Too few (run, signature) groups to learn from: no build term, every row stays in the line.
    few = PointCosts.fit(_built_rows("r1", 1000) + _built_rows("r1", 10**6), 0.05, "CPU-X")
    assert few.build_terms is None and few.item_build_seconds(item) == 0.0
