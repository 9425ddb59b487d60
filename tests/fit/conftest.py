"""Fixtures for the fit tests: a synthetic snapshot from known laws, fitted once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.fit import synthetic as syn
from dooly.fit.predictor import Predictor
from dooly.fit.selection import fit_frame

# Fewer folds and repeats than the default keep the session fast on a 2-core machine; the checks
# still hold.
TEST_FOLDS = 3
TEST_REPEATS = 1


@pytest.fixture(scope="session")
def inventories() -> dict[str, dict]:
    return {syn.inventory_store_key(m): syn.inventory(m) for m in (*syn.TOY_MODELS, syn.UNSEEN_MODEL)}


@pytest.fixture(scope="session")
def fitted(inventories):
    """(models by group key, FitReport) from fitting the synthetic frame in memory."""
    return fit_frame(
        syn.snapshot_frame(), generation=1, inventories=inventories, folds=TEST_FOLDS, repeats=TEST_REPEATS
    )


@pytest.fixture(scope="session")
def predictor(fitted) -> Predictor:
    models, _ = fitted
    return Predictor(models[(syn.PLATFORM, syn.ENGINE, syn.BACKEND, syn.DTYPE)])


def make_store(root: Path, inventories: dict[str, dict], models=syn.TOY_MODELS) -> str:
    """A local store holding one synthetic shard, merged into a snapshot, plus inventories."""
    from dooly.store.backends import open_store
    from dooly.store.documents import write_json
    from dooly.store.merge import merge_store
    from dooly.store.shards import write_shard

    store = open_store(str(root))
    write_shard(store, syn.snapshot_table(models), run_id="synthetic", chunk_index=0)
    for key, payload in inventories.items():
        write_json(store, key, payload)
    merge_store(store)
    return str(root)


@pytest.fixture
def store_factory():
    """make_store, for tests that need a store of their own."""
    return make_store


@pytest.fixture(scope="session")
def fitted_store(tmp_path_factory, inventories) -> tuple[str, dict]:
    """A store fitted through the CLI (`dooly fit --output json`): (uri, the JSON report)."""
    uri = make_store(tmp_path_factory.mktemp("db"), inventories)
    args = ["fit", "--store", uri, "--folds", str(TEST_FOLDS), "--repeats", str(TEST_REPEATS)]
    result = CliRunner().invoke(cli, [*args, "--output", "json"])
    assert result.exit_code == 0, result.output
    return uri, json.loads(result.stdout)
