"""The single writer of one town: the only task that touches its engine.

Loop: take everything queued (up to ``max_batch``) → ``engine.tick(now)`` → ``engine.handle`` each
command → append all events of the batch to the log in one call (group commit) → once durable,
publish the events to screens, send notices to devices, run the ``after`` callbacks, and only
then resolve the callers' futures (so every ``ack`` follows durability). What that sends goes
out together when the commit is done (:func:`~dispatch.server.outbox.sent_together`), and a
caller that passed a ``reply`` callback (the field channel's acks) is answered inside it.

If the append fails, nothing of the batch is acknowledged (callers get ``unavailable``) and the
engine is rebuilt from the log, so its state never runs ahead of what is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from dispatch.clock import Clock
from dispatch.engine.commands import Command, Notice
from dispatch.engine.engine import Engine, Outcome
from dispatch.engine.events import Event
from dispatch.errors import LogError, Rejected
from dispatch.log.base import EventLog, Record
from dispatch.server.metrics import Metrics
from dispatch.server.outbox import sent_together
from dispatch.wire.codec import decode_event, encode_event

log = structlog.get_logger("dispatch.town")


class Sink(Protocol):
    """Where durable events and notices go (the hub)."""

    def publish(self, runner: TownRunner, events: list[Event]) -> None: ...

    def loaded(self, runner: TownRunner, events: list[Event]) -> None: ...

    def notify(self, runner: TownRunner, notices: list[Notice]) -> None: ...


class Reply:
    """The answer to a queued command, resolved like a future but delivered at once.

    A future's callbacks run a loop turn after it is resolved; ``callback(result, error)`` runs
    inside the writer's commit, so the acknowledgement is queued with, and flushed with, what the
    same commit sends. One of ``result`` and ``error`` is ``None``."""

    __slots__ = ("_callback", "_done")

    def __init__(self, callback: Callable[[Any, BaseException | None], None]) -> None:
        self._callback = callback
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self._resolve(result, None)

    def set_exception(self, error: BaseException) -> None:
        self._resolve(None, error)

    def _resolve(self, result: Any, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._callback(result, error)
        except Exception:  # a caller's bug must not stop the town's writer
            log.exception("reply callback failed")


def reply_when_done(
    future: asyncio.Future[Any], reply: Callable[[Any, BaseException | None], None]
) -> None:
    """``send`` for runners that answer with a future (the cluster's): ``reply`` when it is done."""

    def done(f: asyncio.Future[Any]) -> None:
        if f.cancelled():
            reply(None, asyncio.CancelledError())
        elif (error := f.exception()) is not None:
            reply(None, error)
        else:
            reply(f.result(), None)

    future.add_done_callback(done)


@dataclass(slots=True)
class _Item:
    command: Command | None
    future: asyncio.Future[Any] | Reply
    after: Callable[[Engine, Outcome], Any] | None = None
    query: Callable[[Engine], Any] | None = None


@dataclass(slots=True)
class _Done:
    future: asyncio.Future[Any] | Reply
    outcome: Outcome | BaseException
    after: Callable[[Engine, Outcome], Any] | None = None
    result: Any = None


@dataclass
class TownRunner:
    town: str
    make_engine: Callable[[], Engine]
    log: EventLog
    clock: Clock
    sink: Sink
    metrics: Metrics
    max_batch: int = 256
    """Commands handled in one batch and made durable by one commit. A batch runs on the event
    loop without a break until its commit is queued, and again once the commit is back, so its
    size is how long every other connection can be held up. Measured with bursts of 2,000
    reports (scenario ``issue5-burst``, 2026-12-05): at 512 a ping waited up to 55-90 ms and
    the burst's acks took p50 ~175 ms; at 256, 40-60 ms and ~155 ms, for 2-3 % less saturated
    throughput; at 128, 20-38 ms and ~150 ms, but 3-8 % less throughput."""
    epoch: int | None = None
    engine: Engine = field(init=False)
    timelines: dict[str, list[Event]] = field(init=False, default_factory=dict)
    healthy: bool = field(init=False, default=False)
    _inbox: asyncio.Queue[_Item] = field(init=False)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    _stopped: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._inbox = asyncio.Queue()
        self.engine = self.make_engine()

    # ------------------------------------------------------------------ lifecycle

    async def load(self, previous: Engine | None = None) -> int:
        """Replay the town's log into a fresh engine; resume every clock. Returns events read.

        Positions are not in the log: they are carried over from ``previous`` (or from the
        engine being replaced)."""
        engine = self.make_engine()
        _carry_positions(previous or self.engine, engine)
        timelines: dict[str, list[Event]] = {}
        records = await self.log.read(self.town)
        events = [decode_event(r.data) for r in records]
        engine.replay(events)
        for ev in events:
            _add_timeline(timelines, ev)
        engine.recover(self.clock.now())
        self.engine = engine
        self.timelines = timelines
        self.sink.loaded(self, events)
        self.healthy = True
        return len(events)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"town-{self.town}")

    async def stop(self) -> None:
        """Finish what is queued (so nothing accepted is dropped), then stop."""
        if self._task is None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Item(None, done, query=lambda _e: None))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(done), 10)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        # Whoever still holds this runner (a cluster slot while the town changes hands) gets
        # `unavailable` at once instead of waiting on an inbox nobody reads.
        self._stopped = True
        self.healthy = False
        self._fail_queued()

    # ------------------------------------------------------------------ API for handlers

    async def submit(
        self, command: Command, after: Callable[[Engine, Outcome], Any] | None = None
    ) -> Any:
        """Run a command; returns its :class:`Outcome` (or what ``after`` returned) once durable.

        ``after(engine, outcome)`` runs in the writer right after the batch became durable, before
        any later command: the place to take a consistent view (a device's welcome)."""
        return await self.enqueue(command, after)

    def enqueue(
        self, command: Command, after: Callable[[Engine, Outcome], Any] | None = None
    ) -> asyncio.Future[Any]:
        """:meth:`submit` without a coroutine: the future resolves once durable."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._stopped:
            fut.set_exception(_not_serving())
            return fut
        self._inbox.put_nowait(_Item(command, fut, after))
        return fut

    def send(self, command: Command, reply: Callable[[Any, BaseException | None], None]) -> None:
        """Queue a command; ``reply(outcome, error)`` is called once it is durable (or failed).

        The hot path (one per client message): no task and no future, and the answer goes out
        with the commit's other frames (:class:`Reply`)."""
        answer = Reply(reply)
        if self._stopped:
            answer.set_exception(_not_serving())
            return
        self._inbox.put_nowait(_Item(command, answer))

    async def query(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` at a quiet point: everything before it is durable and published."""
        if self._stopped:
            raise _not_serving()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Item(None, fut, query=fn))
        return await fut

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        inbox = self._inbox
        while True:
            if not self.healthy:
                await self._recover()
                continue
            deadline = self.engine.next_deadline()
            item: _Item | None = None
            if deadline is None:
                item = await inbox.get()
            else:
                delay = deadline - self.clock.now()
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            item = await inbox.get()
                    except TimeoutError:
                        item = None
                elif not inbox.empty():
                    item = inbox.get_nowait()
            batch: list[_Item] = [] if item is None else [item]
            while len(batch) < self.max_batch and not inbox.empty():
                batch.append(inbox.get_nowait())
            try:
                await self._process(batch)
            except Exception:  # a bug: keep the town alive, rebuild from the log
                log.exception("town writer failed; rebuilding from the log", town=self.town)
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(Rejected("internal", "Internal error; retry."))
                self.healthy = False

    async def _process(self, batch: list[_Item]) -> None:
        engine = self.engine
        now = self.clock.now()
        events: list[Event] = []
        notices: list[Notice] = []
        done: list[_Done] = []
        tick = engine.tick(now)
        events.extend(tick.events)
        notices.extend(tick.notices)
        for i, item in enumerate(batch):
            if item.query is not None:
                if events or done:
                    if not await self._commit(events, notices, done):
                        for rest in batch[i:]:
                            if not rest.future.done():
                                rest.future.set_exception(_unavailable())
                        return
                    events, notices, done = [], [], []
                try:
                    item.future.set_result(item.query(self.engine))
                except Exception as err:
                    item.future.set_exception(err)
                continue
            assert item.command is not None
            try:
                outcome = self.engine.handle(item.command, now)
            except Rejected as rej:
                done.append(_Done(item.future, rej))
                continue
            events.extend(outcome.events)
            notices.extend(outcome.notices)
            done.append(_Done(item.future, outcome, item.after))
        if events or done:
            await self._commit(events, notices, done)

    async def _commit(self, events: list[Event], notices: list[Notice], done: list[_Done]) -> bool:
        with sent_together():
            return await self._commit_sent_together(events, notices, done)

    async def _commit_sent_together(
        self, events: list[Event], notices: list[Notice], done: list[_Done]
    ) -> bool:
        if events:
            records = [Record(ev.seq, encode_event(ev)) for ev in events]
            t0 = time.perf_counter()
            try:
                await self.log.append(self.town, records, epoch=self.epoch)
            except LogError as err:
                self.metrics.append_errors.inc()
                log.warning(
                    "log append failed; nothing acknowledged",
                    town=self.town,
                    error=str(err),
                    events=len(events),
                )
                for d in done:
                    if not d.future.done():
                        d.future.set_exception(_unavailable())
                self.healthy = False
                return False
            self.metrics.append_latency.observe(time.perf_counter() - t0)
            self.metrics.append_batch.observe(len(events))
            for ev in events:
                self.metrics.observe_event(ev)
                _add_timeline(self.timelines, ev)
            self.sink.publish(self, events)
        if notices:
            self.sink.notify(self, notices)
        for d in done:
            if d.future.done():
                continue
            if isinstance(d.outcome, BaseException):
                d.future.set_exception(d.outcome)
                continue
            if d.after is not None:
                try:
                    d.future.set_result(d.after(self.engine, d.outcome))
                except Exception as err:
                    d.future.set_exception(err)
            else:
                d.future.set_result(d.outcome)
        return True

    async def _recover(self) -> None:
        """Rebuild the engine from the log, retrying while the log is unreachable."""
        delay = 0.1
        while True:
            try:
                n = await self.load()
                log.info("town rebuilt from the log", town=self.town, events=n)
                return
            except LogError as err:
                log.warning("log unreachable; retrying", town=self.town, error=str(err))
                self._fail_queued()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _fail_queued(self) -> None:
        while not self._inbox.empty():
            it = self._inbox.get_nowait()
            if not it.future.done():
                it.future.set_exception(_unavailable())


def _unavailable() -> Rejected:
    return Rejected("unavailable", "The change could not be made durable right now; retry shortly.")


def _not_serving() -> Rejected:
    return Rejected(
        "unavailable",
        "This town is not served here right now (changing hands, or its event log is "
        "unavailable); retry shortly.",
    )


def _add_timeline(timelines: dict[str, list[Event]], ev: Event) -> None:
    inc = getattr(ev, "incident", None)
    if isinstance(inc, str):
        timelines.setdefault(inc, []).append(ev)


def _carry_positions(old: Engine, new: Engine) -> None:
    """Positions are not in the log: keep them across a rebuild."""
    for rid in old.state.responders:
        pos = old.state.index.position(rid)
        if pos is not None:
            new.position(rid, *pos)
