"""The event log interface: the source of truth for every town.

A log holds, per town, a gapless sequence of records numbered 1, 2, 3 … Each record is the
encoded bytes of one engine event (the codec lives in ``dispatch.wire.codec``; the log never looks
inside). The single writer of a town assigns the sequence numbers; the log checks them.

Contract (every backend passes ``tests/contract``):

* ``append(town, records)`` — ``records`` are ``(seq, data)`` pairs with consecutive seqs that
  continue the town's sequence exactly (the first must be ``last_seq(town) + 1``). Returns only
  once every record is durable (on disk / fsynced as the backend promises), and then returns the
  seqs. Raises :class:`~dispatch.errors.SeqConflict` if the seqs do not continue the sequence
  (nothing written), :class:`~dispatch.errors.LogUnavailable` if durability cannot be had now
  (nothing may be acknowledged; some records may or may not be stored — the caller must re-read),
  :class:`~dispatch.errors.Fenced` when a fencing epoch was given and is no longer current.
  Concurrent appends to different towns are allowed; backends may group them (group commit).
* ``read(town, after=0, limit=None)`` — the records with seq > ``after``, in order.
* ``last_seq(town)`` — the highest durable seq, 0 for an empty town.
* ``follow(town, after)`` — an async iterator over records with seq > ``after``: first what is
  stored, then new records as they are appended (by this process or, for shared backends, by
  any). It never skips or repeats a seq.
* ``ping()`` — raises ``LogUnavailable`` when the backend cannot be reached (for ``/readyz``).
* ``close()`` — flushes and releases everything; pending appends finish first.

Backends are created by :func:`dispatch.log.open_log` from a ``[store] url``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple


class Record(NamedTuple):
    seq: int
    data: bytes


class EventLog(abc.ABC):
    """Abstract event log; see the module docstring for the contract."""

    @abc.abstractmethod
    async def append(
        self, town: str, records: Sequence[Record], *, epoch: int | None = None
    ) -> list[int]: ...

    @abc.abstractmethod
    async def read(self, town: str, after: int = 0, limit: int | None = None) -> list[Record]: ...

    @abc.abstractmethod
    async def last_seq(self, town: str) -> int: ...

    @abc.abstractmethod
    def follow(self, town: str, after: int) -> AsyncIterator[Record]: ...

    @abc.abstractmethod
    async def ping(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...
