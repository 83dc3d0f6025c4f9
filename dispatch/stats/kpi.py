"""Case-handling KPIs of a period, as national digital city management evaluates them.

For a period ``[start, end)`` (the local day) seen at time ``now``, over a set of cases:

* **reported**: cases with ``reported_at`` in the period.
* **closed**: cases whose status is ``closed`` and whose ``closed_at`` is in the period.
* **due (应结案)**: the closed cases, plus the cases *not closed* whose ``deadline`` fell in the
  period (``start ≤ deadline ≤ now``, ``deadline < end``). Each case counts once. A case closed on
  an earlier day is not due again because its deadline falls today: it was counted on its day.
* **closed_on_time**: closed cases with ``on_time`` true (the engine's verdict at closing: not
  escalated for ``sla``, not overdue, resolved before its deadline).
* ``closure_rate = closed / due``, ``on_time_rate = closed_on_time / due``,
  ``rework_rate = reworked / closed`` (closed cases that had been reopened at least once),
  ``share_closed_l32 = closed_l32 / closed`` (closed while owned by level 3 or 2),
  ``share_handled_on_spot = handled_on_spot / closed`` (reported with ``handled: true``).
  A rate whose denominator is 0 is ``None``.
* ``median_s`` (seconds; cases handled on the spot excluded, they have no dispatch):
  ``offer`` = first offer − report, over cases first offered in the period; ``accept`` = first
  assignment − first offer, over cases first assigned in the period (after an offer); ``arrive``
  = first arrival − first assignment, over cases that arrived in the period; ``resolve`` = resolve
  − report, over cases resolved in the period; ``close`` = close − report, over the closed cases.
  The median of an even number of values is the mean of the middle two.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from heapq import merge
from statistics import median
from typing import Any

from dispatch.engine.model import Town
from dispatch.engine.state import Incident

MEDIAN_KEYS: tuple[str, ...] = ("offer", "accept", "arrive", "resolve", "close")
STATUSES: tuple[str, ...] = ("new", "offered", "assigned", "on_scene", "resolved", "closed")
LEVEL_KEYS: tuple[str, str, str] = ("3", "2", "1")


def rate(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator``, or ``None`` when the denominator is 0."""
    return numerator / denominator if denominator else None


def _median(values: list[float]) -> float | None:
    return round(median(values), 3) if values else None


def kpi(cases: Iterable[Incident], start: float, end: float, now: float) -> dict[str, Any]:
    """The KPIs of ``cases`` for the period ``[start, end)`` seen at ``now`` (module docstring)."""
    reported = due = closed = on_time = reworked = l32 = spot = 0
    values: tuple[list[float], ...] = ([], [], [], [], [])  # MEDIAN_KEYS' order
    for inc in cases:
        rep = inc.reported_at
        if start <= rep < end:
            reported += 1
        c = inc.closed_at
        if inc.status == "closed":
            if c is None or not start <= c < end:
                continue
            closed += 1
            on_time += inc.on_time
            reworked += inc.reopened > 0
            l32 += inc.closed_level in (3, 2)
            if inc.handled:
                spot += 1
                continue
            values[4].append(c - rep)
        else:
            d = inc.deadline
            if d is not None and start <= d <= now and d < end:
                due += 1
        if inc.handled:
            continue
        for i, value in _durations(inc, start, end):
            values[i].append(value)
    due += closed
    return {
        "reported": reported,
        "due": due,
        "closed": closed,
        "closed_on_time": on_time,
        "reworked": reworked,
        "closed_l32": l32,
        "handled_on_spot": spot,
        "closure_rate": rate(closed, due),
        "on_time_rate": rate(on_time, due),
        "rework_rate": rate(reworked, closed),
        "share_closed_l32": rate(l32, closed),
        "share_handled_on_spot": rate(spot, closed),
        "median_s": {key: _median(values[i]) for i, key in enumerate(MEDIAN_KEYS)},
    }


# -- the same KPIs, kept as cases close ------------------------------------------------------
#
# kpi() walks every case of the period on every call: at tens of thousands of cases a day that
# paused the server's loop for 100+ ms per wall-screen refresh and per /metrics scrape
# (docs/performance.md). What a *closed* case adds to its closing day's KPIs cannot change while
# it stays closed, so dispatch.stats.index keeps those contributions per day and scope
# (KpiSums), updated as cases close and reopen, and a read only walks the open cases. kpi()
# stays the definition; tests/unit/test_stats.py checks the two agree.


@dataclass(slots=True)
class Closing:
    """What one case closed inside the period ``[start, end)`` adds to the period's KPIs."""

    reported: bool
    on_time: bool
    reworked: bool
    l32: bool
    spot: bool
    durations: tuple[tuple[int, float], ...]
    """(index into MEDIAN_KEYS, seconds) for each median the case feeds."""
    level: str
    """``str(inc.level)``, for the counts of the cases reported in the period."""
    category: str


def closing(inc: Incident, start: float, end: float) -> Closing:
    """The contribution of ``inc``, closed at a time in ``[start, end)`` (the loop of kpi())."""
    rep = inc.reported_at
    durations: list[tuple[int, float]] = []
    if not inc.handled:
        c = inc.closed_at
        assert c is not None
        durations.extend(_durations(inc, start, end))
        durations.append((4, c - rep))
    return Closing(
        reported=start <= rep < end,
        on_time=bool(inc.on_time),
        reworked=inc.reopened > 0,
        l32=inc.closed_level in (3, 2),
        spot=bool(inc.handled),
        durations=tuple(durations),
        level=str(inc.level),
        category=inc.category,
    )


def _durations(inc: Incident, start: float, end: float) -> list[tuple[int, float]]:
    """offer, accept, arrive, resolve (MEDIAN_KEYS 0-3) of a case not handled on the spot."""
    out: list[tuple[int, float]] = []
    rep = inc.reported_at
    o, a, v, r = inc.offered_at, inc.assigned_at, inc.arrived_at, inc.resolved_at
    if o is not None and start <= o < end:
        out.append((0, o - rep))
    if a is not None and o is not None and start <= a < end and a >= o:
        out.append((1, a - o))
    if v is not None and a is not None and start <= v < end:
        out.append((2, v - a))
    if r is not None and start <= r < end:
        out.append((3, r - rep))
    return out


@dataclass(slots=True)
class KpiSums:
    """kpi()'s counters and duration lists, for adding cases one at a time (and, for closed
    cases, taking them out again). A ledger's lists are sorted when read (:meth:`ordered`)."""

    reported: int = 0
    due: int = 0  # cases not closed whose deadline fell in the period; kpi() adds the closed
    closed: int = 0
    on_time: int = 0
    reworked: int = 0
    l32: int = 0
    spot: int = 0
    values: tuple[list[float], ...] = field(default_factory=lambda: ([], [], [], [], []))
    unsorted: bool = False

    def add_closing(self, c: Closing, sign: int = 1) -> None:
        self.reported += sign * c.reported
        self.closed += sign
        self.on_time += sign * c.on_time
        self.reworked += sign * c.reworked
        self.l32 += sign * c.l32
        self.spot += sign * c.spot
        if sign > 0:
            for i, v in c.durations:
                self.values[i].append(v)
            if c.durations:
                self.unsorted = True
        else:
            for i, v in c.durations:
                self.values[i].remove(v)

    def ordered(self) -> tuple[list[float], ...]:
        """The duration lists, sorted (in place: appended since the last read, a short run
        after a long sorted one, which sorting merges in linear time)."""
        if self.unsorted:
            for values in self.values:
                values.sort()
            self.unsorted = False
        return self.values

    def add_open(self, inc: Incident, start: float, end: float, now: float) -> None:
        """A case that is not closed (kpi()'s other branch)."""
        if start <= inc.reported_at < end:
            self.reported += 1
        d = inc.deadline
        if d is not None and start <= d <= now and d < end:
            self.due += 1
        if not inc.handled:
            for i, v in _durations(inc, start, end):
                self.values[i].append(v)


def kpi_of(closed: KpiSums | None = None, live: KpiSums | None = None) -> dict[str, Any]:
    """kpi()'s result from a ledger's sums (``closed``, lists sorted) and the open cases'."""
    got = [p for p in (closed, live) if p is not None]
    n_closed = sum(p.closed for p in got)
    due = sum(p.due for p in got) + n_closed
    on_time = sum(p.on_time for p in got)
    reworked = sum(p.reworked for p in got)
    l32 = sum(p.l32 for p in got)
    spot = sum(p.spot for p in got)
    medians = {}
    closed_values = closed.ordered() if closed is not None else None
    for i, key in enumerate(MEDIAN_KEYS):
        ordered = closed_values[i] if closed_values is not None else []
        if live is not None and live.values[i]:
            ordered = list(merge(ordered, sorted(live.values[i])))
        medians[key] = _median_sorted(ordered)
    return {
        "reported": sum(p.reported for p in got),
        "due": due,
        "closed": n_closed,
        "closed_on_time": on_time,
        "reworked": reworked,
        "closed_l32": l32,
        "handled_on_spot": spot,
        "closure_rate": rate(n_closed, due),
        "on_time_rate": rate(on_time, due),
        "rework_rate": rate(reworked, n_closed),
        "share_closed_l32": rate(l32, n_closed),
        "share_handled_on_spot": rate(spot, n_closed),
        "median_s": medians,
    }


def _median_sorted(values: list[float]) -> float | None:
    """_median() of values already in order (statistics.median's arithmetic, without a sort)."""
    n = len(values)
    if not n:
        return None
    i = n // 2
    return round(values[i] if n % 2 else (values[i - 1] + values[i]) / 2, 3)


@dataclass(slots=True)
class ScopeSums:
    """A scope's sums, whole and by the four breakdowns of compute_stats."""

    all: KpiSums = field(default_factory=KpiSums)
    by_level: dict[str, KpiSums] = field(default_factory=dict)
    by_category: dict[str, KpiSums] = field(default_factory=dict)
    by_grid: dict[str, KpiSums] = field(default_factory=dict)
    by_department: dict[str, KpiSums] = field(default_factory=dict)
    reported: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Cases reported in the period, by ("status" | "level" | "category", value)."""

    def groups(self) -> tuple[dict[str, KpiSums], ...]:
        return self.by_level, self.by_category, self.by_grid, self.by_department


def case_keys(inc: Incident, town: Town, grid_level: int) -> tuple[str, str, str | None,
                                                                   str | None]:
    """The groups of ``inc`` in a scope of level ``grid_level``: (level, category, child grid,
    department), as split() files it."""
    return (case_level(inc), inc.category, inc.grids.get(str(grid_level + 1)),
            case_department(inc, town))


def add_to_groups(sums: ScopeSums, keys: tuple[str, str, str | None, str | None],
                  add: Any) -> None:
    """Apply ``add(KpiSums)`` to the whole scope and to each of ``keys``' groups."""
    add(sums.all)
    for groups, key in zip(sums.groups(), keys, strict=True):
        if key is not None:
            group = groups.get(key)
            if group is None:
                group = groups[key] = KpiSums()
            add(group)


def case_level(inc: Incident) -> str:
    """The level a case belongs to in the by-level breakdown: where it was closed, else the
    level that owns it now."""
    if inc.status == "closed" and inc.closed_level is not None:
        return str(inc.closed_level)
    return str(inc.level)


def case_department(inc: Incident, town: Town) -> str | None:
    """The department of a case: the one it was transferred to, else the department of the
    responder who resolved it, else of the one holding it; ``None`` for grid-worker cases."""
    if inc.department:
        return inc.department
    roster = town.roster
    for rid in (inc.resolved_by, inc.responder):
        if rid is not None:
            info = roster.get(rid)
            if info is not None and info.department:
                return info.department
    return None


Groups = dict[str, list[Incident]]


def split(cases: Iterable[Incident], town: Town, grid_key: str
          ) -> tuple[Groups, Groups, Groups, Groups]:
    """One pass: the cases by :func:`case_level`, by category, by ``grids[grid_key]`` and by
    :func:`case_department` (cases without a grid of that level or a department are left out)."""
    levels: Groups = {}
    categories: Groups = {}
    grids: Groups = {}
    departments: Groups = {}
    for inc in cases:
        cl = inc.closed_level
        lv = str(cl) if inc.status == "closed" and cl is not None else str(inc.level)
        levels.setdefault(lv, []).append(inc)
        categories.setdefault(inc.category, []).append(inc)
        gid = inc.grids.get(grid_key)
        if gid is not None:
            grids.setdefault(gid, []).append(inc)
        dept = case_department(inc, town)
        if dept is not None:
            departments.setdefault(dept, []).append(inc)
    return levels, categories, grids, departments


def breakdown(groups: Mapping[str, list[Incident]], start: float, end: float, now: float,
              keys: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """KPIs per group; ``keys`` are always present (zeros), other groups when they have cases."""
    out: dict[str, dict[str, Any]] = {k: kpi((), start, end, now) for k in keys}
    for k in sorted(groups):
        out[k] = kpi(groups[k], start, end, now)
    return out


def counts(reported: Iterable[Incident], town: Town) -> dict[str, dict[str, int]]:
    """Cases reported in the period by current status, current level and category."""
    by_status = dict.fromkeys(STATUSES, 0)
    by_level = dict.fromkeys(LEVEL_KEYS, 0)
    by_category = dict.fromkeys(sorted(town.categories), 0)
    for inc in reported:
        by_status[inc.status] = by_status.get(inc.status, 0) + 1
        lv = str(inc.level)
        by_level[lv] = by_level.get(lv, 0) + 1
        by_category[inc.category] = by_category.get(inc.category, 0) + 1
    return {"by_status": by_status, "by_level": by_level, "by_category": by_category}
