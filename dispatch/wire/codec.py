"""The one codec: JSON in and out, for the wire and for the event log.

* ``decode_field`` / ``decode_screen`` / ``decode_intake`` turn raw client bytes into a typed
  message or raise :class:`~dispatch.errors.Rejected` with the right code (``bad_json``,
  ``unknown_type``, ``bad_message`` naming the field) and the message's ``id`` when it had one.
* ``encode_event`` / ``decode_event`` are the log's record format (engine events as JSON, times
  as epoch floats — exact and compact).
* ``event_wire`` renders an event as clients see it (times as RFC 3339 with milliseconds).
* ``dumps`` encodes any server message.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from datetime import datetime
from typing import Any

import msgspec

from dispatch.engine.events import Event
from dispatch.errors import MessageId, Rejected
from dispatch.wire.messages import (
    FIELD_TYPES,
    SCREEN_TYPES,
    FieldMessage,
    IntakeReport,
    ScreenMessage,
)

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_field_decoder = msgspec.json.Decoder(FieldMessage)
_screen_decoder = msgspec.json.Decoder(ScreenMessage)
_intake_decoder = msgspec.json.Decoder(IntakeReport)
_any_decoder = msgspec.json.Decoder()

TIME_FIELDS = frozenset(
    {
        "at",
        "expires_at",
        "deadline",
        "reported_at",
        "closed_at",
        "resolved_at",
        "assigned_at",
        "arrived_at",
        "offered_at",
        "offer_expires_at",
        "position_at",
        "server_time",
    }
)


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj)


_last_second: list[Any] = [None, ""]
_iso_cache: dict[float, str] = {}


def iso(ts: float | None) -> str | None:
    """Epoch seconds → RFC 3339 UTC with milliseconds, e.g. ``2026-11-21T08:00:00.123Z``.

    Hot: every time on the wire goes through it, and the same few times (the commit's, an
    incident's deadlines) are rendered again for every frame that carries them — recent
    answers and the formatted second are cached."""
    if ts is None:
        return None
    got = _iso_cache.get(ts)
    if got is not None:
        return got
    sec = math.floor(ts)
    us = round((ts - sec) * 1e6)  # as datetime rounds it
    if us >= 1_000_000:
        sec += 1
        us -= 1_000_000
    ms = us // 1000
    if _last_second[0] != sec:
        _last_second[0] = sec
        _last_second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    out = f"{_last_second[1]}.{ms:03d}Z"
    if len(_iso_cache) >= 4096:
        _iso_cache.clear()
    _iso_cache[ts] = out
    return out


def parse_time(value: str | float | None) -> float | None:
    """RFC 3339 string or epoch number → epoch seconds (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value / 1000.0 if value > 1e11 else value)
    try:
        return datetime.fromisoformat(value).timestamp()  # "Z" is understood since 3.11
    except ValueError:
        raise Rejected("bad_message", f"ts {value!r} is not an RFC 3339 time.") from None


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    event: Event = _event_decoder.decode(data)
    return event


def event_wire(event: Event) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(event)
    for key in TIME_FIELDS.intersection(doc):
        doc[key] = iso(doc[key])
    return doc


_PATH = re.compile(r" - at `\$\.?([^`]*)`")


def _explain(kind: str, err: msgspec.ValidationError) -> str:
    text = str(err)
    m = _PATH.search(text)
    where = m.group(1) if m else ""
    what = _PATH.sub("", text).replace("`", "")
    if where:
        return f"Invalid {kind}: field '{where}': {what}."
    missing = re.search(r"missing required field `([^`]*)`", text)
    if missing:
        return f"Invalid {kind}: the required field '{missing.group(1)}' is missing."
    return f"Invalid {kind}: {what}."


class _Probe(msgspec.Struct):
    """The few fields read from a frame that will not be handled as its type."""

    type: Any = None
    id: Any = None
    token: Any = None


_probe = msgspec.json.Decoder(_Probe)


def _as_id(value: Any) -> MessageId | None:
    return value if isinstance(value, str | int | float) and not isinstance(value, bool) else None


def message_id(raw: bytes | str) -> MessageId | None:
    """The ``id`` of a frame that will not be handled (bad, rate-limited, a second hello), so
    its ``error`` can still carry it. Skips every other field, so it stays cheap on a flood."""
    try:
        return _as_id(_probe.decode(raw).id)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def hello_without_token(raw: bytes | str) -> bool:
    """True for a ``hello`` that carries no string ``token``: a client that did not
    authenticate (close 4401, as for a bad token), not a schema slip to answer and wait on."""
    try:
        probe = _probe.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return probe.type == "hello" and not isinstance(probe.token, str)


def _decode(
    raw: bytes | str, decoder: msgspec.json.Decoder[Any], types: frozenset[str], channel: str
) -> Any:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as err:
        doc = None
        with contextlib.suppress(msgspec.DecodeError):
            doc = _any_decoder.decode(raw)
        if not isinstance(doc, dict):
            raise Rejected(
                "bad_message", "A message must be a JSON object with a 'type'."
            ) from None
        mid = _as_id(doc.get("id"))
        mtype = doc.get("type")
        if mtype is None:
            rej = Rejected("bad_message", "The message has no 'type' field.")
        elif not isinstance(mtype, str) or mtype not in types:
            rej = Rejected(
                "unknown_type",
                f"Unknown message type {mtype!r} on the {channel} channel; expected one of "
                + ", ".join(sorted(types))
                + ".",
            )
        else:
            rej = Rejected("bad_message", _explain(f"'{mtype}' message", err))
        rej.message_id = mid
        raise rej from None
    except msgspec.DecodeError:
        raise Rejected("bad_json", "The frame is not valid JSON.") from None


def decode_field(raw: bytes | str) -> FieldMessage:
    msg: FieldMessage = _decode(raw, _field_decoder, FIELD_TYPES, "field")
    return msg


def decode_screen(raw: bytes | str) -> ScreenMessage:
    msg: ScreenMessage = _decode(raw, _screen_decoder, SCREEN_TYPES, "screen")
    return msg


def decode_intake(raw: bytes) -> IntakeReport:
    try:
        return _intake_decoder.decode(raw)
    except msgspec.ValidationError as err:
        raise Rejected("bad_message", _explain("incident report", err)) from None
    except msgspec.DecodeError:
        raise Rejected("bad_json", "The request body is not valid JSON.") from None


def error_message(code: str, message: str, mid: MessageId | None = None) -> bytes:
    doc: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if mid is not None:
        doc["id"] = mid
    return _encoder.encode(doc)
