"""``GET /ws/field``: a responder's device. PROTOCOL.md "Field channel"."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from dispatch.engine import commands as c
from dispatch.engine.engine import Engine, Outcome
from dispatch.errors import Rejected
from dispatch.server.auth import verify
from dispatch.server.context import (
    CLOSE_FORBIDDEN,
    CLOSE_UNAUTHORIZED,
    Context,
    check_origin,
    close_when_expired,
    receive_hello,
    refuse_over_limit,
    ws_response,
)
from dispatch.server.hub import notice_frame
from dispatch.server.keepalive import answer_control
from dispatch.server.limits import TokenBucket
from dispatch.server.outbox import Outbox
from dispatch.wire import messages as m
from dispatch.wire.codec import decode_field, dumps, error_message, iso, message_id, parse_time
from dispatch.wire.objects import incident_obj, responder_obj

log = structlog.get_logger("dispatch.field")

async def field_ws(request: web.Request) -> web.WebSocketResponse:
    ctx: Context = request.app[Context.KEY]
    check_origin(request, ctx)
    ws = ws_response(ctx)
    await ws.prepare(request)
    ctx.connections.add(ws)
    ctx.keepalive.watch(ws)
    try:
        await _session(ctx, ws)
    finally:
        ctx.connections.discard(ws)
        ctx.keepalive.forget(ws)
    return ws


async def _session(ctx: Context, ws: web.WebSocketResponse) -> None:
    hello = await receive_hello(ctx, ws, decode_field)
    if hello is None:
        return
    try:
        principal = verify(ctx.settings.auth.secret, hello.token)
    except Rejected as rej:
        await ws.close(code=CLOSE_UNAUTHORIZED, message=rej.message.encode()[:120])
        return
    if principal.role != "field":
        await ws.close(code=CLOSE_FORBIDDEN, message=b"the field channel needs a field token")
        return
    rid = principal.sub
    town = ctx.town_of_responder.get(rid)
    if town is None:
        await ws.close(code=CLOSE_FORBIDDEN, message=b"this responder is not in the roster")
        return
    runner = ctx.runners[town]
    outbox = Outbox(ws, ctx.settings.server.queue_limit, on_evict=ctx.metrics.evictions.inc)
    ctx.metrics.connections.labels("field").inc()
    welcome_sent = False

    def welcome(engine: Engine, _out: Outcome) -> None:
        nonlocal welcome_sent
        ctx.hub.add_device(rid, outbox)
        r = engine.state.responders[rid]
        held = engine.held_by(rid)
        offers: list[dict[str, Any]] = []
        assignments: list[dict[str, Any]] = []
        if held is not None:
            verify_ = engine.town.categories[held.category].verify
            obj = incident_obj(held, verify=verify_)
            if held.status == "offered":
                # An offer reads both as the incident itself and as an `offer` message.
                expires = iso(held.offer_expires_at)
                offers.append({**obj, "expires_at": expires, "incident": obj})
            else:
                assignments.append(obj)
        outbox.send(
            dumps(
                {
                    "type": "welcome",
                    "responder": responder_obj(r, engine.state.index.position(rid)),
                    "server_time": iso(ctx.clock.now()),
                    "offers": offers,
                    "assignments": assignments,
                }
            )
        )
        welcome_sent = True

    expiry = close_when_expired(ctx, ws, principal.exp)
    try:
        try:
            await runner.submit(c.Connect(rid), after=welcome)
        except Rejected as rej:
            message = rej.message
            if rej.code == "unavailable":
                message = (
                    "This device cannot be signed in right now: the server cannot record it "
                    "(event log unavailable). Reconnect in a few seconds."
                )
            await ws.send_frame(error_message(rej.code, message), WSMsgType.TEXT)
            await ws.close(code=1011, message=b"could not register the device; retry")
            return
        log.info("field connected", responder=rid, town=town)
        await _loop(ctx, ws, outbox, runner, rid, town)
    finally:
        expiry.cancel()
        ctx.metrics.connections.labels("field").dec()
        left = ctx.hub.remove_device(rid, outbox) if welcome_sent else 0
        await outbox.aclose()
        if left == 0 and not ctx.stopping:
            with contextlib.suppress(Exception):
                await runner.submit(c.Disconnect(rid))
        log.info("field disconnected", responder=rid, code=ws.close_code)


async def _loop(
    ctx: Context, ws: web.WebSocketResponse, outbox: Outbox, runner: Any, rid: str, town: str
) -> None:
    s = ctx.settings.server
    clock = ctx.clock
    bucket = TokenBucket(s.rate, s.burst, s.flood_close_after, clock.now())
    received = ctx.metrics.messages.labels("field")
    dirty = ctx.hub.moved_set(town)
    seen = ctx.keepalive.seen
    monotonic = time.monotonic
    async for msg in ws:
        seen[ws] = monotonic()
        if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
            if await answer_control(ws, msg):
                continue
            break
        received.inc()
        now = clock.now()
        if not bucket.take(now):
            if await refuse_over_limit(ctx, ws, outbox, bucket, msg.data, now):
                break
            continue
        try:
            message = decode_field(msg.data)
        except Rejected as rej:
            ctx.metrics.errors.labels(rej.code).inc()
            outbox.send(error_message(rej.code, rej.message, rej.message_id))
            continue
        # The hot path (every device, every few seconds): no call that can be saved.
        if type(message) is m.Position:
            try:
                ts = now if message.ts is None else min(parse_time(message.ts) or now, now)
            except Rejected as rej:
                outbox.send(error_message(rej.code, rej.message))
                continue
            runner.engine.position(rid, message.lon, message.lat, ts)  # a rebuild replaces it
            dirty.add(rid)
            if ctx.node is not None:
                ctx.position_out(town, rid, message.lon, message.lat, ts)
            continue
        if isinstance(message, m.Positions):
            try:
                stamps = [
                    now if item_ts is None else min(parse_time(item_ts) or now, now)
                    for _lon, _lat, item_ts in message.items
                ]
            except Rejected as rej:
                outbox.send(error_message(rej.code, rej.message))
                continue
            if message.items:
                engine = runner.engine
                for (lon, lat, _ts), t in zip(message.items, stamps, strict=True):
                    engine.position(rid, lon, lat, t)
                dirty.add(rid)
                ctx.position_out(town, rid, lon, lat, t)
            continue
        if isinstance(message, m.Ping):
            outbox.send(dumps({"type": "pong", "id": message.id, "server_time": iso(now)}))
            continue
        if isinstance(message, m.Hello):
            outbox.send(
                error_message(
                    "bad_message", "Already said hello on this connection.", message_id(msg.data)
                )
            )
            continue
        _command(ctx, outbox, runner, rid, message)


def _field_command(rid: str, msg: Any) -> c.Command:
    match msg:
        case m.Report():
            return c.Report(
                ref=msg.id,
                category=msg.category,
                lon=msg.lon,
                lat=msg.lat,
                source="field",
                actor=rid,
                description=msg.description,
                priority=msg.priority,
                handled=msg.handled,
                photos=tuple(msg.photos),
            )
        case m.Status():
            return c.SetDuty(rid, msg.status)
        case m.Accept():
            return c.Accept(rid, msg.incident)
        case m.Decline():
            return c.Decline(rid, msg.incident, msg.reason)
        case m.Arrive():
            return c.Arrive(rid, msg.incident)
        case m.Resolve():
            return c.Resolve(rid, msg.incident, msg.note)
        case m.Escalate():
            return c.RequestEscalation(rid, msg.incident, msg.reason or msg.note)
        case m.Close():
            return c.Verify(rid, msg.incident, msg.note)
        case _:
            pass
    raise Rejected("unknown_type", f"{type(msg).__name__} is not a field command.")


def _command(ctx: Context, outbox: Outbox, runner: Any, rid: str, msg: Any) -> None:
    """Queue one command to the town's writer; its ack or error is sent when it is durable.

    No task and no future per message (the hot path, one per client message): the writer calls
    ``answer`` as part of the commit (:meth:`~dispatch.server.town.TownRunner.send`)."""
    mid = msg.id
    try:
        command = _field_command(rid, msg)
        if isinstance(command, c.Report) and len(ctx.runners) > 1:
            runner = ctx.runner_for_point(command.lon, command.lat) or runner
    except Rejected as rej:
        ctx.metrics.errors.labels(rej.code).inc()
        outbox.send(error_message(rej.code, rej.message, mid))
        return

    def answer(outcome: Outcome | None, err: BaseException | None) -> None:
        if isinstance(err, asyncio.CancelledError):
            outbox.send(error_message("unavailable", "The server is stopping; retry.", mid))
        elif isinstance(err, Rejected):
            ctx.metrics.errors.labels(err.code).inc()
            outbox.send(error_message(err.code, err.message, mid))
        elif err is not None or outcome is None:
            log.error(
                "field command failed", responder=rid, type=type(msg).__name__, error=repr(err)
            )
            outbox.send(error_message("internal", "Internal error; retry.", mid))
        else:
            incident = outcome.incident
            ack = (
                {"type": "ack", "id": mid, "incident": incident}
                if incident is not None
                else {"type": "ack", "id": mid}
            )
            outbox.send(dumps(ack))

    runner.send(command, answer)


__all__ = ["field_ws", "notice_frame"]
