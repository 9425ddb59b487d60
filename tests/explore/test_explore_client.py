"""`dooly explore --client http`: each candidate's SLO statistics as a client of the engine's HTTP
server sees them (the store's server-cost record of its key added), on the synthetic two-platform
store (tests/explore/conftest.py) with offsets-only records whose effect is known exactly."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from explore_support import FAST, SLOW, TOY, TOY_BACKEND, server_costs_record

from dooly.cli import cli
from dooly.sim.server_costs import write_server_costs
from dooly.store.backends import open_store

WORKLOAD = ["--requests", "60", "--prompt-len", "uniform:64:512", "--output-len", "32"]
OUTPUT_TOKENS = 32
TTFT_OFFSET_S, TPOT_OFFSET_S = 0.005, 0.0005
# Well below either platform's saturation: a loose SLO holds here, so it is the one point simulated.
RATE = "1"
LOOSE = ["--slo", "tpot_p90=1.0"]


def explore(store: str, *args: str, jobs: str = "1") -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["explore", TOY.model_id, "--store", store, *WORKLOAD, "--jobs", jobs, *args])
    return result.exit_code, result.stdout, result.stderr


def explore_json(store: str, *args: str, jobs: str = "1") -> dict:
    code, out, err = explore(store, *args, "--output", "json", jobs=jobs)
    assert code == 0, err
    return json.loads(out)


def with_record(store: str, platform: str = FAST) -> str:
    write_server_costs(open_store(store), server_costs_record(platform, TTFT_OFFSET_S, TPOT_OFFSET_S))
    return store


def only_point(document: dict) -> dict:
    (candidate,) = document["candidates"]
    (point,) = candidate["points"]
    return point


def test_http_shifts_every_slo_statistic_by_the_record_offsets(store_copy):
    store = with_record(store_copy)
    args = ["--platform", FAST, "--max-rate", RATE, *LOOSE]
    inprocess, http = explore_json(store, *args), explore_json(store, *args, "--client", "http")
    before, after = only_point(inprocess), only_point(http)
    assert before["rate_rps"] == after["rate_rps"] == float(RATE)
    e2e_offset = TTFT_OFFSET_S + TPOT_OFFSET_S * (OUTPUT_TOKENS - 1)
    for name, value in before["latency_s"].items():
        offset = {"ttft": TTFT_OFFSET_S, "tpot": TPOT_OFFSET_S, "e2e": e2e_offset}[name.split("_")[0]]
        assert after["latency_s"][name] == pytest.approx(value + offset, abs=1e-9), name
    # The document says the client and which record each candidate got.
    assert "client" not in inprocess and "server_costs" not in inprocess["candidates"][0]
    assert http["client"] == "http"
    applied = http["candidates"][0]["server_costs"]
    assert applied["generation"] == 1 and applied["key"]["platform"] == FAST
    assert applied["applied_ttft_s"] == TTFT_OFFSET_S and applied["applied_tpot_s"] == TPOT_OFFSET_S
    assert applied["withheld_offsets"] == {}
    (record,) = http["server_costs"]
    assert record["record"] == applied["record"] and FAST in record["candidates_key"]


def test_a_candidate_meeting_the_slo_in_process_misses_it_at_the_http_client(store_copy, tmp_path):
    store = with_record(store_copy)
    base = only_point(explore_json(store, "--platform", FAST, "--max-rate", RATE, *LOOSE))
    # Between what the engine gives and what its client sees at that rate.
    limit = base["latency_s"]["tpot_p90"] + TPOT_OFFSET_S / 2
    args = ["--platform", FAST, "--max-rate", RATE, "--slo", f"tpot_p90={limit}"]
    inprocess = explore_json(store, *args)
    assert inprocess["best"]["capacity_rps"] == float(RATE)
    http = explore_json(store, *args, "--client", "http")
    assert http["candidates"][0]["capacity_rps"] < float(RATE)
    assert http["best"] is None or http["best"]["capacity_rps"] < float(RATE)
    code, out, err = explore(store, *args, "--client", "http", "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "client: http" in out and "generation 1 of" in out
    header = (tmp_path / "out" / "candidates.csv").read_text().splitlines()[0]
    assert header.endswith(",server_costs")


def test_candidates_without_a_record_are_skipped_with_the_reason(store_copy):
    store = with_record(store_copy, FAST)
    document = explore_json(store, *LOOSE, "--max-rate", RATE, "--client", "http")
    assert [r["candidate"]["platform"] for r in document["candidates"]] == [FAST]
    (skipped,) = [u for u in document["unpredictable"] if u["candidate"]["platform"] == SLOW]
    assert skipped["status"] == "no_server_costs"
    assert skipped["reason"] == (f"no server-cost record for {SLOW} / transformers / {TOY_BACKEND} / graphs off: "
                                 "dooly server-costs --save writes one")
    code, out, err = explore(store, *LOOSE, "--max-rate", RATE, "--client", "http")
    assert code == 0 and f"no server-cost record for {SLOW}" in out


def test_no_record_for_any_candidate_is_one_error_line(two_platform_store, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = explore(two_platform_store, *LOOSE, "--client", "http", "--out", str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --client http: store") and "no usable server-cost" in lines[0]
    assert not out.exists()


def test_records_reach_the_worker_processes(store_copy):
    store = with_record(with_record(store_copy, FAST), SLOW)
    args = [*LOOSE, "--max-rate", RATE, "--client", "http", "--set", "max_batch_tokens=256,512"]
    serial, parallel = explore_json(store, *args), explore_json(store, *args, jobs="2")
    points = [[(r["label"], r["server_costs"]["record"], r["points"]) for r in d["candidates"]]
              for d in (serial, parallel)]
    assert points[0] == points[1] and len(points[0]) == 4


def test_in_process_is_the_default_and_ignores_the_records(two_platform_store, store_copy):
    store = with_record(store_copy)
    args = ["--platform", FAST, "--max-rate", RATE, *LOOSE]
    plain, explicit = explore_json(two_platform_store, *args), explore_json(store, *args, "--client", "inprocess")
    assert only_point(plain) == only_point(explicit)
    assert "client" not in explicit and "server_costs" not in explicit

