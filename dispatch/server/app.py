"""The aiohttp application: one factory, everything started and stopped in cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import html
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import WSCloseCode, web
from prometheus_client.core import GaugeMetricFamily

from dispatch.clock import Clock, SystemClock
from dispatch.cluster.node import ClusterNode, instance_id
from dispatch.engine.engine import Engine
from dispatch.engine.model import Timing, Town
from dispatch.geo.index import CellIndex
from dispatch.log import open_log
from dispatch.log.base import EventLog
from dispatch.log.redis import RedisLog
from dispatch.server import rest
from dispatch.server.context import Context
from dispatch.server.field import field_ws
from dispatch.server.hub import Hub
from dispatch.server.keepalive import Keepalive
from dispatch.server.metrics import Metrics
from dispatch.server.screen import screen_ws
from dispatch.server.town import TownRunner
from dispatch.stats import compute_stats
from dispatch.stats.config import config_from_settings
from dispatch.stats.prometheus import metric_families, prometheus_samples

log = structlog.get_logger("dispatch.server")


def create_app(
    settings: Any, data: Any, *, event_log: EventLog | None = None, clock: Clock | None = None
) -> web.Application:
    """Build the app. Tests inject ``event_log`` (e.g. a MemoryLog) and ``clock``."""
    app = web.Application(
        middlewares=[rest.problem_middleware],
        client_max_size=max(settings.server.max_message_bytes, 1024),
    )
    runners: dict[str, Any] = {}
    clock = clock or SystemClock()
    stats_config = dataclasses.replace(
        config_from_settings(settings),
        category_names_zh={
            code: x.name_zh for code, x in data.category_extras.items() if x.name_zh
        },
    )

    def stats_families() -> list[Any]:
        now = clock.now()
        ready = GaugeMetricFamily(
            "dispatch_town_ready",
            "1 while the town's engine is loaded and its log accepts appends (0: the town "
            "answers unavailable; /readyz says why)",
            labels=["town"],
        )
        for town, r in sorted(runners.items()):
            ready.add_metric([town], 1.0 if r.healthy else 0.0)
        return [
            ready,
            *metric_families(
                [
                    s
                    for r in runners.values()
                    for s in prometheus_samples(r.engine, now, stats_config)
                ]
            ),
        ]

    metrics = Metrics(engines=lambda: [r.engine for r in runners.values()], extra=stats_families)
    hub = Hub(metrics, stats_config=stats_config)
    ctx = Context(
        settings=settings,
        data=data,
        log=event_log,  # type: ignore[arg-type]  # opened in _lifecycle when None
        clock=clock,
        metrics=metrics,
        hub=hub,
        runners=runners,
        town_of_responder={rid: data.town_of[r.home_grid] for rid, r in data.roster.items()},
        grids_json=json.dumps(data.gridset.feature_collection, ensure_ascii=False).encode(),
        keepalive=Keepalive(settings.server.heartbeat),
    )
    app[Context.KEY] = ctx
    app.add_routes(rest.routes())
    app.add_routes([web.get("/ws/field", field_ws), web.get("/ws/screen", screen_ws)])
    static_dir = settings.server.static_dir
    if static_dir is not None and Path(static_dir).is_dir():
        page = _index_page(
            Path(static_dir) / "index.html",
            settings.server.tiles,
            stats_config.timezone_offset_hours,
        )

        async def root(_request: web.Request) -> web.Response:
            return web.Response(
                body=page,
                content_type="text/html",
                charset="utf-8",
                headers={"Cache-Control": "no-cache"},
            )

        app.router.add_get("/", root)
        app.router.add_static("/static/", static_dir, show_index=False)
    app.on_startup.insert(0, _install_task_dump)
    app.cleanup_ctx.append(_lifecycle(event_log is None))
    app.on_shutdown.append(_close_connections)
    return app


GC_THRESHOLDS = (50_000, 20, 100)
GC_FREEZE_EVERY = 1.0
GC_FULL_EVERY = 600.0


def _tune_gc() -> None:
    """Keep the cycle collector off the hot path (see :func:`_gc_keeper`).

    Measured (docs/performance.md): with Python's default thresholds (700, 10, 10) the collector
    took about half of the server's CPU at a few thousand reports a second, rescanning the
    town's ever-growing state. Everything loaded at start-up is frozen out of collection, and
    young collections run every 50,000 allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _gc_keeper(every: float = GC_FREEZE_EVERY, full_every: float = GC_FULL_EVERY) -> None:
    """Freeze what survived the last second, so no collection has to rescan a town's state and
    ten thousand connections mid-burst (a 50-200 ms pause at 10,000 devices: the p99 of
    report→offer). Young garbage is still collected by the automatic young collections between
    freezes; cycles among objects frozen while alive (a closed connection, say) are reclaimed by
    a full collection every ``full_every`` seconds: one bounded pause every ten minutes instead
    of pauses at unpredictable times."""
    loop = asyncio.get_running_loop()
    next_full = loop.time() + full_every
    while True:
        await asyncio.sleep(every)
        if loop.time() >= next_full:
            next_full = loop.time() + full_every
            gc.unfreeze()
            gc.collect()
        gc.freeze()


async def _install_task_dump(_app: web.Application) -> None:
    """``kill -USR1 <pid>`` prints every asyncio task's stack: where a stuck server waits."""

    def dump() -> None:
        for task in asyncio.all_tasks():
            print(f"--- task {task.get_name()}", file=sys.stderr)
            task.print_stack(limit=12, file=sys.stderr)
        sys.stderr.flush()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


def _index_page(path: Path, tiles: str, utc_offset_hours: float) -> bytes:
    """The wall screen's page, with the configured tile source (``[server] tiles``) filled in
    and, for a tile server on another host of the local network, allowed by the page's CSP; and
    the statistics' UTC offset, so its clock shows the same day as its "today" figures whatever
    the time zone of the PC driving the wall."""
    text = path.read_text(encoding="utf-8")
    text = text.replace(
        '<meta name="dispatch-utc-offset" content="">',
        f'<meta name="dispatch-utc-offset" content="{utc_offset_hours:g}">',
    )
    if tiles:
        text = text.replace(
            '<meta name="dispatch-tiles" content="">',
            f'<meta name="dispatch-tiles" content="{html.escape(tiles)}">',
        )
        origin = urlsplit(tiles)
        if origin.scheme in ("http", "https") and origin.netloc:
            text = text.replace(
                "img-src 'self'", f"img-src 'self' {origin.scheme}://{origin.netloc}"
            )
    return text.encode()


def _engine_factory(town: Town, gridset: Any, timing: Timing) -> Callable[[], Engine]:
    def make() -> Engine:
        return Engine(town, CellIndex(), gridset, timing)

    return make


def _lifecycle(own_log: bool) -> Any:
    async def ctx_(app: web.Application) -> AsyncIterator[None]:
        ctx: Context = app[Context.KEY]
        settings = ctx.settings
        if own_log:
            ctx.log = open_log(settings.store.url, base_dir=settings.store.base_dir)
        timing = settings.timing
        if isinstance(ctx.log, RedisLog):
            ctx.node = ClusterNode(
                ctx,
                ctx.log,
                instance=instance_id(settings.cluster.instance_id),
                lease_ttl=settings.cluster.lease_ttl,
                renew=settings.cluster.renew,
            )
            await ctx.node.start()
        for town_id, town in ({} if ctx.node else ctx.data.towns).items():
            runner = TownRunner(
                town=town_id,
                make_engine=_engine_factory(town, ctx.data.gridset, timing),
                log=ctx.log,
                clock=ctx.clock,
                sink=ctx.hub,
                metrics=ctx.metrics,
            )
            n = await runner.load()
            ctx.runners[town_id] = runner
            runner.start()
            log.info(
                "town loaded",
                town=town_id,
                events=n,
                seq=runner.engine.state.seq,
                open=len(runner.engine.state.open_ids),
            )
        # Build the statistics index (and the day's sums of the town and of the gauges' grids)
        # before the first screen or scrape asks: that first build walks the day's cases.
        for runner in ctx.runners.values():
            now = ctx.clock.now()
            for scope in runner.engine.town.grids:
                if runner.engine.town.grids[scope].level == 1:
                    compute_stats(runner.engine, scope, now, ctx.hub.stats_config)
            prometheus_samples(runner.engine, now, ctx.hub.stats_config)
        _tune_gc()
        keeper = asyncio.create_task(_gc_keeper(), name="gc-keeper")
        periodic = asyncio.create_task(
            ctx.hub.run_periodic(
                settings.server.position_flush, settings.server.stats_interval, ctx.clock
            )
        )
        keepalive = asyncio.create_task(ctx.keepalive.run(), name="keepalive")
        stats = asyncio.create_task(ctx.hub.keep_stats_up(ctx.clock), name="stats-index")
        yield
        for task in (stats, keepalive, periodic, keeper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if ctx.node is not None:
            await ctx.node.stop()
        else:
            for runner in ctx.runners.values():
                await runner.stop()
        if own_log:
            await ctx.log.close()
        log.info("stopped; the log is flushed")

    return ctx_


async def _close_connections(app: web.Application) -> None:
    """Graceful shutdown: tell every client to go away (1001); they resume elsewhere or later."""
    ctx: Context = app[Context.KEY]
    ctx.stopping = True
    for outbox in ctx.hub.all_outboxes():
        await outbox.flush(0.5)
    await asyncio.gather(
        *(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
            for ws in list(ctx.connections)
        ),
        return_exceptions=True,
    )
