"""Town ownership leases with fencing epochs, in Redis.

A town has at most one owner instance at a time: the holder of ``dispatch:{<town>}:owner``
(``SET NX PX``: the owner id, with a TTL the owner must keep renewing). Every successful
:meth:`Lease.acquire` also INCRs ``dispatch:{<town>}:epoch`` — in the same script, so no owner ever
holds the lease without a fresh epoch — and returns the new epoch. The owner passes that epoch to
every :meth:`dispatch.log.redis.RedisLog.append`; once another instance has taken the lease, the
old epoch is stale and the old owner's appends raise :class:`~dispatch.errors.Fenced` and write
nothing, even if it was paused past its TTL and has not noticed yet.

Rules for callers:

* ``owner_id`` must be unique per process *incarnation* (e.g. host, pid and a random suffix): a
  restarted process must never be mistaken for the one that held the lease before.
* Renew well within the TTL (a third of it, say). When :meth:`Lease.renew` returns False, or an
  append raises ``Fenced``, stop writing for the town at once and drop its in-memory state.
* Losing the lease to expiry does not fence by itself: the epoch changes when another instance
  acquires. Fencing guarantees that two owners never interleave writes, not that the lease is held.

Redis errors surface as :class:`~dispatch.errors.LogUnavailable` (Redis is also the log here).
``client`` may be a single Redis or a Redis Cluster client (:data:`dispatch.log.redis.RedisClient`):
each script names only the keys of one town, which share its hash tag and so its cluster slot.
"""

from __future__ import annotations

from dispatch.errors import LogUnavailable
from dispatch.log.redis import REDIS_ERRORS, LuaScript, RedisClient, town_key

__all__ = ["Lease"]

_ACQUIRE = LuaScript("""#!lua
-- KEYS[1] owner, KEYS[2] epoch; ARGV[1] owner id, ARGV[2] ttl ms
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
""")

_RENEW = LuaScript("""#!lua
-- KEYS[1] owner; ARGV[1] owner id, ARGV[2] ttl ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")

_RELEASE = LuaScript("""#!lua
-- KEYS[1] owner; ARGV[1] owner id
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


class Lease:
    """Acquire, renew and release town leases on ``client`` (see the module docstring)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client

    async def acquire(self, town: str, owner_id: str, ttl_ms: int) -> int | None:
        """Take the lease if nobody holds it: returns the new fencing epoch, or None if held.

        Held means held by anyone, ``owner_id`` included: an owner renews, it does not re-acquire.
        """
        _check_ttl(ttl_ms)
        keys = [town_key(town, "owner"), town_key(town, "epoch")]
        try:
            epoch = await _ACQUIRE(self.client, keys, [owner_id, ttl_ms])
        except REDIS_ERRORS as exc:
            raise LogUnavailable(f"redis: lease acquire for {town!r} failed: {exc}") from exc
        return None if epoch is None else int(epoch)

    async def renew(self, town: str, owner_id: str, ttl_ms: int) -> bool:
        """Extend the lease to ``ttl_ms`` from now if ``owner_id`` still holds it; else False."""
        _check_ttl(ttl_ms)
        try:
            renewed = await _RENEW(self.client, [town_key(town, "owner")], [owner_id, ttl_ms])
        except REDIS_ERRORS as exc:
            raise LogUnavailable(f"redis: lease renew for {town!r} failed: {exc}") from exc
        return bool(renewed)

    async def release(self, town: str, owner_id: str) -> bool:
        """Give the lease up if ``owner_id`` holds it (so a successor need not wait the TTL)."""
        try:
            released = await _RELEASE(self.client, [town_key(town, "owner")], [owner_id])
        except REDIS_ERRORS as exc:
            raise LogUnavailable(f"redis: lease release for {town!r} failed: {exc}") from exc
        return bool(released)

    async def owner(self, town: str) -> str | None:
        """The current holder's id, or None."""
        try:
            value = await self.client.get(town_key(town, "owner"))
        except REDIS_ERRORS as exc:
            raise LogUnavailable(f"redis: lease lookup for {town!r} failed: {exc}") from exc
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def epoch(self, town: str) -> int:
        """The town's current fencing epoch (0 if no lease was ever acquired)."""
        try:
            value = await self.client.get(town_key(town, "epoch"))
        except REDIS_ERRORS as exc:
            raise LogUnavailable(f"redis: epoch lookup for {town!r} failed: {exc}") from exc
        return 0 if value is None else int(value)


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError(f"ttl_ms must be > 0, got {ttl_ms}")
