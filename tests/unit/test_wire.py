"""The one codec: times, client messages and their errors, event records."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.engine import events as ev
from dispatch.errors import Rejected
from dispatch.wire import messages as m
from dispatch.wire.codec import (
    decode_event,
    decode_field,
    decode_screen,
    encode_event,
    event_wire,
    iso,
    parse_time,
)


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_iso_matches_datetime_with_milliseconds(ts: float) -> None:
    dt = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    assert iso(ts) == dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def test_iso_round_trips_through_parse_time() -> None:
    assert iso(None) is None
    assert iso(1790000000.123) == "2026-09-21T14:13:20.123Z"
    assert parse_time("2026-09-21T14:13:20.123Z") == pytest.approx(1790000000.123)
    assert parse_time(1790000000123) == pytest.approx(1790000000.123)  # epoch milliseconds
    with pytest.raises(Rejected):
        parse_time("yesterday")


@pytest.mark.parametrize(
    ("raw", "code", "mentions"),
    [
        (b"{nope", "bad_json", "JSON"),
        (b"[]", "bad_message", "object"),
        (b'{"id": "1"}', "bad_message", "type"),
        (b'{"type": "teleport", "id": "7"}', "unknown_type", "teleport"),
        (b'{"type": "report", "id": "1", "category": "x", "lon": "e", "lat": 1}', "bad_message",
         "lon"),
        (b'{"type": "report", "id": "1", "category": "x", "lon": 200, "lat": 1}', "bad_message",
         "lon"),
        (b'{"type": "accept", "id": "1"}', "bad_message", "incident"),
    ],
)
def test_field_decoding_errors_name_what_is_wrong(raw: bytes, code: str, mentions: str) -> None:
    with pytest.raises(Rejected) as err:
        decode_field(raw)
    assert err.value.code == code
    assert mentions in err.value.message


def test_rejected_message_keeps_its_id() -> None:
    with pytest.raises(Rejected) as err:
        decode_field(b'{"type": "accept", "id": "abc"}')
    assert err.value.message_id == "abc"


def test_channels_accept_only_their_messages() -> None:
    assert isinstance(decode_field(b'{"type": "position", "lon": 1, "lat": 2}'), m.Position)
    assert isinstance(decode_screen(b'{"type": "assign", "id": "1", "incident": "T-1", '
                                    b'"responder": "w"}'), m.Assign)
    with pytest.raises(Rejected) as err:
        decode_screen(b'{"type": "report", "id": "1", "category": "x", "lon": 1, "lat": 2}')
    assert err.value.code == "unknown_type"


def test_every_event_type_round_trips_and_renders_times() -> None:
    samples = [
        ev.IncidentReported(seq=1, at=1.5, incident="T-1", ref="r", category="c", priority=1,
                            lon=1.0, lat=2.0, grids={"3": "a", "2": "b", "1": "T"}, level=3,
                            source="field", deadline=100.0),
        ev.IncidentOffered(seq=2, at=2.0, incident="T-1", responder="w", expires_at=62.0),
        ev.IncidentOfferExpired(seq=3, at=62.0, incident="T-1", responder="w"),
        ev.IncidentDeclined(seq=4, at=63.0, incident="T-1", responder="w"),
        ev.IncidentAssigned(seq=5, at=64.0, incident="T-1", responder="w"),
        ev.IncidentArrived(seq=6, at=65.0, incident="T-1", responder="w"),
        ev.IncidentResolved(seq=7, at=66.0, incident="T-1", responder="w"),
        ev.IncidentClosed(seq=8, at=67.0, incident="T-1"),
        ev.IncidentEscalated(seq=9, at=68.0, incident="T-1", from_level=3, to_level=2,
                             reason="sla", deadline=99.0),
        ev.IncidentTransferred(seq=10, at=69.0, incident="T-1", department="police"),
        ev.IncidentReopened(seq=11, at=70.0, incident="T-1", level=3, deadline=None),
        ev.IncidentOverdue(seq=12, at=71.0, incident="T-1", level=1),
        ev.ResponderStatus(seq=13, at=72.0, responder="w", status="available"),
        ev.ResponderPresence(seq=14, at=73.0, responder="w", online=True),
    ]
    assert {type(s) for s in samples} == set(ev.EVENT_TYPES)
    for e in samples:
        assert decode_event(encode_event(e)) == e
        wire = event_wire(e)
        assert wire["type"] == e.type_name() and wire["seq"] == e.seq
        assert wire["at"].endswith("Z")
