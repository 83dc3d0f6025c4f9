"""Fan-out: durable events to wall screens, notices to field devices, coalesced positions.

Each event is encoded once per screen scope it falls in (an incident's level-2 and level-1
grids; a responder's home grid's ancestors) that some screen watches, and queued to the outbox of
every such screen; the frames differ only in ``prev``, the scope's previous event. The last
``ring_size`` events of each town are kept so a screen that reconnects with ``since`` is sent
exactly what it missed; older than that, it gets a fresh snapshot. An event no screen was
watching stays unencoded in the ring until a resuming screen needs it: with no screen up (or
none on its scopes) the town writer builds no frames at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from dispatch.engine.commands import Notice
from dispatch.engine.engine import Engine
from dispatch.engine.events import Event, IncidentReported
from dispatch.server.auth import Principal
from dispatch.server.metrics import Metrics
from dispatch.server.outbox import Outbox
from dispatch.stats import compute_stats, keep_up
from dispatch.wire.codec import dumps, event_wire, iso
from dispatch.wire.objects import incident_obj, responder_obj

log = structlog.get_logger("dispatch.hub")

if TYPE_CHECKING:
    from dispatch.server.town import TownRunner


@dataclass(eq=False, slots=True)
class Screen:
    outbox: Outbox
    town: str
    scope: str
    principal: Principal


@dataclass(eq=False, slots=True)
class _Published:
    """One event in a town's resume ring, with its frame for each scope once some screen of that
    scope needed it (``prevs[i]`` belongs to ``scopes[i]``)."""

    seq: int
    scopes: tuple[str, ...]
    prevs: tuple[int, ...]
    event: Event
    frames: dict[str, bytes] | None = None

    def frame(self, scope: str) -> bytes:
        frames = self.frames
        if frames is None:
            frames = self.frames = {}
        frame = frames.get(scope)
        if frame is None:
            frame = frames[scope] = event_frame(self.event, self.prevs[self.scopes.index(scope)])
        return frame


@dataclass(eq=False, slots=True)
class _TownFeed:
    ring: deque[_Published]
    screens: dict[str, set[Screen]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    last: dict[str, int] = field(default_factory=dict)
    """Per scope, the seq of the last event published in it (the next one's ``prev``)."""

    def add(self, ev: Event, scopes: tuple[str, ...]) -> _Published:
        last = self.last
        prevs = tuple([last.get(s, 0) for s in scopes])
        for s in scopes:
            last[s] = ev.seq
        published = _Published(ev.seq, scopes, prevs, ev)
        self.ring.append(published)
        return published


def event_frame(ev: Event, prev: int) -> bytes:
    """An ``event`` frame. ``prev`` is the seq of the previous event in the same screen scope: a
    village screen sees the town's seqs with holes (other villages' events), so it finds a gap
    by ``prev`` > the last seq it applied, not by seq > last + 1."""
    return dumps({"type": "event", "seq": ev.seq, "prev": prev, "event": event_wire(ev)})


class Hub:
    def __init__(self, metrics: Metrics, ring_size: int = 50_000, stats_config: Any = None) -> None:
        self.metrics = metrics
        self.ring_size = ring_size
        self.stats_config = stats_config
        self.towns: dict[str, _TownFeed] = {}
        self.runners: dict[str, TownRunner] = {}
        self.devices: dict[str, set[Outbox]] = {}

    def feed(self, town: str) -> _TownFeed:
        f = self.towns.get(town)
        if f is None:
            f = self.towns[town] = _TownFeed(ring=deque(maxlen=self.ring_size))
        return f

    # ------------------------------------------------------------------ events (Sink)

    def loaded(self, runner: TownRunner, events: list[Event]) -> None:
        """The town was (re)built from the log: refill the resume ring from its tail."""
        self.runners[runner.town] = runner
        f = self.feed(runner.town)
        f.ring.clear()
        f.last.clear()
        for ev in events[-self.ring_size :]:
            f.add(ev, self._scopes(runner.engine, ev))

    def publish(self, runner: TownRunner, events: list[Event]) -> None:
        f = self.feed(runner.town)
        engine = runner.engine
        screens = f.screens
        for ev in events:
            published = f.add(ev, self._scopes(engine, ev))
            if not screens:  # nobody watches: encoded if a screen ever resumes past it
                continue
            for s in published.scopes:
                subs = screens.get(s)
                if subs:
                    frame = published.frame(s)
                    for screen in subs:
                        screen.outbox.send(frame)

    @staticmethod
    def _scopes(engine: Engine, ev: Event) -> tuple[str, ...]:
        if isinstance(ev, IncidentReported):
            return (ev.grids["2"], ev.grids["1"])
        inc_id = getattr(ev, "incident", None)
        if isinstance(inc_id, str):
            inc = engine.state.incidents.get(inc_id)
            return (inc.grids["2"], inc.grids["1"]) if inc else ()
        rid = getattr(ev, "responder", None)
        r = engine.state.responders.get(rid) if isinstance(rid, str) else None
        return engine.town.screen_scopes(r.info.home_grid) if r else ()

    # ------------------------------------------------------------------ devices

    def add_device(self, rid: str, outbox: Outbox) -> None:
        self.devices.setdefault(rid, set()).add(outbox)

    def remove_device(self, rid: str, outbox: Outbox) -> int:
        """Forget a device connection; returns how many remain for that responder."""
        conns = self.devices.get(rid)
        if not conns:
            return 0
        conns.discard(outbox)
        if not conns:
            del self.devices[rid]
            return 0
        return len(conns)

    def notify(self, runner: TownRunner, notices: list[Notice]) -> None:
        engine = runner.engine
        for n in notices:
            conns = self.devices.get(n.responder)
            if not conns:
                continue
            frame = notice_frame(engine, n)
            if frame is None:
                continue
            for outbox in conns:
                outbox.send(frame)

    # ------------------------------------------------------------------ screens

    def attach_screen(self, engine: Engine, screen: Screen, since: int | None, now: float) -> str:
        """Run inside the town writer (quiet point). Sends what the screen missed, or a
        snapshot, then subscribes it so every later event reaches it exactly once."""
        f = self.feed(screen.town)
        seq = engine.state.seq
        mode = "snapshot"
        if since is not None and since <= seq:
            ring = f.ring
            if since == seq or (ring and ring[0].seq <= since + 1):
                scope = screen.scope
                missed = [p.frame(scope) for p in ring if p.seq > since and scope in p.scopes]
                if len(missed) < screen.outbox.limit // 2:
                    for fr in missed:
                        screen.outbox.send(fr)
                    mode = "resumed"
        if mode == "snapshot":
            screen.outbox.send(dumps(self.snapshot(engine, screen.scope, now)))
        f.screens.setdefault(screen.scope, set()).add(screen)
        return mode

    def detach_screen(self, screen: Screen) -> None:
        f = self.towns.get(screen.town)
        if f is not None:
            subs = f.screens.get(screen.scope)
            if subs is not None:
                subs.discard(screen)
                if not subs:
                    del f.screens[screen.scope]

    def snapshot(self, engine: Engine, scope: str, now: float) -> dict[str, Any]:
        state = engine.state
        town = engine.town
        incidents = [
            incident_obj(
                state.incidents[i], verify=town.categories[state.incidents[i].category].verify
            )
            for i in sorted(state.open_ids)
            if scope in state.incidents[i].grids.values()
        ]
        responders = [
            responder_obj(r, state.index.position(rid))
            for rid, r in state.responders.items()
            if town.in_subtree(r.info.home_grid, scope)
        ]
        return {
            "type": "snapshot",
            "seq": state.seq,
            "scope": scope,
            "server_time": iso(now),
            "incidents": incidents,
            "responders": responders,
            "departments": sorted(engine.departments),
            "stats": compute_stats(engine, scope, now, self.stats_config),
        }

    def screens_of(self, town: str) -> Iterable[tuple[str, set[Screen]]]:
        f = self.towns.get(town)
        return list(f.screens.items()) if f else []

    def all_outboxes(self) -> list[Outbox]:
        out = [o for conns in self.devices.values() for o in conns]
        for f in self.towns.values():
            for subs in f.screens.values():
                out.extend(s.outbox for s in subs)
        return out

    # ------------------------------------------------------------------ positions and stats

    def moved(self, town: str, rid: str) -> None:
        self.feed(town).dirty.add(rid)

    def moved_set(self, town: str) -> set[str]:
        """The set a connection adds its responder to after each position (:meth:`moved`
        without the calls, for the hot path). The same set for the life of the hub."""
        return self.feed(town).dirty

    def flush_positions(self) -> None:
        for town, f in self.towns.items():
            if not f.dirty:
                continue
            dirty = list(f.dirty)
            f.dirty.clear()
            runner = self.runners.get(town)
            if runner is None or not f.screens:
                continue
            state = runner.engine.state
            per_scope: dict[str, list[list[Any]]] = {}
            for rid in dirty:
                r = state.responders.get(rid)
                pos = state.index.position(rid)
                if r is None or pos is None:
                    continue
                item = [rid, pos[0], pos[1], r.status]
                for s in runner.engine.town.screen_scopes(r.info.home_grid):
                    if s in f.screens:
                        per_scope.setdefault(s, []).append(item)
            for s, items in per_scope.items():
                frame = dumps({"type": "positions", "items": items})
                for screen in f.screens.get(s, ()):
                    screen.outbox.send(frame)

    def push_stats(self, now: float) -> None:
        for town, f in self.towns.items():
            runner = self.runners.get(town)
            if runner is None:
                continue
            for scope, subs in list(f.screens.items()):
                if not subs:
                    continue
                stats = compute_stats(runner.engine, scope, now, self.stats_config)
                frame = dumps({"type": "stats", "scope": scope, **stats})
                for screen in subs:
                    screen.outbox.send(frame)

    async def keep_stats_up(self, clock: Any, every: float = 0.1) -> None:
        """Let the statistics index file what changed, ten times a second: at 1,000 reports a
        second that is ~100 closed cases a step, a millisecond or two, where leaving it to a
        screen's refresh every 5 s made one step of tens of milliseconds."""
        while True:
            await asyncio.sleep(every)
            try:
                t = clock.now()
                for runner in list(self.runners.values()):
                    keep_up(runner.engine, t, self.stats_config)
            except Exception:
                log.exception("statistics index failed to keep up")

    async def run_periodic(self, position_every: float, stats_every: float, clock: Any) -> None:
        next_stats = 0.0
        while True:
            await asyncio.sleep(position_every)
            try:
                self.flush_positions()
                t = clock.now()
                if t >= next_stats:
                    next_stats = t + stats_every
                    self.push_stats(t)
            except Exception:
                log.exception("periodic push to screens failed")


def notice_frame(engine: Engine, n: Notice) -> bytes | None:
    state = engine.state
    inc = state.incidents.get(n.incident)
    if inc is None:
        return None
    verify = engine.town.categories[inc.category].verify
    if n.kind == "offer":
        if inc.status != "offered" or inc.responder != n.responder:
            return None
        return dumps(
            {
                "type": "offer",
                "incident": incident_obj(inc, verify=verify),
                "expires_at": iso(inc.offer_expires_at),
            }
        )
    if n.kind == "offer_revoked":
        return dumps({"type": "offer_revoked", "incident": inc.id, "reason": n.reason})
    if n.kind == "assigned":
        if inc.responder != n.responder:
            return None
        return dumps({"type": "assigned", "incident": incident_obj(inc, verify=verify)})
    return dumps({"type": "incident", "incident": incident_obj(inc, verify=verify)})
