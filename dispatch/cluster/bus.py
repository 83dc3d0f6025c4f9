"""What instances say to each other through Redis, besides the event log.

* **Inbox** — ``dispatch:{<town>}:inbox``, a stream: a non-owner XADDs a command (with its
  instance id and a request id); the owner reads it, runs it, and publishes the answer on the
  requester's reply channel ``dispatch:reply:<instance>``. The answer carries the seq at which the
  command's events were durable, so the requester waits until its own replica has applied that
  seq before it acknowledges (read-your-writes for the client). The inbox is a transient queue:
  it is capped (``MAXLEN ~``); the event streams are never trimmed.
* **Positions** — ``dispatch:{<town>}:positions``, pub/sub: every instance publishes the
  positions of its own devices, coalesced, a few times a second; every instance applies the
  others'. Positions are ephemeral (ARCHITECTURE §2): losing a batch only delays a dot.
* **Heartbeats** — ``dispatch:instance:<id>`` with a TTL: the owner of a town drops the devices
  of an instance whose heartbeat lapsed (it died with devices connected).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from dispatch.engine import commands as c
from dispatch.errors import LogUnavailable, Rejected
from dispatch.log.redis import REDIS_ERRORS, RedisClient, town_key

log = structlog.get_logger("dispatch.cluster")

COMMANDS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        c.Report,
        c.Connect,
        c.Disconnect,
        c.SetDuty,
        c.Accept,
        c.Decline,
        c.Arrive,
        c.Resolve,
        c.RequestEscalation,
        c.Verify,
        c.Assign,
        c.Transfer,
        c.Escalate,
        c.Close,
        c.Reopen,
    )
}
INBOX_MAXLEN = 100_000

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def encode_command(command: c.Command) -> bytes:
    return _enc.encode({"kind": type(command).__name__, "args": command})


def decode_command(data: bytes) -> c.Command:
    doc = _dec.decode(data)
    cls = COMMANDS[doc["kind"]]
    args = doc["args"]
    if "photos" in args:
        args["photos"] = tuple(args["photos"])
    command: c.Command = cls(**args)
    return command


def reply_channel(instance: str) -> str:
    return f"dispatch:reply:{instance}"


def heartbeat_key(instance: str) -> str:
    return f"dispatch:instance:{instance}"


class Bus:
    """One instance's side of the inbox replies and the positions channels."""

    def __init__(
        self,
        client: RedisClient,
        instance: str,
        towns: list[str],
        on_positions: Callable[[str, list[list[Any]]], None],
        request_timeout: float = 5.0,
    ) -> None:
        self.client = client
        self.instance = instance
        self.towns = towns
        self.on_positions = on_positions
        self.request_timeout = request_timeout
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._outgoing: dict[str, dict[str, list[Any]]] = {t: {} for t in towns}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="bus-listen")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(_unavailable())

    # ------------------------------------------------------------------ requests

    async def request(self, town: str, command: c.Command) -> dict[str, Any]:
        """Forward a command to the town's owner; the owner's answer (``ok``, ``seq``,
        ``incident``) or :class:`Rejected` with the owner's code, or ``unavailable``."""
        req = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        try:
            await self.client.xadd(
                town_key(town, "inbox"),
                {"from": self.instance, "req": req, "cmd": encode_command(command)},
                maxlen=INBOX_MAXLEN,
                approximate=True,
            )
            async with asyncio.timeout(self.request_timeout):
                answer = await fut
        except REDIS_ERRORS:
            raise _unavailable() from None
        except TimeoutError:
            raise Rejected(
                "unavailable",
                "The town's owner did not answer in time (it may be failing over); retry shortly.",
            ) from None
        finally:
            self._pending.pop(req, None)
        if not answer.get("ok"):
            raise Rejected(answer.get("code", "internal"), answer.get("message", "error"))
        return answer

    async def reply(self, instance: str, req: str, answer: dict[str, Any]) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.client.publish(reply_channel(instance), _enc.encode({"req": req, **answer}))

    # ------------------------------------------------------------------ positions

    def position(self, town: str, rid: str, lon: float, lat: float, ts: float) -> None:
        out = self._outgoing.get(town)
        if out is not None:
            out[rid] = [rid, lon, lat, ts]

    async def flush_positions(self) -> None:
        for town, out in self._outgoing.items():
            if not out:
                continue
            items = list(out.values())
            out.clear()
            with contextlib.suppress(*REDIS_ERRORS):
                await self.client.publish(
                    town_key(town, "positions"),
                    _enc.encode({"from": self.instance, "items": items}),
                )

    # ------------------------------------------------------------------ listening

    async def _listen(self) -> None:
        channels = [reply_channel(self.instance)] + [town_key(t, "positions") for t in self.towns]
        delay = 0.1
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(*channels)
                delay = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    self._dispatch(msg["channel"].decode(), msg["data"])
            except Exception as err:
                log.warning("bus connection lost; reconnecting", error=str(err))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                closer: Any = pubsub.aclose  # typed on Redis, untyped on RedisCluster
                with contextlib.suppress(Exception):
                    await closer()

    def _dispatch(self, channel: str, data: bytes) -> None:
        doc = _dec.decode(data)
        if channel.startswith("dispatch:reply:"):
            fut = self._pending.get(doc.get("req", ""))
            if fut is not None and not fut.done():
                fut.set_result(doc)
            return
        if doc.get("from") == self.instance:
            return
        town = channel.split("{", 1)[1].split("}", 1)[0]
        self.on_positions(town, doc.get("items", []))

    # ------------------------------------------------------------------ heartbeats

    async def heartbeat(self, ttl_ms: int) -> None:
        await self.client.set(heartbeat_key(self.instance), b"1", px=ttl_ms)

    async def alive(self, instance: str) -> bool:
        return bool(await self.client.exists(heartbeat_key(instance)))


def _unavailable() -> Rejected:
    return Rejected("unavailable", "The shared store is unreachable; retry shortly.")


__all__ = ["Bus", "LogUnavailable", "decode_command", "encode_command"]
