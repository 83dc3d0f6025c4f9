"""The shared event log: one Redis stream per town, fenced appends, cross-process follow.

Keys (``{town}`` is a hash tag, so Redis Cluster keeps a town's keys in one slot and spreads the
towns over the shards; every script touches only one town's keys):

* ``dispatch:{<town>}:events`` — a stream. Record ``seq`` is entry id ``<seq>-0`` with one field
  ``d`` holding the bytes. Entries are exactly ``1-0 … N-0``, so ``XLEN`` is the last seq.
* ``dispatch:{<town>}:epoch`` — the fencing epoch, an integer INCRed by every lease takeover
  (:class:`dispatch.cluster.lease.Lease`).
* ``dispatch:{<town>}:owner`` — the lease itself (owner id, with a TTL).

Appends are one script call (EVALSHA of :data:`APPEND_SCRIPT`; redis-py loads it on the first
``NOSCRIPT``, e.g. once per server start): when an ``epoch`` is given it must equal the epoch key
(else :class:`~dispatch.errors.Fenced`), the first seq must be ``XLEN + 1`` (else
:class:`~dispatch.errors.SeqConflict`), and then the whole batch is XADDed. Redis runs a script
atomically, so a fenced or conflicting append writes nothing and two writers never interleave.
The script carries a ``#!lua`` shebang (Redis 7+): Redis then refuses it up front when out of
memory instead of failing half-way through a batch. Without an ``epoch`` the append is unfenced
(one instance, or tests).

Durability comes from the server: run it with ``appendonly yes`` and ``appendfsync always``.
Redis then writes and fsyncs the AOF before it sends the replies of the commands it ran in one
event-loop turn, so an acknowledged append is on disk (and concurrent appends share an fsync,
Redis's own group commit). With ``appendfsync everysec`` an append is acknowledged once it is in
the kernel's page cache: it survives a crash of Redis but an OS crash or power loss loses up to
about two seconds of acknowledged records, which breaks "nothing acked is lost". Replication is
asynchronous too: a failover to a replica can lose acknowledged records (``WAITAOF`` in Redis
7.2+ would close that gap; not used here).

Streams are never trimmed: the stream *is* the log, and trimming would break ``XLEN`` as the last
seq (the script then fails instead of reusing seqs, because XADD refuses ids at or below the top).

Errors: a lost connection, a timeout, or a server refusing to write (OOM, MISCONF, READONLY,
LOADING) raises :class:`~dispatch.errors.LogUnavailable`. The client never retries a command by
itself (a retried append whose reply was lost would come back as a misleading SeqConflict);
the next call reconnects, so one RedisLog object keeps working once Redis is back. ``close()``
waits for the appends in flight, then closes the client if the log owns it. ``follow``
raises ``LogUnavailable`` too when the connection drops: resume with ``follow(town, last_seen)``.

Appends to one town through one RedisLog object reach Redis one at a time, in call order (a
writer may pipeline them, as with the other backends); different towns go concurrently, over
the client's connection pool.

``follow`` reads with ``XREAD BLOCK`` from the last id it yielded, which sees appends made by
every process: that is how an instance follows towns owned by others. Each waiting follower
holds one pooled connection while it blocks.

Redis Cluster: ``redis-cluster://host:port`` (``rediss-cluster://`` for TLS; several seed nodes as
``redis-cluster://h1:p1,h2:p2``; database 0 only) makes a
:class:`redis.asyncio.cluster.RedisCluster` client (:func:`connect_cluster`), again without
retries of its own. Nothing else changes: every command and every script names only keys of one
town, which share the hash tag ``{<town>}`` and so one slot, so each goes to the one primary that
owns the town (MOVED/ASK redirections are followed: they mean the command did not run). Towns
spread over the primaries by the CRC16 of their names. Scripts are run by EVALSHA and, on
NOSCRIPT, by EVAL on the town's own node (not redis-py's SCRIPT LOAD on *every* primary, which
would make a town's appends depend on the other shards). ``XREAD BLOCK`` is sent straight to the
town's node. ``ping()`` pings every primary: a log with a shard down is not ready, although the
towns on the other shards go on working. A primary that stops makes only its own towns
unavailable; with replicas, a failover to a replica can lose acknowledged appends (replication is
asynchronous), as for a single Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT

from dispatch.errors import Fenced, LogLost, LogUnavailable, SeqConflict
from dispatch.log.base import EventLog, Record
from dispatch.log.memory import check_after, check_batch

__all__ = [
    "APPEND_SCRIPT",
    "CLUSTER_SCHEMES",
    "LuaScript",
    "RedisClient",
    "RedisLog",
    "client_from_url",
    "connect",
    "connect_cluster",
    "town_key",
]

logger = logging.getLogger(__name__)

#: A single Redis or a Redis Cluster: RedisLog and Lease work with either.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster

#: URL schemes that mean a Redis Cluster (see :func:`connect_cluster`).
CLUSTER_SCHEMES = ("redis-cluster", "rediss-cluster")

#: Errors that mean "Redis cannot do this now": connection loss, timeouts, and server-side refusals
#: such as OOM, MISCONF or READONLY (all ResponseError); for a cluster also CLUSTERDOWN, and
#: RedisClusterException (no reachable node at start, a slot not covered), which is not a
#: RedisError. NoScriptError is handled by :class:`LuaScript`.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
)

APPEND_SCRIPT = """#!lua
-- KEYS[1] events stream, KEYS[2] epoch key
-- ARGV[1] epoch ('' = unfenced), ARGV[2] first seq, ARGV[3..] record bytes
-- Returns {0, last seq} | {1, current epoch or ''} (fenced) | {2, last seq} (seq conflict)
if ARGV[1] ~= '' then
  local current = redis.call('GET', KEYS[2])
  if current ~= ARGV[1] then
    return {1, current or ''}
  end
end
local last = redis.call('XLEN', KEYS[1])
if tonumber(ARGV[2]) ~= last + 1 then
  return {2, last}
end
local seq = last
for i = 3, #ARGV do
  seq = seq + 1
  redis.call('XADD', KEYS[1], string.format('%d-0', seq), 'd', ARGV[i])
end
return {0, seq}
"""

_OK, _FENCED, _CONFLICT = 0, 1, 2
_DATA = b"d"


def town_key(town: str, kind: str) -> str:
    """The key of one of a town's values: ``dispatch:{<town>}:<kind>``.

    Redis Cluster hashes only the hash tag, the text between the first ``{`` and the next ``}``,
    so all the keys of a town share a slot, whatever the town's name: ``a{b}`` has the tag ``a{b``,
    ``x}y`` the tag ``x``. Only an empty name, or one that starts with ``}``, would give an empty
    tag (then Redis hashes the whole key, and a town's keys would land in different slots); those
    names get ``dispatch:!{!<town>}:<kind>`` instead, whose tag ``!…`` is never empty and which
    no other town's key can equal (every other key has ``{`` right after ``dispatch:``).
    """
    if not town or town[0] == "}":
        return f"dispatch:!{{!{town}}}:{kind}"
    return f"dispatch:{{{town}}}:{kind}"


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """A ``redis.asyncio`` client for ``url`` that never retries a command by itself.

    The connection is made lazily by the first command. ``kwargs`` go to ``Redis.from_url``.
    """
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    kwargs.setdefault("socket_timeout", 10.0)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    return aioredis.Redis.from_url(url, **kwargs)


def connect_cluster(url: str, **kwargs: Any) -> RedisCluster:
    """A Redis Cluster client for ``url`` that never retries a command by itself.

    ``url`` is ``redis-cluster://[user:password@]host:port[,host:port…][/0][?option=value…]``
    (``rediss-cluster://`` for TLS): one or more seed nodes, from which the client discovers the
    cluster on its first command (lazily, like :func:`connect`). Query options are the ones of
    ``redis://`` URLs. Raises ``ValueError`` for a URL it cannot use. ``kwargs`` go to
    ``RedisCluster.from_url``. The client keeps up to ``max_connections`` (default 10 000)
    connections per node: each waiting follower holds one.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"expected {' or '.join(s + '://' for s in CLUSTER_SCHEMES)}")
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has only database 0")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    seeds = [_host_port(host) for host in hosts.split(",")]
    first = seeds[0][0]
    first = f"[{first}]" if ":" in first else first
    single = urlunsplit(
        ("rediss" if scheme == "rediss-cluster" else "redis",
         f"{userinfo}{at}{first}:{seeds[0][1]}", "", parts.query, "")
    )  # fmt: skip
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    kwargs.setdefault("socket_timeout", 10.0)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs.setdefault("max_connections", 10_000)
    kwargs.setdefault("reinitialize_steps", 0)
    if len(seeds) > 1:
        kwargs.setdefault("startup_nodes", [ClusterNode(host, port) for host, port in seeds[1:]])
    return _Cluster.from_url(single, **kwargs)


class _Cluster(RedisCluster):
    """A RedisCluster that learns the slot map before it routes any command.

    redis-py 8.1 picks a command's routing before it initializes the client: a keyed command
    issued while the client has no slot map yet (its first commands, or any right after a
    CLUSTERDOWN reset) goes to a random primary and comes back MOVED. Concurrent first commands
    then pile up MOVED replies, and with the default ``reinitialize_steps=5`` every fifth one
    closes *all* the client's connections, failing the commands in flight on them (appends
    included). So: initialize first (a no-op once done), and :func:`connect_cluster` sets
    ``reinitialize_steps=0``, which makes a MOVED patch its one slot instead of closing
    everything (a lost node still makes the next command rediscover the cluster).
    """

    async def execute_command(self, *args: EncodableT, **kwargs: Any) -> Any:
        await self.initialize()
        return await super().execute_command(*args, **kwargs)

    def pubsub(
        self,
        node: ClusterNode | None = None,
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> ClusterPubSub:
        return _ClusterPubSub(self, node=node, host=host, port=port, **kwargs)


class _ClusterPubSub(ClusterPubSub):
    """The same for pub/sub: a first SUBSCRIBE on an uninitialized client raises KeyError."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.cluster.initialize()
        return await super().execute_command(*args, **kwargs)


def _host_port(text: str) -> tuple[str, int]:
    """``host[:port]`` (``[v6]:port`` too) of a seed node; the port defaults to 6379."""
    parts = urlsplit(f"//{text}")
    port = parts.port  # raises ValueError for a port that is not a number
    if not parts.hostname:
        raise ValueError(f"no host in {text!r}")
    return parts.hostname, 6379 if port is None else port


def client_from_url(url: str, **kwargs: Any) -> RedisClient:
    """:func:`connect_cluster` for ``redis-cluster://`` URLs, else :func:`connect`."""
    if urlsplit(url).scheme.lower() in CLUSTER_SCHEMES:
        return connect_cluster(url, **kwargs)
    return connect(url, **kwargs)


class LuaScript:
    """A Lua script run with EVALSHA, and with EVAL when the server answers NOSCRIPT.

    Replaces redis-py's ``register_script``, whose NOSCRIPT fallback sends SCRIPT LOAD to every
    primary of a cluster (so an append would fail while an unrelated shard is down). EVAL goes
    to the node of the script's keys like EVALSHA, and caches the script there. NOSCRIPT means
    the script did not run, so running it again cannot apply it twice.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(
        self, client: RedisClient, keys: Sequence[str], args: Sequence[bytes | str | int]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await client.eval(self.text, len(keys), *keys, *args)


def _unavailable(what: str, exc: Exception) -> LogUnavailable:
    hint = ""
    if isinstance(exc, redis.exceptions.AskError):  # MovedError too: a cluster node said MOVED
        hint = " (this Redis is part of a cluster: use a redis-cluster:// URL)"
    return LogUnavailable(f"redis: {what} failed: {type(exc).__name__}: {exc}{hint}")


def _records(entries: Any) -> list[Record]:
    """Stream entries ``[(b"<seq>-0", {b"d": data}), …]`` as records."""
    typed = cast(list[tuple[bytes, dict[bytes, bytes]]], entries)
    return [Record(int(entry_id.partition(b"-")[0]), fields[_DATA]) for entry_id, fields in typed]


@dataclass(slots=True, eq=False)
class _Turn:
    """Serialises one town's appends from this object, so they reach Redis in call order."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class RedisLog(EventLog):
    """Event log in Redis streams; see the module docstring.

    ``client`` is a ``redis.asyncio`` client or a Redis Cluster client, created with
    ``decode_responses=False`` (the default); use :meth:`from_url`, :func:`connect` or
    :func:`connect_cluster` to get one that does not retry by itself. ``close()`` closes
    the client only when ``owns_client`` is true. ``block_ms`` is how long one ``XREAD BLOCK``
    waits (a follower notices ``close()`` within that time); ``page`` caps the entries fetched by
    one command.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        owns_client: bool = False,
        block_ms: int = 1000,
        page: int = 1000,
    ) -> None:
        self.client = client
        self._owns_client = owns_client
        self._block_ms = block_ms
        self._page = page
        self._closed = False
        self._appending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._turns: dict[str, _Turn] = {}
        self._append_script = LuaScript(APPEND_SCRIPT)
        self._seen: dict[str, int] = {}
        """Per town, the highest seq this object has seen durable (appended or read)."""
        self._lost: dict[str, str] = {}
        """Towns whose stream is behind ``_seen``, with what to tell the operator."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisLog:
        """A log over a new client for ``url``, closed with the log.

        ``redis://host:port/db`` (or ``rediss://``, ``unix://``) for one Redis,
        ``redis-cluster://host:port`` (or ``rediss-cluster://``) for a Redis Cluster.
        """
        return cls(client_from_url(url), owns_client=True, **kwargs)

    @property
    def cluster(self) -> bool:
        """True when the client is a Redis Cluster client."""
        return isinstance(self.client, RedisCluster)

    def __repr__(self) -> str:
        return f"RedisLog({self.client!r})"

    def _check_open(self) -> None:
        if self._closed:
            raise LogUnavailable("redis: the event log is closed")

    def _saw(self, town: str, head: int, floor: int | None = None) -> None:
        """Record that ``town``'s stream reaches ``head``.

        ``floor`` is what this object had seen durable when it sent the command that found
        ``head`` as the stream's end (``None``: ``head`` is only a lower bound, a page of a longer
        read or a followed record). A stream that ends below its floor lost acknowledged events
        (Redis restarted without its AOF, flushed, failed over to a replica that lagged), and the
        town refuses everything until the events are back, rather than handing their seqs and
        incident ids out again. The floor, not the latest value, because an append that lands
        while a read is on its way is rightly missing from that read."""
        seen = self._seen.get(town, 0)
        if head >= seen:
            self._seen[town] = head
            if self._lost.pop(town, None) is not None:
                logger.warning("redis: town %r: the lost events are back (head %d)", town, head)
            return
        if floor is None or head >= floor:
            return
        message = (
            f"redis: town {town!r} has events up to seq {head} only, but this server already "
            f"saw seq {floor} durable: Redis lost acknowledged events (is it running with "
            "appendonly yes and appendfsync always?). Nothing more is acknowledged for this "
            "town: restore Redis's data, or restart this server to carry on from what Redis holds"
        )
        if town not in self._lost:
            logger.error("! %s", message)
        self._lost[town] = message
        raise LogLost(message)

    def _check_not_lost(self, town: str) -> None:
        message = self._lost.get(town)
        if message is not None:
            raise LogLost(message)

    async def append(
        self, town: str, records: Sequence[Record], *, epoch: int | None = None
    ) -> list[int]:
        self._check_open()
        if not records:
            return []
        # The script checks that the batch continues the stream; the batch's own continuity is
        # checked here (a gap inside it cannot depend on the stored state).
        conflict = check_batch(town, records, records[0].seq - 1)
        if conflict is not None:
            raise conflict
        self._check_not_lost(town)
        floor = self._seen.get(town, 0)
        keys = [town_key(town, "events"), town_key(town, "epoch")]
        args: list[bytes | str | int] = ["" if epoch is None else str(epoch), records[0].seq]
        args.extend(record.data for record in records)
        self._appending += 1
        self._idle.clear()
        turn = self._turns.get(town)
        if turn is None:
            turn = self._turns[town] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                status, value = await self._append_script(self.client, keys, args)
        except REDIS_ERRORS as exc:
            raise _unavailable(f"append to {town!r}", exc) from exc
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[town]
            self._appending -= 1
            if not self._appending:
                self._idle.set()
        if status == _FENCED:
            current = value.decode() if isinstance(value, bytes) else str(value)
            raise Fenced(
                f"town {town!r}: epoch {epoch} is stale (current epoch {current or 'unset'})"
            )
        if status == _CONFLICT:
            self._saw(town, int(value), floor)
            raise SeqConflict(
                f"town {town!r}: append starts at seq {records[0].seq}, expected {int(value) + 1}"
            )
        self._saw(town, records[-1].seq)
        return [record.seq for record in records]

    async def read(self, town: str, after: int = 0, limit: int | None = None) -> list[Record]:
        self._check_open()
        check_after(after, limit)
        key = town_key(town, "events")
        floor = self._seen.get(town, 0)
        out: list[Record] = []
        while limit is None or len(out) < limit:
            count = self._page if limit is None else min(self._page, limit - len(out))
            try:
                entries = await self.client.xrange(key, f"{after + 1}-0", "+", count=count)
            except REDIS_ERRORS as exc:
                raise _unavailable(f"read of {town!r}", exc) from exc
            page = _records(entries)
            out.extend(page)
            if len(page) < count:
                if out:
                    self._saw(town, out[-1].seq, floor)
                elif after < floor:
                    self._saw(town, after, floor)  # the stream ends at or before `after`
                return out
            after = out[-1].seq
        if out:
            self._saw(town, out[-1].seq)
        return out

    async def last_seq(self, town: str) -> int:
        self._check_open()
        floor = self._seen.get(town, 0)
        try:
            head = int(await self.client.xlen(town_key(town, "events")))
        except REDIS_ERRORS as exc:
            raise _unavailable(f"last_seq of {town!r}", exc) from exc
        self._saw(town, head, floor)
        return head

    async def follow(self, town: str, after: int) -> AsyncIterator[Record]:
        self._check_open()
        check_after(after)
        key = town_key(town, "events")
        while not self._closed:
            try:
                reply = await self._xread(key, after)
            except REDIS_ERRORS as exc:
                if self._closed:
                    return
                raise _unavailable(f"follow of {town!r}", exc) from exc
            for _stream, entries in cast(list[tuple[bytes, Any]], reply or []):
                for record in _records(entries):
                    if record.seq != after + 1:  # only if someone trimmed or rewrote the stream
                        raise LogUnavailable(
                            f"redis: town {town!r} stream jumps from seq {after} to {record.seq}"
                        )
                    after = record.seq
                    self._saw(town, after)
                    yield record

    async def _xread(self, key: str, after: int) -> Any:
        """``XREAD COUNT … BLOCK … STREAMS key <after>-0``.

        A cluster client sends it straight to the node that owns ``key``: left to itself, redis-py
        first asks a fixed node (``COMMAND GETKEYS``) where the keys of an XREAD are.
        """
        client = self.client
        if isinstance(client, RedisCluster):
            await client.initialize()  # a no-op unless the client has yet to learn the slots
            node = client.get_node_from_key(key)
            return await client.execute_command(
                "XREAD", "COUNT", self._page, "BLOCK", self._block_ms,
                "STREAMS", key, f"{after}-0", target_nodes=node,
            )  # fmt: skip
        return await client.xread({key: f"{after}-0"}, count=self._page, block=self._block_ms)

    async def ping(self) -> None:
        self._check_open()
        try:
            client = self.client
            if isinstance(client, RedisCluster):
                await client.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await client.ping()
        except REDIS_ERRORS as exc:
            raise _unavailable("ping", exc) from exc
        for message in self._lost.values():
            raise LogLost(message)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()  # appends in flight get their answer first
        if self._owns_client:
            await self.client.aclose()
