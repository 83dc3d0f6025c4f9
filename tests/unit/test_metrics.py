"""The lock-free loop counters expose exactly what prometheus_client's Counter would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from dispatch.server.metrics import LoopCounter


def _samples(text: bytes) -> list[str]:
    return [ln for ln in text.decode().splitlines() if ln and not ln.startswith("#")]


def test_loop_counter_exposes_like_a_counter() -> None:
    mine, ref = CollectorRegistry(), CollectorRegistry()
    a = LoopCounter("x_messages", "Messages", ["channel"], mine)
    b = Counter("x_messages", "Messages", ["channel"], registry=ref)
    for ch, n in (("field", 3), ("screen", 1), ("field", 2.5)):
        a.labels(ch).inc(n)
        b.labels(ch).inc(n)
    want = [s for s in _samples(generate_latest(ref)) if "_created" not in s]
    assert _samples(generate_latest(mine)) == want
    assert 'x_messages_total{channel="field"} 5.5' in want


def test_loop_counter_refuses_wrong_labels_and_duplicate_names() -> None:
    r = CollectorRegistry()
    c = LoopCounter("x_errors", "Errors", ["code"], r)
    with pytest.raises(ValueError, match="takes labels"):
        c.labels("a", "b")
    with pytest.raises(ValueError):
        LoopCounter("x_errors", "Errors", ["code"], r)  # the registry sees the name taken
