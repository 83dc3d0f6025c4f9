"""Per-connection rate limiting: a token bucket, plus the flood rule that closes a connection."""

from __future__ import annotations


class TokenBucket:
    """``rate`` messages a second sustained, bursts of ``burst``.

    ``take(now)`` is True when the message may pass. ``flooding(now)`` is True once the client
    has been over the limit continuously for ``flood_after`` seconds (close it with 4429).
    """

    __slots__ = ("burst", "flood_after", "over_since", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, flood_after: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.flood_after = flood_after
        self.tokens = burst
        self.stamp = now
        self.over_since: float | None = None

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.over_since = None
            return True
        if self.over_since is None:
            self.over_since = now
        return False

    def flooding(self, now: float) -> bool:
        return self.over_since is not None and now - self.over_since >= self.flood_after
