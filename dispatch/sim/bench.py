"""``dispatch bench``: a multi-process load generator for a running server.

    dispatch bench --config bench/dispatch.toml --url ws://127.0.0.1:8080 \\
        --devices 1000 --position-every 5 --rate 200 --screens 1 --duration 20 \\
        --processes 2 --out run.json

It drives the server through the very client code of the demo's simulated devices
(:class:`dispatch.sim.devices.FieldClient`, on websockets' client protocol), so the server is always
exercised by a client it did not write. Each worker process runs one event loop (uvloop if
installed) with its share of the devices and screens:

* **devices** — one :class:`FieldClient` each, for the first ``--devices`` rows of the roster
  (grid workers first). Each sits at a random point of its home grid and sends a ``position``
  every ``--position-every`` seconds (the fleet's positions are spread evenly over the period).
  A device that gets an ``offer`` accepts it at once and, when the accept is acked, resolves it
  (after ``--hold`` seconds), so responders free up again and the pool never runs dry.
* **reporters** — reports at a steady ``--rate`` per second town-wide (or ``--burst N`` every
  ``--burst-every`` seconds; or, with ``--rate 0``, a closed loop of ``--inflight`` reports
  outstanding at once: saturation), sent by the devices in turn, at random points of random
  basic grids, with categories drawn from the server's category table (those that need no
  verification unless ``--all-categories``). ``--handled-share`` of them are sent with
  ``handled: true`` (recorded and closed on the spot, nothing dispatched).
* **screens** — ``--screens`` websocket clients on ``/ws/screen`` with an admin token, watching
  ``--screen-scope`` (default: the town; ``villages`` spreads them over the town and its
  villages). Every ``event`` frame is counted and its ``seq`` checked (a town screen must see
  every seq; a village screen a subset, in increasing order). Screens and devices run on
  :class:`~dispatch.sim.link.Link` (websockets' sans-I/O client straight on the transport): a
  thousand screens take more frames than one core of websockets' asyncio client can read.
* **a probe** — one more connection in its own process that sends ``ping`` every 100 ms: the
  ``pong`` is answered in the server's reader, without the town writer or the log, so its round
  trip shows the server's event-loop stalls (``--no-probe`` leaves it out).
* ``--mode ingest`` instead floods: every device sends positions as fast as the connection takes
  them for ``--duration`` seconds, then a ``ping`` whose ``pong`` proves everything before it was
  read; the rate is what the server took. This is the mode that also drives the bare transport
  floor (``tests/bench/floor_server.py``).

Measured at the client, only for what was sent inside the window (``--warmup`` seconds after the
start, ``--duration`` long): report→``ack``; report→``offer`` at the chosen device (each report
carries its send time in its ``description``, so whichever process holds the device that gets
the offer computes the latency itself; the incident id de-duplicates re-offers); the same split
at the server's own timestamps (``reported_at`` and ``offered_at`` of the offered incident, RFC
3339 milliseconds: client→engine and engine→client); report→screen for every
``incident.reported`` delivery; p50/p90/p99/max of each; sustained throughput; errors by code;
each worker's event-loop lag (how late a 5 ms timer fires: the load generator's own tail).
Measured at the server: CPU time (user+system, all threads) over the window and peak RSS
(``VmHWM``) from ``/proc/<pid>`` of ``--server-pid`` (or the process listening on the URL's port),
the time its threads were runnable but waiting for a CPU (``schedstat``), and, with a config whose
secret can mint an admin token, the ``/metrics`` counters over the window (messages received,
events, log append latency and batch size). Measured on the machine: how busy each CPU was and
how much of it was neither the server nor the generator (other processes: the noise).

The generator freezes its own heap after connecting and raises its GC thresholds
(``--no-gc-freeze`` leaves them alone), so its collections do not pose as server latency.

A progress line is printed every second; a plain-text table at the end; ``--out`` gets the
whole result as JSON. ``write_bench_town`` makes a town with any number of grid workers for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import json
import math
import multiprocessing as mp
import os
import random
import secrets
import shutil
import sys
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from dispatch.sim.link import Link

Json = dict[str, Any]

# --------------------------------------------------------------------------------------------
# the plan: what every worker needs, picklable


@dataclass(slots=True)
class Plan:
    url: str  # ws://host:port (no path)
    secret: str | None
    mode: str  # "steady" | "ingest"
    devices: list[tuple[str, str, float, float]]  # (responder id, home grid, lon, lat)
    cells: list[list[tuple[float, float]]]  # report points, per basic grid
    categories: list[str]
    screens: int
    screen_scopes: list[str]
    town_scope: str | None
    rate: float  # reports/s of this worker (0 = closed loop)
    burst: int
    burst_every: float
    inflight: int
    handled_share: float
    position_every: float
    accept: bool
    hold: float
    warmup: float
    duration: float
    drain: float
    connect_rate: float
    max_handshakes: int
    ping_interval: float | None
    tag: str
    seed: int
    worker: int
    request_timeout: float
    gc_freeze: bool


@dataclass(slots=True)
class Counters:
    devices: int = 0
    connected: int = 0
    screens: int = 0
    screens_up: int = 0
    positions: int = 0
    reports_sent: int = 0
    reports_acked: int = 0
    reports_failed: int = 0
    offers: int = 0
    reoffers: int = 0
    accepts: int = 0
    resolves: int = 0
    revoked: int = 0
    screen_frames: int = 0
    screen_events: int = 0
    screen_gaps: int = 0
    screen_disorder: int = 0
    shed: int = 0
    lag_max_ms: float = 0.0


# --------------------------------------------------------------------------------------------
# the worker process


class _ScreenEvent(msgspec.Struct):
    type: str
    incident: str | None = None
    description: str | None = None
    at: str | None = None


class _ScreenFrame(msgspec.Struct):
    type: str
    seq: int | None = None
    prev: int | None = None
    event: _ScreenEvent | None = None


_screen_decode = msgspec.json.Decoder(_ScreenFrame).decode


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _iso_now(t: float) -> str:
    dt = datetime.fromtimestamp(t, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class _Worker:
    def __init__(self, plan: Plan, conn: Connection) -> None:
        self.plan = plan
        self.conn = conn
        self.c = Counters(devices=len(plan.devices), screens=plan.screens)
        self.rng = random.Random(f"{plan.seed}:{plan.worker}")
        self.errors: Counter[str] = Counter()
        self.clients: list[Any] = []
        self.stats: Any = None
        self.pos: list[tuple[float, float]] = [(d[2], d[3]) for d in plan.devices]
        self.t0 = math.inf  # start of load (set by "go")
        self.w0 = math.inf  # window
        self.w1 = math.inf
        self.go = asyncio.Event()
        self.stopping = False
        # samples (milliseconds), only for reports sent inside the window
        self.ack_ms: list[float] = []
        self.offer_ms: list[float] = []
        self.inbound_ms: list[float] = []
        self.outbound_ms: list[float] = []
        self.screen_ms: list[float] = []
        self.screen_in_ms: list[float] = []
        self.screen_out_ms: list[float] = []
        self.lag_ms: list[float] = []
        self.rtt_ms: list[float] = []
        self.lag_spikes: list[tuple[float, float]] = []
        self.offer_series: list[tuple[float, float, float | None, float | None]] = []
        self.cpu_window: list[float] = []
        self.offered: set[str] = set()
        self.inflight = 0
        self.window_acked = 0
        self.window_offers = 0
        self.window_events = 0
        self.window_positions = 0
        self.window_frames = 0
        self.flood_sent = 0
        self.flood_t = (0.0, 0.0)
        self.pongs: dict[str, asyncio.Future[None]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    # -- plumbing --

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _send_parent(self, *msg: Any) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(msg)

    def _on_parent(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg[0] == "go":
                    self.t0 = msg[1]
                    self.w0 = self.t0 + self.plan.warmup
                    self.w1 = self.w0 + self.plan.duration
                    self.go.set()
                elif msg[0] == "stop":
                    self.stopping = True
                    self.go.set()
        except (EOFError, OSError):
            self.stopping = True
            self.go.set()

    def in_window(self, t: float) -> bool:
        return self.w0 <= t < self.w1

    # -- devices --

    def _token(self, rid: str) -> str:
        from dispatch.server.auth import mint

        if self.plan.secret is None:
            return "no-secret"
        return mint(self.plan.secret, role="field", sub=rid, ttl=24 * 3600)

    def _on_device_message(self, i: int, client: Any) -> Any:
        def on_message(msg: Json) -> None:
            kind = msg.get("type")
            if kind == "offer":
                self._offer(i, client, msg)
            elif kind == "welcome":
                self._spawn(self._send_position(i, client, time.time()))
            elif kind == "pong":
                fut = self.pongs.pop(str(msg.get("id")), None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif kind == "offer_revoked":
                self.c.revoked += 1

        return on_message

    def _offer(self, i: int, client: Any, msg: Json) -> None:
        t = time.time()
        inc = msg.get("incident")
        if not isinstance(inc, dict):
            return
        iid = str(inc.get("id"))
        self.c.offers += 1
        if iid in self.offered:
            self.c.reoffers += 1
        else:
            self.offered.add(iid)
            sent = self._sent_at(inc.get("description"))
            if sent is not None and self.in_window(sent):
                self.window_offers += 1
                self.offer_ms.append((t - sent) * 1000)
                rep, off = _epoch(inc.get("reported_at")), _epoch(inc.get("offered_at"))
                inbound = outbound = None
                if rep is not None:
                    inbound = (rep - sent) * 1000
                    self.inbound_ms.append(inbound)
                if off is not None:
                    outbound = (t - off) * 1000
                    self.outbound_ms.append(outbound)
                if len(self.offer_series) < 200_000:
                    self.offer_series.append((round(sent, 4), round((t - sent) * 1000, 3),
                                              inbound and round(inbound, 3),
                                              outbound and round(outbound, 3)))
        if self.plan.accept:
            self._spawn(self._accept(client, iid))

    def _sent_at(self, desc: Any) -> float | None:
        if not isinstance(desc, str) or not desc.startswith(self.plan.tag):
            return None
        try:
            return float(desc[len(self.plan.tag) + 1 :])
        except ValueError:
            return None

    async def _request(self, client: Any, msg: Json) -> Json | None:
        from dispatch.sim.devices import FieldError

        try:
            return await client.request(msg, within=self.plan.request_timeout)  # type: ignore[no-any-return]
        except FieldError as exc:
            self.errors[f"{msg['type']}:{exc.code}"] += 1
        except (TimeoutError, ConnectionError):
            self.errors[f"{msg['type']}:timeout"] += 1
        return None

    async def _accept(self, client: Any, iid: str) -> None:
        if await self._request(client, {"type": "accept", "incident": iid}) is None:
            return
        self.c.accepts += 1
        if self.plan.hold > 0:
            await asyncio.sleep(self.plan.hold)
        if await self._request(client, {"type": "resolve", "incident": iid}) is not None:
            self.c.resolves += 1

    async def _send_position(self, i: int, client: Any, t: float, ts: str | None = None) -> None:
        lon, lat = self.pos[i]
        rng = self.rng
        msg = {
            "type": "position",
            "lon": round(lon + rng.uniform(-2e-4, 2e-4), 6),
            "lat": round(lat + rng.uniform(-2e-4, 2e-4), 6),
            "accuracy": 8.0,
            "ts": ts or _iso_now(t),
        }
        if await client.send(msg):
            self.c.positions += 1
            if self.in_window(t):
                self.window_positions += 1

    async def _positions(self) -> None:
        """Every device once per ``position_every``, spread evenly: on each 20 ms tick, send
        what is due by the clock (a late tick sends more, so the rate holds)."""
        n = len(self.clients)
        if n == 0 or self.plan.position_every <= 0:
            return
        rate = n / self.plan.position_every
        start = time.time()
        sent = 0
        j = 0
        while not self.stopping:
            await asyncio.sleep(0.02)
            t = time.time()
            due = int((t - start) * rate) - sent
            if due <= 0:
                continue
            ts = _iso_now(t)
            for _ in range(min(due, n)):
                client = self.clients[j]
                if client.connected:
                    await self._send_position(j, client, t, ts)
                j = (j + 1) % n
            sent += due

    # -- reports --

    def _next_reporter(self) -> tuple[int, Any] | None:
        n = len(self.clients)
        for _ in range(n):
            self._rr = (getattr(self, "_rr", -1) + 1) % n
            client = self.clients[self._rr]
            if client.connected:
                return self._rr, client
        return None

    async def _report(self) -> None:
        picked = self._next_reporter()
        if picked is None:
            self.errors["report:no_device"] += 1
            return
        _i, client = picked
        rng, plan = self.rng, self.plan
        cell = plan.cells[rng.randrange(len(plan.cells))]
        lon, lat = cell[rng.randrange(len(cell))]
        t = time.time()
        msg = {
            "type": "report",
            "id": client.next_id(),
            "category": plan.categories[rng.randrange(len(plan.categories))],
            "lon": lon,
            "lat": lat,
            "description": f"{plan.tag} {t:.6f}",
            "handled": rng.random() < plan.handled_share,
        }
        self.c.reports_sent += 1
        self.inflight += 1
        try:
            ack = await self._request(client, msg)
        finally:
            self.inflight -= 1
        if ack is None:
            self.c.reports_failed += 1
            return
        t2 = time.time()
        self.c.reports_acked += 1
        if self.in_window(t):
            self.window_acked += 1
            self.ack_ms.append((t2 - t) * 1000)

    async def _steady_reports(self) -> None:
        plan = self.plan
        if plan.rate <= 0 and plan.burst <= 0:
            return
        start = self.t0
        end = self.w1
        sent = 0
        cap = max(plan.inflight, 1)
        while not self.stopping:
            now = time.time()
            if now >= end:
                return
            if plan.burst > 0:
                due = (int((now - start) / plan.burst_every) + 1) * plan.burst
                wait_s = plan.burst_every - ((now - start) % plan.burst_every)
            else:
                due = int((now - start) * plan.rate) + 1
                wait_s = 0.002
            while sent < due:
                sent += 1
                if self.inflight >= cap:
                    self.c.shed += 1  # the server is not keeping up: do not pile on
                    continue
                self._spawn(self._report())
            await asyncio.sleep(min(wait_s, max(end - now, 0.0)) or 0.001)

    async def _closed_loop(self) -> None:
        async def loop() -> None:
            while not self.stopping and time.time() < self.w1:
                await self._report()

        await asyncio.gather(*(loop() for _ in range(self.plan.inflight)))

    # -- ingest flood --

    async def _flood(self) -> None:
        stamp = _iso_now(time.time())
        variants = [
            [
                {"type": "position", "lon": round(lon + k * 1e-5, 6),
                 "lat": round(lat - k * 1e-5, 6), "accuracy": 8.0, "ts": stamp}
                for k in range(4)
            ]
            for (lon, lat) in self.pos
        ]
        end = self.w1
        counts = [0]

        async def one(i: int, client: Any) -> None:
            mine = variants[i]
            send = client.send
            while time.time() < end and not self.stopping:
                for k in range(16):
                    if not await send(mine[k & 3]):
                        return
                counts[0] += 16
                await asyncio.sleep(0)

        t0 = time.time()
        await asyncio.gather(*(one(i, c) for i, c in enumerate(self.clients) if c.connected))
        # barrier: one ping per connection; its pong proves everything before it was read
        loop = asyncio.get_running_loop()
        waits = []
        for i, client in enumerate(self.clients):
            if not client.connected:
                continue
            pid = f"b{self.plan.worker}-{i}-{secrets.token_hex(2)}"
            fut: asyncio.Future[None] = loop.create_future()
            self.pongs[pid] = fut
            if await client.send({"type": "ping", "id": pid}):
                waits.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), 30)
        t1 = time.time()
        self.flood_sent = counts[0]
        self.flood_t = (t0, t1)
        self.c.positions += counts[0]

    # -- screens --

    async def _screen(self, k: int, handshakes: asyncio.Semaphore, delay: float) -> None:
        from dispatch.server.auth import mint

        await asyncio.sleep(delay)
        plan = self.plan
        loop = asyncio.get_running_loop()
        scope = plan.screen_scopes[k % len(plan.screen_scopes)] if plan.screen_scopes else None
        token = mint(plan.secret or "", role="admin", sub=f"bench-screen-{plan.worker}-{k}",
                     ttl=24 * 3600)
        # a town screen sees every seq; a village screen a subset, in increasing order
        whole = scope is None or scope == plan.town_scope
        tag = plan.tag
        c = self.c
        first: asyncio.Future[_ScreenFrame] = loop.create_future()
        last_seq: int | None = None

        def on_frame(raw: bytes | bytearray | memoryview) -> None:
            nonlocal last_seq
            t = time.time()
            frame = _screen_decode(raw)
            if not first.done():
                first.set_result(frame)
                last_seq = frame.seq
                return
            c.screen_frames += 1
            inw = self.w0 <= t < self.w1 + plan.drain
            if inw:
                self.window_frames += 1
            if frame.type != "event" or frame.seq is None:
                return
            c.screen_events += 1
            if last_seq is not None:
                if frame.seq <= last_seq:
                    c.screen_disorder += 1
                elif (
                    frame.prev > last_seq if frame.prev is not None
                    else whole and frame.seq != last_seq + 1
                ):
                    c.screen_gaps += 1
            last_seq = frame.seq
            ev = frame.event
            if ev is None:
                return
            if ev.type == "incident.reported" and ev.description and \
                    ev.description.startswith(tag):
                sent = self._sent_at(ev.description)
                if sent is not None and self.in_window(sent):
                    self.window_events += 1
                    self.screen_ms.append((t - sent) * 1000)
                    at = _epoch(ev.at)
                    if at is not None:
                        self.screen_in_ms.append((at - sent) * 1000)
                        self.screen_out_ms.append((t - at) * 1000)
            elif inw:
                self.window_events += 1

        link: Link | None = None
        try:
            try:
                async with handshakes:
                    link = await Link.open(
                        plan.url + "/ws/screen", on_frame, open_timeout=30, max_size=None,
                        ping_interval=None, user_agent="dispatch-bench",
                    )
                    hello: Json = {"type": "hello", "token": token}
                    if scope:
                        hello["scope"] = scope
                    link.send_text(json.dumps(hello).encode())
                    snap = await asyncio.wait_for(first, 60)
                if snap.type != "snapshot":
                    self.errors[f"screen:{snap.type}"] += 1
                    return
            except Exception as exc:
                self.errors[f"screen:connect:{type(exc).__name__}"] += 1
                return
            c.screens_up += 1
            try:
                await link.closed
                if not self.stopping:
                    self.errors[f"screen:closed:{link.close_code}"] += 1
            finally:
                c.screens_up -= 1
        finally:
            if link is not None:
                link.abort()

    # -- loop lag (the generator's own tail) --

    async def _gc_keeper(self) -> None:
        """What survived the last quarter second leaves the collected generations, as in the
        server (``dispatch.server.app._gc_keeper``): young collections stay short (at most
        ``GC_YOUNG`` objects to walk) and older ones have almost nothing to walk. With one
        freeze after connecting and a 50,000-object threshold instead, each young collection
        walked ~50,000 objects: a ~10 ms stall of the worker about once a second, a cluster of
        slow samples in every run's tail on the generator's side."""
        while not self.stopping:
            await asyncio.sleep(0.25)
            gc.freeze()

    async def _lag(self) -> None:
        period = 0.005
        while not self.stopping:
            t = time.perf_counter()
            await asyncio.sleep(period)
            late = (time.perf_counter() - t - period) * 1000
            now = time.time()
            if self.w0 <= now < self.w1 + self.plan.drain:
                if now < self.w1:
                    self.lag_ms.append(late)
                if late >= 2.0:
                    self.lag_spikes.append((round(now, 4), round(late, 3)))
            if late > self.c.lag_max_ms:
                self.c.lag_max_ms = late

    async def _cpu_marks(self) -> None:
        """This process's CPU seconds at the start and the end of the window."""
        await self.go.wait()
        for mark in (self.w0, self.w1):
            await asyncio.sleep(max(0.0, mark - time.time()))
            self.cpu_window.append(time.process_time())

    async def _probe(self) -> None:
        """One connection, a ``ping`` every 100 ms (under the default rate limit): the round trip
        of a message the server answers in its reader, without the town writer or the log."""
        loop = asyncio.get_running_loop()
        client = self.clients[0]
        n = 0
        while not self.stopping and time.time() < self.w1:
            await asyncio.sleep(0.1)
            if not client.connected:
                continue
            n += 1
            pid = f"probe-{n}"
            fut: asyncio.Future[None] = loop.create_future()
            self.pongs[pid] = fut
            t = time.perf_counter()
            w = time.time()
            if not await client.send({"type": "ping", "id": pid}):
                continue
            try:
                await asyncio.wait_for(fut, 5)
            except TimeoutError:
                self.errors["probe:timeout"] += 1
                continue
            if self.in_window(w):
                self.rtt_ms.append((time.perf_counter() - t) * 1000)

    async def _progress(self) -> None:
        while not self.stopping:
            self.c.connected = sum(1 for cl in self.clients if cl.connected)
            self._send_parent("progress", self.plan.worker, asdict(self.c))
            await asyncio.sleep(0.5)

    # -- main --

    async def run(self) -> None:
        from dispatch.sim.devices import FieldClient, FleetStats

        plan = self.plan
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._on_parent)
        # uvloop makes the fd non-blocking; a big result would then be cut short (EAGAIN)
        os.set_blocking(self.conn.fileno(), True)
        self.stats = FleetStats(devices=len(plan.devices))
        handshakes = asyncio.Semaphore(plan.max_handshakes)
        runs: list[asyncio.Task[None]] = []
        for i, (rid, _grid, _lon, _lat) in enumerate(plan.devices):
            client = FieldClient(
                plan.url + "/ws/field",
                rid,
                self._token,
                stats=self.stats,
                handshakes=handshakes,
                rng=random.Random(f"{plan.seed}:{rid}"),
                id_prefix=f"{rid}-{plan.tag}",
                ping_interval=plan.ping_interval,
                open_timeout=60.0,
            )
            client.on_message = self._on_device_message(i, client)
            self.clients.append(client)

        async def start(client: Any, delay: float) -> None:
            await asyncio.sleep(delay)
            await client.run()

        for i, client in enumerate(self.clients):
            delay = i / plan.connect_rate if plan.connect_rate > 0 else 0.0
            runs.append(loop.create_task(start(client, delay)))
        dev_ramp = len(self.clients) / plan.connect_rate if plan.connect_rate > 0 else 0.0
        screens = [
            loop.create_task(self._screen(k, handshakes, dev_ramp + k / max(plan.connect_rate, 1)))
            for k in range(plan.screens)
        ]
        aux = [loop.create_task(self._progress()), loop.create_task(self._lag()),
               loop.create_task(self._cpu_marks())]
        if plan.mode == "steady":
            aux.append(loop.create_task(self._positions()))
        # wait until everyone is up (or give up after a while), then say ready
        deadline = time.time() + 60 + 2 * dev_ramp + plan.screens / max(plan.connect_rate, 1)
        while time.time() < deadline and not self.stopping:
            up = sum(1 for cl in self.clients if cl.connected)
            if up >= len(self.clients) and self.c.screens_up >= plan.screens:
                break
            await asyncio.sleep(0.1)
        if plan.gc_freeze:
            gc.collect()
            gc.freeze()
            aux.append(loop.create_task(self._gc_keeper()))
        self.c.connected = sum(1 for cl in self.clients if cl.connected)
        self._send_parent("ready", plan.worker, asdict(self.c))
        await self.go.wait()
        if not self.stopping:
            await asyncio.sleep(max(0.0, self.t0 - time.time()))
            if plan.mode == "ingest":
                await self._flood()
            elif plan.mode == "probe":
                await self._probe()
            elif plan.rate > 0 or plan.burst > 0:
                await self._steady_reports()
            else:
                await self._closed_loop()
            await asyncio.sleep(max(0.0, self.w1 - time.time()))
            # let what is in flight finish (offers, acks, screen deliveries)
            end = time.time() + plan.drain
            while time.time() < end and (self.inflight or self.tasks):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await asyncio.sleep(min(0.5, plan.drain))
        self.stopping = True
        self.c.connected = sum(1 for cl in self.clients if cl.connected)
        errors = Counter(self.errors)
        for code, n in self.stats.error_codes.items():
            errors[f"device:{code}"] += n
        result = {
            "worker": plan.worker,
            "counters": asdict(self.c),
            "errors": dict(errors),
            "ack_ms": self.ack_ms,
            "offer_ms": self.offer_ms,
            "inbound_ms": self.inbound_ms,
            "outbound_ms": self.outbound_ms,
            "screen_ms": self.screen_ms,
            "screen_in_ms": self.screen_in_ms,
            "screen_out_ms": self.screen_out_ms,
            "lag_ms": self.lag_ms,
            "rtt_ms": self.rtt_ms,
            "lag_spikes": self.lag_spikes,
            "offer_series": self.offer_series,
            "cpu_seconds": (self.cpu_window[1] - self.cpu_window[0])
            if len(self.cpu_window) == 2 else None,
            "probe": plan.mode == "probe",
            "window_acked": self.window_acked,
            "window_offers": self.window_offers,
            "window_events": self.window_events,
            "window_frames": self.window_frames,
            "window_positions": self.window_positions,
            "flood_sent": self.flood_sent,
            "flood_t": self.flood_t,
            "disconnects": self.stats.disconnects,
            "connects": self.stats.connects,
        }
        asyncio.get_running_loop().remove_reader(self.conn.fileno())
        os.set_blocking(self.conn.fileno(), True)
        self.conn.send(("result", plan.worker, result))
        for t in aux:
            t.cancel()
        for t in list(self.tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True), 10)
        for t in [*runs, *screens]:
            t.cancel()
        await asyncio.gather(*runs, *screens, *aux, return_exceptions=True)


GC_YOUNG = 5_000
"""The workers' young-generation threshold (see ``_Worker._gc_keeper``)."""


def _worker_main(plan: Plan, conn: Connection) -> None:
    import logging

    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    logging.getLogger("dispatch.sim").setLevel(logging.ERROR)
    if plan.gc_freeze:
        gc.set_threshold(GC_YOUNG, 50, 1000)
    worker = _Worker(plan, conn)
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    try:
        if uvloop is not None:
            uvloop.run(worker.run())
        else:
            asyncio.run(worker.run())
    except BaseException:
        import traceback

        traceback.print_exc()
        raise
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# the server's side: CPU, memory, metrics


def find_pid_by_port(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (IPv4 or IPv6), from ``/proc``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            continue
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") in wanted:
                        return int(pid)
        except OSError:
            continue
    return None


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_sched(pid: int) -> tuple[float, float] | None:
    """Seconds on a CPU and seconds runnable but waiting for one (all threads), from
    ``/proc/<pid>/task/*/schedstat``: the wait is CPU the server wanted and did not get."""
    run = wait = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        with (contextlib.suppress(OSError, ValueError, IndexError),
              open(f"/proc/{pid}/task/{tid}/schedstat") as f):
            a, b, *_ = f.read().split()
            run += int(a)
            wait += int(b)
    return run / 1e9, wait / 1e9


def proc_mem(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak RSS) and ``VmRSS`` in KiB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def machine_cpu() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from ``/proc/stat``."""
    out: dict[str, tuple[int, int]] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                out[name] = (sum(v[:8]) - idle, sum(v[:8]))
    except OSError:
        pass
    return out


def machine_share(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]],
                  result: Json) -> Json:
    """How busy each CPU was over the window, and how much of it was neither the server nor the
    load generator (other processes on a shared machine: the noise in the tails)."""
    ticks = os.sysconf("SC_CLK_TCK")
    per_cpu = {}
    for name in b:
        if name in a and name != "cpu":
            busy = b[name][0] - a[name][0]
            total = b[name][1] - a[name][1]
            per_cpu[name] = round(100 * busy / total, 1) if total else None
    busy_s = (b["cpu"][0] - a["cpu"][0]) / ticks if "cpu" in a and "cpu" in b else 0.0
    span = (result["window"][1] - result["window"][0]) or 1.0
    ours = (result.get("server", {}).get("cpu_seconds") or 0.0) + (
        result.get("generator_cpu_seconds") or 0.0)
    return {"cpu_busy_percent": per_cpu,
            "others_percent_of_a_core": round(100 * max(0.0, busy_s - ours) / span, 1),
            "loadavg": loadavg()}


def loadavg() -> list[str]:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return []


def scrape_metrics(http_base: str, token: str | None) -> dict[str, float] | None:
    """``/metrics`` as {"name{labels}": value}; ``None`` if unreachable or refused."""
    req = urllib.request.Request(http_base + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            text = resp.read().decode()
    except Exception:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


METRICS_LEAD = 1.0
"""Seconds before the window at which ``/metrics`` is first scraped. A scrape renders the
day's statistics on the server's loop (tens of milliseconds with tens of thousands of cases
today: ``docs/performance.md``); taken at the window's start it put a pause into the first
samples of every run. The counters' deltas then cover ``span_s``, not the window."""


def _metric_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a.get(k, 0.0) for k in b if not k.startswith("dispatch_open_")
            and not k.startswith("dispatch_responders") and b[k] - a.get(k, 0.0) != 0}


def _hist_quantile(delta: dict[str, float], name: str, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of a histogram's window delta."""
    buckets: list[tuple[float, float]] = []
    for k, v in delta.items():
        if k.startswith(name + "_bucket{"):
            bound = k.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if bound == "+Inf" else float(bound), float(v)))
    if not buckets:
        return None
    buckets.sort()
    total = buckets[-1][1]
    if total <= 0:
        return None
    for upper, count in buckets:
        if count >= q * total:
            return upper
    return math.inf


# --------------------------------------------------------------------------------------------
# statistics and the table


def summarize(xs: Sequence[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    import numpy as np

    a = np.asarray(xs, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3), "max": round(float(a.max()), 3),
            "mean": round(float(a.mean()), 3)}


def _fmt(v: Any, width: int = 8) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.2f}" if v < 1000 else f"{v:>{width},.0f}"
    return f"{v:>{width}}"


def table(result: Json) -> str:
    lines = []
    cfg = result["config"]
    lines.append(
        f"dispatch bench — {cfg['label'] or cfg['mode']}: {cfg['devices']} devices, "
        f"{cfg['screens']} screens, {cfg['processes']} processes, "
        + ("position flood" if cfg["mode"] == "ingest" else
           f"reports {cfg['rate']:g}/s" if cfg["rate"] > 0 else
           (f"bursts of {cfg['burst']} every {cfg['burst_every']:g}s" if cfg["burst"] > 0 else
            (f"closed loop x{cfg['inflight']}" if cfg["inflight"] else "no reports")))
        + f", positions every {cfg['position_every']:g}s, window {cfg['duration']:g}s"
    )
    lines.append("")
    lines.append(f"{'latency (ms)':32} {'n':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    lines.append("-" * 78)
    for key, name in (("report_ack", "report -> ack"),
                      ("report_offer", "report -> offer (chosen device)"),
                      ("offer_inbound", "  client -> engine (reported_at)"),
                      ("offer_outbound", "  engine -> device (offered_at)"),
                      ("report_screen", "report -> screen event"),
                      ("screen_inbound", "  client -> engine (at)"),
                      ("screen_outbound", "  engine -> screen (at)"),
                      ("client_loop_lag", "load-generator loop lag"),
                      ("probe_rtt", "probe ping -> pong (server reader)"),
                      ("probe_loop_lag", "probe's own loop lag")):
        s = result["latency_ms"].get(key)
        if not s or not s["n"]:
            continue
        lines.append(f"{name:32} {s['n']:>8} {_fmt(s['p50'])} {_fmt(s['p90'])} "
                     f"{_fmt(s['p99'])} {_fmt(s['max'])}")
    lines.append("")
    thr = result["throughput"]
    lines.append(f"{'throughput (per second)':32} {'value':>12}")
    lines.append("-" * 46)
    for key, name in (("reports_acked", "reports acked"), ("offers", "offers received"),
                      ("positions_sent", "positions sent"), ("ingest", "positions taken (ingest)"),
                      ("screen_events", "screen event deliveries"),
                      ("screen_frames", "screen frames (all kinds)")):
        v = thr.get(key)
        if v:
            lines.append(f"{name:32} {v:>12,.0f}")
    srv = result.get("server") or {}
    if srv:
        lines.append("")
        lines.append(f"server pid {srv.get('pid')}: CPU {srv.get('cpu_percent', 0):.0f}% of a core "
                     f"over the window, peak RSS {srv.get('peak_rss_mib', 0):,.0f} MiB "
                     f"(now {srv.get('rss_mib', 0):,.0f} MiB)")
        if srv.get("runqueue_wait_percent") is not None:
            lines.append(f"  runnable but waiting for a CPU {srv['runqueue_wait_percent']:.0f}% "
                         "of the window (summed over its threads)")
        if srv.get("cpu_us_per_report"):
            lines.append(f"  server CPU per acked report {srv['cpu_us_per_report']:,.0f} µs")
        if srv.get("cpu_us_per_message"):
            lines.append(f"  server CPU per position taken {srv['cpu_us_per_message']:.2f} µs")
    m = result.get("server_metrics") or {}
    if m and m.get("appends"):
        span = f" in {m['span_s']:.1f} s" if m.get("span_s") else ""
        lines.append(f"  log appends{span} {m.get('appends', 0):,.0f} "
                     f"({m.get('events', 0):,.0f} events, "
                     f"{m.get('events_per_append') or 0:.1f} a batch), append p50 ≤ "
                     f"{_ms(m.get('append_p50_s'))} ms, p99 ≤ {_ms(m.get('append_p99_s'))} ms")
    mach = result.get("machine")
    if mach:
        busy = " ".join(f"{k} {v:.0f}%" for k, v in sorted(mach["cpu_busy_percent"].items()))
        if mach.get("others_on_server_cpu_percent") is not None:
            lines.append(f"  other processes on the server's CPU {mach['server_cpu']}: "
                         f"{mach['others_on_server_cpu_percent']:.0f}% of it")
        span = max(1e-9, result["window"][1] - result["window"][0])
        gen = 100 * (result.get("generator_cpu_seconds") or 0) / span
        lines.append(f"  machine over the window: {busy} busy; the load generator used {gen:.0f}% "
                     f"of a core; other processes {mach['others_percent_of_a_core']:.0f}% of a "
                     f"core (load average {' '.join(mach['loadavg'])})")
    c = result["counters"]
    lines.append("")
    lines.append(
        f"devices {c['connected']}/{c['devices']} up, screens {c['screens_up']}/{c['screens']} up; "
        f"reports sent {c['reports_sent']:,} acked {c['reports_acked']:,} failed "
        f"{c['reports_failed']:,} shed {c['shed']:,}; offers {c['offers']:,} (re-offers "
        f"{c['reoffers']}), accepts {c['accepts']:,}, resolves {c['resolves']:,}; "
        f"screen seq gaps {c['screen_gaps']}, out of order {c['screen_disorder']}"
    )
    errs = result["errors"]
    lines.append("errors: " + (", ".join(f"{k}={v}" for k, v in sorted(errs.items())) or "none"))
    return "\n".join(lines)


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    if math.isinf(s):
        return "inf"
    return f"{s * 1000:g}"


# --------------------------------------------------------------------------------------------
# the town


def _read_areas(grids_path: Path) -> dict[str, tuple[int, Any]]:
    import shapely
    from shapely.geometry import Polygon, shape

    fc = json.loads(Path(grids_path).read_text(encoding="utf-8"))
    out: dict[str, tuple[int, Any]] = {}
    for feat in fc["features"]:
        props = feat["properties"]
        geom = shape(feat["geometry"])
        if not isinstance(geom, Polygon):
            geom = max(shapely.get_parts(geom), key=lambda g: g.area)
        out[str(props["id"])] = (int(props["level"]), geom)
    return out


def _points_in(rng: random.Random, poly: Any, n: int) -> list[tuple[float, float]]:
    import shapely

    minx, miny, maxx, maxy = poly.bounds
    pts: list[tuple[float, float]] = []
    shrunk = poly.buffer(-2e-5) if poly.area > 1e-8 else poly  # keep off the edges (~2 m)
    if shrunk.is_empty:
        shrunk = poly
    while len(pts) < n:
        x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        if shapely.contains_xy(shrunk, x, y):
            pts.append((round(x, 6), round(y, 6)))
    return pts


def write_bench_town(out_dir: Path, workers: int, *, grids: Path | None = None,
                     categories: Path | None = None, seed: int = 7, secret: str | None = None,
                     store: str = "sqlite:///dispatch.db",
                     server: dict[str, Any] | None = None,
                     dispatch: dict[str, Any] | None = None) -> Path:
    """A town for benchmarks: the demo grids with ``workers`` grid workers (skills ``*``) spread
    evenly over the basic grids, the demo categories, and a ``dispatch.toml``; returns the
    config's path. ``server`` adds keys to ``[server]`` (e.g. ``{"rate": 1e6}``)."""
    root = Path(__file__).resolve().parents[2]
    grids = grids or root / "config" / "demo" / "grids.geojson"
    categories = categories or root / "config" / "demo" / "categories.toml"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grids, out_dir / "grids.geojson")
    shutil.copyfile(categories, out_dir / "categories.toml")
    areas = _read_areas(grids)
    basic = sorted(g for g, (lv, _p) in areas.items() if lv == 3)
    with (out_dir / "roster.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "name", "kind", "home_grid", "skills", "department"])
        for i in range(workers):
            w.writerow([f"B{i + 1:06d}", f"bench worker {i + 1}", "grid_worker",
                        basic[i % len(basic)], "*", ""])
    secret = secret or secrets.token_urlsafe(32)

    def toml_value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(v)

    srv = {"host": "127.0.0.1", "port": 8080, **(server or {})}
    disp = {"offer_timeout": "60s", "position_stale_after": "120s", "offline_after": "30s",
            **(dispatch or {})}
    text = ["# generated by dispatch.sim.bench.write_bench_town", "[server]"]
    text += [f"{k} = {toml_value(v)}" for k, v in srv.items()]
    text += ["", "[auth]", f"secret = {json.dumps(secret)}", "metrics_open = false", "",
             "[data]", 'grids = "grids.geojson"', 'roster = "roster.csv"',
             'categories = "categories.toml"', "", "[store]", f"url = {json.dumps(store)}", "",
             "[dispatch]"]
    text += [f"{k} = {toml_value(v)}" for k, v in disp.items()]
    text += ["", "[log]", 'level = "warning"', 'format = "json"', ""]
    path = out_dir / "dispatch.toml"
    path.write_text("\n".join(text), encoding="utf-8")
    return path


def _load_town(config: Path) -> tuple[Json, Path, Path, Path]:
    with Path(config).open("rb") as f:
        doc = tomllib.load(f)
    base = Path(config).resolve().parent
    data = doc.get("data", {})
    secret = os.environ.get("DISPATCH_AUTH_SECRET") or doc.get("auth", {}).get("secret")
    doc["_secret"] = secret

    def path(key: str, default: str) -> Path:
        env = os.environ.get(f"DISPATCH_DATA_{key.upper()}")
        if env:
            return Path(env)
        p = Path(data.get(key, default))
        return p if p.is_absolute() else base / p

    return (doc, path("grids", "grids.geojson"), path("roster", "roster.csv"),
            path("categories", "categories.toml"))


# --------------------------------------------------------------------------------------------
# the command


def _split(items: Sequence[Any], k: int) -> list[list[Any]]:
    return [list(items[i::k]) for i in range(k)]


def run_bench(args: argparse.Namespace) -> int:
    if not args.config:
        print("error: dispatch bench needs --config (the server's config: secret, grids, roster, "
              "categories)", file=sys.stderr)
        return 2
    doc, grids_path, roster_path, cats_path = _load_town(Path(args.config))
    secret = doc["_secret"]
    if not secret:
        print("error: no [auth] secret in the config or DISPATCH_AUTH_SECRET", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    for suffix in ("/ws/field", "/ws/screen"):
        url = url.removesuffix(suffix)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    http_base = ("https" if parts.scheme == "wss" else "http") + f"://{parts.hostname}:{port}"
    rng = random.Random(args.seed)

    areas = _read_areas(grids_path)
    with cats_path.open("rb") as f:
        cat_table = tomllib.load(f).get("categories", {})
    cats = sorted(c for c, v in cat_table.items() if args.all_categories or not v.get("verify"))
    if not cats:
        cats = sorted(cat_table)
    rows: list[Json] = []
    with roster_path.open(newline="", encoding="utf-8") as fr:
        for row in csv.DictReader(fr):
            if row["home_grid"] in areas and areas[row["home_grid"]][0] == 3:
                rows.append(row)
    rows.sort(key=lambda r: (r["kind"] != "grid_worker", "*" not in r["skills"].split(";")))
    if args.devices > len(rows):
        print(f"error: the roster has only {len(rows)} responders with a basic home grid; "
              f"asked for {args.devices} devices (make a bigger roster: "
              "dispatch.sim.bench.write_bench_town)", file=sys.stderr)
        return 2
    chosen = rows[: args.devices]
    probe_row = rows[args.devices] if len(rows) > args.devices else rows[0]
    home_pts: dict[str, list[tuple[float, float]]] = {}
    per_grid = Counter(r["home_grid"] for r in chosen)
    for g, n in per_grid.items():
        home_pts[g] = _points_in(rng, areas[g][1], n)
    devices = [(r["id"], r["home_grid"], *home_pts[r["home_grid"]].pop()) for r in chosen]
    probe_dev = (probe_row["id"], probe_row["home_grid"],
                 *_points_in(rng, areas[probe_row["home_grid"]][1], 1)[0])
    basic = sorted(g for g, (lv, _p) in areas.items() if lv == 3)
    cells = [_points_in(rng, areas[g][1], 64) for g in basic]
    town = next((g for g, (lv, _p) in areas.items() if lv == 1), None)
    if args.screen_scope == "villages":
        scopes = [g for g, (lv, _p) in areas.items() if lv == 1] + sorted(
            g for g, (lv, _p) in areas.items() if lv == 2)
    elif args.screen_scope:
        scopes = [args.screen_scope]
    else:
        scopes = [town] if town else []

    procs_n = max(1, min(args.processes, max(args.devices, args.screens, 1)))
    dev_split = _split(devices, procs_n)
    tag = f"bench-{secrets.token_hex(3)}"
    ctx = mp.get_context("spawn")
    workers: list[tuple[Any, Connection]] = []
    plans: list[Plan] = []
    screens_left = args.screens
    for w in range(procs_n):
        s = args.screens // procs_n + (1 if w < args.screens % procs_n else 0)
        screens_left -= s
        plan = Plan(
            url=url, secret=secret, mode=args.mode, devices=dev_split[w], cells=cells,
            categories=cats, screens=s, screen_scopes=scopes, town_scope=town,
            rate=args.rate / procs_n, burst=(args.burst // procs_n) if args.burst else 0,
            burst_every=args.burst_every,
            inflight=(-(-args.inflight // procs_n) if args.inflight > 0 else 0)
            if args.rate <= 0 and not args.burst else max(1, args.max_inflight // procs_n),
            handled_share=args.handled_share, position_every=args.position_every,
            accept=not args.no_accept, hold=args.hold, warmup=args.warmup,
            duration=args.duration, drain=args.drain,
            connect_rate=args.connect_rate / procs_n, max_handshakes=max(8, 64 // procs_n),
            ping_interval=None, tag=tag, seed=args.seed, worker=w,
            request_timeout=args.request_timeout, gc_freeze=not args.no_gc_freeze,
        )
        plans.append(plan)
    if not args.no_probe and args.mode != "ingest":
        probe = Plan(**{**asdict(plans[0]), "mode": "probe", "devices": [probe_dev], "screens": 0,
                        "rate": 0.0, "burst": 0, "worker": len(plans)})
        plans.append(probe)
    for plan in plans:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(plan, child), daemon=True,
                        name=f"bench-{plan.worker}")
        p.start()
        child.close()
        workers.append((p, parent))

    server_pid = args.server_pid or find_pid_by_port(port)
    admin = None
    from dispatch.server.auth import mint

    admin = mint(secret, role="admin", sub="bench", ttl=3600)
    progress: dict[int, Json] = {}
    ready: dict[int, Json] = {}
    results: dict[int, Json] = {}
    conns: dict[Any, int] = {c: w for w, (_p, c) in enumerate(workers)}
    started = time.time()
    last_line = 0.0
    cpu_marks: list[tuple[float, float]] = []
    t0 = w0 = w1 = math.inf
    cpu_w0 = cpu_w1 = None
    m0 = m1 = None
    m0_at: float | None = None
    m1_at: float | None = None
    scrape_ms: float | None = None
    go_sent = False
    stat0 = stat1 = None
    sched0 = sched1 = None
    tty = sys.stderr.isatty()

    def line(now: float) -> str:
        tot: Counter[str] = Counter()
        for p in progress.values():
            for k, v in p.items():
                if isinstance(v, int):
                    tot[k] += v
        lag = max((p.get("lag_max_ms", 0.0) for p in progress.values()), default=0.0)
        cpu = ""
        if len(cpu_marks) >= 2 and cpu_marks[-1][0] > cpu_marks[-2][0]:
            (ta, ca), (tb, cb) = cpu_marks[-2], cpu_marks[-1]
            cpu = f" | server CPU {100 * (cb - ca) / (tb - ta):3.0f}%"
        if server_pid:
            mem = proc_mem(server_pid)
            cpu += f" RSS {mem.get('VmRSS', 0) / 1024:,.0f} MiB"
        phase = "connecting" if not go_sent else ("warm-up" if now < w0 else
                                                  ("measuring" if now < w1 else "draining"))
        return (f"[bench {now - started:5.0f}s {phase:10}] devices {tot['connected']}/"
                f"{tot['devices']} screens {tot['screens_up']}/{tot['screens']} | pos "
                f"{tot['positions']:,} | reports {tot['reports_sent']:,} sent "
                f"{tot['reports_acked']:,} acked | offers {tot['offers']:,} | screen events "
                f"{tot['screen_events']:,} gaps {tot['screen_gaps']} | errors "
                f"{tot['reports_failed']} | lag max {lag:.0f} ms{cpu}")

    try:
        while len(results) < len(workers):
            now = time.time()
            timeout = 0.2
            for c in wait(list(conns), timeout=timeout):
                assert isinstance(c, Connection)
                try:
                    msg = c.recv()
                except (EOFError, OSError) as exc:
                    w = conns.pop(c)
                    if w not in results:
                        print(f"error: worker {w} died ({exc!r})", file=sys.stderr)
                        results[w] = {}
                    continue
                kind, w, body = str(msg[0]), int(msg[1]), msg[2]
                if kind == "progress":
                    progress[w] = body
                elif kind == "ready":
                    ready[w] = body
                    progress[w] = body
                elif kind == "result":
                    results[w] = body
            now = time.time()
            if not go_sent and len(ready) == len(workers):
                t0 = now + 0.3
                w0 = t0 + args.warmup
                w1 = w0 + args.duration
                for _p, c in workers:
                    c.send(("go", t0))
                go_sent = True
            if go_sent and m0_at is None and now >= w0 - METRICS_LEAD:
                m0_at = time.time()
                m0 = scrape_metrics(http_base, admin)
            if go_sent and cpu_w0 is None and now >= w0:
                sched0 = proc_sched(server_pid) if server_pid else None
                cpu_w0 = (now, (proc_cpu(server_pid) or 0.0) if server_pid else 0.0)
                stat0 = machine_cpu()
            if go_sent and cpu_w1 is None and now >= w1:
                sched1 = proc_sched(server_pid) if server_pid else None
                cpu_w1 = (now, (proc_cpu(server_pid) or 0.0) if server_pid else 0.0)
                stat1 = machine_cpu()
                m1_at = time.time()
                m1 = scrape_metrics(http_base, admin)
                scrape_ms = (time.time() - m1_at) * 1000
            if server_pid and (not cpu_marks or now - cpu_marks[-1][0] >= 1.0):
                c_ = proc_cpu(server_pid)
                if c_ is not None:
                    cpu_marks.append((now, c_))
            if now - last_line >= 1.0 and not args.quiet:
                last_line = now
                text = line(now)
                print(("\r" + text[:200]) if tty else text, file=sys.stderr,
                      end="" if tty else "\n", flush=True)
    except KeyboardInterrupt:
        for _p, c in workers:
            with contextlib.suppress(Exception):
                c.send(("stop",))
        raise
    finally:
        if tty and not args.quiet:
            print(file=sys.stderr)
        for p, _c in workers:
            p.join(timeout=20)
            if p.is_alive():
                p.terminate()
    if cpu_w1 is None and server_pid:
        cpu_w1 = (time.time(), proc_cpu(server_pid) or 0.0)
        stat1 = machine_cpu()

    result = aggregate(args, results, server_pid, cpu_w0, cpu_w1, m0, m1, len(cats), tag)
    if result["server_metrics"] and m0_at is not None and m1_at is not None:
        result["server_metrics"]["span_s"] = round(m1_at - m0_at, 3)
        result["server_metrics"]["scrape_ms"] = round(scrape_ms or 0.0, 1)
    result["window"] = [w0, w1]
    result["server_cpu_marks"] = [(round(t, 3), round(c, 3)) for t, c in cpu_marks]
    if stat0 and stat1:
        result["machine"] = machine_share(stat0, stat1, result)
    if server_pid and result.get("machine") and result["server"].get("cpu_percent") is not None:
        with contextlib.suppress(OSError):
            cpus = sorted(os.sched_getaffinity(server_pid))
            busy = result["machine"]["cpu_busy_percent"].get(f"cpu{cpus[0]}")
            if len(cpus) == 1 and busy is not None:
                result["machine"]["server_cpu"] = cpus[0]
                result["machine"]["others_on_server_cpu_percent"] = round(
                    max(0.0, busy - result["server"]["cpu_percent"]), 1)
    if sched0 and sched1 and cpu_w0 and cpu_w1 and cpu_w1[0] > cpu_w0[0]:
        span = cpu_w1[0] - cpu_w0[0]
        result["server"]["run_percent"] = round(100 * (sched1[0] - sched0[0]) / span, 1)
        result["server"]["runqueue_wait_percent"] = round(100 * (sched1[1] - sched0[1]) / span, 1)
    print(table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"# wrote {out}", file=sys.stderr)
    c = result["counters"]
    if c["connected"] < c["devices"] or (args.screens and c["screens_up"] < args.screens):
        return 1
    return 0


def aggregate(args: argparse.Namespace, results: dict[int, Json], server_pid: int | None,
              cpu_w0: tuple[float, float] | None, cpu_w1: tuple[float, float] | None,
              m0: dict[str, float] | None, m1: dict[str, float] | None, n_cats: int,
              tag: str) -> Json:
    everyone = [r for r in results.values() if r]
    rs = [r for r in everyone if not r.get("probe")]
    probes = [r for r in everyone if r.get("probe")]
    def cat(key: str) -> list[float]:
        return [x for r in everyone for x in r.get(key, [])]
    tot: Counter[str] = Counter()
    lag_max = 0.0
    for r in rs:
        for k, v in r["counters"].items():
            if isinstance(v, int):
                tot[k] += v
        lag_max = max(lag_max, r["counters"].get("lag_max_ms", 0.0))
    errors: Counter[str] = Counter()
    for r in rs:
        errors.update(r.get("errors", {}))
    dur = args.duration
    thr: Json = {
        "reports_acked": sum(r.get("window_acked", 0) for r in rs) / dur,
        "offers": sum(r.get("window_offers", 0) for r in rs) / dur,
        "positions_sent": sum(r.get("window_positions", 0) for r in rs) / dur,
        "screen_events": sum(r.get("window_events", 0) for r in rs) / dur,
        "screen_frames": sum(r.get("window_frames", 0) for r in rs) / dur,
    }
    flood = [(r["flood_sent"], *r["flood_t"]) for r in rs if r.get("flood_sent")]
    if flood:
        sent = sum(f[0] for f in flood)
        span = max(f[2] for f in flood) - min(f[1] for f in flood)
        thr["ingest"] = sent / span if span > 0 else None
        thr["ingest_messages"] = sent
        thr["ingest_seconds"] = round(span, 3)
    server: Json = {}
    if server_pid:
        mem = proc_mem(server_pid)
        server = {"pid": server_pid, "peak_rss_mib": round(mem.get("VmHWM", 0) / 1024, 1),
                  "rss_mib": round(mem.get("VmRSS", 0) / 1024, 1)}
        if cpu_w0 and cpu_w1 and cpu_w1[0] > cpu_w0[0]:
            cpu_s = cpu_w1[1] - cpu_w0[1]
            span = cpu_w1[0] - cpu_w0[0]
            server["cpu_seconds"] = round(cpu_s, 3)
            server["cpu_percent"] = round(100 * cpu_s / span, 1)
            if thr["reports_acked"]:
                server["cpu_us_per_report"] = round(1e6 * cpu_s / span / thr["reports_acked"], 1)
            if thr.get("ingest"):
                server["cpu_us_per_message"] = round(1e6 * cpu_s / span / thr["ingest"], 2)
            elif thr["positions_sent"] and not thr["reports_acked"]:
                server["cpu_us_per_message"] = round(
                    1e6 * cpu_s / span / thr["positions_sent"], 2)
    metrics: Json = {}
    if m0 and m1:
        d = _metric_delta(m0, m1)
        appends = d.get("dispatch_log_append_seconds_count", 0.0)
        events = d.get("dispatch_log_append_batch_events_sum", 0.0)
        metrics = {
            "appends": appends,
            "events": events,
            "events_per_append": events / appends if appends else None,
            "append_p50_s": _hist_quantile(d, "dispatch_log_append_seconds", 0.5),
            "append_p99_s": _hist_quantile(d, "dispatch_log_append_seconds", 0.99),
            "messages_field": d.get('dispatch_messages_received_total{channel="field"}', 0.0),
            "delta": d,
        }
    return {
        "bench": "dispatch bench",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tag": tag,
        "config": {
            "label": args.label, "url": args.url, "mode": args.mode, "devices": args.devices,
            "screens": args.screens, "screen_scope": args.screen_scope or "town",
            "rate": args.rate, "burst": args.burst, "burst_every": args.burst_every,
            "inflight": args.inflight, "max_inflight": args.max_inflight,
            "handled_share": args.handled_share, "position_every": args.position_every,
            "duration": dur, "warmup": args.warmup, "processes": args.processes,
            "accept": not args.no_accept, "hold": args.hold, "categories": n_cats,
            "python": sys.version.split()[0],
        },
        "latency_ms": {
            "report_ack": summarize(cat("ack_ms")),
            "report_offer": summarize(cat("offer_ms")),
            "offer_inbound": summarize(cat("inbound_ms")),
            "offer_outbound": summarize(cat("outbound_ms")),
            "report_screen": summarize(cat("screen_ms")),
            "screen_inbound": summarize(cat("screen_in_ms")),
            "screen_outbound": summarize(cat("screen_out_ms")),
            "client_loop_lag": summarize([x for r in rs for x in r.get("lag_ms", [])]),
            "probe_rtt": summarize([x for r in probes for x in r.get("rtt_ms", [])]),
            "probe_loop_lag": summarize([x for r in probes for x in r.get("lag_ms", [])]),
        },
        "offer_series": sorted(x for r in everyone for x in r.get("offer_series", [])),
        "client_lag_spikes": sorted(x for r in rs for x in r.get("lag_spikes", [])),
        "generator_cpu_seconds": round(sum(r.get("cpu_seconds") or 0.0 for r in everyone), 3),
        "throughput": thr,
        "server": server,
        "server_metrics": metrics,
        "counters": {**{k: tot[k] for k in asdict(Counters())}, "lag_max_ms": round(lag_max, 1),
                     "reconnects": sum(r.get("connects", 0) for r in rs) - tot["connected"]},
        "errors": dict(errors),
    }


__all__ = ["Plan", "find_pid_by_port", "run_bench", "summarize", "write_bench_town"]
