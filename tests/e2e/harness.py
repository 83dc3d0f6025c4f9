"""Real server processes and real websocket clients for end-to-end tests.

``ServerProcess`` writes a small town (two villages, four basic grids) and a config into a temp
dir and runs ``python -m dispatch.cli serve`` on a free port, exactly as an operator would.
``Client`` wraps a ``websockets`` connection and files every server message in an inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import jwt
import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests.smalltown import feature_collection

MS = float(os.environ.get("DISPATCH_TEST_MS", "0.001"))
"""One scalable time unit for test timeouts (multiply on a slow machine)."""

SECRET = "e2e-secret-0123456789abcdef-0123456789"


ROSTER = [
    ("w1", "Worker One", "grid_worker", "V1A", "*", ""),
    ("w2", "Worker Two", "grid_worker", "V1A", "*", ""),
    ("w3", "Worker Three", "grid_worker", "V1B", "*", ""),
    ("w4", "Worker Four", "grid_worker", "V2A", "sanitation", ""),
    ("w5", "Worker Five", "grid_worker", "V1B", "*", ""),
    ("w6", "Worker Six", "grid_worker", "V2B", "*", ""),
    ("d1", "Police Unit", "department", "T0", "*", "police"),
    ("d2", "Fire Unit", "department", "T0", "fire_hazard", "fire"),
]

CATEGORIES = """
[categories.fire_hazard]
name = "Fire hazard"
group = "fire"
priority = 1
verify = false
limits = { "3" = "1h", "2" = "1h", "1" = "1h" }

[categories.sanitation]
name = "Sanitation"
group = "other"
priority = 3
verify = false
limits = { "3" = "1h", "2" = "1h", "1" = "1h" }

[categories.quick]
name = "Quick limits"
group = "other"
priority = 3
verify = false
limits = { "3" = "2s", "2" = "2s", "1" = "2s" }

[categories.dispute]
name = "Dispute"
group = "public_security"
priority = 2
verify = true
limits = { "3" = "1h", "2" = "1h", "1" = "1h" }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(
    role: str, sub: str, scope: str | None = None, ttl: int = 3600, secret: str = SECRET
) -> str:
    claims: dict[str, Any] = {"sub": sub, "role": role, "exp": int(time.time()) + ttl}
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm="HS256")


class ServerProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        store: str | None = None,
        port: int | None = None,
        extra: str = "",
        dispatch: dict[str, str] | None = None,
    ) -> None:
        self.dir = workdir
        self.port = port or free_port()
        self.store = store or f"sqlite:///{workdir / 'dispatch.db'}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = workdir / f"server-{self.port}.log"
        disp = {"offer_timeout": "3s", "position_stale_after": "10m", "offline_after": "2s"}
        disp.update(dispatch or {})
        fc = feature_collection()
        (workdir / "grids.geojson").write_text(json.dumps(fc))
        (workdir / "roster.csv").write_text(
            "id,name,kind,home_grid,skills,department\n"
            + "".join(",".join(row) + "\n" for row in ROSTER)
        )
        (workdir / "categories.toml").write_text(CATEGORIES)
        self.config = workdir / f"dispatch-{self.port}.toml"
        self.config.write_text(
            f"""
[server]
host = "127.0.0.1"
port = {self.port}
{extra}

[auth]
secret = "{SECRET}"

[data]
grids = "grids.geojson"
roster = "roster.csv"
categories = "categories.toml"

[store]
url = "{self.store}"

[dispatch]
"""
            + "".join(f'{k} = "{v}"\n' for k, v in disp.items())
        )

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def token(self, role: str, sub: str, scope: str | None = None) -> str:
        return token(role, sub, scope)

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env.pop("DISPATCH_AUTH_SECRET", None)
        env["DISPATCH_LOG_FORMAT"] = "json"
        log = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatch.cli", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.http + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in time: {self._diagnose()}\n{self.tail(12000)}")

    def _diagnose(self) -> str:
        """Where a server that will not get ready is stuck (readyz, or its stacks)."""
        try:
            status, _, body = self.get("/readyz")
            return f"readyz {status} {body}"
        except OSError:
            pass
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGUSR1)  # the server prints its tasks' stacks
            time.sleep(1.0)
            return "not listening; task stacks in the log below"
        return "not listening"

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()
        return self.proc.returncode if self.proc else None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.logfile.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def get(self, path: str, tok: str | None = None) -> tuple[int, str, Any]:
        req = urllib.request.Request(self.http + path)
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        return _do(req)

    def post(self, path: str, body: Any, tok: str | None = None) -> tuple[int, str, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.http + path, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        return _do(req)


def _do(req: urllib.request.Request) -> tuple[int, str, Any]:
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            ctype = r.headers.get("Content-Type", "")
            status = r.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        ctype = e.headers.get("Content-Type", "")
        status = e.code
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = raw
    return status, ctype, doc


class Client:
    """A websocket client that files every server message into an inbox."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.inbox: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []
        self.cond = asyncio.Condition()
        self.closed_code: int | None = None
        self.task = asyncio.create_task(self._pump())

    @classmethod
    async def connect(cls, url: str, **kw: Any) -> Client:
        ws = await connect(url, open_timeout=5, max_size=2**24, compression=None, **kw)
        return cls(ws)

    async def _pump(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                async with self.cond:
                    self.inbox.append(msg)
                    self.seen.append(msg)
                    self.cond.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_code = self.ws.close_code
            async with self.cond:
                self.cond.notify_all()

    async def send(self, msg: Any) -> None:
        await self.ws.send(msg if isinstance(msg, str | bytes) else json.dumps(msg))

    async def wait_for(
        self, pred: Any, timeout: float = 5.0, what: str = "message"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with self.cond:
            while True:
                for i, m in enumerate(self.inbox):
                    if pred(m):
                        return self.inbox.pop(i)
                left = deadline - time.monotonic()
                if left <= 0 or self.task.done():
                    raise AssertionError(
                        f"no {what} within {timeout}s; got "
                        f"{[m.get('type') for m in self.inbox][-12:]}"
                        + (f" (closed {self.closed_code})" if self.task.done() else "")
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.cond.wait(), left)

    async def request(self, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        mid = msg.setdefault("id", uuid.uuid4().hex)
        await self.send(msg)
        return await self.wait_for(
            lambda m: m.get("id") == mid and m.get("type") in ("ack", "error"),
            timeout,
            f"answer to {msg.get('type')}",
        )

    async def closed(self, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return self.closed_code

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()


async def field(srv: ServerProcess, rid: str, pos: tuple[float, float] | None = None) -> Client:
    c = await Client.connect(srv.ws + "/ws/field")
    await c.send({"type": "hello", "token": token("field", rid)})
    await c.wait_for(lambda m: m.get("type") == "welcome", what="welcome")
    if pos:
        await c.send({"type": "position", "lon": pos[0], "lat": pos[1]})
    return c


async def screen(
    srv: ServerProcess,
    scope: str = "T0",
    since: int | None = None,
    role: str = "operator",
    sub: str = "op1",
) -> Client:
    c = await Client.connect(srv.ws + "/ws/screen")
    hello: dict[str, Any] = {
        "type": "hello",
        "token": token(role, sub, scope=scope),
        "scope": scope,
    }
    if since is not None:
        hello["since"] = since
    await c.send(hello)
    return c


def offer_for(inc_id: str) -> Any:
    return lambda m: m.get("type") == "offer" and (m.get("incident") or {}).get("id") == inc_id


def event_is(etype: str, inc_id: str | None = None, **fields: Any) -> Any:
    def pred(m: dict[str, Any]) -> bool:
        if m.get("type") != "event":
            return False
        e = m.get("event") or {}
        if e.get("type") != etype:
            return False
        if inc_id is not None and e.get("incident") != inc_id:
            return False
        return all(e.get(k) == v for k, v in fields.items())

    return pred
