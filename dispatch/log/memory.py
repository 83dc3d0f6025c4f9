"""An in-memory event log: a real backend for fast tests and demos, not a mock.

:class:`MemoryLog` keeps every town's records in a Python list and honours the whole contract of
:mod:`dispatch.log.base` except durability: nothing survives the process. It is the reference
implementation the other backends are compared with, and this module also holds the one batch
check they share, :func:`check_batch`.

Behaviour worth knowing:

* ``append`` never suspends: the records are visible to ``read``, ``last_seq`` and every
  ``follow`` as soon as it returns, which keeps tests deterministic.
* ``epoch`` is accepted and ignored (there is no lease to fence against in one process).
* ``follow`` waits on a future woken by ``append``; there is no polling.
* After :meth:`MemoryLog.close`, operations raise :class:`~dispatch.errors.LogUnavailable` and
  every ``follow`` iterator ends once it has yielded what was stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from dispatch.errors import LogUnavailable, SeqConflict
from dispatch.log.base import EventLog, Record

__all__ = ["MemoryLog", "check_after", "check_batch"]


def check_batch(town: str, records: Sequence[Record], last: int) -> SeqConflict | None:
    """Return the :class:`SeqConflict` to raise if ``records`` do not continue ``last``, else None.

    ``records`` must be non-empty, start at ``last + 1`` and be consecutive. Returned, not raised,
    so a group-commit writer can fail one caller's batch and carry on with the others.
    """
    first = records[0].seq
    if first != last + 1:
        return SeqConflict(f"town {town!r}: append starts at seq {first}, expected {last + 1}")
    for expected, record in enumerate(records, start=first):
        if record.seq != expected:
            return SeqConflict(
                f"town {town!r}: seq {record.seq} in a batch where {expected} was expected"
            )
    return None


def check_after(after: int, limit: int | None = None) -> None:
    """Reject a negative ``after`` or ``limit`` (a programming error, hence ValueError)."""
    if after < 0:
        raise ValueError(f"after must be >= 0, got {after}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")


class MemoryLog(EventLog):
    """Event log held in memory; see the module docstring."""

    def __init__(self) -> None:
        self._towns: dict[str, list[bytes]] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise LogUnavailable("the memory log is closed")

    async def append(
        self, town: str, records: Sequence[Record], *, epoch: int | None = None
    ) -> list[int]:
        self._check_open()
        if not records:
            return []
        stored = self._towns.get(town, [])
        conflict = check_batch(town, records, len(stored))
        if conflict is not None:
            raise conflict
        stored.extend(bytes(record.data) for record in records)
        self._towns[town] = stored
        self._wake(town)
        return [record.seq for record in records]

    async def read(self, town: str, after: int = 0, limit: int | None = None) -> list[Record]:
        self._check_open()
        check_after(after, limit)
        stored = self._towns.get(town, [])
        end = len(stored) if limit is None else min(len(stored), after + limit)
        return [Record(seq, stored[seq - 1]) for seq in range(after + 1, end + 1)]

    async def last_seq(self, town: str) -> int:
        self._check_open()
        return len(self._towns.get(town, ()))

    async def follow(self, town: str, after: int) -> AsyncIterator[Record]:
        self._check_open()
        check_after(after)
        loop = asyncio.get_running_loop()
        while True:
            stored = self._towns.get(town, [])
            while after < len(stored):
                after += 1
                yield Record(after, stored[after - 1])
            if self._closed:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(town, set())
            waiters.add(waiter)
            try:
                await waiter
            finally:
                waiters.discard(waiter)
                if not waiters and self._waiters.get(town) is waiters:
                    del self._waiters[town]

    def _wake(self, town: str) -> None:
        for waiter in self._waiters.get(town, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def ping(self) -> None:
        self._check_open()

    async def close(self) -> None:
        self._closed = True
        for town in list(self._waiters):
            self._wake(town)
