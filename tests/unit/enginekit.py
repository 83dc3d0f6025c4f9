"""A small real town for engine tests: real grids (shapely), the real CellIndex, a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dispatch.clock import FakeClock
from dispatch.engine import commands as c
from dispatch.engine.engine import Engine, Outcome
from dispatch.engine.events import Event
from dispatch.engine.model import Category, ResponderInfo, Timing, Town
from dispatch.geo.distance import haversine_m
from dispatch.geo.grids import GridSet, grids_from_geojson
from dispatch.geo.index import CellIndex
from tests.smalltown import feature_collection

H = 3600.0
CATEGORIES = {
    "fire_hazard": Category(
        "fire_hazard", "Fire hazard", "fire", 1, False, {3: 2 * H, 2: 24 * H, 1: 72 * H}
    ),
    "sanitation": Category(
        "sanitation", "Sanitation", "other", 3, False, {3: 24 * H, 2: 48 * H, 1: 72 * H}
    ),
    "dispute": Category(
        "dispute", "Dispute", "public_security", 2, True, {3: 4 * H, 2: 8 * H, 1: 24 * H}
    ),
    "gas_leak": Category(
        "gas_leak", "Gas leak", "fire", 1, False, {3: 1800.0, 2: 3600.0, 1: 7200.0}
    ),
}


def roster(rows: list[tuple[str, str, str, str]] | None = None) -> dict[str, ResponderInfo]:
    rows = rows or [
        ("w1", "grid_worker", "V1A", "*"),
        ("w2", "grid_worker", "V1A", "*"),
        ("w3", "grid_worker", "V1B", "*"),
        ("w4", "grid_worker", "V2A", "sanitation"),
        ("w5", "grid_worker", "V1B", "*"),
        ("w6", "grid_worker", "V2B", "*"),
        ("d1", "department", "T0", "*"),
    ]
    out = {}
    for rid, kind, home, skills in rows:
        out[rid] = ResponderInfo(
            id=rid,
            name=rid.upper(),
            kind=kind,  # type: ignore[arg-type]
            home_grid=home,
            skills=frozenset(skills.split(";")),
            department="police" if kind == "department" else None,
        )
    return out


def gridset() -> GridSet:
    return grids_from_geojson(feature_collection())


GRIDSET = gridset()


def town(responders: dict[str, ResponderInfo] | None = None) -> Town:
    return GRIDSET.to_town("T0", CATEGORIES, responders or roster())


TIMING = Timing(offer_timeout=60.0, position_stale_after=120.0, offline_after=30.0)


@dataclass
class Kit:
    """An engine, a fake clock, and every event it ever produced (for replay checks)."""

    engine: Engine
    clock: FakeClock
    events: list[Event] = field(default_factory=list)
    notices: list[Any] = field(default_factory=list)

    @classmethod
    def new(
        cls,
        responders: dict[str, ResponderInfo] | None = None,
        index: CellIndex | None = None,
        timing: Timing = TIMING,
    ) -> Kit:
        t = town(responders)
        return cls(
            Engine(t, index if index is not None else CellIndex(), GRIDSET, timing), FakeClock()
        )

    @property
    def state(self) -> Any:
        return self.engine.state

    def _take(self, out: Outcome) -> Outcome:
        self.events.extend(out.events)
        self.notices.extend(out.notices)
        return out

    def do(self, command: c.Command) -> Outcome:
        return self._take(self.engine.handle(command, self.clock.now()))

    def tick(self, seconds: float = 0.0) -> Outcome:
        self.clock.jump(seconds)
        return self._take(self.engine.tick(self.clock.now()))

    def online(self, rid: str, lon: float, lat: float) -> None:
        self.do(c.Connect(rid))
        self.engine.position(rid, lon, lat, self.clock.now())

    def report(
        self,
        category: str = "fire_hazard",
        lon: float = 113.006,
        lat: float = 22.606,
        ref: str | None = None,
        actor: str | None = "w3",
        **kw: Any,
    ) -> str:
        ref = ref or f"r{len(self.events)}"
        out = self.do(c.Report(ref=ref, category=category, lon=lon, lat=lat, actor=actor, **kw))
        assert out.incident is not None
        return out.incident

    def types(self, since: int = 0) -> list[str]:
        return [e.type_name() for e in self.events[since:] if e.type_name() != "responder.status"]


def brute_nearest(
    engine: Engine,
    pool: str,
    lon: float,
    lat: float,
    *,
    skill: str,
    fresh_since: float,
    exclude: Any = (),
    k: int = 1,
) -> list[tuple[str, float]]:
    """The dispatch rule by brute force over the engine's own state."""
    state = engine.state
    town_ = engine.town
    found = []
    for rid, r in state.responders.items():
        if rid in exclude or r.status != "available" or not r.info.can_handle(skill):
            continue
        pools = set(town_.ancestors(r.info.home_grid))
        if r.info.department:
            pools.add(f"dept:{r.info.department}")
        if pool not in pools:
            continue
        pos = state.index.position(rid)
        if pos is None or pos[2] < fresh_since:
            continue
        found.append((haversine_m(lon, lat, pos[0], pos[1]), rid))
    found.sort()
    return [(rid, d) for d, rid in found[:k]]
