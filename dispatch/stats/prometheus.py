"""Gauge samples of the statistics for Prometheus, with bounded labels only.

``grid`` labels are ids of level-1 and level-2 grids (a town: 1 + 13), ``level`` is 3/2/1,
``group`` a safety group, ``category`` a category code — never incident, responder or level-3
grid ids. Values are today's (local day) figures at ``now``; a rate whose denominator is 0 and a
safety score of a grid without population are left out (no sample) rather than exported as NaN.

The server registers a collector that calls :func:`prometheus_samples` for each engine at scrape
time and turns the samples into metric families with :func:`metric_families`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

from dispatch.stats.config import ALERT_GROUPS, StatsConfig, coerce_config
from dispatch.stats.index import DAY_S, EngineLike, day_of, day_start, index_for
from dispatch.stats.kpi import LEVEL_KEYS, KpiSums, kpi_of
from dispatch.stats.safety import entry, grid_counts


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dispatch_safety_score": (
        "Safety index v1 today (0-100, 100 = safest) per level-1/2 grid", ("grid",)),
    "dispatch_safety_alerts": (
        "Safety alerts reported today per level-1/2 grid and group", ("grid", "group")),
    "dispatch_closure_rate": (
        "Closure rate today (closed / due for closure), 0..1, per level-1/2 grid", ("grid",)),
    "dispatch_on_time_rate": (
        "On-time closure rate today (closed on time / due for closure), 0..1", ("grid",)),
    "dispatch_share_closed_l32": (
        "Share of today's closed cases closed at levels 3 and 2, 0..1", ("grid",)),
    "dispatch_due_today": ("Cases due for closure today per level-1/2 grid", ("grid",)),
    "dispatch_closed_today": ("Cases closed today per level-1/2 grid", ("grid",)),
    "dispatch_grid_open_incidents": (
        "Open incidents per level-1/2 grid by owning level", ("grid", "level")),
    "dispatch_reported_today": (
        "Incidents reported today per town (level-1 grid) and category", ("grid", "category")),
}


def prometheus_samples(engine: EngineLike, now: float, config: StatsConfig | None = None
                       ) -> list[Sample]:
    """Today's gauges of one engine (town). See :data:`METRICS` for names, help and labels."""
    cfg = coerce_config(config)
    off = cfg.offset_s
    town = engine.town
    idx = index_for(engine, off, now, cfg.reconcile_every_s)
    today = day_of(now, off)
    start = day_start(today, off)
    end = start + DAY_S
    upper = sorted(gid for gid, g in town.grids.items() if g.level <= 2)

    ledger = idx.ledger(today)  # the cases closed today; the open ones are walked here
    ledger.watch(upper)
    open_sums: dict[str, KpiSums] = {gid: KpiSums() for gid in upper}
    open_tally: dict[tuple[str, str], int] = {}
    for inc in idx.open.values():
        for key in ("1", "2"):
            gid = inc.grids.get(key, "")
            sums = open_sums.get(gid)
            if sums is not None:
                sums.add_open(inc, start, end, now)
                gl = (gid, str(inc.level))
                open_tally[gl] = open_tally.get(gl, 0) + 1

    counts = idx.counts(today)
    out: list[Sample] = []
    for gid in upper:
        g = {"grid": gid}
        k = kpi_of(ledger.scope(gid).all, open_sums[gid])
        found = grid_counts(counts, gid)
        safety = entry(found, town.grids[gid].population, cfg)
        if safety["score"] is not None:
            out.append(Sample("dispatch_safety_score", g, float(safety["score"])))
        for group in ALERT_GROUPS:
            out.append(Sample("dispatch_safety_alerts", {"grid": gid, "group": group},
                              float(found[group])))
        for name, key in (("dispatch_closure_rate", "closure_rate"),
                          ("dispatch_on_time_rate", "on_time_rate"),
                          ("dispatch_share_closed_l32", "share_closed_l32")):
            if k[key] is not None:
                out.append(Sample(name, g, float(k[key])))
        out.append(Sample("dispatch_due_today", g, float(k["due"])))
        out.append(Sample("dispatch_closed_today", g, float(k["closed"])))
        for level in LEVEL_KEYS:
            out.append(Sample("dispatch_grid_open_incidents", {"grid": gid, "level": level},
                              float(open_tally.get((gid, level), 0))))
        if town.grids[gid].level == 1:
            by_cat = counts.categories.get(gid, Counter())
            for code in sorted(town.categories):
                out.append(Sample("dispatch_reported_today", {"grid": gid, "category": code},
                                  float(by_cat.get(code, 0))))
    return out


def metric_families(samples: Iterable[Sample]) -> list[Any]:
    """``prometheus_client`` ``GaugeMetricFamily`` objects, one per name of :data:`METRICS`
    (present even without samples), for a custom collector's ``collect()``."""
    from prometheus_client.core import GaugeMetricFamily

    families = {
        name: GaugeMetricFamily(name, doc, labels=list(labels))
        for name, (doc, labels) in METRICS.items()
    }
    for s in samples:
        fam = families[s.name]
        fam.add_metric([s.labels[label] for label in METRICS[s.name][1]], s.value)
    return list(families.values())
