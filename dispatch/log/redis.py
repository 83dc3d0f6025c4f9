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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from dispatch.errors import Fenced, LogUnavailable, SeqConflict
from dispatch.log.base import EventLog, Record
from dispatch.log.memory import check_after, check_batch

__all__ = ["APPEND_SCRIPT", "RedisLog", "connect", "town_key"]

#: Errors that mean "Redis cannot do this now": connection loss, timeouts, and server-side refusals
#: such as OOM, MISCONF or READONLY (all ResponseError). NoScriptError is handled by redis-py.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisError,)

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
    """The key of one of a town's values: ``dispatch:{<town>}:<kind>``."""
    return f"dispatch:{{{town}}}:{kind}"


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """A ``redis.asyncio`` client for ``url`` that never retries a command by itself.

    The connection is made lazily by the first command. ``kwargs`` go to ``Redis.from_url``.
    """
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    kwargs.setdefault("socket_timeout", 10.0)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    return aioredis.Redis.from_url(url, **kwargs)


def _unavailable(what: str, exc: Exception) -> LogUnavailable:
    return LogUnavailable(f"redis: {what} failed: {type(exc).__name__}: {exc}")


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

    ``client`` must be created with ``decode_responses=False`` (the default); use
    :meth:`from_url` or :func:`connect` to get one that does not retry by itself. ``close()`` closes
    the client only when ``owns_client`` is true. ``block_ms`` is how long one ``XREAD BLOCK``
    waits (a follower notices ``close()`` within that time); ``page`` caps the entries fetched by
    one command.
    """

    def __init__(
        self,
        client: aioredis.Redis,
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
        self._append_script = client.register_script(APPEND_SCRIPT)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisLog:
        """A log over a new client for ``url`` (``redis://host:port/db``), closed with the log."""
        return cls(connect(url), owns_client=True, **kwargs)

    def __repr__(self) -> str:
        return f"RedisLog({self.client!r})"

    def _check_open(self) -> None:
        if self._closed:
            raise LogUnavailable("redis: the event log is closed")

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
                status, value = await self._append_script(keys=keys, args=args)
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
            raise SeqConflict(
                f"town {town!r}: append starts at seq {records[0].seq}, expected {int(value) + 1}"
            )
        return [record.seq for record in records]

    async def read(self, town: str, after: int = 0, limit: int | None = None) -> list[Record]:
        self._check_open()
        check_after(after, limit)
        key = town_key(town, "events")
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
                break
            after = out[-1].seq
        return out

    async def last_seq(self, town: str) -> int:
        self._check_open()
        try:
            return int(await self.client.xlen(town_key(town, "events")))
        except REDIS_ERRORS as exc:
            raise _unavailable(f"last_seq of {town!r}", exc) from exc

    async def follow(self, town: str, after: int) -> AsyncIterator[Record]:
        self._check_open()
        check_after(after)
        key = town_key(town, "events")
        while not self._closed:
            try:
                reply = await self.client.xread(
                    {key: f"{after}-0"}, count=self._page, block=self._block_ms
                )
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
                    yield record

    async def ping(self) -> None:
        self._check_open()
        try:
            await self.client.ping()
        except REDIS_ERRORS as exc:
            raise _unavailable("ping", exc) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()  # appends in flight get their answer first
        if self._owns_client:
            await self.client.aclose()
