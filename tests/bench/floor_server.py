"""The transport floor: a bare aiohttp websocket server that decodes the same JSON and does
nothing else.

    python -m tests.bench.floor_server --port 8099 [--no-uvloop]

It speaks just enough of the field channel (PROTOCOL.md) for ``dispatch bench`` to drive it with
the very same client code as the real server:

* ``hello`` → a minimal ``welcome`` (the token is NOT checked);
* every frame is decoded with ``msgspec.json`` (the generic decoder: no schema, no checks);
* a message with an ``id`` is answered at once with ``ack`` (a ``report`` gets a made-up
  ``incident`` id), ``ping`` with ``pong``; ``position`` is only counted.

No engine, no log, no fan-out, no rate limit, no metrics: whatever the real server does above
this is its own cost. Compression is off and the frame limit is 64 KiB, as in the real server.
``GET /count`` returns the message counters as JSON; ``GET /healthz`` says ``ok``.
"""

from __future__ import annotations

import argparse
import json

import msgspec
from aiohttp import WSMsgType, web

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

WELCOME = b'{"type":"welcome","responder":{},"server_time":null,"offers":[],"assignments":[]}'
COUNTS = {"messages": 0, "positions": 0, "requests": 0, "connections": 0}


async def field_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=65536, heartbeat=None)
    await ws.prepare(request)
    counts = COUNTS
    counts["connections"] += 1
    n_incident = 0
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
                break
            counts["messages"] += 1
            try:
                doc = _decode(msg.data)
            except msgspec.DecodeError:
                await ws.send_str('{"type":"error","code":"bad_json","message":"bad JSON"}')
                continue
            if not isinstance(doc, dict):
                continue
            kind = doc.get("type")
            if kind == "position":
                counts["positions"] += 1
                continue
            if kind == "hello":
                await ws.send_frame(WELCOME, WSMsgType.TEXT)
                continue
            mid = doc.get("id")
            if kind == "ping":
                await ws.send_frame(_encode({"type": "pong", "id": mid}), WSMsgType.TEXT)
                continue
            if mid is not None:
                counts["requests"] += 1
                ack: dict[str, object] = {"type": "ack", "id": mid}
                if kind == "report":
                    n_incident += 1
                    ack["incident"] = f"F-{id(ws):x}-{n_incident}"
                await ws.send_frame(_encode(ack), WSMsgType.TEXT)
    finally:
        counts["connections"] -= 1
    return ws


async def count(_request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(COUNTS), content_type="application/json")


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.add_routes([web.get("/ws/field", field_ws), web.get("/count", count),
                    web.get("/healthz", healthz)])
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8099)
    ap.add_argument("--no-uvloop", action="store_true", help="stay on the stdlib event loop")
    args = ap.parse_args(argv)
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    web.run_app(make_app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
