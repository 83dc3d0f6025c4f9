"""Benchmark the durable event-log backends: events/s and append latency (p50/p99).

    python tests/bench/bench_log.py [--out results.json] [--seconds 2] [--concurrency 64]

Each scenario runs ``--seconds`` (after a short warm-up) with 1 appender and with
``--concurrency`` appenders, each appender owning one town and appending one ~300-byte event at a
time and waiting for its ack, as a town's single writer does:

* ``sqlite group``      — SqliteLog, one writer thread, group commit (the default)
* ``sqlite per-commit`` — SqliteLog(per_commit=True): one transaction and fsync per append
* ``redis always``      — RedisLog on a private redis-server, ``appendfsync always``
* ``redis everysec``    — the same with ``appendfsync everysec`` (not durable: see redis.py)

Files go to a fresh folder under ``--dir`` (default: the system temp folder); it must be on the
disk you want to measure, not a tmpfs (the file system type is printed and recorded). Compare
ratios within one run: run-to-run spread on a VM is ±20–30 % (PERFORMANCE-FLOORS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from dispatch.log import EventLog, Record, RedisLog, SqliteLog  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

_HEAD = b'{"type":"incident.offered","incident":"T0-000012","at":1763712000.123,"note":"'
EVENT = _HEAD + b"." * (300 - len(_HEAD) - 2) + b'"}'  # ~ one encoded engine event
WARMUP = 0.3


async def drive(log: EventLog, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` appenders on their own towns for ``seconds``; latencies in ms."""
    latencies: list[float] = []
    recording = False
    stop = False
    counts = [0] * concurrency

    async def appender(i: int) -> None:
        town = f"bench-{i}"
        seq = await log.last_seq(town)
        while not stop:
            seq += 1
            started = time.perf_counter()
            await log.append(town, [Record(seq, EVENT)])
            if recording:
                latencies.append((time.perf_counter() - started) * 1000)
                counts[i] += 1

    tasks = [asyncio.create_task(appender(i)) for i in range(concurrency)]
    await asyncio.sleep(WARMUP)
    recording = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    recording = False
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    latencies.sort()
    events = len(latencies)
    return {
        "concurrency": concurrency,
        "events": events,
        "seconds": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "p50_ms": round(latencies[events // 2], 3),
        "p99_ms": round(latencies[min(events - 1, int(events * 0.99))], 3),
        "max_ms": round(latencies[-1], 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
    }


async def bench_sqlite(folder: Path, per_commit: bool, concurrency: int, seconds: float) -> Any:
    path = folder / f"sqlite-{per_commit}-{concurrency}.db"
    log = SqliteLog(path, per_commit=per_commit)
    try:
        result = await drive(log, concurrency, seconds)
        total = log.appended
        result["events_per_commit"] = round(total / max(log.commits, 1), 2)
    finally:
        await log.close()
    return result


async def bench_redis(server: RedisServer, concurrency: int, seconds: float) -> Any:
    with redis.Redis.from_url(server.url) as client:
        client.flushall()
    log = RedisLog.from_url(server.url)
    try:
        return await drive(log, concurrency, seconds)
    finally:
        await log.close()


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _dev, mount, fstype, *_ = line.split()
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def make_folder(args: argparse.Namespace) -> Path:
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="dispatch-bench-log-", dir=base)).resolve()


def write_json(path: str, report: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"# wrote {out}", file=sys.stderr)


async def main(args: argparse.Namespace, folder: Path) -> int:
    fstype = fs_type(folder)
    print(f"# files in {folder} ({fstype}); {args.seconds}s a run", file=sys.stderr)
    if fstype in ("tmpfs", "ramfs"):
        print("# WARNING: a RAM file system: fsync costs nothing here", file=sys.stderr)

    Run = Callable[[int], Awaitable[Any]]
    scenarios: list[tuple[str, Run]] = [
        ("sqlite group", lambda c: bench_sqlite(folder, False, c, args.seconds)),
        ("sqlite per-commit", lambda c: bench_sqlite(folder, True, c, args.seconds)),
    ]
    servers = {
        mode: RedisServer(folder / f"redis-{mode}", appendfsync=mode)
        for mode in ("always", "everysec")
    }

    def redis_run(server: RedisServer) -> Run:
        return lambda c: bench_redis(server, c, args.seconds)

    scenarios += [(f"redis {mode}", redis_run(server)) for mode, server in servers.items()]

    results: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.start()
        for name, run in scenarios:
            for concurrency in (1, args.concurrency):
                result = {"scenario": name, **await run(concurrency)}
                results.append(result)
                print(
                    f"# {name:18} x{concurrency:<4} {result['events_per_s']:>8} ev/s",
                    file=sys.stderr,
                )
    finally:
        for server in servers.values():
            server.kill()

    header = f"{'scenario':18} {'appenders':>9} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    header += f" {'max ms':>8} {'ev/commit':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['scenario']:18} {r['concurrency']:>9} {r['events_per_s']:>9} {r['p50_ms']:>8.3f}"
            f" {r['p99_ms']:>8.3f} {r['max_ms']:>8.3f} {r.get('events_per_commit', ''):>9}"
        )
    if args.out:
        report = {
            "benchmark": "event log append",
            "event_bytes": len(EVENT),
            "seconds_per_run": args.seconds,
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "sqlite": sqlite3.sqlite_version,
                "redis_py": redis.__version__,
                "filesystem": fstype,
                "loop": type(asyncio.get_running_loop()).__module__,
            },
            "results": results,
        }
        write_json(args.out, report)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each run")
    parser.add_argument("--concurrency", type=int, default=64, help="appenders in the busy runs")
    parser.add_argument("--dir", help="folder for the database files (a real disk)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    workdir = make_folder(arguments)
    try:
        if arguments.uvloop:
            import uvloop

            sys.exit(uvloop.run(main(arguments, workdir)))
        sys.exit(asyncio.run(main(arguments, workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
