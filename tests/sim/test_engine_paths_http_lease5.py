"""reports/engine_paths_http_h100_lease5.py's cells against the committed lease: every HTTP cell it
reads is there and was timed at a client, each has its in-process pair of the same lease, and the
repeated cells find all their HTTP runs (the floor `dooly validate` takes from them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "reports"))

import engine_paths_http_h100_lease5 as page  # noqa: E402

# The lease's cells served more than once, and how many HTTP runs each has (data/.../lease5/README.md).
REPEATED = {
    "Llama-3.2-1B graphs + async light": 2,
    "Llama-3.2-1B no graphs light": 2,
    "Llama-3.2-1B eager graphs light": 2,
    "Llama-3.2-3B graphs + async light": 3,
    "Llama-3.2-3B no graphs light": 2,
}


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _bench(run: Path) -> dict[str, object]:
    return dict(json.loads((run / "bench.json").read_text()))


def test_every_cell_is_a_committed_http_run_with_its_pair() -> None:
    assert len(page.CELLS) == len(page.MODELS) * len(page.PATHS) * len(page.WORKLOADS) - len(page.NOT_SERVED) == 11
    for cell in page.CELLS:
        assert cell.run().is_dir(), cell.name
        for run in cell.http_runs:
            bench = _bench(run)
            assert bench["client"] == "http", run
            assert bench["backend"] == f"paged|{cell.path.backend}", run
            assert str(bench["model"]).endswith(cell.model), run
        pair = _bench(cell.pair)
        assert pair["client"] == "inprocess", cell.name
        assert pair["backend"] == f"paged|{cell.path.backend}", cell.name
        assert pair["model"] == cell.hf_model, cell.name


def test_the_repeats_are_found_first_run_first() -> None:
    runs = {cell.name: cell.http_runs for cell in page.CELLS}
    assert {name: len(r) for name, r in runs.items() if len(r) > 1} == REPEATED
    for cell in page.CELLS:
        assert runs[cell.name][0] == cell.run(page.HTTP_DIRS[0])
    # Every committed HTTP run is one of a cell's.
    committed = {p for d in page.HTTP_DIRS for p in (page.DATA / d).iterdir() if p.is_dir()}
    assert committed == {run for r in runs.values() for run in r}


def test_every_committed_pair_is_a_cells() -> None:
    committed = {p for p in (page.DATA / page.PAIRS_DIR).iterdir() if p.is_dir()}
    assert committed == {cell.pair for cell in page.CELLS}
