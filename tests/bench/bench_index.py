"""Benchmark the responder index: nearest-query latency and update rate with moving responders.

Run: ``python -m tests.bench.bench_index [--sizes 1000,10000,100000] [--out bench.json]``
(or ``python tests/bench/bench_index.py …``). Pin it to one core for stable numbers:
``taskset -c 1 python -m tests.bench.bench_index``.

For each size ``n`` it places ``n`` responders uniformly in a ~20 km square town around
22.61°N 113.19°E, all available in one pool, and runs ``--rounds`` rounds of:

* **walk**: every responder moves up to ``--step-m`` metres (a 1 Hz position feed) — updates/s;
* **k=1 / k=5**: nearest queries at random points of the town — median and p99 µs per call;
* **rare skill**: a second index where 99 % of responders have skill ``patrol`` and 1 % ``hazmat``,
  queried for ``hazmat`` — shows the per-skill maps keep a rare skill cheap; its responders are
  also in a level-3 and a level-2 pool, as in the engine, so its walk measures 3 maps a responder;
* **clustered**: a third index whose responders crowd around 13 village centres (Gaussian,
  300 m), queried at random points of the town — most queries land in empty land between
  villages, which the best-first tree search handles;
* **numpy**: a vectorised brute-force haversine scan over the same positions — the baseline;
  a sample of queries is checked against it (exactly, re-scored with ``haversine_m``).

Then **teleport**: every responder jumps to a random point (every update changes cell) —
the worst-case update rate.

External backends (Redis GEOSEARCH, …) plug in through :data:`EXTERNAL_BACKENDS`; see
:class:`ExternalBackend`. None is registered here.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dispatch.geo.distance import EARTH_RADIUS_M, haversine_m
from dispatch.geo.index import CellIndex

LON0, LAT0 = 113.19, 22.61
HALF_SIDE_M = 10_000.0
M_PER_DEG_LAT = EARTH_RADIUS_M * math.pi / 180.0
DLAT = HALF_SIDE_M / M_PER_DEG_LAT
DLON = DLAT / math.cos(math.radians(LAT0))


# -- hook for other backends -------------------------------------------------------------------


class ExternalBackend(Protocol):
    """Another implementation to compare against, e.g. Redis ``GEOADD``/``GEOSEARCH``.

    ``load`` gets the initial positions, ``move_many`` one round of moves (returns updates/s as
    it measured them, pipelining as it sees fit), ``nearest`` one query (ids, nearest first).
    """

    name: str

    def load(self, rids: Sequence[str], lons: Sequence[float], lats: Sequence[float]) -> None: ...

    def move_many(
        self, rids: Sequence[str], lons: Sequence[float], lats: Sequence[float]
    ) -> float: ...

    def nearest(self, lon: float, lat: float, k: int) -> list[str]: ...

    def close(self) -> None: ...


EXTERNAL_BACKENDS: dict[str, Callable[[argparse.Namespace], ExternalBackend]] = {}
"""Name -> factory. A Redis GEOSEARCH backend registers itself here (later work)."""


# -- the town ----------------------------------------------------------------------------------


@dataclass
class Town:
    rids: list[str]
    lons: list[float]
    lats: list[float]

    @classmethod
    def uniform(cls, n: int, rng: random.Random) -> Town:
        return cls(
            [f"r{i:06d}" for i in range(n)],
            [LON0 + rng.uniform(-DLON, DLON) for _ in range(n)],
            [LAT0 + rng.uniform(-DLAT, DLAT) for _ in range(n)],
        )

    @classmethod
    def clustered(cls, n: int, rng: random.Random, villages: int = 13, sd_m: float = 300.0) -> Town:
        """Everyone near one of ``villages`` centres (Gaussian, ``sd_m``): empty land between."""
        centres = [
            (LON0 + rng.uniform(-DLON, DLON), LAT0 + rng.uniform(-DLAT, DLAT))
            for _ in range(villages)
        ]
        sd = sd_m / M_PER_DEG_LAT
        picks = [rng.choice(centres) for _ in range(n)]
        return cls(
            [f"c{i:06d}" for i in range(n)],
            [c[0] + rng.gauss(0.0, sd) / math.cos(math.radians(LAT0)) for c in picks],
            [c[1] + rng.gauss(0.0, sd) for c in picks],
        )

    def walk(self, rng: random.Random, step_m: float) -> None:
        """Everyone moves up to ``step_m`` metres, reflecting at the town edge."""
        dlat_m = 1.0 / M_PER_DEG_LAT
        dlon_m = dlat_m / math.cos(math.radians(LAT0))
        for i in range(len(self.rids)):
            d = step_m * math.sqrt(rng.random())
            a = rng.random() * math.tau
            self.lons[i] = _reflect(self.lons[i] + d * math.cos(a) * dlon_m, LON0, DLON)
            self.lats[i] = _reflect(self.lats[i] + d * math.sin(a) * dlat_m, LAT0, DLAT)

    def teleport(self, rng: random.Random) -> None:
        for i in range(len(self.rids)):
            self.lons[i] = LON0 + rng.uniform(-DLON, DLON)
            self.lats[i] = LAT0 + rng.uniform(-DLAT, DLAT)


def _reflect(x: float, c: float, h: float) -> float:
    if x > c + h:
        return 2 * (c + h) - x
    if x < c - h:
        return 2 * (c - h) - x
    return x


def query_points(rng: random.Random, q: int) -> list[tuple[float, float]]:
    return [(LON0 + rng.uniform(-DLON, DLON), LAT0 + rng.uniform(-DLAT, DLAT)) for _ in range(q)]


# -- measuring ---------------------------------------------------------------------------------


def feed(idx: CellIndex, town: Town, ts: float) -> float:
    """Send every responder's position once; returns updates per second."""
    move = idx.move
    rows = list(zip(town.rids, town.lons, town.lats, strict=True))
    t0 = time.perf_counter()
    for rid, lon, lat in rows:
        move(rid, lon, lat, ts)
    return len(rows) / (time.perf_counter() - t0)


def time_queries(
    idx: CellIndex, points: list[tuple[float, float]], skill: str, k: int
) -> tuple[list[float], list[list[tuple[str, float]]]]:
    """Per-call µs and the answers."""
    near = idx.nearest
    clock = time.perf_counter_ns
    out: list[float] = []
    answers: list[list[tuple[str, float]]] = []
    for lon, lat in points:
        t0 = clock()
        got = near("town", lon, lat, skill=skill, fresh_since=0.0, k=k)
        out.append((clock() - t0) / 1000.0)
        answers.append(got)
    return out, answers


class Brute:
    """Vectorised haversine over numpy arrays: the baseline, and the exact reference."""

    def __init__(self, town: Town, mask: np.ndarray[Any, Any] | None = None) -> None:
        self.rids = np.array(town.rids)
        self.lon = np.array(town.lons)
        self.lat = np.array(town.lats)
        self.keep = np.flatnonzero(mask) if mask is not None else None
        if self.keep is not None:
            self.rids, self.lon, self.lat = (
                self.rids[self.keep],
                self.lon[self.keep],
                self.lat[self.keep],
            )
        self.phi = np.radians(self.lat)
        self.cos_phi = np.cos(self.phi)

    def distances(self, lon: float, lat: float) -> np.ndarray[Any, Any]:
        p = math.radians(lat)
        a = (
            np.sin((self.phi - p) * 0.5) ** 2
            + math.cos(p) * self.cos_phi * np.sin(np.radians(self.lon - lon) * 0.5) ** 2
        )
        d: np.ndarray[Any, Any] = 2.0 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(a, 1.0)))
        return d

    def nearest_index(self, lon: float, lat: float) -> int:
        return int(np.argmin(self.distances(lon, lat)))

    def exact(self, lon: float, lat: float, k: int) -> list[tuple[str, float]]:
        """The contract's answer: the k smallest (haversine_m, id), re-scored in Python."""
        d = self.distances(lon, lat)
        kk = min(k, len(d)) - 1
        if kk < 0:
            return []
        cut = float(np.partition(d, kk)[kk]) + 1e-6
        cand = np.flatnonzero(d <= cut)
        rows = sorted(
            (haversine_m(lon, lat, float(self.lon[i]), float(self.lat[i])), str(self.rids[i]))
            for i in cand
        )
        return [(rid, dist) for dist, rid in rows[:k]]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def build(
    town: Town,
    skills_of: Callable[[int], frozenset[str]],
    *,
    grids: bool = False,
    speedups: bool = True,
) -> CellIndex:
    """All available in pool "town"; with ``grids``, also in their level-3 and level-2 pools
    (a 9 x 9 partition of the town into basic grids, 3 x 3 of them per village)."""
    idx = CellIndex(speedups=speedups)
    for i, rid in enumerate(town.rids):
        pools = ["town"]
        if grids:
            gx = min(8, int((town.lons[i] - LON0 + DLON) / (2 * DLON) * 9))
            gy = min(8, int((town.lats[i] - LAT0 + DLAT) / (2 * DLAT) * 9))
            pools = [f"g3-{gx}-{gy}", f"g2-{gx // 3}-{gy // 3}", "town"]
        idx.register(rid, pools, skills_of(i))
        idx.set_available(rid, True)
    feed(idx, town, 0.0)
    return idx


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed * 1_000_003 + n)
    town = Town.uniform(n, rng)
    idx = build(town, lambda i: frozenset({"*"}))
    rare = build(town, lambda i: frozenset({"hazmat"} if i % 100 == 0 else {"patrol"}), grids=True)
    rare_mask = np.array([i % 100 == 0 for i in range(n)])
    villages = Town.clustered(n, rng)
    clustered = build(villages, lambda i: frozenset({"*"}))
    brute_villages = Brute(villages)
    gc.collect()
    if args.gc == "freeze":
        gc.freeze()  # what a server can do once its static state is loaded
    externals = [EXTERNAL_BACKENDS[name](args) for name in args.compare]
    for ext in externals:
        ext.load(town.rids, town.lons, town.lats)

    res: dict[str, list[float]] = {
        k: [] for k in ("k1", "k5", "rare", "clustered", "numpy", "walk", "rare_walk", "timer")
    }
    ext_res: dict[str, dict[str, list[float]]] = {e.name: {"k1": [], "walk": []} for e in externals}
    checked = mismatches = 0
    clock = time.perf_counter_ns
    for rnd in range(args.rounds):
        town.walk(rng, args.step_m)
        res["walk"].append(feed(idx, town, 1.0 + rnd))
        res["rare_walk"].append(feed(rare, town, 1.0 + rnd))
        for ext in externals:
            ext_res[ext.name]["walk"].append(ext.move_many(town.rids, town.lons, town.lats))
        pts = query_points(rng, args.queries)
        t1, a1 = time_queries(idx, pts, "any", 1)
        t5, a5 = time_queries(idx, pts[: args.queries // 4], "any", 5)
        tr, ar = time_queries(rare, pts[: args.queries // 4], "hazmat", 1)
        res["k1"] += t1
        res["k5"] += t5
        res["rare"] += tr
        tc, ac = time_queries(clustered, pts[: args.queries // 4], "any", 1)
        res["clustered"] += tc
        for _ in range(1000):
            t0 = clock()
            res["timer"].append((clock() - t0) / 1000.0)

        brute = Brute(town)
        brute_rare = Brute(town, rare_mask)
        nb = max(20, min(args.check, 2_000_000 // max(n, 1)))
        for lon, lat in pts[:nb]:
            t0 = clock()
            brute.nearest_index(lon, lat)
            res["numpy"].append((clock() - t0) / 1000.0)
        for j in range(min(nb, len(a5))):
            lon, lat = pts[j]
            for got, want in (
                (a1[j], brute.exact(lon, lat, 1)),
                (a5[j], brute.exact(lon, lat, 5)),
                (ar[j], brute_rare.exact(lon, lat, 1)),
                (ac[j], brute_villages.exact(lon, lat, 1)),
            ):
                checked += 1
                if got != want:
                    mismatches += 1
                    print(f"MISMATCH n={n} at {lon},{lat}: {got} != {want}", file=sys.stderr)
        for ext in externals:
            for j, (lon, lat) in enumerate(pts):
                t0 = clock()
                ids = ext.nearest(lon, lat, 1)
                ext_res[ext.name]["k1"].append((clock() - t0) / 1000.0)
                checked += 1
                if ids != [a1[j][0][0]]:
                    mismatches += 1

    teleport: list[float] = []
    for rnd in range(args.rounds):
        town.teleport(rng)
        teleport.append(feed(idx, town, 100.0 + rnd))
    for ext in externals:
        ext.close()

    out: dict[str, Any] = {
        "n": n,
        "k1_p50_us": statistics.median(res["k1"]),
        "k1_p99_us": pct(res["k1"], 0.99),
        "k5_p50_us": statistics.median(res["k5"]),
        "k5_p99_us": pct(res["k5"], 0.99),
        "rare_skill_p50_us": statistics.median(res["rare"]),
        "rare_skill_p99_us": pct(res["rare"], 0.99),
        "clustered_p50_us": statistics.median(res["clustered"]),
        "clustered_p99_us": pct(res["clustered"], 0.99),
        "numpy_p50_us": statistics.median(res["numpy"]),
        "numpy_p99_us": pct(res["numpy"], 0.99),
        "walk_updates_per_s": statistics.median(res["walk"]),
        "walk_updates_per_s_3pools": statistics.median(res["rare_walk"]),
        "teleport_updates_per_s": statistics.median(teleport),
        "timer_overhead_us": statistics.median(res["timer"]),
        "queries_k1": len(res["k1"]),
        "checked": checked,
        "mismatches": mismatches,
        "maps": {f"{p}/{g}": lv for (p, g), lv in idx.pool_levels().items()},
        "external": {
            name: {
                "k1_p50_us": statistics.median(r["k1"]),
                "k1_p99_us": pct(r["k1"], 0.99),
                "walk_updates_per_s": statistics.median(r["walk"]),
            }
            for name, r in ext_res.items()
        },
    }
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'n':>8} | {'k=1 p50':>8} {'p99':>7} | {'k=5 p50':>8} {'p99':>7} | "
        f"{'rare p50':>8} {'p99':>7} | {'clus p50':>8} {'p99':>7} | {'numpy p50':>9} {'x':>5} | "
        f"{'walk upd/s':>10} {'3 pools':>10} {'teleport/s':>10} | {'checked':>7} {'bad':>3}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['n']:>8} | {r['k1_p50_us']:>8.1f} {r['k1_p99_us']:>7.1f} | "
            f"{r['k5_p50_us']:>8.1f} {r['k5_p99_us']:>7.1f} | "
            f"{r['rare_skill_p50_us']:>8.1f} {r['rare_skill_p99_us']:>7.1f} | "
            f"{r['clustered_p50_us']:>8.1f} {r['clustered_p99_us']:>7.1f} | "
            f"{r['numpy_p50_us']:>9.1f} {r['numpy_p50_us'] / r['k1_p50_us']:>5.0f} | "
            f"{r['walk_updates_per_s']:>10,.0f} {r['walk_updates_per_s_3pools']:>10,.0f} "
            f"{r['teleport_updates_per_s']:>10,.0f} | "
            f"{r['checked']:>7} {r['mismatches']:>3}"
        )
    lines.append("(µs per call, timer overhead included; x = numpy p50 / index k=1 p50)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated n")
    ap.add_argument("--queries", type=int, default=4000, help="k=1 queries per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step-m", type=float, default=10.0, help="max metres moved per update")
    ap.add_argument("--check", type=int, default=400, help="queries checked per round")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument(
        "--gc",
        choices=["on", "freeze", "off"],
        default="on",
        help="garbage collector during the run (freeze: gc.freeze() after building)",
    )
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME",
        help="also run a registered external backend (none registered yet)",
    )
    args = ap.parse_args(argv)
    for name in args.compare:
        if name not in EXTERNAL_BACKENDS:
            known = ", ".join(sorted(EXTERNAL_BACKENDS)) or "none"
            ap.error(f"no external backend {name!r} is registered (registered: {known})")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.gc == "off":
        gc.disable()
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        rows.append(run_size(n, args))
        print(f"n={n}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(table(rows))
    if args.out:
        doc = {
            "bench": "responder index",
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "args": vars(args),
            "town": {"lon": LON0, "lat": LAT0, "side_m": 2 * HALF_SIDE_M},
            "results": rows,
        }
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    return 1 if any(r["mismatches"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
