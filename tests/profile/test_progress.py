"""The progress line a profiling pod logs without a terminal: steady interval, counts, device time, ETA."""

from __future__ import annotations

import logging

import pytest

from dooly.errors import DoolyError
from dooly.progress import INTERVAL_ENV, ProgressLog, format_duration, interval_from_env

INTERVAL_S = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_with_done_total_device_seconds_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="dooly.progress")
    clock = FakeClock()
    progress = ProgressLog(100, interval_s=INTERVAL_S, clock=clock)
    for _ in range(25):
        clock.now += 0.2
        progress(1, 0.5)
    assert caplog.records == [], "5 s in: nothing yet"
    for _ in range(25):
        clock.now += 0.2
        progress(1, 0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "profiling 50/100 points (50%), 25.0 device-s, elapsed 10s, ETA 10s"
    ]
    progress(0, 1.0)  # a refinement point: time, no planned point
    progress.finish()
    assert caplog.records[-1].getMessage() == "profiling 50/100 points (50%), 26.0 device-s, elapsed 10s, ETA 10s"


def test_nothing_done_yet_has_no_eta_and_everything_done_has_none_left():
    clock = FakeClock()
    assert ProgressLog(4, clock=clock).line(clock.now + 3).endswith("ETA unknown")
    done = ProgressLog(0, clock=clock)
    assert done.line(clock.now) == "profiling 0/0 points (100%), 0.0 device-s, elapsed 0s, ETA 0s"


def test_a_benchmark_counts_its_requests_and_no_device_time(caplog):
    caplog.set_level(logging.INFO, logger="dooly.progress")
    clock = FakeClock()
    progress = ProgressLog(16, label="recorded pass", unit="requests", device_seconds=False, interval_s=INTERVAL_S,
                           clock=clock)
    clock.now += 30
    progress(4)
    clock.now += 90
    progress(12)
    progress.finish()  # the last interval's line already has the final count: not logged twice
    assert [r.getMessage() for r in caplog.records] == [
        "recorded pass 4/16 requests (25%), elapsed 30s, ETA 1m30s",
        "recorded pass 16/16 requests (100%), elapsed 2m00s, ETA 0s",
    ]


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (185, "3m05s"), (2 * 3600 + 14 * 60, "2h14m")])
def test_durations_are_short(seconds, text):
    assert format_duration(seconds) == text


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_from_env() == 2.5
    monkeypatch.setenv(INTERVAL_ENV, "often")
    with pytest.raises(DoolyError, match=INTERVAL_ENV):
        interval_from_env()
