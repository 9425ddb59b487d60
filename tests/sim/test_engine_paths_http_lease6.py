"""reports/engine_paths_http_h100_lease6.py's cells against the committed lease: every HTTP cell it
reads is there, timed at a client, with its settings (async batching and graphs as its path says);
the paired cells have both HTTP runs and an in-process pair served between them; and every
committed run is a cell's."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "reports"))

import engine_paths_http_h100_lease6 as page  # noqa: E402

PAIRED_CELLS = 6  # the 1B's three paths x light and heavy (data/.../lease6/README.md)
HTTP_RUNS_PER_PAIRED_CELL = 2


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_every_cell_is_a_committed_http_run_of_its_path() -> None:
    assert len(page.PAIRED) == PAIRED_CELLS and len(page.CELLS) == PAIRED_CELLS + len(page.UNPAIRED)
    for cell in page.CELLS:
        for run in cell.http_runs:
            bench, engine = _json(run / "bench.json"), _json(run / "engine.json")
            assert bench["client"] == "http", run
            assert bench["backend"] == f"paged|{cell.path.backend}", run
            assert str(bench["model"]).endswith(cell.model), run
            assert bool(engine.get("use_async_batching")) == cell.path.suffix.endswith("async"), run


def test_paired_cells_have_two_http_runs_with_their_pair_served_between() -> None:
    for cell in page.PAIRED:
        runs = cell.http_runs
        assert len(runs) == HTTP_RUNS_PER_PAIRED_CELL, cell.name
        pair = _json(cell.pair / "bench.json")
        assert pair["client"] == "inprocess" and pair["model"] == cell.hf_model, cell.name
        started = [float(_json(run / "bench.json")["started_at_unix"]) for run in (runs[0], cell.pair, runs[1])]
        assert started == sorted(started), cell.name


def test_every_committed_run_is_a_cells() -> None:
    committed = {p for d in (*page.lease5.HTTP_DIRS, page.lease5.PAIRS_DIR) if (page.DATA / d).is_dir()
                 for p in (page.DATA / d).iterdir() if p.is_dir()}
    assert committed == {run for cell in page.CELLS for run in (*cell.http_runs, cell.pair) if run.is_dir()}
