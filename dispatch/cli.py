"""``dispatch serve | token | demo | grids check | replay | bench``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from dispatch.errors import ConfigError


def _settings(path: str | None) -> Any:
    from dispatch.config import load_settings

    return load_settings(Path(path) if path else None)


def cmd_serve(args: argparse.Namespace) -> int:
    from dispatch.config import load_data
    from dispatch.logs import configure

    settings = _settings(args.config)
    configure(settings.log.level, settings.log.format)
    import structlog

    log = structlog.get_logger("dispatch")
    settings.require_secret()
    if settings.weak_secret:
        log.warning(
            "[auth] secret is shorter than 16 characters: anyone who guesses it can "
            "mint admin tokens"
        )
    data = load_data(settings)
    run_server(settings, data, port=args.port)
    return 0


def run_server(settings: Any, data: Any, *, port: int | None = None, ready: Any = None) -> None:
    from aiohttp import web

    from dispatch.server.app import create_app

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    app = create_app(settings, data)
    if ready is not None:
        app.on_startup.append(ready)
    web.run_app(
        app,
        host=settings.server.host,
        port=port or settings.server.port,
        print=None,
        shutdown_timeout=10,
        access_log=None,
        handle_signals=True,
    )


def cmd_token(args: argparse.Namespace) -> int:
    from dispatch.durations import parse_duration
    from dispatch.server.auth import mint

    settings = _settings(args.config)
    secret = settings.require_secret()
    try:
        ttl = parse_duration(args.ttl) if args.ttl else settings.auth.default_ttl
    except ValueError as exc:
        print(f"error: --ttl: {exc}", file=sys.stderr)
        return 2
    if args.role in ("operator", "monitor") and not args.scope:
        print("error: operator and monitor tokens need --scope GRID", file=sys.stderr)
        return 2
    problem = _token_problem(settings, args.role, args.sub, args.scope)
    if problem is not None:  # still minted: a token the server refuses is how 4403 is tested
        print(f"warning: {problem}; the server will refuse this token", file=sys.stderr)
    print(mint(secret, role=args.role, sub=args.sub, scope=args.scope, ttl=ttl))
    return 0


def _token_problem(settings: Any, role: str, sub: str, scope: str | None) -> str | None:
    """What would make the server refuse this token at once (a scope that is no grid, a field
    token for someone not in the roster), checked against the config's data files, if they can
    be read (a token may be minted where only the secret is at hand)."""
    from dispatch.config import load_data

    if scope is None and role != "field":
        return None
    try:
        data = load_data(settings)
    except ConfigError as exc:
        print(f"warning: not checked against the data files: {exc}", file=sys.stderr)
        return None
    if scope is not None and scope not in data.gridset.grids:
        return f"--scope {scope!r} is not a grid of {settings.data.grids}"
    if role == "field" and sub not in data.roster:
        return f"--sub {sub!r} is not in the roster {settings.data.roster}"
    return None


def cmd_grids_check(args: argparse.Namespace) -> int:
    from dispatch.geo.grids import check_grids

    problems = check_grids(Path(args.file))
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        print(f"{args.file}: {p}")
    print(f"{len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    return 1 if errors else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from dispatch.log import open_log
    from dispatch.wire.codec import decode_event, event_wire

    settings = _settings(args.config)

    async def go() -> int:
        log = open_log(settings.store.url, base_dir=settings.store.base_dir)
        try:
            towns = [args.town] if args.town else _towns(settings)
            for town in towns:
                records = await log.read(town)
                kinds: Counter[str] = Counter()
                for i, rec in enumerate(records):
                    ev = decode_event(rec.data)
                    kinds[ev.type_name()] += 1
                    if not args.summary:
                        print(json.dumps(event_wire(ev), ensure_ascii=False))
                    elif i % 50_000 == 0 and sys.stderr.isatty():
                        print(f"\r{town}: {i}/{len(records)} events", end="", file=sys.stderr)
                if args.summary:
                    print(
                        f"town {town}: {len(records)} events, last seq "
                        f"{records[-1].seq if records else 0}"
                    )
                    for k, n in sorted(kinds.items()):
                        print(f"  {k:28s} {n}")
        finally:
            await log.close()
        return 0

    return asyncio.run(go())


def _towns(settings: Any) -> list[str]:
    from dispatch.config import load_data

    return list(load_data(settings).towns)


def cmd_demo(args: argparse.Namespace) -> int:
    from dispatch.sim.demo import run_demo

    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from dispatch.sim.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispatch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--config", "-c", default=os.environ.get("DISPATCH_CONFIG"))
    s.add_argument("--port", type=int, default=None, help="override [server] port")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("token", help="print a signed token")
    t.add_argument("--config", "-c", default=os.environ.get("DISPATCH_CONFIG"))
    t.add_argument("--role", required=True, choices=["field", "operator", "admin", "monitor"])
    t.add_argument("--sub", required=True, help="responder id (field) or user name")
    t.add_argument("--scope", help="grid id whose subtree the token sees")
    t.add_argument("--ttl", help="lifetime, e.g. 8h (default [auth] default_ttl)")
    t.set_defaults(func=cmd_token)

    g = sub.add_parser("grids", help="grid file tools")
    gsub = g.add_subparsers(dest="grids_command", required=True)
    gc = gsub.add_parser("check", help="report every problem in a grid file")
    gc.add_argument("file")
    gc.set_defaults(func=cmd_grids_check)

    r = sub.add_parser("replay", help="print a town's events")
    r.add_argument("--config", "-c", default=os.environ.get("DISPATCH_CONFIG"))
    r.add_argument("--town")
    r.add_argument("--summary", action="store_true", help="counts by type instead of events")
    r.set_defaults(func=cmd_replay)

    d = sub.add_parser("demo", help="run the demo town with simulated devices")
    d.add_argument(
        "--port", type=int, default=8080, help="port of the server and wall screen (8080)"
    )
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    d.add_argument("--dir", default=None, help="working folder (default ./var/demo)")
    d.add_argument("--devices", type=int, default=None, help="simulated devices (default all)")
    d.add_argument("--rate", type=float, default=1.0, help="reports per second, town-wide (1)")
    d.add_argument("--seed", type=int, default=7, help="seed of the simulated patrols (7)")
    d.add_argument("--fresh", action="store_true", help="start from an empty event log")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser(
        "bench",
        help="load generator against a running server",
        description="Drive a running server with simulated devices (the demo's own device "
        "code), reporters and wall screens; print latency and throughput tables and, with "
        "--out, a JSON file. The devices log in as the roster's grid workers, so --config must "
        "be the server's config (its secret signs their tokens). `make bench` runs the whole "
        "set of scenarios and writes docs/performance.md.",
        epilog="example: dispatch bench -c var/bench/dispatch.toml --url ws://127.0.0.1:8080 "
        "--devices 10000 --position-every 5 --rate 1000 --screens 1 --processes 4 "
        "--out run.json",
    )
    b.add_argument("--url", default="ws://127.0.0.1:8080",
                   help="the server's websocket base (ws://127.0.0.1:8080)")
    b.add_argument("--config", "-c", help="the server's config file (roster, secret, town)")
    b.add_argument("--devices", type=int, default=1000,
                   help="connected field devices, from the roster (1000)")
    b.add_argument("--rate", type=float, default=200.0,
                   help="reports per second, steady; 0 = closed loop, see --inflight (200)")
    b.add_argument("--position-every", type=float, default=5.0,
                   help="seconds between two positions of one device, spread over the fleet "
                        "(5)")
    b.add_argument("--screens", type=int, default=1, help="connected wall screens (1)")
    b.add_argument("--duration", type=float, default=30.0,
                   help="seconds of the measurement window (30)")
    b.add_argument("--processes", type=int, default=1,
                   help="worker processes sharing the devices and screens (1)")
    b.add_argument("--out", default=None, help="JSON results file")
    b.add_argument("--mode", choices=["steady", "ingest"], default="steady",
                   help="steady: positions + reports + screens; ingest: flood positions")
    b.add_argument("--server-pid", type=int, default=None,
                   help="server process for CPU/RSS (default: whoever listens on the port)")
    b.add_argument("--warmup", type=float, default=3.0, help="seconds before the window (3)")
    b.add_argument("--drain", type=float, default=3.0,
                   help="seconds to wait for stragglers after it (3)")
    b.add_argument("--burst", type=int, default=0,
                   help="send reports in bursts of N instead of steadily ...")
    b.add_argument("--burst-every", type=float, default=1.0, help="... every S seconds (1)")
    b.add_argument("--inflight", type=int, default=256,
                   help="with --rate 0: reports outstanding at once (closed loop) (256)")
    b.add_argument("--max-inflight", type=int, default=5000,
                   help="steady rate: stop adding reports beyond this many unanswered (shed) "
                        "(5000)")
    b.add_argument("--handled-share", type=float, default=0.0,
                   help="share of reports sent with handled: true (nothing dispatched) (0)")
    b.add_argument("--hold", type=float, default=0.0,
                   help="seconds an accepted incident is held before resolve (0)")
    b.add_argument("--no-accept", action="store_true", help="devices ignore offers")
    b.add_argument("--all-categories", action="store_true",
                   help="also report categories that need verification")
    b.add_argument("--screen-scope", default=None,
                   help="grid id the screens watch (default the town; 'villages' = spread)")
    b.add_argument("--connect-rate", type=float, default=1000.0,
                   help="new connections per second while the fleet comes up (1000)")
    b.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds before an unanswered report, accept or resolve counts as an "
                        "error (30)")
    b.add_argument("--seed", type=int, default=1,
                   help="seed of the devices' positions and the reports (1)")
    b.add_argument("--label", default="", help="a name for this run in the table and JSON")
    b.add_argument("--no-gc-freeze", action="store_true",
                   help="leave the generator's garbage collector at its defaults")
    b.add_argument("--quiet", action="store_true", help="no progress line")
    b.add_argument("--no-probe", action="store_true",
                   help="no extra connection timing ping -> pong every 100 ms")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
