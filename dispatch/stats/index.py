"""Local days and the per-engine incident index the statistics read from.

Every statistic is about one local day (or a few), yet a town keeps ~100k incidents in memory.
:class:`StatsIndex` keeps, per engine, what makes a day cheap to look at:

* ``by_day``: incidents by the local day they were reported on. ``reported_at``, ``grids`` and
  ``category`` never change, so the per-day tallies of a bucket (:class:`DayCounts`) are kept,
  and what was reported since the last call is added to them.
* ``closed_by_day``: incidents by the local day they were closed on. An incident can only close
  while it is open, so each call looks at the incidents that were open at the previous call (plus
  the new ones) and files those that have closed since. A closed incident that is reopened and
  closed again *between two calls* would be missed, so every ``reconcile_every_s`` (when anything
  changed) every reopened closed incident is filed again. Entries are re-checked on every read,
  so a stale one (reopened since, or filed under another day) is never counted.
* ``open``: the open incidents (``state.open_ids``) as of the last call.
* a :class:`DayLedger` per recent day: what the cases closed that day add to its KPIs, per
  scope and breakdown group, filed as ``closed_by_day`` is (and taken out again when the index
  sees a case reopened). A closed case's contribution cannot change while it stays closed, so
  the KPIs of a day cost a walk over the open cases, not over the day's tens of thousands
  (docs/performance.md: 128 ms → 1.3 ms for a town at 25,000 cases).

So a call costs O(new incidents + open incidents), not O(all incidents) or O(the day's) (but
for the reconcile pass every ``reconcile_every_s``, which is O(all)).
The index is pure bookkeeping over the engine's state: no clock, no I/O; ``now`` is an argument.
It is attached to the engine object through a weak reference and rebuilt when the engine's
``state`` is replaced (after a rebuild from the log).
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from itertools import islice
from typing import Protocol

from dispatch.engine.model import Town
from dispatch.engine.state import Incident, TownState
from dispatch.stats.kpi import Closing, ScopeSums, add_to_groups, case_keys, closing

DAY_S = 86_400.0
_EPOCH = date(1970, 1, 1)


class EngineLike(Protocol):
    """What the statistics need of :class:`dispatch.engine.engine.Engine`."""

    @property
    def state(self) -> TownState: ...

    @property
    def town(self) -> Town: ...


def day_of(ts: float, offset_s: float) -> int:
    """The local day number (days since 1970-01-01, local) of epoch time ``ts``."""
    return math.floor((ts + offset_s) / DAY_S)


def day_start(day: int, offset_s: float) -> float:
    """Epoch seconds of local midnight at the start of ``day``."""
    return day * DAY_S - offset_s


def day_label(day: int) -> str:
    """``YYYY-MM-DD`` of local day number ``day``."""
    return (_EPOCH + timedelta(days=day)).isoformat()


@dataclass(slots=True)
class DayCounts:
    """Incidents reported on one local day, tallied for every grid they lie in (levels 1–3):
    ``categories[grid][code]``, ``groups[grid][safety group]`` and ``total[grid]``."""

    categories: dict[str, Counter[str]]
    groups: dict[str, Counter[str]]
    total: Counter[str]


EMPTY_COUNTS = DayCounts({}, {}, Counter())


def tally(incidents: Iterable[Incident], town: Town, into: DayCounts | None = None
          ) -> DayCounts:
    """Tally ``incidents`` by grid and category, grid and safety group, and grid (added to
    ``into`` when given: a day's bucket only grows, so its tallies are kept, not redone)."""
    cats = town.categories
    counts = into if into is not None else DayCounts({}, {}, Counter())
    categories, groups, total = counts.categories, counts.groups, counts.total
    for inc in incidents:
        code = inc.category
        cat = cats.get(code)
        group = cat.group if cat is not None else "other"
        for gid in inc.grids.values():
            c = categories.get(gid)
            if c is None:
                c = categories[gid] = Counter()
                groups[gid] = Counter()
            c[code] += 1
            groups[gid][group] += 1
            total[gid] += 1
    return counts


class DayLedger:
    """What the cases closed on one local day add to its KPIs: per case its contribution
    (:class:`~dispatch.stats.kpi.Closing`), and summed per scope (a grid), whole and by level,
    category, child grid and department, with the counts of those reported that day. Sums are
    kept for the scopes somebody asked about (:meth:`scope`), so filing a case costs a few
    microseconds per watched scope. Kept by :class:`StatsIndex` as cases close and reopen."""

    def __init__(self, day: int, offset_s: float, town: Town) -> None:
        self.day = day
        self.start = day_start(day, offset_s)
        self.end = self.start + DAY_S
        self.town = town
        self.scopes: dict[str, ScopeSums] = {}
        # per case: its contribution, its level and department as split() files them, grids
        self._filed: dict[str, tuple[Closing, str, str | None, dict[str, str]]] = {}

    def scope(self, gid: str) -> ScopeSums:
        """The sums of ``gid`` (from now on kept up to date)."""
        sums = self.scopes.get(gid)
        if sums is None:
            self.watch((gid,))
            sums = self.scopes[gid]
        return sums

    def watch(self, gids: Iterable[str]) -> None:
        """Keep the sums of ``gids`` from now on (those not kept yet: one pass over the
        day's closed cases for all of them)."""
        new = {gid: ScopeSums() for gid in gids if gid not in self.scopes}
        if not new:
            return
        self.scopes.update(new)
        for filed in self._filed.values():
            for level_key, gid in filed[3].items():
                sums = new.get(gid)
                if sums is not None:
                    self._add(sums, int(level_key), filed, 1)

    def put(self, inc: Incident) -> None:
        """File a closed case (again: a case closed anew replaces what it added before)."""
        self.discard(inc.id)
        lv, _category, _child, dept = case_keys(inc, self.town, 3)
        filed = (closing(inc, self.start, self.end), lv, dept, inc.grids)
        self._filed[inc.id] = filed
        self._apply(filed, 1)

    def discard(self, iid: str) -> None:
        """Take out what a case added (it was reopened, or closed again)."""
        filed = self._filed.pop(iid, None)
        if filed is not None:
            self._apply(filed, -1)

    def _apply(self, filed: tuple[Closing, str, str | None, dict[str, str]], sign: int) -> None:
        scopes = self.scopes
        if not scopes:
            return
        for level_key, gid in filed[3].items():
            sums = scopes.get(gid)
            if sums is not None:
                self._add(sums, int(level_key), filed, sign)

    @staticmethod
    def _add(sums: ScopeSums, level: int,
             filed: tuple[Closing, str, str | None, dict[str, str]], sign: int) -> None:
        c, lv, dept, grids = filed
        keys = (lv, c.category, grids.get(str(level + 1)), dept)
        add_to_groups(sums, keys, lambda k: k.add_closing(c, sign))
        if sign < 0:
            for groups, key in zip(sums.groups(), keys, strict=True):
                if key is not None and groups[key].closed == 0:
                    del groups[key]
        if c.reported:
            reported = sums.reported
            reported[("status", "closed")] += sign
            reported[("level", c.level)] += sign
            reported[("category", c.category)] += sign


class StatsIndex:
    """Per-engine (per local-day offset) index; see the module docstring."""

    def __init__(self, state: TownState, town: Town, offset_s: float) -> None:
        self.state = state
        self.town = town
        self.offset_s = offset_s
        self.seen = 0
        self.by_day: dict[int, list[Incident]] = {}
        self.closed_by_day: dict[int, dict[str, Incident]] = {}
        self.open: dict[str, Incident] = {}
        self.synced_seq = -1
        self.reconciled_at = -math.inf
        self.reconciled_seq = -1
        self.first_day: int | None = None
        self._counts: dict[int, tuple[int, DayCounts]] = {}
        self._period_key: tuple[int, int, int] | None = None
        self._period: list[Incident] = []
        self._subtrees: dict[str, dict[int, list[str]]] = {}
        self._ledgers: dict[int, DayLedger] = {}

    # ------------------------------------------------------------------ keeping up

    def _file_closed(self, inc: Incident) -> None:
        if inc.status == "closed" and inc.closed_at is not None:
            day = day_of(inc.closed_at, self.offset_s)
            self.closed_by_day.setdefault(day, {})[inc.id] = inc
            for ledger in self._ledgers.values():
                if ledger.day == day:
                    ledger.put(inc)
                else:
                    ledger.discard(inc.id)

    def sync(self, now: float, reconcile_every_s: float) -> None:
        """Catch up with the engine's state."""
        state = self.state
        incidents = state.incidents
        fresh = self.seen == 0
        if len(incidents) > self.seen:
            off = self.offset_s
            by_day = self.by_day
            for inc in islice(incidents.values(), self.seen, None):
                day = day_of(inc.reported_at, off)
                bucket = by_day.get(day)
                if bucket is None:
                    by_day[day] = [inc]
                    if self.first_day is None or day < self.first_day:
                        self.first_day = day
                else:
                    bucket.append(inc)
                if inc.status == "closed":
                    self._file_closed(inc)
            self.seen = len(incidents)
        if state.seq != self.synced_seq:
            for inc in self.open.values():
                self._file_closed(inc)
            was_open = self.open
            self.open = {iid: incidents[iid] for iid in state.open_ids}
            if self._ledgers:
                for iid, inc in self.open.items():
                    if inc.reopened and iid not in was_open:  # reopened: no longer closed
                        for ledger in self._ledgers.values():
                            ledger.discard(iid)
            self.synced_seq = state.seq
        if fresh:
            self.reconciled_at, self.reconciled_seq = now, state.seq
        elif state.seq != self.reconciled_seq and now - self.reconciled_at >= reconcile_every_s:
            self.reconcile(now)

    def reconcile(self, now: float) -> None:
        """Re-file every closed incident that has ever been reopened (one pass over all
        incidents, O(all)). Only those can have been missed: an incident closes for the first
        time while open or new, which :meth:`sync` sees; after that only a reopen moves it."""
        for inc in self.state.incidents.values():
            if inc.reopened and inc.status == "closed":
                self._file_closed(inc)
        self.reconciled_at, self.reconciled_seq = now, self.state.seq
        self._period_key = None

    # ------------------------------------------------------------------ reading

    def reported_on(self, day: int) -> list[Incident]:
        return self.by_day.get(day, [])

    def closed_on(self, day: int) -> list[Incident]:
        """Incidents closed on ``day`` and still closed (stale entries are dropped)."""
        filed = self.closed_by_day.get(day)
        if not filed:
            return []
        off = self.offset_s
        good: list[Incident] = []
        stale: list[str] = []
        for iid, inc in filed.items():
            c = inc.closed_at
            if inc.status == "closed" and c is not None and day_of(c, off) == day:
                good.append(inc)
            else:
                stale.append(iid)
        for iid in stale:
            del filed[iid]
        return good

    def ledger(self, day: int) -> DayLedger:
        """What the cases closed on ``day`` add to its KPIs (built on first use, then kept up
        to date by :meth:`sync`; only the two latest days are kept)."""
        ledger = self._ledgers.get(day)
        if ledger is None:
            ledger = DayLedger(day, self.offset_s, self.town)
            for inc in self.closed_on(day):
                ledger.put(inc)
            self._ledgers[day] = ledger
            for old in sorted(self._ledgers)[:-2]:
                del self._ledgers[old]
        return ledger

    def counts(self, day: int) -> DayCounts:
        """Tallies of the incidents reported on ``day`` (kept; what was reported since is
        added)."""
        bucket = self.by_day.get(day)
        if not bucket:
            return EMPTY_COUNTS
        hit = self._counts.get(day)
        if hit is not None and hit[0] == len(bucket):
            return hit[1]
        if hit is None:
            counts = tally(bucket, self.town)
        else:
            counts = tally(islice(bucket, hit[0], None), self.town, into=hit[1])
        self._counts[day] = (len(bucket), counts)
        return counts

    def subtree(self, scope: str) -> dict[int, list[str]]:
        """Grid ids under ``scope`` (itself included) by level, each list sorted."""
        hit = self._subtrees.get(scope)
        if hit is None:
            town = self.town
            hit = {1: [], 2: [], 3: []}
            if scope in town.grids:
                for gid in sorted(town.grids):
                    if scope in town.ancestors(gid):
                        hit.setdefault(town.grids[gid].level, []).append(gid)
            self._subtrees[scope] = hit
        return hit

    def period(self, day: int) -> list[Incident]:
        """Every incident that can matter to ``day``'s KPIs: reported that day, closed that
        day, or open now (an incident offered, assigned, resolved or due that day is one of
        these). Each once."""
        key = (day, self.state.seq, self.seen)
        if key == self._period_key:
            return self._period
        merged: dict[str, Incident] = {inc.id: inc for inc in self.reported_on(day)}
        merged.update(self.open)
        for inc in self.closed_on(day):
            merged[inc.id] = inc
        self._period_key, self._period = key, list(merged.values())
        return self._period


_INDEXES: weakref.WeakKeyDictionary[object, dict[float, StatsIndex]] = (
    weakref.WeakKeyDictionary()
)


def index_for(engine: EngineLike, offset_s: float, now: float, reconcile_every_s: float
              ) -> StatsIndex:
    """The engine's index, synced to its current state. Engines that cannot be weakly
    referenced get a fresh (uncached, slower) index every call."""
    state = engine.state
    try:
        per_engine = _INDEXES.setdefault(engine, {})
    except TypeError:
        per_engine = {}
    idx = per_engine.get(offset_s)
    if idx is None or idx.state is not state or idx.seen > len(state.incidents):
        idx = per_engine[offset_s] = StatsIndex(state, engine.town, offset_s)
    idx.sync(now, reconcile_every_s)
    return idx
