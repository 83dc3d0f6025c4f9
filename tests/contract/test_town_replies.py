"""The town writer answers ``send``-ed commands inside the commit that made them durable.

A real engine (tests/unit/enginekit.py), a real SQLite log and the real metrics; the sink records
what the writer hands it, in order, and whether a loop turn passed in between.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from dispatch.clock import SystemClock
from dispatch.engine import commands as c
from dispatch.engine.commands import Notice
from dispatch.engine.engine import Engine
from dispatch.engine.events import Event
from dispatch.errors import Rejected
from dispatch.geo.index import CellIndex
from dispatch.log import SqliteLog
from dispatch.server.metrics import Metrics
from dispatch.server.town import Reply, TownRunner
from tests.unit.enginekit import GRIDSET, TIMING, town


class Recorder:
    """A Sink that notes each call and the loop turn it happened in."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.turn = 0

    def publish(self, runner: TownRunner, events: list[Event]) -> None:
        self.calls.append(("publish", self.turn))

    def loaded(self, runner: TownRunner, events: list[Event]) -> None:
        pass

    def notify(self, runner: TownRunner, notices: list[Notice]) -> None:
        self.calls.append(("notify", self.turn))

    async def count_turns(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.turn += 1


async def test_a_sent_command_is_answered_in_the_commit_after_its_notices(
    tmp_path: Path,
) -> None:
    sink = Recorder()
    log = SqliteLog(tmp_path / "log.db")
    runner = TownRunner(
        town="T0",
        make_engine=lambda: Engine(town(), CellIndex(), GRIDSET, TIMING),
        log=log,
        clock=SystemClock(),
        sink=sink,
        metrics=Metrics(),
    )
    await runner.load()
    runner.start()
    turns = asyncio.create_task(sink.count_turns())
    try:
        await runner.submit(c.Connect("w1"))
        runner.engine.position("w1", 113.006, 22.606, runner.clock.now())
        answers: list[tuple[Any, BaseException | None, int]] = []
        done = asyncio.Event()

        def reply(outcome: Any, error: BaseException | None) -> None:
            answers.append((outcome, error, sink.turn))
            done.set()

        sink.calls.clear()
        runner.send(c.Report(ref="r1", category="fire_hazard", lon=113.006, lat=22.606), reply)
        await asyncio.wait_for(done.wait(), 5)
        (outcome, error, turn), = answers
        assert error is None and outcome.incident is not None
        # The offer to w1 (notify) and the ack came out of one commit, in one loop turn.
        assert sink.calls == [("publish", turn), ("notify", turn)]
        assert runner.engine.state.incidents[outcome.incident].responder == "w1"

        answers.clear()
        done.clear()
        runner.send(c.Accept("w2", outcome.incident), reply)
        await asyncio.wait_for(done.wait(), 5)
        (_, error, _), = answers
        assert isinstance(error, Rejected)
    finally:
        turns.cancel()
        await runner.stop()
        await log.close()


def test_a_reply_answers_once_and_survives_its_callback() -> None:
    got: list[tuple[Any, BaseException | None]] = []

    def callback(result: Any, error: BaseException | None) -> None:
        got.append((result, error))
        raise RuntimeError("a bug in the caller")

    reply = Reply(callback)
    assert not reply.done()
    reply.set_result(1)  # the callback's exception is logged, not raised into the writer
    reply.set_exception(Rejected("internal", "too late"))
    reply.set_result(2)
    assert reply.done()
    assert got == [(1, None)]
