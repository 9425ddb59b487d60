"""`dooly plan` counts the points `dooly profile` then measures, and prices them from the store's
own measurements on the platform."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from profile_helpers import SMALL_GRID_ARGS

from dooly.cli import cli
from dooly.profile.plan import DEFAULT_REFINEMENT_RATE, PointCosts


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
    spent = _json("profile", model_b, "--store", store, *SMALL_GRID_ARGS)
    # Every point the plan listed is measured, and only refinements come on top.
    assert spent["planned_points"] == plan["missing_points"]
    assert spent["measured_points"] + spent["oom_points"] + spent["error_points"] == (
        spent["planned_points"] + spent["refinement_points"])
    again = _json("plan", model_b, "--store", store, *SMALL_GRID_ARGS)
    assert again["missing_points"] == 0 and again["estimated_device_seconds"] == 0


def _row(op_class: str, seconds: float, point: dict) -> dict:
    return {"op_class": op_class, "device_seconds": seconds, "point_key": json.dumps(point), "signature": op_class}


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
