"""A websocket client connection without a task per connection: the simulated devices' and the
load generator's transport.

:class:`Link` feeds an asyncio transport into websockets' sans-I/O ``ClientProtocol``: the same
opening handshake, frame parser, ping/pong and closing handshake as websockets' asyncio client,
without its reader task, message queue and per-message futures. Every text message is handed to
``on_text`` from ``data_received``. On this class of machine it reads a frame in about 60 % of
the CPU of the asyncio client (measured while building the fan-out benchmark: 10 connections,
300-byte frames), which is what lets one load-generator core carry ten thousand devices or a
thousand wall screens without its own pauses posing as the server's latency.

What it keeps from the asyncio client: ``open_timeout``, ``max_size``, keepalive pings (a ping
every ``ping_interval`` seconds; no pong within ``ping_timeout`` closes the connection, 1011),
write backpressure (:meth:`Link.drain`), and the close code the server sent
(:attr:`Link.close_code`, 1006 when the connection dropped without one).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["Data", "Link", "LinkClosed"]

Data = bytes | bytearray | memoryview
"""A text message's UTF-8 bytes, as websockets' parser hands them over."""


class LinkClosed(ConnectionError):
    """A send on a connection that is closing or closed."""


class Link(asyncio.Protocol):
    """One websocket client connection; open it with :meth:`Link.open`."""

    def __init__(
        self,
        url: str,
        on_text: Callable[[Data], None],
        *,
        max_size: int | None = 1 << 20,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        user_agent: str = "dispatch-sim",
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.uri = parse_uri(url)
        self.proto = ClientProtocol(self.uri, max_size=max_size)
        self.on_text = on_text
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._user_agent = user_agent
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping: bytes | None = None  # the ping awaiting its pong
        self._ping_sent = 0.0
        self._keepalive: asyncio.TimerHandle | None = None
        self._fragments: list[Data] = []
        self._writable: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        on_text: Callable[[Data], None],
        *,
        open_timeout: float = 10.0,
        **kwargs: object,
    ) -> Link:
        """Connect and complete the opening handshake, or raise (OSError, TimeoutError,
        a websockets ``InvalidHandshake`` such as ``InvalidStatus`` for an HTTP refusal)."""
        link = cls(url, on_text, **kwargs)  # type: ignore[arg-type]
        uri = link.uri
        context = ssl.create_default_context() if uri.secure else None
        loop = link._loop
        try:
            async with asyncio.timeout(open_timeout):
                await loop.create_connection(
                    lambda: link,
                    uri.host,
                    uri.port,
                    ssl=context,
                    server_hostname=uri.host if context is not None else None,
                )
                await asyncio.shield(link.opened)
        except BaseException:
            link.abort()
            raise
        return link

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        request = self.proto.connect()
        request.headers["User-Agent"] = self._user_agent
        self.proto.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            if type(event) is Frame:
                self._frame(event)
            elif isinstance(event, Response):
                self._handshake_done()
        self._flush()

    def eof_received(self) -> bool | None:
        self.proto.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.proto.receive_eof()  # → CLOSED, whatever the state
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self.opened.done():
            self.opened.set_exception(
                ConnectionError(f"connection closed during the handshake: {exc or 'EOF'}")
            )
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_writers(LinkClosed("the connection is closed"))

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writers(None)

    # -- use -------------------------------------------------------------------------------------

    @property
    def close_code(self) -> int | None:
        """The code of the server's close frame; 1006 if the connection dropped without one;
        None while it is open."""
        return self.proto.close_code

    def send_text(self, data: bytes) -> None:
        """Queue a text message (UTF-8 bytes). Raises :class:`LinkClosed` once closing."""
        try:
            self.proto.send_text(data)
        except InvalidState as exc:
            raise LinkClosed(str(exc)) from None
        self._flush()

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        writable = self._writable
        if writable is not None:
            await asyncio.shield(writable)

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, timeout: float = 2.0) -> None:
        """The closing handshake; the connection is dropped if it takes over ``timeout``."""
        if self.proto.state is State.OPEN:
            self.proto.send_close(code)
            self._flush()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- inside ----------------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.CONT:
            if frame.fin and not self._fragments:
                self.on_text(frame.data)
            elif frame.fin:
                self._fragments.append(frame.data)
                data = b"".join(self._fragments)
                self._fragments.clear()
                self.on_text(data)
            else:
                self._fragments.append(frame.data)
        elif opcode is Opcode.PONG and frame.data == self._ping:
            self._ping = None

    def _handshake_done(self) -> None:
        if self.opened.done():
            return
        error = self.proto.handshake_exc
        if error is not None:
            self.opened.set_exception(error)
            return
        self.opened.set_result(None)
        if self._ping_interval:
            self._keepalive = self._loop.call_later(self._ping_interval, self._keep_alive)

    def _keep_alive(self) -> None:
        """Every ``ping_interval``: give up on a ping unanswered for ``ping_timeout``, or ping."""
        assert self._ping_interval is not None
        if self.proto.state is not State.OPEN:
            return
        now = self._loop.time()
        if self._ping is not None:
            if self._ping_timeout is not None and now - self._ping_sent >= self._ping_timeout:
                self.proto.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                self._flush()
                self.abort()
                return
        else:
            self._ping = os.urandom(4)
            self._ping_sent = now
            self.proto.send_ping(self._ping)
            self._flush()
        self._keepalive = self._loop.call_later(self._ping_interval, self._keep_alive)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in self.proto.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
        if self.proto.state is State.CLOSED:
            transport.close()

    def _wake_writers(self, error: Exception | None) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            if error is None:
                writable.set_result(None)
            else:
                writable.set_exception(error)
                writable.exception()  # retrieved: nobody may be draining
