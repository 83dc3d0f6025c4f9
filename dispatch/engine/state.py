"""A town's state and the one function that changes it: :func:`apply`.

Rules of this module:

* State changes only in :func:`apply`, one event at a time, so replaying the log rebuilds exactly
  the state the live engine had (``tests/unit/test_engine_properties.py`` checks it).
* The incident lifecycle is the table :data:`INCIDENT_TRANSITIONS`; an event that is not a legal
  move raises :class:`IllegalTransition` *before* anything is touched.
* A responder's ``status`` is derived, never stored: from whether a device is connected
  (``online``), its own duty choice (``off_duty``) and what it holds (an offer or an assignment).
  ``responder.status`` events record changes of it for screens; applying them checks nothing.
* Timers (offer expiry, level deadlines, going offline) are data: every event that sets one
  pushes ``(due, kind, key)`` onto :attr:`TownState.timers`; the engine pops and re-validates
  them lazily, so a stale entry is harmless.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Literal, get_args

from dispatch.engine.events import (
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
from dispatch.engine.model import ResponderIndex, ResponderInfo, Town

IncidentStatus = Literal["new", "offered", "assigned", "on_scene", "resolved", "closed"]
INCIDENT_STATUSES: frozenset[str] = frozenset(get_args(IncidentStatus))
ResponderStatusName = Literal["offline", "available", "offered", "assigned", "on_scene", "off_duty"]
OPEN: frozenset[str] = frozenset({"new", "offered", "assigned", "on_scene", "resolved"})
_ANY_OPEN = ("new", "offered", "assigned", "on_scene", "resolved")
_UNRESOLVED = ("new", "offered", "assigned", "on_scene")

INCIDENT_TRANSITIONS: dict[tuple[str, str], str] = {
    ("new", "incident.offered"): "offered",
    ("offered", "incident.offer_expired"): "new",
    ("offered", "incident.declined"): "new",
    **{(s, "incident.assigned"): "assigned" for s in _UNRESOLVED},
    ("assigned", "incident.arrived"): "on_scene",
    **{(s, "incident.resolved"): "resolved" for s in _UNRESOLVED},
    **{(s, "incident.closed"): "closed" for s in _ANY_OPEN},
    **{(s, "incident.escalated"): "new" for s in _UNRESOLVED},
    **{(s, "incident.transferred"): "new" for s in _UNRESOLVED},
    ("closed", "incident.reopened"): "new",
    **{(s, "incident.overdue"): s for s in _UNRESOLVED},
}


class IllegalTransition(Exception):
    """An event that the lifecycle table does not allow; the state is unchanged."""


@dataclass(slots=True)
class Escalation:
    from_level: int
    to_level: int
    reason: str
    at: float


@dataclass(slots=True)
class Incident:
    id: str
    ref: str
    category: str
    priority: int
    lon: float
    lat: float
    grids: dict[str, str]
    level: int
    source: str
    reported_at: float
    deadline: float | None
    description: str = ""
    reporter: str | None = None
    handled: bool = False
    photos: tuple[str, ...] = ()
    status: str = "new"
    responder: str | None = None
    department: str | None = None
    offer_expires_at: float | None = None
    overdue: bool = False
    on_time: bool = True
    reopened: int = 0
    offered_at: float | None = None
    assigned_at: float | None = None
    arrived_at: float | None = None
    resolved_at: float | None = None
    closed_at: float | None = None
    resolved_by: str | None = None
    closed_level: int | None = None
    escalations: tuple[Escalation, ...] = ()
    tried: tuple[str, ...] = ()
    """Responders who declined or let the offer lapse at this level (reset on level change).

    Tuples, not sets: they hold a handful of ids, and tuples of strings are not tracked by the
    cycle collector."""
    refused: tuple[str, ...] = ()
    """Responders who asked to escalate it: never offered it again, at any level."""

    @property
    def is_open(self) -> bool:
        return self.status != "closed"


@dataclass(slots=True)
class Responder:
    info: ResponderInfo
    online: bool = False
    off_duty: bool = False
    incident: str | None = None
    holding: Literal["offer", "assignment", "on_scene"] | None = None
    offline_due: float | None = None
    """When an unconnected responder goes offline (not logged: reset at every start)."""

    @property
    def status(self) -> ResponderStatusName:
        if self.holding == "assignment":
            return "assigned"
        if self.holding == "on_scene":
            return "on_scene"
        if not self.online:
            return "offline"
        if self.holding == "offer":
            return "offered"
        if self.off_duty:
            return "off_duty"
        return "available"


TimerKind = Literal["offer", "deadline", "offline"]


@dataclass(slots=True)
class TownState:
    town: Town
    index: ResponderIndex
    seq: int = 0
    incidents: dict[str, Incident] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    responders: dict[str, Responder] = field(default_factory=dict)
    open_ids: set[str] = field(default_factory=set)
    timers: list[tuple[float, str, str]] = field(default_factory=list)
    _grids: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def new(cls, town: Town, index: ResponderIndex) -> TownState:
        state = cls(town=town, index=index)
        for rid, info in town.roster.items():
            state.responders[rid] = Responder(info=info)
            pools = town.ancestors(info.home_grid)
            if info.department:
                pools.append(department_pool(info.department))
            index.register(rid, pools, info.skills)
            index.set_available(rid, False)
        return state

    def shared_grids(self, grids: dict[str, str]) -> dict[str, str]:
        """One ``grids`` dict per basic grid, shared by its incidents (never mutated): a town
        keeps every incident in memory, and fewer objects make the cycle collector cheaper."""
        key = grids.get("3", "")
        shared = self._grids.get(key)
        if shared is None or shared != grids:
            shared = self._grids[key] = dict(grids)
        return shared

    def push_timer(self, due: float, kind: TimerKind, key: str) -> None:
        heapq.heappush(self.timers, (due, kind, key))


def department_pool(department: str) -> str:
    """The index pool of a department's units (they serve the whole town)."""
    return f"dept:{department}"


def ref_key(actor: str | None, ref: str) -> str:
    """Idempotency key of a report: the same ``ref`` from the same reporter is the same report."""
    return f"{actor or ''}\x00{ref}"


def _sync(state: TownState, rid: str | None) -> None:
    if rid is None:
        return
    r = state.responders.get(rid)
    if r is not None:
        state.index.set_available(rid, r.status == "available")


def _release(state: TownState, inc: Incident) -> None:
    """Take the incident away from whoever holds it."""
    rid = inc.responder
    if rid is not None:
        r = state.responders[rid]
        if r.incident == inc.id:
            r.incident = None
            r.holding = None
            _sync(state, rid)
    inc.responder = None
    inc.offer_expires_at = None


def _hold(
    state: TownState, inc: Incident, rid: str, holding: Literal["offer", "assignment"]
) -> None:
    r = state.responders[rid]
    if r.incident is not None and r.incident != inc.id:
        raise IllegalTransition(f"{rid} already holds {r.incident}")
    r.incident = inc.id
    r.holding = holding
    inc.responder = rid
    _sync(state, rid)


def _move(inc: Incident, event_type: str) -> str:
    new = INCIDENT_TRANSITIONS.get((inc.status, event_type))
    if new is None:
        raise IllegalTransition(f"{event_type} on {inc.id} in status {inc.status}")
    return new


def _set_deadline(state: TownState, inc: Incident, deadline: float | None) -> None:
    inc.deadline = deadline
    if deadline is not None:
        state.push_timer(deadline, "deadline", inc.id)


_NOT_ABOUT_AN_INCIDENT = (IncidentReported, ResponderStatus, ResponderPresence)


def apply(state: TownState, event: Event) -> None:
    """Fold one event into the state. Raises :class:`IllegalTransition` (state unchanged) when the
    event does not follow from the state — which means a bug or a corrupt log."""
    if event.seq != state.seq + 1:
        raise IllegalTransition(f"event seq {event.seq} does not follow {state.seq}")
    inc: Incident | None = None
    if not isinstance(event, _NOT_ABOUT_AN_INCIDENT):
        inc = state.incidents.get(event.incident)
        if inc is None:
            raise IllegalTransition(f"{event.type_name()} for unknown incident {event.incident}")

    match event:
        case IncidentReported():
            if event.incident in state.incidents:
                raise IllegalTransition(f"incident {event.incident} reported twice")
            new_inc = Incident(
                id=event.incident,
                ref=event.ref,
                category=event.category,
                priority=event.priority,
                lon=event.lon,
                lat=event.lat,
                grids=state.shared_grids(event.grids),
                level=event.level,
                source=event.source,
                reported_at=event.at,
                deadline=None,
                description=event.description,
                reporter=event.reporter,
                handled=event.handled,
                photos=tuple(event.photos),
            )
            state.incidents[new_inc.id] = new_inc
            state.refs[ref_key(event.reporter, event.ref)] = new_inc.id
            state.open_ids.add(new_inc.id)
            _set_deadline(state, new_inc, event.deadline)
        case IncidentOffered():
            assert inc is not None
            status = _move(inc, "incident.offered")
            _hold(state, inc, event.responder, "offer")
            inc.status = status
            inc.offer_expires_at = event.expires_at
            if inc.offered_at is None:
                inc.offered_at = event.at
            state.push_timer(event.expires_at, "offer", inc.id)
        case IncidentOfferExpired() | IncidentDeclined():
            assert inc is not None
            status = _move(inc, event.type_name())
            inc.tried = (*inc.tried, event.responder)
            _release(state, inc)
            inc.status = status
        case IncidentAssigned():
            assert inc is not None
            status = _move(inc, "incident.assigned")
            holder = state.responders[event.responder]
            if holder.incident not in (None, inc.id):
                raise IllegalTransition(f"{event.responder} already holds {holder.incident}")
            if inc.responder != event.responder:
                _release(state, inc)
            _hold(state, inc, event.responder, "assignment")
            inc.status = status
            inc.offer_expires_at = None
            if inc.assigned_at is None:
                inc.assigned_at = event.at
        case IncidentArrived():
            assert inc is not None
            inc.status = _move(inc, "incident.arrived")
            state.responders[event.responder].holding = "on_scene"
            _sync(state, event.responder)
            if inc.arrived_at is None:
                inc.arrived_at = event.at
        case IncidentResolved():
            assert inc is not None
            status = _move(inc, "incident.resolved")
            _release(state, inc)
            inc.status = status
            inc.resolved_at = event.at
            inc.resolved_by = event.responder or event.by
            if inc.deadline is not None and event.at > inc.deadline:
                inc.on_time = False
        case IncidentClosed():
            assert inc is not None
            status = _move(inc, "incident.closed")
            _release(state, inc)
            inc.status = status
            inc.closed_at = event.at
            inc.closed_level = inc.level
            inc.on_time = event.on_time
            state.open_ids.discard(inc.id)
        case IncidentEscalated():
            assert inc is not None
            status = _move(inc, "incident.escalated")
            _release(state, inc)
            inc.status = status
            inc.level = event.to_level
            inc.tried = ()
            if event.reason == "requested" and event.responder:
                inc.refused = (*inc.refused, event.responder)
            if event.reason == "sla":
                inc.on_time = False
            inc.escalations = (
                *inc.escalations,
                Escalation(event.from_level, event.to_level, event.reason, event.at),
            )
            _set_deadline(state, inc, event.deadline)
        case IncidentTransferred():
            assert inc is not None
            status = _move(inc, "incident.transferred")
            _release(state, inc)
            inc.status = status
            inc.department = event.department
            inc.tried = ()
        case IncidentReopened():
            assert inc is not None
            status = _move(inc, "incident.reopened")
            inc.status = status
            inc.level = event.level
            inc.reopened += 1
            inc.closed_at = None
            inc.resolved_at = None
            inc.closed_level = None
            inc.overdue = False
            inc.tried = ()
            state.open_ids.add(inc.id)
            _set_deadline(state, inc, event.deadline)
        case IncidentOverdue():
            assert inc is not None
            inc.status = _move(inc, "incident.overdue")
            inc.overdue = True
            inc.on_time = False
        case ResponderPresence():
            r = state.responders.get(event.responder)
            if r is None:
                raise IllegalTransition(f"presence of unknown responder {event.responder}")
            r.online = event.online
            if event.duty is not None:
                r.off_duty = event.duty == "off"
            if event.online:
                r.offline_due = None
            _sync(state, event.responder)
        case ResponderStatus():
            if event.responder not in state.responders:
                raise IllegalTransition(f"status of unknown responder {event.responder}")
    state.seq = event.seq
