"""bench/lomo_unseen.py holds a model's calib runs out of its store calibration by the whole model
name: a dotted one (Llama-3.2-1B, Qwen2.5-7B) is not cut at its first dot, and calib runs are found
in any of the directories (or single runs) named."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import lomo_unseen  # noqa: E402

RUNS = ("Llama-3.2-1B.paged-sdpa.graphs.calib", "Llama-3.2-3B.paged-sdpa.graphs.calib",
        "Qwen2.5-7B.paged-sdpa.warm.calib", "gemma-2-9b.paged-eager.default.calib")


def _run(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "requests.parquet").write_bytes(b"")
    return directory


def test_a_dotted_model_name_holds_out_only_its_own_runs(tmp_path: Path) -> None:
    for name in RUNS:
        _run(tmp_path / "gt" / name)
    (tmp_path / "gt" / "Llama-3.2-1B.paged-sdpa.graphs.light").mkdir()
    for held_out in ("Llama-3.2-1B", "Qwen2.5-7B", "gemma-2-9b"):
        kept = {p.name for p in lomo_unseen.calib_runs([tmp_path / "gt"], held_out)}
        assert kept == {name for name in RUNS if not name.startswith(f"{held_out}.")}, held_out
    assert len(lomo_unseen.calib_runs([tmp_path / "gt"], lomo_unseen.FULL_REFIT)) == len(RUNS)


def test_calib_runs_are_gathered_from_directories_and_single_runs(tmp_path: Path) -> None:
    _run(tmp_path / "a" / RUNS[0])
    single = _run(tmp_path / "b" / RUNS[1])
    _run(tmp_path / "b" / RUNS[2])
    found = lomo_unseen.calib_runs([tmp_path / "a", single], "gemma-2-9b")
    assert [p.name for p in found] == [RUNS[0], RUNS[1]]
