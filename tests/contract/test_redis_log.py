"""What only the Redis backend promises: fencing, cross-process follow, surviving Redis restarts.

Every test runs against a real ``redis-server`` with AOF and ``appendfsync always``; the ones that
stop or kill it get a private server (``private_redis``).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator

import pytest
import redis
from redis.crc import key_slot

from dispatch.cluster.lease import Lease
from dispatch.errors import Fenced, LogLost, LogUnavailable, SeqConflict
from dispatch.log import Record, RedisLog
from dispatch.log.redis import connect, town_key
from tests.contract import MS
from tests.redis_server import RedisServer


def numbered(first: int, count: int, tag: str = "e") -> list[Record]:
    return [Record(seq, f"{tag}{seq}".encode()) for seq in range(first, first + count)]


async def collect(iterator: AsyncIterator[Record], count: int) -> list[Record]:
    out: list[Record] = []
    async for record in iterator:
        out.append(record)
        if len(out) == count:
            break
    return out


@pytest.fixture
async def log(redis_url: str) -> AsyncIterator[RedisLog]:
    log = RedisLog.from_url(redis_url, block_ms=200)
    yield log
    await log.close()


@pytest.fixture
async def lease(redis_url: str) -> AsyncIterator[Lease]:
    client = connect(redis_url)
    yield Lease(client)
    await client.aclose()


async def test_keys_are_hash_tagged_by_town(log: RedisLog, redis_url: str, lease: Lease) -> None:
    await lease.acquire("T7", "me", 10_000)
    await log.append("T7", numbered(1, 2))
    with redis.Redis.from_url(redis_url) as client:
        keys = sorted(k.decode() for k in client.keys("dispatch:*"))
        entries = client.xrange("dispatch:{T7}:events")
    assert keys == ["dispatch:{T7}:epoch", "dispatch:{T7}:events", "dispatch:{T7}:owner"]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert entries == [(b"1-0", {b"d": b"e1"}), (b"2-0", {b"d": b"e2"})]
    assert town_key("a{b}", "events") == "dispatch:{a{b}}:events"


# -- fencing -----------------------------------------------------------------------------------


async def test_a_stale_epoch_is_fenced_and_writes_nothing(redis_url: str, lease: Lease) -> None:
    old = RedisLog.from_url(redis_url)
    new = RedisLog.from_url(redis_url)
    try:
        epoch_a = await lease.acquire("t", "A", int(500 * MS * 1000))
        assert epoch_a == 1
        await old.append("t", numbered(1, 2, "a"), epoch=epoch_a)
        assert await lease.acquire("t", "B", 10_000) is None  # A still holds it

        await asyncio.sleep(600 * MS)  # A is paused past its TTL
        assert await lease.owner("t") is None
        epoch_b = await lease.acquire("t", "B", 10_000)
        assert epoch_b == 2

        with pytest.raises(Fenced, match="epoch 1 is stale"):
            await old.append("t", numbered(3, 1, "a"), epoch=epoch_a)
        with pytest.raises(Fenced):  # fencing is checked before the seq
            await old.append("t", numbered(9, 1, "a"), epoch=epoch_a)
        assert await new.read("t") == numbered(1, 2, "a")
        assert await new.append("t", numbered(3, 1, "b"), epoch=epoch_b) == [3]
        assert await old.read("t") == [*numbered(1, 2, "a"), *numbered(3, 1, "b")]
    finally:
        await old.close()
        await new.close()


async def test_racing_owners_only_the_current_epoch_lands(redis_url: str, lease: Lease) -> None:
    old = RedisLog.from_url(redis_url)
    new = RedisLog.from_url(redis_url)
    try:
        stale = await lease.acquire("t", "A", 50)
        await asyncio.sleep(100 * MS)
        current = await lease.acquire("t", "B", 10_000)
        assert stale is not None and current is not None

        async def write(log: RedisLog, epoch: int, tag: str) -> list[str]:
            outcomes = []
            for _ in range(30):
                last = await log.last_seq("t")
                try:
                    await log.append("t", numbered(last + 1, 1, tag), epoch=epoch)
                    outcomes.append("ok")
                except Fenced:
                    outcomes.append("fenced")
                except SeqConflict:
                    outcomes.append("conflict")
            return outcomes

        a, b = await asyncio.gather(write(old, stale, "a"), write(new, current, "b"))
        assert set(a) == {"fenced"}
        assert "fenced" not in b
        assert {r.data[:1] for r in await new.read("t")} == {b"b"}
    finally:
        await old.close()
        await new.close()


async def test_an_epoch_without_a_lease_is_fenced(log: RedisLog) -> None:
    with pytest.raises(Fenced, match="unset"):
        await log.append("t", numbered(1, 1), epoch=1)
    assert await log.last_seq("t") == 0


async def test_no_epoch_means_unfenced(log: RedisLog, lease: Lease) -> None:
    await lease.acquire("t", "A", 10_000)
    assert await log.append("t", numbered(1, 1)) == [1]


async def test_conflicts_are_checked_in_the_script(log: RedisLog, redis_url: str) -> None:
    await log.append("t", numbered(1, 3))
    other = RedisLog.from_url(redis_url)
    try:
        with pytest.raises(SeqConflict, match="expected 4"):
            await other.append("t", numbered(3, 2))
        assert await other.append("t", numbered(4, 2)) == [4, 5]
    finally:
        await other.close()


# -- following from another process's point of view -------------------------------------------


async def test_follow_sees_appends_from_another_client(log: RedisLog, redis_url: str) -> None:
    writer = RedisLog.from_url(redis_url)
    try:
        await writer.append("t", numbered(1, 2))
        follower = asyncio.create_task(collect(log.follow("t", 0), 12))
        await asyncio.sleep(20 * MS)
        for first in range(3, 13, 2):
            await writer.append("t", numbered(first, 2))
        async with asyncio.timeout(5000 * MS):
            assert await follower == numbered(1, 12)
    finally:
        await writer.close()


# -- Redis going away and coming back ----------------------------------------------------------


async def test_a_stopped_redis_is_unavailable_then_recovers(private_redis: RedisServer) -> None:
    log = RedisLog.from_url(private_redis.url, block_ms=200)
    try:
        await log.append("t", numbered(1, 3))
        private_redis.stop()
        started = time.monotonic()
        with pytest.raises(LogUnavailable):
            await log.append("t", numbered(4, 1))
        with pytest.raises(LogUnavailable):
            await log.read("t")
        with pytest.raises(LogUnavailable):
            await log.last_seq("t")
        with pytest.raises(LogUnavailable):
            await log.ping()
        assert time.monotonic() - started < 2000 * MS  # no hidden retries with backoff

        private_redis.start()  # same folder: the AOF is replayed; the script cache is empty
        await log.ping()
        assert await log.read("t") == numbered(1, 3)
        assert await log.append("t", numbered(4, 1)) == [4]
        assert await log.last_seq("t") == 4
    finally:
        await log.close()


async def test_acked_appends_survive_sigkill_of_redis(private_redis: RedisServer) -> None:
    log = RedisLog.from_url(private_redis.url)
    acked: dict[str, int] = {}
    under_way = asyncio.Event()

    async def writer(town: str) -> None:
        for seq in range(1, 1_000_000):
            await log.append(town, [Record(seq, b"x" * 300)])
            acked[town] = seq
            if len(acked) == 10 and min(acked.values()) >= 5:
                under_way.set()

    try:
        tasks = [asyncio.create_task(writer(f"t{i}")) for i in range(10)]
        async with asyncio.timeout(10_000 * MS):
            await under_way.wait()
        private_redis.kill()  # mid-stream, with appendfsync always
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, LogUnavailable) for o in outcomes), outcomes
        assert len(acked) == 10
        private_redis.start()
        for town, seq in acked.items():
            assert await log.last_seq(town) >= seq
            assert [r.seq for r in await log.read(town)] == list(
                range(1, await log.last_seq(town) + 1)
            )
    finally:
        await log.close()


async def test_follow_fails_when_redis_stops_and_resumes(private_redis: RedisServer) -> None:
    log = RedisLog.from_url(private_redis.url, block_ms=200)
    try:
        await log.append("t", numbered(1, 2))
        seen: list[Record] = []

        async def follow(after: int) -> None:
            async for record in log.follow("t", after):
                seen.append(record)

        task = asyncio.create_task(follow(0))
        await asyncio.sleep(50 * MS)
        private_redis.stop()
        with pytest.raises(LogUnavailable):
            async with asyncio.timeout(5000 * MS):
                await task
        assert seen == numbered(1, 2)
        private_redis.start()
        await log.append("t", numbered(3, 2))
        async with asyncio.timeout(5000 * MS):
            assert await collect(log.follow("t", seen[-1].seq), 2) == numbered(3, 2)
    finally:
        await log.close()


async def test_a_lease_on_a_stopped_redis_is_unavailable(private_redis: RedisServer) -> None:
    client = connect(private_redis.url)
    try:
        lease = Lease(client)
        assert await lease.acquire("t", "A", 1000) == 1
        private_redis.stop()
        with pytest.raises(LogUnavailable):
            await lease.renew("t", "A", 1000)
        private_redis.start()
        assert await lease.epoch("t") == 1  # the epoch is in the AOF too
    finally:
        await client.aclose()


async def test_a_redis_that_comes_back_empty_is_refused_not_reused(
    private_redis: RedisServer,
) -> None:
    """Redis restarted without its data (no AOF, a flush, a lagging replica promoted): the events
    this log had acknowledged are gone. Carrying on would hand their seqs, and the incident ids
    made from them, out a second time; the town is refused instead, and ping says why."""
    log = RedisLog.from_url(private_redis.url, block_ms=200)
    try:
        await log.append("t", numbered(1, 3))
        await log.append("quiet", numbered(1, 1))
        private_redis.kill()
        shutil.rmtree(private_redis.directory / "appendonlydir")
        private_redis.start()
        with pytest.raises(LogUnavailable):  # the connection to the killed server
            await log.ping()
        await log.ping()  # nothing read yet: nothing known to be lost
        with pytest.raises(LogLost, match="seq 3 durable"):
            await log.read("t")
        with pytest.raises(LogLost):
            await log.append("t", numbered(1, 1))  # what a rebuilt writer would try
        with pytest.raises(LogLost):
            await log.append("t", numbered(4, 1))
        with pytest.raises(LogLost, match="appendonly yes"):
            await log.ping()
        with pytest.raises(LogLost):
            await log.last_seq("t")
        with pytest.raises(LogLost):  # a town this log never read since is caught on its append
            await log.append("quiet", numbered(2, 1))
        # the operator restores the data: the towns are served again
        raw = connect(private_redis.url)
        for town, count in (("t", 3), ("quiet", 1)):
            for r in numbered(1, count):
                await raw.xadd(town_key(town, "events"), {"d": r.data}, id=f"{r.seq}-0")
        await raw.aclose()
        assert await log.read("t") == numbered(1, 3)
        assert await log.read("quiet") == numbered(1, 1)
        await log.ping()
        assert await log.append("t", numbered(4, 1)) == [4]
    finally:
        await log.close()


async def test_reads_racing_appends_never_look_like_lost_events(redis_url: str) -> None:
    """A read that Redis answered just before an append landed may come back after that append
    was acknowledged: its shorter stream is no loss."""
    log = RedisLog.from_url(redis_url, block_ms=200)
    town = f"race-{time.monotonic_ns()}"
    done = False

    async def writer() -> None:
        nonlocal done
        for seq in range(1, 301):
            await log.append(town, numbered(seq, 1))
        done = True

    async def reader() -> int:
        reads = 0
        while not done:
            await log.read(town)
            await log.last_seq(town)
            reads += 1
        return reads

    try:
        results = await asyncio.gather(writer(), *(reader() for _ in range(4)))
        assert sum(r for r in results if r) > 50
        await log.ping()
        assert await log.last_seq(town) == 300
    finally:
        await log.close()
