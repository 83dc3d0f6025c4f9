"""Safety index v1 (平安指数), per grid and per local day.

For a grid with ``population`` P > 0 and a day:

1. ``n_k`` = incidents reported that day in the grid (or any grid under it) whose category's
   ``group`` is k, for k in public_security, fire, traffic (``other`` is not an alert).
2. rate ``r_k = n_k / P × 10,000`` (alerts per 10,000 residents).
3. sub-score ``s_k = 100 × max(0, 1 − r_k / saturation_k)``: 100 with no alerts, 0 at or above
   the saturation rate.
4. score ``S = Σ w_k·s_k / Σ w_k`` over the groups with a weight above 0 (0..100, 100 = safest),
   rounded to 2 decimals.
5. colour (national warning colours, level IV → I): ``red`` if S ≤ red, else ``orange`` if
   S ≤ orange, else ``yellow`` if S ≤ yellow, else ``blue`` if S ≤ blue, else ``None`` (no
   warning).

A grid without a population (or with 0) has counts but no rates, score or colour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dispatch.engine.model import Town
from dispatch.engine.state import Incident
from dispatch.stats.config import ALERT_GROUPS, StatsConfig, coerce_config
from dispatch.stats.index import (
    DayCounts,
    EngineLike,
    day_label,
    day_of,
    index_for,
    tally,
)

PER = 10_000.0


def score(rates: Mapping[str, float], config: StatsConfig) -> float:
    """Composite score 0..100 (higher is safer) of per-10,000 ``rates`` by group (unrounded)."""
    total = acc = 0.0
    for group, weight in config.safety_weights.items():
        if weight > 0:
            ratio = rates.get(group, 0.0) / config.safety_saturation[group]
            acc += weight * 100.0 * max(0.0, 1.0 - ratio)
            total += weight
    return acc / total


def colour(value: float, config: StatsConfig) -> str | None:
    """``"red"``, ``"orange"``, ``"yellow"``, ``"blue"`` or ``None`` (no warning)."""
    if value <= config.safety_red:
        return "red"
    if value <= config.safety_orange:
        return "orange"
    if value <= config.safety_yellow:
        return "yellow"
    if value <= config.safety_blue:
        return "blue"
    return None


def entry(counts: Mapping[str, int], population: int | None, config: StatsConfig
          ) -> dict[str, Any]:
    """One grid's index from its alert ``counts`` by group and its ``population``."""
    groups = {*ALERT_GROUPS, *(g for g, w in config.safety_weights.items() if w > 0)}
    n = {g: int(counts.get(g, 0)) for g in sorted(groups)}
    out: dict[str, Any] = {
        "score": None,
        "colour": None,
        "public_security": None,
        "fire": None,
        "traffic": None,
        "alerts": sum(n[g] for g in ALERT_GROUPS),
        "counts": n,
        "population": population,
    }
    if population:
        rates = {g: v / population * PER for g, v in n.items()}
        s = round(score(rates, config), 2)
        out["score"] = s
        out["colour"] = colour(s, config)
        for g in ALERT_GROUPS:
            out[g] = round(rates[g], 4)
    return out


def grid_counts(counts: DayCounts, grid: str) -> dict[str, int]:
    """Alert counts by group of one grid from a day's tallies."""
    bg = counts.groups.get(grid)
    if bg is None:
        return dict.fromkeys((*ALERT_GROUPS, "other"), 0)
    return {g: bg.get(g, 0) for g in (*ALERT_GROUPS, "other")}


def window_counts(incidents: Iterable[Incident], town: Town, lo: float, hi: float) -> DayCounts:
    """Tallies of the incidents reported in ``(lo, hi]`` (the trailing-window variant)."""
    return tally([i for i in incidents if lo < i.reported_at <= hi], town)


def safety_map(counts: DayCounts, town: Town, grids: Iterable[str], config: StatsConfig
               ) -> dict[str, dict[str, Any]]:
    return {
        gid: entry(grid_counts(counts, gid), town.grids[gid].population, config) for gid in grids
    }


def safety_history(engine: EngineLike, grid: str, days: int = 30, *, now: float,
                   config: StatsConfig | None = None) -> list[dict[str, Any]]:
    """The index of ``grid`` for the last ``days`` local days, oldest first; the last entry is
    today so far. Each entry: ``day`` (YYYY-MM-DD) plus the fields of a ``safety`` entry."""
    cfg = coerce_config(config)
    idx = index_for(engine, cfg.offset_s, now, cfg.reconcile_every_s)
    return history(idx.counts, engine.town, grid, days, day_of(now, cfg.offset_s), cfg)


def history(counts_of: Callable[[int], DayCounts], town: Town, grid: str, days: int,
            today: int, config: StatsConfig) -> list[dict[str, Any]]:
    """Per-day entries of ``grid`` for the ``days`` local days ending with ``today``."""
    g = town.grids.get(grid)
    population = g.population if g is not None else None
    out: list[dict[str, Any]] = []
    for day in range(today - days + 1, today + 1):
        counts = counts_of(day)
        out.append({"day": day_label(day), **entry(grid_counts(counts, grid), population, config)})
    return out

