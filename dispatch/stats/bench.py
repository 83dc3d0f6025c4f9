"""Speed of the statistics on a town with many incidents in memory.

    python -m dispatch.stats.bench [--incidents 100000] [--days 60] [--repeat 50]

Builds a town of 1 + 13 + 68 grids (the demo town's shape) and 20 categories, fills a
``TownState`` directly with ``--incidents`` incidents spread over ``--days`` local days (about
98 % closed, the rest open and recent), then times :func:`compute_stats` for the town and a
village, :func:`prometheus_samples` and :func:`safety_history`, cold (first call, which builds
the index) and warm (the periodic case: one new event between calls). Prints one line per figure.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence

from dispatch.engine.model import Category, Grid, Town
from dispatch.engine.state import Incident, TownState
from dispatch.stats import compute_stats, prometheus_samples, safety_history
from dispatch.stats.config import StatsConfig
from dispatch.stats.index import index_for
from dispatch.wire.codec import dumps

_GROUPS = ("public_security",) * 5 + ("fire",) * 3 + ("traffic",) * 3 + ("other",) * 9
_LIMITS = {3: 7200.0, 2: 86400.0, 1: 259200.0}


class BenchEngine:
    def __init__(self, town: Town, state: TownState) -> None:
        self.town = town
        self.state = state


def build_town() -> Town:
    grids: dict[str, Grid] = {"T": Grid("T", 1, None, "Town", 250_000)}
    n = 0
    for v in range(13):
        vid = f"V{v:02d}"
        grids[vid] = Grid(vid, 2, "T", vid, 19_000)
        for _ in range(68 // 13 + (1 if v < 68 % 13 else 0)):
            gid = f"G{n:02d}"
            grids[gid] = Grid(gid, 3, vid, gid, 2_500 if n % 10 else None)
            n += 1
    cats = {
        f"c{i:02d}": Category(f"c{i:02d}", f"Category {i}", g, 3, False, _LIMITS)  # type: ignore[arg-type]
        for i, g in enumerate(_GROUPS)
    }
    return Town("T", grids, cats, {})


def build(n_incidents: int, days: int, now: float, seed: int = 1) -> BenchEngine:
    town = build_town()
    rng = random.Random(seed)
    l3 = [g for g in town.grids.values() if g.level == 3]
    codes = sorted(town.categories)
    state = TownState(town=town, index=None)  # type: ignore[arg-type]
    start = now - days * 86_400.0
    step = (now - start) / n_incidents
    for i in range(n_incidents):
        t = start + i * step
        g = rng.choice(l3)
        assert g.parent is not None
        inc = Incident(
            id=f"T-{i:06d}", ref=str(i), category=rng.choice(codes), priority=3, lon=0.0,
            lat=0.0, grids={"3": g.id, "2": g.parent, "1": "T"}, level=3, source="field",
            reported_at=t, deadline=t + 7200.0,
        )
        age = now - t
        if rng.random() < 0.4:
            inc.handled = True
            inc.status, inc.resolved_at, inc.closed_at, inc.closed_level = "closed", t, t, 3
        elif age > 12 * 3600 or rng.random() < 0.1:
            inc.offered_at = t + rng.uniform(1, 60)
            inc.assigned_at = inc.offered_at + rng.uniform(5, 120)
            inc.arrived_at = inc.assigned_at + rng.uniform(60, 1800)
            done = min(inc.arrived_at + rng.uniform(300, 7200), now)
            inc.status, inc.resolved_at, inc.closed_at = "closed", done, done
            inc.level = inc.closed_level = rng.choice((3, 3, 3, 3, 2, 2, 1))
            inc.on_time = done <= inc.deadline if inc.deadline else True
            inc.reopened = 1 if rng.random() < 0.01 else 0
        else:
            inc.status = rng.choice(("new", "offered", "assigned", "on_scene"))
            state.open_ids.add(inc.id)
        state.incidents[inc.id] = inc
    state.seq = n_incidents * 5
    return BenchEngine(town, state)


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), max(samples)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--incidents", type=int, default=100_000)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args(argv)
    now = 1_795_255_200.0  # 2026-11-21 18:00 local (UTC+8)
    t0 = time.perf_counter()
    engine = build(args.incidents, args.days, now)
    print(f"built {len(engine.state.incidents)} incidents over {args.days} days, "
          f"{len(engine.state.open_ids)} open, in {time.perf_counter() - t0:.1f} s")
    cfg = StatsConfig()

    t0 = time.perf_counter()
    out = compute_stats(engine, "T", now, cfg)
    print(f"compute_stats(town) cold (builds the index): {(time.perf_counter() - t0) * 1e3:.1f} ms")
    print(f"stats message for the town: {len(dumps(out)) / 1024:.1f} KiB of JSON")

    def one_event_then(scope: str) -> Callable[[], object]:
        def run() -> object:
            engine.state.seq += 1   # something happened: the open set is re-read
            return compute_stats(engine, scope, now, cfg)
        return run

    for label, fn in (
        ("compute_stats(town), warm, after an event", one_event_then("T")),
        ("compute_stats(village), warm, after an event", one_event_then("V00")),
        ("compute_stats(town), warm, no change", lambda: compute_stats(engine, "T", now, cfg)),
        ("prometheus_samples, warm", lambda: prometheus_samples(engine, now, cfg)),
        ("safety_history(30 days), warm",
         lambda: safety_history(engine, "V00", 30, now=now, config=cfg)),
        ("full reconcile (every reconcile_every_s)",
         lambda: index_for(engine, cfg.offset_s, now, 60).reconcile(now)),
    ):
        med, worst = _time(fn, args.repeat)
        print(f"{label}: median {med * 1e3:.2f} ms, max {worst * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
