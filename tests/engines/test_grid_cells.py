"""device/grid_cells.sh's campaign form: `@FILE:PART[,PART]` runs the file's groups of those parts in
the file's order, and a missing file or part is one `error:` line and exit 2 before anything runs.
The device's tools are stand-ins on PATH (python3 logs its arguments; nvidia-smi and the wheels'
install are not needed), so the script's own logic runs as it does on the device."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAMPAIGN = ROOT / "device" / "campaigns" / "engine_paths_http.txt"
DEADLINE_S = "600"
MODELS = ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B")
PATHS = ("async", "default", "eager", "graphs")
ROUNDS = ("h1", "p1", "h2")


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run(tmp_path: Path, *groups: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the script in a scratch copy of device/ with stand-in tools; the groups device_bench got."""
    work = tmp_path / "repo"
    (work / "device").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "device" / "grid_cells.sh", work / "device")
    shutil.copytree(ROOT / "device" / "campaigns", work / "device" / "campaigns", dirs_exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    _stub(bin_dir, "python3", f'echo "$@" >> {calls}')
    _stub(bin_dir, "nvidia-smi", "echo 'stand-in GPU, 0, 0 MiB, 0 MHz'")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", "device/grid_cells.sh", DEADLINE_S, *groups], cwd=work, env=env,
                            capture_output=True, text=True, check=False)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, [line for line in lines if line.startswith("device/device_bench.py")]


def _group(call: str) -> tuple[str, str, str, str]:
    """(model, backend, variants, client) of one device_bench.py call."""
    args = call.split()
    value = {flag: args[args.index(flag) + 1] for flag in ("--models", "--backends", "--variants", "--client")}
    return value["--models"], value["--backends"], value["--variants"], value["--client"]


def test_the_campaign_covers_every_model_and_path_with_two_http_runs_around_a_pair() -> None:
    rows = [line.split() for line in CAMPAIGN.read_text().splitlines() if line and not line.startswith("#")]
    parts = {row[0] for row in rows}
    assert parts == {f"{m.split('-')[-1]}.{p}" for m in MODELS for p in PATHS}
    for part in parts:
        assert [row[1].split(":")[0] for row in rows if row[0] == part] == list(ROUNDS), part


def test_parts_expand_to_their_groups_in_the_files_order(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, "@device/campaigns/engine_paths_http.txt:3B.default,1B.async",
                         "r9:meta-llama/Llama-3.2-1B:paged|sdpa:graphs:light")
    assert result.returncode == 0, result.stderr
    assert [_group(c) for c in calls] == [
        ("meta-llama/Llama-3.2-1B", "paged|sdpa", "async", "http"),
        ("meta-llama/Llama-3.2-1B", "paged|sdpa", "async", "inprocess"),
        ("meta-llama/Llama-3.2-1B", "paged|sdpa", "async", "http"),
        ("meta-llama/Llama-3.2-3B", "paged|sdpa", "default", "http"),
        ("meta-llama/Llama-3.2-3B", "paged|sdpa", "default", "inprocess"),
        ("meta-llama/Llama-3.2-3B", "paged|sdpa", "default", "http"),
        ("meta-llama/Llama-3.2-1B", "paged|sdpa", "graphs", "inprocess"),
    ]


def test_a_missing_file_or_part_is_one_error_and_nothing_runs(tmp_path: Path) -> None:
    for arg, cause in (("@device/campaigns/nope.txt:1B.async", "no such campaign file"),
                       ("@device/campaigns/engine_paths_http.txt:70B.async", "no group of part(s) 70B.async")):
        result, calls = _run(tmp_path, arg)
        assert result.returncode == 2 and calls == []
        assert result.stderr.strip().startswith("error:") and cause in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
