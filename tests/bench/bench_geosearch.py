"""The responder index vs a numpy brute-force scan vs Redis ``GEOSEARCH`` (a real redis-server).

    python -m tests.bench.bench_geosearch [--sizes 1000,10000,100000] [--out geo.json]

For each size ``n`` it uses ``tests/bench/bench_index.py``'s town (``n`` responders uniformly in
a 20 km square around 22.61°N 113.19°E, all available in one pool) and, for ``--rounds`` rounds:

1. everyone moves up to 10 m (a 1 Hz position feed), fed to each implementation:
   * **index** — ``CellIndex.move`` per update (``bench_index.feed``);
   * **numpy** — what feeding a brute-force scan costs: id → slot lookup and two array stores;
   * **redis** — ``GEOADD`` pipelined ``--pipeline`` members per round trip (one key);
2. ``--queries`` random query points, nearest available responder (k = 1):
   * **index** — ``CellIndex.nearest`` (µs a call, exact great-circle, ties by id), with its
     compiled search (``dispatch/geo/_speedups.c``) as the server runs it;
   * **index, pure Python** — the same index built with ``speedups=False`` (the reference the
     compiled search is checked against, and what runs where no C compiler was available);
   * **numpy** — a vectorised haversine over all positions + ``argmin`` (``bench_index.Brute``);
   * **redis round trip** — one ``GEOSEARCH key FROMLONLAT lon lat BYRADIUS r m ASC COUNT 1``
     and its answer before the next; ``r`` starts at 3× the mean nearest-neighbour distance
     and is widened ×4 for the rare empty answer (counted in the time);
   * **redis pipelined** — the same commands ``--pipeline`` at a time; time per query.
3. **results checked equal**: every index answer against the exact brute-force answer
   (``Brute.exact``, re-scored with ``haversine_m``: must be identical); every Redis answer
   against the index. Redis stores 52-bit geohashes (positions rounded to ~0.6 m) and uses its
   own Earth radius, so on near-ties it may pick another responder: those are counted apart as
   ``redis_ties`` (distance within 1 m of the true nearest) — anything else is a mismatch.

Redis's own time per command (``INFO commandstats``, ``usec_per_call``) is recorded too: the
pipelined figure is mostly the Python client (redis-py, with its C reply parser ``hiredis``
when installed — the test extras install it), the server-side figure is what Redis itself
spends, a floor no Redis client can go below. The client is redis-py (sync);
redis-server runs on its own core when two are available
(``--redis-cpu``), this process on whatever ``taskset`` gave it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import redis  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from dispatch.geo.distance import haversine_m  # noqa: E402
from dispatch.geo.index import SPEEDUPS  # noqa: E402
from tests.bench import bench_index as bi  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

KEY = "bench:responders"
AREA_M2 = (2 * bi.HALF_SIDE_M) ** 2


class RedisGeo:
    """Responders in one Redis geo set (a sorted set of 52-bit geohashes)."""

    def __init__(self, url: str, pipeline: int) -> None:
        self.r = redis.Redis.from_url(url)
        self.pipeline = pipeline
        self.r.delete(KEY)
        self.radius = 1000.0

    def load(self, town: bi.Town) -> None:
        self.move_many(town)
        n = len(town.rids)
        self.radius = 3 * 0.5 * math.sqrt(AREA_M2 / max(n, 1))  # 3x mean NN distance

    def move_many(self, town: bi.Town) -> float:
        """GEOADD everyone, ``pipeline`` members a round trip; returns updates/s."""
        t0 = time.perf_counter()
        r = self.r
        step = self.pipeline
        rids, lons, lats = town.rids, town.lons, town.lats
        for i in range(0, len(rids), step):
            args: list[Any] = []
            for j in range(i, min(i + step, len(rids))):
                args += (lons[j], lats[j], rids[j])
            r.execute_command("GEOADD", KEY, *args)
        return len(rids) / (time.perf_counter() - t0)

    def _cmd(self, lon: float, lat: float, radius: float) -> tuple[Any, ...]:
        return ("GEOSEARCH", KEY, "FROMLONLAT", lon, lat, "BYRADIUS", radius, "m", "ASC",
                "COUNT", 1)

    def nearest(self, lon: float, lat: float) -> str | None:
        radius = self.radius
        while True:
            got = self.r.execute_command(*self._cmd(lon, lat, radius))
            if got:
                return str(got[0].decode())
            if radius > 4 * bi.HALF_SIDE_M:
                return None
            radius *= 4

    def nearest_pipelined(self, points: list[tuple[float, float]]) -> list[str | None]:
        out: list[str | None] = [None] * len(points)
        todo = list(range(len(points)))
        radius = self.radius
        while todo:
            nxt = []
            for i in range(0, len(todo), self.pipeline):
                chunk = todo[i : i + self.pipeline]
                pipe = self.r.pipeline(transaction=False)
                for k in chunk:
                    pipe.execute_command(*self._cmd(*points[k], radius))
                for k, got in zip(chunk, pipe.execute(), strict=True):
                    if got:
                        out[k] = str(got[0].decode())
                    else:
                        nxt.append(k)
            if radius > 4 * bi.HALF_SIDE_M:
                break
            todo, radius = nxt, radius * 4
        return out

    def close(self) -> None:
        self.r.close()


def numpy_feed(town: bi.Town, slot: dict[str, int], lon_a: np.ndarray[Any, Any],
               lat_a: np.ndarray[Any, Any]) -> float:
    """Feeding a brute-force scan: look the id up, store two floats. Returns updates/s."""
    rows = list(zip(town.rids, town.lons, town.lats, strict=True))
    t0 = time.perf_counter()
    for rid, lon, lat in rows:
        i = slot[rid]
        lon_a[i] = lon
        lat_a[i] = lat
    return len(rows) / (time.perf_counter() - t0)


def run_size(n: int, args: argparse.Namespace, geo: RedisGeo) -> dict[str, Any]:
    rng = random.Random(args.seed * 1_000_003 + n)
    make = getattr(bi.Town, "uniform", None) or getattr(bi.Town, "random")  # noqa: B009
    town = make(n, rng)
    idx = bi.build(town, lambda i: frozenset({"*"}))
    pure = bi.build(town, lambda i: frozenset({"*"}), speedups=False)
    geo.r.delete(KEY)
    geo.load(town)
    slot = {rid: i for i, rid in enumerate(town.rids)}
    lon_a = np.array(town.lons)
    lat_a = np.array(town.lats)
    res: dict[str, list[float]] = {k: [] for k in (
        "index_q", "pure_q", "numpy_q", "redis_rt", "redis_pipe", "index_upd", "pure_upd",
        "numpy_upd", "redis_upd")}
    checked = mismatches = differ_python = redis_checked = redis_equal = redis_ties = redis_bad = 0
    geo.r.config_resetstat()
    clock = time.perf_counter_ns
    for rnd in range(args.rounds):
        town.walk(rng, args.step_m)
        res["index_upd"].append(bi.feed(idx, town, 1.0 + rnd))
        res["pure_upd"].append(bi.feed(pure, town, 1.0 + rnd))
        res["numpy_upd"].append(numpy_feed(town, slot, lon_a, lat_a))
        res["redis_upd"].append(geo.move_many(town))
        pts = bi.query_points(rng, args.queries)
        t_idx, answers = bi.time_queries(idx, pts, "any", 1)
        res["index_q"] += t_idx
        t_pure, pure_answers = bi.time_queries(pure, pts, "any", 1)
        res["pure_q"] += t_pure
        differ_python += sum(a != b for a, b in zip(answers, pure_answers, strict=True))
        brute = bi.Brute(town)
        nb = max(200, min(args.queries, 3_000_000 // max(n, 1)))
        for lon, lat in pts[:nb]:
            t0 = clock()
            brute.nearest_index(lon, lat)
            res["numpy_q"].append((clock() - t0) / 1000.0)
        for j in range(min(nb, len(pts))):
            checked += 1
            if answers[j] != brute.exact(pts[j][0], pts[j][1], 1):
                mismatches += 1
        nrt = min(len(pts), args.redis_rt)
        got_rt: list[str | None] = []
        for lon, lat in pts[:nrt]:
            t0 = clock()
            got_rt.append(geo.nearest(lon, lat))
            res["redis_rt"].append((clock() - t0) / 1000.0)
        t0 = clock()
        got_pipe = geo.nearest_pipelined(pts)
        res["redis_pipe"].append((clock() - t0) / 1000.0 / len(pts))
        for j, got in enumerate(got_pipe):
            redis_checked += 1
            want = answers[j][0][0] if answers[j] else None
            if got == want:
                redis_equal += 1
                continue
            if got is None or want is None:
                redis_bad += 1
                continue
            lon, lat = pts[j]
            d_got = haversine_m(lon, lat, town.lons[slot[got]], town.lats[slot[got]])
            d_want = answers[j][0][1]
            if abs(d_got - d_want) <= 1.0:
                redis_ties += 1
            else:
                redis_bad += 1
        for j, got in enumerate(got_rt):
            if got != got_pipe[j]:
                redis_bad += 1
    idx_p50 = statistics.median(res["index_q"])
    stats = geo.r.info("commandstats")
    inside = {c: stats.get(f"cmdstat_{c}", {}).get("usec_per_call") for c in ("geosearch", "geoadd")}
    pipe = statistics.median(res["redis_pipe"])
    return {
        "n": n,
        "index_p50_us": round(idx_p50, 2),
        "index_p99_us": round(bi.pct(res["index_q"], 0.99), 2),
        "index_queries_per_s": round(1e6 / statistics.fmean(res["index_q"])),
        "speedups": SPEEDUPS,
        "index_python_p50_us": round(statistics.median(res["pure_q"]), 2),
        "index_python_p99_us": round(bi.pct(res["pure_q"], 0.99), 2),
        "index_python_updates_per_s": round(statistics.median(res["pure_upd"])),
        "numpy_p50_us": round(statistics.median(res["numpy_q"]), 1),
        "numpy_p99_us": round(bi.pct(res["numpy_q"], 0.99), 1),
        "numpy_queries_per_s": round(1e6 / statistics.fmean(res["numpy_q"])),
        "redis_roundtrip_p50_us": round(statistics.median(res["redis_rt"]), 1),
        "redis_roundtrip_p99_us": round(bi.pct(res["redis_rt"], 0.99), 1),
        "redis_pipelined_us": round(pipe, 1),
        "redis_pipelined_queries_per_s": round(1e6 / pipe),
        "index_updates_per_s": round(statistics.median(res["index_upd"])),
        "numpy_updates_per_s": round(statistics.median(res["numpy_upd"])),
        "redis_updates_per_s": round(statistics.median(res["redis_upd"])),
        "index_vs_numpy_x": round(statistics.median(res["numpy_q"]) / idx_p50, 1),
        "index_vs_redis_pipelined_x": round(pipe / idx_p50, 1),
        "index_vs_redis_roundtrip_x": round(statistics.median(res["redis_rt"]) / idx_p50, 1),
        "index_python_vs_redis_pipelined_x": round(pipe / statistics.median(res["pure_q"]), 1),
        "checked_vs_numpy": checked,
        "mismatches_vs_numpy": mismatches,
        "answers_differing_from_python": differ_python,
        "redis_checked": redis_checked,
        "redis_equal": redis_equal,
        "redis_ties": redis_ties,
        "redis_mismatches": redis_bad,
        "redis_radius_m": round(geo.radius, 1),
        "redis_server_us_per_geosearch": inside["geosearch"],
        "redis_server_us_per_geoadd_call": inside["geoadd"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'n':>7} | {'index p50':>9} {'p99':>6} {'q/s':>9} {'python':>6} | "
            f"{'numpy p50':>9} {'q/s':>7} | "
            f"{'redis rt':>8} {'pipel.':>7} {'q/s':>7} | {'upd/s index':>11} {'numpy':>9} "
            f"{'redis':>9} | {'x numpy':>7} {'x redis':>7} | {'checked':>7} {'bad':>3} "
            f"{'redis ok/tie/bad':>16}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['n']:>7} | {r['index_p50_us']:>9.1f} {r['index_p99_us']:>6.1f} "
            f"{r['index_queries_per_s']:>9,} {r['index_python_p50_us']:>6.1f} | "
            f"{r['numpy_p50_us']:>9.1f} "
            f"{r['numpy_queries_per_s']:>7,} | {r['redis_roundtrip_p50_us']:>8.1f} "
            f"{r['redis_pipelined_us']:>7.1f} {r['redis_pipelined_queries_per_s']:>7,} | "
            f"{r['index_updates_per_s']:>11,} {r['numpy_updates_per_s']:>9,} "
            f"{r['redis_updates_per_s']:>9,} | {r['index_vs_numpy_x']:>7.0f} "
            f"{r['index_vs_redis_pipelined_x']:>7.1f} | {r['checked_vs_numpy']:>7} "
            f"{r['mismatches_vs_numpy'] + r['answers_differing_from_python']:>3} "
            f"{r['redis_equal']:>6}/{r['redis_ties']}/{r['redis_mismatches']:<6}")
    lines.append("(µs a query, k = 1; python = the index's pure-Python search, p50; x = competitor "
                 "p50 ÷ index p50; redis pipelined = time per query in pipelines; ties = Redis "
                 "picked another responder within 1 m; bad counts the python search too)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=2000, help="queries per round")
    ap.add_argument("--redis-rt", type=int, default=500, help="round-trip queries per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pipeline", type=int, default=100)
    ap.add_argument("--step-m", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--redis-cpu", type=int, default=None,
                    help="pin redis-server to this CPU (default: one this process is not on)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    mine = sorted(os.sched_getaffinity(0))
    others = sorted(set(range(os.cpu_count() or 1)) - set(mine))
    redis_cpu = args.redis_cpu if args.redis_cpu is not None else (others[0] if others else None)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-geo-") as tmp:
        server = RedisServer(Path(tmp), appendfsync="no", extra_args=("--appendonly", "no"))
        server.start()
        try:
            proc = getattr(server, "_process", None)
            if redis_cpu is not None and proc is not None:
                os.sched_setaffinity(proc.pid, {redis_cpu})
            geo = RedisGeo(server.url, args.pipeline)
            version = geo.r.info("server").get("redis_version")
            for n in sizes:
                t0 = time.perf_counter()
                rows.append(run_size(n, args, geo))
                print(f"# n={n}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            geo.close()
        finally:
            server.kill()
    print(table(rows))
    if args.out:
        doc = {
            "bench": "responder index vs numpy vs redis GEOSEARCH",
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "numpy": np.__version__,
            "redis_py": redis.__version__,
            "hiredis": HIREDIS_AVAILABLE,
            "redis_server": version,
            "affinity": mine,
            "redis_cpu": redis_cpu,
            "args": vars(args),
            "results": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    bad = any(r["mismatches_vs_numpy"] or r["answers_differing_from_python"]
              or r["redis_mismatches"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
