"""A town this instance does not own: a read replica fed by the town's event stream.

It folds every event with the engine's own ``apply`` (so its state equals the owner's at the
same seq), feeds its screens and devices exactly like the owner does (same hub, same notices),
and forwards commands to the owner through the bus. A forwarded command is acknowledged only
after this replica has applied the seq the owner reported durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from dispatch.cluster.bus import Bus
from dispatch.engine.commands import Command
from dispatch.engine.engine import Engine, Outcome, notices_for
from dispatch.engine.events import Event
from dispatch.engine.state import apply
from dispatch.errors import LogError, Rejected
from dispatch.log.base import EventLog
from dispatch.server.town import Sink, _add_timeline, _carry_positions, reply_when_done
from dispatch.wire.codec import decode_event

log = structlog.get_logger("dispatch.cluster")


@dataclass(eq=False)
class TownFollower:
    town: str
    make_engine: Callable[[], Engine]
    log: EventLog
    sink: Sink
    bus: Bus
    engine: Engine = field(init=False)
    timelines: dict[str, list[Event]] = field(init=False, default_factory=dict)
    healthy: bool = field(init=False, default=False)
    _waiters: list[tuple[int, asyncio.Future[None]]] = field(init=False, default_factory=list)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    _stopped: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.engine = self.make_engine()

    async def load(self, previous: Engine | None = None) -> int:
        engine = self.make_engine()
        if previous is not None:
            _carry_positions(previous, engine)
        records = await self.log.read(self.town)
        events = [decode_event(r.data) for r in records]
        engine.replay(events)
        timelines: dict[str, list[Event]] = {}
        for ev in events:
            _add_timeline(timelines, ev)
        self.engine = engine
        self.timelines = timelines
        self.sink.loaded(self, events)  # type: ignore[arg-type]
        self.healthy = True
        return len(events)

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name=f"follow-{self.town}")

    async def stop(self) -> None:
        """Stop following. A blocking XREAD does not always give way to cancellation at once
        (redis-py may finish the command first), so the task is flagged, cancelled and awaited
        only briefly; a straggler applies nothing after the flag."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2.0)
            self._task = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(Rejected("unavailable", "The town changed hands; retry."))
        self._waiters.clear()

    async def _follow(self) -> None:
        delay = 0.1
        while True:
            try:
                async for rec in self.log.follow(self.town, self.engine.state.seq):
                    if self._stopped:
                        return
                    ev = decode_event(rec.data)
                    state = self.engine.state
                    notices = notices_for(state, ev)
                    apply(state, ev)
                    _add_timeline(self.timelines, ev)
                    self.sink.publish(self, [ev])  # type: ignore[arg-type]
                    if notices:
                        self.sink.notify(self, notices)  # type: ignore[arg-type]
                    self._advance()
                    self.healthy = True
                    delay = 0.1
            except LogError as err:
                self.healthy = False
                log.warning("following the town failed; retrying", town=self.town, error=str(err))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _advance(self) -> None:
        seq = self.engine.state.seq
        keep = []
        for want, fut in self._waiters:
            if want <= seq:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((want, fut))
        self._waiters = keep

    async def _caught_up(self, seq: int, timeout: float = 5.0) -> None:
        if self.engine.state.seq >= seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise Rejected(
                "unavailable",
                "The change is durable but this instance has not caught up yet; retry.",
            ) from None

    async def submit(
        self, command: Command, after: Callable[[Engine, Outcome], Any] | None = None
    ) -> Any:
        answer = await self.bus.request(self.town, command)
        await self._caught_up(int(answer.get("seq", 0)))
        outcome = Outcome(incident=answer.get("incident"))
        return after(self.engine, outcome) if after is not None else outcome

    def enqueue(
        self, command: Command, after: Callable[[Engine, Outcome], Any] | None = None
    ) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.submit(command, after))

    def send(self, command: Command, reply: Callable[[Any, BaseException | None], None]) -> None:
        reply_when_done(self.enqueue(command), reply)

    async def query(self, fn: Callable[[Engine], Any]) -> Any:
        return fn(self.engine)
