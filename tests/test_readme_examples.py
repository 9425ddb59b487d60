"""The README's worked example against the committed H100 store: the `dooly simulate` and `dooly
plan` answers it prints for a model no store has run are the answers the commands give today.

The README is what a new user reads first, and its numbers had drifted from the store's answer
unnoticed (TTFT mean 8196.9 ms printed, 7988.6 ms answered). The committed store is fitted as the
README says (`dooly merge`, `dooly fit`, about half a minute here) and each command of the example
is run as printed, with the store's path swapped for the fitted copy. Numbers are compared within
a tolerance that passes floating-point noise between machines and fails a drifted answer."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from dooly.cli import cli

# The fitted H100 store is built once a run; its users share a pytest-xdist worker (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("fitted-h100")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The store path the README's commands name (its fit line copies the committed store there).
README_STORE = "/tmp/h100"
SIMULATE = "$ dooly simulate docs/examples/qwen3-8b/config.json"
PLAN = "$ dooly plan docs/examples/qwen3-8b/config.json"
METRICS = ("TTFT", "TPOT", "E2E")
# Relative tolerance on a printed latency: 0.5% passes float noise, fails the drift this guards.
LATENCY_RTOL = 0.005
# The plan's device-seconds are priced from means over thousands of rows: a looser bound.
PLAN_SECONDS_RTOL = 0.05
NUMBER = r"[-+]?\d+(?:\.\d+)?"


def _example(start: str) -> tuple[list[str], list[str]]:
    """The README block's command (continuation lines joined) and the output lines printed under it."""
    lines = README.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    command, i = lines[first].removeprefix("$ "), first
    while command.endswith("\\"):
        i += 1
        command = command[:-1] + " " + lines[i].strip()
    end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
    return shlex.split(command)[1:], lines[i + 1:end]


def _metric_rows(lines: list[str]) -> dict[str, list[float]]:
    return {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines
            if line.split() and line.split()[0] in METRICS}


@pytest.fixture(scope="module")
def fitted_h100(fitted_h100_copy: Path) -> str:
    return str(fitted_h100_copy)


def _run(args: list[str], store: str) -> str:
    result = CliRunner().invoke(cli, [store if a == README_STORE else a for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_readme_simulate_example_is_todays_answer(fitted_h100: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    args, printed = _example(SIMULATE)
    answered = _run(args, fitted_h100).splitlines()
    expected, got = _metric_rows(printed), _metric_rows(answered)
    assert set(expected) == set(METRICS) and set(got) == set(METRICS)
    for metric in METRICS:
        assert got[metric] == pytest.approx(expected[metric], rel=LATENCY_RTOL), metric
    finished = re.compile(rf"requests: (\d+)/(\d+) finished in ({NUMBER}) s")
    printed_run = next(m for m in map(finished.match, printed) if m)
    answered_run = next(m for m in map(finished.match, answered) if m)
    assert answered_run.group(1, 2) == printed_run.group(1, 2)
    assert float(answered_run.group(3)) == pytest.approx(float(printed_run.group(3)), rel=LATENCY_RTOL)
    for prefix in ("steps:", "coverage decode:", "coverage mixed:", "coverage prefill:", "  extrapolated:"):
        assert next(line for line in printed if line.startswith(prefix)) in answered, prefix


def test_the_readme_plan_example_is_todays_answer(fitted_h100: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    args, printed = _example(PLAN)
    first = _run(args, fitted_h100).splitlines()[0]
    counts, seconds = re.compile(r"(.*), ~(" + NUMBER + r") device-seconds to go"), printed[0]
    expected, got = counts.match(seconds), counts.match(first)
    assert expected is not None and got is not None, first
    assert got.group(1) == expected.group(1)
    assert float(got.group(2)) == pytest.approx(float(expected.group(2)), rel=PLAN_SECONDS_RTOL)
