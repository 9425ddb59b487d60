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


# Runs `dooly simulate` with the heavy libraries made unimportable: a fitted simulation reads JSON
# parameters and evaluates them with numpy, and importing torch alone cost it ~1 s (issue #25).
SIMULATE_WITHOUT_HEAVY_IMPORTS = """
import sys
HEAVY = ("torch", "transformers", "sklearn", "pyarrow", "scipy", "polars")
for name in HEAVY:
    sys.modules[name] = None  # importing it (or any part of it) now fails
from click.testing import CliRunner
from dooly.cli import cli
result = CliRunner().invoke(cli, sys.argv[1:])
assert result.exit_code == 0, result.output
print(result.stdout)
"""


def test_simulate_imports_no_heavy_library(fitted_store, tmp_path):
    """A bundled model whose inventory the store holds is looked up by key without importing the
    profiler (torch) or the shard code (pyarrow), and simulated without scikit-learn."""
    import shutil
    import subprocess
    import sys

    from dooly.models.registry import model_key, resolve_model
    from dooly.store.backends import open_store
    from dooly.store.documents import write_json
    from dooly.store.keys import inventory_key

    bundled = "meta-llama/Llama-3.1-8B"
    root = tmp_path / "db"
    shutil.copytree(fitted_store, root)
    write_json(open_store(str(root), create=False), inventory_key(model_key(resolve_model(bundled)), syn.BACKEND),
               syn.inventory(TOY))
    args = ["simulate", bundled, "--store", str(root), "--platform", syn.PLATFORM, "--backend", syn.BACKEND,
            "--requests", "20", "--rate", "20", "--no-cpu-overhead", "--output", "json"]
    done = subprocess.run([sys.executable, "-c", SIMULATE_WITHOUT_HEAVY_IMPORTS, *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["num_finished"] == 20
