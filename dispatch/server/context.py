"""What every handler shares: settings, towns and their writers, the hub, metrics, the clock.

One :class:`Context` per application, stored under ``app[Context.KEY]``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from dispatch.clock import Clock
from dispatch.errors import Rejected
from dispatch.log.base import EventLog
from dispatch.server.hub import Hub
from dispatch.server.keepalive import Keepalive, answer_control
from dispatch.server.limits import TokenBucket
from dispatch.server.metrics import Metrics
from dispatch.server.outbox import Outbox
from dispatch.wire import messages as m
from dispatch.wire.codec import error_message, hello_without_token, message_id


@dataclass(eq=False)
class Context:
    KEY: ClassVar[web.AppKey[Context]]

    settings: Any
    data: Any
    log: EventLog
    clock: Clock
    metrics: Metrics
    hub: Hub
    runners: dict[str, Any] = field(default_factory=dict)
    """Town id → its ``TownRunner`` (or, in distributed mode, its ``TownSlot``)."""
    town_of_responder: dict[str, str] = field(default_factory=dict)
    connections: set[web.WebSocketResponse] = field(default_factory=set)
    keepalive: Keepalive = field(default_factory=lambda: Keepalive(0.0))
    stopping: bool = False
    grids_json: bytes = b""
    rest_buckets: dict[str, Any] = field(default_factory=dict)
    node: Any = None
    """The ``ClusterNode`` in distributed mode (``[store] url = "redis://…"``), else ``None``."""

    def position_out(self, town: str, rid: str, lon: float, lat: float, ts: float) -> None:
        """Share a local device's position with the other instances (distributed mode)."""
        if self.node is not None:
            self.node.local_position(town, rid, lon, lat, ts)

    def runner_for_point(self, lon: float, lat: float) -> Any:
        located = self.data.gridset.locate(lon, lat)
        if located is None:
            return None
        return self.runners.get(located.g1)

    def town_of_grid(self, grid_id: str) -> str | None:
        """The town of a grid id, or ``None`` for an unknown id (``GridSet.town_of`` raises)."""
        gridset = self.data.gridset
        return gridset.town_of(grid_id) if grid_id in gridset.grids else None

    @property
    def ready(self) -> bool:
        return bool(self.runners) and all(r.healthy for r in self.runners.values())


Context.KEY = web.AppKey("dispatch_context", Context)


def check_origin(request: web.Request, ctx: Context) -> None:
    """Browsers send ``Origin``: accept the same host or one on the allow-list; devices that send
    no ``Origin`` pass (they authenticate with their token)."""
    origin = request.headers.get("Origin")
    if not origin:
        return
    allowed = ctx.settings.server.allowed_origins
    if origin in allowed or "*" in allowed:
        return
    if urlsplit(origin).netloc == request.host:
        return
    raise web.HTTPForbidden(
        text='{"type":"/errors/forbidden","title":"Forbidden","status":403,"code":"forbidden",'
        f'"detail":"Origin {origin} is not allowed; add it to [server] allowed_origins."}}',
        content_type="application/problem+json",
    )


def ws_response(ctx: Context) -> web.WebSocketResponse:
    s = ctx.settings.server
    return web.WebSocketResponse(
        heartbeat=None,  # ctx.keepalive pings, for every connection at once
        autoping=False,  # pongs reach the handlers, which tell ctx.keepalive
        compress=False,
        # aiohttp refuses a frame whose length is >= max_msg_size (one byte short of the limit
        # the name promises); PROTOCOL.md allows frames of up to max_message_bytes.
        max_msg_size=s.max_message_bytes + 1,
    )


CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_HELLO_TIMEOUT = 4408
CLOSE_FLOOD = 4429


async def receive_hello(ctx: Context, ws: web.WebSocketResponse, decode: Any) -> Any:
    """Wait for ``hello`` (PROTOCOL: within 10 s, else 4408). Other frames get an error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.settings.server.hello_timeout
    while True:
        left = deadline - loop.time()
        if left <= 0:
            await ws.close(
                code=CLOSE_HELLO_TIMEOUT, message=b"hello expected within the time limit"
            )
            return None
        try:
            msg = await ws.receive(timeout=left)
        except TimeoutError:
            continue
        ctx.keepalive.seen[ws] = time.monotonic()
        if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
            if await answer_control(ws, msg):
                continue
            return None
        try:
            hello = decode(msg.data)
        except Rejected as rej:
            if hello_without_token(msg.data):
                await ws.close(code=CLOSE_UNAUTHORIZED, message=b"hello needs a token")
                return None
            await ws.send_frame(
                error_message(rej.code, rej.message, rej.message_id), WSMsgType.TEXT
            )
            continue
        if not isinstance(hello, m.Hello):
            await ws.send_frame(
                error_message(
                    "bad_message",
                    'Say hello first: the first message must be {"type": "hello", "token": …}.',
                    getattr(hello, "id", None),
                ),
                WSMsgType.TEXT,
            )
            continue
        return hello


async def refuse_over_limit(
    ctx: Context,
    ws: web.WebSocketResponse,
    outbox: Outbox,
    bucket: TokenBucket,
    data: Any,
    now: float,
) -> bool:
    """A message the bucket refused (PROTOCOL.md "Errors"), on either channel: answer it
    ``rate_limited`` with its id, or close 4429 once the client is flooding. True when closed."""
    if bucket.flooding(now):
        await ws.close(code=CLOSE_FLOOD, message=b"too many messages")
        return True
    s = ctx.settings.server
    outbox.send(
        error_message(
            "rate_limited",
            f"Slow down: at most {s.rate:g} messages a second (bursts of {s.burst}).",
            message_id(data),
        )
    )
    ctx.metrics.errors.labels("rate_limited").inc()
    return False


def close_when_expired(ctx: Context, ws: web.WebSocketResponse, exp: float) -> asyncio.TimerHandle:
    """PROTOCOL.md: an expired token closes the websocket with 4401, also mid-session: a wall
    screen left signed in, or a device whose token was not renewed, stops acting with it. Cancel
    the handle when the session ends."""
    loop = asyncio.get_running_loop()

    def close() -> None:
        if not ws.closed:
            task = loop.create_task(ws.close(code=CLOSE_UNAUTHORIZED, message=b"token expired"))
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    return loop.call_later(max(0.0, exp - ctx.clock.now()), close)


_closing: set[asyncio.Task[bool]] = set()
