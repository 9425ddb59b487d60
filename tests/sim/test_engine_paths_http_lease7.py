"""reports/engine_paths_http_h100_lease7.py's cells against the committed lease: every HTTP cell it
reads is there, timed at a client, with its path's settings (async batching, CUDA graphs); every
cell has an in-process pair served after its first HTTP run, and the `paged|sdpa` cells a second
HTTP run after the pair; every committed run is a cell's; and the committed store holds the
server-cost record that `--server-costs store` applies to each path."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "reports"))

import engine_paths_http_h100_lease5 as lease5  # noqa: E402
import engine_paths_http_h100_lease7 as page  # noqa: E402

CELLS = 8  # four paths x light and heavy (data/.../lease7/README.md)
SDPA_HTTP_RUNS = 2  # the `paged|sdpa` cells were served over HTTP twice, the eager ones once
EAGER_HTTP_RUNS = 1
COMMITTED_STORE = "data/h100/db"


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_every_cell_is_a_committed_http_run_of_its_path() -> None:
    assert len(page.CELLS) == CELLS
    for cell in page.CELLS:
        assert cell.http_runs, cell.name
        for run in cell.http_runs:
            bench, engine = _json(run / "bench.json"), _json(run / "engine.json")
            assert bench["client"] == "http", run
            assert bench["backend"] == f"paged|{cell.path.backend}", run
            assert str(bench["model"]).endswith(page.MODEL), run
            assert bool(engine.get("use_async_batching")) == cell.path.suffix.endswith("async"), run
            assert any(engine["use_cuda_graph"]) == (not cell.path.suffix.endswith("default")), run


def test_every_cell_has_its_pair_served_after_its_first_http_run() -> None:
    for cell in page.CELLS:
        runs = cell.http_runs
        assert len(runs) == (SDPA_HTTP_RUNS if cell.path.backend == "sdpa" else EAGER_HTTP_RUNS), cell.name
        pair = _json(cell.pair / "bench.json")
        assert pair["client"] == "inprocess" and pair["model"] == cell.hf_model, cell.name
        started = [float(_json(run / "bench.json")["started_at_unix"]) for run in (runs[0], cell.pair, *runs[1:])]
        assert started == sorted(started), cell.name


def test_every_committed_run_is_a_cells() -> None:
    committed = {p for d in (*lease5.HTTP_DIRS, lease5.PAIRS_DIR) if (page.DATA / d).is_dir()
                 for p in (page.DATA / d).iterdir() if p.is_dir()}
    assert committed == {run for cell in page.CELLS for run in (*cell.http_runs, cell.pair)}


def test_the_committed_store_holds_a_record_for_every_path() -> None:
    records = page.store_records(COMMITTED_STORE)
    assert set(records) == {f"{path.label}: the store's" for path in page.LEASE_PATHS}
    for path in page.LEASE_PATHS:
        key = records[f"{path.label}: the store's"]["key"]
        assert key["backend"] == f"paged|{path.backend}", path.label
        assert bool(key["cuda_graphs"]) == (not path.suffix.endswith("default")), path.label
        assert bool(key.get("async_batching")) == path.suffix.endswith("async"), path.label
