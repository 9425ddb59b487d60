"""reports/engine_grid_table.py's pure parts: grouping the grid's rounds into cells (the repeats
that give a cell's floor), the verdict against issue #24's targets with the floor widening the
bound, the per-cell record, which committed calib runs a missing calibration is fitted from, the
per-platform settings and the models found in a grid's directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "reports"))

import engine_grid_table as grid  # noqa: E402

MODEL = "meta-llama/Llama-3.2-1B"


def _run(round_: str, name: str) -> grid.GridRun:
    parsed = grid.parse_run(Path("grid") / round_ / name)
    assert parsed is not None
    return parsed


def _payload(errors: dict[str, float], floors: dict[str, float | None], ttft_mape: float = 1.0,
             tpot_mape: float = 1.0) -> dict[str, Any]:
    rows = [{"statistic": key, "error_pct": errors[key], "floor_pct": floors.get(key), "measured": 0.1,
             "predicted": 0.1 * (1 + errors[key] / 100)} for key in grid.TARGET_ROWS]
    return {"summary": {"rows": rows}, "requests": {"ttft": {"mape": ttft_mape}, "tpot": {"mape": tpot_mape}},
            "steps": {"mape": 2.0}, "cpu_overhead": "store calibration"}


def test_parse_run_keeps_the_dotted_model_name() -> None:
    run = _run("r2", "Llama-3.2-1B.paged-sdpa.async.heavy")
    assert (run.round, run.model_dir, run.backend, run.mode, run.workload) == ("r2", "Llama-3.2-1B", "sdpa", "async", "heavy")
    assert grid.parse_run(Path("grid/r1/walls.txt")) is None
    assert grid.parse_run(Path("grid/r1/Llama-3.2-1B.sdpa.graphs.light")) is None
    assert grid.parse_run(Path("grid/r1/Llama-3.2-1B.paged-sdpa.graphs.calib")) is None


def test_discover_finds_the_models_of_the_grid_not_its_calib_runs(tmp_path: Path) -> None:
    for name in ("r1/Llama-3.2-1B.paged-sdpa.graphs.light", "r2/Llama-3.2-1B.paged-sdpa.graphs.light",
                 "r1/Llama-3.1-8B.paged-eager.graphs.heavy", "r1/Qwen2.5-7B.paged-sdpa.graphs.calib",
                 "r1/Llama-3.1-8B.paged-sdpa.default.calib"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "requests.parquet").touch()
    (tmp_path / "r2" / "gemma-2-9b.paged-sdpa.graphs.light").mkdir()  # unfinished: no requests.parquet
    cells = grid.discover(tmp_path)
    assert grid.grid_models(cells) == ["Llama-3.1-8B", "Llama-3.2-1B"]
    assert [(c.name, c.rounds) for c in cells] == [("Llama-3.1-8B eager graphs heavy", ("r1",)),
                                                   ("Llama-3.2-1B sdpa graphs light", ("r1", "r2"))]


@pytest.mark.parametrize(("key", "platform", "root", "page", "command"), [
    ("h100", "NVIDIA-H100-80GB-HBM3", "data/h100", "docs/engine-grid.md", "python reports/engine_grid_table.py"),
    ("h200", "NVIDIA-H200", "data/h200", "docs/engine-grid-h200.md", "python reports/engine_grid_table.py --platform h200"),
])
def test_platform_settings_resolve(key: str, platform: str, root: str, page: str, command: str) -> None:
    settings = grid.PLATFORMS[key]
    assert (settings.platform, settings.root, settings.page) == (platform, Path(root), Path(page))
    assert settings.data == Path(root) / "experiments" / "engine_grid"
    assert settings.store == Path(root) / "db"
    # The store's calibrations are filed under the platform name the settings give.
    assert (ROOT / settings.store / "calibrations" / f"platform={platform}").is_dir()
    sources = grid.Sources(settings, key, settings.data, settings.store, settings.data / grid.RECORD)
    assert sources.command == command


def test_committed_h100_grid_models_are_discovered() -> None:
    cells = grid.discover(ROOT / grid.PLATFORMS["h100"].data)
    assert grid.grid_models(cells) == ["Llama-3.2-1B", "Llama-3.2-3B"]
    assert all(c.workload in grid.WORKLOAD_ORDER for c in cells)


def test_group_cells_pairs_repeats_in_round_order_and_orders_the_page() -> None:
    runs = [_run(r, f"Llama-3.2-1B.paged-{b}.{m}.{w}") for r, b, m, w in (
        ("r2", "sdpa", "graphs", "light"), ("r1", "eager", "graphs", "heavy"), ("r10", "sdpa", "graphs", "light"),
        ("r1", "sdpa", "default", "heavy"), ("r1", "sdpa", "graphs", "light"), ("r1", "sdpa", "async", "light"))]
    cells = grid.group_cells(runs)
    assert [c.name for c in cells] == [f"Llama-3.2-1B {name}" for name in (
        "sdpa graphs light", "sdpa graphs + async light", "sdpa no graphs heavy", "eager graphs heavy")]
    assert cells[0].rounds == ("r1", "r2", "r10")
    assert cells[0].runs[0] == Path("grid/r1/Llama-3.2-1B.paged-sdpa.graphs.light")
    assert [len(c.runs) for c in cells] == [3, 1, 1, 1]


def test_sync_reference_is_the_graphs_cell_of_the_same_round() -> None:
    cells = grid.group_cells([_run(r, f"Llama-3.2-1B.paged-sdpa.{m}.light")
                              for r, m in (("r1", "async"), ("r1", "graphs"), ("r2", "graphs"))])
    asynchronous = next(c for c in cells if c.mode == "async")
    assert grid.sync_reference(asynchronous, cells) == next(c for c in cells if c.mode == "graphs")
    assert grid.sync_reference(next(c for c in cells if c.mode == "graphs"), cells) is None


@pytest.mark.parametrize(("workload", "error", "floor", "ttft_mape", "expected"), [
    ("light", 7.9, None, 50.0, []),
    ("light", -10.1, None, 1.0, ["ttft mean -10.1%"]),
    ("light", -10.1, 12.0, 1.0, []),
    ("heavy", 1.0, None, 5.1, ["TTFT MAPE 5.1% > 5%"]),
])
def test_misses_bound_by_target_or_floor(workload: str, error: float, floor: float | None, ttft_mape: float,
                                         expected: list[str]) -> None:
    errors = dict.fromkeys(grid.TARGET_ROWS, 0.0) | {"ttft_mean": error}
    cell = grid.Cell("c", "sdpa", workload, (Path("r1"),), model=MODEL)
    assert grid.misses(cell, _payload(errors, {"ttft_mean": floor}, ttft_mape=ttft_mape)) == expected


def test_cell_record_carries_the_bound_and_verdict() -> None:
    cells = grid.group_cells([_run(r, "Llama-3.2-1B.paged-sdpa.graphs.heavy") for r in ("r1", "r2")])
    cell = grid.Cell(cells[0].name, "sdpa", "heavy", cells[0].runs, model=MODEL)
    errors = dict.fromkeys(grid.TARGET_ROWS, 0.0) | {"tpot_mean": 10.6}
    record = grid.cell_record(cells[0], cell, _payload(errors, {"tpot_mean": 2.2}, tpot_mape=10.8))
    assert record["statistics"]["tpot_mean"]["bound_pct"] == grid.SUMMARY_TARGET_PCT
    assert record["misses"] == ["tpot mean +10.6%", "TPOT MAPE 10.8% > 8%"]
    assert not record["pass"]
    assert record["runs"] == [str(p) for p in cells[0].runs]


def test_batch_buckets_and_decode_classes() -> None:
    assert [grid.batch_bucket(b) for b in (1, 4, 5, 16, 17, 64, 65, 500)] == [
        "1-4", "1-4", "5-16", "5-16", "17-64", "17-64", "65+", "65+"]
    decode = {"prefill": [], "decode_ctx": [100, 200], "graph_captured": False}
    assert grid.decode_class(None, decode) == "1-4"
    assert grid.decode_class(None, decode | {"graph_captured": True}) == grid.OTHER_STEPS
    assert grid.decode_class(None, decode | {"prefill": [{"q": 8, "ctx": 0}]}) == grid.OTHER_STEPS
    assert grid.decode_kv_means([decode, decode | {"decode_ctx": [500]}]) == {"1-4": 400.0}


def test_furthest_class_is_by_wall_time_not_by_one_term() -> None:
    # Device and host offset each other in `split` (no-graph steps), while `late` is slower in wall time.
    sums = {"split": {"steps": 10, "device_meas": 9.0, "device_pred": 1.0, "host_meas": 1.0, "host_pred": 9.0},
            "late": {"steps": 10, "device_meas": 2.0, "device_pred": 1.0, "host_meas": 1.0, "host_pred": 1.0}}
    kind, wall, device, host = grid.furthest_class(sums)
    assert (kind, wall, device, host) == ("late", -1.0, -1.0, 0.0)


def _calib(root: Path, name: str, backend: str, settings: dict[str, Any]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "bench.json").write_text(json.dumps({"model": MODEL, "backend": backend}))
    (run / "engine.json").write_text(json.dumps(settings))
    return run


def test_calib_runs_match_backend_graphs_and_async(tmp_path: Path) -> None:
    sync = _calib(tmp_path / "a", "1b.paged-sdpa.graphs.calib", "paged|sdpa", {"use_cuda_graph": True})
    _calib(tmp_path / "b", "1b.paged-sdpa.async.calib", "paged|sdpa", {"use_cuda_graph": True, "use_async_batching": True})
    _calib(tmp_path / "c", "1b.paged-eager.graphs.calib", "paged|eager", {"use_cuda_graph": True})
    _calib(tmp_path / "d", "1b.paged-sdpa.default.calib", "paged|sdpa", {"use_cuda_graph": False})
    wanted = grid.EnginePath("paged|sdpa", graphs=True, asynchronous=False)
    assert grid.calib_runs(wanted, tmp_path) == [sync]
    assert grid.calib_runs(grid.EnginePath("paged|flash", True, False), tmp_path) == []
