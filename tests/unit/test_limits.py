"""The per-connection rate limit and the flood rule (PROTOCOL.md "Errors": 4429)."""

from __future__ import annotations

from dispatch.server.limits import TokenBucket


def send(bucket: TokenBucket, start: float, seconds: float, per_second: float) -> float:
    """Send at a steady rate; returns when the bucket first said flooding (or -1)."""
    n = int(seconds * per_second)
    for i in range(n):
        now = start + i / per_second
        if not bucket.take(now) and bucket.flooding(now):
            return now
    return -1.0


def test_a_burst_passes_then_messages_are_refused() -> None:
    b = TokenBucket(rate=20, burst=100, flood_after=10, now=0.0)
    assert all(b.take(0.0) for _ in range(100))
    assert not b.take(0.0)
    assert b.take(0.05)  # one token back after 1/20 s


def test_a_steady_flood_is_flooding_after_flood_after_although_some_messages_pass() -> None:
    b = TokenBucket(rate=20, burst=100, flood_after=10, now=0.0)
    at = send(b, 0.0, 30, per_second=100)
    # the burst lasts 100 / (100 - 20) = 1.25 s, then 10 s over the limit
    assert 11.0 < at < 11.6


def test_sending_at_the_limit_never_floods() -> None:
    b = TokenBucket(rate=20, burst=100, flood_after=10, now=0.0)
    assert send(b, 0.0, 60, per_second=19.9) == -1.0


def test_a_calm_second_forgives_an_earlier_excess() -> None:
    b = TokenBucket(rate=20, burst=100, flood_after=10, now=0.0)
    t = 0.0
    for _ in range(5):  # bursts of 8 s over the limit, each followed by a calm second
        assert send(b, t, 8, per_second=100) == -1.0
        t += 8
        t += 6.0  # quiet: refills the burst
    assert not b.flooding(t)
