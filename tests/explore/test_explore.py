"""`dooly explore` on a synthetic two-platform store whose optimum is known by construction
(tests/explore/conftest.py), plus its parsing, memory and memoisation pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from explore_support import CALIBRATED_HOST_S, FAST, SLOW, TOY

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.explore.candidates import build_space, parse_setting_grid, read_store_facts
from dooly.explore.hardware import GIB, memory_verdict, model_memory, parameter_count
from dooly.explore.search import MemoStep
from dooly.sim.step_model import AnalyticStepModel, StepKind, StepPath

# A workload small enough for a 2-core machine: the toy model has 4 layers, so steps are short.
WORKLOAD = ["--requests", "60", "--prompt-len", "uniform:64:512", "--output-len", "32", "--jobs", "1"]
# SLO-bound on both platforms (the loose limits of the known-optimum test leave them throughput-bound).
TIGHT = ["--slo", "ttft_p90=0.02", "--slo", "tpot_p90=0.0025"]
# A host cost per step a hundred times the store's calibration: it must show in the capacity.
HEAVY_HOST_S = 100 * CALIBRATED_HOST_S


def explore(store: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["explore", TOY.model_id, "--store", store, *WORKLOAD, *args])
    return result.exit_code, result.stdout, result.stderr


def explore_json(store: str, *args: str) -> dict:
    code, out, err = explore(store, *args, "--output", "json")
    assert code == 0, err
    return json.loads(out)


def test_finds_the_optimum_known_by_construction(two_platform_store, prices_file):
    equal = explore_json(two_platform_store, *TIGHT, "--prices", prices_file(1.0, 1.0))
    by_platform = {r["candidate"]["platform"]: r for r in equal["candidates"]}
    assert all(r["capacity_rps"] > 0 for r in by_platform.values())
    # Every operation twice as slow: less capacity, and at equal prices FAST is the answer.
    assert by_platform[FAST]["capacity_rps"] > 1.5 * by_platform[SLOW]["capacity_rps"]
    assert equal["best"]["candidate"]["platform"] == FAST
    assert [r["rank"] for r in equal["candidates"]] == [1, 2]
    # At a tenth of the price the slow GPU serves more per dollar: the ranking follows the prices.
    cheap_slow = explore_json(two_platform_store, *TIGHT, "--prices", prices_file(1.0, 0.1))
    assert cheap_slow["best"]["candidate"]["platform"] == SLOW
    assert cheap_slow["frontier"]["points"][0]["candidate"]["platform"] == SLOW


def test_capacity_is_monotone_in_the_slo(two_platform_store):
    capacities = []
    for tpot in (0.0012, 0.0013, 0.0015, 0.002):
        document = explore_json(two_platform_store, "--platform", FAST, "--slo", f"tpot_p90={tpot}")
        capacities.append(document["candidates"][0]["capacity_rps"])
    tolerance = 0.05
    assert capacities[0] < capacities[-1]
    for stricter, looser in zip(capacities, capacities[1:]):
        assert looser >= stricter * (1 - tolerance)


def test_an_impossible_slo_names_the_closest_candidate(two_platform_store):
    code, out, err = explore(two_platform_store, "--slo", "ttft_p90=0.00001")
    assert code == 0, err
    assert "no candidate meets the SLO; closest:" in out and "Synthetic-Fast" in out.split("closest:")[1]
    document = explore_json(two_platform_store, "--slo", "ttft_p90=0.00001")
    assert document["no_candidate_meets_slo"] and document["best"] is None
    assert document["closest"]["candidate"]["platform"] == FAST


def test_unpredictable_candidates_are_listed_with_the_reason(two_platform_store):
    document = explore_json(two_platform_store, "--slo", "ttft_p90=0.05", "--tp", "1,2", "--platform", FAST,
                            "--platform", "NVIDIA-H200")
    reasons = {(u["candidate"]["platform"], u["candidate"]["tp"]): u["reason"] for u in document["unpredictable"]}
    assert "no collectives measured" in reasons[(FAST, 2)]
    assert "no fitted models for NVIDIA-H200" in reasons[("NVIDIA-H200", 1)]
    assert [r["candidate"]["platform"] for r in document["candidates"]] == [FAST]


def test_files_and_the_store_report(two_platform_store, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = explore(two_platform_store, *TIGHT, "--out", str(out), "--report", "--report-name", "nightly")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert names == {"explore.json", "explore.txt", "candidates.csv", "capacity.png", "frontier.png"}
    rows = (out / "candidates.csv").read_text().splitlines()
    assert rows[0].startswith("rank,model,platform") and len(rows) == 3
    report = Path(two_platform_store) / "reports" / "gen-000001" / "nightly"
    assert {p.name for p in report.iterdir()} == names
    assert json.loads((report / "explore.json").read_text())["best"]["candidate"]["platform"] == FAST


def test_async_batching_candidates_need_an_async_calibration(two_platform_store):
    """transformers' async batching is modelled, but served only by a host calibration of its
    own: a store with synchronous calibrations lists the async candidates as unpredictable."""
    document = explore_json(two_platform_store, *TIGHT, "--set", "use_async_batching=false,true")
    reasons = [u["reason"] for u in document["unpredictable"] if u["candidate"]["settings"]["use_async_batching"]]
    assert reasons and all("no host-overhead calibration" in r and "async batching" in r for r in reasons)
    ranked = document["candidates"]
    assert ranked and not any(c["candidate"]["settings"]["use_async_batching"] for c in ranked)


BAD_INPUTS = {
    "unknown SLO metric": (["--slo", "latency_p90=0.5"], "unknown SLO metric"),
    "non-positive SLO": (["--slo", "ttft_p90=0"], "positive number of seconds"),
    "empty candidate set": (["--slo", "ttft_p90=0.5", "--platform", "NVIDIA-B200"], "empty candidate set"),
    "non-positive min rate": (["--slo", "ttft_p90=0.5", "--min-rate", "0"], "--min-rate must be a positive rate"),
    "non-positive max rate": (["--slo", "ttft_p90=0.5", "--max-rate", "-2"], "--max-rate must be a positive rate"),
    "bad setting": (["--slo", "ttft_p90=0.5", "--set", "num_blocks=0"], "num_blocks"),
    # Settings the simulator does not model (dooly.sim.engine_settings), named in the line.
    "unmodelled setting": (["--slo", "ttft_p90=0.5", "--set", "allow_block_sharing=true"],
                           "allow_block_sharing=true is not modelled"),
    "unknown setting": (["--slo", "ttft_p90=0.5", "--set", "bogus=1"], "unknown key 'bogus'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_are_one_error_line_and_write_nothing(two_platform_store, tmp_path, name):
    args, message = BAD_INPUTS[name]
    out = tmp_path / "out"
    code, stdout, err = explore(two_platform_store, *args, "--out", str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("text", ["platforms: [a, b]", "platforms:\n  X: {usd_per_gpu_hour: -1}", "{unclosed"])
def test_a_malformed_prices_file_is_refused(two_platform_store, tmp_path, text):
    prices = tmp_path / "prices.yaml"
    prices.write_text(text)
    out = tmp_path / "out"
    code, _, err = explore(two_platform_store, "--slo", "ttft_p90=0.5", "--prices", str(prices), "--out", str(out))
    assert code == 2 and err.startswith("error: prices file") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_parallel_search_equals_the_serial_one(two_platform_store):
    args = ["explore", TOY.model_id, "--store", two_platform_store, *TIGHT, "--requests", "40", "--output-len", "16",
            "--set", "max_batch_tokens=256,512", "--output", "json"]
    serial, parallel = (CliRunner().invoke(cli, [*args, "--jobs", jobs]) for jobs in ("1", "2"))
    assert serial.exit_code == 0 and parallel.exit_code == 0, parallel.stderr
    caps = [[(r["label"], r["capacity_rps"]) for r in json.loads(x.stdout)["candidates"]] for x in (serial, parallel)]
    assert caps[0] == caps[1] and len(caps[0]) == 4


# ---------------------------------------------------------------------------------------------
# Pieces


def test_setting_grid_keeps_bracketed_values_whole():
    grid = parse_setting_grid(["use_cuda_graph=false,[false,true]", "num_blocks=512,1024"])
    assert len(grid) == 4
    assert {json.dumps(g["use_cuda_graph"]) for g in grid} == {"false", "[false, true]"}


def test_weights_and_kv_from_the_config():
    memory = model_memory("meta-llama/Llama-3.1-8B", "bfloat16")
    assert memory is not None and memory.parameters == pytest.approx(8.03e9, rel=0.005)
    assert memory.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    h100 = 81559 * 2**20
    fits = memory_verdict(memory, h100, tp=1, kv_tokens=512 * 256)
    assert fits["fits"] and fits["kv_cache_gib_per_gpu"] == pytest.approx(16.0)
    too_big = memory_verdict(memory, h100, tp=1, kv_tokens=4096 * 256)
    assert too_big["fits"] is False and "exceed" in too_big["reason"]
    # TP splits weights and KV heads across ranks.
    assert memory_verdict(memory, h100, tp=2, kv_tokens=4096 * 256)["weights_gib_per_gpu"] == pytest.approx(
        memory.weight_bytes / 2 / GIB)
    mixtral = model_memory("mistralai/Mixtral-8x7B-v0.1", "bfloat16")
    assert mixtral is not None and mixtral.parameters == pytest.approx(46.7e9, rel=0.01)
    assert parameter_count({"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 10,
                            "intermediate_size": 16, "tie_word_embeddings": True}) == 8 * 8 * 4 + 3 * 8 * 16 + 16 + 80 + 8


def test_memo_step_returns_what_the_model_would():
    inner = AnalyticStepModel()
    memo = MemoStep(inner)
    path = StepPath(StepKind.MIXED, cuda_graph=True, padded_tokens=128)
    first = memo.step_seconds([(64, 0)], [100, 200], path=path)
    again = memo.step_seconds([(64, 0)], [100, 200], path=path)
    assert first == again == inner.step_seconds([(64, 0)], [100, 200], path=path)
    assert (memo.hits, memo.misses) == (1, 1)


def test_space_lists_every_asked_candidate(two_platform_store):
    facts = read_store_facts(two_platform_store)
    space = build_space(facts, [TOY.model_id, "org/unknown"], tps=(1, 4), settings=[{}, {"num_blocks": 64}])
    assert len(space.runnable) + len(space.unpredictable) == 2 * 2 * 2 * 2
    # A model the store holds no inventory of is a candidate: the resolver traces it when opened.
    assert {c.model for c in space.runnable} == {TOY.model_id, "org/unknown"}
    assert {c.platform for c in space.runnable} == {FAST, SLOW} and all(c.tp == 1 for c in space.runnable)


def test_a_model_the_resolver_cannot_trace_is_unpredictable_with_its_error(two_platform_store):
    result = CliRunner().invoke(cli, ["explore", TOY.model_id, "org/unknown", "--store", two_platform_store,
                                      *WORKLOAD, "--slo", "ttft_p90=0.05", "--platform", FAST, "--output", "json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    reasons = {u["candidate"]["model"]: u["reason"] for u in document["unpredictable"]}
    assert set(reasons) == {"org/unknown"} and "org/unknown" in reasons["org/unknown"]
    assert [r["candidate"]["model"] for r in document["candidates"]] == [TOY.model_id]


def test_host_overhead_comes_from_the_store_per_graph_mode(two_platform_store, tmp_path):
    from dooly.sim.step_model import CpuOverheadModel, OverheadTerms

    document = explore_json(two_platform_store, "--slo", "ttft_p90=0.05", "--platform", FAST,
                            "--set", "use_cuda_graph=false,true")
    (found,) = document["candidates"]
    assert found["candidate"]["settings"]["use_cuda_graph"] is False
    assert found["overhead"].startswith("store calibration") and "graphs off" in found["overhead"]
    (missing,) = document["unpredictable"]
    assert missing["candidate"]["settings"]["use_cuda_graph"] is True
    assert "no host-overhead calibration" in missing["reason"] and "graphs on" in missing["reason"]
    # --no-cpu-overhead predicts both, with no host time: at least the calibrated capacity.
    bare = explore_json(two_platform_store, "--slo", "ttft_p90=0.05", "--platform", FAST,
                        "--set", "use_cuda_graph=false,true", "--no-cpu-overhead")
    assert len(bare["candidates"]) == 2 and not bare["unpredictable"]
    no_graphs = next(r for r in bare["candidates"] if not r["candidate"]["settings"]["use_cuda_graph"])
    assert no_graphs["capacity_rps"] >= found["capacity_rps"] * 0.95
    # An --overhead file overrides the store: a heavy host cost lowers the capacity.
    heavy = tmp_path / "heavy.json"
    heavy.write_text(json.dumps(CpuOverheadModel(terms={"default": OverheadTerms(constant_s=HEAVY_HOST_S)}).to_dict()))
    overridden = explore_json(two_platform_store, "--slo", "ttft_p90=0.05", "--platform", FAST,
                              "--overhead", str(heavy))
    assert overridden["candidates"][0]["overhead"] == f"file {heavy}"
    assert overridden["candidates"][0]["capacity_rps"] < found["capacity_rps"]
    code, _, err = explore(two_platform_store, "--slo", "ttft_p90=0.05", "--overhead", str(heavy), "--no-cpu-overhead")
    assert code == 2 and err.startswith("error:") and "exclude each other" in err


def test_coverage_is_the_measured_share_of_device_time(two_platform_store):
    document = explore_json(two_platform_store, "--slo", "ttft_p90=0.05", "--platform", FAST)
    coverage = document["candidates"][0]["coverage"]
    # Every signature of the toy model was profiled: all of its device time is measured.
    assert coverage["measured_share"] == pytest.approx(1.0)
    assert coverage["class_regressor_share"] == coverage["fallback_share"] == 0.0
    assert coverage["device_seconds"] > 0 and coverage["inventory"] == "store"
    assert coverage["at_rate_rps"] == document["candidates"][0]["capacity_rps"]
    assert set(coverage["phases"]) <= {"prefill", "decode", "mixed"} and coverage["phases"]


def test_overhead_keys_pick_the_most_specific_file(tmp_path):
    from dooly.explore.commands import parse_overheads
    from dooly.explore.search import RateWorkload, SearchContext, graph_mode
    from dooly.workload import WorkloadSpec

    files = {}
    for name in ("all", "sdpa", "sdpa_graphs", "h100_sdpa"):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({"terms": {"default": {"constant_s": 0.001}}}))
    overheads = parse_overheads((str(files["all"]), f"paged|sdpa={files['sdpa']}",
                                 f"paged|sdpa:graphs={files['sdpa_graphs']}", f"H100:paged|sdpa={files['h100_sdpa']}"))
    context = SearchContext(store="", slos=[], workload=RateWorkload.from_spec(WorkloadSpec(num_requests=2)),
                            overheads=overheads)
    assert graph_mode({"use_cuda_graph": [False, True]}) == "graphs" and graph_mode({}) == "nographs"
    assert context.overhead_for("H200", "paged|sdpa", "graphs") == str(files["sdpa_graphs"])
    assert context.overhead_for("H200", "paged|sdpa", "nographs") == str(files["sdpa"])
    assert context.overhead_for("H100", "paged|sdpa", "nographs") == str(files["h100_sdpa"])
    assert context.overhead_for("H100", "paged|eager", "graphs") == str(files["all"])
    with pytest.raises(DoolyError, match="graphs"):
        parse_overheads((f"H100:paged|sdpa:warm={files['sdpa']}",))
