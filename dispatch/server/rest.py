"""REST under ``/api``, health, readiness and metrics. Errors are ``application/problem+json``
(RFC 9457) carrying the wire error ``code``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dispatch.engine import commands as c
from dispatch.engine.engine import Engine
from dispatch.engine.state import INCIDENT_STATUSES
from dispatch.errors import HTTP_STATUS, LogError, Rejected
from dispatch.server.auth import Principal, verify
from dispatch.server.context import Context
from dispatch.server.limits import TokenBucket
from dispatch.server.screen import resolve_scope, runner_of_incident
from dispatch.stats import compute_stats
from dispatch.stats.safety import safety_history
from dispatch.wire.codec import decode_intake, dumps, event_wire, parse_time
from dispatch.wire.objects import incident_obj, responder_obj

TITLES = {
    "bad_json": "Malformed JSON",
    "bad_message": "Invalid request",
    "unknown_type": "Unknown type",
    "unauthorized": "Unauthorized",
    "forbidden": "Forbidden",
    "not_found": "Not found",
    "conflict": "Conflict",
    "outside_area": "Outside the area",
    "unknown_category": "Unknown category",
    "rate_limited": "Too many requests",
    "too_large": "Too large",
    "unavailable": "Unavailable",
    "internal": "Internal error",
}


def problem(code: str, detail: str, status: int | None = None) -> web.Response:
    status = status or HTTP_STATUS.get(code, 400)
    body = {
        "type": f"/errors/{code}",
        "title": TITLES.get(code, code),
        "status": status,
        "detail": detail,
        "code": code,
    }
    headers = (
        {"WWW-Authenticate": 'Bearer realm="dispatch"'}
        if status == 401
        else {"Retry-After": "1"}
        if code == "rate_limited"
        else None
    )
    return web.Response(
        body=dumps(body), status=status, content_type="application/problem+json", headers=headers
    )


@web.middleware
async def problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except Rejected as rej:
        return problem(rej.code, rej.message)
    except web.HTTPException as exc:
        if exc.content_type == "application/problem+json" or exc.status < 400:
            raise
        code = {
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "bad_message",
            413: "too_large",
        }.get(exc.status, "bad_message")
        detail = exc.reason or exc.text or code
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            detail = f"{request.method} is not allowed on {request.path}; use {allowed}."
        elif exc.status == 413:
            limit = request.app[Context.KEY].settings.server.max_message_bytes
            detail = f"The request body is larger than the limit of {limit:,} bytes."
        return problem(code, detail, exc.status)


def principal_of(request: web.Request, roles: frozenset[str] | None = None) -> Principal:
    ctx: Context = request.app[Context.KEY]
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise Rejected("unauthorized", "Send 'Authorization: Bearer <token>'.")
    principal = verify(ctx.settings.auth.secret, header[7:].strip())
    if roles is not None and principal.role not in roles:
        article = "An" if principal.role[:1] in "aeiou" else "A"
        raise Rejected("forbidden", f"{article} {principal.role} token may not use this endpoint.")
    return principal


def _rate_limit(ctx: Context, principal: Principal) -> None:
    """Writes over REST share the websocket limits, per user."""
    s = ctx.settings.server
    now = ctx.clock.now()
    bucket = ctx.rest_buckets.get(principal.sub)
    if bucket is None:
        if len(ctx.rest_buckets) > 10_000:
            ctx.rest_buckets.clear()
        bucket = ctx.rest_buckets[principal.sub] = TokenBucket(
            s.rate, s.burst, s.flood_close_after, now
        )
    if not bucket.take(now):
        raise Rejected(
            "rate_limited",
            f"Slow down: at most {s.rate:g} requests a second (bursts of {s.burst}).",
        )


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(doc), status=status, content_type="application/json")


VIEWERS = frozenset({"operator", "monitor", "admin"})


def _in_scope(principal: Principal, grids: dict[str, str]) -> bool:
    return principal.is_admin or (principal.scope is not None and principal.scope in grids.values())


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctx: Context = request.app[Context.KEY]
    problems: list[str] = []
    try:
        await ctx.log.ping()
    except Exception as err:
        problems.append(f"event log unreachable: {err}")
    if not ctx.ready:
        problems.append("a town is not loaded")
    node = ctx.node
    if node is not None and not problems:  # distributed: a town nobody owns answers nothing
        for town in sorted(ctx.runners):
            try:
                if await node.lease.owner(town) is None:
                    problems.append(f"town {town}: no instance holds its lease yet")
            except LogError as err:
                problems.append(f"event log unreachable: {err}")
                break
    if problems:
        return json_response({"status": "not ready", "problems": problems}, status=503)
    return json_response({"status": "ready", "towns": sorted(ctx.runners)})


async def metrics(request: web.Request) -> web.Response:
    ctx: Context = request.app[Context.KEY]
    if not ctx.settings.auth.metrics_open:
        principal_of(request, frozenset({"monitor", "admin"}))
    return web.Response(
        body=ctx.metrics.exposition(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def grids(request: web.Request) -> web.Response:
    principal_of(request)
    ctx: Context = request.app[Context.KEY]
    return web.Response(body=ctx.grids_json, content_type="application/geo+json")


def _engines(ctx: Context) -> list[Engine]:
    return [r.engine for r in ctx.runners.values()]


async def list_incidents(request: web.Request) -> web.Response:
    principal = principal_of(request, VIEWERS)
    ctx: Context = request.app[Context.KEY]
    q = request.query
    statuses = set(q["status"].split(",")) if q.get("status") else None
    if statuses is not None and not statuses <= INCIDENT_STATUSES:
        raise Rejected(
            "bad_message",
            f"status {', '.join(sorted(statuses - INCIDENT_STATUSES))!r} is not an incident "
            f"status; use {', '.join(sorted(INCIDENT_STATUSES))} (comma-separated).",
        )
    try:
        level = int(q["level"]) if q.get("level") else None
        limit = min(int(q.get("limit", "100")), 1000)
        since = parse_time(q["since"]) if q.get("since") else None
    except ValueError:
        raise Rejected(
            "bad_message", "level and limit must be integers, since an RFC 3339 time."
        ) from None
    if level is not None and level not in (1, 2, 3):
        raise Rejected("bad_message", f"level must be 1, 2 or 3, not {level}.")
    if limit < 0:
        raise Rejected("bad_message", f"limit must not be negative, not {limit}.")
    grid = q.get("grid")
    if grid is not None:
        _town_of_visible_grid(ctx, principal, grid)
    found = []
    for engine in _engines(ctx):
        cats = engine.town.categories
        for inc in engine.state.incidents.values():
            if statuses is not None and inc.status not in statuses:
                continue
            if level is not None and inc.level != level:
                continue
            if grid is not None and grid not in inc.grids.values():
                continue
            if since is not None and inc.reported_at < since:
                continue
            if not _in_scope(principal, inc.grids):
                continue
            found.append((inc.reported_at, inc.id, inc, cats[inc.category].verify))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    items = [incident_obj(inc, verify=v) for _, _, inc, v in found[:limit]]
    response = json_response(items)
    response.headers["X-Total-Count"] = str(len(found))
    return response


async def get_incident(request: web.Request) -> web.Response:
    principal = principal_of(request, VIEWERS)
    ctx: Context = request.app[Context.KEY]
    iid = request.match_info["id"]
    runner = runner_of_incident(ctx, iid, next(iter(ctx.runners.values())))
    inc = runner.engine.state.incidents.get(iid)
    if inc is None:
        raise Rejected("not_found", f"There is no incident {iid!r}.")
    if not _in_scope(principal, inc.grids):
        raise Rejected("forbidden", f"Incident {iid} is outside your scope.")
    timeline = [event_wire(ev) for ev in runner.timelines.get(iid, [])]
    verify_ = runner.engine.town.categories[inc.category].verify
    return json_response(incident_obj(inc, verify=verify_, timeline=timeline))


async def candidates(request: web.Request) -> web.Response:
    principal = principal_of(request, VIEWERS)
    ctx: Context = request.app[Context.KEY]
    iid = request.match_info["id"]
    runner = runner_of_incident(ctx, iid, next(iter(ctx.runners.values())))
    engine = runner.engine
    inc = engine.incident(iid)
    if not _in_scope(principal, inc.grids):
        raise Rejected("forbidden", f"Incident {iid} is outside your scope.")
    out = []
    for rid, metres in engine.candidates(iid, ctx.clock.now(), k=10):
        r = engine.state.responders[rid]
        out.append(
            {
                "responder": responder_obj(r, engine.state.index.position(rid)),
                "distance_m": round(metres, 1),
            }
        )
    return json_response(out)


async def post_incident(request: web.Request) -> web.Response:
    principal = principal_of(request, frozenset({"operator", "admin"}))
    ctx: Context = request.app[Context.KEY]
    _rate_limit(ctx, principal)
    body = await request.read()
    if len(body) > ctx.settings.server.max_message_bytes:
        raise Rejected("too_large", "The request body is over the message size limit.")
    intake = decode_intake(body)
    if intake.source not in ("field", "hotline", "citizen", "operator"):
        raise Rejected("bad_message", "source must be one of field, hotline, citizen, operator.")
    runner = ctx.runner_for_point(intake.lon, intake.lat)
    if runner is None:
        raise Rejected(
            "outside_area", f"The point lon={intake.lon}, lat={intake.lat} is in no grid."
        )
    located = ctx.data.gridset.locate(intake.lon, intake.lat)
    if not principal.is_admin and (
        located is None or principal.scope not in located.as_dict().values()
    ):
        raise Rejected("forbidden", "The point is outside your scope.")
    command = c.Report(
        ref=intake.id,
        category=intake.category,
        lon=intake.lon,
        lat=intake.lat,
        source=intake.source,
        actor=principal.sub,
        description=intake.description,
        priority=intake.priority,
        handled=intake.handled,
        photos=tuple(intake.photos),
    )

    def view(engine: Engine, outcome: Any) -> dict[str, Any]:
        inc = engine.state.incidents[outcome.incident]
        doc = incident_obj(inc, verify=engine.town.categories[inc.category].verify)
        doc["incident"] = inc.id
        return doc

    doc = await runner.submit(command, after=view)
    return json_response(doc, status=201)


async def list_responders(request: web.Request) -> web.Response:
    principal = principal_of(request, VIEWERS)
    ctx: Context = request.app[Context.KEY]
    out = []
    for engine in _engines(ctx):
        for rid, r in engine.state.responders.items():
            if principal.is_admin or (
                principal.scope is not None
                and engine.town.in_subtree(r.info.home_grid, principal.scope)
            ):
                out.append(responder_obj(r, engine.state.index.position(rid)))
    return json_response(out)


async def stats(request: web.Request) -> web.Response:
    principal = principal_of(request, VIEWERS)
    ctx: Context = request.app[Context.KEY]
    scope = request.query.get("scope") or principal.scope
    if scope is None:  # an admin without a scope: the first town, as on a screen
        scope = resolve_scope(ctx, principal, None)
    town = _town_of_visible_grid(ctx, principal, scope)
    engine = ctx.runners[town].engine
    return json_response(compute_stats(engine, scope, ctx.clock.now(), ctx.hub.stats_config))


def _town_of_visible_grid(ctx: Context, principal: Principal, grid: str) -> str:
    """The town of ``grid``, which the caller names in a path or filter: 404 if there is no
    such grid, 403 if it is outside the token's scope."""
    town = ctx.town_of_grid(grid)
    if town is None:
        raise Rejected("not_found", f"There is no grid {grid!r}.")
    if not principal.is_admin and (
        principal.scope is None or not ctx.data.towns[town].in_subtree(grid, principal.scope)
    ):
        raise Rejected("forbidden", f"Grid {grid} is outside your scope.")
    return town


async def safety(request: web.Request) -> web.Response:
    """The safety index of one grid for the last ``days`` local days (today last)."""
    principal = principal_of(request, VIEWERS)
    ctx: Context = request.app[Context.KEY]
    grid = request.match_info["grid"]
    town = _town_of_visible_grid(ctx, principal, grid)
    try:
        days = max(1, min(int(request.query.get("days", "30")), 366))
    except ValueError:
        raise Rejected("bad_message", "days must be an integer.") from None
    engine = ctx.runners[town].engine
    history = safety_history(engine, grid, days, now=ctx.clock.now(), config=ctx.hub.stats_config)
    return json_response({"grid": grid, "days": history})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.get("/api/grids", grids),
        web.get("/api/incidents", list_incidents),
        web.post("/api/incidents", post_incident),
        web.get("/api/incidents/{id}", get_incident),
        web.get("/api/incidents/{id}/candidates", candidates),
        web.get("/api/responders", list_responders),
        web.get("/api/stats", stats),
        web.get("/api/safety/{grid}", safety),
    ]


__all__ = ["problem", "problem_middleware", "routes"]
