"""`dooly simulate --store`: the fitted models of `dooly fit` drive the simulation."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.fit import synthetic as syn

TOY = syn.TOY_MODELS[0]
FOLDS = 2


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


def test_simulate_on_fitted_models_matches_the_api(fitted_store):
    from dooly.fit.commands import find_inventory
    from dooly.fit.persist import load_predictor
    from dooly.sim.schedulers import TransformersCBScheduler
    from dooly.sim.simulator import simulate
    from dooly.store.backends import open_store
    from dooly.workload import WorkloadSpec, generate_requests

    args = ["simulate", TOY.model_id, "--store", fitted_store, "--platform", syn.PLATFORM, "--backend", syn.BACKEND,
            "--requests", "30", "--rate", "20", "--no-cpu-overhead", "--output", "json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_finished"] == 30

    store = open_store(fitted_store, create=False)
    predictor = load_predictor(store, platform=syn.PLATFORM, engine=syn.ENGINE, backend=syn.BACKEND, dtype=syn.DTYPE)
    step = predictor.step_predictor(find_inventory(store, TOY.model_id, syn.BACKEND))
    spec = WorkloadSpec.from_dict(summary["workload"])
    direct = simulate(generate_requests(spec), TransformersCBScheduler(), step).summary()
    assert summary["ttft_s"] == pytest.approx(direct["ttft_s"])
    assert summary["tpot_s"] == pytest.approx(direct["tpot_s"])
    # A decode step of this toy model is predicted, not a constant: longer contexts cost more.
    assert step.step_seconds([], [4000] * 16) > step.step_seconds([], [100] * 16) > 0


def test_unknown_platform_is_a_user_error(fitted_store):
    args = ["simulate", TOY.model_id, "--store", fitted_store, "--platform", "Nonexistent-GPU", "--backend", syn.BACKEND]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "Nonexistent-GPU" in result.stderr
