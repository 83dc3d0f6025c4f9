"""Client → server messages of PROTOCOL.md as typed structs, decoded and validated in one place.

Handlers only ever see these structs: types, ranges and lengths are checked by msgspec while
decoding (``dispatch.wire.codec.decode_field`` / ``decode_screen``), and a failure becomes a
:class:`~dispatch.errors.Rejected` naming the field.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Lon = Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)]
Lat = Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Text = Annotated[str, msgspec.Meta(max_length=4000)]
Priority = Annotated[int, msgspec.Meta(ge=1, le=4)]
Timestamp = str | float | None


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, frozen=True):
    pass


class Hello(_Msg, tag="hello", frozen=True):
    token: Annotated[str, msgspec.Meta(max_length=8192)]
    resume: bool = False
    scope: Id | None = None
    since: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Ping(_Msg, tag="ping", frozen=True):
    id: Id | None = None


class Position(_Msg, tag="position", frozen=True):
    lon: Lon
    lat: Lat
    accuracy: Annotated[float, msgspec.Meta(ge=0)] | None = None
    ts: Timestamp = None


class Positions(_Msg, tag="positions", frozen=True):
    items: Annotated[list[tuple[Lon, Lat, Timestamp]], msgspec.Meta(max_length=1000)]


class Status(_Msg, tag="status", frozen=True):
    id: Id
    status: str


class Report(_Msg, tag="report", frozen=True):
    id: Id
    category: Id
    lon: Lon
    lat: Lat
    description: Text = ""
    priority: Priority | None = None
    handled: bool = False
    photos: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=2000)]], msgspec.Meta(max_length=20)
    ] = []


class Accept(_Msg, tag="accept", frozen=True):
    id: Id
    incident: Id


class Decline(_Msg, tag="decline", frozen=True):
    id: Id
    incident: Id
    reason: Text = ""


class Arrive(_Msg, tag="arrive", frozen=True):
    id: Id
    incident: Id


class Resolve(_Msg, tag="resolve", frozen=True):
    id: Id
    incident: Id
    note: Text = ""


class Escalate(_Msg, tag="escalate", frozen=True):
    id: Id
    incident: Id
    reason: Text = ""
    note: Text = ""


class Close(_Msg, tag="close", frozen=True):
    id: Id
    incident: Id
    note: Text = ""


class Assign(_Msg, tag="assign", frozen=True):
    id: Id
    incident: Id
    responder: Id


class Transfer(_Msg, tag="transfer", frozen=True):
    id: Id
    incident: Id
    department: Id


class Reopen(_Msg, tag="reopen", frozen=True):
    id: Id
    incident: Id
    note: Text = ""


FieldMessage = (
    Hello
    | Ping
    | Position
    | Positions
    | Status
    | Report
    | Accept
    | Decline
    | Arrive
    | Resolve
    | Escalate
    | Close
)
ScreenMessage = Hello | Ping | Assign | Transfer | Escalate | Close | Reopen

FIELD_TYPES = frozenset(
    {
        "hello",
        "ping",
        "position",
        "positions",
        "status",
        "report",
        "accept",
        "decline",
        "arrive",
        "resolve",
        "escalate",
        "close",
    }
)
SCREEN_TYPES = frozenset({"hello", "ping", "assign", "transfer", "escalate", "close", "reopen"})


class IntakeReport(msgspec.Struct, forbid_unknown_fields=False, frozen=True):
    """``POST /api/incidents``: a field ``report`` plus ``source``."""

    id: Id
    category: Id
    lon: Lon
    lat: Lat
    source: str = "hotline"
    description: Text = ""
    priority: Priority | None = None
    handled: bool = False
    photos: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=2000)]], msgspec.Meta(max_length=20)
    ] = []
