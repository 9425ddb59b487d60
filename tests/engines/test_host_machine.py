"""The host record of a ground-truth run (bench.json `host`) and what calibrations keep of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dooly.engines.host_machine import UNKNOWN_CPU, cpu_model, list_probe_seconds
from dooly.sim.calibration_commands import CalibrationRun

ROOT = Path(__file__).resolve().parents[2]
CALIB_RUN = ROOT / "data" / "h100" / "groundtruth" / "Llama-3.2-1B.paged-sdpa.graphs.calib"


def test_the_cpu_model_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) Platinum 8480+"


def test_without_cpuinfo_the_cpu_model_is_still_a_name(tmp_path):
    name = cpu_model(tmp_path / "absent")
    assert isinstance(name, str) and name
    assert name == UNKNOWN_CPU or UNKNOWN_CPU not in name


def test_the_list_probe_grows_with_its_work():
    small = list_probe_seconds(items=10_000, repeats=3)
    large = list_probe_seconds(items=400_000, repeats=3)
    assert 0.0 < small < large


def test_a_calibration_run_carries_its_host_and_an_old_run_none(tmp_path):
    old = CalibrationRun.load(CALIB_RUN)
    assert old.host == {}
    run = tmp_path / CALIB_RUN.name
    shutil.copytree(CALIB_RUN, run)
    bench = json.loads((run / "bench.json").read_text())
    bench["host"] = {"cpu": "Test CPU", "logical_cpus": 4, "python": "3.12.0", "list_probe_items": 1, "list_probe_s": 0.01}
    (run / "bench.json").write_text(json.dumps(bench))
    assert CalibrationRun.load(run).host["cpu"] == "Test CPU"
