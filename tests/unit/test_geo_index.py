"""CellIndex answers exactly what a brute-force haversine search over the eligible responders
answers (ids, distances, order, ties to the smaller id), whatever moves, flips and filters."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dispatch.engine.model import ResponderIndex
from dispatch.geo.distance import EARTH_RADIUS_M, haversine_m
from dispatch.geo.index import SPEEDUPS, CellIndex, _cell_lb

LON0, LAT0 = 113.19, 22.61

both = pytest.mark.parametrize("speedups", [True, False], ids=["compiled", "python"])
"""Run a test against the compiled search (dispatch/geo/_speedups.c) and the pure-Python one."""


def test_compiled_search_is_built() -> None:
    """`make` installs with DISPATCH_REQUIRE_SPEEDUPS=1; without it the "compiled" runs below
    would silently test the Python search twice."""
    assert SPEEDUPS


# -- the reference --------------------------------------------------------------------------------


@dataclass
class Ref:
    pools: frozenset[str] = frozenset()
    skills: frozenset[str] = frozenset()
    available: bool = False
    pos: tuple[float, float, float] | None = None


@dataclass
class Model:
    """The brute-force definition of the ResponderIndex contract."""

    rs: dict[str, Ref] = field(default_factory=dict)

    def get(self, rid: str) -> Ref:
        return self.rs.setdefault(rid, Ref())

    def nearest(
        self,
        pool: str,
        lon: float,
        lat: float,
        skill: str,
        fresh: float,
        exclude: frozenset[str],
        k: int,
    ) -> list[tuple[str, float]]:
        found = []
        for rid, r in self.rs.items():
            if r.pos is None or not r.available or pool not in r.pools:
                continue
            if "*" not in r.skills and skill not in r.skills:
                continue
            if rid in exclude or r.pos[2] < fresh:
                continue
            found.append((haversine_m(lon, lat, r.pos[0], r.pos[1]), rid))
        found.sort()
        return [(rid, d) for d, rid in found[:k]]


def _typed(index: CellIndex) -> ResponderIndex:
    return index  # mypy (when run over tests) checks CellIndex against the protocol


# -- haversine ----------------------------------------------------------------------------------


def test_haversine_known_values() -> None:
    assert haversine_m(LON0, LAT0, LON0, LAT0) == 0.0
    one_degree = EARTH_RADIUS_M * math.pi / 180
    assert haversine_m(0.0, 0.0, 0.0, 1.0) == pytest.approx(one_degree, rel=1e-12)
    assert haversine_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(one_degree, rel=1e-12)
    # a degree of longitude shrinks with cos(latitude)
    assert haversine_m(LON0, 60.0, LON0 + 0.001, 60.0) == pytest.approx(
        one_degree * 0.001 * 0.5, rel=1e-6
    )
    assert haversine_m(0.0, 0.0, 180.0, 0.0) == pytest.approx(math.pi * EARTH_RADIUS_M)
    assert haversine_m(179.9, 0.0, -179.9, 0.0) == pytest.approx(one_degree * 0.2, rel=1e-9)
    # Guangzhou to Shenzhen, about 104 km
    assert 100_000 < haversine_m(113.264, 23.129, 114.057, 22.543) < 108_000


# -- plain behaviour ----------------------------------------------------------------------------


def make(*rows: tuple[str, float, float, str], speedups: bool = True) -> CellIndex:
    """Responders in pool "p", available, at (x, y) in about-100 m units, with skills."""
    idx = CellIndex(speedups=speedups)
    for rid, x, y, skills in rows:
        idx.register(rid, ["p", f"home-{rid}"], frozenset(skills.split(";")))
        idx.set_available(rid, True)
        idx.move(rid, LON0 + x * 0.001, LAT0 + y * 0.001, 100.0)
    return idx


def near(idx: CellIndex, x: float, y: float, **kw: object) -> list[str]:
    kw.setdefault("skill", "fire")
    kw.setdefault("fresh_since", 0.0)
    got = idx.nearest("p", LON0 + x * 0.001, LAT0 + y * 0.001, **kw)  # type: ignore[arg-type]
    return [rid for rid, _ in got]


@both
def test_filters_each_apply(speedups: bool) -> None:
    idx = make(
        ("a", 0, 0, "*"), ("b", 1, 0, "fire"), ("c", 2, 0, "traffic"), ("d", 3, 0, "*"),
        speedups=speedups,
    )  # fmt: skip
    assert near(idx, 0, 0, k=4) == ["a", "b", "d"]  # c lacks the skill
    assert near(idx, 0, 0, skill="traffic", k=4) == ["a", "c", "d"]
    assert near(idx, 0, 0, exclude={"a"}) == ["b"]
    assert near(idx, 0, 0, exclude={"a": 1}) == ["b"]  # any container
    assert near(idx, 0, 0, exclude=("a", "b"), k=2) == ["d"]
    idx.set_available("b", False)
    assert near(idx, 0, 0, exclude={"a"}) == ["d"]
    idx.set_available("b", True)
    assert near(idx, 0, 0, exclude={"a"}) == ["b"]
    idx.move("b", LON0 + 0.001, LAT0, 50.0)  # now stale
    assert near(idx, 0, 0, exclude={"a"}, fresh_since=60.0) == ["d"]
    assert near(idx, 0, 0, exclude={"a"}, fresh_since=50.0) == ["b"]  # at fresh_since is fresh
    assert idx.nearest("home-c", LON0, LAT0, skill="fire", fresh_since=0.0) == []
    assert idx.nearest("nowhere", LON0, LAT0, skill="fire", fresh_since=0.0) == []
    assert near(idx, 0, 0, k=0) == []


@both
def test_distances_ordering_and_ties_by_id(speedups: bool) -> None:
    idx = make(
        ("z", 1, 1, "*"), ("m", 1, 1, "*"), ("a", 5, 5, "*"), ("q", -2, 0, "*"),
        speedups=speedups,
    )  # fmt: skip
    got = idx.nearest("p", LON0, LAT0, skill="x", fresh_since=0.0, k=3)
    d1 = haversine_m(LON0, LAT0, LON0 + 0.001, LAT0 + 0.001)
    d2 = haversine_m(LON0, LAT0, LON0 - 0.002, LAT0)
    assert d1 < d2 < haversine_m(LON0, LAT0, LON0 + 0.005, LAT0 + 0.005)
    # m and z share a spot: the tie goes to the smaller id
    assert got == [("m", d1), ("z", d1), ("q", d2)]
    assert idx.nearest("p", LON0, LAT0, skill="x", fresh_since=0.0, exclude={"m"}) == [("z", d1)]


@both
def test_no_position_never_returned_and_position_kept(speedups: bool) -> None:
    idx = CellIndex(speedups=speedups)
    idx.register("a", ["p"], frozenset({"*"}))
    idx.set_available("a", True)
    assert idx.position("a") is None
    assert idx.nearest("p", LON0, LAT0, skill="x", fresh_since=-math.inf) == []
    idx.move("a", LON0, LAT0, 5.0)
    assert idx.position("a") == (LON0, LAT0, 5.0)
    assert idx.nearest("p", LON0, LAT0, skill="x", fresh_since=0.0) == [("a", 0.0)]
    # a device may report before the roster registers it
    idx.move("ghost", LON0, LAT0, 6.0)
    assert idx.position("ghost") == (LON0, LAT0, 6.0)
    assert sorted(idx.all_positions()) == [("a", LON0, LAT0, 5.0), ("ghost", LON0, LAT0, 6.0)]
    idx.register("ghost", ["p"], frozenset({"x"}))
    idx.set_available("ghost", True)
    assert [r for r, _ in idx.nearest("p", LON0, LAT0, skill="x", fresh_since=0.0, k=2)] == [
        "a",
        "ghost",
    ]
    idx.remove("a")
    assert idx.position("a") is None
    assert idx.nearest("p", LON0, LAT0, skill="x", fresh_since=0.0) == [("ghost", 0.0)]


@both
def test_reregister_replaces_pools_and_skills(speedups: bool) -> None:
    idx = make(("a", 0, 0, "fire"), speedups=speedups)
    idx.register("a", ["q"], frozenset({"traffic"}))
    assert near(idx, 0, 0) == []
    assert idx.nearest("q", LON0, LAT0, skill="traffic", fresh_since=0.0) == [("a", 0.0)]
    assert idx.nearest("q", LON0, LAT0, skill="fire", fresh_since=0.0) == []


@both
def test_rejects_impossible_positions_and_query_points(speedups: bool) -> None:
    idx = make(("b", 0, 0, "*"), speedups=speedups)
    for lon, lat in [(math.nan, 0.0), (0.0, 91.0), (181.0, 0.0), (0.0, math.inf), (1e300, 0.0)]:
        with pytest.raises(ValueError):
            idx.move("a", lon, lat, 0.0)
        with pytest.raises(ValueError, match="out of range"):
            idx.nearest("p", lon, lat, skill="x", fresh_since=0.0)
    assert idx.position("a") is None
    assert near(idx, 0, 0) == ["b"]  # nothing else changed


# -- against brute force at scale ---------------------------------------------------------------


def _check_many(
    idx: CellIndex, model: Model, rng: random.Random, n: int, spread: float, c: tuple[float, float]
) -> None:
    for _ in range(n):
        lon = c[0] + rng.uniform(-spread, spread)
        lat = c[1] + rng.uniform(-spread, spread)
        k = rng.choice([1, 1, 2, 5])
        skill = rng.choice(["fire", "police", "rare"])
        fresh = rng.choice([0.0, 50.0])
        excl = frozenset(rng.sample(sorted(model.rs), 3))
        want = model.nearest("town", lon, lat, skill, fresh, excl, k)
        got = idx.nearest("town", lon, lat, skill=skill, fresh_since=fresh, exclude=excl, k=k)
        assert got == want


@pytest.mark.parametrize("c", [(LON0, LAT0), (-60.0, 0.0)], ids=["guangdong", "equator"])
@pytest.mark.parametrize("layout", ["uniform", "clustered"])
@both
def test_large_random_town_matches_brute_force(
    layout: str, c: tuple[float, float], speedups: bool
) -> None:
    rng = random.Random(layout)
    idx, model = CellIndex(speedups=speedups), Model()
    spread = 0.09  # about 20 km across
    for i in range(3000):
        rid = f"r{i:05d}"
        skills = frozenset(["*"] if i % 3 else [rng.choice(["fire", "police"])])
        if i % 500 == 7:
            skills = frozenset({"rare"})
        idx.register(rid, ["town"], skills)
        model.get(rid).pools, model.get(rid).skills = frozenset({"town"}), skills
        if layout == "clustered":
            cx, cy = rng.choice([(-0.05, -0.05), (0.03, 0.04), (0.0, 0.0)])
            lon, lat = c[0] + cx + rng.gauss(0, 0.002), c[1] + cy + rng.gauss(0, 0.002)
        else:
            lon, lat = c[0] + rng.uniform(-spread, spread), c[1] + rng.uniform(-spread, spread)
        ts = rng.choice([40.0, 100.0, 100.0, 100.0])
        idx.move(rid, lon, lat, ts)
        model.get(rid).pos = (lon, lat, ts)
        if rng.random() < 0.9:
            idx.set_available(rid, True)
            model.get(rid).available = True
    _check_many(idx, model, rng, 300, spread, c)
    # everyone walks a few hundred metres; some flip availability
    for rid, r in model.rs.items():
        assert r.pos is not None
        lon, lat = r.pos[0] + rng.gauss(0, 0.003), r.pos[1] + rng.gauss(0, 0.003)
        idx.move(rid, lon, lat, r.pos[2])
        r.pos = (lon, lat, r.pos[2])
        if rng.random() < 0.1:
            r.available = not r.available
            idx.set_available(rid, r.available)
    _check_many(idx, model, rng, 300, spread, c)
    # far away queries scan the pool and still answer exactly
    for lon, lat in [(c[0] + 3.0, c[1]), (-70.0, -33.0), (LON0, 80.0)]:
        want = model.nearest("town", lon, lat, "fire", 0.0, frozenset(), 2)
        assert idx.nearest("town", lon, lat, skill="fire", fresh_since=0.0, k=2) == want


@both
def test_maps_adapt_when_members_spread_out(speedups: bool) -> None:
    rng = random.Random(3)
    idx, model = CellIndex(speedups=speedups), Model()
    for i in range(400):  # all start in a ~20 m square (a muster point) ...
        rid = f"r{i:03d}"
        idx.register(rid, ["town"], frozenset({"*"}))
        idx.set_available(rid, True)
        lon, lat = LON0 + rng.uniform(0, 2e-4), LAT0 + rng.uniform(0, 2e-4)
        idx.move(rid, lon, lat, 1.0)
        model.rs[rid] = Ref(frozenset({"town"}), frozenset({"*"}), True, (lon, lat, 1.0))
    fine = idx.pool_levels()[("town", "*")][0]
    before = idx.rebuilds
    for step in range(30):  # ... then fan out over 20 km
        for rid, r in model.rs.items():
            assert r.pos is not None
            lon, lat = r.pos[0] + rng.uniform(-0.003, 0.003), r.pos[1] + rng.uniform(-0.003, 0.003)
            idx.move(rid, lon, lat, 2.0 + step)
            r.pos = (lon, lat, 2.0 + step)
    assert idx.rebuilds > before
    assert idx.pool_levels()[("town", "*")][0] < fine
    _check_many_simple(idx, model, rng)


def _check_many_simple(idx: CellIndex, model: Model, rng: random.Random) -> None:
    for _ in range(200):
        lon, lat = LON0 + rng.uniform(-0.1, 0.1), LAT0 + rng.uniform(-0.1, 0.1)
        want = model.nearest("town", lon, lat, "x", 0.0, frozenset(), 3)
        assert idx.nearest("town", lon, lat, skill="x", fresh_since=0.0, k=3) == want


# -- hypothesis: any sequence of operations ----------------------------------------------------

RIDS = [f"r{i}" for i in range(12)]
POOLS = ["g3a", "g3b", "g2", "town"]
SKILLS = ["fire", "police", "traffic"]

# Lattice points make exact ties and cell-edge positions likely (2**-11 degrees is a cell edge at
# levels up to 11); the rest reaches across a town, a continent, the antimeridian and a pole.
_lattice = st.builds(
    lambda c, i, j, step: (c[0] + i * step, c[1] + j * step),
    st.sampled_from([(LON0, LAT0), (-60.0, 0.0)]),
    st.integers(-8, 8),
    st.integers(-8, 8),
    st.sampled_from([2.0**-11, 2.0**-7, 0.0003]),
)
_town = st.tuples(
    st.floats(LON0 - 0.1, LON0 + 0.1, allow_nan=False),
    st.floats(LAT0 - 0.1, LAT0 + 0.1, allow_nan=False),
)
_special = st.sampled_from(
    [
        (179.999, 10.0),
        (-179.999, 10.0),
        (180.0, 10.001),
        (-180.0, 9.999),
        (0.0, 89.999),
        (90.0, 89.999),
        (-170.0, 89.9999),
        (0.0, -90.0),
        (LON0 + 1.0, LAT0),
        (LON0, LAT0 + 20.0),
    ]
)
POINTS = st.one_of(_lattice, _lattice, _town, _special)


class IndexMachine(RuleBasedStateMachine):
    """Runs the same operations against several differently-tuned indexes and the model."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        tunings: list[dict[str, Any]] = [
            {},  # adaptive
            {"fixed_level": 16},  # tiny cells: long ring walks, scan fallback
            {"fixed_level": -3},  # 8-degree cells: everything in one bucket
            {"fixed_level": 11},  # cell edges on the lattice
            {"target_per_cell": 0.01},  # fine cells, rebuilds often
            # the best-first tree search after 0 or 1 rings, never a scan
            {"fixed_level": 14, "ring_limit": 0, "tree_budget": 0.0, "scan_fallback": False},
            {"ring_limit": 1, "tree_budget": 0.0, "scan_fallback": False},
        ]
        self.indexes = [
            CellIndex(speedups=speedups, **kw) for kw in tunings for speedups in (True, False)
        ]

    @initialize()
    def start(self) -> None:
        pass

    @rule(
        rid=st.sampled_from(RIDS),
        pools=st.sets(st.sampled_from(POOLS), max_size=3),
        skills=st.sets(st.sampled_from([*SKILLS, "*"]), max_size=2),
    )
    def register(self, rid: str, pools: set[str], skills: set[str]) -> None:
        r = self.model.get(rid)
        r.pools, r.skills = frozenset(pools), frozenset(skills)
        for idx in self.indexes:
            idx.register(rid, sorted(pools), frozenset(skills))

    @rule(rid=st.sampled_from(RIDS), available=st.booleans())
    def set_available(self, rid: str, available: bool) -> None:
        self.model.get(rid).available = available
        for idx in self.indexes:
            idx.set_available(rid, available)

    @rule(rid=st.sampled_from(RIDS), p=POINTS, ts=st.sampled_from([10.0, 20.0, 30.0]))
    def move(self, rid: str, p: tuple[float, float], ts: float) -> None:
        self.model.get(rid).pos = (p[0], p[1], ts)
        for idx in self.indexes:
            idx.move(rid, p[0], p[1], ts)

    @rule(
        pool=st.sampled_from(POOLS),
        p=POINTS,
        skill=st.sampled_from(SKILLS),
        fresh=st.sampled_from([0.0, 20.0, 25.0]),
        exclude=st.frozensets(st.sampled_from(RIDS), max_size=3),
        k=st.sampled_from([1, 1, 2, 5]),
    )
    def nearest(
        self,
        pool: str,
        p: tuple[float, float],
        skill: str,
        fresh: float,
        exclude: frozenset[str],
        k: int,
    ) -> None:
        want = self.model.nearest(pool, p[0], p[1], skill, fresh, exclude, k)
        for idx in self.indexes:
            got = idx.nearest(
                pool, p[0], p[1], skill=skill, fresh_since=fresh, exclude=exclude, k=k
            )
            assert got == want

    @invariant()
    def positions_agree(self) -> None:
        for idx in self.indexes:
            for rid in RIDS:
                r = self.model.rs.get(rid)
                assert idx.position(rid) == (r.pos if r is not None else None)


IndexMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIndexMachine = IndexMachine.TestCase


def test_typed_protocol() -> None:
    idx = _typed(CellIndex())
    idx.register("a", ["p"], frozenset({"*"}))
    idx.set_available("a", True)
    idx.move("a", 1.0, 2.0, 3.0)
    assert idx.nearest("p", 1.0, 2.0, skill="s", fresh_since=0.0, k=1) == [("a", 0.0)]


@pytest.mark.parametrize("level", [None, 11, 16])
@both
def test_antimeridian_and_pole_neighbours(level: int | None, speedups: bool) -> None:
    rng = random.Random(5)
    filler = {f"f{i}": (rng.uniform(-100, 100), rng.uniform(-60, 60)) for i in range(300)}

    def build(points: dict[str, tuple[float, float]]) -> CellIndex:
        # Filler makes many cells, so the search walks rings instead of scanning at once.
        idx = CellIndex(speedups=speedups, fixed_level=level)
        points = {**filler, **points}
        for rid, (lon, lat) in points.items():
            idx.register(rid, ["p"], frozenset({"*"}))
            idx.set_available(rid, True)
            idx.move(rid, lon, lat, 1.0)
        return idx

    # across the antimeridian: "east" is 67 m away, "west" 167 m, in index terms much nearer
    idx = build({"east": (-179.9999, 0.0), "west": (179.998, 0.0)})
    got = idx.nearest("p", 179.9995, 0.0, skill="x", fresh_since=0.0)
    assert got == [("east", haversine_m(179.9995, 0.0, -179.9999, 0.0))]
    got = idx.nearest("p", -179.9995, 0.0, skill="x", fresh_since=0.0)
    assert got == [("east", haversine_m(-179.9995, 0.0, -179.9999, 0.0))]
    # near the pole, 180 degrees of longitude apart is a few metres
    idx = build({"over": (-170.0, 89.99995), "same": (10.0, 89.9990)})
    got = idx.nearest("p", 10.0, 89.99995, skill="x", fresh_since=0.0)
    assert [r for r, _ in got] == ["over"]
    assert got[0][1] == pytest.approx(11.1, abs=0.1)


def _unit(lon: float, lat: float) -> tuple[float, float, float]:
    p, q = math.radians(lat), math.radians(lon)
    return (math.cos(p) * math.cos(q), math.cos(p) * math.sin(q), math.sin(p))


@settings(max_examples=400, deadline=None)
@given(
    level=st.sampled_from([-4, -3, -2, 0, 3, 8, 12, 16]),
    cell=st.tuples(st.integers(-(1 << 20), 1 << 20), st.integers(-(1 << 20), 1 << 20)),
    special=st.booleans(),
    q=st.tuples(st.floats(-180, 180), st.floats(-90, 90)),
    near=st.booleans(),
)
def test_cell_lower_bound_never_exceeds_a_chord(
    level: int, cell: tuple[int, int], special: bool, q: tuple[float, float], near: bool
) -> None:
    """The tree search prunes cells by _cell_lb: it must not exceed the chord from the query to
    any point of the cell, including cells spanning 90 or 180 degrees of longitude."""
    size = 2.0**-level
    span_i, span_j = int(90 / size) + 1, int(180 / size) + 1
    i, j = cell[0] % (2 * span_i) - span_i, cell[1] % (2 * span_j) - span_j
    if special:  # the cell holding one of the longitudes where sin or cos peaks
        j = math.floor(rng_pick(cell[1], [90.0, -90.0, 180.0, -180.0, 0.0]) / size)
    lat0, lon0 = i * size, j * size
    qlon, qlat = q
    if near:  # a query close to the cell, where the bound is tight
        qlon = max(-180.0, min(180.0, lon0 + (q[0] / 180.0) * 2 * size))
        qlat = max(-90.0, min(90.0, lat0 + (q[1] / 90.0) * 2 * size))
    qx, qy, qz = _unit(qlon, qlat)
    lb = _cell_lb(qx, qy, qz, i, j, size)
    lats = [min(90.0, max(-90.0, lat0 + size * f)) for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    lons = [lon0 + size * f for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    lons += [x for x in (90.0, -90.0, 180.0, -180.0, 0.0) if lon0 <= x <= lon0 + size]
    for lat in lats:
        for lon in lons:
            x, y, z = _unit(lon, lat)
            chord = math.sqrt((x - qx) ** 2 + (y - qy) ** 2 + (z - qz) ** 2)
            assert lb <= chord + 1e-12, (lb, chord, lon, lat)


def rng_pick(seed: int, options: list[float]) -> float:
    return options[seed % len(options)]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"fixed_level": 14, "ring_limit": 0, "tree_budget": 0.0, "scan_fallback": False},
        {"fixed_level": 14, "ring_limit": 1, "tree_budget": 0.0, "scan_fallback": False},
    ],
    ids=["default", "tree-only", "rings-then-tree"],
)
@both
def test_queries_at_a_pole_terminate(kw: dict[str, object], speedups: bool) -> None:
    """At a pole the ring bound's longitude part is zero: the search must leave the rings."""
    rng = random.Random(11)
    idx = CellIndex(speedups=speedups, **kw)  # type: ignore[arg-type]
    model = Model()
    spots = [(rng.uniform(-180, 180), rng.uniform(-80, 80)) for _ in range(200)]
    spots += [(0.0, 90.0), (45.0, 89.99), (10.0, -90.0), (179.99, -89.999)]
    for n, (lon, lat) in enumerate(spots):
        rid = f"p{n:03d}"
        idx.register(rid, ["all"], frozenset({"*"}))
        idx.set_available(rid, True)
        idx.move(rid, lon, lat, 1.0)
        model.rs[rid] = Ref(frozenset({"all"}), frozenset({"*"}), True, (lon, lat, 1.0))
    for lon, lat in [(0.0, 90.0), (-120.0, 90.0), (0.0, -90.0), (90.0, -89.9999), (180.0, 0.0)]:
        for k in (1, 3):
            want = model.nearest("all", lon, lat, "x", 0.0, frozenset(), k)
            assert idx.nearest("all", lon, lat, skill="x", fresh_since=0.0, k=k) == want
