"""Time is injected: the app, store and sweeper read it from a Clock, never from `time` directly."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch, UTC."""
        ...


class SystemClock:
    """The host's clock, shifted by `offset_s`: replicas sharing a database follow the
    database's clock (`create_app` keeps the offset), so they judge deadlines alike."""

    def __init__(self, offset_s: float = 0.0) -> None:
        self.offset_s = offset_s

    def now(self) -> float:
        return time.time() + self.offset_s


class ManualClock:
    """A clock that moves only when told to; tests cross deadlines with it instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def rfc3339(epoch: float | None) -> str | None:
    """`2026-11-25T16:40:00.123Z`, or None."""
    if epoch is None:
        return None
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")
