"""Tensor parallelism downstream: the analytic model per rank, Vidur's network profile, measured
engine steps (gloo ranks) and the comparison of composed predictions with them."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from dooly.cli import cli
from dooly.errors import DoolyError
from dooly.sim.step_model import LLAMA_3_8B, AnalyticStepModel, rank_dims
from dooly.sim.validate import compare_measured_steps
from dooly.sim.vidur import VidurSweep, export_vidur_network, store_collective_predictor

# The header of Vidur's published data/profiling/network/h100_pair_nvlink/all_reduce.csv
# (github.com/microsoft/vidur, main): a pandas index column, the stats in ms, then the keys.
VIDUR_ALL_REDUCE_HEADER = (
    ",time_stats.all_reduce.min,time_stats.all_reduce.max,time_stats.all_reduce.mean,"
    "time_stats.all_reduce.median,time_stats.all_reduce.std,rank,num_workers,size,collective,"
    "devices_per_node,max_devices_per_node"
)
SMALL = VidurSweep(max_tokens=64, max_seq_len=64, max_batch_size=4)
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def test_a_rank_computes_a_share_and_pays_for_collectives():
    one, two = AnalyticStepModel(tp=1), AnalyticStepModel(tp=2)
    assert two.dims == rank_dims(LLAMA_3_8B, 2)
    assert (two.dims.num_heads, two.dims.num_kv_heads, two.dims.intermediate_size, two.dims.vocab_size) == (16, 4, 7168, 64128)
    assert two.full_dims == LLAMA_3_8B and one.collective_seconds("all_reduce", 4096) == 0.0
    tokens = 512
    comm = (LLAMA_3_8B.num_layers * 2 * two.collective_seconds("all_reduce", tokens * LLAMA_3_8B.hidden_size)
            + two.collective_seconds("all_gather", LLAMA_3_8B.vocab_size // 2))
    compute_only = AnalyticStepModel(dims=rank_dims(LLAMA_3_8B, 2))
    assert two.step_seconds([(tokens, 0)], []) == pytest.approx(compute_only.step_seconds([(tokens, 0)], []) + comm)
    with pytest.raises(DoolyError, match="does not divide"):
        rank_dims(LLAMA_3_8B, 3)


def test_simulate_analytic_with_tensor_parallelism():
    runner = CliRunner()
    args = ["simulate", "meta-llama/Llama-3.1-8B", "--analytic", "--requests", "4", "--rate", "10", "--prompt-len", "256",
            "--output-len", "4", "--output", "json"]
    one, two = (runner.invoke(cli, [*args, "--tp", str(tp)]) for tp in (1, 2))
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    assert json.loads(two.output)["ttft_s"]["mean"] < json.loads(one.output)["ttft_s"]["mean"]
    refused = runner.invoke(cli, [*args, "--tp", "3"])
    assert refused.exit_code == 2 and "does not divide" in refused.output


def test_vidur_all_reduce_csv(tmp_path):
    model = AnalyticStepModel(tp=2)
    calls = []

    def predict(collective, tokens):
        calls.append(collective)
        return None if collective == "send_recv" else model.collective_seconds(collective, tokens * 4096)

    (path,) = export_vidur_network(predict, LLAMA_3_8B, tmp_path, "h200_pair_nvlink", 2, sweep=SMALL)
    assert path == tmp_path / "data" / "profiling" / "network" / "h200_pair_nvlink" / "all_reduce.csv"
    assert path.read_text().splitlines()[0] == VIDUR_ALL_REDUCE_HEADER
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r[""]) for r in rows] == list(range(len(rows)))
    tokens = [p.num_tokens for p in SMALL.mlp_points()]
    # Vidur's predictor: rows with num_workers == devices_per_node == tp, tokens = size / hidden / 2.
    assert [int(r["size"]) / LLAMA_3_8B.hidden_size / 2 for r in rows] == tokens
    assert {(r["num_workers"], r["devices_per_node"], r["collective"], r["rank"]) for r in rows} == {("2", "2", "all_reduce", "0")}
    for row, t in zip(rows, tokens):
        assert float(row["time_stats.all_reduce.median"]) == pytest.approx(model.collective_seconds("all_reduce", t * 4096) * 1e3)
    assert "send_recv" in calls  # asked, had nothing: no send_recv.csv
    with pytest.raises(DoolyError, match="tensor-parallel degree >= 2"):
        export_vidur_network(predict, LLAMA_3_8B, tmp_path, "x", 1)


def test_store_collective_predictor_reads_the_inventory_collective():
    class FakePredictor:
        def predict_ops(self, signatures, classes, configs, request, request_vars, ops):
            assert (signatures, classes, ops, request_vars) == (["s1"], ["collective.all_reduce"], ["collective.all_reduce"], [["T"]])
            return request["T"] * 1e-6

    inventory = {"operations": [
        {"signature": "g", "op": "collective.all_gather", "op_class": "collective.all_gather", "kind": "collective", "request_vars": ["B"]},
        {"signature": "s1", "op": "collective.all_reduce", "op_class": "collective.all_reduce", "kind": "collective", "request_vars": ["T"], "config_dims": {}},
        {"signature": "m", "op": "aten.mm.default", "op_class": "aten.mm.default", "kind": "kernel", "request_vars": ["T"]},
    ]}
    predict = store_collective_predictor(FakePredictor(), inventory)
    assert predict("all_reduce", 64) == pytest.approx(64e-6)
    assert predict("send_recv", 64) is None


def test_export_vidur_cli_network_tables(tmp_path):
    runner = CliRunner()
    args = ["export", "vidur", "meta-llama/Llama-3.1-8B", "--device", "h200", "--analytic", "--out", str(tmp_path),
            "--max-tokens", "64", "--max-seq-len", "64", "--max-batch-size", "4"]
    refused = runner.invoke(cli, [*args, "--tp", "2"])
    assert refused.exit_code == 2 and "--network-device" in refused.output
    result = runner.invoke(cli, [*args, "--tp", "2", "--network-device", "h200_pair_nvlink", "--output", "json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.output)["files"]
    assert any(f.endswith("network/h200_pair_nvlink/all_reduce.csv") for f in files)
    with open(next(f for f in files if f.endswith("mlp.csv")), newline="") as handle:
        assert {row["num_tensor_parallel_workers"] for row in csv.DictReader(handle)} == {"2"}


def _document(steps):
    return {"schema": "dooly.measured_steps/1", "model_id": "meta-llama/Llama-3.1-8B", "tp": 2, "backend": "paged|sdpa",
            "dtype": "bfloat16", "platform": "NVIDIA-H200", "topology": {"label": "NV18"}, "steps": steps}


def test_compare_measured_steps_mape():
    model = AnalyticStepModel(tp=2)
    prefill = model.step_seconds([(512, 0)], [])
    decode = model.step_seconds([], [1024] * 8)
    steps = [
        {"name": "p", "kind": "prefill", "prefill": [[512, 0]], "decode": [], "graph_s": prefill * 1.25, "eager_s": prefill},
        {"name": "d", "kind": "decode", "prefill": [], "decode": [1024] * 8, "graph_s": decode / 0.8, "eager_s": decode},
        {"name": "m", "kind": "mixed", "prefill": [[64, 0]], "decode": [100], "eager_s": 1.0},  # capture failed
    ]
    report = compare_measured_steps(_document(steps), model, "graph")
    assert report["summary"]["all"]["n"] == 2 and report["summary"]["all"]["skipped"] == 1
    assert report["summary"]["all"]["mape"] == pytest.approx((20.0 + 20.0) / 2)
    assert report["summary"]["prefill"]["bias"] == pytest.approx(-20.0)
    assert report["steps"][1]["predicted_s"] == pytest.approx(decode)
    eager = compare_measured_steps(_document(steps[:2]), model, "eager")
    assert eager["summary"]["all"]["mape"] == pytest.approx(0.0, abs=1e-9)


def test_validate_steps_cli(tmp_path):
    model = AnalyticStepModel(tp=2)
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(_document([{"name": "p", "kind": "prefill", "prefill": [[128, 0]], "decode": [],
                                           "graph_s": model.step_seconds([(128, 0)], []) * 2}])))
    runner = CliRunner()
    result = runner.invoke(cli, ["validate-steps", str(path), "--analytic", "--output", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["summary"]["all"]["mape"] == pytest.approx(50.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something else"}))
    refused = runner.invoke(cli, ["validate-steps", str(bad), "--analytic"])
    assert refused.exit_code == 2 and "dooly.measured_steps/1" in refused.output


@pytest.mark.slow
def test_measure_steps_runs_the_tensor_parallel_engine_on_gloo(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "steps.json"
    runner = CliRunner()
    result = runner.invoke(cli, ["measure-steps", str(config), "--tp", "2", "--device", "cpu", "--compositions", "small",
                                 "--samples", "2", "--out", str(out), "--output", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document == json.loads(result.output)
    assert (document["schema"], document["tp"], document["topology"]["label"]) == ("dooly.measured_steps/1", 2, "loopback")
    assert [s["kind"] for s in document["steps"]] == ["prefill", "prefill", "decode", "mixed"]
    for step in document["steps"]:
        assert step["eager_n"] == 2 and 0 < step["eager_p10_s"] <= step["eager_s"] <= step["eager_p90_s"]
        assert "graph_s" not in step  # no CUDA graphs on the CPU
    assert document["steps"][2]["seqs"] == 4 and document["steps"][2]["kv_tokens"] == 4 * 17
    refused = runner.invoke(cli, ["measure-steps", str(config), "--tp", "2", "--device", "cpu", "--compositions", "nope"])
    assert refused.exit_code == 2 and "neither a preset" in refused.output
