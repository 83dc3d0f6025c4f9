"""One bounded outgoing queue per websocket, so no sender ever waits on the slowest client
(``websockets`` docs, "broadcast"). Frames are encoded once by the caller and queued as bytes;
a client whose queue overflows while its socket is backed up is closed with 4008 and resumes
with ``since``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar

from aiohttp import WSMsgType, web

CLOSE_TOO_SLOW = 4008
BATCH = 256
"""Frames written to the socket in one call: one syscall for a burst instead of one a frame."""
HARD_LIMIT_FACTOR = 4
"""A client is too slow when more than ``limit`` frames wait while its socket is backed up; a
burst to a client that is reading (one batch of acks, say) may queue up to this many times
``limit`` before it is cut off regardless."""
HIGH_WATER = 256 * 1024
"""Bytes buffered in the transport beyond which the writer waits for the socket to drain."""


_held: ContextVar[list[Outbox] | None] = ContextVar("dispatch_outbox_held", default=None)


@contextlib.contextmanager
def sent_together() -> Iterator[None]:
    """Frames queued inside go out when the block ends, one write per connection.

    Without it a frame goes out a loop turn after it was queued (``call_soon``), so that what
    one commit sends to a connection shares a write. The town writer sends everything a commit
    causes (events to screens, notices to devices, acknowledgements) inside this block: the
    frames still share a write, and leave at once instead of a loop turn later, which under load
    is a fraction of a millisecond at the median and milliseconds in the tail."""
    if _held.get() is not None:  # nested: the outer block flushes
        yield
        return
    held: list[Outbox] = []
    token = _held.set(held)
    try:
        yield
    finally:
        _held.reset(token)
        for outbox in held:
            outbox._flush()


def text_header(n: int) -> bytes:
    """The RFC 6455 header of an unmasked, final text frame of ``n`` bytes (server → client)."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n)
    return struct.pack("!BBQ", 0x81, 127, n)


def _raw_channel(
    ws: web.WebSocketResponse,
) -> tuple[asyncio.WriteTransport, Callable[[], Awaitable[None]]] | None:
    """The socket under an aiohttp websocket, to write many prepared frames at once.

    Uses aiohttp's writer internals (``transport``, ``protocol._drain_helper``) and only when
    the connection sends uncompressed; ``None`` (plain ``send_frame``) if they are not there."""
    writer = getattr(ws, "_writer", None)
    transport = getattr(writer, "transport", None)
    protocol = getattr(writer, "protocol", None)
    drain = getattr(protocol, "_drain_helper", None)
    if transport is None or drain is None or getattr(writer, "compress", True):
        return None
    return transport, drain


class Outbox:
    """Frames for one websocket, written in order, never making the sender wait.

    On the raw channel (the usual case) :meth:`send` queues the frame and schedules one
    :meth:`_flush` per connection and loop turn (``call_soon``), or at the end of the
    :func:`sent_together` block it was sent in: every frame queued by one commit goes out in one
    ``transport.write``, with no task and no wake-up per frame. Only
    while the socket is backed up (more than :data:`HIGH_WATER` bytes buffered) does a task wait
    for it to drain. Without the raw channel a writer task sends frame by frame."""

    __slots__ = (
        "_blocked",
        "_closer",
        "_drained",
        "_frames",
        "_loop",
        "_on_evict",
        "_raw",
        "_scheduled",
        "_task",
        "_wake",
        "closed",
        "limit",
        "ws",
    )

    def __init__(
        self, ws: web.WebSocketResponse, limit: int, on_evict: Callable[[], None] | None = None
    ) -> None:
        self.ws = ws
        self.limit = limit
        self._frames: deque[bytes] = deque()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closer: asyncio.Task[bool] | None = None
        self._blocked = False
        """True while the socket is backed up: the client is not reading what it was sent."""
        self._on_evict = on_evict
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._raw = _raw_channel(ws)
        self._scheduled = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        if self._raw is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._pump())

    def send(self, frame: bytes) -> None:
        """Queue a text frame. Never blocks; evicts the client if it cannot keep up."""
        if self.closed:
            return
        queued = len(self._frames)
        if queued >= self.limit and (self._blocked or queued >= HARD_LIMIT_FACTOR * self.limit):
            self.evict()
            return
        self._frames.append(frame)
        if not queued:
            self._drained.clear()
        if self._wake is not None:
            self._wake.set()
        elif not self._scheduled and not self._blocked:
            self._scheduled = True
            held = _held.get()
            if held is not None:
                held.append(self)
            else:
                self._loop.call_soon(self._flush)

    def evict(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._frames.clear()
        if self._on_evict is not None:
            self._on_evict()
        self._drained.set()
        self._closer = asyncio.create_task(
            self.ws.close(code=CLOSE_TOO_SLOW, message=b"too slow: resume with since")
        )

    def _flush(self) -> None:
        """Write what is queued (raw channel), in batches of :data:`BATCH` frames."""
        self._scheduled = False
        if self.closed or self._blocked or self._raw is None:
            return
        transport, _ = self._raw
        frames = self._frames
        if transport.is_closing():
            self._gone()
            return
        while frames:
            parts: list[bytes] = []
            while frames and len(parts) < 2 * BATCH:
                frame = frames.popleft()
                parts.append(text_header(len(frame)))
                parts.append(frame)
            try:
                transport.write(b"".join(parts))
            except (ConnectionError, RuntimeError):
                self._gone()
                return
            if transport.get_write_buffer_size() > HIGH_WATER:
                self._blocked = True
                self._task = asyncio.create_task(self._wait_drained())
                return
        self._drained.set()

    async def _wait_drained(self) -> None:
        assert self._raw is not None
        try:
            await self._raw[1]()
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            self._gone()
            return
        finally:
            self._blocked = False
        self._flush()

    def _gone(self) -> None:
        self.closed = True
        self._frames.clear()
        self._drained.set()

    async def _pump(self) -> None:
        """Without the raw channel: one ``send_frame`` at a time."""
        frames = self._frames
        ws = self.ws
        wake = self._wake
        assert wake is not None
        try:
            while not self.closed:
                if not frames:
                    self._drained.set()
                    wake.clear()
                    await wake.wait()
                    continue
                self._blocked = True
                try:
                    await ws.send_frame(frames.popleft(), WSMsgType.TEXT)
                finally:
                    self._blocked = False
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            self._gone()

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (briefly) until everything queued was written, e.g. before a graceful close."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._drained.wait()

    async def aclose(self) -> None:
        self.closed = True
        if self._wake is not None:
            self._wake.set()
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
