"""Websocket keepalive for every connection from one task.

A connection that has sent nothing for ``[server] heartbeat`` seconds gets a ping; one that has
sent nothing, not even the pong, for twice that is closed (1011), so a phone that vanished
without closing (out of coverage, battery) frees its responder for the offline clock instead of
holding it for ever.

aiohttp's own heartbeat does the same per connection, but it pays for it on every message: each
data chunk schedules a callback that moves the connection's timer, which cost about 1.5 µs of a
position's ~16 µs (docs/performance.md). Here a message costs one store into
:attr:`Keepalive.seen`, and one sweep every quarter heartbeat looks at every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from aiohttp import WSMsgType, web

log = structlog.get_logger("dispatch.keepalive")

CLOSE_NO_PONG = 1011


class Keepalive:
    """When each websocket was last heard from (``time.monotonic()``), and the sweep over them."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.seen: dict[web.WebSocketResponse, float] = {}
        """Last heard, per connection: the hot paths store into it directly."""
        self._pinged: dict[web.WebSocketResponse, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def watch(self, ws: web.WebSocketResponse) -> None:
        self.seen[ws] = time.monotonic()

    def forget(self, ws: web.WebSocketResponse) -> None:
        self.seen.pop(ws, None)
        self._pinged.pop(ws, None)

    async def run(self) -> None:
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval / 4)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        interval = self.interval
        pinged = self._pinged
        for ws, last in list(self.seen.items()):
            idle = now - last
            if idle < interval:
                continue
            if ws.closed:
                self.forget(ws)
            elif idle >= 2 * interval:
                self.forget(ws)
                log.info("websocket silent; closing", idle_s=round(idle, 1))
                self._spawn(ws.close(code=CLOSE_NO_PONG, message=b"no answer to pings"))
            elif pinged.get(ws, -1.0) <= last:  # heard from since the last ping (or none)
                pinged[ws] = now
                self._spawn(ws.ping())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a connection that broke meanwhile: nothing to do


async def answer_control(ws: web.WebSocketResponse, msg: Any) -> bool:
    """Answer a ping (the server's websockets do not answer them by themselves, so that a pong
    reaches :class:`Keepalive` like any message). True if ``msg`` was a ping or a pong."""
    if msg.type is WSMsgType.PING:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.pong(msg.data)
        return True
    return msg.type is WSMsgType.PONG
