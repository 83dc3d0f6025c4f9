"""What only the SQLite backend promises: group commit, failure isolation, crash safety."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest

from dispatch.errors import LogUnavailable, SeqConflict
from dispatch.log import Record, SqliteLog
from dispatch.log import sqlite as sqlite_log
from dispatch.log.sqlite import _Append
from tests.contract import MS

ROOT = Path(__file__).resolve().parents[2]


def numbered(first: int, count: int, tag: str = "e") -> list[Record]:
    return [Record(seq, f"{tag}{seq}".encode()) for seq in range(first, first + count)]


class GatedLog(SqliteLog):
    """A SqliteLog whose first commit waits for ``gate``, so later appends pile up in one group.

    It also fails, on purpose, the insert of any record whose data is ``b"poison"`` and the
    commits while ``fail_commits`` is set.
    """

    def __init__(self, path: Path) -> None:
        self.gate = threading.Event()
        self.waiting = threading.Event()  # set once the writer waits at the gate
        self.fail_commits = False
        super().__init__(path)

    def _insert(self, conn: sqlite3.Connection, items: list[_Append]) -> None:
        if any(r.data == b"poison" for item in items for r in item.records):
            raise sqlite3.OperationalError("injected insert failure")
        super()._insert(conn, items)

    def _commit(self, conn: sqlite3.Connection) -> None:
        self.waiting.set()
        self.gate.wait(10)
        if self.fail_commits:
            raise sqlite3.OperationalError("injected disk I/O error")
        super()._commit(conn)


async def test_file_is_in_wal_mode(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db")
    try:
        await log.append("t", numbered(1, 1))
        with closing(sqlite3.connect(tmp_path / "log.db")) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await log.close()


async def test_creates_missing_folders(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "var" / "deep" / "log.db")
    await log.append("t", numbered(1, 1))
    await log.close()
    assert (tmp_path / "var" / "deep" / "log.db").exists()


def test_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(LogUnavailable, match=r"dir\.db"):
        SqliteLog(tmp_path / "dir.db")


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db")
    try:

        async def writer(town: str) -> None:
            for seq in range(1, 21):
                await log.append(town, numbered(seq, 1))

        await asyncio.gather(*(writer(f"t{i}") for i in range(50)))
        assert log.appended == 1000
        assert log.commits < 500  # 50 appenders: groups form while each fsync runs
    finally:
        await log.close()


async def test_per_commit_mode_commits_every_append(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", per_commit=True)
    try:
        await asyncio.gather(*(log.append(f"t{i}", numbered(1, 2)) for i in range(30)))
        assert log.commits == 30
        assert log.appended == 60
    finally:
        await log.close()


async def test_a_failing_batch_fails_alone(tmp_path: Path) -> None:
    log = GatedLog(tmp_path / "log.db")
    try:
        first = asyncio.create_task(log.append("warm", numbered(1, 1)))
        assert await asyncio.to_thread(log.waiting.wait, 10)  # the writer is in the 1st commit
        tasks = {
            "a": asyncio.create_task(log.append("a", numbered(1, 2, "a"))),
            "poison": asyncio.create_task(log.append("p", [Record(1, b"poison")])),
            "b": asyncio.create_task(log.append("b", numbered(1, 1, "b"))),
            "a2": asyncio.create_task(log.append("a", numbered(3, 1, "a"))),
            "after-poison": asyncio.create_task(log.append("p", [Record(2, b"fine")])),
            "stale": asyncio.create_task(log.append("b", numbered(1, 1, "x"))),
        }
        await asyncio.sleep(20 * MS)  # all queued behind the gate
        log.gate.set()
        assert await first == [1]
        results = dict(
            zip(tasks, await asyncio.gather(*tasks.values(), return_exceptions=True), strict=True)
        )
        assert results["a"] == [1, 2]
        assert results["b"] == [1]
        assert results["a2"] == [3]
        assert isinstance(results["poison"], LogUnavailable)
        assert isinstance(results["after-poison"], SeqConflict)  # seq 1 of "p" never landed
        assert isinstance(results["stale"], SeqConflict)
        assert log.commits == 2  # the warm-up, then one group for everything else
        assert await log.read("a") == numbered(1, 3, "a")
        assert await log.read("b") == numbered(1, 1, "b")
        assert await log.read("p") == []
        assert await log.last_seq("p") == 0
        assert await log.append("p", [Record(1, b"fine")]) == [1]
    finally:
        await log.close()


async def test_a_failed_commit_fails_the_group_and_writes_nothing(tmp_path: Path) -> None:
    log = GatedLog(tmp_path / "log.db")
    log.gate.set()
    try:
        await log.append("a", numbered(1, 1))
        log.fail_commits = True
        results = await asyncio.gather(
            log.append("a", numbered(2, 2)),
            log.append("b", numbered(1, 1)),
            return_exceptions=True,
        )
        assert all(isinstance(r, LogUnavailable) for r in results), results
        log.fail_commits = False
        assert await log.last_seq("a") == 1
        assert await log.read("b") == []
        assert await log.append("a", numbered(2, 2)) == [2, 3]
        assert await log.append("b", numbered(1, 1)) == [1]
    finally:
        await log.close()


async def test_a_second_writer_is_caught_by_the_primary_key(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db")
    try:
        await log.append("t", numbered(1, 1))
        with closing(sqlite3.connect(tmp_path / "log.db", isolation_level=None)) as other:
            other.execute("INSERT INTO events VALUES ('t', 2, x'00')")
        with pytest.raises(SeqConflict):
            await log.append("t", numbered(2, 1))
        assert await log.last_seq("t") == 2
        assert await log.append("t", numbered(3, 1)) == [3]
        assert [r.seq for r in await log.read("t")] == [1, 2, 3]
    finally:
        await log.close()


async def test_a_cancelled_append_still_leaves_the_log_consistent(tmp_path: Path) -> None:
    log = GatedLog(tmp_path / "log.db")
    try:
        first = asyncio.create_task(log.append("t", numbered(1, 1)))
        assert await asyncio.to_thread(log.waiting.wait, 10)
        doomed = asyncio.create_task(log.append("t", numbered(2, 1)))
        await asyncio.sleep(0)
        doomed.cancel()
        log.gate.set()
        assert await first == [1]
        with pytest.raises(asyncio.CancelledError):
            await doomed
        # The cancelled batch was already queued: it is committed, unacknowledged (the writer
        # keeps queue order, so seq 3 can follow it).
        assert await log.append("t", numbered(3, 1)) == [3]
        assert await log.read("t") == numbered(1, 3)
    finally:
        await log.close()


async def test_a_follower_that_overflows_its_buffer_reads_the_rest(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", follow_buffer=5)
    try:
        got: list[Record] = []

        async def slow() -> None:
            async for record in log.follow("t", 0):
                got.append(record)
                await asyncio.sleep(0.2 * MS)
                if len(got) == 300:
                    return

        task = asyncio.create_task(slow())
        for first in range(1, 301, 3):
            await log.append("t", numbered(first, 3))
        async with asyncio.timeout(10_000 * MS):
            await task
        assert got == numbered(1, 300)
    finally:
        await log.close()


# -- checkpoints ---------------------------------------------------------------------------------


def file_sizes(db: Path) -> tuple[int, int]:
    return db.stat().st_size, Path(f"{db}-wal").stat().st_size


async def test_checkpoints_copy_the_wal_back_and_start_it_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_log, "CHECKPOINT_PAGES", 64)
    monkeypatch.setattr(sqlite_log, "WAL_RESTART_PAGES", 256)
    db = tmp_path / "log.db"
    log = SqliteLog(db)
    try:
        for first in range(1, 3001, 3):  # 1,000 commits of 3 KiB: at least 8 MB of WAL frames
            await log.append(
                "t", [Record(s, s.to_bytes(4, "big") * 250) for s in range(first, first + 3)]
            )
        # The background rounds copied the rows into the database file while the log was open,
        # and the writer's catch-ups started the WAL over instead of letting it grow.
        assert log._checkpointer.rounds >= 5
        assert log._checkpointer.restarts >= 2
        db_size, wal_size = await asyncio.to_thread(file_sizes, db)
        assert db_size > 2_000_000
        assert wal_size < 3_000_000
        records = await log.read("t")
        assert [r.seq for r in records] == list(range(1, 3001))
        assert all(r.data == r.seq.to_bytes(4, "big") * 250 for r in records)
    finally:
        await log.close()


async def test_a_quiet_log_is_checkpointed_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_log, "CHECKPOINT_IDLE", 0.05)
    db = tmp_path / "log.db"
    log = SqliteLog(db)
    try:
        await log.append("t", numbered(1, 50))
        for _ in range(500):
            if log._checkpointer.rounds:
                break
            await asyncio.sleep(0.01)
        assert log._checkpointer.rounds, "no checkpoint after a quiet spell"
        with closing(sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)) as conn:
            # read without the WAL: the rows are in the database file itself
            assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 50
        assert await log.append("t", numbered(51, 1)) == [51]
    finally:
        await log.close()


# -- crash safety: a writer killed with SIGKILL --------------------------------------------------

WRITER = """
import asyncio, sys
from dispatch.log import Record, SqliteLog
from dispatch.log import sqlite as sqlite_log

if len(sys.argv) > 2:  # checkpoint often, so the kill finds one under way
    sqlite_log.CHECKPOINT_PAGES = int(sys.argv[2])
    sqlite_log.WAL_RESTART_PAGES = int(sys.argv[3])

async def writer(log, town, size):
    seq = 0
    while True:
        seqs = range(seq + 1, seq + size + 1)
        batch = [Record(s, f"{town}:{s}:".encode().ljust(300, b".")) for s in seqs]
        await log.append(town, batch)
        seq += size
        sys.stdout.write(f"{town} {seq}\\n")
        sys.stdout.flush()

async def main():
    log = SqliteLog(sys.argv[1])
    await asyncio.gather(*(writer(log, f"t{i}", 1 + i % 3) for i in range(8)))

asyncio.run(main())
"""


def run_and_kill_writer(db: Path, acks: int, *checkpoints: int) -> dict[str, int]:
    """Run WRITER on ``db``, SIGKILL it after ``acks`` acks; return the last acked seq per town.

    ``checkpoints``: (CHECKPOINT_PAGES, WAL_RESTART_PAGES) for the writer, else its defaults."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), *map(str, checkpoints)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    acked: dict[str, int] = {}
    lines = 0
    try:
        for line in proc.stdout:
            town, seq = line.split()
            acked[town.decode()] = int(seq)
            lines += 1
            if lines == acks:
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail(f"writer exited early with {proc.wait()}")
        # Whatever was printed before the kill was acknowledged, hence must be durable.
        for line in proc.stdout:
            if line.endswith(b"\n"):
                town, seq = line.split()
                acked[town.decode()] = int(seq)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return acked


def check_gapless(db: Path) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT town, seq, data FROM events ORDER BY town, seq").fetchall()
    last: dict[str, int] = {}
    for town, seq, data in rows:
        assert seq == last.get(town, 0) + 1, f"gap in {town} before {seq}"
        assert data.startswith(f"{town}:{seq}:".encode()) and len(data) == 300
        last[town] = seq
    return last


@pytest.mark.parametrize("checkpoints", [(), (8, 32)], ids=["default", "checkpointing"])
async def test_sigkill_loses_nothing_acknowledged(
    tmp_path: Path, checkpoints: tuple[int, ...]
) -> None:
    db = tmp_path / "log.db"
    acked = await asyncio.to_thread(run_and_kill_writer, db, 1500, *checkpoints)
    assert len(acked) == 8
    log = SqliteLog(db)
    try:
        for town, seq in acked.items():
            stored = await log.last_seq(town)
            assert stored >= seq, f"{town}: acked {seq}, stored {stored}"
            records = await log.read(town)
            assert [r.seq for r in records] == list(range(1, stored + 1))
        await log.append("t0", [Record(await log.last_seq("t0") + 1, b"after the crash")])
    finally:
        await log.close()


def wal_committed_size(wal: Path) -> int:
    """Where the WAL's last committed frame ends (later bytes are stale or uncommitted)."""
    data = wal.read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    end = offset = 32
    while offset + 24 + page_size <= len(data):
        header = data[offset : offset + 24]
        if header[8:16] != salts:  # a frame of an earlier WAL generation
            break
        offset += 24 + page_size
        if int.from_bytes(header[4:8], "big"):  # commit frame: the db size after the commit
            end = offset
    return end


def tear(db: Path, torn: Path, cut: float) -> tuple[dict[str, int], dict[str, int]]:
    """Copy a crashed ``db`` to ``torn`` with its WAL torn inside the last commit: ``cut`` bytes
    before its end, or a fraction of it kept.

    Returns the last seq per town of the original and of the torn copy.
    """
    wal = Path(f"{db}-wal")
    size = wal_committed_size(wal)
    assert size > 10_000, "the WAL should hold the unflushed tail"
    torn.parent.mkdir()
    shutil.copy(db, torn)
    shutil.copy(wal, f"{torn}-wal")
    keep = int(size * cut) if isinstance(cut, float) else size - cut
    os.truncate(f"{torn}-wal", keep)
    return check_gapless(db), check_gapless(torn)


@pytest.mark.parametrize("cut", [1, 100, 3000, 0.5])
async def test_a_torn_wal_tail_is_survivable(tmp_path: Path, cut: float) -> None:
    db = tmp_path / "log.db"
    await asyncio.to_thread(run_and_kill_writer, db, 400)
    full, prefix = await asyncio.to_thread(tear, db, tmp_path / "torn" / "log.db", cut)
    # A torn write loses the unsynced tail, never the file: the log opens, each town is a prefix.
    assert all(prefix.get(town, 0) <= last for town, last in full.items())
    assert sum(prefix.values()) < sum(full.values()), "the cut should have torn a commit"
    log = SqliteLog(tmp_path / "torn" / "log.db")
    try:
        for town in full:
            last = await log.last_seq(town)
            assert last == prefix.get(town, 0)
            assert await log.append(town, [Record(last + 1, b"next")]) == [last + 1]
    finally:
        await log.close()
