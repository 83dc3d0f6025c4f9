"""Every error the project raises on purpose, in one tree.

* :class:`DispatchError` — base of everything below.

  * :class:`ConfigError` — a config, grid, roster or category file is invalid. The message names
    the file and the key, row or feature, so a person can fix it. The server refuses to start.
  * :class:`Rejected` — a client's message or command cannot be carried out. It carries one of the
    wire error ``code``\\ s of PROTOCOL.md and a sentence a person can act on. Raised by the wire
    decoder (``bad_json``, ``bad_message``, ``unknown_type``, ``too_large``), by the engine
    (``not_found``, ``conflict``, ``outside_area``, ``unknown_category``, ``forbidden``) and by the
    shell (``unauthorized``, ``rate_limited``, ``unavailable``). A rejected command changes
    nothing.
  * :class:`LogError` — the event log could not do what was asked.

    * :class:`LogUnavailable` — the backend cannot be reached or cannot make the append durable
      now. Nothing in the failed batch may be acknowledged; clients get ``unavailable``.
    * :class:`SeqConflict` — the append did not continue the town's sequence (another writer got
      there first, or the caller's state is stale).
    * :class:`Fenced` — the writer's lease epoch is no longer current: it must stop writing.

Catch narrowly; catch broadly only at a task boundary, where a supervisor logs and recovers.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "bad_json",
    "bad_message",
    "unknown_type",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "outside_area",
    "unknown_category",
    "rate_limited",
    "too_large",
    "unavailable",
    "internal",
]

HTTP_STATUS: dict[str, int] = {
    "bad_json": 400,
    "bad_message": 422,
    "unknown_type": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "outside_area": 422,
    "unknown_category": 422,
    "rate_limited": 429,
    "too_large": 413,
    "unavailable": 503,
    "internal": 500,
}


class DispatchError(Exception):
    """Base of every error raised on purpose by this project."""


class ConfigError(DispatchError):
    """An invalid configuration or data file; the message names file and key/row/feature."""


MessageId = str | int | float
"""A client message's ``id`` as the client wrote it (echoed back unchanged)."""


class Rejected(DispatchError):
    """A message or command that cannot be carried out; nothing was changed."""

    def __init__(
        self, code: ErrorCode, message: str, *, message_id: MessageId | None = None
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.message_id = message_id
        """The ``id`` of the client message that was rejected, when the decoder could read it."""

    def __repr__(self) -> str:
        return f"Rejected({self.code!r}, {self.message!r})"


class LogError(DispatchError):
    """The event log could not carry out an operation."""


class LogUnavailable(LogError):
    """The log cannot be reached or cannot make an append durable right now."""


class LogLost(LogUnavailable):
    """The store holds fewer events of a town than this process already saw durable: it lost
    acknowledged data (a Redis restarted without its append-only file, say). Nothing more is
    acknowledged for that town until the data is back or the server is restarted."""


class SeqConflict(LogError):
    """An append did not continue the town's gapless sequence."""


class Fenced(LogError):
    """The writer's lease epoch is stale; it must stop writing for this town."""
