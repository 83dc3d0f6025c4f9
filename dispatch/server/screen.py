"""``GET /ws/screen``: a command-centre wall screen. PROTOCOL.md "Screen channel"."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from dispatch.engine import commands as c
from dispatch.engine.engine import Engine
from dispatch.errors import Rejected
from dispatch.server.auth import Principal, verify
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
from dispatch.server.hub import Screen
from dispatch.server.keepalive import answer_control
from dispatch.server.limits import TokenBucket
from dispatch.server.outbox import Outbox
from dispatch.server.town import TownRunner
from dispatch.wire import messages as m
from dispatch.wire.codec import decode_screen, dumps, error_message, iso, message_id

log = structlog.get_logger("dispatch.screen")

SCREEN_ROLES = frozenset({"operator", "monitor", "admin"})


def resolve_scope(ctx: Context, principal: Principal, wanted: str | None) -> str:
    """The screen's scope: the asked grid (level 1 or 2) inside the token's scope, else the
    token's scope; ``admin`` may watch any town or village. Raises ``Rejected('forbidden')``."""
    grids = ctx.data.gridset.grids
    scope = wanted or principal.scope
    if scope is None:
        if not principal.is_admin:
            raise Rejected("forbidden", "The token has no scope; ask for one with 'scope'.")
        scope = next(iter(ctx.runners))
    g = grids.get(scope)
    if g is None:
        raise Rejected("forbidden", f"There is no grid {scope!r}.")
    if g.level not in (1, 2):
        raise Rejected("forbidden", f"A screen's scope must be a town or village, not {scope!r}.")
    if not principal.is_admin:
        if principal.scope is None:
            raise Rejected("forbidden", "The token has no scope.")
        town = ctx.town_of_grid(scope)
        if town is None or not ctx.data.towns[town].in_subtree(scope, principal.scope):
            raise Rejected(
                "forbidden", f"Scope {scope} is outside the token's scope {principal.scope}."
            )
    return scope


async def screen_ws(request: web.Request) -> web.WebSocketResponse:
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
    hello = await receive_hello(ctx, ws, decode_screen)
    if hello is None:
        return
    try:
        principal = verify(ctx.settings.auth.secret, hello.token)
    except Rejected as rej:
        await ws.close(code=CLOSE_UNAUTHORIZED, message=rej.message.encode()[:120])
        return
    if principal.role not in SCREEN_ROLES:
        await ws.close(
            code=CLOSE_FORBIDDEN,
            message=b"the screen channel needs an operator, monitor or admin token",
        )
        return
    try:
        scope = resolve_scope(ctx, principal, hello.scope)
    except Rejected as rej:
        await ws.close(code=CLOSE_FORBIDDEN, message=rej.message.encode()[:120])
        return
    town = ctx.town_of_grid(scope)
    assert town is not None
    runner = ctx.runners[town]
    outbox = Outbox(ws, ctx.settings.server.queue_limit, on_evict=ctx.metrics.evictions.inc)
    screen = Screen(outbox, town, scope, principal)
    ctx.metrics.connections.labels("screen").inc()
    expiry = close_when_expired(ctx, ws, principal.exp)
    try:
        try:
            mode = await runner.query(
                lambda engine: ctx.hub.attach_screen(engine, screen, hello.since, ctx.clock.now())
            )
        except Rejected as rej:
            await ws.send_frame(error_message(rej.code, rej.message), WSMsgType.TEXT)
            await ws.close(code=1011, message=b"town unavailable; retry")
            return
        log.info("screen connected", user=principal.sub, scope=scope, mode=mode, since=hello.since)
        await _loop(ctx, ws, outbox, runner, principal)
    finally:
        expiry.cancel()
        ctx.hub.detach_screen(screen)
        ctx.metrics.connections.labels("screen").dec()
        await outbox.aclose()
        log.info("screen disconnected", user=principal.sub, code=ws.close_code)


async def _loop(
    ctx: Context,
    ws: web.WebSocketResponse,
    outbox: Outbox,
    runner: TownRunner,
    principal: Principal,
) -> None:
    s = ctx.settings.server
    bucket = TokenBucket(s.rate, s.burst, s.flood_close_after, ctx.clock.now())
    received = ctx.metrics.messages.labels("screen")
    pending: set[asyncio.Task[None]] = set()  # commands in flight on this connection
    seen = ctx.keepalive.seen
    monotonic = time.monotonic
    async for msg in ws:
        seen[ws] = monotonic()
        if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
            if await answer_control(ws, msg):
                continue
            break
        received.inc()
        now = ctx.clock.now()
        if not bucket.take(now):
            if await refuse_over_limit(ctx, ws, outbox, bucket, msg.data, now):
                break
            continue
        try:
            message = decode_screen(msg.data)
        except Rejected as rej:
            ctx.metrics.errors.labels(rej.code).inc()
            outbox.send(error_message(rej.code, rej.message, rej.message_id))
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
        task = asyncio.create_task(_command(ctx, outbox, runner, principal, message))
        pending.add(task)
        task.add_done_callback(pending.discard)


def operator_command(principal: Principal, msg: Any) -> c.Command:
    """Map a screen message to an engine command; monitors may look but not act."""
    if principal.role not in ("operator", "admin"):
        raise Rejected(
            "forbidden", f"A {principal.role} token may not {msg.__struct_config__.tag}."
        )
    scope = None if principal.is_admin else principal.scope
    actor = principal.sub
    match msg:
        case m.Assign():
            return c.Assign(msg.incident, msg.responder, actor, scope)
        case m.Transfer():
            return c.Transfer(msg.incident, msg.department, actor, scope)
        case m.Escalate():
            return c.Escalate(msg.incident, actor, scope, msg.note or msg.reason)
        case m.Close():
            return c.Close(msg.incident, actor, scope, msg.note)
        case m.Reopen():
            return c.Reopen(msg.incident, actor, scope, msg.note)
        case _:
            pass
    raise Rejected("unknown_type", f"{type(msg).__name__} is not an operator command.")


def runner_of_incident(ctx: Context, incident_id: str, default: Any) -> Any:
    """The writer (or slot) of the town an incident id belongs to (ids are ``<town>-<seq>``)."""
    town = incident_id.rsplit("-", 1)[0]
    return ctx.runners.get(town, default)


async def _command(
    ctx: Context, outbox: Outbox, runner: TownRunner, principal: Principal, msg: Any
) -> None:
    try:
        command = operator_command(principal, msg)
        target = runner_of_incident(ctx, msg.incident, runner)
        await target.submit(command)
    except Rejected as rej:
        ctx.metrics.errors.labels(rej.code).inc()
        outbox.send(error_message(rej.code, rej.message, msg.id))
        return
    except Exception:
        log.exception("operator command failed", user=principal.sub)
        outbox.send(error_message("internal", "Internal error; retry.", msg.id))
        return
    outbox.send(dumps({"type": "ack", "id": msg.id, "incident": msg.incident}))


__all__ = ["Engine", "operator_command", "resolve_scope", "screen_ws"]
