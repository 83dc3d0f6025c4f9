"""The wall screen (static/) in a real browser against the real server.

Headless Debian Chromium (/usr/bin/chromium) driven by Playwright's sync API; never
`playwright install`. Uses the lead's fixtures from tests/e2e/conftest.py:

* ``server``: ``dispatch serve`` on a free port with the conformance-like small town, with
  ``server.http`` ("http://127.0.0.1:PORT"), ``server.ws`` ("ws://127.0.0.1:PORT"),
  ``server.token(role, sub, scope)`` → JWT, and ``server.stop()`` / ``server.start()`` (same port,
  same store) for the restart test.

The page has a Content-Security-Policy without 'unsafe-eval', so Playwright's
``wait_for_function`` (which evals a string in the page) is refused; these tests poll with
``page.evaluate`` instead (that goes through the DevTools protocol, not the page's eval).

Set DISPATCH_SCREENSHOT_DIR to also save screenshots of the town and a village screen.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
VIEWPORT = {"width": 1920, "height": 1080}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

# Tried in order when the responder's skills are "*" and the server publishes no category table.
FALLBACK_CATEGORIES = [
    "fire_hazard",
    "sanitation",
    "illegal_parking",
    "public_order",
    "dispute",
    "street_vending",
    "illegal_ads",
    "rental_housing",
    "gas_leak",
    "traffic_accident",
]


# --- helpers -------------------------------------------------------------------------------------


def _base(server: Any) -> str:
    return str(server.http).rstrip("/")


def _ws_url(server: Any, path: str) -> str:
    ws = str(getattr(server, "ws", "") or _base(server).replace("http", "ws", 1)).rstrip("/")
    for known in ("/ws/field", "/ws/screen"):
        if ws.endswith(known):
            ws = ws[: -len(known)]
    return ws + path


def _get(server: Any, path: str, token: str) -> Any:
    req = urllib.request.Request(_base(server) + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as res:
        return json.loads(res.read().decode())


def _wait(page: Any, expr: str, timeout: float = 10.0, what: str = "") -> Any:
    """Poll a JS expression until truthy (no wait_for_function: the page's CSP forbids eval)."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = page.evaluate(expr)
        except Exception as exc:  # the page navigated away under the poll (a sign-in redirect)
            if "context was destroyed" not in str(exc):
                raise
            last = None
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or expr} (last: {last!r})")


# Counts non-transparent samples on a canvas (every 4th pixel).
PAINTED = """(sel) => {
  const c = document.querySelector(sel);
  if (!c) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let k = 0;
  for (let i = 3; i < d.length; i += 16) if (d[i] > 0) k++;
  return k;
}"""


def _state(page: Any) -> dict[str, Any]:
    return dict(page.evaluate("window.__dispatchState || {}"))


class Town:
    """What the tests need to know about the running town, read over REST with an admin token."""

    def __init__(self, server: Any) -> None:
        self.admin = server.token("admin", "e2e-admin", None)
        self.grids = _get(server, "/api/grids", self.admin)
        feats = self.grids["features"]
        self.features = {f["properties"]["id"]: f for f in feats}
        self.town_id = next(
            f["properties"]["id"] for f in feats if int(f["properties"]["level"]) == 1
        )
        self.villages = [f["properties"]["id"] for f in feats if int(f["properties"]["level"]) == 2]
        data = _get(server, "/api/responders", self.admin)
        self.responders = data if isinstance(data, list) else (data.get("items") or data.get("responders") or [])
        try:
            stats = _get(server, "/api/stats", self.admin)
            self.categories = list((stats.get("categories") or {}).keys())
        except (urllib.error.URLError, ValueError):
            self.categories = []

    def grid_workers(self) -> list[dict[str, Any]]:
        out = [r for r in self.responders if r.get("kind") == "grid_worker"]
        out.sort(key=lambda r: str(r["id"]))
        return out

    def point_in(self, grid_id: str) -> tuple[float, float]:
        from shapely.geometry import shape

        p = shape(self.features[grid_id]["geometry"]).representative_point()
        return float(p.x), float(p.y)

    def categories_for(self, responder: dict[str, Any]) -> list[str]:
        skills = [s for s in responder.get("skills") or [] if s != "*"]
        if skills:
            return skills
        return self.categories or FALLBACK_CATEGORIES


class Field:
    """A field device on /ws/field (websockets' sync client)."""

    def __init__(self, server: Any, responder_id: str) -> None:
        from websockets.sync.client import connect

        self.id = responder_id
        self.ws = connect(_ws_url(server, "/ws/field"), open_timeout=10).__enter__()
        self.inbox: list[dict[str, Any]] = []
        self.send({"type": "hello", "token": server.token("field", responder_id, None)})
        self.welcome = self.wait(lambda m: m.get("type") == "welcome", 10)

    def send(self, msg: dict[str, Any]) -> None:
        self.ws.send(json.dumps(msg))

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        for m in self.inbox:
            if pred(m):
                self.inbox.remove(m)
                return m
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                raw = self.ws.recv(timeout=left)
            except TimeoutError:
                break
            m = json.loads(raw)
            if pred(m):
                return m
            self.inbox.append(m)
        raise AssertionError(
            f"{self.id}: no matching message within {timeout}s; got {self.inbox[-5:]}"
        )

    def position(self, lon: float, lat: float) -> None:
        self.send({"type": "position", "lon": lon, "lat": lat, "accuracy": 5})

    def report(self, categories: list[str], lon: float, lat: float, **extra: Any) -> str:
        """Report with the first category the server knows; returns the incident id."""
        for cat in categories:
            rid = str(uuid.uuid4())
            self.send(
                {
                    "type": "report",
                    "id": rid,
                    "category": cat,
                    "lon": lon,
                    "lat": lat,
                    "description": "e2e",
                    **extra,
                }
            )
            ans = self.wait(
                lambda m, rid=rid: m.get("id") == rid and m.get("type") in ("ack", "error")
            )
            if ans["type"] == "ack":
                return str(ans["incident"])
            if ans.get("code") != "unknown_category":
                raise AssertionError(f"report refused: {ans}")
        raise AssertionError(f"no category accepted among {categories}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def town(server: Any) -> Town:
    return Town(server)


@pytest.fixture
def fields() -> Iterator[list[Field]]:
    opened: list[Field] = []
    yield opened
    for f in opened:
        f.close()


class Screen:
    def __init__(self, page: Any, requests: list[str]) -> None:
        self.page = page
        self.requests = requests


@pytest.fixture
def open_screen(browser: Any, server: Any) -> Iterator[Callable[..., Screen]]:
    contexts: list[Any] = []

    def _open(token: str, scope: str | None = None, lang: str | None = None) -> Screen:
        ctx = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        contexts.append(ctx)
        page = ctx.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.on("websocket", lambda w: requests.append(w.url))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        query = urllib.parse.urlencode(
            {k: v for k, v in {"scope": scope, "lang": lang}.items() if v}
        )
        page.goto(f"{_base(server)}/{'?' + query if query else ''}#token={token}")
        _wait(
            page,
            "window.__dispatchState && window.__dispatchState.connected"
            " && window.__dispatchState.lastSeq != null && window.__dispatchState.grids > 0",
            15,
            "the screen to connect, take its snapshot and load the grids",
        )
        assert not errors, errors
        return Screen(page, requests)

    yield _open
    for c in contexts:
        c.close()


def _shot(page: Any, name: str) -> None:
    d = os.environ.get("DISPATCH_SCREENSHOT_DIR")
    if d:
        time.sleep(1.5)  # let positions and panels settle
        page.screenshot(path=os.path.join(d, name))


# --- tests ---------------------------------------------------------------------------------------


def test_page_loads_with_nothing_leaving_localhost(
    server: Any, town: Town, open_screen: Any
) -> None:
    token = server.token("operator", "e2e-op", town.town_id)
    screen = open_screen(token)
    page = screen.page
    time.sleep(1.0)  # a little steady-state traffic (positions, stats, panel renders)
    assert screen.requests, "no request recorded at all"
    for url in screen.requests:
        u = urllib.parse.urlparse(url)
        if u.scheme in ("data", "blob", "about"):
            continue
        assert u.hostname in LOCAL_HOSTS, f"request left 127.0.0.1: {url}"
        assert token not in url, f"the token travelled in a URL: {url}"
    # the token is gone from the address bar, kept in sessionStorage
    assert token not in page.url
    assert page.evaluate("sessionStorage.getItem('dispatch.token')") == token
    assert page.locator("#banner").is_hidden()
    _shot(page, "screen-town.png")


def test_grids_are_drawn(server: Any, town: Town, open_screen: Any) -> None:
    screen = open_screen(server.token("operator", "e2e-op", town.town_id))
    page = screen.page
    n = {
        lvl: sum(1 for f in town.grids["features"] if int(f["properties"]["level"]) == lvl)
        for lvl in (1, 2, 3)
    }
    assert _state(page)["grids"] == sum(n.values())
    drawn = page.evaluate(
        "(() => { const l = window.__dispatch.map.layers;"
        " return {1: l.l1.getLayers().length, 2: l.l2.getLayers().length,"
        " 3: l.l3.getLayers().length}; })()"
    )
    assert drawn == {"1": n[1], "2": n[2], "3": n[3]}
    # Leaflet's canvas renderer really painted them: many non-transparent pixels
    painted = page.evaluate(PAINTED, "#map .leaflet-overlay-pane canvas")
    assert painted > 1000, f"grid canvas looks empty ({painted} painted samples)"
    # and the names are written on the label canvas (the top one of the overlay), which is
    # painted on a later animation frame than the grids
    deadline = time.monotonic() + 5
    while page.evaluate(PAINTED, "#map .dispatch-overlay canvas:last-child") <= 50:
        assert time.monotonic() < deadline, "no grid labels drawn"
        time.sleep(0.1)
    if town.villages:
        village = sorted(town.villages)[0]
        vscreen = open_screen(server.token("operator", "e2e-op-v", village), scope=village)
        _wait(
            vscreen.page,
            f"window.__dispatchState.scope === {json.dumps(village)}",
            5,
            "the village scope",
        )
        _shot(vscreen.page, "screen-village.png")


def test_reported_incident_appears_within_one_second(
    server: Any, town: Town, open_screen: Any, fields: list[Field]
) -> None:
    screen = open_screen(server.token("operator", "e2e-op", town.town_id))
    page = screen.page
    worker = town.grid_workers()[0]
    lon, lat = town.point_in(worker["home_grid"])
    f = Field(server, worker["id"])
    fields.append(f)
    f.position(lon, lat)
    t0 = time.monotonic()
    iid = f.report(town.categories_for(worker), lon, lat)
    sel = json.dumps(f'#ticker [data-incident="{iid}"]')
    _wait(
        page,
        f"!!window.__dispatch.store.incident({json.dumps(iid)}) && !!document.querySelector({sel})",
        2.0,
        "the new incident on the screen",
    )
    elapsed = time.monotonic() - t0
    assert elapsed <= 1.0, f"the incident took {elapsed:.2f}s to appear on the screen"
    # drawn on the map, at a point inside the map
    pt = page.evaluate(f"window.__dispatch.incidentPoint({json.dumps(iid)})")
    size = page.evaluate(
        "(() => { const s = window.__dispatch.map.map.getSize(); return [s.x, s.y]; })()"
    )
    assert pt and 0 <= pt["x"] <= size[0] and 0 <= pt["y"] <= size[1]
    # no event is shown twice
    seqs = page.evaluate(
        "[...document.querySelectorAll('#ticker [data-seq]')].map(e => e.dataset.seq)"
    )
    assert len(seqs) == len(set(seqs))


def test_village_screen_applies_live_events_between_other_villages_events(
    server: Any, town: Town, open_screen: Any, fields: list[Field]
) -> None:
    """A village screen sees the town's seqs with holes (other villages' events): it must apply
    each of its own events live, without taking the holes for gaps and resyncing."""
    parent = {gid: f["properties"]["parent"] for gid, f in town.features.items()}
    workers = town.grid_workers()
    village = parent[workers[0]["home_grid"]]
    inside = workers[0]
    outside = next(w for w in workers if parent[w["home_grid"]] != village)
    page = open_screen(server.token("operator", "e2e-op-v", village), scope=village).page
    before = _state(page)
    for w in (outside, inside, outside, inside):
        f = Field(server, w["id"])
        fields.append(f)
        lon, lat = town.point_in(w["home_grid"])
        f.position(lon, lat)
        iid = f.report(town.categories_for(w), lon, lat)
        if w is inside:
            _wait(
                page,
                f"!!window.__dispatch.store.incident({json.dumps(iid)})",
                2.0,
                "the village's new incident on its screen",
            )
    after = _state(page)
    assert after["events"] > before["events"]
    assert after["gaps"] == before["gaps"] == 0, after
    assert after["snapshots"] == before["snapshots"] and after["reconnects"] == 0, after


def test_escalation_queue_puts_what_the_town_must_do_first(
    server: Any, town: Town, open_screen: Any
) -> None:
    page = open_screen(server.token("operator", "e2e-op", town.town_id)).page
    order = page.evaluate(
        """import('/static/state.js').then(({ escalationQueue }) => {
          const inc = (id, level, extra) => [id, { id, level, priority: 3,
            reported_at: '2026-11-22T01:00:00.000Z', deadline: '2026-11-22T09:00:00.000Z',
            ...extra }];
          const store = { incidents: new Map([
            inc('old-village', 2, { reported_at: '2026-11-21T01:00:00.000Z' }),
            inc('town', 1, {}),
            inc('town-urgent', 1, { priority: 1 }),
            inc('village-overdue', 2, { overdue: true }),
            inc('basic', 3, {}),
          ]) };
          return escalationQueue(store).map((i) => i.id);
        })"""
    )
    assert order == ["village-overdue", "town-urgent", "town", "old-village"]


def test_server_errors_read_in_the_screens_language(
    server: Any, town: Town, open_screen: Any
) -> None:
    token = server.token("operator", "e2e-op", town.town_id)
    probe = "import('/static/i18n.js').then((m) => m.errorText('conflict', 'Incident T-1 moved.'))"
    zh = open_screen(token).page.evaluate(probe)
    en = open_screen(token, lang="en").page.evaluate(probe)
    assert zh == "案件状态已变化，请刷新后重试"
    assert en == "the case has changed meanwhile: Incident T-1 moved."


def test_clock_shows_the_statistics_day_not_the_browsers_zone(
    server: Any, town: Town, open_screen: Any
) -> None:
    """The headless browser runs in the machine's zone (UTC here); the page shows China time, the
    zone whose calendar day the 'today' figures count."""
    page = open_screen(server.token("operator", "e2e-op", town.town_id)).page
    shown = page.evaluate(
        "import('/static/i18n.js').then((m) => m.hms(Date.UTC(2026, 10, 21, 23, 30, 5)))"
    )
    assert shown == "07:30:05"


def test_a_scope_outside_the_token_keeps_the_token(
    server: Any, town: Town, browser: Any
) -> None:
    """Asking for a scope the token does not cover is refused (4403), and the sign-in form comes
    back with the token still filled in and the token's own scope, ready to go again."""
    mine, other = sorted(town.villages)[:2]
    token = server.token("operator", "e2e-op-v", mine)
    ctx = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    try:
        page = ctx.new_page()
        page.goto(f"{_base(server)}/?scope={other}#token={token}")
        _wait(page, "!document.getElementById('signin').hidden", 10, "the sign-in form")
        assert page.input_value("#signin-token") == token
        assert page.input_value("#signin-scope") == mine
        page.click("#signin-go")
        _wait(
            page,
            f"window.__dispatchState && window.__dispatchState.connected"
            f" && window.__dispatchState.scope === {json.dumps(mine)}",
            10,
            "the screen of the token's own village",
        )
    finally:
        ctx.close()


def test_operator_assigns_from_the_screen(
    server: Any, town: Town, open_screen: Any, fields: list[Field]
) -> None:
    page = open_screen(server.token("operator", "e2e-op", town.town_id)).page
    worker = town.grid_workers()[1 % len(town.grid_workers())]
    lon, lat = town.point_in(worker["home_grid"])
    f = Field(server, worker["id"])
    fields.append(f)
    f.position(lon, lat)
    f.send({"type": "status", "id": str(uuid.uuid4()), "status": "available"})
    iid = f.report(town.categories_for(worker), lon, lat)

    # The worker turns down every automatic offer of this case, so it climbs to the town and waits
    # there for an operator; then the operator assigns it to this worker from the screen.
    js_inc = f"window.__dispatch.store.incident({json.dumps(iid)})"
    end = time.monotonic() + 30
    last_offer = time.monotonic()
    while time.monotonic() < end:
        try:
            f.wait(
                lambda m: m.get("type") == "offer" and (m.get("incident") or {}).get("id") == iid,
                0.3,
            )
        except AssertionError:
            st = page.evaluate(f"(() => {{ const i = {js_inc}; return i && i.status; }})()")
            if st == "new" and time.monotonic() - last_offer > 1.5:
                break
            continue
        last_offer = time.monotonic()
        f.send({"type": "decline", "id": str(uuid.uuid4()), "incident": iid, "reason": "e2e"})
    else:
        raise AssertionError("the incident never came to rest waiting for an operator")

    # open its card by clicking it on the map
    pt = page.evaluate(f"window.__dispatch.incidentPoint({json.dumps(iid)})")
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + pt["x"], box["y"] + pt["y"])
    _wait(page, f"window.__dispatch.card.id === {json.dumps(iid)}", 3, "the incident card")
    _wait(
        page,
        f"""(() => {{ const p = window.__dispatch.incidentPoint({json.dumps(iid)});
            const c = document.getElementById('card').getBoundingClientRect();
            const m = document.getElementById('map').getBoundingClientRect();
            return !!p && m.left + p.x < c.left; }})()""",
        3,
        "the map to keep the incident in view beside its card",
    )
    _wait(
        page,
        "document.querySelectorAll('#card .timeline li:not(.muted)').length > 0",
        5,
        "the timeline",
    )

    cand = f'#dialog .cand[data-responder="{worker["id"]}"]'

    def open_assign() -> bool:
        page.click("#card [data-action=assign]")
        _wait(
            page,
            "!!document.querySelector('#dialog .cand, #dialog .empty')",
            5,
            "the candidate list",
        )
        return page.locator(cand).count() > 0

    if not open_assign():
        # The server's /candidates left the worker out (it declined this case); use the screen's own
        # nearest-available list, which is what the page falls back to when that endpoint is absent.
        page.keyboard.press("Escape")
        page.route(
            "**/api/incidents/*/candidates", lambda route: route.fulfill(status=404, body="")
        )
        assert open_assign(), "the worker is not offered in the assign dialog"
    page.click(cand)
    _wait(page, "!!document.querySelector('.toast.ok')", 5, "the ack toast")
    msg = f.wait(
        lambda m: m.get("type") == "assigned" and (m.get("incident") or {}).get("id") == iid, 5
    )
    assert msg["incident"]["responder"] == worker["id"]
    _wait(
        page,
        f"{js_inc}.status === 'assigned' && {js_inc}.responder === {json.dumps(worker['id'])}",
        3,
        "the screen to show the assignment",
    )
    # the transfer dialog offers exactly the departments the town's roster has
    page.click("#card [data-action=transfer]")
    _wait(page, "!!document.querySelector('#dialog .dept')", 5, "the department list")
    offered = page.evaluate(
        "[...document.querySelectorAll('#dialog .dept')].map(b => b.dataset.department)"
    )
    roster = {r["department"] for r in town.responders if r.get("department")}
    assert roster and sorted(offered) == sorted(roster), (offered, roster)
    page.keyboard.press("Escape")


def test_banner_while_down_and_catch_up_after_restart(
    server: Any, town: Town, open_screen: Any, fields: list[Field]
) -> None:
    if not (hasattr(server, "stop") and hasattr(server, "start")):
        pytest.skip("the server fixture cannot stop and start the server")
    page = open_screen(server.token("operator", "e2e-op", town.town_id)).page
    page.evaluate("window.__e2eMarker = 42")
    worker = town.grid_workers()[2 % len(town.grid_workers())]
    lon, lat = town.point_in(worker["home_grid"])
    f = Field(server, worker["id"])
    fields.append(f)
    f.position(lon, lat)
    before = f.report(town.categories_for(worker), lon, lat)
    _wait(
        page, f"!!window.__dispatch.store.incident({json.dumps(before)})", 2, "the first incident"
    )
    f.close()

    server.stop()
    _wait(page, "!window.__dispatchState.connected", 5, "the screen to notice the server is gone")
    _wait(page, "!document.getElementById('banner').hidden", 3, "the disconnected banner")
    text = page.locator("#banner").inner_text()
    assert "连接中断" in text or "Disconnected" in text
    time.sleep(2.0)  # stays down a while; the screen keeps retrying and keeps the banner
    assert page.locator("#banner").is_visible()

    server.start()
    # report straight away, likely before the screen's next retry: it must catch up with `since`
    f2 = Field(server, worker["id"])
    fields.append(f2)
    f2.position(lon, lat)
    after = f2.report(town.categories_for(worker), lon, lat)
    _wait(
        page,
        "window.__dispatchState.connected && document.getElementById('banner').hidden",
        12,
        "the screen to reconnect (backoff is at most 5 s)",
    )
    _wait(
        page,
        f"!!window.__dispatch.store.incident({json.dumps(after)})",
        5,
        "the incident reported after the restart",
    )
    assert page.evaluate(f"!!window.__dispatch.store.incident({json.dumps(before)})"), (
        "lost the earlier incident"
    )
    assert page.evaluate("window.__e2eMarker") == 42, "the page reloaded instead of reconnecting"

    # The screen's seq agrees with a fresh snapshot's, and nothing is shown twice.
    from websockets.sync.client import connect

    with connect(_ws_url(server, "/ws/screen"), open_timeout=10) as ws:
        ws.send(
            json.dumps(
                {"type": "hello", "token": server.token("operator", "e2e-probe", town.town_id)}
            )
        )
        snap = next(
            m
            for m in (json.loads(ws.recv(timeout=10)) for _ in range(50))
            if m.get("type") == "snapshot"
        )
    _wait(
        page,
        f"window.__dispatchState.lastSeq >= {int(snap['seq'])}",
        5,
        "the screen to reach the server's seq",
    )
    seq, screen_ids = page.evaluate(
        "[window.__dispatchState.lastSeq, [...window.__dispatch.store.incidents.keys()]]"
    )
    if seq == snap["seq"]:  # nothing happened since the probe's snapshot: same open incidents
        assert sorted(screen_ids) == sorted(i["id"] for i in snap["incidents"])
    seqs = page.evaluate(
        "[...document.querySelectorAll('#ticker [data-seq]')].map(e => e.dataset.seq)"
    )
    assert len(seqs) == len(set(seqs)), "an event is shown twice in the ticker"
