"""The event-log contract (``dispatch.log.base``), run against every backend.

:class:`LogContract` holds the tests; a backend joins by subclassing it and defining ``opener``,
a fixture returning a function that opens a log on the backend's storage (called again to reopen
the same storage). :class:`PersistentLogContract` adds what only durable backends promise. This is
eventsourcing's pattern (``eventsourcing/tests/persistence.py``). Backend-specific tests live in
``test_sqlite_log.py`` and ``test_redis_log.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.errors import LogUnavailable, SeqConflict
from dispatch.log import EventLog, MemoryLog, Record, RedisLog, SqliteLog
from tests.contract import MS
from tests.redis_server import RedisServer

Opener = Callable[[], EventLog]
_examples = itertools.count()


def recs(first: int, *payloads: bytes) -> list[Record]:
    return [Record(seq, data) for seq, data in enumerate(payloads, start=first)]


def numbered(first: int, count: int, tag: str = "e") -> list[Record]:
    return [Record(seq, f"{tag}{seq}".encode()) for seq in range(first, first + count)]


async def collect(iterator: AsyncIterator[Record], count: int) -> list[Record]:
    out: list[Record] = []
    async for record in iterator:
        out.append(record)
        if len(out) == count:
            break
    return out


class LogContract:
    """The contract every backend passes. Subclasses define the ``opener`` fixture."""

    @pytest.fixture
    def opener(self) -> Opener:
        raise NotImplementedError

    @pytest.fixture
    async def log(self, opener: Opener) -> AsyncIterator[EventLog]:
        log = opener()
        yield log
        await log.close()

    # -- append, read, last_seq ---------------------------------------------------------------

    async def test_empty_town(self, log: EventLog) -> None:
        assert await log.last_seq("nowhere") == 0
        assert await log.read("nowhere") == []
        assert await log.read("nowhere", after=5, limit=3) == []

    async def test_append_then_read(self, log: EventLog) -> None:
        assert await log.append("t", recs(1, b"a", b"b")) == [1, 2]
        assert await log.append("t", recs(3, b"c")) == [3]
        assert await log.read("t") == recs(1, b"a", b"b", b"c")
        assert await log.last_seq("t") == 3
        records = await log.read("t")
        assert all(type(r.data) is bytes for r in records)

    async def test_read_after_and_limit(self, log: EventLog) -> None:
        await log.append("t", numbered(1, 10))
        assert await log.read("t", after=7) == numbered(8, 3)
        assert await log.read("t", after=2, limit=3) == numbered(3, 3)
        assert await log.read("t", limit=0) == []
        assert await log.read("t", after=8, limit=100) == numbered(9, 2)
        assert await log.read("t", after=10) == []
        assert await log.read("t", after=50) == []

    async def test_negative_after_or_limit_is_a_programming_error(self, log: EventLog) -> None:
        with pytest.raises(ValueError):
            await log.read("t", after=-1)
        with pytest.raises(ValueError):
            await log.read("t", limit=-1)

    async def test_empty_append_writes_nothing(self, log: EventLog) -> None:
        assert await log.append("t", []) == []
        assert await log.last_seq("t") == 0

    async def test_towns_are_independent(self, log: EventLog) -> None:
        await log.append("a", recs(1, b"a1", b"a2"))
        await log.append("b", recs(1, b"b1"))
        await log.append("a", recs(3, b"a3"))
        assert await log.read("a") == recs(1, b"a1", b"a2", b"a3")
        assert await log.read("b") == recs(1, b"b1")
        assert (await log.last_seq("a"), await log.last_seq("b")) == (3, 1)

    async def test_town_names_are_opaque(self, log: EventLog) -> None:
        towns = ["T0", "Ünter-Dorf 7", "a{b}c", "x}:events", "with:colons:", "🚒"]
        for i, town in enumerate(towns):
            await log.append(town, recs(1, town.encode(), bytes([i])))
        for i, town in enumerate(towns):
            assert await log.read(town) == recs(1, town.encode(), bytes([i]))

    async def test_payloads_are_opaque_bytes(self, log: EventLog) -> None:
        payloads = [b"", bytes(range(256)), b"\x00" * 10, b"\r\n-ERR\r\n", "ü".encode()]
        await log.append("t", recs(1, *payloads))
        assert await log.read("t") == recs(1, *payloads)

    async def test_large_payloads(self, log: EventLog) -> None:
        rng = random.Random(7)
        big = [rng.randbytes(1 << 20), rng.randbytes(4 << 20), rng.randbytes(100)]
        await log.append("t", recs(1, *big[:2]))
        await log.append("t", recs(3, big[2]))
        assert await log.read("t") == recs(1, *big)
        assert await log.read("t", after=1, limit=1) == recs(2, big[1])

    async def test_big_batch(self, log: EventLog) -> None:
        batch = numbered(1, 5000)
        assert await log.append("t", batch) == list(range(1, 5001))
        assert await log.read("t") == batch
        assert await log.last_seq("t") == 5000

    # -- the sequence is gapless and checked ----------------------------------------------------

    @pytest.mark.parametrize("first", [0, 2, -1, 100])
    async def test_first_append_must_start_at_one(self, log: EventLog, first: int) -> None:
        with pytest.raises(SeqConflict):
            await log.append("t", numbered(first, 2))
        assert await log.last_seq("t") == 0
        assert await log.read("t") == []

    @pytest.mark.parametrize("first", [1, 3, 4, 6])
    async def test_append_must_continue(self, log: EventLog, first: int) -> None:
        await log.append("t", numbered(1, 4))
        with pytest.raises(SeqConflict):
            await log.append("t", numbered(first, 1, tag="x"))
        assert await log.read("t") == numbered(1, 4)
        assert await log.last_seq("t") == 4

    @pytest.mark.parametrize(
        "seqs", [[1, 3], [1, 2, 2], [1, 2, 4, 5], [2, 1], [1, 1], [1, 2, 3, 3, 4]]
    )
    async def test_gap_inside_batch_writes_nothing(self, log: EventLog, seqs: list[int]) -> None:
        with pytest.raises(SeqConflict):
            await log.append("t", [Record(s, b"x") for s in seqs])
        assert await log.last_seq("t") == 0
        assert await log.read("t") == []
        # the town is not poisoned
        assert await log.append("t", numbered(1, 1)) == [1]

    async def test_gap_inside_batch_after_stored(self, log: EventLog) -> None:
        await log.append("t", numbered(1, 3))
        with pytest.raises(SeqConflict):
            await log.append("t", [Record(4, b"x"), Record(5, b"x"), Record(7, b"x")])
        assert await log.read("t") == numbered(1, 3)

    # -- concurrency ------------------------------------------------------------------------

    async def test_concurrent_appends_to_many_towns(self, log: EventLog) -> None:
        towns = [f"town-{i}" for i in range(24)]
        rng = random.Random(1)
        plans = {t: [rng.randint(1, 3) for _ in range(25)] for t in towns}

        async def writer(town: str) -> None:
            seq = 1
            for size in plans[town]:
                batch = numbered(seq, size, tag=town)
                assert await log.append(town, batch) == [r.seq for r in batch]
                seq += size

        async with asyncio.timeout(20_000 * MS):
            await asyncio.gather(*(writer(t) for t in towns))
        for town in towns:
            total = sum(plans[town])
            assert await log.last_seq(town) == total
            assert await log.read(town) == numbered(1, total, tag=town)

    async def test_pipelined_appends_to_one_town_keep_their_order(self, log: EventLog) -> None:
        tasks = [asyncio.create_task(log.append("t", numbered(s, 1))) for s in range(1, 51)]
        assert await asyncio.gather(*tasks) == [[s] for s in range(1, 51)]
        assert await log.read("t") == numbered(1, 50)

    async def test_racing_writers_never_share_a_seq(self, log: EventLog) -> None:
        won: dict[int, set[int]] = {w: set() for w in range(5)}
        target = 60

        async def writer(w: int) -> None:
            while True:
                last = await log.last_seq("t")
                if last >= target:
                    return
                try:
                    await log.append("t", [Record(last + 1, f"w{w}".encode())])
                except SeqConflict:
                    await asyncio.sleep(0)
                else:
                    won[w].add(last + 1)

        async with asyncio.timeout(20_000 * MS):
            await asyncio.gather(*(writer(w) for w in won))
        stored = await log.read("t")
        assert [r.seq for r in stored] == list(range(1, len(stored) + 1))
        assert len(stored) >= target
        all_won = [s for seqs in won.values() for s in seqs]
        assert sorted(all_won) == [r.seq for r in stored]  # every stored seq acked exactly once
        for w, seqs in won.items():
            assert all(stored[s - 1].data == f"w{w}".encode() for s in seqs)

    # -- follow -------------------------------------------------------------------------------

    async def test_follow_yields_stored_then_live(self, log: EventLog) -> None:
        await log.append("t", numbered(1, 5))
        follower = asyncio.create_task(collect(log.follow("t", 0), 45))

        async def produce() -> None:
            seq = 6
            for size in [1, 3, 1, 10, 2, 1, 5, 4, 1, 12]:
                await log.append("t", numbered(seq, size))
                seq += size
                await asyncio.sleep(2 * MS)

        async with asyncio.timeout(10_000 * MS):
            await produce()
            assert await follower == numbered(1, 45)

    async def test_follow_from_the_middle(self, log: EventLog) -> None:
        await log.append("t", numbered(1, 10))
        async with asyncio.timeout(5000 * MS):
            assert await collect(log.follow("t", 7), 3) == numbered(8, 3)

    async def test_follow_an_empty_town(self, log: EventLog) -> None:
        follower = asyncio.create_task(collect(log.follow("new", 0), 3))
        await asyncio.sleep(20 * MS)
        assert not follower.done()
        await log.append("new", numbered(1, 3))
        async with asyncio.timeout(5000 * MS):
            assert await follower == numbered(1, 3)

    async def test_follow_waits_beyond_the_end(self, log: EventLog) -> None:
        await log.append("t", numbered(1, 2))
        follower = asyncio.create_task(collect(log.follow("t", 2), 2))
        await asyncio.sleep(20 * MS)
        assert not follower.done()
        await log.append("t", numbered(3, 2))
        async with asyncio.timeout(5000 * MS):
            assert await follower == numbered(3, 2)

    async def test_follow_sees_only_its_town(self, log: EventLog) -> None:
        follower = asyncio.create_task(collect(log.follow("a", 0), 2))
        await log.append("b", numbered(1, 3, tag="b"))
        await log.append("a", numbered(1, 2, tag="a"))
        async with asyncio.timeout(5000 * MS):
            assert await follower == numbered(1, 2, tag="a")

    async def test_many_followers_during_concurrent_appends(self, log: EventLog) -> None:
        total = 200
        followers = [
            asyncio.create_task(collect(log.follow("t", after), total - after))
            for after in (0, 0, 3, 50)
        ]

        async def produce() -> None:
            seq = 1
            while seq <= total:
                size = min(1 + seq % 7, total - seq + 1)
                await log.append("t", numbered(seq, size))
                seq += size
                if seq % 3 == 0:
                    await asyncio.sleep(0)

        async with asyncio.timeout(20_000 * MS):
            await produce()
            results = await asyncio.gather(*followers)
        assert results == [numbered(after + 1, total - after) for after in (0, 0, 3, 50)]

    async def test_slow_follower_misses_nothing(self, log: EventLog) -> None:
        got: list[Record] = []

        async def slow() -> None:
            async for record in log.follow("t", 0):
                got.append(record)
                if len(got) % 50 == 0:
                    await asyncio.sleep(5 * MS)
                if len(got) == 3000:
                    return

        task = asyncio.create_task(slow())
        for first in range(1, 3001, 30):
            await log.append("t", numbered(first, 30))
        async with asyncio.timeout(20_000 * MS):
            await task
        assert got == numbered(1, 3000)

    async def test_follow_ends_when_the_log_closes(self, opener: Opener) -> None:
        log = opener()
        await log.append("t", numbered(1, 2))
        got: list[Record] = []
        caught_up = asyncio.Event()

        async def follow() -> None:
            async for record in log.follow("t", 0):
                got.append(record)
                if len(got) == 2:
                    caught_up.set()

        task = asyncio.create_task(follow())
        async with asyncio.timeout(5000 * MS):
            await caught_up.wait()
        await asyncio.sleep(20 * MS)  # now waiting for more
        await log.close()
        async with asyncio.timeout(5000 * MS):
            await task
        assert got == numbered(1, 2)

    # -- lifecycle ----------------------------------------------------------------------------

    async def test_ping(self, log: EventLog) -> None:
        await log.ping()

    async def test_closed_log_is_unavailable(self, opener: Opener) -> None:
        log = opener()
        await log.append("t", numbered(1, 1))
        await log.close()
        await log.close()  # idempotent
        with pytest.raises(LogUnavailable):
            await log.append("t", numbered(2, 1))
        with pytest.raises(LogUnavailable):
            await log.read("t")
        with pytest.raises(LogUnavailable):
            await log.ping()


class PersistentLogContract(LogContract):
    """What a durable backend adds: records and seqs survive close and reopen."""

    async def test_reopen_keeps_records_and_seqs(self, opener: Opener) -> None:
        log = opener()
        await log.append("a", numbered(1, 3, tag="a"))
        await log.append("b", recs(1, b"\x00big" * 100_000))
        await log.close()

        log = opener()
        try:
            assert await log.last_seq("a") == 3
            assert await log.read("a") == numbered(1, 3, tag="a")
            assert await log.read("b") == recs(1, b"\x00big" * 100_000)
            with pytest.raises(SeqConflict):
                await log.append("a", numbered(3, 1))
            assert await log.append("a", numbered(4, 1, tag="a")) == [4]
        finally:
            await log.close()
        log = opener()
        try:
            assert await log.read("a") == numbered(1, 4, tag="a")
        finally:
            await log.close()

    async def test_close_lets_pending_appends_finish(self, opener: Opener) -> None:
        log = opener()
        tasks = [
            asyncio.create_task(log.append(f"t{i}", numbered(1, 3, tag=f"t{i}"))) for i in range(20)
        ]
        await asyncio.sleep(0)  # the appends are under way
        await log.close()
        assert await asyncio.gather(*tasks) == [[1, 2, 3]] * 20
        log = opener()
        try:
            for i in range(20):
                assert await log.read(f"t{i}") == numbered(1, 3, tag=f"t{i}")
        finally:
            await log.close()


class TestMemoryLog(LogContract):
    @pytest.fixture
    def opener(self) -> Opener:
        return MemoryLog


class TestSqliteLog(PersistentLogContract):
    @pytest.fixture
    def opener(self, tmp_path: Path) -> Opener:
        return lambda: SqliteLog(tmp_path / "log.db")


class TestSqliteLogPerCommit(PersistentLogContract):
    @pytest.fixture
    def opener(self, tmp_path: Path) -> Opener:
        return lambda: SqliteLog(tmp_path / "log.db", per_commit=True)


class TestRedisLog(PersistentLogContract):
    @pytest.fixture
    def opener(self, redis_url: str) -> Opener:
        return lambda: RedisLog.from_url(redis_url, block_ms=200)


# -- all backends agree, on random operations --------------------------------------------------

_op = st.tuples(st.sampled_from("abc"), st.integers(-2, 2), st.integers(0, 4), st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=25))
async def test_backends_agree(
    ops: list[tuple[str, int, int, bool]], redis_server: RedisServer
) -> None:
    """Random appends (some off by a few seqs, some with a gap inside) give the same outcomes."""
    prefix = f"x{next(_examples)}-"
    with tempfile.TemporaryDirectory() as folder:
        logs: list[EventLog] = [
            MemoryLog(),
            SqliteLog(Path(folder) / "log.db"),
            RedisLog.from_url(redis_server.url),
        ]
        try:
            last = {town: 0 for town in "abc"}
            for town, delta, size, gap in ops:
                first = last[town] + 1 + delta
                seqs = list(range(first, first + size))
                if gap and size > 1:
                    seqs[-1] += 1
                batch = [Record(s, f"{town}{s}".encode()) for s in seqs]
                outcomes: list[object] = []
                for log in logs:
                    try:
                        outcomes.append(await log.append(prefix + town, batch))
                    except SeqConflict as exc:
                        outcomes.append(type(exc))
                assert outcomes == [outcomes[0]] * len(logs)
                if outcomes[0] is not SeqConflict:
                    last[town] += size
            for town in "abc":
                reads = [await log.read(prefix + town) for log in logs]
                assert reads == [numbered(1, last[town], tag=town)] * len(logs)
                assert [await log.last_seq(prefix + town) for log in logs] == [last[town]] * 3
        finally:
            for log in logs:
                await log.close()
