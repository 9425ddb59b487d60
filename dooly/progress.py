"""Progress of a long command where no terminal shows a bar: a log line at a steady interval.

A profiling pod's stdout is a log, not a terminal, so a progress bar there is either invisible or a
flood of carriage returns. Instead `ProgressLog` logs one line every `interval_s` seconds (and at
the end): points done of the total, device-seconds spent measuring, and the ETA at the current rate.
The interval comes from --progress-interval or $DOOLY_PROGRESS_INTERVAL_S.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from dooly.errors import DoolyError

logger = logging.getLogger("dooly.progress")
# Progress is what a pod's log is read for: shown at the CLI's default level (warnings) too, as INFO.
logger.setLevel(logging.INFO)

DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "DOOLY_PROGRESS_INTERVAL_S"
SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 3600


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    """The logging interval from $DOOLY_PROGRESS_INTERVAL_S; a bad value is one error line."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise DoolyError(f"${INTERVAL_ENV} must be a number of seconds > 0, got {text!r}")
    return value


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h14m: short enough for a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < SECONDS_PER_MINUTE:
        return f"{seconds}s"
    if seconds < SECONDS_PER_HOUR:
        return f"{seconds // SECONDS_PER_MINUTE}m{seconds % SECONDS_PER_MINUTE:02d}s"
    return f"{seconds // SECONDS_PER_HOUR}h{seconds % SECONDS_PER_HOUR // SECONDS_PER_MINUTE:02d}m"


class ProgressLog:
    """A progress callback `(units done now, device-seconds spent now)` that logs every interval.
    Profiling counts points and the device time they took; other work (a benchmark's requests)
    counts its own unit and no device time (`device_seconds=False`)."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "profiling",
        unit: str = "points",
        device_seconds: bool = True,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.shows_device_seconds = device_seconds
        self.interval_s = interval_s
        self.done = 0
        self.device_seconds = 0.0
        self._clock = clock
        self._started = clock()
        self._last_logged = self._started
        self._last_line = ""

    def __call__(self, points: int, device_seconds: float = 0.0) -> None:
        self.done += points
        self.device_seconds += device_seconds
        now = self._clock()
        if now - self._last_logged >= self.interval_s:
            self._last_logged = now
            self._log(self.line(now))

    def finish(self) -> None:
        """The closing line, so a log always ends with the final count (not twice where the last
        interval's line already said it)."""
        line = self.line(self._clock())
        if line != self._last_line:
            self._log(line)

    def _log(self, line: str) -> None:
        self._last_line = line
        logger.info(line)

    def line(self, now: float) -> str:
        """`profiling 120/480 points (25%), 38.2 device-s, elapsed 1m02s, ETA 3m06s`."""
        elapsed = now - self._started
        share = self.done / self.total if self.total else 1.0
        remaining = self.total - self.done
        if self.done and remaining > 0:
            eta = format_duration(elapsed / self.done * remaining)
        else:
            eta = "0s" if remaining <= 0 else "unknown"
        spent = f"{self.device_seconds:.1f} device-s, " if self.shows_device_seconds else ""
        return (
            f"{self.label} {self.done}/{self.total} {self.unit} ({share:.0%}), "
            f"{spent}elapsed {format_duration(elapsed)}, ETA {eta}"
        )
