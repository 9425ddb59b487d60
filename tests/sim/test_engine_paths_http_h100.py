"""reports/engine_paths_http_h100.py's cells against the committed lease: every HTTP cell it reads
is there and was timed at a client, and each finds its in-process reference: the same lease's pair
for the paired model (none where its pair was cut), the grid's rounds of another lease for the others."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "reports"))

import engine_paths_http_h100 as page  # noqa: E402


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def test_every_cell_is_a_committed_http_run() -> None:
    assert len(page.CELLS) == len(page.MODELS) * len(page.PATHS) * len(page.WORKLOADS)
    for cell in page.CELLS:
        bench = json.loads((cell.run() / "bench.json").read_text())
        assert bench["client"] == "http", cell.name
        assert bench["backend"] == f"paged|{cell.path.backend}", cell.name
        assert bench["model"].endswith(cell.model), cell.name


def test_the_paired_model_is_referenced_on_its_lease_the_others_on_the_grid() -> None:
    for cell in page.CELLS:
        where, runs = cell.inprocess()
        if cell.model == page.PAIRED_MODEL:
            # Its eager heavy pair was cut by the call's deadline, and the grid has no 8B: no reference.
            expected = (cell.run(page.PAIRS_DIR),) if cell.run(page.PAIRS_DIR).is_dir() else ()
            assert runs == expected, cell.name
            assert where == "same lease" or not runs
        else:
            assert runs, f"{cell.name}: no in-process reference"
            assert all(run.parent.parent == page.GRID and run.name == cell.dirname for run in runs)
            for run in runs:
                assert json.loads((run / "bench.json").read_text())["client"] != "http"
