"""Town leases (``dispatch.cluster.lease``) against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dispatch.cluster.lease import Lease
from dispatch.log.redis import connect
from tests.contract import MS


@pytest.fixture
async def lease(redis_url: str) -> AsyncIterator[Lease]:
    client = connect(redis_url)
    yield Lease(client)
    await client.aclose()


async def test_acquire_is_exclusive_and_bumps_the_epoch(lease: Lease) -> None:
    assert await lease.epoch("t") == 0
    assert await lease.acquire("t", "A", 10_000) == 1
    assert await lease.acquire("t", "B", 10_000) is None
    assert await lease.acquire("t", "A", 10_000) is None  # owners renew, they do not re-acquire
    assert await lease.owner("t") == "A"
    assert await lease.epoch("t") == 1
    assert await lease.acquire("other", "B", 10_000) == 1  # towns are independent


async def test_renew_only_by_the_owner(lease: Lease) -> None:
    ttl = int(600 * MS * 1000)
    await lease.acquire("t", "A", ttl)
    assert not await lease.renew("t", "B", 10_000)
    for _ in range(3):
        await asyncio.sleep(250 * MS)
        assert await lease.renew("t", "A", ttl)
    assert await lease.owner("t") == "A"  # 750 ms after a 600 ms lease: kept by renewals


async def test_an_expired_lease_goes_to_the_next_and_fences_the_old(lease: Lease) -> None:
    assert await lease.acquire("t", "A", int(50 * MS * 1000)) == 1
    await asyncio.sleep(120 * MS)
    assert await lease.owner("t") is None
    assert not await lease.renew("t", "A", 10_000)
    assert await lease.acquire("t", "B", 10_000) == 2
    assert not await lease.renew("t", "A", 10_000)
    assert await lease.owner("t") == "B"


async def test_release(lease: Lease) -> None:
    await lease.acquire("t", "A", 10_000)
    assert not await lease.release("t", "B")
    assert await lease.owner("t") == "A"
    assert await lease.release("t", "A")
    assert not await lease.release("t", "A")
    assert await lease.acquire("t", "B", 10_000) == 2


async def test_ttl_must_be_positive(lease: Lease) -> None:
    with pytest.raises(ValueError):
        await lease.acquire("t", "A", 0)
    with pytest.raises(ValueError):
        await lease.renew("t", "A", -5)
