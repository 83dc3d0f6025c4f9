"""The one clock of the shell. The engine never reads it: it gets ``now`` as an argument.

Times are wall-clock epoch seconds, because they go on the wire and into the log as absolute
times. Tests that need to move time use :class:`FakeClock`.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock that only moves when told to (``jump``), like trio's MockClock."""

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def jump(self, seconds: float) -> None:
        self._now += seconds
