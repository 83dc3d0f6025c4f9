"""Simulated field devices: grid workers, department units and volunteers on real websockets.

Three layers, so the load generator can reuse the lower ones:

* :class:`FieldClient` — one device's connection to ``GET /ws/field`` (PROTOCOL.md "Field
  channel"): connect, ``hello`` with a fresh field JWT, wait for ``welcome``;
  :meth:`~FieldClient.send` for fire-and-forget messages (``position``);
  :meth:`~FieldClient.request` for messages answered by ``ack``/``error`` (a future per ``id``).
  Unanswered requests survive a dropped connection and are sent again, with the same ``id``,
  after the next ``welcome`` — the server's idempotency on ``report.id`` turns that into
  exactly-once. It reconnects with capped, jittered exponential
  backoff, and gives up only when the server refuses the responder (close 4403).
  Server-initiated messages go to an ``on_message`` callback.
* :class:`PatrolBehaviour` — what a person with the device does: patrol its home grid (walk to
  random waypoints; department units drive around the town), send a ``position`` every few
  seconds, report incidents at a configured rate with a realistic category mix (most fixed on
  the spot: ``handled: true``), answer offers after a human delay (accept, decline or ignore),
  go to the incident, ``arrive``, and after a while ``resolve`` — or ``escalate``. The escalation
  shares are tuned so that ~1 % of all cases reach the town (level 1).
* :class:`Fleet` — N devices in one event loop, connections staggered and handshakes bounded,
  with shared :class:`FleetStats` counters and a one-line :meth:`Fleet.progress`.

Times are ``loop.time()`` seconds; randomness comes from a ``random.Random`` per device, seeded
from the fleet seed and the responder id, so a run's decisions are reproducible (not its timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import math
import random
import secrets
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import shapely
from shapely.geometry import Polygon, shape
from websockets.exceptions import WebSocketException

from dispatch.sim.link import Data, Link, LinkClosed
from dispatch.sim.town import CATEGORIES, M_PER_DEG_LAT, M_PER_DEG_LON, DemoTown

log = logging.getLogger("dispatch.sim")

Json = dict[str, Any]
TokenFactory = Callable[[str], str]
"""Makes a field JWT for a responder id (called on every connect, so tokens may be short-lived)."""

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds, as the protocol writes times."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FieldError(Exception):
    """The server answered a request with ``error``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class FleetStats:
    """Counters shared by every device of a fleet (or kept by one client alone)."""

    devices: int = 0
    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    positions: int = 0
    reports_sent: int = 0
    reports_acked: int = 0
    reports_handled: int = 0
    offers: int = 0
    accepts: int = 0
    declines: int = 0
    ignored: int = 0
    conflicts: int = 0
    revoked: int = 0
    arrivals: int = 0
    resolves: int = 0
    escalations: int = 0
    errors: int = 0
    error_codes: Counter[str] = field(default_factory=Counter)

    def error(self, code: str) -> None:
        self.errors += 1
        self.error_codes[code] += 1

    def line(self) -> str:
        codes = ",".join(f"{c}={n}" for c, n in self.error_codes.most_common(3))
        return (
            f"devices {self.connected}/{self.devices} up ({self.connects} connects) | "
            f"reports {self.reports_sent} sent {self.reports_acked} acked "
            f"({self.reports_handled} on the spot) | offers {self.offers}: {self.accepts} accepted "
            f"{self.declines} declined {self.ignored} ignored {self.conflicts} gone "
            f"{self.revoked} revoked | arrive {self.arrivals} resolve {self.resolves} "
            f"escalate {self.escalations} | errors {self.errors}" + (f" ({codes})" if codes else "")
        )


# --- the connection --------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    data: bytes
    future: asyncio.Future[Json]


def _consume(fut: asyncio.Future[Json]) -> None:
    if not fut.cancelled():
        fut.exception()


class FieldClient:
    """One field device's websocket connection (see the module docstring).

    Run :meth:`run` as a task; it returns after :meth:`close` or when the server refuses the
    responder for good (``fatal`` is then set). ``on_message`` receives every server message
    that is not the answer to a request: ``welcome`` (after each connect), ``offer``,
    ``offer_revoked``, ``assigned``, ``incident`` and ``error``\\ s without a known ``id``.

    The connection is a :class:`~dispatch.sim.link.Link` (websockets' sans-I/O client on the
    transport): messages are decoded and handled as they arrive, with no task per connection.
    """

    def __init__(
        self,
        url: str,
        responder: str,
        token_factory: TokenFactory,
        *,
        stats: FleetStats | None = None,
        on_message: Callable[[Json], None] | None = None,
        handshakes: asyncio.Semaphore | None = None,
        rng: random.Random | None = None,
        id_prefix: str | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        max_size: int = 1 << 20,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.url = url
        self.responder = responder
        self.stats = stats if stats is not None else FleetStats()
        self.on_message = on_message
        self.welcome: Json | None = None
        self.fatal: str | None = None
        self._token_factory = token_factory
        self._handshakes = handshakes
        self._rng = rng or random.Random()
        self._prefix = id_prefix or f"{responder}-{secrets.token_hex(3)}"
        self._seq = 0
        self._open_timeout = open_timeout
        self._ping_interval = ping_interval
        self._max_size = max_size
        self._backoff = backoff
        self._pending: dict[str, _Pending] = {}
        self._link: Link | None = None  # set once welcomed, until the connection ends
        self._opening: Link | None = None
        self._welcomed: asyncio.Future[Json] | None = None
        self._closed = asyncio.Event()
        self._connects = 0

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def closed(self) -> bool:
        return self._closed.is_set() or self.fatal is not None

    def next_id(self) -> str:
        """A fresh message id, unique across runs (the prefix carries a random nonce)."""
        self._seq += 1
        return f"{self._prefix}-{self._seq}"

    async def send(self, msg: Json) -> bool:
        """Send a message that gets no answer; ``False`` when not connected (it is dropped)."""
        link = self._link
        if link is None:
            return False
        try:
            link.send_text(_encode(msg))
            await link.drain()
        except LinkClosed:
            return False
        return True

    async def request(self, msg: Json, *, within: float | None = 60.0) -> Json:
        """Send ``msg`` (an ``id`` is added if missing) and return its ``ack``.

        Raises :class:`FieldError` on an ``error`` answer and ``TimeoutError`` when no answer
        came in ``within`` seconds (``None``: wait for ever); until then the message is re-sent
        after every reconnect. Sending the same ``id`` again later is allowed (idempotency).
        """
        mid = msg.setdefault("id", self.next_id())
        fut: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)  # an answer nobody awaits any more is not an error
        pending = _Pending(_encode(msg), fut)
        self._pending[mid] = pending
        link = self._link
        if link is not None:
            with contextlib.suppress(LinkClosed):
                link.send_text(pending.data)
        try:
            return await asyncio.wait_for(fut, within)
        finally:
            if self._pending.get(mid) is pending:
                del self._pending[mid]

    async def close(self) -> None:
        """Stop reconnecting and close the connection (code 1000)."""
        self._closed.set()
        link = self._link or self._opening
        if link is not None:
            await link.close()

    async def run(self) -> None:
        """Connect, keep connected, reconnect with backoff; return after :meth:`close`."""
        attempt = 0
        while not self.closed:
            link: Link | None = None
            try:
                link = await self._open()
                attempt = 0
                await self._serve(link)
            except (OSError, TimeoutError, WebSocketException) as exc:
                self.stats.error("connect")
                log.debug("! %s connect failed: %r", self.responder, exc)
            except Exception:  # task boundary: log, back off, retry
                self.stats.error("internal")
                log.exception("! %s client crashed", self.responder)
            finally:
                if self._link is not None:
                    self._link = None
                    self.stats.connected -= 1
                    self.stats.disconnects += 1
                self._opening = None
                if link is not None:
                    with contextlib.suppress(Exception):
                        await link.close()
            if self.closed:
                break
            lo, hi = self._backoff
            delay = min(hi, lo * 2**attempt) * self._rng.uniform(0.5, 1.0)
            attempt = min(attempt + 1, 16)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(ConnectionError("client closed"))
        self._pending.clear()

    async def _open(self) -> Link:
        """Connect and say hello (under the fleet's handshake limit); returns once welcomed."""
        async with self._handshakes or contextlib.nullcontext():
            welcomed = self._welcomed = asyncio.get_running_loop().create_future()
            link = self._opening = await Link.open(
                self.url,
                self._on_text,
                open_timeout=self._open_timeout,
                ping_interval=self._ping_interval,
                max_size=self._max_size,
            )
            try:
                hello: Json = {"type": "hello", "token": self._token_factory(self.responder)}
                if self._connects:
                    hello["resume"] = True
                link.send_text(_encode(hello))
                done, _ = await asyncio.wait(
                    (welcomed, link.closed),
                    timeout=self._open_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if welcomed not in done:
                    if link.closed.done():
                        self._closed_by_server(link.close_code)
                        raise ConnectionError(f"closed before welcome ({link.close_code})")
                    raise TimeoutError("no welcome")
                welcomed.result()
            except BaseException:
                if not welcomed.done():
                    welcomed.cancel()
                await link.close()
                raise
        self._connects += 1
        return link

    async def _serve(self, link: Link) -> None:
        self.stats.connects += 1
        log.debug("= %s connected", self.responder)
        for p in list(self._pending.values()):  # unanswered requests, same ids
            link.send_text(p.data)
        await link.closed
        self._closed_by_server(link.close_code)

    def _on_text(self, data: Data) -> None:
        try:
            msg = _decode(data)
        except msgspec.DecodeError:
            self.stats.error("bad_json_from_server")
            return
        if not isinstance(msg, dict):
            return
        welcomed = self._welcomed
        if welcomed is not None:  # the first message must be the welcome
            self._welcomed = None
            if msg.get("type") != "welcome":
                if not welcomed.done():
                    welcomed.set_exception(
                        WebSocketException(f"expected welcome, got {bytes(data)[:200]!r}")
                    )
                return
            if welcomed.done():  # given up on already
                return
            self.welcome = msg
            self._link = self._opening
            self.stats.connected += 1
            welcomed.set_result(msg)
            self._deliver(msg)  # before anything that came after it
            return
        self._on_message(msg)

    def _closed_by_server(self, code: int | None) -> None:
        if self._closed.is_set():
            return
        if code == 4403:
            self.fatal = "forbidden: the server refuses this responder"
            self.stats.error("4403")
            log.warning("! %s refused by the server (4403); giving up", self.responder)
        elif code is not None and code not in (1000, 1001):
            self.stats.error(str(code))
            log.debug("! %s closed with %s", self.responder, code)

    def _on_message(self, msg: Json) -> None:
        mtype = msg.get("type")
        mid = msg.get("id")
        if mtype in ("ack", "error") and isinstance(mid, str) and mid in self._pending:
            fut = self._pending.pop(mid).future
            if fut.done():
                return
            if mtype == "ack":
                fut.set_result(msg)
            else:
                fut.set_exception(FieldError(str(msg.get("code")), str(msg.get("message", ""))))
            return
        if mtype == "error":
            self.stats.error(str(msg.get("code")))
        self._deliver(msg)

    def _deliver(self, msg: Json) -> None:
        if self.on_message is not None:
            try:
                self.on_message(msg)
            except Exception:
                self.stats.error("behaviour")
                log.exception("! %s on_message failed for %s", self.responder, msg.get("type"))


# --- the behaviour ---------------------------------------------------------------------------

#: code → (weight in the report mix, propensity to fix on the spot, escalation factor).
#: Small ads and sanitation lead (as in published monthly statistics); gas leaks are rare and
#: never fixed by a grid worker alone.
CATEGORY_MIX: dict[str, tuple[float, float, float]] = {
    "illegal_small_ads": (22.0, 1.0, 0.3),
    "sanitation": (20.0, 1.0, 0.3),
    "street_vending": (10.0, 0.9, 0.6),
    "illegal_parking": (9.0, 0.8, 0.6),
    "damaged_public_facility": (7.0, 0.3, 1.5),
    "rental_housing": (6.0, 0.8, 0.8),
    "public_order_hazard": (5.0, 0.6, 1.2),
    "fire_hazard": (5.0, 0.6, 1.5),
    "dispute": (4.0, 0.5, 1.5),
    "blocked_fire_escape": (3.0, 0.8, 1.0),
    "damaged_road_facility": (3.0, 0.2, 1.5),
    "illegal_construction": (2.0, 0.1, 3.0),
    "noise": (2.0, 0.8, 0.8),
    "pollution": (1.0, 0.1, 3.0),
    "food_drug_safety": (1.0, 0.1, 3.0),
    "workplace_safety": (1.0, 0.4, 2.0),
    "traffic_accident": (1.0, 0.2, 2.0),
    "special_population": (1.0, 0.5, 1.0),
    "drug_lead": (0.3, 0.0, 4.0),
    "hospital_disturbance": (0.2, 0.0, 3.0),
    "gas_leak": (0.3, 0.0, 3.0),
}
_NAME_ZH = {c.code: c.name_zh for c in CATEGORIES}


@dataclass(frozen=True, slots=True)
class BehaviourConfig:
    """Knobs of :class:`PatrolBehaviour`. Rates are per device; durations in seconds."""

    position_interval: float = 5.0
    report_rate: Mapping[str, float] = field(
        default_factory=lambda: {"grid_worker": 1.0, "volunteer": 0.3, "department": 0.0}
    )  # reports per hour, by responder kind
    handled_share: float = 0.70  # share of grid workers' reports fixed on the spot
    volunteer_handled_factor: float = 0.5
    accept_delay: tuple[float, float] = (2.0, 12.0)
    decline_share: float = 0.10
    ignore_share: float = 0.02  # offers left to time out
    # chance that an assignee asks to escalate, at level 3 and 2 (times the category's factor):
    # with the defaults ~3.6 % of all cases reach level 2 and ~1 % the town (expected_reach)
    escalate_share: Mapping[int, float] = field(default_factory=lambda: {3: 0.12, 2: 0.20})
    on_scene: tuple[float, float] = (30.0, 180.0)
    patrol_speed: Mapping[str, float] = field(
        default_factory=lambda: {"grid_worker": 1.3, "volunteer": 1.1, "department": 8.0}
    )  # m/s
    response_speed: Mapping[str, float] = field(
        default_factory=lambda: {"grid_worker": 5.0, "volunteer": 3.0, "department": 14.0}
    )  # m/s, toward an incident (e-bike, car)
    arrive_radius: float = 30.0  # metres
    request_timeout: float = 60.0
    report_timeout: float = 600.0
    mix: Mapping[str, tuple[float, float, float]] = field(default_factory=lambda: CATEGORY_MIX)


class CategoryModel:
    """Draws report categories and turns the mix's propensities into probabilities so that the
    mix-weighted share handled on the spot equals ``handled_share`` and the mean escalation
    factor over unhandled cases is 1."""

    def __init__(self, config: BehaviourConfig, known: Iterable[str] | None = None) -> None:
        allowed = set(known) if known is not None else set(config.mix)
        mix = {c: v for c, v in config.mix.items() if c in allowed and v[0] > 0}
        if not mix:
            raise ValueError("no category of the mix is known to the server")
        self.codes = list(mix)
        self.weights = [mix[c][0] for c in self.codes]
        total = sum(self.weights)

        def mean_handled(k: float) -> float:
            pairs = zip(self.codes, self.weights, strict=True)
            return sum(w * min(0.98, mix[c][1] * k) for c, w in pairs) / total

        lo, hi = 0.0, 50.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_handled(mid) < config.handled_share else (lo, mid)
        self.handled = {c: min(0.98, mix[c][1] * lo) for c in self.codes}
        pairs = zip(self.codes, self.weights, strict=True)
        unhandled = {c: w * (1 - self.handled[c]) for c, w in pairs}
        norm = sum(u * mix[c][2] for c, u in unhandled.items()) / max(sum(unhandled.values()), 1e-9)
        self.escalate = {c: mix[c][2] / norm for c in self.codes}

    def draw(self, rng: random.Random) -> str:
        return rng.choices(self.codes, weights=self.weights)[0]

    def escalate_p(self, category: str, level: int, config: BehaviourConfig) -> float:
        """Chance that an assignee at ``level`` asks to escalate a case of ``category``."""
        return min(0.9, config.escalate_share.get(level, 0.0) * self.escalate.get(category, 1.0))

    def expected_reach(self, config: BehaviourConfig) -> tuple[float, float]:
        """Expected shares of grid workers' reports that reach level 2 and level 1 by request
        (ignores the rarer ways up: nobody eligible, everyone declined, time limits)."""
        total = sum(self.weights)
        l2 = l1 = 0.0
        for c, w in zip(self.codes, self.weights, strict=True):
            up2 = w * (1 - self.handled[c]) * self.escalate_p(c, 3, config)
            l2 += up2
            l1 += up2 * self.escalate_p(c, 2, config)
        return l2 / total, l1 / total


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """Who carries a device and where it patrols (``area`` in lon/lat)."""

    responder: str
    kind: str
    home_grid: str
    home_name: str
    area: Polygon


@dataclass(slots=True)
class _Job:
    incident: str
    lon: float
    lat: float
    level: int
    category: str
    arrived: bool = False
    done_at: float = 0.0
    finishing: bool = False


def _metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    return math.hypot((b[0] - a[0]) * M_PER_DEG_LON, (b[1] - a[1]) * M_PER_DEG_LAT)


def _random_point(rng: random.Random, area: Polygon) -> tuple[float, float]:
    minx, miny, maxx, maxy = area.bounds
    for _ in range(1000):
        x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        if shapely.contains_xy(area, x, y):
            return x, y
    p = area.representative_point()
    return p.x, p.y


class PatrolBehaviour:
    """The person behind one device (see the module docstring). Call :meth:`run` as a task with
    the client's ``run``; the client must deliver its messages to :meth:`on_message`."""

    def __init__(
        self,
        client: FieldClient,
        device: DeviceSpec,
        *,
        config: BehaviourConfig,
        model: CategoryModel,
        rng: random.Random,
    ) -> None:
        self.client = client
        self.device = device
        self.config = config
        self.model = model
        self.stats = client.stats
        self._rng = rng
        shapely.prepare(device.area)
        self.pos = _random_point(rng, device.area)
        self.waypoint = _random_point(rng, device.area)
        self.job: _Job | None = None
        self._offers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        client.on_message = self.on_message

    # -- server messages --

    def on_message(self, msg: Json) -> None:
        mtype = msg.get("type")
        if mtype == "welcome":
            for item in msg.get("assignments") or []:
                if isinstance(item, dict):
                    self._take(item)
            for item in msg.get("offers") or []:
                if isinstance(item, dict):
                    inc = item.get("incident", item)
                    if isinstance(inc, dict):
                        self._offered(inc)
        elif mtype == "offer":
            inc = msg.get("incident")
            if isinstance(inc, dict):
                self._offered(inc)
        elif mtype == "offer_revoked":
            iid = str(msg.get("incident"))
            task = self._offers.pop(iid, None)
            if task is not None:
                task.cancel()
                self.stats.revoked += 1
            job = self.job
            if job is not None and job.incident == iid:
                self.job = None
                if not job.finishing:  # not the echo of our own escalate
                    self.stats.revoked += 1
        elif mtype == "assigned":
            inc = msg.get("incident")
            if isinstance(inc, dict):
                self._take(inc)
        elif mtype == "incident":
            inc = msg.get("incident")
            if (isinstance(inc, dict) and inc.get("status") == "resolved" and inc.get("verify")
                    and inc.get("reporter") == self.device.responder
                    and inc.get("resolved_by") != self.device.responder):
                self._spawn(self._verify(str(inc.get("id"))))
            job = self.job
            if isinstance(inc, dict) and job is not None and inc.get("id") == job.incident:
                mine = inc.get("responder") == self.device.responder
                if not mine or inc.get("status") in ("resolved", "closed"):
                    self.job = None
                elif isinstance(inc.get("level"), int):
                    job.level = inc["level"]

    def _take(self, inc: Json) -> None:
        iid = str(inc.get("id"))
        if self.job is not None and self.job.incident == iid:
            return
        try:
            lon, lat = float(inc["lon"]), float(inc["lat"])
        except (KeyError, TypeError, ValueError):
            return
        level = inc.get("level")
        self.job = _Job(
            iid,
            lon,
            lat,
            level if isinstance(level, int) else 3,
            str(inc.get("category")),
            arrived=inc.get("status") == "on_scene",
        )
        if self.job.arrived:
            self.job.done_at = asyncio.get_running_loop().time() + self._rng.uniform(
                *self.config.on_scene
            )

    def _offered(self, inc: Json) -> None:
        iid = str(inc.get("id"))
        if iid in self._offers:
            return
        self.stats.offers += 1
        task = asyncio.get_running_loop().create_task(self._answer_offer(inc))
        self._offers[iid] = task
        task.add_done_callback(lambda t: self._forget_offer(iid, t))

    def _forget_offer(self, iid: str, task: asyncio.Task[None]) -> None:
        if self._offers.get(iid) is task:
            del self._offers[iid]

    # -- actions --

    async def _verify(self, iid: str) -> None:
        """The reporting grid worker checks the fix on site (核查) and closes the case."""
        await asyncio.sleep(self._rng.uniform(*self.config.on_scene))
        await self._request({"type": "close", "incident": iid, "note": "verified on site"})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, msg: Json) -> Json | None:
        """A request whose error is counted, not raised; ``None`` when it failed."""
        try:
            return await self.client.request(msg, within=self.config.request_timeout)
        except FieldError as exc:
            if exc.code == "conflict":
                self.stats.conflicts += 1
            else:
                self.stats.error(exc.code)
        except (TimeoutError, ConnectionError):
            self.stats.error("timeout")
        return None

    async def _answer_offer(self, inc: Json) -> None:
        iid = str(inc.get("id"))
        cfg = self.config
        if self.job is not None:  # busy (the server should not do this): say so at once
            if await self._request({"type": "decline", "incident": iid, "reason": "busy"}):
                self.stats.declines += 1
            return
        r = self._rng.random()
        if r < cfg.ignore_share:
            self.stats.ignored += 1
            return
        await asyncio.sleep(self._rng.uniform(*cfg.accept_delay))
        if r < cfg.ignore_share + cfg.decline_share:
            msg = {"type": "decline", "incident": iid, "reason": "正在处理其他事务"}
            if await self._request(msg):
                self.stats.declines += 1
            return
        if await self._request({"type": "accept", "incident": iid}) is not None:
            self.stats.accepts += 1
            if self.job is None or self.job.incident != iid:
                self._take(inc)

    async def _arrive(self, job: _Job) -> None:
        if await self._request({"type": "arrive", "incident": job.incident}) is not None:
            self.stats.arrivals += 1

    async def _finish(self, job: _Job) -> None:
        if self._rng.random() < self.model.escalate_p(job.category, job.level, self.config):
            msg = {"type": "escalate", "incident": job.incident, "reason": "需上级协调处置"}
            if await self._request(msg) is not None:
                self.stats.escalations += 1
        else:
            msg = {"type": "resolve", "incident": job.incident, "note": "已到场处置完毕"}
            if await self._request(msg) is not None:
                self.stats.resolves += 1
        if self.job is job:
            self.job = None

    async def _report(self) -> None:
        dev, rng = self.device, self._rng
        cat = self.model.draw(rng)
        p = self.model.handled[cat]
        if dev.kind == "volunteer":
            p *= self.config.volunteer_handled_factor
        handled = dev.kind != "department" and rng.random() < p
        lon, lat = self.pos
        for _ in range(5):  # a spot a few dozen metres away, inside the home area
            x = lon + rng.uniform(-60, 60) / M_PER_DEG_LON
            y = lat + rng.uniform(-60, 60) / M_PER_DEG_LAT
            if shapely.contains_xy(dev.area, x, y):
                lon, lat = x, y
                break
        if not shapely.contains_xy(dev.area, lon, lat):
            lon, lat = _random_point(rng, dev.area)
        msg: Json = {
            "type": "report",
            "id": self.client.next_id(),
            "category": cat,
            "lon": round(lon, 6),
            "lat": round(lat, 6),
            "description": f"{_NAME_ZH.get(cat, cat)}（{dev.home_name}，巡查发现）",
            "handled": handled,
        }
        self.stats.reports_sent += 1
        for attempt in range(6):
            try:
                await self.client.request(msg, within=self.config.report_timeout)
            except FieldError as exc:
                if exc.code in ("unavailable", "rate_limited", "internal") and attempt < 5:
                    await asyncio.sleep(2.0 * 2**attempt * rng.uniform(0.5, 1.0))
                    continue  # same id: the server will not duplicate it
                self.stats.error(exc.code)
            except (TimeoutError, ConnectionError):
                self.stats.error("timeout")
            else:
                self.stats.reports_acked += 1
                self.stats.reports_handled += handled
            return

    # -- the loop --

    def _move(self, dt: float) -> None:
        cfg, kind = self.config, self.device.kind
        if self.job is not None:
            target, speed = (self.job.lon, self.job.lat), cfg.response_speed.get(kind, 4.0)
        else:
            target, speed = self.waypoint, cfg.patrol_speed.get(kind, 1.3)
        d = _metres(self.pos, target)
        step = speed * dt * self._rng.uniform(0.7, 1.2)
        if d <= step:
            self.pos = target
            if self.job is None:
                self.waypoint = _random_point(self._rng, self.device.area)
        else:
            f = step / d
            self.pos = (
                self.pos[0] + (target[0] - self.pos[0]) * f,
                self.pos[1] + (target[1] - self.pos[1]) * f,
            )

    async def _tick(self, now: float, dt: float) -> None:
        cfg = self.config
        self._move(dt)
        if self.client.connected:
            pos: Json = {
                "type": "position",
                "lon": round(self.pos[0], 6),
                "lat": round(self.pos[1], 6),
                "accuracy": round(self._rng.uniform(4.0, 15.0), 1),
                "ts": utc_now(),
            }
            if await self.client.send(pos):
                self.stats.positions += 1
        job = self.job
        if job is not None and not job.finishing:
            if not job.arrived and _metres(self.pos, (job.lon, job.lat)) <= cfg.arrive_radius:
                job.arrived = True
                job.done_at = now + self._rng.uniform(*cfg.on_scene)
                self._spawn(self._arrive(job))
            elif job.arrived and now >= job.done_at:
                job.finishing = True
                self._spawn(self._finish(job))
        rate = cfg.report_rate.get(self.device.kind, 0.0)
        p_report = 1 - math.exp(-rate * dt / 3600)
        if rate > 0 and self.client.connected and self._rng.random() < p_report:
            self._spawn(self._report())

    async def run(self) -> None:
        """Tick every ``position_interval`` (jittered) until the client is closed."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            while not self.client.closed:
                await asyncio.sleep(self.config.position_interval * self._rng.uniform(0.8, 1.2))
                now = loop.time()
                try:
                    await self._tick(now, now - last)
                except Exception:  # task boundary: one bad tick must not stop the device
                    self.stats.error("behaviour")
                    log.exception("! %s tick failed", self.device.responder)
                last = now
        finally:
            for task in [*self._tasks, *self._offers.values()]:
                task.cancel()


# --- the fleet -------------------------------------------------------------------------------


def load_devices(
    grids_path: Path,
    roster_path: Path,
    *,
    kinds: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[DeviceSpec]:
    """Devices for the roster rows (of ``kinds``, at most ``limit``), each patrolling its home
    grid's polygon from the GeoJSON."""
    fc = json.loads(Path(grids_path).read_text(encoding="utf-8"))
    areas: dict[str, tuple[str, Polygon]] = {}
    for feat in fc["features"]:
        props = feat["properties"]
        geom = shape(feat["geometry"])
        if not isinstance(geom, Polygon):
            geom = max(shapely.get_parts(geom), key=lambda g: g.area)
        areas[str(props["id"])] = (str(props.get("name", props["id"])), geom)
    wanted = set(kinds) if kinds is not None else None
    out: list[DeviceSpec] = []
    with Path(roster_path).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if wanted is not None and row["kind"] not in wanted:
                continue
            name, area = areas[row["home_grid"]]
            out.append(DeviceSpec(row["id"], row["kind"], row["home_grid"], name, area))
            if limit is not None and len(out) >= limit:
                break
    return out


def _known_categories(path: Path) -> list[str]:
    import tomllib

    with Path(path).open("rb") as f:
        return list(tomllib.load(f).get("categories", {}))


class Fleet:
    """Many simulated devices in one event loop.

    ``async with Fleet(...) as fleet:`` (or ``await fleet.start()`` … ``await fleet.stop()``)
    connects the devices, ``connect_rate`` per second, at most ``max_handshakes`` at once.
    ``fleet.progress()`` is a one-line summary of :attr:`stats`.
    """

    def __init__(
        self,
        url: str,
        devices: Sequence[DeviceSpec],
        token_factory: TokenFactory,
        *,
        config: BehaviourConfig | None = None,
        categories: Iterable[str] | None = None,
        seed: int = 0,
        connect_rate: float = 200.0,
        max_handshakes: int = 64,
        ping_interval: float | None = 20.0,
    ) -> None:
        self.url = url
        self.devices = list(devices)
        self.config = config or BehaviourConfig()
        self.model = CategoryModel(self.config, categories)
        self.stats = FleetStats(devices=len(self.devices))
        self.clients: list[FieldClient] = []
        self._token_factory = token_factory
        self._seed = seed
        self._connect_rate = connect_rate
        self._max_handshakes = max_handshakes
        self._ping_interval = ping_interval
        self._nonce = secrets.token_hex(3)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._started_at: float | None = None

    @classmethod
    def from_files(
        cls,
        url: str,
        grids_path: Path,
        roster_path: Path,
        token_factory: TokenFactory,
        *,
        categories_path: Path | None = None,
        kinds: Iterable[str] | None = None,
        limit: int | None = None,
        **kwargs: Any,
    ) -> Fleet:
        """A fleet for the roster in the demo files (e.g. a :class:`~dispatch.sim.town.DemoTown`'s
        paths); ``categories_path`` limits reports to the categories the server knows."""
        devices = load_devices(grids_path, roster_path, kinds=kinds, limit=limit)
        cats = _known_categories(categories_path) if categories_path is not None else None
        return cls(url, devices, token_factory, categories=cats, **kwargs)

    @classmethod
    def from_demo(
        cls, url: str, town: DemoTown, token_factory: TokenFactory, **kwargs: Any
    ) -> Fleet:
        """A fleet for every responder of a generated demo town (see :meth:`from_files`)."""
        return cls.from_files(
            url,
            town.grids_path,
            town.roster_path,
            token_factory,
            categories_path=town.categories_path,
            **kwargs,
        )

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("fleet already started")
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        handshakes = asyncio.Semaphore(self._max_handshakes)
        for i, dev in enumerate(self.devices):
            rng = random.Random(f"{self._seed}:{dev.responder}")
            client = FieldClient(
                self.url,
                dev.responder,
                self._token_factory,
                stats=self.stats,
                handshakes=handshakes,
                rng=rng,
                ping_interval=self._ping_interval,
                id_prefix=f"{dev.responder}-{self._nonce}",
            )
            behaviour = PatrolBehaviour(client, dev, config=self.config, model=self.model, rng=rng)
            self.clients.append(client)
            delay = i / self._connect_rate if self._connect_rate > 0 else 0.0
            self._tasks.append(loop.create_task(self._device(client, behaviour, delay)))

    async def _device(self, client: FieldClient, behaviour: PatrolBehaviour, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        if self._stopping.is_set():
            return
        walker = asyncio.get_running_loop().create_task(behaviour.run())
        try:
            await client.run()
        finally:
            walker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await walker

    async def stop(self, grace: float = 5.0) -> None:
        """Close every connection and wait for the devices (cancelling stragglers)."""
        self._stopping.set()
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for t in late:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def run(self, duration: float | None = None) -> None:
        """Start, run for ``duration`` seconds (or until cancelled), then stop."""
        await self.start()
        try:
            if duration is None:
                await asyncio.Event().wait()
            else:
                await asyncio.sleep(duration)
        finally:
            await self.stop()

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def progress(self) -> str:
        """One line: elapsed time and the counters."""
        t = 0.0
        if self._started_at is not None:
            t = asyncio.get_running_loop().time() - self._started_at
        return f"[sim {t:6.0f}s] {self.stats.line()}"
