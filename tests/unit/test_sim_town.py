"""The demo town generator (``dispatch.sim.town``) and the simulated devices' client layer.

The town must be what PROTOCOL.md "Demo" promises (1 + 13 + 68 grids, 958 grid workers) and a
valid hierarchy by shapely's own predicates; the files must load with the project's loaders;
generation must be deterministic per seed; and the committed ``config/`` files must be what the
generator writes. The device tests run a real ``FieldClient`` against a tiny websockets server.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import random
import re
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import shapely
from shapely.geometry import Polygon, shape
from websockets.asyncio.server import ServerConnection, serve

from dispatch.sim.devices import (
    BehaviourConfig,
    CategoryModel,
    DeviceSpec,
    FieldClient,
    FieldError,
    PatrolBehaviour,
)
from dispatch.sim.link import Link, LinkClosed
from dispatch.sim.town import CATEGORIES, categories_toml, department_skills, generate_demo_town

ROOT = Path(__file__).resolve().parents[2]
DURATION = re.compile(r"[0-9]+(ms|s|m|h|d)")


@pytest.fixture(scope="module")
def town_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("town")
    generate_demo_town(out, seed=7, secret="test-secret")
    return out


@pytest.fixture(scope="module")
def features(town_dir: Path) -> dict[str, tuple[dict[str, Any], Polygon]]:
    fc = json.loads((town_dir / "grids.geojson").read_text(encoding="utf-8"))
    assert fc["type"] == "FeatureCollection"
    return {f["properties"]["id"]: (f["properties"], shape(f["geometry"])) for f in fc["features"]}


@pytest.fixture(scope="module")
def roster(town_dir: Path) -> list[dict[str, str]]:
    with (town_dir / "roster.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# --- grids -----------------------------------------------------------------------------------


def test_grid_counts_ids_and_properties(
    features: dict[str, tuple[dict[str, Any], Polygon]],
) -> None:
    levels = Counter(p["level"] for p, _ in features.values())
    assert levels == {1: 1, 2: 13, 3: 68}
    for gid, (props, _) in features.items():
        assert set(props) == {"id", "level", "parent", "name", "population"}
        assert isinstance(props["name"], str) and props["name"]
        assert isinstance(props["population"], int) and props["population"] > 0
        if props["level"] == 1:
            assert gid == "T" and props["parent"] is None
        elif props["level"] == 2:
            assert re.fullmatch(r"V\d\d", gid) and props["parent"] == "T"
            assert props["name"].endswith(("村", "社区"))
        else:
            assert re.fullmatch(r"V\d\d-G\d\d", gid) and props["parent"] == gid[:3]
            assert props["name"].startswith(features[gid[:3]][0]["name"])
    per_village = Counter(p["parent"] for p, _ in features.values() if p["level"] == 3)
    assert all(4 <= n <= 7 for n in per_village.values())
    assert 115_000 <= features["T"][0]["population"] <= 125_000


def test_town_place_and_size(features: dict[str, tuple[dict[str, Any], Polygon]]) -> None:
    town = features["T"][1]
    c = town.centroid
    assert abs(c.x - 113.19) < 0.03 and abs(c.y - 22.61) < 0.03
    minx, miny, maxx, maxy = town.bounds
    width_km = (maxx - minx) * 102.8
    height_km = (maxy - miny) * 110.7
    assert 13 < width_km < 17 and 10 < height_km < 14


def test_hierarchy_is_valid(features: dict[str, tuple[dict[str, Any], Polygon]]) -> None:
    children: dict[str, list[str]] = {}
    for gid, (props, geom) in features.items():
        assert isinstance(geom, Polygon) and geom.is_valid and not geom.is_empty, gid
        if props["parent"] is not None:
            children.setdefault(props["parent"], []).append(gid)
    assert set(children) == {"T"} | {g for g, (p, _) in features.items() if p["level"] == 2}
    for pid, kids in children.items():
        parent_props, parent = features[pid]
        geoms = [features[k][1] for k in kids]
        # children cover the parent (exactly, up to float noise) …
        union = shapely.union_all(geoms)
        assert union.symmetric_difference(parent).area <= 1e-9 * parent.area, pid
        for k, g in zip(kids, geoms, strict=True):
            assert parent.covers(g), (pid, k)
        # … siblings do not overlap and meet along shared edges …
        tree = shapely.STRtree(geoms)
        for i, g in enumerate(geoms):
            for j in tree.query(g, predicate="overlaps"):
                pytest.fail(f"{kids[i]} overlaps {kids[int(j)]}")
            for j in tree.query(g, predicate="intersects"):
                if int(j) != i:
                    assert g.intersection(geoms[int(j)]).area == 0.0
        assert bool(shapely.coverage_is_valid(geoms)), pid
        # … and populations add up
        assert sum(features[k][0]["population"] for k in kids) == parent_props["population"]


def test_coordinates_have_six_decimals(town_dir: Path) -> None:
    text = (town_dir / "grids.geojson").read_text(encoding="utf-8")
    decimals = [len(m) for m in re.findall(r"\d\.(\d+)", text)]
    assert decimals and max(decimals) <= 6
    assert (town_dir / "grids.geojson").stat().st_size < 1_000_000


def test_project_grid_loader_accepts_it(town_dir: Path) -> None:
    grids = pytest.importorskip("dispatch.geo.grids")
    assert grids.check_grids(town_dir / "grids.geojson") == []
    gridset = grids.load_grids(town_dir / "grids.geojson")
    assert len(gridset) == 82
    # a point in every basic grid locates to it
    fc = json.loads((town_dir / "grids.geojson").read_text(encoding="utf-8"))
    for f in fc["features"]:
        if f["properties"]["level"] == 3:
            p = shape(f["geometry"]).representative_point()
            located = gridset.locate(p.x, p.y)
            assert located is not None and located.g3 == f["properties"]["id"]


# --- roster, categories, config --------------------------------------------------------------


def test_roster(town_dir: Path, roster: list[dict[str, str]], features: dict[str, Any]) -> None:
    header = (town_dir / "roster.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "id,name,kind,home_grid,skills,department"
    assert len({r["id"] for r in roster}) == len(roster)
    kinds = Counter(r["kind"] for r in roster)
    assert kinds["grid_worker"] == 958
    assert kinds["department"] == 40
    assert 35 <= kinds["volunteer"] <= 45
    codes = {c.code for c in CATEGORIES}
    per_grid = Counter(r["home_grid"] for r in roster if r["kind"] == "grid_worker")
    assert len(per_grid) == 68 and min(per_grid.values()) >= 10 and max(per_grid.values()) <= 20
    for r in roster:
        level = features[r["home_grid"]][0]["level"]
        skills = set(r["skills"].split(";"))
        assert skills == {"*"} or skills <= codes, r
        if r["kind"] == "grid_worker":
            assert re.fullmatch(r"W\d{4}", r["id"]) and level == 3 and not r["department"]
        elif r["kind"] == "department":
            assert re.fullmatch(r"D-[a-z_]+-\d\d", r["id"]) and r["home_grid"] == "T"
            assert skills == set(department_skills(r["department"]))
        else:
            assert re.fullmatch(r"VOL\d{3}", r["id"]) and level == 2 and not r["department"]
            assert 3 <= len(skills) <= 5
    specialised = sum(1 for r in roster if r["kind"] == "grid_worker" and r["skills"] != "*")
    assert 0 < specialised < 0.1 * 958
    assert {r["department"] for r in roster if r["kind"] == "department"} == {
        "police", "urban_management", "fire", "market_supervision", "environment",
    }  # fmt: skip


def test_categories_table(town_dir: Path) -> None:
    table = tomllib.loads((town_dir / "categories.toml").read_text(encoding="utf-8"))["categories"]
    assert 16 <= len(table) <= 24
    groups = Counter(c["group"] for c in table.values())
    assert set(groups) == {"public_security", "fire", "traffic", "other"}
    for code, c in table.items():
        assert set(c) <= {"name", "name_zh", "group", "priority", "verify", "limits", "department"}
        assert 1 <= c["priority"] <= 4 and isinstance(c["verify"], bool), code
        assert set(c["limits"]) == {"3", "2", "1"}
        assert all(DURATION.fullmatch(v) for v in c["limits"].values()), code
    assert table["gas_leak"]["limits"] == {"3": "30m", "2": "1h", "1": "2h"}
    assert table["gas_leak"]["priority"] == 1
    assert table["fire_hazard"]["limits"] == {"3": "2h", "2": "12h", "1": "24h"}
    assert table["illegal_small_ads"]["limits"] == {"3": "24h", "2": "48h", "1": "72h"}
    assert table["dispute"]["verify"] is True


def test_project_config_loader_accepts_the_demo(town_dir: Path) -> None:
    config = pytest.importorskip("dispatch.config")
    settings = config.load_settings(town_dir / "dispatch.toml", env={})
    assert settings.server.port == 8080 and settings.dispatch.offer_timeout == 30.0
    data = config.load_data(settings)
    assert len(data.roster) == 1038 and list(data.towns) == ["T"]


def test_demo_config(town_dir: Path) -> None:
    cfg = tomllib.loads((town_dir / "dispatch.toml").read_text(encoding="utf-8"))
    assert cfg["server"] == {"host": "127.0.0.1", "port": 8080}
    assert cfg["auth"]["secret"] == "test-secret"
    assert cfg["store"]["url"] == "sqlite:///dispatch.db"
    assert cfg["data"] == {
        "grids": "grids.geojson", "roster": "roster.csv", "categories": "categories.toml",
    }  # fmt: skip
    assert cfg["dispatch"] == {
        "offer_timeout": "30s", "position_stale_after": "120s", "offline_after": "30s",
    }  # fmt: skip


def test_deterministic_per_seed(tmp_path: Path, town_dir: Path) -> None:
    again = generate_demo_town(tmp_path / "again", seed=7)
    other = generate_demo_town(tmp_path / "other", seed=8)
    for name in ("grids.geojson", "roster.csv", "categories.toml"):
        assert (again.out_dir / name).read_bytes() == (town_dir / name).read_bytes(), name
    grids = "grids.geojson"
    assert (other.out_dir / grids).read_bytes() != (town_dir / grids).read_bytes()
    assert again.grids == {1: 1, 2: 13, 3: 68}
    assert again.responders["grid_worker"] == 958
    assert again.secret != "test-secret"  # generated when not given …
    assert generate_demo_town(again.out_dir, seed=7).secret == again.secret  # … then kept


def test_committed_files_match_the_generator(town_dir: Path) -> None:
    assert (ROOT / "config" / "categories.toml").read_text(encoding="utf-8") == categories_toml()
    for name in ("grids.geojson", "roster.csv", "categories.toml"):
        committed = ROOT / "config" / "demo" / name
        assert committed.read_bytes() == (town_dir / name).read_bytes(), (
            f"{committed} is stale: python -m dispatch.sim.town config/demo"
        )


# --- devices ---------------------------------------------------------------------------------


def test_category_model_calibration() -> None:
    model = CategoryModel(BehaviourConfig(handled_share=0.7))
    total = sum(model.weights)
    handled = sum(w * model.handled[c] for c, w in zip(model.codes, model.weights, strict=True))
    assert handled / total == pytest.approx(0.7, abs=1e-6)
    assert model.handled["gas_leak"] == 0.0 and model.handled["illegal_small_ads"] > 0.8
    assert max(model.weights) == model.weights[model.codes.index("illegal_small_ads")]
    l2, l1 = model.expected_reach(BehaviourConfig())
    assert 0.008 <= l1 <= 0.012 and 0.02 <= l2 <= 0.06  # ~99 % close at levels 3-2
    only = CategoryModel(BehaviourConfig(), known=["sanitation", "dispute"])
    assert set(only.codes) == {"sanitation", "dispute"}


Handler = Callable[[ServerConnection, list[dict[str, Any]]], Any]


@contextlib.asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def handle(ws: ServerConnection) -> None:
        await handler(ws, seen)

    async with serve(handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws/field", seen


async def _hello(ws: ServerConnection, seen: list[dict[str, Any]], **welcome: Any) -> None:
    msg = json.loads(await ws.recv())
    seen.append(msg)
    assert msg["type"] == "hello" and msg["token"] == "tok:W0001"
    await ws.send(json.dumps({"type": "welcome", "responder": {"id": "W0001"},
                              "server_time": "2026-01-01T00:00:00.000Z",
                              "offers": [], "assignments": [], **welcome}))  # fmt: skip


async def test_field_client_resends_unacked_request_with_the_same_id() -> None:
    connections = 0

    async def handler(ws: ServerConnection, seen: list[dict[str, Any]]) -> None:
        nonlocal connections
        connections += 1
        await _hello(ws, seen)
        msg = json.loads(await ws.recv())
        seen.append(msg)
        if connections == 1:  # recorded, then the connection drops before the ack
            await ws.close(1011, "gone")
            return
        await ws.send(json.dumps({"type": "ack", "id": msg["id"], "incident": "T-000001"}))
        await ws.send(json.dumps({"type": "error", "code": "bad_message", "message": "x"}))
        await ws.wait_closed()

    async with _server(handler) as (url, seen):
        client = FieldClient(url, "W0001", lambda rid: f"tok:{rid}", backoff=(0.01, 0.05))
        runner = asyncio.create_task(client.run())
        ack = await client.request({"type": "report", "category": "sanitation",
                                    "lon": 113.19, "lat": 22.61}, within=5)  # fmt: skip
        assert ack["incident"] == "T-000001"
        reports = [m for m in seen if m["type"] == "report"]
        hellos = [m for m in seen if m["type"] == "hello"]
        assert len(reports) == 2 and reports[0]["id"] == reports[1]["id"]
        assert "resume" not in hellos[0] and hellos[1]["resume"] is True
        await asyncio.sleep(0.05)
        assert client.stats.error_codes["bad_message"] == 1
        await client.close()
        await asyncio.wait_for(runner, 5)
        assert client.stats.connected == 0 and client.stats.connects == 2


async def test_field_client_error_answer_and_forbidden_close() -> None:
    async def handler(ws: ServerConnection, seen: list[dict[str, Any]]) -> None:
        await _hello(ws, seen)
        msg = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "error", "id": msg["id"], "code": "conflict",
                                  "message": "The offer is gone."}))  # fmt: skip
        await ws.recv()
        await ws.close(4403, "not in roster")

    async with _server(handler) as (url, _):
        client = FieldClient(url, "W0001", lambda rid: f"tok:{rid}", backoff=(0.01, 0.05))
        runner = asyncio.create_task(client.run())
        with pytest.raises(FieldError) as err:
            await client.request({"type": "accept", "incident": "T-1"}, within=5)
        assert err.value.code == "conflict"
        await client.send({"type": "position", "lon": 113.19, "lat": 22.61})
        await asyncio.wait_for(runner, 5)  # 4403: gives up by itself
        assert client.fatal is not None and client.closed


async def test_patrol_behaviour_accepts_arrives_and_resolves() -> None:
    area = shapely.box(113.189, 22.609, 113.191, 22.611)
    done = asyncio.Event()

    async def handler(ws: ServerConnection, seen: list[dict[str, Any]]) -> None:
        await _hello(ws, seen)
        sent_offer = False
        async for raw in ws:
            msg = json.loads(raw)
            seen.append(msg)
            if msg["type"] == "position" and not sent_offer:
                sent_offer = True
                inc = {"id": "T-000007", "category": "sanitation", "level": 3,
                       "lon": msg["lon"], "lat": msg["lat"], "status": "offered",
                       "responder": "W0001"}  # fmt: skip
                await ws.send(json.dumps({"type": "offer", "incident": inc, "expires_at": "x"}))
            elif "id" in msg:
                await ws.send(json.dumps({"type": "ack", "id": msg["id"]}))
                if msg["type"] == "resolve":
                    done.set()

    cfg = BehaviourConfig(
        position_interval=0.02, report_rate={}, accept_delay=(0.01, 0.02), decline_share=0.0,
        ignore_share=0.0, escalate_share={}, on_scene=(0.01, 0.02),
    )  # fmt: skip
    async with _server(handler) as (url, seen):
        client = FieldClient(url, "W0001", lambda rid: f"tok:{rid}")
        device = DeviceSpec("W0001", "grid_worker", "V01-G01", "新联社区第1网格", area)
        behaviour = PatrolBehaviour(
            client, device, config=cfg, model=CategoryModel(cfg), rng=random.Random(1)
        )
        tasks = [asyncio.create_task(client.run()), asyncio.create_task(behaviour.run())]
        await asyncio.wait_for(done.wait(), 5)
        await client.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        types = [m["type"] for m in seen if m["type"] not in ("position", "hello")]
        assert types == ["accept", "arrive", "resolve"]
        assert all(m["incident"] == "T-000007" for m in seen if m["type"] in types)
        positions = [m for m in seen if m["type"] == "position"]
        assert all(shapely.contains_xy(area, m["lon"], m["lat"]) for m in positions)
        s = client.stats
        assert (s.offers, s.accepts, s.arrivals, s.resolves) == (1, 1, 1, 1)


# -- the devices' websocket link -------------------------------------------------------------


async def test_link_reassembles_fragments_and_reports_the_close_code() -> None:
    got: list[bytes] = []

    async def handler(ws: ServerConnection, seen: list[dict[str, Any]]) -> None:
        await ws.send(["{\"part\": ", "1}"])  # one message in two frames
        await ws.send("{\"part\": 2}")
        await ws.close(4008, "too slow")

    async with _server(handler) as (url, _):
        link = await Link.open(url, lambda data: got.append(bytes(data)), open_timeout=5)
        await asyncio.wait_for(link.closed, 5)
    assert got == [b'{"part": 1}', b'{"part": 2}']
    assert link.close_code == 4008
    with pytest.raises(LinkClosed):
        link.send_text(b"{}")


async def test_link_gives_up_on_a_server_that_stops_answering_pings() -> None:
    async def handler(ws: ServerConnection, seen: list[dict[str, Any]]) -> None:
        await ws.wait_closed()

    async with _server(handler) as (url, _):
        link = await Link.open(url, lambda data: None, ping_interval=0.05, ping_timeout=0.1)
        # websockets' server answers pings by itself: the link stays up while it does
        await asyncio.sleep(0.3)
        assert not link.closed.done()
        link.proto.receive_data = lambda data: None  # type: ignore[method-assign]  # pongs lost
        await asyncio.wait_for(link.closed, 5)
    assert link.close_code == 1006


async def test_link_open_raises_on_an_http_refusal() -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    def refuse(conn: Any, request: Any) -> Response:
        return conn.respond(403, "no\n")  # type: ignore[no-any-return]

    async def never(ws: ServerConnection) -> None:
        pass

    async with serve(never, "127.0.0.1", 0, process_request=refuse) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(InvalidStatus):
            await Link.open(f"ws://127.0.0.1:{port}/ws/field", lambda data: None)
