"""The three-level grids of a town: loading, checking, and locating points.

Grids come from a GeoJSON FeatureCollection (RFC 7946, ``[lon, lat]``). Each Feature's
``properties`` carry exactly ``id`` (string), ``level`` (1 town, 2 village/community, 3 basic
grid), ``parent`` (``null`` for level 1, else the id of a grid one level up), ``name`` (string)
and optionally ``population`` (a non-negative integer or ``null``); other keys are kept as
extras. Each geometry is a Polygon or MultiPolygon.

Rules a valid file obeys (each broken one is an *error*):

* the file is JSON, a FeatureCollection, every feature a Feature with the properties above;
* ids are unique; geometries are valid, non-empty polygons in lon/lat degrees;
* a level-1 grid has no parent; every other grid's parent exists and is exactly one level up;
* a child lies inside its parent (up to :data:`CONTAINMENT_TOLERANCE` of the child's area);
* siblings — the children of one parent, and the level-1 grids, each of which is a separate
  town — do not overlap (up to :data:`OVERLAP_TOLERANCE` of the smaller one's area).

Parent area not covered by its children (beyond :data:`COVERAGE_TOLERANCE`) is a *warning*: a
report there is in no level-3 grid and is rejected as ``outside_area``.

:func:`check_grids` reports every problem of a file; :func:`load_grids` raises
:class:`~dispatch.errors.ConfigError` naming the file, the feature (index and id) and what is
wrong, or returns a :class:`GridSet`, which locates points (the engine's ``Locator``).

Areas are compared in square degrees: only ratios of areas of nearby shapes are used, so the
projection does not matter at town scale.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import shapely
from shapely import STRtree
from shapely.geometry import shape

from dispatch.engine.model import (
    Category,
    Grid,
    Level,
    Located,
    ResponderInfo,
    Town,
    ancestors_of,
)
from dispatch.errors import ConfigError

__all__ = [
    "CONTAINMENT_TOLERANCE",
    "COVERAGE_TOLERANCE",
    "OVERLAP_TOLERANCE",
    "GridSet",
    "Problem",
    "check_geojson",
    "check_grids",
    "grids_from_geojson",
    "load_grids",
]

CONTAINMENT_TOLERANCE = 0.001
"""Share of a child's area that may lie outside its parent (digitising slack)."""
OVERLAP_TOLERANCE = 0.001
"""Share of the smaller sibling's area that two siblings may have in common."""
COVERAGE_TOLERANCE = 0.001
"""Share of a parent's area its children may leave uncovered before a warning."""

_KNOWN_PROPS = ("id", "level", "parent", "name", "population")

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a grid file.

    ``feature`` names the feature as ``features[3] (id 'v-02')`` (index into the file's
    ``features`` array, from 0), or is ``""`` for a problem of the file as a whole.
    """

    severity: Severity
    feature: str
    message: str
    index: int | None = None
    grid_id: str | None = None

    def __str__(self) -> str:
        where = f"{self.feature}: " if self.feature else ""
        return f"{self.severity}: {where}{self.message}"


def _label(index: int, gid: str | None) -> str:
    return f"features[{index}] (id {gid!r})" if gid is not None else f"features[{index}]"


@dataclass
class _Parsed:
    """What survived the per-feature checks, for the cross-feature ones and for GridSet."""

    grids: dict[str, Grid] = field(default_factory=dict)
    geoms: dict[str, Any] = field(default_factory=dict)  # only valid geometries
    index: dict[str, int] = field(default_factory=dict)  # grid id -> feature index
    problems: list[Problem] = field(default_factory=list)

    def error(self, gid: str | None, message: str, index: int | None = None) -> None:
        self._add("error", gid, message, index)

    def warning(self, gid: str | None, message: str) -> None:
        self._add("warning", gid, message, None)

    def _add(self, sev: Severity, gid: str | None, message: str, index: int | None) -> None:
        if index is None and gid is not None:
            index = self.index.get(gid)
        feature = _label(index, gid) if index is not None else ""
        self.problems.append(Problem(sev, feature, message, index, gid))


# -- reading and checking ----------------------------------------------------------------------


def _read(path: str | os.PathLike[str]) -> tuple[Any, Problem | None]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return None, Problem("error", "", f"cannot read the file: {e}")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, Problem(
            "error", "", f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        )


def _check_properties(p: _Parsed, i: int, props: Mapping[str, Any]) -> Grid | None:
    raw_id = props.get("id")
    gid = raw_id if isinstance(raw_id, str) and raw_id.strip() else None
    ok = True

    def bad(message: str) -> None:
        nonlocal ok
        ok = False
        p.error(gid, message, i)

    if gid is None:
        if "id" not in props:
            bad("missing property 'id'")
        else:
            bad(f"property 'id' must be a non-empty string, not {raw_id!r}")
    level = props.get("level")
    if "level" not in props:
        bad("missing property 'level'")
    elif isinstance(level, bool) or level not in (1, 2, 3) or not isinstance(level, int):
        bad(f"property 'level' must be 1, 2 or 3, not {level!r}")
    parent = props.get("parent")
    if "parent" not in props:
        bad("missing property 'parent' (use null for a level-1 grid)")
    elif parent is not None and not (isinstance(parent, str) and parent.strip()):
        bad(f"property 'parent' must be a grid id or null, not {parent!r}")
    name = props.get("name")
    if "name" not in props:
        bad("missing property 'name'")
    elif not isinstance(name, str) or not name.strip():
        bad(f"property 'name' must be a non-empty string, not {name!r}")
    population = props.get("population")
    if population is not None and (
        isinstance(population, bool) or not isinstance(population, int) or population < 0
    ):
        bad(f"property 'population' must be a non-negative integer or null, not {population!r}")
    if not ok or gid is None:
        return None
    return Grid(
        id=gid,
        level=cast(Level, level),
        parent=cast("str | None", parent),
        name=cast(str, name),
        population=cast("int | None", population),
    )


def _check_geometry(p: _Parsed, i: int, gid: str | None, geometry: object) -> Any:
    """The shapely geometry of a feature, or ``None`` (after recording why) when unusable."""
    if not isinstance(geometry, dict):
        p.error(gid, "geometry is missing (a Polygon or MultiPolygon is required)", i)
        return None
    gtype = geometry.get("type")
    if gtype not in ("Polygon", "MultiPolygon"):
        p.error(gid, f"geometry must be a Polygon or MultiPolygon, not {gtype!r}", i)
        return None
    try:
        geom = shape(geometry)
    except KeyError as e:
        p.error(gid, f"the {gtype} has no {e}", i)
        return None
    except (ValueError, TypeError, IndexError, shapely.errors.GEOSException) as e:
        p.error(gid, f"malformed {gtype} coordinates: {e}", i)
        return None
    if geom.is_empty:
        p.error(gid, f"the {gtype} is empty", i)
        return None
    minx, miny, maxx, maxy = geom.bounds
    if not (-180.0 <= minx <= maxx <= 180.0 and -90.0 <= miny <= maxy <= 90.0):
        p.error(
            gid,
            f"coordinates out of range (bounds {minx}, {miny}, {maxx}, {maxy}): "
            "positions must be [lon, lat] in degrees",
            i,
        )
        return None
    if not geom.is_valid:
        p.error(gid, f"invalid polygon: {shapely.is_valid_reason(geom)}", i)
        return None
    if geom.area <= 0.0:
        p.error(gid, "the polygon has no area", i)
        return None
    return geom


def _analyse(data: object) -> _Parsed:
    p = _Parsed()
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        got = data.get("type") if isinstance(data, dict) else type(data).__name__
        p.error(None, f"not a GeoJSON FeatureCollection (top-level type is {got!r})")
        return p
    features = data.get("features")
    if not isinstance(features, list):
        p.error(None, "a FeatureCollection needs a 'features' array")
        return p
    if not features:
        p.error(None, "the FeatureCollection has no features")
        return p

    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            p.error(None, "not a GeoJSON Feature", i)
            continue
        props = feat.get("properties")
        if not isinstance(props, dict):
            p.error(None, "the Feature has no 'properties' object", i)
            continue
        grid = _check_properties(p, i, props)
        raw_id = props.get("id")
        gid = raw_id if isinstance(raw_id, str) and raw_id.strip() else None
        duplicate = gid is not None and gid in p.index
        if duplicate:
            p.error(gid, f"duplicate id: {_label(p.index[cast(str, gid)], gid)} has it too", i)
        elif gid is not None:
            p.index[gid] = i
        geom = _check_geometry(p, i, gid, feat.get("geometry"))
        if grid is not None and not duplicate:
            p.grids[grid.id] = grid
            if geom is not None:
                p.geoms[grid.id] = geom

    _check_hierarchy(p)
    _check_geometry_relations(p)
    return p


def _check_hierarchy(p: _Parsed) -> None:
    for g in p.grids.values():
        if g.level == 1:
            if g.parent is not None:
                p.error(g.id, f"a level-1 grid (a town) has no parent, but parent is {g.parent!r}")
            continue
        if g.parent is None:
            p.error(g.id, f"a level-{g.level} grid needs a parent of level {g.level - 1}")
            continue
        parent = p.grids.get(g.parent)
        if parent is None:
            if g.parent in p.index:
                p.error(g.id, f"parent {g.parent!r} is itself invalid (see its own problems)")
            else:
                p.error(g.id, f"parent {g.parent!r} does not exist")
        elif parent.level != g.level - 1:
            p.error(
                g.id,
                f"parent {g.parent!r} is level {parent.level}; "
                f"a level-{g.level} grid's parent must be level {g.level - 1}",
            )


def _children(grids: Mapping[str, Grid]) -> dict[str | None, list[str]]:
    """Parent id (``None`` for the towns) -> child ids, for links that are level-consistent."""
    out: dict[str | None, list[str]] = {}
    for g in grids.values():
        if g.level == 1:
            out.setdefault(None, []).append(g.id)
            continue
        parent = grids.get(g.parent) if g.parent is not None else None
        if parent is not None and parent.level == g.level - 1:
            out.setdefault(parent.id, []).append(g.id)
    return out


def _pct(x: float) -> str:
    return f"{100.0 * x:.3g}%"


def _check_geometry_relations(p: _Parsed) -> None:
    grids, geoms = p.grids, p.geoms
    kids = _children(grids)
    order = {gid: i for i, gid in enumerate(p.index)}

    # A child inside its parent.
    for parent_id, child_ids in kids.items():
        if parent_id is None or parent_id not in geoms:
            continue
        pg = geoms[parent_id]
        for cid in child_ids:
            cg = geoms.get(cid)
            if cg is None:
                continue
            outside = cg.difference(pg).area / cg.area
            if outside > CONTAINMENT_TOLERANCE:
                p.error(
                    cid,
                    f"not inside its parent {parent_id!r}: {_pct(outside)} of its area lies "
                    f"outside (tolerance {_pct(CONTAINMENT_TOLERANCE)})",
                )

    # Siblings (and towns) do not overlap.
    for parent_id, child_ids in kids.items():
        ids = sorted((c for c in child_ids if c in geoms), key=order.__getitem__)
        if len(ids) < 2:
            continue
        gs = [geoms[c] for c in ids]
        tree = STRtree(gs)
        pairs = tree.query(gs, predicate="intersects")
        for a, b in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
            if a >= b:
                continue
            shared = gs[a].intersection(gs[b]).area
            smaller = min(gs[a].area, gs[b].area)
            if shared > OVERLAP_TOLERANCE * smaller:
                what = "town" if parent_id is None else "sibling"
                p.error(
                    ids[b],
                    f"overlaps {what} {ids[a]!r} ({_label(p.index[ids[a]], ids[a])}) by "
                    f"{_pct(shared / smaller)} of the smaller one's area "
                    f"(tolerance {_pct(OVERLAP_TOLERANCE)})",
                )

    # Coverage: warnings only.
    for gid, g in grids.items():
        if g.level == 3 or gid not in geoms:
            continue
        child_ids = kids.get(gid, [])
        if not child_ids:
            p.warning(
                gid,
                f"has no level-{g.level + 1} grids: reports inside it cannot be located",
            )
            continue
        child_geoms = [geoms[c] for c in child_ids if c in geoms]
        pg = geoms[gid]
        covered = shapely.union_all(child_geoms) if child_geoms else None
        gap = (pg.difference(covered).area if covered is not None else pg.area) / pg.area
        if gap > COVERAGE_TOLERANCE:
            p.warning(
                gid,
                f"{_pct(gap)} of its area is covered by none of its level-{g.level + 1} grids: "
                "reports there cannot be located",
            )


def check_geojson(data: object) -> list[Problem]:
    """Every problem of a parsed grid FeatureCollection, errors and warnings, in file order."""
    return _sorted(_analyse(data).problems)


def check_grids(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem of the grid file at ``path`` (empty when it is clean).

    Does not stop at the first problem; problems of the file as a whole (unreadable, not JSON,
    not a FeatureCollection) end the check since nothing else can be said.
    """
    data, problem = _read(path)
    if problem is not None:
        return [problem]
    return check_geojson(data)


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(
        problems,
        key=lambda q: (q.index is not None, q.index if q.index is not None else -1),
    )


def grids_from_geojson(data: object, source: str = "<geojson>") -> GridSet:
    """A :class:`GridSet` from a parsed FeatureCollection; ``ConfigError`` names ``source``."""
    p = _analyse(data)
    problems = _sorted(p.problems)
    errors = [q for q in problems if q.severity == "error"]
    if errors:
        first = errors[0]
        where = f"{first.feature}: " if first.feature else ""
        more = (
            f" (and {len(errors) - 1} more error(s); `dispatch grids check` lists them all)"
            if len(errors) > 1
            else ""
        )
        raise ConfigError(f"{source}: {where}{first.message}{more}")
    assert isinstance(data, dict)
    return GridSet(
        p.grids,
        p.geoms,
        data,
        source=source,
        warnings=[q for q in problems if q.severity == "warning"],
    )


def load_grids(path: str | os.PathLike[str]) -> GridSet:
    """Load and check the grid file at ``path``; raise ``ConfigError`` on the first error.

    The message reads ``<path>: features[<index>] (id '<id>'): <what is wrong>``.
    Warnings (coverage gaps) do not stop loading; they are in :attr:`GridSet.warnings`.
    """
    data, problem = _read(path)
    if problem is not None:
        raise ConfigError(f"{os.fspath(path)}: {problem.message}")
    return grids_from_geojson(data, source=os.fspath(path))


# -- the loaded grids --------------------------------------------------------------------------


class _Raster:
    """A lookup table over the level-3 grids' bounding box, so that locating a point costs a
    cell lookup (and, near boundaries, a point-in-polygon test per candidate) instead of an
    STRtree query with its array round trips: it is on the path of every report.

    Each cell holds either the index of the one grid that contains it entirely (no test
    needed), or the sorted indices of the grids that touch it (tested in id order, so a point on
    a shared boundary goes to the smallest id, as the STRtree answer did).
    """

    __slots__ = ("cells", "nx", "ny", "x0", "xs", "y0", "ys")

    def __init__(self, x0: float, y0: float, xs: float, ys: float, nx: int, ny: int,
                 cells: list[int | tuple[int, ...]]) -> None:
        self.x0, self.y0, self.xs, self.ys, self.nx, self.ny = x0, y0, xs, ys, nx, ny
        self.cells = cells

    @classmethod
    def build(cls, geoms: Sequence[Any], tree: STRtree, n: int = 128) -> _Raster:
        x0, y0, x1, y1 = shapely.total_bounds(np.asarray(geoms, dtype=object)).tolist()
        xs = max((x1 - x0) / n, 1e-9)
        ys = max((y1 - y0) / n, 1e-9)
        ix, iy = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        boxes = shapely.box(x0 + ix.ravel() * xs, y0 + iy.ravel() * ys,
                            x0 + (ix.ravel() + 1) * xs, y0 + (iy.ravel() + 1) * ys)
        src, hit = tree.query(boxes, predicate="intersects")
        touching: list[list[int]] = [[] for _ in range(n * n)]
        for b, g in zip(src.tolist(), hit.tolist(), strict=True):
            touching[b].append(g)
        cells: list[int | tuple[int, ...]] = []
        garr = np.asarray(geoms, dtype=object)
        for b, found in enumerate(touching):
            found.sort()
            if len(found) == 1 and shapely.contains_properly(garr[found[0]], boxes[b]):
                cells.append(found[0])
            else:
                cells.append(tuple(found))
        return cls(x0, y0, xs, ys, n, n, cells)

    def find(self, lon: float, lat: float, geoms: Sequence[Any]) -> int | None:
        i = int((lon - self.x0) / self.xs)
        j = int((lat - self.y0) / self.ys)
        if i == self.nx:
            i -= 1  # the far edge of the box belongs to the last cell
        if j == self.ny:
            j -= 1
        if not (0 <= i < self.nx and 0 <= j < self.ny):
            return None
        cell = self.cells[i * self.ny + j]
        if isinstance(cell, int):
            return cell
        for g in cell:
            if shapely.intersects_xy(geoms[g], lon, lat):
                return g
        return None


class GridSet:
    """Checked grids of one or more towns, and the point locator over them.

    Attributes: ``grids`` (id -> :class:`~dispatch.engine.model.Grid`), ``geoms`` (id -> shapely
    geometry), ``towns`` (the level-1 ids, sorted), ``children`` (id -> sorted child ids, every
    grid present, leaves with ``()``), ``feature_collection`` (the file as parsed, for
    ``GET /api/grids``), ``source`` and ``warnings``.
    """

    def __init__(
        self,
        grids: Mapping[str, Grid],
        geoms: Mapping[str, Any],
        feature_collection: dict[str, Any],
        *,
        source: str = "<geojson>",
        warnings: Sequence[Problem] = (),
    ) -> None:
        self.grids: dict[str, Grid] = dict(grids)
        self.geoms: dict[str, Any] = dict(geoms)
        self.feature_collection = feature_collection
        self.source = source
        self.warnings: list[Problem] = list(warnings)
        kids: dict[str, list[str]] = {gid: [] for gid in self.grids}
        for g in self.grids.values():
            if g.parent is not None:
                kids[g.parent].append(g.id)
        self.children: dict[str, tuple[str, ...]] = {k: tuple(sorted(v)) for k, v in kids.items()}
        self.towns: tuple[str, ...] = tuple(
            sorted(g.id for g in self.grids.values() if g.level == 1)
        )
        self._town_of: dict[str, str] = {}
        for t in self.towns:
            for gid in self.subtree(t):
                self._town_of[gid] = t
        # Sorted by id so that, among grids sharing a boundary point, the first hit is the smallest.
        self._l3: list[str] = sorted(g.id for g in self.grids.values() if g.level == 3)
        self._l3_located: list[Located] = [self._located(g) for g in self._l3]
        geoms3 = [self.geoms[g] for g in self._l3]
        shapely.prepare(geoms3)
        self._geoms3 = geoms3
        self._tree = STRtree(geoms3)
        self._raster = _Raster.build(geoms3, self._tree) if geoms3 else None

    def _located(self, g3: str) -> Located:
        g2 = self.grids[g3].parent
        assert g2 is not None
        g1 = self.grids[g2].parent
        assert g1 is not None
        return Located(g3, g2, g1)

    # -- Locator ---------------------------------------------------------------------------------

    def locate(self, lon: float, lat: float) -> Located | None:
        """The level-3 grid containing the point (boundary included) and its ancestors.

        A point on a boundary shared by several level-3 grids goes to the smallest id. A point in
        no level-3 grid gives ``None`` (even inside a level-2 grid with a coverage gap).
        """
        if not (math.isfinite(lon) and math.isfinite(lat)) or self._raster is None:
            return None
        hit = self._raster.find(lon, lat, self._geoms3)
        return None if hit is None else self._l3_located[hit]

    def locate_many(
        self,
        lons: Sequence[float] | np.ndarray[Any, Any],
        lats: Sequence[float] | np.ndarray[Any, Any],
    ) -> list[Located | None]:
        """:meth:`locate` for many points at once (vectorised; same answers)."""
        xs = np.asarray(lons, dtype=float)
        ys = np.asarray(lats, dtype=float)
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValueError("lons and lats must be 1-d and of equal length")
        out: list[Located | None] = [None] * len(xs)
        ok = np.isfinite(xs) & np.isfinite(ys)
        if not ok.any():
            return out
        where = np.flatnonzero(ok)
        pts = shapely.points(xs[where], ys[where])
        src, hit = self._tree.query(pts, predicate="intersects")
        best = np.full(len(where), len(self._l3), dtype=np.int64)
        np.minimum.at(best, src, hit)
        for n, b in zip(where.tolist(), best.tolist(), strict=True):
            if b < len(self._l3):
                out[n] = self._l3_located[b]
        return out

    # -- hierarchy helpers -----------------------------------------------------------------------

    def town_of(self, grid_id: str) -> str:
        """The level-1 grid above (or equal to) ``grid_id``. ``KeyError`` when unknown."""
        return self._town_of[grid_id]

    def ancestors(self, grid_id: str) -> list[str]:
        """``grid_id`` and every grid above it, nearest first (a home grid's responder pools)."""
        return ancestors_of(self.grids, grid_id)

    def subtree(self, grid_id: str) -> list[str]:
        """``grid_id`` and every grid below it, parents before children."""
        out = [grid_id]
        i = 0
        while i < len(out):
            out.extend(self.children[out[i]])
            i += 1
        return out

    def to_town(
        self,
        town_id: str,
        categories: Mapping[str, Category],
        roster: Mapping[str, ResponderInfo],
    ) -> Town:
        """The engine's static :class:`~dispatch.engine.model.Town` for one level-1 grid.

        ``grids`` and ``children`` cover that town's subtree only; ``roster`` is filtered to the
        responders whose home grid is in the town.
        """
        if town_id not in self.towns:
            raise KeyError(f"{town_id!r} is not a level-1 grid of {self.source}")
        ids = self.subtree(town_id)
        members = set(ids)
        return Town(
            id=town_id,
            grids={gid: self.grids[gid] for gid in ids},
            categories=dict(categories),
            roster={rid: r for rid, r in roster.items() if r.home_grid in members},
            children={gid: self.children[gid] for gid in ids},
        )

    def __len__(self) -> int:
        return len(self.grids)

    def __repr__(self) -> str:
        return f"<GridSet {self.source}: {len(self.towns)} town(s), {len(self.grids)} grids>"
