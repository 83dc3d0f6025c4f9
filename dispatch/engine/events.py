"""The events of a town: the only way its state changes, and what the log stores.

Every event is a frozen, slotted ``msgspec.Struct`` tagged by ``type`` (the names of PROTOCOL.md
"Events"), so one codec (``dispatch.wire.codec``) turns them into the JSON clients see:
``{"type": "incident.offered", "seq": 12, "at": 1763712000.123, "incident": "T0-000012", …}``
(``at`` and other times are epoch seconds here; the wire codec writes RFC 3339 strings).

``incident`` and ``responder`` fields carry ids. ``incident.reported`` carries everything needed
to build the incident, so a screen's view is the same fold over the same events as the engine's.

Events are not tracked by the cycle collector (``gc=False``): they never form reference
cycles, and a town keeps millions of them (timelines, the resume ring), which would otherwise
make every full collection scan them all.

Adding an event type: add the struct, add it to :data:`Event`, handle it in
``dispatch.engine.state.apply`` (mypy's exhaustive-match flags the place).
"""

from __future__ import annotations

from typing import Literal

import msgspec

EscalationReason = Literal["no_responder", "declined", "sla", "requested", "operator"]
RevokeReason = Literal["timeout", "escalated", "closed", "operator", "offline", "declined"]


class _Event(msgspec.Struct, frozen=True, tag_field="type", kw_only=True, gc=False):
    seq: int
    at: float

    def type_name(self) -> str:
        """The event's ``type`` tag, e.g. ``"incident.offered"``."""
        return str(self.__struct_config__.tag)


class IncidentReported(_Event, frozen=True, tag="incident.reported"):
    incident: str
    ref: str
    category: str
    priority: int
    lon: float
    lat: float
    grids: dict[str, str]
    level: int
    source: str
    deadline: float | None
    description: str = ""
    reporter: str | None = None
    handled: bool = False
    photos: list[str] = []


class IncidentOffered(_Event, frozen=True, tag="incident.offered"):
    incident: str
    responder: str
    expires_at: float
    distance_m: float | None = None


class IncidentOfferExpired(_Event, frozen=True, tag="incident.offer_expired"):
    incident: str
    responder: str
    reason: str = "timeout"


class IncidentDeclined(_Event, frozen=True, tag="incident.declined"):
    incident: str
    responder: str
    reason: str = ""


class IncidentAssigned(_Event, frozen=True, tag="incident.assigned"):
    incident: str
    responder: str
    by: str | None = None


class IncidentArrived(_Event, frozen=True, tag="incident.arrived"):
    incident: str
    responder: str


class IncidentResolved(_Event, frozen=True, tag="incident.resolved"):
    incident: str
    responder: str | None = None
    note: str = ""
    by: str | None = None


class IncidentClosed(_Event, frozen=True, tag="incident.closed"):
    incident: str
    note: str = ""
    by: str | None = None
    on_time: bool = True


class IncidentEscalated(_Event, frozen=True, tag="incident.escalated"):
    incident: str
    from_level: int
    to_level: int
    reason: EscalationReason
    deadline: float | None
    responder: str | None = None
    by: str | None = None
    note: str = ""


class IncidentTransferred(_Event, frozen=True, tag="incident.transferred"):
    incident: str
    department: str
    responder: str | None = None
    by: str | None = None


class IncidentReopened(_Event, frozen=True, tag="incident.reopened"):
    incident: str
    level: int
    deadline: float | None
    by: str | None = None
    note: str = ""


class IncidentOverdue(_Event, frozen=True, tag="incident.overdue"):
    incident: str
    level: int


class ResponderStatus(_Event, frozen=True, tag="responder.status"):
    """A change of a responder's status (derived from presence, duty and work)."""

    responder: str
    status: str


class ResponderPresence(_Event, frozen=True, tag="responder.presence"):
    """A device connected (``online``) or the responder went offline; also its own duty choice.

    ``duty`` is ``"on"``/``"off"`` when the responder itself changed it (``status`` command), else
    absent. Presence is logged so that a restart rebuilds who is offline, off duty, and so that
    the ``offline_after`` clock resumes.
    """

    responder: str
    online: bool
    duty: str | None = None


Event = (
    IncidentReported
    | IncidentOffered
    | IncidentOfferExpired
    | IncidentDeclined
    | IncidentAssigned
    | IncidentArrived
    | IncidentResolved
    | IncidentClosed
    | IncidentEscalated
    | IncidentTransferred
    | IncidentReopened
    | IncidentOverdue
    | ResponderStatus
    | ResponderPresence
)

EVENT_TYPES: tuple[type[_Event], ...] = (
    IncidentReported,
    IncidentOffered,
    IncidentOfferExpired,
    IncidentDeclined,
    IncidentAssigned,
    IncidentArrived,
    IncidentResolved,
    IncidentClosed,
    IncidentEscalated,
    IncidentTransferred,
    IncidentReopened,
    IncidentOverdue,
    ResponderStatus,
    ResponderPresence,
)
