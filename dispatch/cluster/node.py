"""Distributed mode: several instances on one Redis, one owner per town (ARCHITECTURE §4).

Every instance holds a :class:`TownSlot` per town, which handlers use like a single-instance
``TownRunner`` (``engine``, ``timelines``, ``submit``, ``query``). Behind it the slot is either

* the **owner** — this instance holds the town's lease: a ``TownRunner`` appending with the
  lease's fencing epoch, plus a task serving the town's inbox for the other instances; or
* a **follower** — a :class:`~dispatch.cluster.follower.TownFollower` replica.

:class:`ClusterNode` renews or tries to take each lease every ``renew`` seconds. When the owner
dies its lease expires after ``lease_ttl``; the first instance to take it replays the stream and
carries on (the epoch INCR fences any write of the old owner). Instances also re-announce their
connected devices to a new owner, and an owner drops the devices of an instance whose heartbeat
lapsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from dispatch.cluster.bus import Bus, decode_command
from dispatch.cluster.follower import TownFollower
from dispatch.cluster.lease import Lease
from dispatch.engine import commands as c
from dispatch.engine.engine import Engine, Outcome
from dispatch.errors import LogError, Rejected
from dispatch.log.redis import REDIS_ERRORS, RedisLog, town_key
from dispatch.server.town import TownRunner, reply_when_done

log = structlog.get_logger("dispatch.cluster")


def instance_id(configured: str | None = None) -> str:
    """Unique per process incarnation, so a restarted process never inherits a lease."""
    base = configured or f"{socket.gethostname()}-{os.getpid()}"
    return f"{base}-{uuid.uuid4().hex[:6]}"


class TownSlot:
    """The stable handle handlers hold for a town; the role behind it changes on failover."""

    def __init__(self, town: str, node: ClusterNode) -> None:
        self.town = town
        self.node = node
        self.role: TownRunner | TownFollower | None = None
        self.epoch: int | None = None
        self.presence: dict[str, set[str]] = {}
        self.inbox_task: asyncio.Task[None] | None = None

    @property
    def is_owner(self) -> bool:
        return isinstance(self.role, TownRunner)

    @property
    def engine(self) -> Engine:
        assert self.role is not None
        return self.role.engine

    @property
    def timelines(self) -> dict[str, Any]:
        assert self.role is not None
        return self.role.timelines

    @property
    def healthy(self) -> bool:
        return self.role is not None and self.role.healthy

    async def submit(
        self,
        command: c.Command,
        after: Callable[[Engine, Outcome], Any] | None = None,
        origin: str | None = None,
    ) -> Any:
        role = self.role
        if role is None:
            raise Rejected("unavailable", "The town is starting; retry shortly.")
        if isinstance(role, TownRunner):
            origin = origin or self.node.instance
            if isinstance(command, c.Connect):
                self.presence.setdefault(command.responder, set()).add(origin)
            elif isinstance(command, c.Disconnect):
                left = self.presence.get(command.responder, set())
                left.discard(origin)
                if left:
                    return after(role.engine, Outcome()) if after else Outcome()
                self.presence.pop(command.responder, None)
        return await role.submit(command, after)

    def enqueue(
        self, command: c.Command, after: Callable[[Engine, Outcome], Any] | None = None
    ) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.submit(command, after))

    def send(self, command: c.Command, reply: Callable[[Any, BaseException | None], None]) -> None:
        role = self.role
        if isinstance(role, TownRunner) and not isinstance(command, (c.Connect, c.Disconnect)):
            role.send(command, reply)
        else:
            reply_when_done(self.enqueue(command), reply)

    async def query(self, fn: Callable[[Engine], Any]) -> Any:
        if self.role is None:
            raise Rejected("unavailable", "The town is starting; retry shortly.")
        return await self.role.query(fn)


class ClusterNode:
    def __init__(
        self, ctx: Any, log_: RedisLog, *, instance: str, lease_ttl: float, renew: float
    ) -> None:
        self.ctx = ctx
        self.log = log_
        self.client = log_.client
        self.instance = instance
        self.lease = Lease(self.client)
        self.ttl_ms = int(lease_ttl * 1000)
        self.renew = renew
        self.slots: dict[str, TownSlot] = {}
        self.epochs_seen: dict[str, int] = {}
        self.bus = Bus(self.client, instance, list(ctx.data.towns), self._remote_positions)
        self._task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.start()
        for town in self.ctx.data.towns:
            slot = TownSlot(town, self)
            self.slots[town] = slot
            self.ctx.runners[town] = slot
            await self._become_follower(slot, wait=True)
        await self._tick()
        self._task = asyncio.create_task(self._loop(), name="cluster-node")
        self._flusher = asyncio.create_task(self._flush_loop(), name="positions-out")

    async def stop(self) -> None:
        for t in (self._task, self._flusher):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        for slot in self.slots.values():
            await self._stop_role(slot)
            if slot.epoch is not None:
                with contextlib.suppress(LogError):
                    await self.lease.release(slot.town, self.instance)
        await self.bus.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew)
            try:
                await self._tick()
            except Exception:
                log.exception("cluster tick failed")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self.bus.flush_positions()

    async def _tick(self) -> None:
        try:
            await self.bus.heartbeat(max(self.ttl_ms, int(self.renew * 3000)))
        except REDIS_ERRORS:
            return
        for town, slot in self.slots.items():
            try:
                if slot.is_owner:
                    if not await self.lease.renew(town, self.instance, self.ttl_ms):
                        log.warning("lost the lease", town=town)
                        await self._become_follower(slot)
                    else:
                        await self._drop_dead_instances(slot)
                else:
                    epoch = await self.lease.acquire(town, self.instance, self.ttl_ms)
                    if epoch is not None:
                        await self._become_owner(slot, epoch)
                    else:
                        await self._reannounce_if_new_owner(slot)
            except LogError as err:
                log.warning("lease check failed", town=town, error=str(err))

    # ------------------------------------------------------------------ roles

    def _make_engine(self, town: str) -> Callable[[], Engine]:
        from dispatch.geo.index import CellIndex

        data = self.ctx.data
        timing = self.ctx.settings.timing
        t = data.towns[town]
        return lambda: Engine(t, CellIndex(), data.gridset, timing)

    async def _stop_role(self, slot: TownSlot) -> None:
        if slot.inbox_task is not None:
            slot.inbox_task.cancel()  # a blocking XREAD may take a moment to give way
            await asyncio.wait({slot.inbox_task}, timeout=2.0)
            slot.inbox_task = None
        if slot.role is not None:
            await slot.role.stop()

    async def _become_owner(self, slot: TownSlot, epoch: int) -> None:
        previous = slot.role.engine if slot.role is not None else None
        await self._stop_role(slot)
        runner = TownRunner(
            town=slot.town,
            make_engine=self._make_engine(slot.town),
            log=self.log,
            clock=self.ctx.clock,
            sink=self.ctx.hub,
            metrics=self.ctx.metrics,
            epoch=epoch,
        )
        try:
            n = await runner.load(previous)
        except LogError:  # let go of the town: the next tick (here or elsewhere) tries again
            with contextlib.suppress(LogError):
                await self.lease.release(slot.town, self.instance)
            raise
        slot.role = runner
        slot.epoch = epoch
        slot.presence = {}
        self.epochs_seen[slot.town] = epoch
        runner.start()
        slot.inbox_task = asyncio.create_task(self._serve_inbox(slot), name=f"inbox-{slot.town}")
        # our own devices re-announce themselves to the new engine
        await self._announce_local(slot)
        log.info("took the lease: owner now", town=slot.town, epoch=epoch, events=n)

    async def _become_follower(self, slot: TownSlot, *, wait: bool = False) -> None:
        """Follow the town. Without ``wait`` one attempt: if the town cannot be loaded, its
        stopped role answers `unavailable` and the next tick tries again, so one town whose log
        is unreadable (or lost events) does not hold up the leases of the others."""
        previous = slot.role.engine if slot.role is not None else None
        await self._stop_role(slot)
        slot.epoch = None
        follower = TownFollower(
            town=slot.town,
            make_engine=self._make_engine(slot.town),
            log=self.log,
            sink=self.ctx.hub,
            bus=self.bus,
        )
        delay = 0.5
        while True:
            try:
                await follower.load(previous)
                break
            except LogError as err:
                log.warning("cannot load the town yet", town=slot.town, error=str(err))
                if not wait:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        slot.role = follower
        follower.start()

    async def _reannounce_if_new_owner(self, slot: TownSlot) -> None:
        epoch = await self.lease.epoch(slot.town)
        if self.epochs_seen.get(slot.town) != epoch:
            self.epochs_seen[slot.town] = epoch
            if epoch:
                self._spawn(self._announce_local(slot))

    async def _announce_local(self, slot: TownSlot) -> None:
        town_of = self.ctx.town_of_responder
        for rid in list(self.ctx.hub.devices):
            if town_of.get(rid) == slot.town:
                with contextlib.suppress(Rejected):
                    await slot.submit(c.Connect(rid))

    async def _drop_dead_instances(self, slot: TownSlot) -> None:
        others = {i for ins in slot.presence.values() for i in ins} - {self.instance}
        for inst in others:
            if await self.bus.alive(inst):
                continue
            log.warning("instance gone: its devices are disconnected", instance=inst)
            for rid, ins in list(slot.presence.items()):
                if inst in ins:
                    with contextlib.suppress(Rejected):
                        await slot.submit(c.Disconnect(rid), origin=inst)

    async def _serve_inbox(self, slot: TownSlot) -> None:
        """Owner: run the commands other instances forward, answer on their reply channel."""
        key = town_key(slot.town, "inbox")
        # Commands forwarded to the previous owner in the last few seconds may have died with
        # it unanswered: run them again (their requesters are still waiting; commands are
        # idempotent or answer conflict). Older ones were already answered 'unavailable'.
        since_ms = int((self.ctx.clock.now() - self.bus.request_timeout) * 1000)
        last = f"{max(since_ms, 0)}-0"
        while True:
            try:
                reply: Any = await self.client.xread({key: last}, count=500, block=1000)
            except REDIS_ERRORS:
                await asyncio.sleep(0.2)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    self._spawn(self._run_forwarded(slot, fields))

    async def _run_forwarded(self, slot: TownSlot, fields: dict[bytes, bytes]) -> None:
        origin = fields[b"from"].decode()
        req = fields[b"req"].decode()
        try:
            command = decode_command(fields[b"cmd"])
            seq, incident = await slot.submit(
                command, after=lambda e, o: (e.state.seq, o.incident), origin=origin
            )
            answer: dict[str, Any] = {"ok": True, "seq": seq, "incident": incident}
        except Rejected as rej:
            answer = {"ok": False, "code": rej.code, "message": rej.message}
        except Exception:
            log.exception("forwarded command failed", town=slot.town)
            answer = {"ok": False, "code": "internal", "message": "Internal error; retry."}
        await self.bus.reply(origin, req, answer)

    # ------------------------------------------------------------------ positions

    def _remote_positions(self, town: str, items: list[list[Any]]) -> None:
        slot = self.slots.get(town)
        if slot is None or slot.role is None:
            return
        engine = slot.role.engine
        known = engine.state.responders
        for rid, lon, lat, ts in items:
            if rid in known:
                engine.position(rid, float(lon), float(lat), float(ts))
                self.ctx.hub.moved(town, rid)

    def local_position(self, town: str, rid: str, lon: float, lat: float, ts: float) -> None:
        self.bus.position(town, rid, lon, lat, ts)
