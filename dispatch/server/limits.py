"""Per-connection rate limiting: a token bucket, plus the flood rule that closes a connection."""

from __future__ import annotations

CALM_AFTER = 1.0
"""Seconds without a refused message after which a client no longer counts as flooding."""


class TokenBucket:
    """``rate`` messages a second sustained, bursts of ``burst``.

    ``take(now)`` is True when the message may pass. ``flooding(now)`` is True once the client
    has stayed over the limit for ``flood_after`` seconds (close it with 4429). A flood keeps
    refilling the bucket a token at a time, so some of its messages always pass: "over the limit"
    therefore means refused again and again with never :data:`CALM_AFTER` seconds between two
    refusals, not refused without a break.
    """

    __slots__ = ("burst", "flood_after", "over_since", "rate", "refused_at", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, flood_after: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.flood_after = flood_after
        self.tokens = burst
        self.stamp = now
        self.over_since: float | None = None
        self.refused_at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            if self.over_since is not None and now - self.refused_at >= CALM_AFTER:
                self.over_since = None
            return True
        if self.over_since is None or now - self.refused_at >= CALM_AFTER:
            self.over_since = now
        self.refused_at = now
        return False

    def flooding(self, now: float) -> bool:
        return (
            self.over_since is not None
            and now - self.refused_at < CALM_AFTER
            and now - self.over_since >= self.flood_after
        )
