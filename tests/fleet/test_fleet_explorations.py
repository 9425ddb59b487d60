"""The fleet file's `explorations:` section: each entry becomes a `dooly explore --report` that the
merge Job runs after `dooly fit`, in a manifest the official schemas accept."""

from __future__ import annotations

import pytest
from fleet_support import SMALL_FLEET, validate_schema
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from dooly.errors import DoolyError
from dooly.explore.commands import explore_command
from dooly.fleet import jobs
from dooly.fleet.spec import FleetSpec

RUN_ID = "20250101-020000"
EXPLORATIONS = """
explorations:
  - name: chat-8b
    models: [meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B]
    slo: {ttft_p90: 0.5, tpot_p90: 0.05}
    backends: [paged|sdpa, paged|eager]
    tp: [1, 2]
    settings: {num_blocks: [512, 1024], use_cuda_graph: false}
    workload: {requests: 200, promptLen: "uniform:128:2048", outputLen: "128", arrival: gamma, cv: 2}
  - name: small
    models: [meta-llama/Llama-3.2-1B]
    slo: {e2e_p99: 4}
"""


def _spec(extra: str) -> FleetSpec:
    return FleetSpec.from_text(SMALL_FLEET + extra, source="fleet.yaml")


def test_explorations_run_after_fit_and_report_to_the_store():
    spec = _spec(EXPLORATIONS)
    merge = jobs.build_merge_job(spec, run_id=RUN_ID)
    pod = merge["spec"]["template"]["spec"]
    # After the calibration: explore prices host overhead from the store's calibrations.
    assert [c["name"] for c in pod["initContainers"]] == ["merge", "fit", "calibrate", "explore-chat-8b"]
    assert [c["name"] for c in pod["containers"]] == ["explore-small"]
    args = pod["initContainers"][3]["args"]
    assert args[:3] == ["explore", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B"]
    assert args[args.index("--store") + 1] == spec.store and "--report" in args
    assert args[args.index("--report-name") + 1] == "chat-8b"
    assert ["--set", "num_blocks=512,1024"] == args[args.index("--set"):args.index("--set") + 2]
    assert ["--tp", "1,2"] == args[args.index("--tp"):args.index("--tp") + 2]
    # The arguments are ones `dooly explore` takes.
    context = explore_command.make_context("explore", list(args[1:]))
    assert context.params["report"] and context.params["report_name"] == "chat-8b"
    versions = [v for v in all_versions() if Version(v) >= Version("1.29")]
    for version in (versions[0], versions[-1]):
        validate_schema(merge, version)


def test_without_explorations_the_merge_job_is_unchanged():
    pod = jobs.build_merge_job(_spec(""), run_id=RUN_ID)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["merge", "fit"]
    assert [c["name"] for c in pod["containers"]] == ["calibrate"]


def test_the_default_fleet_carries_an_example_exploration():
    assert [e.name for e in FleetSpec.load(None).explorations] == ["llama-8b-chat"]


@pytest.mark.parametrize(("entry", "problem"), [
    ("  - {name: x, models: [m], slo: {latency_p90: 1}}", "unknown field"),
    ("  - {name: x, models: [m], slo: {ttft_p90: 0}}", "positive number of seconds"),
    ("  - {name: Bad_Name, models: [m], slo: {ttft_p90: 1}}", "DNS-1123"),
    ("  - {name: x, models: [m], slo: {}}", "at least one objective"),
    ("  - {name: x, models: [m], slo: {ttft_p90: 1}, tp: [0]}", "out of range"),
    ("  - {name: x, models: [m], slo: {ttft_p90: 1}, workload: {rate: 3}}", "unknown field"),
])
def test_bad_explorations_name_the_line(entry, problem):
    with pytest.raises(DoolyError, match=problem) as error:
        _spec("\nexplorations:\n" + entry + "\n")
    assert "fleet.yaml" in str(error.value) and "explorations" in str(error.value)
