"""Fixtures of the explore tests: the two-platform synthetic store (see explore_support)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from explore_support import CALIBRATED_HOST_S, FAST, FOLDS, REPEATS, SLOW, SLOWDOWN, TOY, TOY_BACKEND, rows_for

from dooly.cli import cli
from dooly.fit import synthetic as syn


def calibration(platform: str, constant_s: float = CALIBRATED_HOST_S) -> Any:
    """A host-overhead calibration for PLATFORM without CUDA graphs only: the toy store's
    candidates with graphs on have none (explore must list them as unpredictable)."""
    from dooly.sim.calibration import DEFAULT_KEY, Calibration, CalibrationKey, PathTerms

    key = CalibrationKey(platform=platform, engine="transformers", engine_version="test", backend=TOY_BACKEND,
                         cuda_graphs=False)
    return Calibration(key=key, terms={DEFAULT_KEY: PathTerms(constant_s=constant_s)})


@pytest.fixture(scope="session")
def two_platform_store(tmp_path_factory) -> str:
    import pyarrow as pa

    from dooly.sim.calibration import write_calibration
    from dooly.store.backends import open_store
    from dooly.store.documents import write_json
    from dooly.store.merge import merge_store
    from dooly.store.schema import SHARD_SCHEMA
    from dooly.store.shards import write_shard

    root = str(tmp_path_factory.mktemp("explore-db"))
    store = open_store(root)
    for index, (platform, factor) in enumerate(((FAST, 1.0), (SLOW, SLOWDOWN))):
        table = pa.Table.from_pylist(rows_for(platform, factor), schema=SHARD_SCHEMA)
        write_shard(store, table, run_id="synthetic", chunk_index=index)
    write_json(store, syn.inventory_store_key(TOY), syn.inventory(TOY))
    merge_store(store)
    for platform in (FAST, SLOW):
        write_calibration(store, calibration(platform))
    result = CliRunner().invoke(cli, ["fit", "--store", root, "--folds", str(FOLDS), "--repeats", str(REPEATS)])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def prices_file(tmp_path):
    def write(fast: float, slow: float) -> str:
        path = Path(tmp_path) / f"prices-{fast}-{slow}.yaml"
        path.write_text(json.dumps({"platforms": {FAST: {"usd_per_gpu_hour": fast, "memory_gib": 80},
                                                  SLOW: {"usd_per_gpu_hour": slow, "memory_gib": 80}}}))
        return str(path)

    return write


@pytest.fixture
def store_copy(two_platform_store, tmp_path):
    """A copy of the two-platform store to add server-cost records to (the session's stays as it is)."""
    import shutil

    root = tmp_path / "db"
    shutil.copytree(two_platform_store, root)
    return str(root)
