"""Commands: what the outside world asks a town's engine to do.

A command is a request, not a fact: the engine may reject it (raising
:class:`~dispatch.errors.Rejected`, changing nothing) or turn it into events. ``actor`` is who
asks: a responder id for field commands, a user name for operators. ``scope`` is the grid
subtree an operator may act in (``None`` = the whole town, as for ``admin``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Report:
    ref: str
    category: str
    lon: float
    lat: float
    source: str = "field"
    actor: str | None = None
    description: str = ""
    priority: int | None = None
    handled: bool = False
    photos: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Connect:
    """A responder's device said hello."""

    responder: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A responder's last connection is gone; it goes offline after ``offline_after``."""

    responder: str


@dataclass(frozen=True, slots=True)
class SetDuty:
    """The responder's own status choice: ``available`` or ``off_duty``."""

    responder: str
    status: str


@dataclass(frozen=True, slots=True)
class Accept:
    responder: str
    incident: str


@dataclass(frozen=True, slots=True)
class Decline:
    responder: str
    incident: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Arrive:
    responder: str
    incident: str


@dataclass(frozen=True, slots=True)
class Resolve:
    responder: str
    incident: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class RequestEscalation:
    """The assignee (or offeree) asks to move the incident up a level."""

    responder: str
    incident: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Verify:
    """The reporting grid worker closes a resolved incident that needs verification."""

    responder: str
    incident: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Assign:
    incident: str
    responder: str
    actor: str
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Transfer:
    incident: str
    department: str
    actor: str
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Escalate:
    incident: str
    actor: str
    scope: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Close:
    incident: str
    actor: str
    scope: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Reopen:
    incident: str
    actor: str
    scope: str | None = None
    note: str = ""


Command = (
    Report
    | Connect
    | Disconnect
    | SetDuty
    | Accept
    | Decline
    | Arrive
    | Resolve
    | RequestEscalation
    | Verify
    | Assign
    | Transfer
    | Escalate
    | Close
    | Reopen
)


@dataclass(frozen=True, slots=True)
class Notice:
    """A message the shell must send to one responder's devices once the events are durable.

    ``kind`` is the field-channel message type: ``offer``, ``offer_revoked``, ``assigned`` or
    ``incident``. The shell builds the incident object from the state at send time.
    """

    responder: str
    kind: str
    incident: str
    reason: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
