"""The dispatch core end to end: a real server process, real websocket clients, real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import (
    Client,
    ServerProcess,
    event_is,
    field,
    offer_for,
    screen,
    token,
)

V1A = (113.006, 22.606)
V1B = (113.006, 22.636)
V2B = (113.03, 22.63)


async def report(
    c: Client, category: str = "fire_hazard", pos: tuple[float, float] = V1A, **kw: object
) -> str:
    ack = await c.request(
        {"type": "report", "category": category, "lon": pos[0], "lat": pos[1], **kw}
    )
    assert ack["type"] == "ack", ack
    return str(ack["incident"])


async def test_full_lifecycle_with_timeline(server: ServerProcess) -> None:
    scr = await screen(server)
    await scr.wait_for(lambda m: m["type"] == "snapshot")
    w1 = await field(server, "w1", (113.005, 22.605))
    w2 = await field(server, "w2", (113.015, 22.615))
    w3 = await field(server, "w3", V1B)
    await asyncio.sleep(0.2)
    inc = await report(w3, description="smoke")
    offer = await w1.wait_for(offer_for(inc), what="offer to nearest w1")
    assert offer["incident"]["grids"] == {"3": "V1A", "2": "V1", "1": "T0"}
    assert offer["expires_at"].endswith("Z")
    assert (await w1.request({"type": "decline", "incident": inc}))["type"] == "ack"
    await w2.wait_for(offer_for(inc), what="offer passed on to w2")
    assert (await w2.request({"type": "accept", "incident": inc}))["type"] == "ack"
    # w1 declined: accepting now is a conflict
    late = await w1.request({"type": "accept", "incident": inc})
    assert late["type"] == "error" and late["code"] == "conflict", late
    assert (await w2.request({"type": "arrive", "incident": inc}))["type"] == "ack"
    assert (await w2.request({"type": "resolve", "incident": inc}))["type"] == "ack"
    await scr.wait_for(event_is("incident.closed", inc))
    await w3.wait_for(
        lambda m: m["type"] == "incident" and m["incident"]["status"] == "closed",
        what="reporter told of the closure",
    )
    st, _, doc = server.get(f"/api/incidents/{inc}", token("admin", "a"))
    assert st == 200 and doc["status"] == "closed" and doc["on_time"] is True
    types = [e["type"] for e in doc["timeline"]]
    assert types == [
        "incident.reported",
        "incident.offered",
        "incident.declined",
        "incident.offered",
        "incident.assigned",
        "incident.arrived",
        "incident.resolved",
        "incident.closed",
    ]
    # the screen saw every event in seq order with no gap
    seqs = [m["seq"] for m in scr.seen if m["type"] == "event"]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_kill9_after_ack_loses_nothing(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path)
    srv.start()
    try:
        w1 = await field(srv, "w1", (113.005, 22.605))
        await asyncio.sleep(0.2)
        inc = await report(w1, category="sanitation")
        await w1.wait_for(offer_for(inc))
        ack = await w1.request({"type": "accept", "incident": inc})
        assert ack["type"] == "ack"
        srv.kill9()
        await w1.closed()
        srv.start()
        w1 = await field(srv, "w1")
        welcome = next(m for m in w1.seen if m["type"] == "welcome")
        assert [a["id"] for a in welcome["assignments"]] == [inc]
        assert welcome["assignments"][0]["status"] == "assigned"
        assert welcome["responder"]["status"] == "assigned"
        st, _, doc = srv.get(f"/api/incidents/{inc}", token("admin", "a"))
        assert st == 200 and doc["responder"] == "w1" and doc["status"] == "assigned"
        # and the work goes on after the restart
        assert (await w1.request({"type": "resolve", "incident": inc}))["type"] == "ack"
    finally:
        srv.stop()


async def test_bad_input_each_gets_its_code_and_the_connection_survives(
    server: ServerProcess,
) -> None:
    c = await field(server, "w5", V1B)
    await c.send("{not json")
    m = await c.wait_for(lambda m: m["type"] == "error")
    assert m["code"] == "bad_json" and "JSON" in m["message"]
    cases = [
        ({"type": "no_such_thing"}, "unknown_type", "no_such_thing"),
        (
            {"type": "report", "category": "fire_hazard", "lon": "east", "lat": 22.61},
            "bad_message",
            "lon",
        ),
        ({"type": "report", "category": "fire_hazard", "lat": 22.61}, "bad_message", "lon"),
        (
            {
                "type": "report",
                "category": "fire_hazard",
                "lon": 113.01,
                "lat": 22.61,
                "priority": 9,
            },
            "bad_message",
            "priority",
        ),
        (
            {"type": "report", "category": "fire_hazard", "lon": 114.5, "lat": 23.5},
            "outside_area",
            "114.5",
        ),
        (
            {"type": "report", "category": "nope", "lon": 113.01, "lat": 22.61},
            "unknown_category",
            "nope",
        ),
        ({"type": "accept", "incident": "T0-999999"}, "not_found", "T0-999999"),
        ({"type": "assign", "incident": "x", "responder": "w1"}, "unknown_type", "assign"),
    ]
    for msg, code, mentions in cases:
        r = await c.request(dict(msg))
        assert r["type"] == "error" and r["code"] == code, (msg, r)
        assert mentions in r["message"], (mentions, r["message"])
    await c.send(json.dumps([1, 2, 3]))
    m = await c.wait_for(lambda m: m["type"] == "error")
    assert m["code"] == "bad_message"
    # a position (no id) whose time is not RFC 3339 is refused by name, and dropped alone
    for bad in (
        {"type": "position", "lon": 113.006, "lat": 22.636, "ts": "yesterday"},
        {"type": "positions", "items": [[113.006, 22.636, None], [113.0, 22.6, "noon"]]},
    ):
        await c.send(bad)
        m = await c.wait_for(lambda m: m["type"] == "error")
        assert m["code"] == "bad_message" and "RFC 3339" in m["message"], m
    r = await c.request({"type": "status", "status": "available"})
    assert r["type"] == "ack"
    assert c.closed_code is None
    # the id is echoed as the client wrote it, also on a bad message and a second hello
    await c.send({"type": "ping", "id": 7})
    m = await c.wait_for(lambda m: m.get("id") == 7)
    assert m["type"] == "error" and m["code"] == "bad_message" and "id" in m["message"], m
    await c.send({"type": "report", "id": 8, "category": "fire_hazard"})
    m = await c.wait_for(lambda m: m["type"] == "error" and m.get("id") == 8)
    assert m["code"] == "bad_message"
    await c.send({"type": "hello", "id": "h2", "token": "x"})
    m = await c.wait_for(lambda m: m["type"] == "error" and m.get("id") == "h2")
    assert m["code"] == "bad_message" and "hello" in m["message"]
    # a frame of exactly 64 KiB is allowed; one byte more closes with 1009
    frame = json.dumps({"type": "ping", "id": "big", "pad": ""})
    frame = frame.replace('"pad": ""', '"pad": "' + "x" * (65_536 - len(frame)) + '"')
    assert len(frame.encode()) == 65_536
    await c.send(frame)
    assert (await c.wait_for(lambda m: m.get("id") == "big"))["type"] == "pong"
    await c.send(frame.replace('"pad": "', '"pad": "x'))
    assert await c.closed() == 1009


async def test_hello_must_come_first_and_in_time(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path, extra='hello_timeout = "1s"')
    srv.start()
    try:
        c = await Client.connect(srv.ws + "/ws/field")
        await c.send(
            {"type": "report", "id": "r1", "category": "fire_hazard", "lon": 113.01, "lat": 22.61}
        )
        err = await c.wait_for(lambda m: m["type"] == "error")
        assert err["code"] == "bad_message" and "hello" in err["message"]
        assert await c.closed() == 4408
        c = await Client.connect(srv.ws + "/ws/field")
        await c.send({"type": "hello", "token": token("field", "nobody")})
        assert await c.closed() == 4403
        # a hello without a (string) token did not authenticate: 4401 at once, on both channels
        for path, hello in (
            ("/ws/field", {"type": "hello"}),
            ("/ws/field", {"type": "hello", "token": 123}),
            ("/ws/screen", {"type": "hello", "scope": "T0"}),
        ):
            c = await Client.connect(srv.ws + path)
            await c.send(hello)
            assert await c.closed(timeout=0.9) == 4401, (path, hello)
    finally:
        srv.stop()


async def test_pings_keep_a_quiet_device_and_drop_a_silent_one(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path, extra='heartbeat = "300ms"')
    srv.start()
    try:
        quiet = await field(srv, "w1", V1A)
        pong = await quiet.ws.ping()  # the server answers the client's pings too
        await asyncio.wait_for(pong, 2)
        # A peer that completes the handshake and then never answers anything.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(
            b"GET /ws/field HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        opcodes: list[int] = []
        close_payload = b""
        async with asyncio.timeout(5):
            while 0x8 not in opcodes:  # ping(s), then a close frame
                first, length = await reader.readexactly(2)
                payload = await reader.readexactly(length & 0x7F)
                opcodes.append(first & 0x0F)
                close_payload = payload
        assert opcodes[0] == 0x9, opcodes  # pinged first
        assert int.from_bytes(close_payload[:2], "big") == 1011
        writer.close()
        # The quiet device answered every ping (websockets does) and is still served.
        await asyncio.sleep(1.0)
        await quiet.send({"type": "ping", "id": "still-there"})
        await quiet.wait_for(lambda m: m.get("type") == "pong", what="pong")
        assert quiet.closed_code is None
        await quiet.close()
    finally:
        srv.stop()


async def test_a_zero_heartbeat_turns_pings_off(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path, extra='heartbeat = "0s"')
    srv.start()
    try:
        w1 = await field(srv, "w1", V1A)
        await asyncio.sleep(0.5)  # (aiohttp, given 0, pinged at once and closed every socket)
        await report(w1, category="sanitation", handled=True)
        assert w1.closed_code is None
        await w1.close()
    finally:
        srv.stop()


async def test_a_token_that_expires_mid_session_closes_4401(server: ServerProcess) -> None:
    """An expired token closes the websocket (PROTOCOL.md "Auth"), also one that expires while
    connected: a wall screen left signed in stops acting with it."""
    scr = await Client.connect(server.ws + "/ws/screen")
    await scr.send({"type": "hello", "token": token("operator", "op", scope="T0", ttl=2)})
    await scr.wait_for(lambda m: m["type"] == "snapshot")
    dev = await Client.connect(server.ws + "/ws/field")
    await dev.send({"type": "hello", "token": token("field", "w1", ttl=2)})
    await dev.wait_for(lambda m: m["type"] == "welcome")
    lasting = await screen(server)
    assert await scr.closed(timeout=4) == 4401
    assert await dev.closed(timeout=4) == 4401
    assert lasting.closed_code is None


async def test_report_is_idempotent_per_reporter(server: ServerProcess) -> None:
    w3 = await field(server, "w3", V1B)
    ref = str(uuid.uuid4())
    a = await report(w3, id=ref)
    b = await report(w3, id=ref)
    assert a == b
    st, _, doc = server.get("/api/incidents?limit=50", token("admin", "a"))
    assert [i["id"] for i in doc].count(a) == 1


async def test_offer_timeout_passes_on_and_offline_passes_on_at_once(server: ServerProcess) -> None:
    w1 = await field(server, "w1", (113.005, 22.605))
    w2 = await field(server, "w2", (113.015, 22.615))
    await asyncio.sleep(0.2)
    inc = await report(w2, category="sanitation")
    await w1.wait_for(offer_for(inc))
    revoked = await w1.wait_for(lambda m: m["type"] == "offer_revoked", timeout=6)
    assert revoked == {"type": "offer_revoked", "incident": inc, "reason": "timeout"}
    await w2.wait_for(offer_for(inc), what="offer passed on after the timeout")
    # w2 disconnects while holding the offer: after offline_after (2 s) it passes on at once
    await w2.close()
    scr = await screen(server)
    await scr.wait_for(
        event_is("incident.offer_expired", inc, responder="w2", reason="offline"), timeout=6
    )


async def test_escalation_no_responder_then_requested_then_operator(server: ServerProcess) -> None:
    scr = await screen(server)
    await scr.wait_for(lambda m: m["type"] == "snapshot")
    w6 = await field(server, "w6", V2B)
    w5 = await field(server, "w5", V1B)
    await asyncio.sleep(0.2)
    # w4 (the only V2A worker) is offline: level 3 has nobody, level 2 (V2) has w6
    inc = await report(w6, category="fire_hazard", pos=(113.03, 22.61))
    e = await scr.wait_for(event_is("incident.escalated", inc))
    assert (e["event"]["from_level"], e["event"]["to_level"], e["event"]["reason"]) == (
        3,
        2,
        "no_responder",
    )
    await w6.wait_for(offer_for(inc))
    assert (await w6.request({"type": "accept", "incident": inc}))["type"] == "ack"
    r = await w6.request({"type": "escalate", "incident": inc, "reason": "needs the fire brigade"})
    assert r["type"] == "ack"
    revoked = await w6.wait_for(lambda m: m["type"] == "offer_revoked")
    assert revoked["reason"] == "escalated"
    e = await scr.wait_for(event_is("incident.escalated", inc, reason="requested"))
    assert e["event"]["to_level"] == 1
    # at level 1 the nearest eligible in the town is w5 (w6 asked to escalate: never again)
    await w5.wait_for(offer_for(inc))
    # operator escalation at level 1 is refused: nothing above the town
    r = await scr.request({"type": "escalate", "incident": inc})
    assert r["type"] == "error" and r["code"] == "conflict"


async def test_sla_escalates_each_level_then_overdue(server: ServerProcess) -> None:
    scr = await screen(server)
    await scr.wait_for(lambda m: m["type"] == "snapshot")
    w1 = await field(server, "w1", (113.005, 22.605))
    await asyncio.sleep(0.2)
    inc = await report(w1, category="quick")
    await w1.wait_for(offer_for(inc))
    assert (await w1.request({"type": "accept", "incident": inc}))["type"] == "ack"
    e = await scr.wait_for(event_is("incident.escalated", inc, reason="sla"), timeout=5)
    assert e["event"]["from_level"] == 3 and e["event"]["responder"] == "w1"
    await w1.wait_for(lambda m: m["type"] == "offer_revoked" and m["reason"] == "escalated")
    await scr.wait_for(event_is("incident.escalated", inc, reason="sla"), timeout=8)
    await scr.wait_for(event_is("incident.overdue", inc), timeout=8)
    st, _, doc = server.get(f"/api/incidents/{inc}", token("admin", "a"))
    assert doc["overdue"] is True and doc["level"] == 1 and doc["on_time"] is False


async def test_operator_commands_and_scope(server: ServerProcess) -> None:
    w1 = await field(server, "w1", (113.005, 22.605))
    d1 = await field(server, "d1", (113.02, 22.62))
    await asyncio.sleep(0.2)
    town = await screen(server, "T0")
    await town.wait_for(lambda m: m["type"] == "snapshot")
    v2 = await screen(server, "V2", sub="op-v2")
    await v2.wait_for(lambda m: m["type"] == "snapshot")
    inc = await report(w1, category="dispute")
    await w1.wait_for(offer_for(inc))
    # a village-2 operator cannot touch a village-1 incident
    r = await v2.request({"type": "close", "incident": inc})
    assert r["type"] == "error" and r["code"] == "forbidden"
    # a monitor may watch but not act
    mon = await screen(server, "T0", role="monitor", sub="mon")
    await mon.wait_for(lambda m: m["type"] == "snapshot")
    r = await mon.request({"type": "close", "incident": inc})
    assert r["type"] == "error" and r["code"] == "forbidden"
    # transfer to the police: the offer is withdrawn from w1 and goes to the police unit
    r = await town.request({"type": "transfer", "incident": inc, "department": "police"})
    assert r["type"] == "ack", r
    assert (await w1.wait_for(lambda m: m["type"] == "offer_revoked"))["reason"] == "operator"
    await d1.wait_for(offer_for(inc))
    # direct assignment back to w1
    r = await town.request({"type": "assign", "incident": inc, "responder": "w1"})
    assert r["type"] == "ack", r
    assigned = await w1.wait_for(lambda m: m["type"] == "assigned")
    assert assigned["incident"]["id"] == inc and assigned["incident"]["responder"] == "w1"
    assert (await d1.wait_for(lambda m: m["type"] == "offer_revoked"))["reason"] == "operator"
    # dispute needs verification: resolved waits for an operator
    assert (await w1.request({"type": "resolve", "incident": inc}))["type"] == "ack"
    await town.wait_for(event_is("incident.resolved", inc))
    st, _, doc = server.get(f"/api/incidents/{inc}", token("admin", "a"))
    assert doc["status"] == "resolved"
    r = await town.request({"type": "close", "incident": inc, "note": "verified on site"})
    assert r["type"] == "ack"
    await town.wait_for(event_is("incident.closed", inc))
    r = await town.request({"type": "reopen", "incident": inc, "note": "came back"})
    assert r["type"] == "ack"
    e = await town.wait_for(event_is("incident.reopened", inc))
    assert e["event"]["level"] == 3
    st, _, doc = server.get(f"/api/incidents/{inc}", token("admin", "a"))
    assert doc["reopened"] == 1 and doc["status"] in ("new", "offered")


async def test_handled_on_the_spot_is_closed_at_once(server: ServerProcess) -> None:
    scr = await screen(server)
    await scr.wait_for(lambda m: m["type"] == "snapshot")
    w1 = await field(server, "w1", (113.005, 22.605))
    inc = await report(w1, category="sanitation", handled=True)
    e = await scr.wait_for(event_is("incident.closed", inc))
    assert e["event"]["on_time"] is True
    st, _, doc = server.get(f"/api/incidents/{inc}", token("admin", "a"))
    assert doc["status"] == "closed" and doc["level"] == 3 and doc["handled"] is True


async def test_screen_resume_with_since_has_no_gap_and_no_duplicate(server: ServerProcess) -> None:
    w1 = await field(server, "w1", (113.005, 22.605))
    scr = await screen(server)
    snap = await scr.wait_for(lambda m: m["type"] == "snapshot")
    first = await report(w1, category="sanitation", handled=True)
    await scr.wait_for(event_is("incident.closed", first))
    last_seq = max(m["seq"] for m in scr.seen if m["type"] == "event")
    await scr.close()
    missed = [await report(w1, category="sanitation", handled=True) for _ in range(3)]
    again = await screen(server, since=last_seq)
    await again.wait_for(event_is("incident.closed", missed[-1]))
    types = {m["type"] for m in again.seen}
    assert "snapshot" not in types
    seqs = [m["seq"] for m in again.seen if m["type"] == "event"]
    assert seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs)))
    assert snap["seq"] < last_seq
    # a since from the future (e.g. after a database was replaced) gets a fresh snapshot
    odd = await screen(server, since=10**9)
    await odd.wait_for(lambda m: m["type"] == "snapshot")


def chained(events: list[dict[str, object]], last: int) -> bool:
    """Every event's `prev` is the seq received before it (or, first, at most `last`)."""
    for m in events:
        prev, seq = m["prev"], m["seq"]
        assert isinstance(prev, int) and isinstance(seq, int)
        if prev > last or seq <= prev:
            return False
        last = seq
    return True


async def test_village_screen_chains_its_events_by_prev(server: ServerProcess) -> None:
    """A village screen gets only its village's events, so the town's seqs arrive with holes;
    `prev` (the scope's previous event) lets it tell a hole from a lost event, live and on
    resume."""
    w1 = await field(server, "w1", (113.005, 22.605))
    village = await screen(server, scope="V1")
    town = await screen(server, scope="T0")
    snap = await village.wait_for(lambda m: m["type"] == "snapshot")
    await town.wait_for(lambda m: m["type"] == "snapshot")
    for pos in (V2B, V1A, V2B, V1A):
        inc = await report(w1, category="sanitation", pos=pos, handled=True)
    await village.wait_for(event_is("incident.closed", inc))
    await town.wait_for(event_is("incident.closed", inc))
    v_events = [m for m in village.seen if m["type"] == "event"]
    t_events = [m for m in town.seen if m["type"] == "event"]
    assert chained(v_events, snap["seq"])
    assert any(b["seq"] > a["seq"] + 1 for a, b in itertools.pairwise(v_events))
    assert all(m["prev"] == m["seq"] - 1 for m in t_events)
    assert {m["event"]["grids"]["2"] for m in v_events if "grids" in m["event"]} == {"V1"}
    last = v_events[-1]["seq"]
    await village.close()
    for pos in (V2B, V1A):
        inc = await report(w1, category="sanitation", pos=pos, handled=True)
    again = await screen(server, scope="V1", since=last)
    await again.wait_for(event_is("incident.closed", inc))
    replayed = [m for m in again.seen if m["type"] == "event"]
    assert "snapshot" not in {m["type"] for m in again.seen}
    assert replayed and chained(replayed, last)


async def test_rest_auth_intake_and_filters(server: ServerProcess) -> None:
    st, ctype, doc = server.get("/api/incidents")
    assert st == 401 and "problem+json" in ctype and doc["code"] == "unauthorized"
    st, ctype, doc = server.get("/api/incidents", token("field", "w1"))
    assert st == 403 and doc["code"] == "forbidden"
    st, _, doc = server.get("/metrics", token("operator", "clerk", scope="T0"))
    assert st == 403 and doc["detail"] == "An operator token may not use this endpoint."
    st, _, doc = server.post("/api/grids", {}, token("admin", "a"))
    assert st == 405 and doc["code"] == "bad_message" and "use GET" in doc["detail"], doc
    st, _, doc = server.post("/api/incidents", b"x" * 70_000, token("admin", "a"))
    assert st == 413 and doc["code"] == "too_large" and "65,536 bytes" in doc["detail"], doc
    op = token("operator", "clerk", scope="T0")
    st, _, doc = server.post(
        "/api/incidents",
        {
            "id": "hotline-1",
            "category": "sanitation",
            "lon": 113.03,
            "lat": 22.63,
            "source": "hotline",
            "description": "rubbish",
        },
        op,
    )
    assert st == 201 and doc["source"] == "hotline" and doc["grids"]["3"] == "V2B"
    st, _, doc = server.post(
        "/api/incidents",
        {"id": "hotline-2", "category": "sanitation", "lon": 120.0, "lat": 22.63},
        op,
    )
    assert st == 422 and doc["code"] == "outside_area"
    st, _, doc = server.post("/api/incidents", b"{oops", op)
    assert st == 400 and doc["code"] == "bad_json"
    v1 = token("operator", "v1clerk", scope="V1")
    st, _, doc = server.get("/api/incidents?grid=V2B", v1)
    assert st == 403 and doc["code"] == "forbidden" and "V2B" in doc["detail"]
    st, _, doc = server.get("/api/incidents?grid=V1B", v1)
    assert st == 200 and doc == []
    # a filter value that can match nothing is a mistake the caller should hear about
    for query, code, mentions in (
        ("status=bogus", "bad_message", "bogus"),
        ("status=new,clsoed", "bad_message", "clsoed"),
        ("level=7", "bad_message", "level"),
        ("limit=-1", "bad_message", "limit"),
        ("grid=NOPE", "not_found", "NOPE"),
    ):
        st, _, doc = server.get(f"/api/incidents?{query}", op)
        assert st in (404, 422) and doc["code"] == code and mentions in doc["detail"], (query, doc)
    st, _, doc = server.get("/api/incidents?status=new,closed", op)
    assert st == 200
    st, _, doc = server.get("/api/incidents?grid=V2B&level=1", op)
    assert st == 200 and all(i["level"] == 1 for i in doc)
    st, _, doc = server.get("/api/responders", v1)
    assert {r["id"] for r in doc} == {"w1", "w2", "w3", "w5"}
    st, _, doc = server.get("/api/stats?scope=V1", v1)
    assert st == 200 and doc["scope"] == "V1"
    st, _, doc = server.get("/api/stats?scope=T0", v1)
    assert st == 403
    # a basic grid's statistics, for its own operator or anyone above it
    st, _, doc = server.get("/api/stats?scope=V1A", v1)
    assert st == 200 and doc["scope"] == "V1A"
    st, _, doc = server.get("/api/stats", token("operator", "v1a", scope="V1A"))
    assert st == 200 and doc["scope"] == "V1A"
    st, _, doc = server.get("/api/stats?scope=NOPE", op)
    assert st == 404 and doc["code"] == "not_found"


async def test_metrics_need_a_token_and_pass_promtool(server: ServerProcess) -> None:
    w1 = await field(server, "w1", (113.005, 22.605))
    await report(w1, category="sanitation", handled=True)
    st, _, _ = server.get("/metrics")
    assert st == 401
    st, ctype, body = server.get("/metrics", token("monitor", "prom", scope="T0"))
    assert st == 200 and ctype.startswith("text/plain")
    text = body.decode() if isinstance(body, bytes) else str(body)
    assert 'dispatch_incidents_reported_total{category="sanitation",source="field"} 1.0' in text
    assert 'dispatch_connections{role="field"} 1.0' in text
    assert 'dispatch_town_ready{town="T0"} 1.0' in text
    assert "_created" not in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install prometheus")
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


async def test_rate_limit_answers_rate_limited_without_closing(server: ServerProcess) -> None:
    c = await field(server, "w1", (113.005, 22.605))
    for i in range(150):
        await c.send({"type": "ping", "id": f"p{i}"})
    err = await c.wait_for(lambda m: m["type"] == "error", timeout=5)
    assert err["code"] == "rate_limited"
    assert err["id"].startswith("p"), "a refused message is still answered with its id"
    answered = await c.wait_for(lambda m: m.get("id") == "p149", timeout=5)
    assert answered["type"] == "error" and answered["code"] == "rate_limited"
    await asyncio.sleep(1.0)
    r = await c.request({"type": "status", "status": "available"})
    assert r["type"] == "ack" and c.closed_code is None


async def test_sustained_flooding_is_closed_4429(tmp_path: Path) -> None:
    """A client that keeps sending faster than its limit (some messages always pass as the bucket
    refills) is closed once it has been over the limit for flood_close_after; a burst is not."""
    srv = ServerProcess(tmp_path, extra='flood_close_after = "2s"')
    srv.start()
    try:
        calm = await field(srv, "w1", (113.005, 22.605))
        for i in range(120):  # one burst over the limit, then quiet
            await calm.send({"type": "ping", "id": f"b{i}"})
        await calm.wait_for(lambda m: m.get("id") == "b119")
        flood = await field(srv, "w2", (113.015, 22.615))
        loop = asyncio.get_running_loop()
        start = loop.time()
        while flood.closed_code is None and loop.time() - start < 6:
            with contextlib.suppress(Exception):
                await flood.send({"type": "ping", "id": "f"})
            await asyncio.sleep(0.01)  # 100 a second against a limit of 20
        assert await flood.closed() == 4429
        assert 1.5 < loop.time() - start < 6
        r = await calm.request({"type": "status", "status": "available"})
        assert r["type"] == "ack" and calm.closed_code is None
    finally:
        srv.stop()


async def test_graceful_shutdown_closes_with_1001(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path)
    srv.start()
    c = await field(srv, "w1", (113.005, 22.605))
    s = await screen(srv)
    await s.wait_for(lambda m: m["type"] == "snapshot")
    assert srv.stop() == 0
    assert await c.closed() == 1001
    assert await s.closed() == 1001


async def test_browser_origin_must_be_allowed(server: ServerProcess) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as err:
        await Client.connect(server.ws + "/ws/screen", origin="http://evil.example")
    assert err.value.response.status_code == 403
    same = await Client.connect(server.ws + "/ws/screen", origin=server.http)
    await same.send({"type": "hello", "token": token("operator", "op", scope="T0")})
    await same.wait_for(lambda m: m["type"] == "snapshot")


async def test_safety_history_endpoint(server: ServerProcess) -> None:
    w1 = await field(server, "w1", (113.005, 22.605))
    await report(w1, category="fire_hazard", handled=True)
    v1 = token("operator", "v1clerk", scope="V1")
    st, _, doc = server.get("/api/safety/V1A?days=7", v1)
    assert st == 200 and doc["grid"] == "V1A" and len(doc["days"]) == 7
    today = doc["days"][-1]
    assert today["fire"] == pytest.approx(1.0)  # 1 fire alert per 10,000 residents
    # the README's worked example: s_fire = 100 × (1 − 1/3), S = 0.4·100 + 0.3·66.67 + 0.3·100
    assert today["score"] == pytest.approx(90.0) and today["colour"] == "blue"
    st, _, doc = server.get("/api/safety/V2A", v1)
    assert st == 403 and doc["code"] == "forbidden"
    st, _, doc = server.get("/api/safety/NOPE", v1)
    assert st == 404


async def test_welcome_lists_an_open_offer_after_reconnect(server: ServerProcess) -> None:
    w1 = await field(server, "w1", (113.005, 22.605))
    inc = await report(w1, category="sanitation")
    await w1.wait_for(offer_for(inc))
    await w1.close()
    again = await field(server, "w1")
    welcome = next(m for m in again.seen if m["type"] == "welcome")
    (offer,) = welcome["offers"]
    assert offer["id"] == inc and offer["incident"]["id"] == inc
    assert offer["expires_at"].endswith("Z") and welcome["assignments"] == []
    assert (await again.request({"type": "accept", "incident": inc}))["type"] == "ack"


def test_wall_screen_page_carries_the_configured_tile_source(tmp_path: Path) -> None:
    import urllib.request

    tiles = "http://10.1.2.3:8000/tiles/{z}/{x}/{y}.png"
    srv = ServerProcess(tmp_path, extra=f'tiles = "{tiles}"')
    srv.start()
    try:
        with urllib.request.urlopen(srv.http + "/", timeout=5) as r:
            page = r.read().decode()
        assert f'<meta name="dispatch-tiles" content="{tiles}">' in page
        assert "img-src 'self' http://10.1.2.3:8000" in page
    finally:
        srv.stop()


async def test_a_screen_that_cannot_keep_up_is_closed_4008_and_resumes(tmp_path: Path) -> None:
    """A wall screen that stops reading holds nobody up: the devices get every ack, the screen's
    queue overflows while its socket is backed up, it is closed with 4008, and a reconnect with
    ``since`` is served again."""
    srv = ServerProcess(tmp_path, extra="queue_limit = 200\nrate = 2000.0\nburst = 5000")
    srv.start()
    try:
        slow = await Client.connect(srv.ws + "/ws/screen", max_queue=1)
        await slow.send({"type": "hello", "token": token("operator", "op", scope="T0")})
        await asyncio.sleep(0.5)
        slow.task.cancel()  # stop reading: the socket buffers fill up
        since = max((m.get("seq", 0) for m in slow.seen), default=0)
        w2 = await field(srv, "w2", (113.005, 22.605))
        text = "x" * 4000
        n = 1500
        for i in range(n):
            await w2.send({"type": "report", "id": f"r{i}", "category": "sanitation",
                           "lon": 113.006, "lat": 22.606, "handled": True, "description": text})
        deadline = asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < deadline:
            if sum(1 for m in w2.seen if m["type"] == "ack") == n:
                break
            await asyncio.sleep(0.2)
        assert sum(1 for m in w2.seen if m["type"] == "ack") == n, "the slow screen held it up"
        assert w2.closed_code is None
        async with asyncio.timeout(30):
            with contextlib.suppress(Exception):
                async for _ in slow.ws:
                    pass
        assert slow.ws.close_code == 4008, slow.ws.close_code
        again = await screen(srv, since=since)
        first = await again.wait_for(lambda m: m["type"] in ("event", "snapshot"), timeout=10)
        assert first["type"] == "snapshot" or first["seq"] == since + 1
    finally:
        srv.stop()
