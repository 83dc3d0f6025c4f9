"""dispatch.stats against hand-computed numbers (the arithmetic is written next to each assert).

The town: T (level 1, 50,000 residents) → V1 (20,000) and V2 (no population) → G11 (2,000) and
G12 (5,000) under V1, G21 (no population) under V2. Categories: dispute (public_security),
fire_hazard (fire), accident (traffic), small_ads (other). "Today" is the local (UTC+8) day
2026-11-21; ``NOW`` is 18:00 local.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.engine.commands import Accept, Arrive, Close, Connect, Report, Resolve
from dispatch.engine.engine import Engine
from dispatch.engine.model import (
    Category,
    Grid,
    Located,
    ResponderInfo,
    Timing,
    Town,
)
from dispatch.engine.state import Incident, TownState
from dispatch.geo.index import CellIndex
from dispatch.stats import (
    METRICS,
    StatsConfig,
    compute_stats,
    config_from_settings,
    keep_up,
    metric_families,
    prometheus_samples,
    safety_history,
    scope_filter,
)
from dispatch.stats import safety as safety_mod
from dispatch.stats.config import coerce_config
from dispatch.stats.hotspots import detect
from dispatch.stats.index import DAY_S, StatsIndex, day_label, day_of, day_start
from dispatch.stats.kpi import LEVEL_KEYS, breakdown, counts, kpi, split

H = 3600.0
DAY = 86_400.0
DAY0 = datetime(2026, 11, 20, 16, 0, tzinfo=UTC).timestamp()  # 2026-11-21 00:00 at UTC+8
NOW = DAY0 + 18 * H                                             # 2026-11-21 18:00 local
LIMITS = {3: 2 * H, 2: 24 * H, 1: 72 * H}


def make_town() -> Town:
    grids = {
        "T": Grid("T", 1, None, "Town", 50_000),
        "V1": Grid("V1", 2, "T", "Village 1", 20_000),
        "V2": Grid("V2", 2, "T", "Village 2", None),
        "G11": Grid("G11", 3, "V1", "Grid 1-1", 2_000),
        "G12": Grid("G12", 3, "V1", "Grid 1-2", 5_000),
        "G21": Grid("G21", 3, "V2", "Grid 2-1", None),
    }
    cats = {
        "dispute": Category("dispute", "Dispute", "public_security", 3, False, LIMITS),
        "fire_hazard": Category("fire_hazard", "Fire hazard", "fire", 1, False, LIMITS),
        "accident": Category("accident", "Traffic accident", "traffic", 2, False, LIMITS),
        "small_ads": Category("small_ads", "Illegal small ads", "other", 4, False, LIMITS),
    }
    roster = {
        "w11": ResponderInfo("w11", "Worker 11", "grid_worker", "G11", frozenset({"dispute"})),
        "pol1": ResponderInfo("pol1", "Police 1", "department", "T", frozenset({"fire_hazard"}),
                              "police"),
    }
    children = {"T": ("V1", "V2"), "V1": ("G11", "G12"), "V2": ("G21",)}
    return Town("T", grids, cats, roster, children)


PARENT = {"G11": "V1", "G12": "V1", "G21": "V2"}


class FakeEngine:
    """What compute_stats needs of an Engine: ``state`` and ``town`` (weak-referenceable)."""

    def __init__(self, town: Town) -> None:
        self.town = town
        self.state = TownState(town=town, index=CellIndex())

    def add(self, inc: Incident) -> Incident:
        self.state.incidents[inc.id] = inc
        if inc.status != "closed":
            self.state.open_ids.add(inc.id)
        self.state.seq += 1
        return inc


class Unreferenceable:
    """Same, but cannot be weakly referenced: compute_stats builds a fresh index every call."""

    __slots__ = ("state", "town")

    def __init__(self, engine: FakeEngine) -> None:
        self.state = engine.state
        self.town = engine.town


_n = iter(range(1, 1_000_000))


def mk(category: str, g3: str, reported_at: float, **kw: Any) -> Incident:
    """An incident as the engine would hold it; ``closed_at`` given → closed (same resolve)."""
    kw.setdefault("deadline", reported_at + LIMITS[3])
    if kw.get("closed_at") is not None:
        kw.setdefault("status", "closed")
        kw.setdefault("resolved_at", kw["closed_at"])
        kw.setdefault("closed_level", kw.get("level", 3))
    return Incident(
        id=kw.pop("id", f"T-{next(_n):06d}"), ref="r", category=category, priority=3,
        lon=113.19, lat=22.61, grids={"3": g3, "2": PARENT[g3], "1": "T"},
        level=kw.pop("level", 3), source="field", reported_at=reported_at, **kw,
    )


def scenario() -> tuple[FakeEngine, dict[str, Incident]]:
    """The KPI scenario (times relative to local midnight today, DAY0)."""
    e = FakeEngine(make_town())
    t1, t3 = DAY0 + 1 * H, DAY0 + 3 * H
    inc = {
        # a1: dispute in G11, offer +60 s, assigned +120 s, arrived +600 s, closed +1 h at L3.
        "a1": mk("dispute", "G11", t1, offered_at=t1 + 60, assigned_at=t1 + 120,
                 arrived_at=t1 + 600, closed_at=t1 + H, resolved_by="w11"),
        # a2: fire hazard in G12 handled on the spot: closed at once at L3.
        "a2": mk("fire_hazard", "G12", DAY0 + 2 * H, handled=True, closed_at=DAY0 + 2 * H),
        # a3: accident in G11, escalated for sla (late) and closed at L2 by police after 2 h.
        "a3": mk("accident", "G11", t3, offered_at=t3 + 30, assigned_at=t3 + 150,
                 arrived_at=t3 + 300, closed_at=t3 + 2 * H, level=2, on_time=False,
                 resolved_by="pol1"),
        # a4: dispute in G21 reported yesterday 19:00, reopened once, transferred to police,
        # closed today 04:00 at L1 on time (9 h after the report).
        "a4": mk("dispute", "G21", DAY0 - 5 * H, offered_at=DAY0 - 5 * H + 120,
                 assigned_at=DAY0 - 5 * H + 180, closed_at=DAY0 + 4 * H, level=1, reopened=1,
                 department="police"),
        # a5: small ads in G12 from two days ago, open at L2, deadline 10:00 today → due.
        "a5": mk("small_ads", "G12", DAY0 - 30 * H, status="assigned", level=2,
                 offered_at=DAY0 - 29 * H, assigned_at=DAY0 - 29 * H, deadline=DAY0 + 10 * H),
        # a6: dispute in G11 at 15:00, offered 200 s later, deadline 20:00 (after NOW) → not due.
        "a6": mk("dispute", "G11", DAY0 + 15 * H, status="offered",
                 offered_at=DAY0 + 15 * H + 200, deadline=DAY0 + 20 * H),
        # a7: closed yesterday 23:00 although its deadline is 05:00 today → not due today.
        "a7": mk("fire_hazard", "G11", DAY0 - 3 * H, closed_at=DAY0 - H, deadline=DAY0 + 5 * H),
        # a8: fire hazard in G21, open at L1 and overdue since 01:00 today → due.
        "a8": mk("fire_hazard", "G21", DAY0 - 50 * H, level=1, overdue=True, on_time=False,
                 deadline=DAY0 + H),
    }
    for i in inc.values():
        e.add(i)
    return e, inc


# ------------------------------------------------------------------------ published month


def test_published_month_due_denominator() -> None:
    """DOMAIN.md's month: 972 due, 911 closed (93.72 %), 737 on time (75.82 %)."""
    start, end = DAY0, DAY0 + 30 * DAY
    now = end - 1
    cases = [mk("dispute", "G11", start + 1, closed_at=start + 100, on_time=i < 737)
             for i in range(911)]
    # 61 cases still open whose deadline fell in the month: due, not closed (911 + 61 = 972).
    cases += [mk("dispute", "G11", start + 1, status="new", deadline=start + 5 * DAY)
              for _ in range(61)]
    # not due: open with a deadline after the month; closed before the month.
    cases += [mk("dispute", "G11", start + 1, status="new", deadline=end + DAY)
              for _ in range(40)]
    cases += [mk("dispute", "G11", start - 9 * DAY, closed_at=start - 8 * DAY,
                 deadline=start + DAY) for _ in range(30)]
    k = kpi(cases, start, end, now)
    assert (k["due"], k["closed"], k["closed_on_time"]) == (972, 911, 737)
    assert round(k["closure_rate"] * 100, 2) == 93.72        # 911 / 972 = 0.93724
    assert round(k["on_time_rate"] * 100, 2) == 75.82        # 737 / 972 = 0.75823
    # the 311 bias: on time ÷ closed would claim 80.90 %, not 75.82 %
    assert round(k["closed_on_time"] / k["closed"] * 100, 2) == 80.90
    assert k["reported"] == 911 + 61 + 40                     # reported in the month


def test_rates_are_none_without_denominator() -> None:
    k = kpi([], DAY0, DAY0 + DAY, NOW)
    assert k["due"] == k["closed"] == 0
    for key in ("closure_rate", "on_time_rate", "rework_rate", "share_closed_l32",
                "share_handled_on_spot"):
        assert k[key] is None
    assert set(k["median_s"].values()) == {None}


def test_all_on_time_still_below_100_percent_when_cases_are_open_past_deadline() -> None:
    # 9 closed, all on time; 1 open case whose deadline passed today → 9/10, not 9/9.
    cases = [mk("dispute", "G11", DAY0 + H, closed_at=DAY0 + 2 * H) for _ in range(9)]
    cases.append(mk("dispute", "G11", DAY0 + H, status="assigned", deadline=DAY0 + 3 * H))
    k = kpi(cases, DAY0, DAY0 + DAY, NOW)
    assert (k["closed"], k["due"], k["on_time_rate"]) == (9, 10, 0.9)


# ------------------------------------------------------------------------ the town scope


def test_town_kpis() -> None:
    e, _ = scenario()
    s = compute_stats(e, "T", NOW)
    assert s["scope"] == "T"
    assert s["day"] == "2026-11-21"
    assert s["at"] == "2026-11-21T10:00:00.000Z"          # 18:00 local = 10:00 UTC
    k = s["kpi"]
    # reported today: a1, a2, a3, a6
    assert k["reported"] == 4
    # closed today: a1, a2, a3, a4 (a7 closed yesterday)
    assert k["closed"] == 4
    # due: the 4 closed + a5 (deadline 10:00) + a8 (deadline 01:00); a6 (20:00 > NOW) is not,
    # nor is a7 (closed before today)
    assert k["due"] == 6
    # on time: a1, a2, a4 (a3 was escalated for sla)
    assert k["closed_on_time"] == 3
    assert k["closure_rate"] == pytest.approx(4 / 6)
    assert k["on_time_rate"] == pytest.approx(3 / 6)
    assert k["reworked"] == 1 and k["rework_rate"] == pytest.approx(1 / 4)        # a4
    assert k["closed_l32"] == 3 and k["share_closed_l32"] == pytest.approx(3 / 4)  # a1,a2,a3
    assert k["handled_on_spot"] == 1
    assert k["share_handled_on_spot"] == pytest.approx(1 / 4)                      # a2
    m = k["median_s"]
    # offer: first offers today, a2 handled excluded: a1 60, a3 30, a6 200 → median 60
    assert m["offer"] == 60
    # accept (offer → assign) today: a1 120−60 = 60, a3 150−30 = 120 → (60 + 120) / 2 = 90
    assert m["accept"] == 90
    # arrive (assign → arrive): a1 600−120 = 480, a3 300−150 = 150 → (480 + 150) / 2 = 315
    assert m["arrive"] == 315
    # resolve and close (from the report): a1 3600, a3 7200, a4 9 h = 32400 → 7200
    assert m["resolve"] == 7200
    assert m["close"] == 7200


def test_town_counts_open_and_categories() -> None:
    e, _ = scenario()
    s = compute_stats(e, "T", NOW)
    c = s["counts"]   # over the 4 cases reported today: a1, a2, a3 closed; a6 offered
    assert c["by_status"] == {"new": 0, "offered": 1, "assigned": 0, "on_scene": 0,
                              "resolved": 0, "closed": 3}
    assert c["by_level"] == {"3": 3, "2": 1, "1": 0}       # a3 is at level 2
    assert c["by_category"] == {"accident": 1, "dispute": 2, "fire_hazard": 1, "small_ads": 0}
    # open now: a5 (L2), a6 (L3), a8 (L1, overdue)
    assert s["open_by_level"] == {"3": 1, "2": 1, "1": 1}
    assert s["open_overdue"] == 1
    assert s["top_categories"] == [
        {"category": "dispute", "name": "Dispute", "count": 2},
        {"category": "accident", "name": "Traffic accident", "count": 1},
        {"category": "fire_hazard", "name": "Fire hazard", "count": 1},
    ]
    assert s["categories"]["fire_hazard"] == {"name": "Fire hazard", "group": "fire"}
    json.dumps(s)  # plain JSON values only


def test_town_breakdowns() -> None:
    e, _ = scenario()
    b = compute_stats(e, "T", NOW)["breakdown"]
    lv = b["by_level"]
    # level 3: a1, a2 closed there, a6 open there: due 2 (a6 not due yet), closed 2
    assert (lv["3"]["closed"], lv["3"]["due"], lv["3"]["reported"]) == (2, 2, 3)
    # level 2: a3 closed there (late), a5 open and due → closure 1/2, on time 0/2
    assert (lv["2"]["closed"], lv["2"]["due"], lv["2"]["on_time_rate"]) == (1, 2, 0.0)
    # level 1: a4 closed (on time, reworked), a8 due → closure 1/2, rework 1/1
    assert (lv["1"]["closure_rate"], lv["1"]["rework_rate"], lv["1"]["share_closed_l32"]) == (
        0.5, 1.0, 0.0)
    g = b["by_grid"]   # level-2 grids of the town
    assert set(g) == {"V1", "V2"}
    # V1: a1, a2, a3 closed, a5 due, a6 not due → 3/4; on time a1, a2 → 2/4
    assert (g["V1"]["closed"], g["V1"]["due"], g["V1"]["closure_rate"]) == (3, 4, 0.75)
    assert g["V1"]["on_time_rate"] == 0.5
    # V2: a4 closed, a8 due
    assert (g["V2"]["closed"], g["V2"]["due"]) == (1, 2)
    d = b["by_department"]
    # police: a4 (transferred) and a3 (resolved by pol1); grid-worker cases have no department
    assert set(d) == {"police"}
    assert (d["police"]["closed"], d["police"]["closed_on_time"]) == (2, 1)
    cat = b["by_category"]
    # dispute: a1, a4 closed, a6 not due → 2/2; fire: a2 closed, a8 due → 1/2
    assert (cat["dispute"]["closure_rate"], cat["fire_hazard"]["closure_rate"]) == (1.0, 0.5)


def test_village_scope() -> None:
    e, _ = scenario()
    s = compute_stats(e, "V1", NOW)
    k = s["kpi"]
    # V1 holds a1, a2, a3 (closed), a5 (due), a6 (not due)
    assert (k["reported"], k["closed"], k["due"], k["share_closed_l32"]) == (4, 3, 4, 1.0)
    assert s["open_by_level"] == {"3": 1, "2": 1, "1": 0}
    assert set(s["breakdown"]["by_grid"]) == {"G11", "G12"}  # a village: its basic grids
    assert s["breakdown"]["by_grid"]["G12"]["due"] == 2       # a2 closed, a5 due
    assert set(s["safety"]) == {"V1", "G11", "G12"}


def test_unknown_scope_is_empty_not_an_error() -> None:
    e, _ = scenario()
    s = compute_stats(e, "nowhere", NOW)
    assert s["kpi"]["due"] == 0 and s["safety"] == {} and s["hotspots"] == []


# ------------------------------------------------------------------------ safety index


def test_safety_today() -> None:
    e, _ = scenario()
    s = compute_stats(e, "T", NOW)["safety"]
    assert list(s) == ["T", "V1", "V2", "G11", "G12", "G21"]
    # Reported today: a1 dispute G11, a2 fire G12, a3 accident G11, a6 dispute G11.
    # G11 (2,000): public security 2 → 10 /10k → sub-score 0; traffic 1 → 5 /10k → 50;
    # fire 0 → 100. Score 0.4·0 + 0.3·100 + 0.3·50 = 45 → orange (40 < 45 ≤ 60).
    g11 = s["G11"]
    assert (g11["public_security"], g11["fire"], g11["traffic"]) == (10.0, 0.0, 5.0)
    assert (g11["score"], g11["colour"], g11["alerts"]) == (45.0, "orange", 3)
    # G12 (5,000): fire 1 → 2 /10k → sub 100·(1 − 2/3) = 33.33. 40 + 0.3·33.33 + 30 = 80 → blue
    assert (s["G12"]["fire"], s["G12"]["score"], s["G12"]["colour"]) == (2.0, 80.0, "blue")
    # V1 (20,000): ps 2 → 1.0 → 90; fire 1 → 0.5 → 83.33; traffic 1 → 0.5 → 95.
    # 0.4·90 + 0.3·83.33 + 0.3·95 = 36 + 25 + 28.5 = 89.5 → blue (≤ 90)
    assert (s["V1"]["score"], s["V1"]["colour"]) == (89.5, "blue")
    # T (50,000): ps 0.4 → 96; fire 0.2 → 93.33; traffic 0.2 → 98.
    # 38.4 + 28 + 29.4 = 95.8 → above 90: no warning
    assert (s["T"]["score"], s["T"]["colour"], s["T"]["alerts"]) == (95.8, None, 4)
    # no population: counts but no index
    assert s["V2"] == {"score": None, "colour": None, "public_security": None, "fire": None,
                       "traffic": None, "alerts": 0, "population": None,
                       "counts": {"public_security": 0, "fire": 0, "traffic": 0}}


def test_other_group_never_counts() -> None:
    e = FakeEngine(make_town())
    for _ in range(50):
        e.add(mk("small_ads", "G11", DAY0 + H))
    g11 = compute_stats(e, "G11", NOW)["safety"]["G11"]
    assert (g11["alerts"], g11["score"], g11["colour"]) == (0, 100.0, None)


@pytest.mark.parametrize(
    ("score", "colour"),
    [(0.0, "red"), (40.0, "red"), (40.01, "orange"), (60.0, "orange"), (60.5, "yellow"),
     (75.0, "yellow"), (75.01, "blue"), (90.0, "blue"), (90.01, None), (100.0, None)],
)
def test_colour_thresholds(score: float, colour: str | None) -> None:
    assert safety_mod.colour(score, StatsConfig()) == colour


def test_custom_weights_and_thresholds() -> None:
    cfg = StatsConfig(safety_weights={"fire": 1.0}, safety_saturation={"fire": 4.0},
                      safety_red=10, safety_orange=20, safety_yellow=30, safety_blue=99)
    # 1 fire in 5,000 → 2 /10k → 100·(1 − 2/4) = 50; only fire weighs → 50 → blue (30 < 50 ≤ 99)
    e = safety_mod.entry({"fire": 1, "public_security": 9}, 5_000, cfg)
    assert (e["score"], e["colour"]) == (50.0, "blue")


def test_safety_history_and_trailing_window() -> None:
    e = hotspot_town()
    hist = safety_history(e, "G11", 30, now=NOW)
    assert len(hist) == 30
    assert hist[0]["day"] == "2026-10-23" and hist[-1]["day"] == "2026-11-21"
    # yesterday: 1 dispute in G11 (2,000) → 5 /10k → sub 50 → 0.4·50 + 60 = 80 → blue
    assert (hist[-2]["score"], hist[-2]["colour"]) == (80.0, "blue")
    # the day before: none → 100, no warning
    assert (hist[-3]["score"], hist[-3]["colour"]) == (100.0, None)
    # today: 3 disputes → 15 /10k → sub 0 → 60 → orange
    assert (hist[-1]["score"], hist[-1]["colour"], hist[-1]["alerts"]) == (60.0, "orange", 3)
    # the trend in compute_stats is the scope's history
    trend = compute_stats(e, "G11", NOW)["safety_trend"]
    assert trend == hist
    # trailing 24 h instead of the local day: window (yesterday 18:00, today 18:00] also takes
    # yesterday's 20:00 dispute → 4 disputes → still sub 0 → 60
    e.add(mk("dispute", "G11", DAY0 - 4 * H))
    cfg = StatsConfig(safety_window_s=DAY)
    g11 = compute_stats(e, "G11", NOW, cfg)["safety"]["G11"]
    assert g11["counts"]["public_security"] == 4
    assert compute_stats(e, "G11", NOW)["safety"]["G11"]["counts"]["public_security"] == 3


# ------------------------------------------------------------------------ hotspots


def hotspot_town() -> FakeEngine:
    """14 previous days at noon local: G11 has 1 dispute on odd days back (7 of 14), G12 has
    2 small ads every day. Today: 3 disputes in G11, 5 small ads in G12, 2 disputes in G21."""
    e = FakeEngine(make_town())
    for k in range(1, 15):
        noon = DAY0 - k * DAY + 12 * H
        if k % 2 == 1:
            e.add(mk("dispute", "G11", noon, closed_at=noon + 60))
        for _ in range(2):
            e.add(mk("small_ads", "G12", noon, closed_at=noon + 60))
    for _ in range(3):
        e.add(mk("dispute", "G11", DAY0 + 9 * H, closed_at=DAY0 + 10 * H))
    for _ in range(5):
        e.add(mk("small_ads", "G12", DAY0 + 9 * H, closed_at=DAY0 + 10 * H))
    for _ in range(2):
        e.add(mk("dispute", "G21", DAY0 + 9 * H, closed_at=DAY0 + 10 * H))
    return e


def test_hotspots() -> None:
    e = hotspot_town()
    s = compute_stats(e, "T", NOW)
    # G11: history 1,0,1,0,… → mean 0.5, sd 0.5, spread max(0.5, √1.5 = 1.2247) = 1.2247;
    # threshold 0.5 + 2·1.2247 = 2.95 ≤ 3 → hotspot, score (3 − 0.5)/√1.5 = 2.04.
    # G12: history 2 every day → mean 2, sd 0, spread √3 = 1.732; threshold 5.46 > 5 → not.
    # G21: 2 < 3 (minimum count) → not.
    assert s["hotspots"] == [
        {"grid": "G11", "name": "Grid 1-1", "count": 3, "baseline": 0.5, "sd": 0.5,
         "score": 2.04},
    ]
    # categories in the town: dispute history = G11's (G21 had none) but today 3 + 2 = 5:
    # (5 − 0.5)/√1.5 = 3.67; small ads: 5 vs threshold 5.46 → not
    assert [(h["category"], h["count"], h["score"]) for h in s["hotspot_categories"]] == [
        ("dispute", 5, 3.67)]
    # one more small ad in G12 today: 6 ≥ 5.46 → hotspot, score (6 − 2)/√3 = 2.31, ranked first
    e.add(mk("small_ads", "G12", DAY0 + 11 * H))
    s = compute_stats(e, "T", NOW)
    assert [(h["grid"], h["count"], h["baseline"], h["score"]) for h in s["hotspots"]] == [
        ("G12", 6, 2.0, 2.31), ("G11", 3, 0.5, 2.04)]
    # a village only looks at its own basic grids and counts
    v2 = compute_stats(e, "V2", NOW)
    assert v2["hotspots"] == [] and v2["hotspot_categories"] == []


def test_no_baseline_no_hotspot() -> None:
    e = FakeEngine(make_town())
    for _ in range(10):
        e.add(mk("dispute", "G11", DAY0 + H))      # the first day the town records anything
    assert compute_stats(e, "T", NOW)["hotspots"] == []


def test_detect_poisson_floor() -> None:
    hist = [{"a": 0} for _ in range(14)]
    # flat zero history: spread = √(0 + 1) = 1 → threshold 2, but the minimum count is 3
    assert detect({"a": 2}, hist, min_count=3, sigmas=2, limit=5) == []
    [h] = detect({"a": 3}, hist, min_count=3, sigmas=2, limit=5)
    assert (h.mean, h.sd, h.score) == (0.0, 0.0, 3.0)
    assert detect({"a": 3}, [], min_count=3, sigmas=2, limit=5) == []


# ------------------------------------------------------------------------ the cache


def fresh(engine: FakeEngine, scope: str, now: float, cfg: StatsConfig | None = None
          ) -> dict[str, Any]:
    return compute_stats(Unreferenceable(engine), scope, now, cfg)


def close(e: FakeEngine, inc: Incident, at: float) -> None:
    inc.status, inc.closed_at, inc.resolved_at, inc.closed_level = "closed", at, at, inc.level
    e.state.open_ids.discard(inc.id)
    e.state.seq += 1


def reopen(e: FakeEngine, inc: Incident) -> None:
    inc.status, inc.closed_at, inc.resolved_at, inc.closed_level = "new", None, None, None
    inc.reopened += 1
    e.state.open_ids.add(inc.id)
    e.state.seq += 1


def test_cache_follows_closes_and_reopens() -> None:
    e, inc = scenario()
    assert compute_stats(e, "T", NOW) == fresh(e, "T", NOW)
    close(e, inc["a5"], NOW - 60)       # reported two days ago: only the open set knows it
    after = compute_stats(e, "T", NOW)
    assert (after["kpi"]["closed"], after["kpi"]["due"]) == (5, 6)
    assert after == fresh(e, "T", NOW)
    reopen(e, inc["a4"])                 # reported yesterday, closed today
    after = compute_stats(e, "T", NOW)
    assert (after["kpi"]["closed"], after["kpi"]["due"]) == (4, 5)
    assert after == fresh(e, "T", NOW)


def test_reopen_and_reclose_between_calls_is_caught_by_reconcile() -> None:
    e, inc = scenario()
    cfg = StatsConfig(reconcile_every_s=60)
    compute_stats(e, "T", NOW, cfg)
    a7 = inc["a7"]                  # closed yesterday; reopened and closed again today
    reopen(e, a7)
    close(e, a7, NOW - 10)
    # within the reconcile interval the cache, which never saw a7 open, lags (known, bounded) …
    assert compute_stats(e, "T", NOW + 1, cfg)["kpi"]["closed"] == 4
    # … but no later than reconcile_every_s
    assert compute_stats(e, "T", NOW + 61, cfg) == fresh(e, "T", NOW + 61, cfg)
    assert fresh(e, "T", NOW + 61)["kpi"]["closed"] == 5


def test_new_state_object_rebuilds_the_index() -> None:
    e, _ = scenario()
    compute_stats(e, "T", NOW)
    e.state = TownState(town=e.town, index=CellIndex())
    assert compute_stats(e, "T", NOW)["kpi"]["due"] == 0


def by_definition(engine: FakeEngine, scope: str, now: float, cfg: StatsConfig | None = None
                  ) -> dict[str, Any]:
    """counts, kpi and breakdown as kpi.py defines them: kpi(), split(), breakdown() and
    counts() over every case of the day (no ledger), from a fresh index."""
    c = coerce_config(cfg)
    idx = StatsIndex(engine.state, engine.town, c.offset_s)
    idx.sync(now, c.reconcile_every_s)
    today = day_of(now, c.offset_s)
    start = day_start(today, c.offset_s)
    end = start + DAY_S
    in_scope = scope_filter(engine.town, scope)
    cases = [inc for inc in idx.period(today) if in_scope(inc)]
    grid = engine.town.grids.get(scope)
    child = grid.level + 1 if grid is not None else 4
    by_level, by_category, by_grid, by_department = split(cases, engine.town, str(child))
    return {
        "counts": counts([i for i in cases if start <= i.reported_at < end], engine.town),
        "kpi": kpi(cases, start, end, now),
        "breakdown": {
            "by_level": breakdown(by_level, start, end, now, LEVEL_KEYS),
            "by_category": breakdown(by_category, start, end, now),
            "by_grid": breakdown(by_grid, start, end, now, idx.subtree(scope).get(child, [])),
            "by_department": breakdown(by_department, start, end, now),
        },
    }


def with_times(inc: Incident, pick: int) -> Incident:
    """Give a case offer/assign/arrive/resolve times (some, by ``pick``), so medians vary."""
    t = inc.reported_at
    if pick % 7 == 0:
        inc.handled = True
        return inc
    inc.offered_at = t + 30 + pick % 97
    if pick % 3:
        inc.assigned_at = inc.offered_at + 60 + pick % 13
        if pick % 5:
            inc.arrived_at = inc.assigned_at + 300 + pick % 11
    inc.responder = ("w1", "pol1", None)[pick % 3]
    return inc


OPS = st.lists(st.tuples(st.sampled_from(["add", "close", "reopen", "call"]),
                         st.integers(0, 10_000), st.integers(-3 * 24, 23)), max_size=40)


@settings(max_examples=80, deadline=None)
@given(OPS, st.booleans())
def test_cached_equals_fresh(ops: list[tuple[str, int, int]], reconcile: bool) -> None:
    """Whatever happens between calls, the cached index gives the answer a fresh one gives.
    Without reconciling (``reconcile_every_s = inf``) this holds as long as a call sees every
    reopened incident open before it closes again, so each reopen is followed by a call."""
    cfg = StatsConfig(reconcile_every_s=0 if reconcile else math.inf)
    e = FakeEngine(make_town())
    grids = ["G11", "G12", "G21"]
    cats = ["dispute", "fire_hazard", "accident", "small_ads"]
    clock = DAY0 - 3 * DAY

    def check(at: float) -> None:
        for scope in ("T", "V1", "G21", "G12", "elsewhere"):
            got = compute_stats(e, scope, at, cfg)
            assert got == fresh(e, scope, at, cfg)
            assert {k: got[k] for k in ("counts", "kpi", "breakdown")} == by_definition(
                e, scope, at, cfg)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for s in prometheus_samples(e, at, cfg)}
        for gid in ("T", "V1", "V2"):
            k = by_definition(e, gid, at, cfg)["kpi"]
            assert samples[("dispatch_due_today", (("grid", gid),))] == k["due"]
            assert samples[("dispatch_closed_today", (("grid", gid),))] == k["closed"]
            assert samples.get(("dispatch_closure_rate", (("grid", gid),))) == k["closure_rate"]

    for op, pick, hour in ops:
        at = max(clock, DAY0 + hour * H)
        clock = at
        if op == "add":
            e.add(with_times(mk(cats[pick % 4], grids[pick % 3], at, status="new",
                                deadline=at + LIMITS[3] * (pick % 5)), pick))
        elif op == "close" and e.state.open_ids:
            close(e, e.state.incidents[sorted(e.state.open_ids)[pick % len(e.state.open_ids)]],
                  at)
        elif op == "reopen":
            closed = [i for i in e.state.incidents.values() if i.status == "closed"]
            if closed:
                reopen(e, closed[pick % len(closed)])
                check(at)
        else:
            check(at)
        if pick % 2:  # the server's step between reads (Hub.keep_stats_up)
            keep_up(e, at, cfg)
    check(clock)


# ------------------------------------------------------------------------ a real engine


class StripLocator:
    """G11: lon < 113.1; G12: 113.1 ≤ lon < 113.2; G21: lon ≥ 113.2."""

    def locate(self, lon: float, lat: float) -> Located | None:
        g3 = "G11" if lon < 113.1 else "G12" if lon < 113.2 else "G21"
        return Located(g3, PARENT[g3], "T")


def test_driven_engine() -> None:
    eng = Engine(make_town(), CellIndex(), StripLocator(), Timing())
    t = DAY0 + 8 * H
    eng.handle(Connect("w11"), t)
    eng.position("w11", 113.05, 22.6, t + H - 10)
    # 08:00 a citizen reports a dispute in G11: offered to w11 at once (offer 0 s)
    rid = eng.handle(Report("c1", "dispute", 113.06, 22.6, source="citizen"), t + H).incident
    assert rid is not None
    eng.handle(Accept("w11", rid), t + H + 30)           # accept 30 s
    eng.handle(Arrive("w11", rid), t + H + 300)          # arrive 270 s after accepting
    eng.handle(Resolve("w11", rid), t + H + 900)         # resolved and closed at L3: 900 s
    # w11 fixes something on the spot
    eng.handle(Report("c2", "dispute", 113.05, 22.6, actor="w11", handled=True), t + 2 * H)
    # a fire hazard in G12: nobody at L3, L2 or L1 (police has no position) → waits at L1
    fid = eng.handle(Report("c3", "fire_hazard", 113.15, 22.6), t + 2.5 * H).incident
    assert fid is not None and eng.state.incidents[fid].level == 1
    eng.handle(Close(fid, actor="lead"), t + 3 * H)      # an operator closes it: 1800 s
    s = compute_stats(eng, "T", NOW)
    k = s["kpi"]
    assert (k["reported"], k["closed"], k["due"], k["closed_on_time"]) == (3, 3, 3, 3)
    assert k["share_closed_l32"] == pytest.approx(2 / 3)        # the fire closed at L1
    assert k["share_handled_on_spot"] == pytest.approx(1 / 3)
    # the handled case is left out of the medians; the fire was never offered
    assert k["median_s"] == {"offer": 0.0, "accept": 30.0, "arrive": 270.0, "resolve": 900.0,
                             "close": (900 + 1800) / 2}
    assert s["breakdown"]["by_level"]["1"]["closed"] == 1
    assert s["safety"]["G11"]["counts"]["public_security"] == 2    # both disputes


# ------------------------------------------------------------------------ Prometheus


def test_prometheus_samples() -> None:
    e, _ = scenario()
    samples = prometheus_samples(e, NOW)
    grids = {s.labels["grid"] for s in samples}
    assert grids == {"T", "V1", "V2"}                  # never a level-3 grid
    assert {s.name for s in samples} <= set(METRICS)
    for s in samples:
        assert tuple(s.labels) == METRICS[s.name][1]

    def value(name: str, **labels: str) -> float:
        [v] = [s.value for s in samples if s.name == name and s.labels == labels]
        return v

    assert value("dispatch_closure_rate", grid="T") == pytest.approx(4 / 6)
    assert value("dispatch_on_time_rate", grid="V1") == 0.5
    assert value("dispatch_share_closed_l32", grid="V2") == 0.0     # a4 closed at L1
    assert value("dispatch_safety_score", grid="V1") == 89.5
    assert not [s for s in samples if s.name == "dispatch_safety_score" and
                s.labels["grid"] == "V2"]                          # no population: no sample
    assert value("dispatch_grid_open_incidents", grid="V2", level="1") == 1.0   # a8
    assert value("dispatch_reported_today", grid="T", category="dispute") == 2.0
    fams = metric_families(samples)
    assert {f.name for f in fams} == set(METRICS)


# ------------------------------------------------------------------------ config and days


def test_config_validation_and_settings_mapping() -> None:
    with pytest.raises(ValueError, match="red < orange"):
        StatsConfig(safety_red=70)
    with pytest.raises(ValueError, match="weight above 0"):
        StatsConfig(safety_weights={"fire": 0.0})
    with pytest.raises(ValueError, match="unknown group"):
        StatsConfig(safety_weights={"crime": 1.0})
    from dispatch.config import StatsSettings

    cfg = coerce_config(StatsSettings())
    assert cfg.safety_blue == 90.0 and dict(cfg.safety_weights)["public_security"] == 0.4
    assert cfg.safety_window_s is None
    assert coerce_config(None) == StatsConfig()
    from dispatch.config import settings_from_dict

    full = config_from_settings(settings_from_dict({"stats": {"red": 30.0}}))
    assert (full.safety_red, full.safety_orange) == (30.0, 60.0)


def test_local_day_boundaries() -> None:
    # 23:59:59 local on the 20th is 15:59:59 UTC; 00:00 local on the 21st is 16:00 UTC
    assert day_label(day_of(DAY0 - 1, 8 * H)) == "2026-11-20"
    assert day_label(day_of(DAY0, 8 * H)) == "2026-11-21"
    e = FakeEngine(make_town())
    e.add(mk("dispute", "G11", DAY0 - 1, closed_at=DAY0 - 1))   # 23:59:59 yesterday
    assert compute_stats(e, "T", NOW)["kpi"]["closed"] == 0
    # with days counted in UTC, that moment (2026-11-20T15:59:59Z) is on the same day as
    # 2026-11-20T16:01Z
    utc = StatsConfig(timezone_offset_hours=0)
    assert compute_stats(e, "T", DAY0 + 60, utc)["kpi"]["closed"] == 1


def _iter_numbers(obj: Any) -> Iterator[float]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _iter_numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_rates_are_fractions() -> None:
    e, _ = scenario()
    s = compute_stats(e, "T", NOW)
    for level in s["breakdown"].values():
        for cell in level.values():
            for key in ("closure_rate", "on_time_rate", "rework_rate", "share_closed_l32",
                        "share_handled_on_spot"):
                assert cell[key] is None or 0.0 <= cell[key] <= 1.0
    assert all(math.isfinite(x) for x in _iter_numbers(s))


def test_grafana_dashboard_uses_known_metrics() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text()
    dash = json.loads(text)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"dispatch_[a-z0-9_]+", e)}
    server = {"dispatch_open_incidents", "dispatch_incidents_reported_total",
              "dispatch_escalations_total", "dispatch_report_to_offer_seconds_bucket"}
    assert used <= set(METRICS) | server
    assert {"dispatch_safety_score", "dispatch_closure_rate", "dispatch_on_time_rate",
            "dispatch_share_closed_l32"} <= used


def test_stats_settings_reach_the_statistics() -> None:
    """[stats] window = "24h" is the local day; another length a trailing window; the UTC offset
    of the local day is configurable."""
    from dispatch.config import settings_from_dict
    from dispatch.stats.config import config_from_settings

    day = config_from_settings(settings_from_dict({}))
    assert day.safety_window_s is None and day.timezone_offset_hours == 8.0
    other = config_from_settings(
        settings_from_dict({"stats": {"window": "6h", "timezone_offset_hours": 7}})
    )
    assert other.safety_window_s == 6 * 3600 and other.timezone_offset_hours == 7.0
