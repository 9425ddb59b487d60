"""Collectives across spawned ranks (gloo on the CPU): environment, timing, profiling, reuse."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from collective_helpers import (
    SLOW_RANK_DELAY_S,
    WORLD,
    collective_op,
    fail_on_rank_one,
    report_environment,
    time_with_slow_rank,
)
from profile_helpers import MODEL_A, SMALL_GRID_ARGS, write_model

from dooly.cli import cli
from dooly.distributed import SAFE_ENV, launch, parse_topo_links
from dooly.errors import DoolyError
from dooly.profile.collectives import COLLECTIVE_KINDS, rank_worker, work_payload
from dooly.profile.grid import Point
from dooly.profile.plan import WorkItem

pytestmark = pytest.mark.slow

TOPO_2_NVLINK = """\
\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tSYS\t0-31\t0\t\tN/A
GPU1\tNV18\t X \tSYS\t0-31\t0\t\tN/A
NIC0\tSYS\tSYS\t X \t\t\t\t

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""
TOPO_4_MIXED = """\
        GPU0    GPU1    GPU2    GPU3    CPU Affinity    NUMA Affinity
GPU0     X      NV12    SYS     SYS     0-15    0
GPU1    NV12     X      SYS     SYS     0-15    0
GPU2    SYS     SYS      X      NV12    16-31   1
GPU3    SYS     SYS     NV12     X      16-31   1
"""


def test_children_see_the_no_multicast_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # a caller's setting must not reach the ranks
    monkeypatch.delenv("NVSHMEM_DISABLE_NVLS", raising=False)
    seen = []
    launch(report_environment, {"dir": str(tmp_path)}, world_size=WORLD, device="cpu", on_message=seen.append)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["env"] for r in ranks] == [SAFE_ENV] * WORLD
    assert len({r["pid"] for r in ranks}) == WORLD  # separate processes
    assert seen == [("rank0", SAFE_ENV)]


def test_a_sample_is_the_slowest_rank(tmp_path):
    launch(time_with_slow_rank, {"dir": str(tmp_path), "samples": 3}, world_size=WORLD, device="cpu",
           on_message=lambda _: None)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert per_rank[0] == per_rank[1]  # both ranks hold the maxima
    assert all(value >= SLOW_RANK_DELAY_S for value in per_rank[0])


def test_a_failing_rank_is_one_error():
    with pytest.raises(DoolyError, match="rank 1 failed: ValueError: rank one refuses"):
        launch(fail_on_rank_one, {}, world_size=WORLD, device="cpu", on_message=lambda _: None)


def test_every_kind_is_measured_on_gloo():
    items = [
        WorkItem(signature=kind, op=collective_op(kind), model_id="m", stack=None,  # type: ignore[arg-type]
                 points=[], missing=[Point(values=(("T", t),)) for t in (1, 8)])
        for kind in COLLECTIVE_KINDS
    ]
    messages = []
    launch(rank_worker, work_payload(items, "cpu", 2), world_size=WORLD, device="cpu", on_message=messages.append)
    points = [m for m in messages if m[0] == "point"]
    done = [m[1] for m in messages if m[0] == "item"]
    assert done == list(COLLECTIVE_KINDS)
    for kind in COLLECTIVE_KINDS:
        measured = {dict(values)["T"]: result for tag, sig, values, result in points if sig == kind}
        assert {1, 8} <= set(measured)
        for result in measured.values():
            assert result["status"] == "ok" and result["n"] == 2
            assert 0 < result["p10_s"] <= result["median_s"] <= result["p90_s"]
            assert result["device_seconds"] > 0


def test_a_collective_traced_for_other_ranks_is_an_error_row():
    item = WorkItem(signature="x", op=collective_op("all_reduce", world=4), model_id="m", stack=None,  # type: ignore[arg-type]
                    points=[], missing=[Point(values=(("T", 2),))])
    messages = []
    launch(rank_worker, work_payload([item], "cpu", 1), world_size=WORLD, device="cpu", on_message=messages.append)
    (point,) = [m for m in messages if m[0] == "point"]
    assert point[3]["status"] == "error" and "traced for 4 ranks" in point[3]["error"]


def test_topology_links_are_read_from_nvidia_smi():
    assert parse_topo_links(TOPO_2_NVLINK, 2) == ["NV18"]
    assert sorted(set(parse_topo_links(TOPO_4_MIXED, 4))) == ["NV12", "SYS"]
    assert parse_topo_links(TOPO_4_MIXED, 2) == ["NV12"]
    assert parse_topo_links(TOPO_2_NVLINK, 3) == []  # a GPU the matrix lacks: no label from it
    assert parse_topo_links("no matrix here", 2) == []


@pytest.fixture(scope="module")
def tp2_store(tmp_path_factory):
    """A tiny model traced with --tp 2, profiled (compute + collectives) into a store."""
    root = tmp_path_factory.mktemp("tp2")
    config = write_model(root, "tiny", MODEL_A)
    trace = root / "tiny.tp2.json"
    runner = CliRunner()
    traced = runner.invoke(cli, ["trace", config, "--tp", "2", "--out", str(trace), "--output", "json"])
    assert traced.exit_code == 0, traced.output
    args = ["profile", str(trace), "--store", str(root / "db"), *SMALL_GRID_ARGS, "--samples", "2", "--output", "json"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, args)
    assert again.exit_code == 0, again.output
    return root, json.loads(first.output), json.loads(again.output), json.loads(trace.read_text())


def test_profile_measures_the_collectives_of_a_tp_trace(tp2_store):
    root, report, _, trace = tp2_store
    db = root / "db"
    comm = [k for k in report["shards"] if "/engine=gloo/backend=loopback/" in k]
    assert comm, report["shards"]
    rows = pq.read_table(db / comm[0]).to_pylist()
    wanted = {c["signature"] for c in trace["collectives"]}
    assert {r["signature"] for r in rows} == wanted
    assert all(json.loads(r["config_dims"])["world_size"] == 2 for r in rows)
    assert all(r["status"] == "ok" and r["latency_median_s"] > 0 for r in rows)
    swept = {op: sorted(r["T"] or r["B"] for r in rows if r["op"] == op) for op in {r["op"] for r in rows}}
    assert swept["collective.all_reduce"][:4] == [1, 2, 3, 4]  # the token ladder
    assert max(swept["collective.all_gather"]) == 4  # sequences up to --max-seqs
    (topology,) = list((db / "topologies").glob("*.json"))
    document = json.loads(topology.read_text())
    assert document["label"] == "loopback" and document["backend"] == "gloo" and document["world_size"] == 2
    assert document["run_id"] == report["run_id"]
    inventory = json.loads((db / "inventories" / trace["model_key"] / "paged~7Csdpa.tp2.json").read_text())
    collectives = {o["op"]: o for o in inventory["operations"] if o["kind"] == "collective"}
    assert collectives["collective.all_reduce"]["count"] == 2 * MODEL_A["num_hidden_layers"]
    assert collectives["collective.all_gather"]["count"] == 1


def test_a_second_profile_reuses_the_collectives(tp2_store):
    root, first, again, _ = tp2_store
    assert first["profiled_signatures"] == first["models"][0]["signatures"]
    assert again["profiled_signatures"] == 0 and again["measured_points"] == 0
    trace = str(root / "tiny.tp2.json")
    here = CliRunner().invoke(cli, ["plan", trace, "--store", str(root / "db"), *SMALL_GRID_ARGS, "--output", "json"])
    assert here.exit_code == 0, here.output
    assert json.loads(here.output)["missing_signatures"] == 0
    # Another platform's interconnect cannot be read from here: its collectives are missing.
    other = CliRunner().invoke(cli, ["plan", trace, "--store", str(root / "db"), *SMALL_GRID_ARGS,
                                     "--platform", first["platform"], "--output", "json"])
    assert other.exit_code == 0, other.output
    collectives = json.loads((root / "tiny.tp2.json").read_text())["collectives"]
    assert json.loads(other.output)["missing_signatures"] == len({c["signature"] for c in collectives})


def test_fitted_step_adds_the_collectives(tp2_store):
    root, report, _, trace = tp2_store
    db = str(root / "db")
    runner = CliRunner()
    for args in (["merge", "--store", db], ["fit", "--store", db, "--folds", "2"]):
        result = runner.invoke(cli, [*args, "--output", "json"])
        assert result.exit_code == 0, result.output
    predicted = runner.invoke(cli, ["predict", "--store", db, "--model", "tiny", "--platform", report["platform"],
                                    "--backend", "paged|sdpa", "--tp", "2", "--prefill", "8:0", "--decode", "16",
                                    "--output", "json"])
    assert predicted.exit_code == 0, predicted.output
    payload = json.loads(predicted.output)
    breakdown = payload["breakdown_seconds"]
    assert breakdown["collective.all_reduce"] > 0 and breakdown["collective.all_gather"] > 0
    assert payload["step_seconds"] == pytest.approx(sum(breakdown.values()))

    from dooly.fit.commands import find_inventory
    from dooly.fit.persist import load_predictor
    from dooly.store.backends import open_store

    store = open_store(db, create=False)
    predictor = load_predictor(store, platform=report["platform"], engine="transformers", backend="paged|sdpa",
                               dtype="bfloat16")
    inventory = find_inventory(store, "tiny", "paged|sdpa", 2)
    compute_only = {**inventory, "operations": [o for o in inventory["operations"] if o["kind"] != "collective"]}
    with_comm = predictor.step_predictor(inventory).step_seconds([(8, 0)], [16])
    without = predictor.step_predictor(compute_only).step_seconds([(8, 0)], [16])
    comm = breakdown["collective.all_reduce"] + breakdown["collective.all_gather"]
    assert with_comm - without == pytest.approx(comm, rel=1e-9)
    # No --tp 4 inventory: the config the profile run stored is traced for it, and the tracer says
    # why it cannot be; a store without that config cannot trace it at all.
    with pytest.raises(DoolyError, match="--tp 4 does not divide num_key_value_heads=2"):
        find_inventory(store, "tiny", "paged|sdpa", 4)
    from dooly.models.registry import ModelSpec, model_key
    from dooly.store.keys import model_config_key

    stored_config = root / "db" / model_config_key(model_key(ModelSpec("tiny", MODEL_A, "test")))
    moved = stored_config.with_name("config.moved")
    stored_config.rename(moved)
    try:
        with pytest.raises(DoolyError, match="no inventory of 'tiny' for --tp 4 .*no config to build it from"):
            find_inventory(store, "tiny", "paged|sdpa", 4)
    finally:
        moved.rename(stored_config)
    simulated = runner.invoke(cli, ["simulate", "tiny", "--store", db, "--platform", report["platform"],
                                    "--backend", "paged|sdpa", "--tp", "2", "--requests", "3", "--rate", "100",
                                    "--prompt-len", "8", "--output-len", "2", "--set", "num_blocks=16",
                                    "--set", "block_size=16", "--no-cpu-overhead", "--output", "json"])
    assert simulated.exit_code == 0, simulated.output
    assert json.loads(simulated.output)["num_finished"] == 3


def test_too_few_gpus_is_exit_2_with_nothing_written(tmp_path, monkeypatch):
    import torch

    config = write_model(tmp_path, "tiny", MODEL_A)
    trace = tmp_path / "tiny.tp2.json"
    runner = CliRunner()
    assert runner.invoke(cli, ["trace", config, "--tp", "2", "--out", str(trace)]).exit_code == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("dooly.profile.run.resolve_platform", lambda requested, device: "NVIDIA-H200")
    monkeypatch.setattr("dooly.profile.provenance._driver_version", lambda: "580")
    db = tmp_path / "db"
    result = runner.invoke(cli, ["profile", str(trace), "--store", str(db), "--device", "cuda", *SMALL_GRID_ARGS])
    assert result.exit_code == 2
    assert "needs 2 GPUs (one per tensor-parallel rank); this process sees 1" in result.output
    assert not list(db.rglob("*.parquet")) and not (db / "inventories").exists()


def test_plan_and_profile_take_tp_for_a_model_as_for_its_tp_trace(tp2_store):
    """`--tp 2` on the config (what a fleet pod with gpus: 2 runs) is the same rank and collectives
    as the `dooly trace --tp 2` file profiled above: nothing is missing."""
    root, first, _, _ = tp2_store
    config = str(root / "tiny.json")
    same = CliRunner().invoke(cli, ["plan", config, "--tp", "2", "--store", str(root / "db"), *SMALL_GRID_ARGS,
                                    "--output", "json"])
    assert same.exit_code == 0, same.output
    summary = json.loads(same.output)
    assert summary["missing_signatures"] == 0 and summary["signatures"] == first["models"][0]["signatures"]
    mismatch = CliRunner().invoke(cli, ["plan", str(root / "tiny.tp2.json"), "--tp", "4", "--store",
                                        str(root / "db"), *SMALL_GRID_ARGS])
    assert mismatch.exit_code == 2 and "is for tp 2" in mismatch.stderr
