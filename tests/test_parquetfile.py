"""Compact timing tables: lossless, and smaller than Parquet's defaults on timestamps."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dooly.parquetfile import float_column_paths, write_compact


def timings_table(rows: int = 200) -> pa.Table:
    rng = np.random.default_rng(0)
    arrived = np.sort(rng.uniform(590.0, 650.0, rows))
    return pa.table({
        "request_id": [f"r{i}" for i in range(rows)],
        "arrived_at_s": arrived,
        "prompt_tokens": rng.integers(8, 4096, rows),
        "token_times_s": [list(a + np.cumsum(rng.uniform(0.01, 0.05, 64))) for a in arrived],
        "error": [""] * rows,
    })


def test_float_leaves_are_split_and_nothing_else():
    assert float_column_paths(timings_table().schema) == ["arrived_at_s", "token_times_s.list.element"]


# A committed run served at an HTTP client: 96 requests' token timestamps.
COMMITTED_RUN = (Path(__file__).resolve().parents[1] / "data/h100/experiments/engine_paths/lease6/http"
                 / "Llama-3.2-1B.paged-eager.graphs.heavy/requests.parquet")
# What splitting the float streams must save on a real run against Parquet's default (snappy).
MAX_SIZE_RATIO = 0.7


def test_a_compact_table_reads_back_equal(tmp_path):
    table = timings_table()
    path = tmp_path / "requests.parquet"
    write_compact(table, path)
    assert pq.read_table(path).equals(table)


def test_a_real_run_is_much_smaller_than_parquets_default(tmp_path):
    table = pq.read_table(COMMITTED_RUN)
    path = tmp_path / "requests.parquet"
    write_compact(table, path)
    assert pq.read_table(path).equals(table)
    default = io.BytesIO()
    pq.write_table(table, default)
    assert path.stat().st_size < MAX_SIZE_RATIO * len(default.getvalue())


def test_a_table_without_floats_is_written_too(tmp_path):
    table = pa.table({"step": [1, 2, 3]})
    write_compact(table, tmp_path / "steps.parquet")
    assert pq.read_table(tmp_path / "steps.parquet").equals(table)
