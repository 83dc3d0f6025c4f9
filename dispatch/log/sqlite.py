"""The embedded event log: one SQLite file, one writer thread, group commit.

Storage
    ``events(town TEXT, seq INTEGER, data BLOB, PRIMARY KEY (town, seq))`` in WAL mode with
    ``synchronous=FULL``: a commit returns only after the WAL is fsynced. A rowid table with the
    primary key as its index was measured ~1.4x faster to append to than ``WITHOUT ROWID`` with
    300-byte rows (the rows go to the end of one b-tree instead of the end of every town's range),
    and replaying a town through the index is still ~1.7 µs a row.

Group commit
    Every :meth:`SqliteLog.append`, from any town, is queued to ONE writer thread. The thread takes
    everything queued, checks each batch's seqs against the last committed seq of its town (kept
    in memory, read from the file the first time a town is touched), writes all the accepted
    batches in one transaction and commits: one fsync for all of them. Then it resolves every
    waiting future with a single ``loop.call_soon_threadsafe``. ``append`` returns only after the
    commit, so an acknowledged record is on disk. While one commit is fsyncing, the next group
    gathers in the queue, so throughput grows with the number of concurrent appenders.

Failures (which callers see what)
    * A batch whose seqs do not continue its town gets :class:`SeqConflict` and is not written;
      the other batches of the group are unaffected. A second batch of the same town in the same
      group is checked against the first as if it had been committed.
    * If inserting the group fails, the transaction is rolled back and the group is written again
      batch by batch under savepoints, so only the offending batch fails (``LogUnavailable``, or
      ``SeqConflict`` when the primary key shows that another writer stored that seq) and the
      rest commit together.
    * If the COMMIT itself fails, every batch of the group gets :class:`LogUnavailable` and the
      cached last seqs of their towns are dropped and re-read from the file, since SQLite may or
      may not have made the commit durable (the contract tells the caller to re-read).

Crash safety
    A torn tail needs no code of ours: SQLite's WAL frames carry checksums and a commit marker, so
    on open it ignores a half-written last transaction, and what was acknowledged had been fsynced
    before ``append`` returned. ``tests/contract`` kills a writer with SIGKILL and truncates its WAL
    to check both.

One process owns the file
    The cached last seqs assume nobody else writes. If another process does, the primary key
    still rejects a duplicate seq (reported as :class:`SeqConflict`, and the cache is re-read), so
    the sequence stays gapless, but nothing else coordinates the two. ``epoch`` is accepted and
    ignored for that reason: fencing is the Redis backend's job.

Reads
    ``read``, ``last_seq`` (on a cache miss) and the catch-up part of ``follow`` run in
    :func:`asyncio.to_thread` on a small pool of read connections (WAL lets them read while the
    writer commits), so a big read never blocks the event loop. ``follow`` gets new records from
    the writer itself, not by polling: after each commit the records are pushed to every follower
    of their town (a bounded buffer per follower; one that overflows falls back to reading).

Checkpoints
    SQLite's automatic checkpoint is off: it ran inside the commit that crossed its threshold and
    held up every append behind it for its page copies and two fsyncs (a stall of several
    milliseconds every ~150 ms at a couple of thousand commits a second, the largest cause of
    the report→offer tail in docs/performance.md). :class:`_Checkpointer` copies the WAL into
    the database file on its own thread and connection instead, and has the writer finish each
    few megabytes between two groups so the WAL starts over at the same size.

Lifecycle
    The instance binds to the event loop that first uses it. :meth:`SqliteLog.close` rejects new
    appends, lets the writer finish everything queued, stops it, closes the connections and ends
    every ``follow`` iterator. ``per_commit=True`` commits each append on its own (no grouping);
    it exists for the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, TypeVarTuple

from dispatch.errors import LogError, LogUnavailable, SeqConflict
from dispatch.log.base import EventLog, Record
from dispatch.log.memory import check_after, check_batch

__all__ = ["SqliteLog"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    town TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (town, seq)
)
"""
_INSERT = "INSERT INTO events (town, seq, data) VALUES (?, ?, ?)"
_SELECT = "SELECT seq, data FROM events WHERE town = ? AND seq > ? ORDER BY seq LIMIT ?"
_LAST = "SELECT MAX(seq) FROM events WHERE town = ?"

_READERS = 4
_FOLLOW_PAGE = 1000
_BUSY_TIMEOUT_MS = 5000
CHECKPOINT_PAGES = 4096
"""WAL pages (4 KiB) written, estimated, that start a background checkpoint."""
WAL_RESTART_PAGES = 16384
"""WAL pages (4 KiB), estimated, after which the writer finishes a checkpoint so the WAL starts
over (instead of growing)."""
CHECKPOINT_IDLE = 1.0
"""Seconds without a round after which one runs on whatever was written."""


@dataclass(slots=True, eq=False)
class _Append:
    """One caller's batch waiting for the writer thread."""

    town: str
    records: tuple[Record, ...]
    future: asyncio.Future[list[int]]


# What the writer hands back to the loop: per future its seqs or its error.
_Outcome = list[int] | LogError


@dataclass(slots=True, eq=False)
class _Follower:
    """The live buffer of one ``follow`` iterator, filled on the loop by the writer's callback."""

    capacity: int
    records: deque[Record] = field(default_factory=deque)
    overflowed: bool = False
    waiter: asyncio.Future[None] | None = None

    def push(self, records: Sequence[Record]) -> None:
        if not self.overflowed:
            if len(self.records) + len(records) > self.capacity:
                self.overflowed = True
                self.records.clear()
            else:
                self.records.extend(records)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    return conn


class SqliteLog(EventLog):
    """Event log in one SQLite file with a group-committing writer thread.

    ``path``'s parent folder is created if missing. ``per_commit`` commits every append in its own
    transaction (benchmark baseline). ``follow_buffer`` bounds the records buffered for one
    follower that is not keeping up before it falls back to reading from the file.

    Raises :class:`LogUnavailable` if the file cannot be opened or put in WAL mode.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        per_commit: bool = False,
        follow_buffer: int = 10_000,
    ) -> None:
        self.path = Path(path)
        self.per_commit = per_commit
        self._follow_buffer = follow_buffer
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Last committed seq per town. Written only by the writer thread (after commits and when a
        # town is first seen); read by the loop for last_seq().
        self._committed: dict[str, int] = {}
        self._followers: dict[str, set[_Follower]] = {}
        self.commits = 0
        """Transactions committed so far (group commit makes this smaller than appends)."""
        self.appended = 0
        """Records committed so far."""

        writer: sqlite3.Connection | None = None
        readers: list[sqlite3.Connection] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            writer = _connect(self.path)
            mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LogUnavailable(f"{self.path}: cannot use WAL mode (got {mode!r})")
            writer.execute("PRAGMA synchronous = FULL")
            writer.execute("PRAGMA wal_autocheckpoint = 0")
            version = writer.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LogUnavailable(
                    f"{self.path}: schema version {version} is newer than this program's "
                    f"{SCHEMA_VERSION}"
                )
            writer.execute(_SCHEMA)
            writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            readers = [_connect(self.path) for _ in range(_READERS + 1)]
        except (sqlite3.Error, OSError) as exc:
            for conn in [writer, *readers]:
                if conn is not None:
                    conn.close()
            raise LogUnavailable(f"{self.path}: cannot open the event log: {exc}") from exc
        except BaseException:
            for conn in [writer, *readers]:
                if conn is not None:
                    conn.close()
            raise
        self._writer = writer
        self._queue: queue.SimpleQueue[_Append | _CatchUp | None] = queue.SimpleQueue()
        self._checkpointer = _Checkpointer(
            readers.pop(), self.path.name, lambda: self._queue.put(_CATCH_UP)
        )
        self._readers: asyncio.Queue[sqlite3.Connection] = asyncio.Queue()
        for conn in readers:
            self._readers.put_nowait(conn)
        self._thread = threading.Thread(
            target=self._run, name=f"dispatch-log-writer:{self.path.name}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"SqliteLog({str(self.path)!r}, per_commit={self.per_commit})"

    # -- the loop side ---------------------------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise LogUnavailable(f"{self.path}: the event log is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("SqliteLog is used from a second event loop")
        return loop

    async def append(
        self, town: str, records: Sequence[Record], *, epoch: int | None = None
    ) -> list[int]:
        loop = self._bind()
        if not records:
            return []
        if not self._thread.is_alive():
            raise LogUnavailable(f"{self.path}: the writer thread has stopped")
        future: asyncio.Future[list[int]] = loop.create_future()
        self._queue.put(_Append(town, tuple(records), future))
        # If the caller is cancelled, the batch may still be committed: the outcome is unknown,
        # as with LogUnavailable, and the caller must re-read.
        return await future

    async def read(self, town: str, after: int = 0, limit: int | None = None) -> list[Record]:
        self._bind()
        check_after(after, limit)
        if limit == 0:
            return []
        return await self._query(_select, town, after, -1 if limit is None else limit)

    async def last_seq(self, town: str) -> int:
        self._bind()
        cached = self._committed.get(town)
        if cached is not None:
            return cached
        return await self._query(_last, town)

    async def _query(self, fn: Callable[[sqlite3.Connection, *Ts], T], *args: *Ts) -> T:
        conn = await self._readers.get()
        try:
            return await asyncio.to_thread(fn, conn, *args)
        except sqlite3.Error as exc:
            raise LogUnavailable(f"{self.path}: read failed: {exc}") from exc
        finally:
            self._readers.put_nowait(conn)

    async def follow(self, town: str, after: int) -> AsyncIterator[Record]:
        self._bind()
        check_after(after)
        follower = _Follower(self._follow_buffer)
        followers = self._followers.setdefault(town, set())
        followers.add(follower)
        # Registered before the first read: every commit from now on reaches the buffer, and the
        # read covers what was committed before, so together they miss nothing.
        catch_up = True
        try:
            while not self._closed:
                if catch_up:
                    page = await self.read(town, after, _FOLLOW_PAGE)
                    for record in page:
                        if record.seq == after + 1:
                            after = record.seq
                            yield record
                    catch_up = len(page) == _FOLLOW_PAGE
                elif follower.overflowed:
                    follower.overflowed = False
                    catch_up = True
                elif follower.records:
                    record = follower.records.popleft()
                    if record.seq == after + 1:
                        after = record.seq
                        yield record
                    elif record.seq > after + 1:
                        catch_up = True
                else:
                    follower.waiter = asyncio.get_running_loop().create_future()
                    try:
                        await follower.waiter
                    finally:
                        follower.waiter = None
        finally:
            followers.discard(follower)
            if not followers and self._followers.get(town) is followers:
                del self._followers[town]

    async def ping(self) -> None:
        self._bind()
        await self._query(_last, "")
        if not self._thread.is_alive():
            raise LogUnavailable(f"{self.path}: the writer thread has stopped")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        # The writer's last call_soon_threadsafe callbacks were queued before join() returned,
        # hence before this coroutine was resumed: every pending append has its answer now.
        for _ in range(_READERS):
            conn = await self._readers.get()
            conn.close()
        for followers in self._followers.values():
            for follower in followers:
                follower.wake()

    def _deliver(self, outcomes: list[tuple[_Append, _Outcome]], committed: list[_Append]) -> None:
        """Runs on the loop: answer the appenders, then feed the followers."""
        for item, outcome in outcomes:
            if item.future.done():  # cancelled by its caller
                continue
            if isinstance(outcome, LogError):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
        for item in committed:
            for follower in self._followers.get(item.town, ()):
                follower.push(item.records)

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        try:
            while not stopping:
                group: list[_Append] = []
                catch_up = False
                head = self._queue.get()
                for item in _drain(head, self._queue):
                    if item is None:
                        stopping = True
                    elif isinstance(item, _CatchUp):
                        catch_up = True
                    else:
                        group.append(item)
                if group:
                    if self.per_commit:
                        for item in group:
                            self._write_safely([item])
                    else:
                        self._write_safely(group)
                    self._checkpointer.committed(
                        sum(len(item.records) for item in group),
                        sum(len(r.data) for item in group for r in item.records),
                    )
                if catch_up:  # after the group, whose callers have their answers by now
                    self._checkpointer.catch_up(self._writer)
        finally:
            self._checkpointer.stop()
            self._writer.close()

    def _write_safely(self, group: list[_Append]) -> None:
        try:
            outcomes, committed = self._write(group)
        except Exception as exc:  # a bug: fail the group, keep the writer alive
            logger.exception("! event log writer failed on a group of %d appends", len(group))
            self._forget([item.town for item in group])
            message = f"{self.path}: writer error: {exc!r}"
            outcomes, committed = [(item, _unavailable(message, exc)) for item in group], []
        self._post(outcomes, committed)

    def _post(self, outcomes: list[tuple[_Append, _Outcome]], committed: list[_Append]) -> None:
        loop = self._loop
        if loop is None:  # cannot happen: append() binds the loop before queueing
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(self._deliver, outcomes, committed)

    def _write(self, group: list[_Append]) -> tuple[list[tuple[_Append, _Outcome]], list[_Append]]:
        """Check, write and commit one group; returns every item's outcome and the committed."""
        outcomes: list[tuple[_Append, _Outcome]] = []
        accepted = self._check(group, outcomes)
        if not accepted:
            return outcomes, []
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._insert(conn, accepted)
            except sqlite3.Error as exc:
                logger.warning("! group insert failed (%s); retrying append by append", exc)
                _rollback(conn)
                conn.execute("BEGIN IMMEDIATE")
                accepted = self._insert_each(conn, accepted, outcomes)
            self._commit(conn)
        except sqlite3.Error as exc:
            _rollback(conn)
            self._forget([item.town for item in accepted])
            message = f"{self.path}: commit failed: {exc}"
            outcomes.extend((item, _unavailable(message, exc)) for item in accepted)
            return outcomes, []
        self.commits += 1
        for item in accepted:
            self._committed[item.town] = item.records[-1].seq
            self.appended += len(item.records)
            outcomes.append((item, [record.seq for record in item.records]))
        return outcomes, accepted

    def _check(
        self, group: list[_Append], outcomes: list[tuple[_Append, _Outcome]]
    ) -> list[_Append]:
        """Split off the batches that do not continue their town (as if the earlier committed)."""
        pending: dict[str, int] = {}
        accepted: list[_Append] = []
        for item in group:
            last = pending.get(item.town)
            if last is None:
                last = self._last_committed(item.town)
            conflict = check_batch(item.town, item.records, last)
            if conflict is not None:
                outcomes.append((item, conflict))
            else:
                accepted.append(item)
                pending[item.town] = item.records[-1].seq
        return accepted

    def _insert_each(
        self,
        conn: sqlite3.Connection,
        accepted: list[_Append],
        outcomes: list[tuple[_Append, _Outcome]],
    ) -> list[_Append]:
        """Write each batch under its own savepoint; fail only the batches that fail."""
        kept: list[_Append] = []
        pending: dict[str, int] = {}
        for item in accepted:
            last = pending.get(item.town)
            if last is None:
                last = self._last_committed(item.town)
            conflict = check_batch(item.town, item.records, last)
            if conflict is not None:  # an earlier batch of this town failed in this group
                outcomes.append((item, conflict))
                continue
            conn.execute("SAVEPOINT one_append")
            try:
                self._insert(conn, [item])
            except sqlite3.IntegrityError as exc:
                error: LogError = SeqConflict(
                    f"town {item.town!r}: seq already stored by another writer ({exc})"
                )
            except sqlite3.Error as exc:
                error = _unavailable(f"{self.path}: append failed: {exc}", exc)
            else:
                conn.execute("RELEASE one_append")
                kept.append(item)
                pending[item.town] = item.records[-1].seq
                continue
            conn.execute("ROLLBACK TO one_append")
            conn.execute("RELEASE one_append")
            self._forget([item.town])
            outcomes.append((item, error))
        return kept

    # Two seams, overridden by fault-injection tests.
    def _insert(self, conn: sqlite3.Connection, items: list[_Append]) -> None:
        conn.executemany(
            _INSERT, [(item.town, r.seq, r.data) for item in items for r in item.records]
        )

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _last_committed(self, town: str) -> int:
        last = self._committed.get(town)
        if last is None:
            last = self._committed[town] = _last(self._writer, town)
        return last

    def _forget(self, towns: list[str]) -> None:
        """Drop cached last seqs so the next append re-reads them from the file."""
        for town in towns:
            self._committed.pop(town, None)


class _Checkpointer:
    """Copies the WAL back into the database file, mostly on its own thread and connection.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, holding the
    writer for the whole copy and its two fsyncs: at a couple of thousand commits a second that
    was a stall of several milliseconds every ~150 ms, the largest cause of the report→offer
    tail (docs/performance.md). Here a thread runs PASSIVE checkpoints on its own connection
    every ``CHECKPOINT_PAGES``; they take no lock the writer needs, so commits go on meanwhile.

    A checkpoint beside a busy writer never quite finishes, and SQLite starts the WAL again
    from its beginning only after one has: the file would grow for ever, and an fsync that must
    also journal a new file size costs about twice as much. So once the WAL holds
    ``WAL_RESTART_PAGES`` (or after a quiet round) the writer itself copies what the last round
    left (:meth:`catch_up`, queued between two groups: a millisecond or two, every few seconds
    at full load), and its next commit starts the file over. In between, the WAL is rewritten in
    place within the size it already has, so its fsyncs journal nothing. Both connections sync
    as FULL does: the WAL before a copy, the database after it.
    """

    def __init__(
        self, conn: sqlite3.Connection, name: str, request_catch_up: Callable[[], None]
    ) -> None:
        conn.execute("PRAGMA synchronous = FULL")
        self._conn = conn
        self._request_catch_up = request_catch_up
        self._wake = threading.Event()
        self._stopping = False
        self._running = False
        self._pages = 0.0  # written since the last round (estimated)
        self._wal_pages = 0.0  # written since the WAL last started over (estimated)
        self.rounds = 0
        self.restarts = 0
        self._thread = threading.Thread(
            target=self._run, name=f"dispatch-log-checkpoint:{name}", daemon=True
        )
        self._thread.start()

    def committed(self, records: int, size: int) -> None:
        """The writer thread, after each group: count what it wrote, start a round when due."""
        # A commit rewrites the last page of the table and of its index, plus what it adds.
        pages = 2 + size / 4096 + records / 64
        self._pages += pages
        self._wal_pages += pages
        if self._pages >= CHECKPOINT_PAGES and not self._running:
            self._pages = 0.0
            self._running = True
            self._wake.set()

    def catch_up(self, writer: sqlite3.Connection) -> None:
        """The writer thread, between groups: finish the last round, so the WAL starts over."""
        try:
            ((busy, frames, copied),) = writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            logger.warning("! checkpoint catch-up failed: %s", exc)
            return
        if not busy and frames == copied:
            self._wal_pages = 0.0
            self.restarts += 1

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        while not self._stopping:
            quiet = not self._wake.wait(CHECKPOINT_IDLE)
            if quiet:
                if self._pages == 0 or self._running:
                    continue
                self._pages = 0.0
                self._running = True
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                logger.warning("! background checkpoint failed: %s", exc)
            self.rounds += 1
            self._running = False
            if quiet or self._wal_pages >= WAL_RESTART_PAGES:
                self._request_catch_up()


class _CatchUp:
    """The checkpointer's request, queued to the writer like an append."""


_CATCH_UP = _CatchUp()


def _drain(
    head: _Append | _CatchUp | None, q: queue.SimpleQueue[_Append | _CatchUp | None]
) -> Iterator[_Append | _CatchUp | None]:
    yield head
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


def _unavailable(message: str, cause: BaseException) -> LogUnavailable:
    # One exception object per future: a shared one would collect every awaiter's traceback.
    error = LogUnavailable(message)
    error.__cause__ = cause
    return error


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls some failures back by itself; then there is no transaction left to end.
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _select(conn: sqlite3.Connection, town: str, after: int, limit: int) -> list[Record]:
    rows: list[tuple[int, bytes]] = conn.execute(_SELECT, (town, after, limit)).fetchall()
    return [Record(seq, data) for seq, data in rows]


def _last(conn: sqlite3.Connection, town: str) -> int:
    row: tuple[int | None] = conn.execute(_LAST, (town,)).fetchone()
    return row[0] or 0
