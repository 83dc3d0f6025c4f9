"""The demo town: a deterministic generator of grids, roster, categories and a demo config.

``generate_demo_town(out_dir, seed=7)`` writes four files that ``dispatch serve`` reads as they
are (see PROTOCOL.md "Running" and "Demo"):

* ``grids.geojson`` — 1 town ``T``, 13 villages/communities ``V01``…``V13`` and 68 basic grids
  ``V01-G01``… (82 in all), near 22.61°N 113.19°E, about 15 × 12 km.
* ``roster.csv`` — 958 grid workers ``W0001``…, 40 department units ``D-police-01``… and 40
  volunteers ``VOL001``….
* ``categories.toml`` — the category table :data:`CATEGORIES` (also in ``config/``).
* ``dispatch.toml`` — a server config for the demo (127.0.0.1:8080, SQLite store).

How the map is made, and why it is exact. The town outline is an ellipse with a few seeded
harmonics. Villages are the Voronoi cells of 13 seeded points (relaxed twice by Lloyd's method so
they are of similar size) clipped to the town; basic grids are the Voronoi cells of points inside
each village, clipped to the village. Clipping in floating point leaves neighbours whose shared
edges differ in the last bits, and rounding each polygon on its own would open gaps and
overlaps. So the 68 basic grids are snapped *together*: their boundaries are noded in one pass
with a 1e-6° grid (snap rounding), polygonized into faces, each face is given back to the grid it
came from, and every grid, village and the town are exact unions of faces. Neighbours then share
identical vertices, children cover their parent exactly and siblings meet only along edges;
:func:`check_hierarchy` verifies it before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import secrets
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPoint, Point, Polygon, mapping
from shapely.geometry.polygon import orient

from dispatch.sim import names

# --- geography -------------------------------------------------------------------------------

LON0, LAT0 = 113.19, 22.61
#: Metres per degree at LAT0 (WGS84 ellipsoid series).
M_PER_DEG_LAT = 111_132.92 - 559.82 * math.cos(2 * math.radians(LAT0))
M_PER_DEG_LON = 111_412.84 * math.cos(math.radians(LAT0)) - 93.5 * math.cos(3 * math.radians(LAT0))
GRID_SIZE = 1e-6  # degrees: coordinates are written with 6 decimals (≈ 0.1 m)

TOWN_ID = "T"
N_VILLAGES = 13
N_BASIC = 68
N_COMMUNITIES = 4  # the most central level-2 grids are 社区, the rest 村
POPULATION = 120_000
N_GRID_WORKERS = 958
UNITS_PER_DEPARTMENT = 8
N_VOLUNTEERS = 40


# --- categories ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CategorySpec:
    """One row of ``categories.toml``; ``limits`` are the level 3, 2, 1 durations."""

    code: str
    name: str
    name_zh: str
    group: str
    priority: int
    verify: bool
    limits: tuple[str, str, str]
    department: str | None = None


CATEGORIES: tuple[CategorySpec, ...] = (
    # public security
    CategorySpec("public_order_hazard", "Public-order hazard", "治安隐患", "public_security", 2,
                 False, ("2h", "8h", "24h"), "police"),
    CategorySpec("dispute", "Dispute", "矛盾纠纷", "public_security", 3,
                 True, ("24h", "3d", "7d"), "mediation"),
    CategorySpec("drug_lead", "Drug lead", "涉毒线索", "public_security", 2,
                 True, ("4h", "12h", "24h"), "police"),
    CategorySpec("hospital_disturbance", "Hospital disturbance", "涉医纠纷", "public_security", 1,
                 False, ("30m", "1h", "2h"), "police"),
    CategorySpec("special_population", "Special population (community correction)",
                 "特殊人群异常", "public_security", 3, True, ("24h", "48h", "72h"), "police"),
    # fire
    CategorySpec("fire_hazard", "Fire hazard", "消防安全隐患", "fire", 2,
                 False, ("2h", "12h", "24h"), "fire"),
    CategorySpec("gas_leak", "Gas leak", "燃气泄漏", "fire", 1,
                 False, ("30m", "1h", "2h"), "fire"),
    CategorySpec("blocked_fire_escape", "Blocked fire escape", "消防通道堵塞", "fire", 2,
                 False, ("2h", "8h", "24h"), "fire"),
    # traffic
    CategorySpec("traffic_accident", "Traffic accident", "交通事故", "traffic", 1,
                 False, ("30m", "1h", "2h"), "traffic_police"),
    CategorySpec("illegal_parking", "Illegal parking", "违规停车", "traffic", 4,
                 False, ("2h", "8h", "24h"), "urban_management"),
    CategorySpec("damaged_road_facility", "Damaged road facility", "道路设施损坏", "traffic", 3,
                 False, ("24h", "48h", "72h"), "urban_management"),
    # other
    CategorySpec("rental_housing", "Rental housing (unregistered tenants)", "出租屋人员未登记",
                 "other", 4, True, ("48h", "72h", "5d"), "police"),
    CategorySpec("food_drug_safety", "Food and drug safety lead", "食品药品安全线索", "other", 2,
                 True, ("4h", "24h", "48h"), "market_supervision"),
    CategorySpec("sanitation", "Sanitation", "环境卫生", "other", 4,
                 False, ("24h", "48h", "72h"), "urban_management"),
    CategorySpec("illegal_construction", "Illegal construction", "违法建设", "other", 3,
                 True, ("24h", "72h", "7d"), "urban_management"),
    CategorySpec("damaged_public_facility", "Damaged public facility (manhole cover, street light)",
                 "公共设施损坏", "other", 3, False, ("8h", "24h", "48h"), "urban_management"),
    CategorySpec("street_vending", "Street vending", "占道经营", "other", 4,
                 False, ("4h", "24h", "48h"), "urban_management"),
    CategorySpec("illegal_small_ads", "Illegal small ads", "违法小广告", "other", 4,
                 False, ("24h", "48h", "72h"), "urban_management"),
    CategorySpec("workplace_safety", "Workplace safety hazard", "安全生产隐患", "other", 2,
                 True, ("8h", "24h", "48h"), "emergency_management"),
    CategorySpec("pollution", "Pollution (waste water, fumes)", "环境污染", "other", 2,
                 True, ("4h", "24h", "48h"), "environment"),
    CategorySpec("noise", "Noise nuisance", "噪声扰民", "other", 4,
                 False, ("8h", "24h", "48h"), "environment"),
)  # fmt: skip

#: Department units in the roster, and categories they handle beyond those whose default
#: ``department`` they are (police also take traffic accidents, fire also workplace safety …).
ROSTER_DEPARTMENTS: tuple[str, ...] = tuple(names.DEPARTMENTS)
EXTRA_DEPARTMENT_SKILLS: dict[str, tuple[str, ...]] = {
    "police": ("traffic_accident", "dispute"),
    "fire": ("workplace_safety",),
    "market_supervision": ("street_vending",),
    "environment": ("sanitation",),
}
#: Skills of the few specialised grid workers (rental-housing officers and safety officers).
SPECIALIST_SKILLS: tuple[tuple[str, ...], ...] = (
    ("rental_housing", "public_order_hazard", "dispute", "special_population"),
    ("fire_hazard", "gas_leak", "blocked_fire_escape", "workplace_safety"),
)
VOLUNTEER_SKILLS: tuple[str, ...] = (
    "sanitation", "illegal_small_ads", "street_vending", "illegal_parking",
    "public_order_hazard", "damaged_public_facility", "fire_hazard", "blocked_fire_escape",
)  # fmt: skip


def department_skills(department: str) -> list[str]:
    """Category codes a unit of ``department`` may handle, in table order."""
    extra = EXTRA_DEPARTMENT_SKILLS.get(department, ())
    return [c.code for c in CATEGORIES if c.department == department or c.code in extra]


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def categories_toml() -> str:
    """The category table as the text of ``categories.toml`` (PROTOCOL.md format + extras)."""
    out = [
        '# Case categories (PROTOCOL.md "Running"), after shared/DOMAIN.md.',
        "# Written from dispatch.sim.town.CATEGORIES (edit the table there, then run",
        "# python -m dispatch.sim.town config/demo --categories config/categories.toml).",
        "#",
        "# group:    safety-index group (public_security, fire, traffic, other)",
        "# priority: 1 = most urgent … 4",
        "# verify:   true = a resolved case waits for an operator (or the reporter) to close it",
        "# limits:   time to resolve at each level, counted from arrival at that level",
        "# extras:   name_zh (Chinese name), department (default transfer target)",
        "",
    ]
    for c in CATEGORIES:
        l3, l2, l1 = c.limits
        out += [
            f"[categories.{c.code}]",
            f"name = {_toml_str(c.name)}",
            f"name_zh = {_toml_str(c.name_zh)}",
            f"group = {_toml_str(c.group)}",
            f"priority = {c.priority}",
            f"verify = {'true' if c.verify else 'false'}",
            f'limits = {{ "3" = "{l3}", "2" = "{l2}", "1" = "{l1}" }}',
        ]
        if c.department:
            out.append(f"department = {_toml_str(c.department)}")
        out.append("")
    return "\n".join(out)


def dispatch_toml(secret: str, seed: int) -> str:
    """The demo server config; paths are relative to the file."""
    return f"""\
# Demo town config, written by `python -m dispatch.sim.town DIR --seed {seed}`.
# Paths are relative to this file. The secret is for the demo only.

[server]
host = "127.0.0.1"
port = 8080

[auth]
secret = "{secret}"
metrics_open = false

[data]
grids = "grids.geojson"
roster = "roster.csv"
categories = "categories.toml"

[store]
url = "sqlite:///dispatch.db"

[dispatch]
offer_timeout = "30s"
position_stale_after = "120s"
offline_after = "30s"
"""


# --- geometry helpers ------------------------------------------------------------------------


def to_lonlat(geom: Any) -> Any:
    """Local metres (east, north of LON0/LAT0) → WGS84 lon/lat."""
    scale = np.array([1.0 / M_PER_DEG_LON, 1.0 / M_PER_DEG_LAT])
    return shapely.transform(geom, lambda xy: xy * scale + np.array([LON0, LAT0]))


def _town_outline(rng: random.Random) -> Polygon:
    """An irregular, star-shaped outline of about 15 × 12 km (in local metres)."""
    n = 120
    theta = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 8):
        amp, phase = rng.uniform(0.03, 0.13) / math.sqrt(k), rng.uniform(0, 2 * math.pi)
        r += amp * np.cos(k * theta + phase)
    r *= 1.0 + np.array([rng.uniform(-0.015, 0.015) for _ in range(n)])
    xy = np.column_stack([7_500.0 * r * np.cos(theta), 6_000.0 * r * np.sin(theta)])
    # rescale so the bounding box is 15 × 12 km
    span = xy.max(axis=0) - xy.min(axis=0)
    xy = (xy - (xy.max(axis=0) + xy.min(axis=0)) / 2) * (np.array([15_000.0, 12_000.0]) / span)
    return Polygon(xy)


def _random_points(rng: random.Random, area: Polygon, n: int) -> list[Point]:
    minx, miny, maxx, maxy = area.bounds
    shapely.prepare(area)
    out: list[Point] = []
    while len(out) < n:
        p = Point(rng.uniform(minx, maxx), rng.uniform(miny, maxy))
        if area.contains(p):
            out.append(p)
    return out


def _largest(geom: Any) -> Polygon:
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, Polygon)]
    return max(parts, key=lambda g: g.area)


def _merge_fragments(cells: list[Any]) -> list[Polygon]:
    """Make each cell one polygon: stray parts go to the neighbour sharing most border."""
    cells = list(cells)
    for i, cell in enumerate(list(cells)):
        parts = [g for g in shapely.get_parts(cell) if isinstance(g, Polygon)]
        if len(parts) <= 1:
            continue
        parts.sort(key=lambda g: g.area, reverse=True)
        cells[i] = parts[0]
        for part in parts[1:]:
            j = max(
                (j for j in range(len(cells)) if j != i),
                key=lambda j: part.buffer(1.0).intersection(cells[j].boundary).length,
            )
            cells[j] = shapely.union(cells[j], part.buffer(0.01))
    return [_largest(c) for c in cells]


def _tessellate(rng: random.Random, area: Polygon, n: int, lloyd: int) -> list[Polygon]:
    """``n`` Voronoi cells of seeded points inside ``area``, clipped to it, relaxed ``lloyd``
    times so the cells are of similar size."""
    seeds = _random_points(rng, area, n)
    cells: list[Polygon] = []
    for it in range(lloyd + 1):
        vor = shapely.voronoi_polygons(MultiPoint(seeds), extend_to=area, ordered=True)
        cells = _merge_fragments([area.intersection(c) for c in shapely.get_parts(vor)])
        if it < lloyd:
            seeds = [
                c.centroid if area.contains(c.centroid) else c.point_on_surface() for c in cells
            ]
    return cells


def _apportion(total: int, weights: Sequence[float], lo: int, hi: int) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder), each in ``[lo, hi]``."""
    n = len(weights)
    if not lo * n <= total <= hi * n:
        raise ValueError(f"cannot split {total} into {n} parts of {lo}..{hi}")
    s = sum(weights)
    quota = [total * w / s for w in weights]
    out = [min(hi, max(lo, math.floor(q))) for q in quota]
    while sum(out) != total:
        step = 1 if sum(out) < total else -1
        ok = [i for i in range(n) if lo <= out[i] + step <= hi]
        i = max(ok, key=lambda i: step * (quota[i] - out[i]))
        out[i] += step
    return out


def _angle_order(points: Sequence[Point], centre: Point) -> list[int]:
    """Indices of ``points`` clockwise from north around ``centre``."""

    def key(i: int) -> float:
        dx, dy = points[i].x - centre.x, points[i].y - centre.y
        return math.atan2(dx, dy) % (2 * math.pi)

    return sorted(range(len(points)), key=key)


def _snap_coverage(cells: Sequence[Polygon]) -> list[Polygon]:
    """The exact, snapped coverage of ``cells`` (see the module docstring)."""
    lines = shapely.union_all([c.boundary for c in cells], grid_size=GRID_SIZE)
    faces = list(shapely.get_parts(shapely.polygonize(list(shapely.get_parts(lines)))))
    tree = shapely.STRtree(list(cells))
    owner: list[int] = []
    for f in faces:
        cand = [int(i) for i in tree.query(f)]
        areas = [shapely.intersection(f, cells[i]).area for i in cand]
        if cand and max(areas) > 0:
            owner.append(cand[int(np.argmax(areas))])
        else:
            owner.append(int(tree.nearest(f.point_on_surface())))
    for _ in range(10):
        merged = [
            shapely.coverage_union_all([f for f, o in zip(faces, owner, strict=True) if o == i])
            for i in range(len(cells))
        ]
        bad = [i for i, m in enumerate(merged) if not isinstance(m, Polygon)]
        if not bad:
            return merged
        for i in bad:  # give faces of stray parts to the neighbour sharing most border
            keep = _largest(merged[i])
            for k, f in enumerate(faces):
                if owner[k] != i or keep.covers(f):
                    continue
                nbrs = [j for j in range(len(cells)) if j != i and merged[j].touches(f)]
                owner[k] = max(nbrs, key=lambda j: f.intersection(merged[j]).length)
    raise RuntimeError("could not make every grid a single polygon")


# --- hierarchy -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GridFeature:
    id: str
    level: int
    parent: str | None
    name: str
    population: int
    geometry: Polygon


def check_hierarchy(grids: Sequence[GridFeature]) -> None:
    """Raise ``ValueError`` unless every grid is a valid polygon, children cover their parent
    exactly and siblings meet only along edges."""
    by_id = {g.id: g for g in grids}
    children: dict[str, list[GridFeature]] = {}
    for g in grids:
        if not isinstance(g.geometry, Polygon) or not g.geometry.is_valid:
            raise ValueError(f"grid {g.id}: not a valid polygon")
        if g.parent is None:
            if g.level != 1:
                raise ValueError(f"grid {g.id}: level {g.level} without parent")
            continue
        parent = by_id[g.parent]
        if parent.level != g.level - 1:
            raise ValueError(f"grid {g.id}: parent {parent.id} has level {parent.level}")
        if not parent.geometry.covers(g.geometry):
            raise ValueError(f"grid {g.id}: not inside its parent {parent.id}")
        children.setdefault(g.parent, []).append(g)
    for pid, kids in children.items():
        geoms = [k.geometry for k in kids]
        if not bool(shapely.coverage_is_valid(geoms)):
            raise ValueError(f"children of {pid}: not a valid coverage")
        for i, a in enumerate(kids):
            for b in kids[i + 1 :]:
                if a.geometry.overlaps(b.geometry) or a.geometry.intersection(b.geometry).area > 0:
                    raise ValueError(f"grids {a.id} and {b.id} overlap")
        union = shapely.coverage_union_all(geoms)
        if union.symmetric_difference(by_id[pid].geometry).area > 1e-12:
            raise ValueError(f"children of {pid} do not cover it exactly")
        if sum(k.population for k in kids) != by_id[pid].population:
            raise ValueError(f"populations of the children of {pid} do not add up")


def build_grids(seed: int = 7) -> list[GridFeature]:
    """The 82 grids of the demo town, town first, then villages, then basic grids."""
    rng = random.Random(seed)
    town = _town_outline(rng)
    villages = _tessellate(rng, town, N_VILLAGES, lloyd=4)
    # V01.. by distance from the centre for the communities, then clockwise from north
    centre = town.centroid
    by_dist = sorted(range(N_VILLAGES), key=lambda i: villages[i].centroid.distance(centre))
    inner, outer = by_dist[:N_COMMUNITIES], by_dist[N_COMMUNITIES:]
    outer = [outer[k] for k in _angle_order([villages[i].centroid for i in outer], centre)]
    villages = [villages[i] for i in inner + outer]
    vnames = names.village_names(N_VILLAGES)

    counts = _apportion(N_BASIC, [math.sqrt(v.area) for v in villages], lo=4, hi=7)
    cells: list[Polygon] = []
    owner: list[int] = []
    for vi, (village, k) in enumerate(zip(villages, counts, strict=True)):
        sub = _tessellate(rng, village, k, lloyd=3)
        order = _angle_order([c.centroid for c in sub], village.centroid)
        cells += [sub[i] for i in order]
        owner += [vi] * k
    snapped = _snap_coverage([to_lonlat(c) for c in cells])
    # exact 6-decimal values (identical vertices stay identical); exterior rings
    # counter-clockwise, as RFC 7946 asks
    snapped = [orient(shapely.transform(c, lambda xy: np.round(xy, 6)), 1.0) for c in snapped]

    # populations: grids are drawn around a similar number of households, so they vary less
    # than areas; community grids (many rented flats) hold more; seeded noise, exact total
    weights = [
        (1.5 if owner[i] < N_COMMUNITIES else 1.0) * rng.lognormvariate(0.0, 0.3)
        for i in range(len(cells))
    ]
    pops = _apportion(POPULATION, weights, lo=600, hi=POPULATION)

    out: list[GridFeature] = []
    basic: list[GridFeature] = []
    vgeoms: list[Polygon] = []
    for vi in range(N_VILLAGES):
        vid = f"V{vi + 1:02d}"
        idx = [i for i in range(len(cells)) if owner[i] == vi]
        for n, i in enumerate(idx, start=1):
            basic.append(
                GridFeature(
                    f"{vid}-G{n:02d}",
                    3,
                    vid,
                    names.basic_grid_name(vnames[vi], n),
                    pops[i],
                    snapped[i],
                )
            )
        vgeom = orient(shapely.coverage_union_all([snapped[i] for i in idx]), 1.0)
        vgeoms.append(vgeom)
        out.append(GridFeature(vid, 2, TOWN_ID, vnames[vi], sum(pops[i] for i in idx), vgeom))
    tgeom = orient(shapely.coverage_union_all(vgeoms), 1.0)
    town_f = GridFeature(TOWN_ID, 1, None, names.TOWN_NAME, sum(pops), tgeom)
    grids = [town_f, *out, *basic]
    check_hierarchy(grids)
    return grids


# --- roster ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RosterRow:
    id: str
    name: str
    kind: str
    home_grid: str
    skills: tuple[str, ...]
    department: str = ""


def build_roster(grids: Sequence[GridFeature], seed: int = 7) -> list[RosterRow]:
    """Grid workers per basic grid (≈14, more where more people live), department units at the
    town, volunteers in the villages."""
    rng = random.Random(f"roster:{seed}")
    basic = [g for g in grids if g.level == 3]
    villages = [g for g in grids if g.level == 2]
    mean_pop = sum(g.population for g in basic) / len(basic)
    counts = _apportion(N_GRID_WORKERS, [1.0 + g.population / mean_pop for g in basic], 10, 20)
    rows: list[RosterRow] = []
    for g, k in zip(basic, counts, strict=True):
        for _ in range(k):
            skills: tuple[str, ...] = ("*",)
            if rng.random() < 0.03:
                skills = rng.choice(SPECIALIST_SKILLS)
            rows.append(
                RosterRow(
                    f"W{len(rows) + 1:04d}", names.person_name(rng), "grid_worker", g.id, skills
                )
            )
    for dep in ROSTER_DEPARTMENTS:
        dskills = tuple(department_skills(dep))
        for n in range(1, UNITS_PER_DEPARTMENT + 1):
            rows.append(
                RosterRow(
                    f"D-{dep}-{n:02d}",
                    names.department_unit_name(dep, n),
                    "department",
                    TOWN_ID,
                    dskills,
                    dep,
                )
            )
    for n in range(1, N_VOLUNTEERS + 1):
        v = villages[(n - 1) % len(villages)] if n <= len(villages) else rng.choice(villages)
        picked = set(rng.sample(VOLUNTEER_SKILLS, rng.randint(3, 5)))
        vskills = tuple(s for s in VOLUNTEER_SKILLS if s in picked)
        rows.append(
            RosterRow(f"VOL{n:03d}", names.volunteer_name(rng, v.name), "volunteer", v.id, vskills)
        )
    return rows


# --- files -----------------------------------------------------------------------------------


def grids_geojson(grids: Iterable[GridFeature]) -> str:
    """A FeatureCollection, one feature per line (small diffs, still valid JSON)."""
    feats = []
    for g in grids:
        props = {
            "id": g.id,
            "level": g.level,
            "parent": g.parent,
            "name": g.name,
            "population": g.population,
        }
        feat = {"type": "Feature", "properties": props, "geometry": mapping(g.geometry)}
        feats.append(json.dumps(feat, ensure_ascii=False, separators=(",", ":")))
    return '{"type":"FeatureCollection","features":[\n' + ",\n".join(feats) + "\n]}\n"


def roster_csv(rows: Iterable[RosterRow], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "name", "kind", "home_grid", "skills", "department"])
        for r in rows:
            w.writerow([r.id, r.name, r.kind, r.home_grid, ";".join(r.skills), r.department])


@dataclass(frozen=True, slots=True)
class DemoTown:
    """Where the demo files are and what they hold."""

    out_dir: Path
    grids_path: Path
    roster_path: Path
    categories_path: Path
    config_path: Path
    seed: int
    secret: str
    grids: Mapping[int, int]  # level → count
    responders: Mapping[str, int]  # kind → count
    population: int
    categories: int

    def summary(self) -> str:
        g, r = self.grids, self.responders
        return (
            f"demo town (seed {self.seed}) in {self.out_dir}: grids {g[1]}+{g[2]}+{g[3]}, "
            f"{r['grid_worker']} grid workers, {r['department']} department units, "
            f"{r['volunteer']} volunteers, population {self.population:,}, "
            f"{self.categories} categories"
        )


def generate_demo_town(out_dir: Path, seed: int = 7, *, secret: str | None = None) -> DemoTown:
    """Write ``grids.geojson``, ``roster.csv``, ``categories.toml`` and ``dispatch.toml`` into
    ``out_dir`` (created if missing), replacing what is there. The grids and the roster depend
    only on ``seed``. The auth secret is ``secret`` if given, else the one of an existing
    ``dispatch.toml`` in ``out_dir`` (so regenerating does not change it), else a random one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = build_grids(seed)
    roster = build_roster(grids, seed)
    secret = secret or _existing_secret(out_dir / "dispatch.toml") or secrets.token_urlsafe(32)
    paths = {
        n: out_dir / n for n in ("grids.geojson", "roster.csv", "categories.toml", "dispatch.toml")
    }
    paths["grids.geojson"].write_text(grids_geojson(grids), encoding="utf-8")
    roster_csv(roster, paths["roster.csv"])
    paths["categories.toml"].write_text(categories_toml(), encoding="utf-8")
    paths["dispatch.toml"].write_text(dispatch_toml(secret, seed), encoding="utf-8")
    levels = {lv: sum(1 for g in grids if g.level == lv) for lv in (1, 2, 3)}
    kinds = {
        k: sum(1 for r in roster if r.kind == k) for k in ("grid_worker", "department", "volunteer")
    }
    return DemoTown(
        out_dir=out_dir,
        grids_path=paths["grids.geojson"],
        roster_path=paths["roster.csv"],
        categories_path=paths["categories.toml"],
        config_path=paths["dispatch.toml"],
        seed=seed,
        secret=secret,
        grids=levels,
        responders=kinds,
        population=grids[0].population,
        categories=len(CATEGORIES),
    )


def _existing_secret(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            secret = tomllib.load(f).get("auth", {}).get("secret")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return None
    return secret if isinstance(secret, str) and secret else None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dispatch.sim.town OUT_DIR [--seed N] [--categories FILE]``."""
    ap = argparse.ArgumentParser(description="Generate the demo town files.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--categories", type=Path, help="also write the category table here")
    args = ap.parse_args(argv)
    print(generate_demo_town(args.out_dir, args.seed).summary())
    if args.categories:
        args.categories.write_text(categories_toml(), encoding="utf-8")


if __name__ == "__main__":
    main()
