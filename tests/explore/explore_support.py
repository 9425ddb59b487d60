"""Shared by the explore tests (imported by name, as tests/fleet does with fleet_support): a
synthetic fitted store with two platforms whose optimum is known by construction: every
operation of `SLOW` takes twice what it takes on `FAST` (the same laws, latencies doubled), so at
equal prices FAST serves more per dollar, and at a tenth of the price SLOW does."""

from __future__ import annotations

from typing import Any

from dooly.fit import synthetic as syn

FAST = "Synthetic-Fast-80GB"
SLOW = "Synthetic-Slow-80GB"
SLOWDOWN = 2.0
TOY = syn.TOY_MODELS[2]  # toy/gamma-7b
FOLDS = 2
REPEATS = 1
TOY_BACKEND = syn.BACKEND
# The host time per step of the store's calibrations (graphs off only): small beside the toy's
# millisecond steps, so the known optimum stays where it is.
CALIBRATED_HOST_S = 1e-5
LATENCY_COLUMNS = ("latency_median_s", "latency_p10_s", "latency_p90_s", "latency_mean_s")


def rows_for(platform: str, factor: float) -> list[dict]:
    rows = syn.snapshot_rows((TOY,), platform=platform)
    for row in rows:
        for column in LATENCY_COLUMNS:
            row[column] *= factor
    return rows


def server_costs_record(platform: str, ttft_s: float, tpot_s: float, cuda_graphs: bool = False) -> Any:
    """An offsets-only server-cost record (no step term, no cells: nothing withheld) for PLATFORM's
    toy key: every request timed at the HTTP client is TTFT_S and TPOT_S (per token) slower."""
    from dooly.sim.server_costs import SCHEMA_V1, OffsetStats, ServerCosts

    def stats(value: float) -> OffsetStats:
        return OffsetStats(value, value, 0.0, value, value, 60)

    key = {"platform": platform, "engine": "transformers", "engine_version": "test", "backend": TOY_BACKEND,
           "cuda_graphs": cuda_graphs, "async_batching": False}
    return ServerCosts(key, stats(ttft_s), stats(tpot_s), [], raw_ttft=stats(ttft_s), raw_tpot=stats(tpot_s),
                       schema=SCHEMA_V1, source="synthetic")

