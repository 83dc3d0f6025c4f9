"""A screen's outbox against a real aiohttp server and a real ``websockets`` client.

The limit is about clients that do not read, not about bursts: one commit at saturation can
publish more events than ``queue_limit`` (up to 512 commands a batch, ~8 events a dispatched
report), and a wall screen that reads must get all of them in order instead of a 4008.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import websockets
from aiohttp import web

from dispatch.server.outbox import CLOSE_TOO_SLOW, HARD_LIMIT_FACTOR, Outbox, sent_together

LIMIT = 50


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """``/ws``: on ``{"burst": n}`` queue n numbered frames at once (one commit's worth)."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        outbox = Outbox(ws, LIMIT)
        async for msg in ws:
            n = json.loads(msg.data)["burst"]
            with sent_together():
                for i in range(n):
                    outbox.send(json.dumps({"n": i, "pad": "x" * 200}).encode())
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        await runner.cleanup()


async def test_a_reading_screen_gets_a_burst_bigger_than_the_limit_whole_and_in_order(
    server: str,
) -> None:
    n = (HARD_LIMIT_FACTOR - 1) * LIMIT
    async with websockets.connect(server) as ws:
        await ws.send(json.dumps({"burst": n}))
        got = [json.loads(await asyncio.wait_for(ws.recv(), 5))["n"] for _ in range(n)]
        assert got == list(range(n))
        await ws.send(json.dumps({"burst": n}))  # and again: nothing was held against it
        got = [json.loads(await asyncio.wait_for(ws.recv(), 5))["n"] for _ in range(n)]
        assert got == list(range(n))
        assert ws.close_code is None


async def test_a_burst_past_the_hard_limit_is_cut_off_with_4008(server: str) -> None:
    """Past ``HARD_LIMIT_FACTOR`` × the limit even a reading client is closed: the server's
    memory for one connection stays bounded; the client resumes with ``since``."""
    async with websockets.connect(server) as ws:
        await ws.send(json.dumps({"burst": HARD_LIMIT_FACTOR * LIMIT + 1}))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == CLOSE_TOO_SLOW
