"""Processing-time clocks.

Event time drives attribution windows; a clock drives only processing-time
decisions such as idle timeouts, snapshot cadence and back-off. Code takes a
clock object so that tests and replay can control it.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of processing time in seconds."""

    def time(self) -> float:
        """Return seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Return seconds from an arbitrary start that never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait for ``seconds``."""
        ...


class SystemClock:
    """The machine's clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class ManualClock:
    """A clock that moves only through ``advance``, and ``sleep`` advances it at once."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards: advance({seconds}) was requested")
        self._now += seconds
