"""Distributed mode end to end: three server processes on one real redis-server (AOF, fsync
always), devices and screens on different instances, kill -9 of the owner under load, and
Redis stopping and coming back."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Client, ServerProcess, event_is, field, offer_for, screen, token
from tests.redis_server import RedisServer

CLUSTER = 'instance_id = "{name}"\nlease_ttl = "2s"\nrenew = "500ms"\n'


@pytest.fixture
def redis_srv(tmp_path: Path) -> Iterator[RedisServer]:
    r = RedisServer(tmp_path / "redis")
    r.start()
    try:
        yield r
    finally:
        r.stop()


def make_cluster(tmp_path: Path, redis_url: str, n: int) -> list[ServerProcess]:
    servers = []
    for i in range(n):
        d = tmp_path / f"inst{i}"
        d.mkdir()
        srv = ServerProcess(d, store=redis_url, dispatch={"offline_after": "5s"})
        srv.config.write_text(
            srv.config.read_text() + "\n[cluster]\n" + CLUSTER.format(name=f"inst{i}")
        )
        servers.append(srv)
    for srv in servers:
        srv.start()
    return servers


def owner_of(servers: list[ServerProcess], town: str = "T0") -> ServerProcess:
    import redis

    url = servers[0].store
    with redis.Redis.from_url(url) as r:
        owner = r.get(f"dispatch:{{{town}}}:owner")
    assert owner is not None
    name = owner.decode().rsplit("-", 1)[0]
    return next(s for s in servers if s.config.read_text().count(f'"{name}"'))


def ready(srv: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(srv.http + "/readyz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:  # type: ignore[attr-defined]
        return int(e.code)
    except OSError:
        return 0


async def test_device_on_one_instance_screen_on_another(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    a, b, c = make_cluster(tmp_path, redis_srv.url, 3)
    try:
        scr = await screen(b)
        await scr.wait_for(lambda m: m["type"] == "snapshot")
        w1 = await field(a, "w1", (113.005, 22.605))
        w3 = await field(c, "w3", (113.005, 22.635))
        await asyncio.sleep(0.5)  # positions cross the bus
        ack = await w3.request(
            {"type": "report", "category": "fire_hazard", "lon": 113.006, "lat": 22.606}
        )
        assert ack["type"] == "ack", ack
        inc = ack["incident"]
        await scr.wait_for(event_is("incident.reported", inc))
        await w1.wait_for(offer_for(inc), what="offer on instance a")
        assert (await w1.request({"type": "accept", "incident": inc}))["type"] == "ack"
        assert (await w1.request({"type": "resolve", "incident": inc}))["type"] == "ack"
        await scr.wait_for(event_is("incident.closed", inc))
        for srv in (a, b, c):  # every instance serves the same truth
            st, _, doc = srv.get(f"/api/incidents/{inc}", token("admin", "a"))
            assert st == 200 and doc["status"] == "closed", (srv.port, doc)
    finally:
        for s in (a, b, c):
            s.stop()


async def test_kill9_owner_under_load_loses_no_acked_report(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    servers = make_cluster(tmp_path, redis_srv.url, 3)
    try:
        owner = owner_of(servers)
        others = [s for s in servers if s is not owner]
        reporter = await field(others[0], "w3", (113.005, 22.635))
        workers = [
            await field(others[1], rid, pos)
            for rid, pos in (("w1", (113.005, 22.605)), ("w2", (113.015, 22.615)))
        ]
        acked: list[tuple[str, str]] = []
        failed = 0
        stop = asyncio.Event()

        async def keep_reporting() -> None:
            nonlocal failed
            client = reporter
            while not stop.is_set():
                ref = uuid.uuid4().hex
                msg = {
                    "type": "report",
                    "id": ref,
                    "category": "sanitation",
                    "lon": 113.006,
                    "lat": 22.606,
                    "handled": True,
                }
                try:
                    r = await client.request(msg, timeout=8)
                except AssertionError:
                    failed += 1
                    continue
                if r["type"] == "ack":
                    acked.append((ref, r["incident"]))
                else:
                    failed += 1
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.01)

        task = asyncio.create_task(keep_reporting())
        await asyncio.sleep(1.5)
        before = len(acked)
        t0 = time.monotonic()
        owner.kill9()
        # a survivor takes the lease and the reports flow again
        while time.monotonic() - t0 < 15:
            await asyncio.sleep(0.1)
            if len(acked) > before + 5:
                break
        takeover = time.monotonic() - t0
        print(
            f"failover: reports acked again {takeover:.2f} s after kill -9 of the owner "
            f"(lease_ttl 2 s, renew 0.5 s); {failed} requests failed meanwhile"
        )
        stop.set()
        await task
        assert len(acked) > before + 5, f"no acks after the owner died ({failed} failed)"
        assert takeover < 8, takeover
        new_owner = owner_of(others)
        st, _, doc = new_owner.get("/api/incidents?limit=1000", token("admin", "a"))
        stored = [i["id"] for i in doc]
        assert len(stored) == len(set(stored))
        missing = [inc for _, inc in acked if inc not in set(stored)]
        assert not missing, f"acked but lost: {missing[:5]}"
        refs = [i["ref"] for i in doc]
        assert len(refs) == len(set(refs)), "a report was stored twice"
        # nobody ever held two incidents: the workers' states agree with the incidents
        st, _, resp = new_owner.get("/api/responders", token("admin", "a"))
        held = [r["incident"] for r in resp if r["incident"]]
        assert len(held) == len(set(held))
        for w in workers:
            await w.close()
    finally:
        for s in servers:
            s.stop()


async def test_redis_outage_answers_unavailable_and_recovers(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    (a,) = make_cluster(tmp_path, redis_srv.url, 1)
    try:
        w3 = await field(a, "w3", (113.005, 22.635))
        ok = await w3.request(
            {
                "type": "report",
                "category": "sanitation",
                "lon": 113.006,
                "lat": 22.606,
                "handled": True,
            }
        )
        assert ok["type"] == "ack"
        redis_srv.stop()
        r = await w3.request(
            {
                "type": "report",
                "category": "sanitation",
                "lon": 113.006,
                "lat": 22.606,
                "handled": True,
            },
            timeout=15,
        )
        assert r["type"] == "error" and r["code"] == "unavailable", r
        assert ready(a) == 503
        redis_srv.start()
        deadline = time.monotonic() + 20
        answer: dict[str, object] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError):
                answer = await w3.request(
                    {
                        "type": "report",
                        "category": "sanitation",
                        "lon": 113.006,
                        "lat": 22.606,
                        "handled": True,
                    },
                    timeout=5,
                )
                if answer.get("type") == "ack":
                    break
            await asyncio.sleep(0.5)
        assert answer.get("type") == "ack", answer
        assert ready(a) == 200
        st, _, doc = a.get("/api/incidents", token("admin", "a"))
        assert len(doc) == 2  # the one before and the one after; nothing half-written
    finally:
        a.stop()


async def test_a_redis_that_comes_back_empty_is_refused_not_reused(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    """Redis restarted without its data: what was acknowledged is gone from the store. The server
    must not carry on from the empty stream (handing the same incident ids out again): it stays
    not ready, names the problem, and answers `unavailable` until the data is back."""
    (a,) = make_cluster(tmp_path, redis_srv.url, 1)
    try:
        w3 = await field(a, "w3", (113.005, 22.635))

        async def handled(ref: str) -> dict[str, object]:
            return await w3.request(
                {"type": "report", "id": ref, "category": "sanitation",
                 "lon": 113.006, "lat": 22.606, "handled": True},
                timeout=15,
            )  # fmt: skip

        acked = []
        for i in range(3):
            ok = await handled(f"r{i}")
            assert ok["type"] == "ack"
            acked.append(ok["incident"])
        redis_srv.kill()
        backup = tmp_path / "backup"
        shutil.copytree(redis_srv.directory / "appendonlydir", backup)
        shutil.rmtree(redis_srv.directory / "appendonlydir")
        redis_srv.start()
        deadline = time.monotonic() + 15
        body = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(a.http + "/readyz", timeout=2) as resp:
                    body = resp.read().decode()
            except urllib.error.HTTPError as e:  # type: ignore[attr-defined]
                body = e.read().decode()
                if "lost acknowledged events" in body:
                    break
            await asyncio.sleep(0.3)
        assert "lost acknowledged events" in body, body
        r = await handled("after")
        assert r["type"] == "error" and r["code"] == "unavailable", r
        await asyncio.sleep(2 * 0.5 + 2)  # a few lease rounds: still refused, nothing reused
        assert ready(a) == 503
        r = await handled("later")
        assert r["type"] == "error" and r["code"] == "unavailable", r
        # the operator restores Redis's data: the town is served again, with fresh ids
        redis_srv.kill()
        shutil.rmtree(redis_srv.directory / "appendonlydir")
        shutil.copytree(backup, redis_srv.directory / "appendonlydir")
        redis_srv.start()
        for _ in range(60):
            if ready(a) == 200:
                break
            await asyncio.sleep(0.3)
        assert ready(a) == 200
        r = await handled("restored")
        assert r["type"] == "ack" and r["incident"] not in acked, r
        st, _, doc = a.get("/api/incidents", token("admin", "a"))
        assert st == 200 and {i["id"] for i in doc} == {*acked, r["incident"]}
    finally:
        a.stop()


__all__ = ["Client"]
