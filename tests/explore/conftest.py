"""Fixtures of the explore tests: the two-platform synthetic store (see explore_support)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from explore_support import FAST, FOLDS, REPEATS, SLOW, SLOWDOWN, TOY, rows_for

from dooly.cli import cli
from dooly.fit import synthetic as syn


@pytest.fixture(scope="session")
def two_platform_store(tmp_path_factory) -> str:
    import pyarrow as pa

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
