"""The Redis backend on a real Redis Cluster: three primaries, AOF with ``appendfsync always``.

Never skipped: the ``redis_cluster`` fixture starts the ``redis-server`` processes and runs
``redis-cli --cluster create`` (``tests/redis_server.py``). What runs here:

* the whole backend contract (:class:`PersistentLogContract`) through ``redis-cluster://``;
* the fencing tests of ``test_redis_log.py`` and the lease tests of ``test_lease.py``, the very
  same functions: this module overrides ``redis_url`` with the cluster's URL and defines the
  ``log`` and ``lease`` fixtures they use;
* what only a cluster brings: a town's keys share one slot, towns spread over the nodes, a stopped
  or killed node takes down only its own towns and they come back with every acked record.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.contract.test_lease as lease_tests
import tests.contract.test_redis_log as redis_tests
from dispatch.cluster.lease import Lease
from dispatch.errors import ConfigError, LogUnavailable, SeqConflict
from dispatch.log import EventLog, MemoryLog, Record, RedisLog, open_log
from dispatch.log.redis import client_from_url, town_key
from tests.contract import MS
from tests.contract.test_log_contract import Opener, PersistentLogContract, collect, numbered
from tests.redis_server import RedisClusterServers, free_port

KINDS = ("events", "epoch", "owner")


# -- fixtures: the cluster in place of the single server --------------------------------------


@pytest.fixture
def redis_url(redis_cluster_url: str) -> str:
    """The tests imported from ``test_redis_log``/``test_lease`` get the cluster."""
    return redis_cluster_url


@pytest.fixture
async def log(redis_url: str) -> AsyncIterator[RedisLog]:
    log = RedisLog.from_url(redis_url, block_ms=200)
    assert log.cluster
    yield log
    await log.close()


@pytest.fixture
async def lease(redis_url: str) -> AsyncIterator[Lease]:
    client = client_from_url(redis_url)
    yield Lease(client)
    await client.aclose()


# -- the contract suite ------------------------------------------------------------------------


class TestRedisClusterLog(PersistentLogContract):
    @pytest.fixture
    def opener(self, redis_cluster_url: str) -> Opener:
        return lambda: RedisLog.from_url(redis_cluster_url, block_ms=200)


# -- fencing and leases: the single-server tests, run on the cluster ---------------------------

test_a_stale_epoch_is_fenced_and_writes_nothing = (
    redis_tests.test_a_stale_epoch_is_fenced_and_writes_nothing
)
test_racing_owners_only_the_current_epoch_lands = (
    redis_tests.test_racing_owners_only_the_current_epoch_lands
)
test_an_epoch_without_a_lease_is_fenced = redis_tests.test_an_epoch_without_a_lease_is_fenced
test_no_epoch_means_unfenced = redis_tests.test_no_epoch_means_unfenced
test_conflicts_are_checked_in_the_script = redis_tests.test_conflicts_are_checked_in_the_script
test_follow_sees_appends_from_another_client = (
    redis_tests.test_follow_sees_appends_from_another_client
)
test_lease_acquire_is_exclusive_and_bumps_the_epoch = (
    lease_tests.test_acquire_is_exclusive_and_bumps_the_epoch
)
test_lease_renew_only_by_the_owner = lease_tests.test_renew_only_by_the_owner
test_lease_expired_goes_to_the_next_and_fences_the_old = (
    lease_tests.test_an_expired_lease_goes_to_the_next_and_fences_the_old
)
test_lease_release = lease_tests.test_release
test_lease_ttl_must_be_positive = lease_tests.test_ttl_must_be_positive


# -- helpers: where the cluster keeps things -------------------------------------------------------


def slot_map(cluster: RedisClusterServers) -> dict[int, int]:
    """Slot -> client port of the primary serving it, from ``CLUSTER NODES`` (every node agrees)."""
    maps = []
    for port in cluster.ports:
        with redis.Redis(port=port) as client:
            text = client.execute_command("CLUSTER", "NODES").decode()
        owners: dict[int, int] = {}
        for line in text.splitlines():
            fields = line.split()
            node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for spec in fields[8:]:
                if spec.startswith("["):  # a slot being migrated
                    continue
                first, _, last = spec.partition("-")
                for slot in range(int(first), int(last or first) + 1):
                    owners[slot] = node_port
        maps.append(owners)
    assert all(owners == maps[0] for owners in maps)
    assert len(maps[0]) == 16384
    return maps[0]


def keyslot(cluster: RedisClusterServers, key: str) -> int:
    """The slot of ``key`` as the server computes it (``CLUSTER KEYSLOT``)."""
    with redis.Redis(port=cluster.ports[0]) as client:
        return int(client.execute_command("CLUSTER", "KEYSLOT", key))


def town_node(cluster: RedisClusterServers, owners: dict[int, int], town: str) -> int:
    """The index in ``cluster.servers`` of the node that holds ``town``."""
    return cluster.ports.index(owners[keyslot(cluster, town_key(town, "events"))])


def towns_by_node(cluster: RedisClusterServers, count: int = 3) -> list[list[str]]:
    """``count`` town names for each node, by the node that holds them."""
    owners = slot_map(cluster)
    out: list[list[str]] = [[] for _ in cluster.servers]
    for i in itertools.count():
        town = f"T{i}"
        node = out[town_node(cluster, owners, town)]
        if len(node) < count:
            node.append(town)
        if all(len(towns) == count for towns in out):
            return out
    raise AssertionError("unreachable")


# -- keys and slots ------------------------------------------------------------------------------


async def test_open_log_makes_a_cluster_client(redis_cluster_url: str) -> None:
    log = open_log(redis_cluster_url)
    assert isinstance(log, RedisLog)
    assert log.cluster
    try:
        await log.ping()
    finally:
        await log.close()


async def test_a_towns_keys_share_one_slot_on_one_node(
    redis_cluster: RedisClusterServers, log: RedisLog, lease: Lease
) -> None:
    towns = ["T7", "a{b}c", "x}:events", "}starts-with-brace", "", "Ünter-Dorf 7", "🚒"]
    for town in towns:
        epoch = await lease.acquire(town, "me", 10_000)
        assert await log.append(town, numbered(1, 2), epoch=epoch) == [1, 2]
    owners = slot_map(redis_cluster)
    for town in towns:
        keys = [town_key(town, kind) for kind in KINDS]
        slots = {keyslot(redis_cluster, key) for key in keys}
        assert len(slots) == 1, (town, keys)
        port = owners[slots.pop()]
        with redis.Redis(port=port) as node:
            assert node.exists(*keys) == 3
            assert node.xrange(keys[0]) == [(b"1-0", {b"d": b"e1"}), (b"2-0", {b"d": b"e2"})]
    # the usual names keep their plain keys; only an empty hash tag gets the "!" form
    assert town_key("T7", "events") == "dispatch:{T7}:events"
    assert town_key("", "events") == "dispatch:!{!}:events"
    assert town_key("}x", "epoch") == "dispatch:!{!}x}:epoch"


async def test_towns_spread_over_the_nodes(
    redis_cluster: RedisClusterServers, log: RedisLog
) -> None:
    towns = [f"T{i}" for i in range(20)]
    await asyncio.gather(*(log.append(town, numbered(1, 3, tag=town)) for town in towns))
    owners = slot_map(redis_cluster)
    placed = {town: owners[keyslot(redis_cluster, town_key(town, "events"))] for town in towns}
    assert len(set(placed.values())) >= 2, placed
    for port in redis_cluster.ports:  # each node holds exactly the streams of its towns
        mine = sorted(town_key(t, "events").encode() for t, p in placed.items() if p == port)
        with redis.Redis(port=port) as node:
            assert sorted(node.keys("dispatch:*")) == mine
    for town in towns:
        assert await log.read(town) == numbered(1, 3, tag=town)


async def test_followers_on_every_node_at_once(
    redis_cluster: RedisClusterServers, log: RedisLog
) -> None:
    towns = [town for group in towns_by_node(redis_cluster, 4) for town in group]
    followers = [asyncio.create_task(collect(log.follow(town, 0), 40)) for town in towns]

    async def writer(town: str) -> None:
        for first in range(1, 41, 4):
            await log.append(town, numbered(first, 4, tag=town))
            await asyncio.sleep(1 * MS)

    async with asyncio.timeout(20_000 * MS):
        await asyncio.gather(*(writer(town) for town in towns))
        results = await asyncio.gather(*followers)
    assert results == [numbered(1, 40, tag=town) for town in towns]


async def test_a_fresh_client_routes_its_first_commands_right(
    redis_cluster: RedisClusterServers, redis_cluster_url: str
) -> None:
    """redis-py alone sends keyed commands given before it knows the slots to a random node."""
    for port in redis_cluster.ports:
        with redis.Redis(port=port) as node:
            node.config_resetstat()
    towns = [town for group in towns_by_node(redis_cluster, 10) for town in group]
    log = RedisLog.from_url(redis_cluster_url)
    lease = Lease(client_from_url(redis_cluster_url))
    try:
        async with asyncio.timeout(10_000 * MS):  # all at once, as the client's first commands
            results = await asyncio.gather(
                *(log.append(town, numbered(1, 2)) for town in towns),
                *(lease.acquire(town, "A", 10_000) for town in towns),
            )
        assert results == [[1, 2]] * len(towns) + [1] * len(towns)
    finally:
        await log.close()
        await lease.client.aclose()
    for port in redis_cluster.ports:
        with redis.Redis(port=port) as node:
            errors = node.info("errorstats")
        assert not any("MOVED" in name or "ASK" in name for name in errors), errors


async def test_pubsub_on_a_fresh_cluster_client(redis_cluster_url: str) -> None:
    """What ``dispatch.cluster.bus`` needs: SUBSCRIBE as a client's very first command."""
    listener, sender = client_from_url(redis_cluster_url), client_from_url(redis_cluster_url)
    pubsub = listener.pubsub()
    try:
        await pubsub.subscribe("dispatch:reply:A", town_key("T1", "positions"))
        for channel in ("dispatch:reply:A", town_key("T1", "positions")):
            await sender.publish(channel, b"hello")
        got = []
        async with asyncio.timeout(5000 * MS):
            while len(got) < 2:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    got.append((msg["channel"], msg["data"]))
        assert got == [(b"dispatch:reply:A", b"hello"), (b"dispatch:{T1}:positions", b"hello")]
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await sender.aclose()


# -- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis-cluster://",
        "redis-cluster://:7000",
        "redis-cluster://host:port",
        "redis-cluster://h1:7000,:7001",
        "redis-cluster://h1:7000/1",
        "rediss-cluster://h1:7000/db",
    ],
)
def test_bad_cluster_urls_name_the_setting(url: str) -> None:
    with pytest.raises(ConfigError, match=r"\[store\] url"):
        open_log(url)


async def test_a_cluster_url_connects_lazily_and_fails_fast() -> None:
    log = open_log(f"redis-cluster://127.0.0.1:{free_port()}")
    assert isinstance(log, RedisLog)
    try:
        started = time.monotonic()
        with pytest.raises(LogUnavailable):
            await log.ping()
        with pytest.raises(LogUnavailable):
            await log.append("t", numbered(1, 1))
        assert time.monotonic() - started < 2000 * MS  # no hidden retries with backoff
    finally:
        await log.close()


async def test_any_seed_node_will_do(redis_cluster: RedisClusterServers) -> None:
    dead = free_port()
    seeds = ",".join(f"127.0.0.1:{port}" for port in [dead, *redis_cluster.ports[1:]])
    log = open_log(f"redis-cluster://{seeds}/0?socket_timeout=5")
    try:
        await log.append("seeded", numbered(1, 1))
        assert await log.read("seeded") == numbered(1, 1)
    finally:
        await log.close()


async def test_a_plain_url_to_a_cluster_node_says_so(redis_cluster: RedisClusterServers) -> None:
    owners = slot_map(redis_cluster)
    town = next(t for t in (f"T{i}" for i in range(100)) if town_node(redis_cluster, owners, t))
    log = open_log(redis_cluster.urls[0])  # node 0; the town is on another node
    try:
        with pytest.raises(LogUnavailable, match="redis-cluster://"):
            await log.last_seq(town)
    finally:
        await log.close()


# -- all backends agree, on random operations --------------------------------------------------

_examples = itertools.count()
_op = st.tuples(st.sampled_from("abcdef"), st.integers(-2, 2), st.integers(0, 4), st.booleans())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=25))
async def test_cluster_agrees_with_memory(
    ops: list[tuple[str, int, int, bool]], redis_cluster: RedisClusterServers
) -> None:
    prefix = f"x{next(_examples)}-"
    logs: list[EventLog] = [MemoryLog(), RedisLog.from_url(redis_cluster.url)]
    try:
        last = dict.fromkeys("abcdef", 0)
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
            assert outcomes[0] == outcomes[1]
            if outcomes[0] is not SeqConflict:
                last[town] += size
        for town in last:
            reads = [await log.read(prefix + town) for log in logs]
            assert reads == [numbered(1, last[town], tag=town)] * 2
    finally:
        for log in logs:
            await log.close()


# -- a node going away and coming back ---------------------------------------------------------


@pytest.fixture
def spread(private_redis_cluster: RedisClusterServers) -> list[list[str]]:
    """Two towns per node of the private cluster."""
    return towns_by_node(private_redis_cluster, 2)


async def test_a_stopped_node_fails_only_its_towns_then_recovers(
    private_redis_cluster: RedisClusterServers, spread: list[list[str]]
) -> None:
    cluster = private_redis_cluster
    down = spread[1]  # the towns of node 1, which this test stops
    up_a, up_b = 0, 2
    log = RedisLog.from_url(cluster.url, block_ms=200)
    lease = Lease(client_from_url(cluster.url))
    try:
        towns = [town for group in spread for town in group]
        for town in towns:
            assert await log.append(town, numbered(1, 2, tag=town)) == [1, 2]
        epoch = await lease.acquire(down[0], "A", 60_000)
        live = spread[up_a][0]
        follower = asyncio.create_task(collect(log.follow(live, 0), 6))
        await asyncio.sleep(50 * MS)
        for server in (cluster.servers[up_a], cluster.servers[up_b]):
            with redis.Redis(port=server.port) as node:
                node.script_flush()  # the next appends there take the EVAL path

        cluster.servers[1].stop()
        started = time.monotonic()
        for town in down:
            with pytest.raises(LogUnavailable):
                await log.append(town, numbered(3, 1, tag=town), epoch=epoch)
            with pytest.raises(LogUnavailable):
                await log.read(town)
            with pytest.raises(LogUnavailable):
                await log.last_seq(town)
        with pytest.raises(LogUnavailable):
            await log.ping()  # not ready: a shard is missing
        with pytest.raises(LogUnavailable):
            await lease.renew(down[0], "A", 60_000)
        assert time.monotonic() - started < 3000 * MS  # no hidden retries with backoff
        # the towns of the other nodes carry on, their followers too, while node 1 is down
        for group in (spread[up_a], spread[up_b]):
            for town in group:
                assert await log.append(town, numbered(3, 2, tag=town)) == [3, 4]
        assert await lease.acquire(spread[up_a][1], "A", 60_000) == 1
        await log.append(live, numbered(5, 2, tag=live))
        async with asyncio.timeout(5000 * MS):
            assert await follower == numbered(1, 6, tag=live)

        cluster.servers[1].start()  # same folder: AOF and nodes.conf; an empty script cache
        cluster.wait_ok()
        await log.ping()
        for town in down:
            assert await log.read(town) == numbered(1, 2, tag=town)
        assert await lease.renew(down[0], "A", 60_000)  # the lease is in the AOF too
        assert await log.append(down[0], numbered(3, 1, tag=down[0]), epoch=epoch) == [3]
        assert await log.append(down[1], numbered(3, 1, tag=down[1])) == [3]
        for town in spread[up_a] + spread[up_b]:
            assert await log.last_seq(town) == (6 if town == live else 4)
    finally:
        await log.close()
        await lease.client.aclose()


async def test_acked_appends_survive_sigkill_of_a_node(
    private_redis_cluster: RedisClusterServers, spread: list[list[str]]
) -> None:
    cluster = private_redis_cluster
    log = RedisLog.from_url(cluster.url)
    towns = [town for group in spread for town in group]
    victims = set(spread[2])
    acked: dict[str, int] = {}
    under_way = asyncio.Event()
    targets: dict[str, int] = {}  # once node 2 is dead: how far the other towns must get
    enough = asyncio.Event()

    async def writer(town: str) -> None:
        for seq in range(1, 1_000_000):
            if enough.is_set() and town not in victims:
                return
            await log.append(town, [Record(seq, b"x" * 300)])
            acked[town] = seq
            if len(acked) == len(towns) and min(acked.values()) >= 5:
                under_way.set()
            if targets and all(acked[t] >= n for t, n in targets.items()):
                enough.set()

    try:
        tasks = {town: asyncio.create_task(writer(town)) for town in towns}
        async with asyncio.timeout(10_000 * MS):
            await under_way.wait()
        cluster.servers[2].kill()  # mid-stream, with appendfsync always
        async with asyncio.timeout(5000 * MS):
            outcomes = await asyncio.gather(
                *(tasks[town] for town in victims), return_exceptions=True
            )
        assert all(isinstance(o, LogUnavailable) for o in outcomes), outcomes
        targets.update({town: acked[town] + 20 for town in towns if town not in victims})
        async with asyncio.timeout(5000 * MS):  # the other nodes' towns keep going
            await asyncio.gather(*(tasks[town] for town in targets))

        cluster.servers[2].start()
        cluster.wait_ok()
        for town in towns:
            last = await log.last_seq(town)
            assert last >= acked[town]  # every acked record is there (one more may be too)
            assert [r.seq for r in await log.read(town)] == list(range(1, last + 1))
    finally:
        await log.close()
