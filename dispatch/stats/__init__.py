"""Governance statistics of a town: KPIs, safety index, hotspots (``docs/statistics.md``).

Entry points (all pure: no I/O, no clock; ``now`` is epoch seconds):

* :func:`compute_stats` — the ``stats`` object of one scope (screen snapshots, the periodic
  ``stats`` message, ``GET /api/stats``);
* :func:`safety_history` — one grid's safety index for the last N local days;
* :func:`prometheus_samples` — gauge samples with bounded labels (:mod:`dispatch.stats.prometheus`).

A scope is a grid id; the cases of a scope are the incidents whose ``grids`` contain it. The
period of the live figures is *today*: the local calendar day (UTC+8 by default) containing
``now``. Definitions: :mod:`dispatch.stats.kpi`, :mod:`dispatch.stats.safety`,
:mod:`dispatch.stats.hotspots`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dispatch.engine.model import Town
from dispatch.engine.state import Incident
from dispatch.stats import hotspots as _hotspots
from dispatch.stats.config import (
    SAFETY_INDEX_VERSION,
    StatsConfig,
    coerce_config,
    config_from_settings,
)
from dispatch.stats.index import (
    DAY_S,
    DayCounts,
    EngineLike,
    StatsIndex,
    day_label,
    day_of,
    day_start,
    index_for,
)
from dispatch.stats.kpi import (
    LEVEL_KEYS,
    STATUSES,
    KpiSums,
    ScopeSums,
    add_to_groups,
    case_keys,
    kpi_of,
)
from dispatch.stats.prometheus import METRICS, Sample, metric_families, prometheus_samples
from dispatch.stats.safety import history, safety_history, safety_map, window_counts
from dispatch.wire.codec import iso

__all__ = [
    "METRICS",
    "SAFETY_INDEX_VERSION",
    "Sample",
    "StatsConfig",
    "compute_stats",
    "config_from_settings",
    "keep_up",
    "metric_families",
    "prometheus_samples",
    "safety_history",
]


def scope_filter(town: Town, scope: str) -> Callable[[Incident], bool]:
    """``inc → bool``: does the incident lie in ``scope`` (its ``grids`` contain the id)."""
    g = town.grids.get(scope)
    if g is not None:
        key = str(g.level)
        return lambda inc: inc.grids.get(key) == scope
    return lambda inc: scope in inc.grids.values()


def live_safety_counts(idx: StatsIndex, today: int, now: float, cfg: StatsConfig) -> DayCounts:
    """Tallies behind today's live safety index: the local day so far, or the trailing
    ``safety_window_s`` when configured."""
    if cfg.safety_window_s is None:
        return idx.counts(today)
    lo = now - cfg.safety_window_s
    first = day_of(lo, cfg.offset_s)
    incidents = [i for d in range(first, today + 1) for i in idx.reported_on(d)]
    return window_counts(incidents, idx.town, lo, now)


def _history_days(idx: StatsIndex, today: int, cfg: StatsConfig) -> list[int]:
    if idx.first_day is None:
        return []
    return list(range(max(today - cfg.hotspot_days, idx.first_day), today))


def _breakdown(closed: Mapping[str, KpiSums], open_: Mapping[str, KpiSums],
               keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """kpi.breakdown() from sums: ``keys`` always present, other groups when they have cases."""
    out: dict[str, dict[str, Any]] = {k: kpi_of() for k in keys}
    for k in sorted({*closed, *open_}):
        out[k] = kpi_of(closed.get(k), open_.get(k))
    return out


def _counts(reported: Counter[tuple[str, str]], town: Town) -> dict[str, dict[str, int]]:
    """kpi.counts() from tallies of (field, value)."""
    out = {"by_status": dict.fromkeys(STATUSES, 0), "by_level": dict.fromkeys(LEVEL_KEYS, 0),
           "by_category": dict.fromkeys(sorted(town.categories), 0)}
    for (what, value), n in reported.items():
        if n:
            table = out[f"by_{what}"]
            table[value] = table.get(value, 0) + n
    return out


def keep_up(engine: EngineLike, now: float, config: StatsConfig | None = None) -> None:
    """File what changed since the last call (cases reported, closed, reopened). The server
    calls it a few times a second, so the index's work comes in small steps instead of all at
    once in a wall screen's refresh or a ``/metrics`` scrape."""
    cfg = coerce_config(config)
    index_for(engine, cfg.offset_s, now, cfg.reconcile_every_s)


def compute_stats(engine: EngineLike, scope: str, now: float,
                  config: StatsConfig | None = None) -> dict[str, Any]:
    """The statistics of ``scope`` at ``now`` (see the module docstring and
    ``docs/statistics.md`` for every key)."""
    cfg = coerce_config(config)
    off = cfg.offset_s
    town = engine.town
    idx = index_for(engine, off, now, cfg.reconcile_every_s)
    today = day_of(now, off)
    start = day_start(today, off)
    end = start + DAY_S
    in_scope = scope_filter(town, scope)
    grid = town.grids.get(scope)
    tree = idx.subtree(scope)

    # The cases closed today are in the day's ledger; only the open ones are walked here.
    closed_sums = idx.ledger(today).scope(scope)
    level = grid.level if grid is not None else 3
    open_sums = ScopeSums()
    open_by_level = dict.fromkeys(LEVEL_KEYS, 0)
    overdue = 0
    for inc in idx.open.values():
        if in_scope(inc):
            lv = str(inc.level)
            open_by_level[lv] = open_by_level.get(lv, 0) + 1
            overdue += inc.overdue
            add_to_groups(open_sums, case_keys(inc, town, level),
                          lambda k, inc=inc: k.add_open(inc, start, end, now))
            if start <= inc.reported_at < end:
                open_sums.reported.update(
                    (("status", inc.status), ("level", lv), ("category", inc.category)))

    day_counts = idx.counts(today)
    scope_cats: Mapping[str, int] = day_counts.categories.get(scope, Counter())
    cats = town.categories
    top = sorted(((n, code) for code, n in scope_cats.items() if n > 0),
                 key=lambda t: (-t[0], t[1]))[: cfg.top_categories]

    past = [idx.counts(d) for d in _history_days(idx, today, cfg)]
    spot_args: dict[str, Any] = {
        "min_count": cfg.hotspot_min_count, "sigmas": cfg.hotspot_sigmas,
        "limit": cfg.hotspot_limit,
    }
    grid_spots = _hotspots.detect(day_counts.total, [p.total for p in past],
                                  keys=tree.get(3, []), **spot_args)
    empty: Counter[str] = Counter()
    cat_spots = _hotspots.detect(scope_cats, [p.categories.get(scope, empty) for p in past],
                                 **spot_args)

    live = live_safety_counts(idx, today, now, cfg)
    safety_ids = ([scope, *tree.get(2, []), *tree.get(3, [])] if grid is not None else [])
    safety_ids = list(dict.fromkeys(safety_ids))

    children = tree.get(grid.level + 1 if grid is not None else 4, [])
    by_level, by_category, by_grid, by_department = (
        _breakdown(c, o, keys) for c, o, keys in zip(
            closed_sums.groups(), open_sums.groups(), (LEVEL_KEYS, (), children, ()),
            strict=True))

    return {
        "scope": scope,
        "at": iso(now),
        "day": day_label(today),
        "counts": _counts(closed_sums.reported + open_sums.reported, town),
        "open_by_level": open_by_level,
        "open_overdue": overdue,
        "kpi": kpi_of(closed_sums.all, open_sums.all),
        "top_categories": [
            {"category": code, "name": cats[code].name if code in cats else code, "count": n}
            for n, code in top
        ],
        "hotspots": [
            {"grid": h.key, "name": town.grids[h.key].name, "count": h.count,
             "baseline": round(h.mean, 2), "sd": round(h.sd, 2), "score": round(h.score, 2)}
            for h in grid_spots
        ],
        "hotspot_categories": [
            {"category": h.key, "name": cats[h.key].name if h.key in cats else h.key,
             "count": h.count, "baseline": round(h.mean, 2), "sd": round(h.sd, 2),
             "score": round(h.score, 2)}
            for h in cat_spots
        ],
        "safety_version": SAFETY_INDEX_VERSION,
        "safety": safety_map(live, town, safety_ids, cfg),
        "safety_trend": (history(idx.counts, town, scope, cfg.safety_history_days, today, cfg)
                         if grid is not None else []),
        "categories": {
            code: {"name": c.name, "group": c.group,
                   **({"name_zh": cfg.category_names_zh[code]}
                      if code in cfg.category_names_zh else {})}
            for code, c in cats.items()
        },
        "breakdown": {
            "by_level": by_level,
            "by_category": by_category,
            "by_grid": by_grid,
            "by_department": by_department,
        },
    }
