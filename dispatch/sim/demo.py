"""``dispatch demo``: generate the demo town, serve it, and run its simulated devices.

The server runs in this process; the devices run in a child process over real websockets, as
separate phones would. The wall-screen address is printed with an operator token in the URL
fragment (never in a query, so it stays out of server logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dispatch.server.auth import mint


def _progress(text: str) -> None:
    end = "\r" if sys.stderr.isatty() else "\n"
    print(f"{text:<100}", end=end, file=sys.stderr, flush=True)


def _fleet_main(
    url: str, demo_dir: str, secret: str, devices: int | None, rate: float, seed: int
) -> None:
    """Child process: the simulated devices."""
    from dispatch.sim.devices import BehaviourConfig, Fleet
    from dispatch.sim.town import generate_demo_town

    if os.environ.get("DISPATCH_SIM_DEBUG"):
        import logging

        logging.basicConfig(level=logging.DEBUG)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    town = generate_demo_town(Path(demo_dir), seed=seed, secret=secret)
    workers = town.responders.get("grid_worker", 958) if devices is None else min(devices, 958)
    per_hour = rate * 3600.0 / max(1, workers)
    config = BehaviourConfig(
        report_rate={"grid_worker": per_hour, "volunteer": per_hour / 3, "department": 0.0}
    )

    def token_for(rid: str) -> str:
        return mint(secret, role="field", sub=rid, ttl=7 * 24 * 3600)

    async def go() -> None:
        fleet = Fleet.from_demo(url, town, token_for, config=config, seed=seed, limit=devices)
        await fleet.start()
        try:
            while True:
                await asyncio.sleep(5)
                print(f"devices: {fleet.progress()}", file=sys.stderr, flush=True)
        finally:
            await fleet.stop()

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(go())


def run_demo(args: argparse.Namespace) -> int:
    from dispatch.config import load_data, load_settings
    from dispatch.logs import configure
    from dispatch.sim.town import generate_demo_town

    demo_dir = Path(args.dir or os.environ.get("DISPATCH_DEMO_DIR", "var/demo")).resolve()
    _progress(f"demo: generating the town in {demo_dir} …")
    town = generate_demo_town(demo_dir, seed=args.seed)
    if args.fresh:
        for suffix in ("", "-wal", "-shm"):
            (demo_dir / f"dispatch.db{suffix}").unlink(missing_ok=True)
    _progress(f"demo: {town.summary()}")
    print(file=sys.stderr)
    env = dict(os.environ)
    env["DISPATCH_SERVER_HOST"] = args.host
    env["DISPATCH_SERVER_PORT"] = str(args.port)
    env.setdefault("DISPATCH_LOG_LEVEL", "warning")
    env.setdefault("DISPATCH_LOG_FORMAT", "console")
    settings = load_settings(town.config_path, env)
    configure(settings.log.level, settings.log.format)
    _progress("demo: loading grids, roster and categories …")
    data = load_data(settings)
    town_id = next(iter(data.towns))
    secret = settings.require_secret()
    url = f"http://{args.host}:{args.port}"
    op_token = mint(secret, role="operator", sub="demo-operator", scope=town_id, ttl=7 * 24 * 3600)
    village = sorted(g.id for g in data.gridset.grids.values() if g.level == 2)[0]
    village_token = mint(
        secret, role="operator", sub="village-operator", scope=village, ttl=7 * 24 * 3600
    )
    fleet: multiprocessing.process.BaseProcess | None = None

    async def on_ready(_app: Any) -> None:
        nonlocal fleet
        ctx = multiprocessing.get_context("spawn")
        fleet = ctx.Process(
            target=_fleet_main,
            args=(
                f"ws://{args.host}:{args.port}/ws/field",
                str(demo_dir),
                secret,
                args.devices,
                args.rate,
                args.seed,
            ),
            daemon=True,
        )
        fleet.start()
        print(
            "\n"
            f"  Town wall screen:    {url}/#token={op_token}\n"
            f"  Village screen:      {url}/#scope={village}&token={village_token}\n"
            f"  Metrics:             {url}/metrics (monitor token: dispatch token --config "
            f"{town.config_path} --role monitor --sub prom --scope {town_id})\n"
            f"  Config:              {town.config_path}\n"
            "  Simulated devices are connecting; press Ctrl-C to stop.\n",
            file=sys.stderr,
            flush=True,
        )

    from dispatch.cli import run_server

    started = time.monotonic()
    _progress("demo: starting the server …")
    try:
        run_server(settings, data, ready=on_ready)
    finally:
        if fleet is not None and fleet.is_alive():
            os.kill(fleet.pid or 0, signal.SIGTERM)
            fleet.join(5)
        print(f"demo: stopped after {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0
