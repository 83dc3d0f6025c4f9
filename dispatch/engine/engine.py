"""The dispatch engine of one town: commands and ``now`` in, events and notices out.

Sans-I/O, like ``websockets.protocol`` and ``h11``: the engine never reads a clock, never sleeps
and never touches a socket or a disk. The shell (``dispatch.server.town``) drives it:

1. ``engine.tick(now)`` turns every timer that fell due into events (offer expiry, level time
   limits, going offline);
2. ``engine.handle(command, now)`` checks the command against the rules and returns an
   :class:`Outcome` (events already applied to ``engine.state``, notices for devices, a result);
   a rejected command raises :class:`~dispatch.errors.Rejected` and changes nothing;
3. the shell appends the events to the log and, once durable, acknowledges and sends notices;
4. it sleeps until ``engine.next_deadline()`` or the next command.

After an append fails, the engine's state is ahead of the log: the shell must throw it away and
rebuild it from the log (:meth:`Engine.replay`).

Every dispatch rule of PROTOCOL.md lives here under its own name: :meth:`Engine._dispatch`
(pools, nearest eligible, pass-on), :meth:`Engine._escalate` (the five reasons),
:meth:`Engine._expire_offer`, :meth:`Engine._level_time_limit`, :meth:`Engine._go_offline`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from dispatch.engine.commands import (
    Accept,
    Arrive,
    Assign,
    Close,
    Command,
    Connect,
    Decline,
    Disconnect,
    Escalate,
    Notice,
    Reopen,
    Report,
    RequestEscalation,
    Resolve,
    SetDuty,
    Transfer,
    Verify,
)
from dispatch.engine.events import (
    EscalationReason,
    Event,
    IncidentArrived,
    IncidentAssigned,
    IncidentClosed,
    IncidentDeclined,
    IncidentEscalated,
    IncidentOffered,
    IncidentOfferExpired,
    IncidentOverdue,
    IncidentReopened,
    IncidentReported,
    IncidentResolved,
    IncidentTransferred,
    ResponderPresence,
    ResponderStatus,
)
from dispatch.engine.model import Locator, ResponderIndex, Timing, Town
from dispatch.engine.state import (
    Incident,
    Responder,
    TownState,
    apply,
    department_pool,
    ref_key,
)
from dispatch.errors import Rejected

UNRESOLVED = frozenset({"new", "offered", "assigned", "on_scene"})


@dataclass(slots=True)
class Outcome:
    """What one command (or one tick) produced."""

    events: list[Event] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    incident: str | None = None
    """For ``Report``: the incident id (new or, for a repeated ``ref``, the existing one)."""


class Engine:
    """One town's rules. Not thread-safe: one task (the town's single writer) owns it."""

    def __init__(self, town: Town, index: ResponderIndex, locator: Locator, timing: Timing) -> None:
        self.town = town
        self.locator = locator
        self.timing = timing
        self.state = TownState.new(town, index)
        self._out: Outcome = Outcome()
        self.departments: frozenset[str] = frozenset(
            r.department for r in town.roster.values() if r.department
        )

    # ------------------------------------------------------------------ replay and views

    def replay(self, events: Iterable[Event]) -> None:
        """Fold stored events into the state (start-up, or rebuilding after a failed append)."""
        for event in events:
            apply(self.state, event)

    def recover(self, now: float) -> None:
        """After replay at start-up: no device is connected yet, so every responder the log says
        is online starts its ``offline_after`` clock now. Offers and time limits that fell due
        while the server was down are already timers and fire at the next :meth:`tick`."""
        for r in self.state.responders.values():
            if r.online:
                self._start_offline_clock(r, now)

    def incident(self, incident_id: str) -> Incident:
        inc = self.state.incidents.get(incident_id)
        if inc is None:
            raise Rejected(
                "not_found", f"There is no incident {incident_id!r} in town {self.town.id}."
            )
        return inc

    def responder(self, responder_id: str) -> Responder:
        r = self.state.responders.get(responder_id)
        if r is None:
            raise Rejected(
                "not_found", f"There is no responder {responder_id!r} in town {self.town.id}."
            )
        return r

    def held_by(self, responder_id: str) -> Incident | None:
        r = self.state.responders.get(responder_id)
        if r is None or r.incident is None:
            return None
        return self.state.incidents.get(r.incident)

    def position(self, responder_id: str, lon: float, lat: float, ts: float) -> None:
        """A position report. Positions are not events: they only feed the index."""
        self.state.index.move(responder_id, lon, lat, ts)

    def candidates(self, incident_id: str, now: float, k: int = 10) -> list[tuple[str, float]]:
        """The nearest available eligible responders for an operator's assign dialog."""
        inc = self.incident(incident_id)
        return self.state.index.nearest(
            self._pool(inc),
            inc.lon,
            inc.lat,
            skill=inc.category,
            fresh_since=now - self.timing.position_stale_after,
            exclude=inc.refused,
            k=k,
        )

    # ------------------------------------------------------------------ clocks

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do, or ``None``."""
        timers = self.state.timers
        while timers and not self._timer_live(*timers[0]):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def tick(self, now: float) -> Outcome:
        """Turn every timer due at or before ``now`` into events."""
        self._out = out = Outcome()
        timers = self.state.timers
        while timers and timers[0][0] <= now:
            due, kind, key = heapq.heappop(timers)
            if not self._timer_live(due, kind, key):
                continue
            if kind == "offer":
                self._expire_offer(self.state.incidents[key], now, "timeout")
            elif kind == "deadline":
                self._level_time_limit(self.state.incidents[key], now)
            else:
                self._go_offline(self.state.responders[key], now)
        return out

    def _timer_live(self, due: float, kind: str, key: str) -> bool:
        if kind == "offline":
            r = self.state.responders.get(key)
            return r is not None and r.offline_due == due
        inc = self.state.incidents.get(key)
        if inc is None:
            return False
        if kind == "offer":
            return inc.status == "offered" and inc.offer_expires_at == due
        return inc.status in UNRESOLVED and inc.deadline == due and not inc.overdue

    # ------------------------------------------------------------------ commands

    def handle(self, command: Command, now: float) -> Outcome:
        """Carry out one command. Raises :class:`Rejected` (state unchanged) when it breaks a
        rule; checks all come before the first event, so a rejection never half-applies."""
        self._out = out = Outcome()
        match command:
            case Report():
                out.incident = self._report(command, now)
            case Connect():
                self._connect(command, now)
            case Disconnect():
                r = self.responder(command.responder)
                if r.online:
                    self._start_offline_clock(r, now)
            case SetDuty():
                self._set_duty(command, now)
            case Accept():
                self._accept(command, now)
            case Decline():
                self._decline(command, now)
            case Arrive():
                self._arrive(command, now)
            case Resolve():
                self._resolve(command, now)
            case RequestEscalation():
                self._request_escalation(command, now)
            case Verify():
                self._verify(command, now)
            case Assign():
                self._assign(command, now)
            case Transfer():
                self._transfer(command, now)
            case Escalate():
                inc = self._operator_target(command.incident, command.scope, unresolved=True)
                if inc.level <= 1:
                    raise Rejected(
                        "conflict",
                        f"Incident {inc.id} is already at the town level (1); "
                        "assign or transfer it instead.",
                    )
                self._escalate(inc, "operator", now, by=command.actor, note=command.note)
            case Close():
                self._close(command, now)
            case Reopen():
                self._reopen(command, now)
        return out

    # ------------------------------------------------------------------ field rules

    def _report(self, cmd: Report, now: float) -> str:
        existing = self.state.refs.get(ref_key(cmd.actor, cmd.ref))
        if existing is not None:
            return existing
        category = self.town.categories.get(cmd.category)
        if category is None:
            known = ", ".join(sorted(self.town.categories)[:30])
            raise Rejected(
                "unknown_category", f"Unknown category {cmd.category!r}; known categories: {known}."
            )
        if not (math.isfinite(cmd.lon) and math.isfinite(cmd.lat)):
            raise Rejected("bad_message", "lon and lat must be finite numbers.")
        located = self.locator.locate(cmd.lon, cmd.lat)
        if located is None or located.g1 != self.town.id:
            raise Rejected(
                "outside_area",
                f"The point lon={cmd.lon}, lat={cmd.lat} is in no grid of town {self.town.id}.",
            )
        priority = cmd.priority if cmd.priority is not None else category.priority
        seq = self._seq()
        inc_id = f"{self.town.id}-{seq:06d}"
        self._emit(
            IncidentReported(
                seq=seq,
                at=now,
                incident=inc_id,
                ref=cmd.ref,
                category=cmd.category,
                priority=priority,
                lon=cmd.lon,
                lat=cmd.lat,
                grids=located.as_dict(),
                level=3,
                source=cmd.source,
                deadline=now + category.limits[3],
                description=cmd.description,
                reporter=cmd.actor,
                handled=cmd.handled,
                photos=list(cmd.photos),
            )
        )
        inc = self.state.incidents[inc_id]
        if cmd.handled:
            fixer = cmd.actor if cmd.actor in self.state.responders else None
            self._emit(
                IncidentResolved(
                    seq=self._seq(),
                    at=now,
                    incident=inc_id,
                    responder=fixer,
                    by=cmd.actor,
                    note="handled on the spot",
                )
            )
            self._emit(
                IncidentClosed(
                    seq=self._seq(),
                    at=now,
                    incident=inc_id,
                    by=cmd.actor,
                    note="handled on the spot",
                    on_time=True,
                )
            )
        else:
            self._dispatch(inc, now)
        return inc_id

    def _connect(self, cmd: Connect, now: float) -> None:
        r = self.responder(cmd.responder)
        r.offline_due = None
        if not r.online:
            self._emit(ResponderPresence(seq=self._seq(), at=now, responder=r.info.id, online=True))

    def _set_duty(self, cmd: SetDuty, now: float) -> None:
        r = self.responder(cmd.responder)
        if cmd.status not in ("available", "off_duty"):
            raise Rejected("bad_message", "status must be 'available' or 'off_duty'.")
        off = cmd.status == "off_duty"
        if r.off_duty == off and r.online:
            return
        self._emit(
            ResponderPresence(
                seq=self._seq(),
                at=now,
                responder=r.info.id,
                online=True,
                duty="off" if off else "on",
            )
        )
        held = self.held_by(r.info.id)
        if off and held is not None and held.status == "offered":
            self._emit(
                IncidentDeclined(
                    seq=self._seq(),
                    at=now,
                    incident=held.id,
                    responder=r.info.id,
                    reason="off_duty",
                )
            )
            self._dispatch(held, now)

    def _accept(self, cmd: Accept, now: float) -> None:
        inc = self.incident(cmd.incident)
        self.responder(cmd.responder)
        if inc.responder == cmd.responder and inc.status in ("assigned", "on_scene"):
            return
        if inc.status != "offered" or inc.responder != cmd.responder:
            raise Rejected(
                "conflict",
                f"The offer of incident {inc.id} is no longer open to you "
                "(it expired, passed on or was withdrawn).",
            )
        self._emit(
            IncidentAssigned(seq=self._seq(), at=now, incident=inc.id, responder=cmd.responder)
        )

    def _decline(self, cmd: Decline, now: float) -> None:
        inc = self.incident(cmd.incident)
        self.responder(cmd.responder)
        if inc.status != "offered" or inc.responder != cmd.responder:
            return
        self._emit(
            IncidentDeclined(
                seq=self._seq(),
                at=now,
                incident=inc.id,
                responder=cmd.responder,
                reason=cmd.reason,
            )
        )
        self._dispatch(inc, now)

    def _holder_check(self, inc: Incident, rid: str, what: str) -> None:
        self.responder(rid)
        if inc.responder != rid or inc.status not in ("assigned", "on_scene"):
            raise Rejected(
                "conflict", f"You cannot {what} incident {inc.id}: it is not assigned to you."
            )

    def _arrive(self, cmd: Arrive, now: float) -> None:
        inc = self.incident(cmd.incident)
        self._holder_check(inc, cmd.responder, "arrive at")
        if inc.status == "on_scene":
            return
        self._emit(
            IncidentArrived(seq=self._seq(), at=now, incident=inc.id, responder=cmd.responder)
        )

    def _resolve(self, cmd: Resolve, now: float) -> None:
        inc = self.incident(cmd.incident)
        if inc.status in ("resolved", "closed") and inc.resolved_by == cmd.responder:
            return
        self._holder_check(inc, cmd.responder, "resolve")
        self._emit(
            IncidentResolved(
                seq=self._seq(), at=now, incident=inc.id, responder=cmd.responder, note=cmd.note
            )
        )
        if not self.town.categories[inc.category].verify:
            self._emit(
                IncidentClosed(
                    seq=self._seq(), at=now, incident=inc.id, by=cmd.responder, on_time=inc.on_time
                )
            )

    def _request_escalation(self, cmd: RequestEscalation, now: float) -> None:
        inc = self.incident(cmd.incident)
        self.responder(cmd.responder)
        if inc.responder != cmd.responder or inc.status not in ("offered", "assigned", "on_scene"):
            raise Rejected(
                "conflict",
                f"You cannot escalate incident {inc.id}: it is not offered or assigned to you.",
            )
        if inc.level <= 1:
            raise Rejected(
                "conflict",
                f"Incident {inc.id} is already at the town level; call the town command centre.",
            )
        self._escalate(inc, "requested", now, note=cmd.reason, by=cmd.responder)

    def _verify(self, cmd: Verify, now: float) -> None:
        inc = self.incident(cmd.incident)
        if inc.status != "resolved":
            raise Rejected(
                "conflict", f"Incident {inc.id} is {inc.status}, not awaiting verification."
            )
        if inc.reporter != cmd.responder:
            raise Rejected("forbidden", f"Only its reporter or an operator may close {inc.id}.")
        if inc.resolved_by == cmd.responder:
            raise Rejected(
                "forbidden", f"Incident {inc.id} must be verified by someone other than its fixer."
            )
        self._emit(
            IncidentClosed(
                seq=self._seq(),
                at=now,
                incident=inc.id,
                by=cmd.responder,
                note=cmd.note,
                on_time=inc.on_time,
            )
        )

    # ------------------------------------------------------------------ operator rules

    def _operator_target(
        self, incident_id: str, scope: str | None, *, unresolved: bool
    ) -> Incident:
        inc = self.incident(incident_id)
        if scope is not None and scope not in inc.grids.values():
            raise Rejected("forbidden", f"Incident {inc.id} is outside your scope {scope}.")
        if unresolved and inc.status not in UNRESOLVED:
            raise Rejected("conflict", f"Incident {inc.id} is already {inc.status}.")
        return inc

    def _assign(self, cmd: Assign, now: float) -> None:
        inc = self._operator_target(cmd.incident, cmd.scope, unresolved=True)
        r = self.responder(cmd.responder)
        if (
            cmd.scope is not None
            and r.info.kind != "department"
            and not self.town.in_subtree(r.info.home_grid, cmd.scope)
        ):
            raise Rejected("forbidden", f"Responder {r.info.id} is outside your scope {cmd.scope}.")
        if inc.responder == r.info.id and inc.status in ("assigned", "on_scene"):
            return
        offered_here = inc.responder == r.info.id and inc.status == "offered"
        if not offered_here and r.status != "available":
            raise Rejected(
                "conflict",
                f"Responder {r.info.id} is {r.status}"
                + (f" (holding {r.incident})" if r.incident else "")
                + "; choose an available responder.",
            )
        self._emit(
            IncidentAssigned(
                seq=self._seq(), at=now, incident=inc.id, responder=r.info.id, by=cmd.actor
            )
        )

    def _transfer(self, cmd: Transfer, now: float) -> None:
        inc = self._operator_target(cmd.incident, cmd.scope, unresolved=True)
        if cmd.department not in self.departments:
            known = ", ".join(sorted(self.departments))
            raise Rejected(
                "not_found", f"No department {cmd.department!r} in the roster; known: {known}."
            )
        self._emit(
            IncidentTransferred(
                seq=self._seq(),
                at=now,
                incident=inc.id,
                department=cmd.department,
                responder=inc.responder,
                by=cmd.actor,
            )
        )
        self._dispatch(inc, now)

    def _close(self, cmd: Close, now: float) -> None:
        inc = self._operator_target(cmd.incident, cmd.scope, unresolved=False)
        if inc.status == "closed":
            raise Rejected("conflict", f"Incident {inc.id} is already closed.")
        on_time = inc.on_time and (
            inc.resolved_at is not None or inc.deadline is None or now <= inc.deadline
        )
        self._emit(
            IncidentClosed(
                seq=self._seq(),
                at=now,
                incident=inc.id,
                by=cmd.actor,
                note=cmd.note,
                on_time=on_time,
            )
        )

    def _reopen(self, cmd: Reopen, now: float) -> None:
        inc = self._operator_target(cmd.incident, cmd.scope, unresolved=False)
        if inc.status != "closed":
            raise Rejected("conflict", f"Incident {inc.id} is {inc.status}, not closed.")
        level = inc.closed_level or inc.level
        limit = self.town.categories[inc.category].limits[level]
        self._emit(
            IncidentReopened(
                seq=self._seq(),
                at=now,
                incident=inc.id,
                level=level,
                deadline=now + limit,
                by=cmd.actor,
                note=cmd.note,
            )
        )
        self._dispatch(inc, now)

    # ------------------------------------------------------------------ dispatch rules

    def _pool(self, inc: Incident) -> str:
        """Rule 3: the pool at level 3 is the basic grid's responders, at level 2 the village's
        subtree, at level 1 the whole town; a transferred incident goes to its department."""
        if inc.department is not None:
            return department_pool(inc.department)
        return inc.grids[str(inc.level)]

    def _dispatch(self, inc: Incident, now: float) -> None:
        """Rules 3–5: offer to the nearest eligible responder of the pool, else escalate (or wait,
        at level 1 and for departments, for an operator)."""
        exclude = inc.tried + inc.refused if inc.refused else inc.tried
        found = self.state.index.nearest(
            self._pool(inc),
            inc.lon,
            inc.lat,
            skill=inc.category,
            fresh_since=now - self.timing.position_stale_after,
            exclude=exclude,
            k=1,
        )
        if found:
            rid, metres = found[0]
            self._emit(
                IncidentOffered(
                    seq=self._seq(),
                    at=now,
                    incident=inc.id,
                    responder=rid,
                    expires_at=now + self.timing.offer_timeout,
                    distance_m=round(metres, 1),
                )
            )
        elif inc.department is None and inc.level > 1:
            self._escalate(inc, "declined" if inc.tried else "no_responder", now)

    def _escalate(
        self,
        inc: Incident,
        reason: EscalationReason,
        now: float,
        *,
        by: str | None = None,
        note: str = "",
    ) -> None:
        """Rule 5: move up one level, release the holder, restart the clock, dispatch again."""
        to_level = inc.level - 1
        self._emit(
            IncidentEscalated(
                seq=self._seq(),
                at=now,
                incident=inc.id,
                from_level=inc.level,
                to_level=to_level,
                reason=reason,
                deadline=now + self.town.categories[inc.category].limits[to_level],
                responder=inc.responder,
                by=by,
                note=note,
            )
        )
        self._dispatch(inc, now)

    def _expire_offer(self, inc: Incident, now: float, reason: str) -> None:
        """Rule 4: an offer not accepted in time (or whose holder went offline) passes on."""
        assert inc.responder is not None
        self._emit(
            IncidentOfferExpired(
                seq=self._seq(), at=now, incident=inc.id, responder=inc.responder, reason=reason
            )
        )
        self._dispatch(inc, now)

    def _level_time_limit(self, inc: Incident, now: float) -> None:
        """Rule 5/6: past its level's time limit an incident escalates; at level 1 it is overdue."""
        if inc.level > 1:
            self._escalate(inc, "sla", now)
        else:
            self._emit(IncidentOverdue(seq=self._seq(), at=now, incident=inc.id, level=inc.level))

    def _start_offline_clock(self, r: Responder, now: float) -> None:
        r.offline_due = now + self.timing.offline_after
        self.state.push_timer(r.offline_due, "offline", r.info.id)

    def _go_offline(self, r: Responder, now: float) -> None:
        """Availability: offline once the last connection has been gone ``offline_after``;
        an offer it holds passes on at once. Offline first, then the offer: passing it on may
        escalate it, and the next level's pool must not find this responder still available."""
        r.offline_due = None
        held = self.held_by(r.info.id)
        self._emit(ResponderPresence(seq=self._seq(), at=now, responder=r.info.id, online=False))
        if held is not None and held.status == "offered":
            self._expire_offer(held, now, "offline")

    # ------------------------------------------------------------------ emitting

    def _seq(self) -> int:
        return self.state.seq + 1

    def _emit(self, event: Event) -> None:
        """Apply one event, collect it, derive device notices and ``responder.status`` events."""
        state = self.state
        touched: list[str] = []
        rid = getattr(event, "responder", None)
        if isinstance(rid, str):
            touched.append(rid)
        inc_id = getattr(event, "incident", None)
        inc = state.incidents.get(inc_id) if isinstance(inc_id, str) else None
        if inc is not None and inc.responder is not None and inc.responder not in touched:
            touched.append(inc.responder)
        before = [(r, state.responders[r].status) for r in touched if r in state.responders]
        notices = notices_for(state, event)
        apply(state, event)
        out = self._out
        out.events.append(event)
        out.notices.extend(notices)
        for r, old in before:
            new = state.responders[r].status
            if new != old:
                status_event = ResponderStatus(
                    seq=self._seq(), at=event.at, responder=r, status=new
                )
                apply(state, status_event)
                out.events.append(status_event)


_NO_NOTICES = (ResponderStatus, ResponderPresence, IncidentReported)


def notices_for(state: TownState, event: Event) -> list[Notice]:
    """Which devices must hear about an event, judged from the state *before* it applies.

    Pure and shared with followers (cluster mode), which fold the same events."""
    if isinstance(event, _NO_NOTICES):
        return []
    inc = state.incidents.get(event.incident)
    if inc is None:
        return []
    holder = inc.responder
    out: list[Notice] = []
    match event:
        case IncidentOffered():
            out.append(Notice(event.responder, "offer", inc.id))
        case IncidentOfferExpired():
            out.append(Notice(event.responder, "offer_revoked", inc.id, "timeout"))
        case IncidentAssigned():
            if holder is not None and holder != event.responder:
                out.append(Notice(holder, "offer_revoked", inc.id, "operator"))
            out.append(Notice(event.responder, "assigned", inc.id))
        case IncidentArrived():
            out.append(Notice(event.responder, "incident", inc.id))
        case IncidentResolved():
            if event.responder is not None and holder == event.responder:
                out.append(Notice(event.responder, "incident", inc.id))
            reporter = inc.reporter
            if (
                reporter is not None
                and reporter != event.responder
                and reporter in state.responders
                and state.town.categories[inc.category].verify
            ):
                out.append(Notice(reporter, "incident", inc.id))  # asked to verify it
        case IncidentClosed():
            if holder is not None:
                out.append(Notice(holder, "offer_revoked", inc.id, "closed"))
            for rid in (inc.resolved_by, inc.reporter):
                # whoever closed it (a report handled on the spot, a verification) has its ack
                if rid is not None and rid not in (holder, event.by) and rid in state.responders:
                    out.append(Notice(rid, "incident", inc.id))
        case IncidentEscalated():
            if holder is not None:
                out.append(Notice(holder, "offer_revoked", inc.id, "escalated"))
        case IncidentTransferred():
            if holder is not None:
                out.append(Notice(holder, "offer_revoked", inc.id, "operator"))
        case IncidentReopened():
            for rid in (inc.resolved_by, inc.reporter):
                if rid is not None and rid in state.responders:
                    out.append(Notice(rid, "incident", inc.id))
        case IncidentOverdue():
            if holder is not None:
                out.append(Notice(holder, "incident", inc.id))
        case IncidentDeclined():
            pass
    seen: set[tuple[str, str]] = set()
    unique = []
    for n in out:
        if (n.responder, n.kind) not in seen:
            seen.add((n.responder, n.kind))
            unique.append(n)
    return unique
