"""The responder index: where every responder is, and who is the nearest eligible one.

:class:`CellIndex` implements :class:`dispatch.engine.model.ResponderIndex`. It answers
``nearest(pool, lon, lat, skill=…, fresh_since=…, exclude=…, k=…)`` with the *exact* ``k``
nearest responders by great-circle distance (:func:`~dispatch.geo.distance.haversine_m`, called
as ``haversine_m(query lon, query lat, responder lon, responder lat)``), ties to the smaller
responder id, among those that are registered in the pool, available, have the skill (``"*"``
matches every category), are not excluded, and whose last position is at or after
``fresh_since``. Responders without a position are never returned.

How it stays fast (no numpy on the hot path):

* **One bucket map per (pool, skill group).** A responder whose skills contain ``"*"`` lives in
  the ``(pool, "*")`` map of each of its pools; any other responder lives in one map per skill per
  pool. A query searches ``(pool, "*")`` and ``(pool, skill)``, which are disjoint, so a rare
  skill never forces a search through a crowd that cannot take the case. Only responders that are
  available *and* have a position are in the maps.
* **Cells are lat/lon squares of 2**-level degrees.** Each map picks its own level from the spread
  and number of its members (about 0.4 other members in a member's cell, so finer where members
  crowd) from a sample of its cells, and re-picks it when its size doubles or quarters or after
  many members changed cells; only a changed level rebuilds the map (O(members)). Because cell
  edges are powers of two, a responder's cell at a coarser level is its finest cell shifted
  right, and ``lat * 2**level`` is exact, so every cell test is exact arithmetic.
* **Rank by chord, report by haversine.** Candidates are compared by squared chord length between
  unit vectors (no trigonometry per candidate); the chord is a strictly increasing function of the
  great-circle distance, so it orders points the same way. Every candidate within the ``k``-th best
  chord plus a 6 µm margin is kept, and the final order and distances come from ``haversine_m``,
  so ties and near-ties are decided exactly as a brute-force haversine search decides them.
* **Expanding rings with a true lower bound** (the common case: a few cells around the query).
  After rings ``0..r`` around the query cell are scanned, every unscanned point is outside a
  latitude band or outside a longitude band. Its chord is at least ``2·sin(Δφ/2)`` (meridian
  distance to the band) or ``cos(φq)·sin(Δλ)`` (distance to the meridian plane through the band
  edge; ``Δλ`` is clamped to 90° and to the distance to the antimeridian, so wrap-around is
  safe). The rings stop once that bound exceeds the ``k``-th best or they cover every cell the map
  has used since its last rebuild.
* **Best-first down an occupancy tree** (far queries: sparse or clustered members). Each map also
  counts its non-empty cells in a sparse quadtree of 4 x 4 blocks, five levels up. When the rings
  have gone a few steps and the rest would cost more lookups than it is worth, the search pops
  tree cells in order of a lower bound (the chord from the query to the cell's 3-D bounding box)
  until the next bound exceeds the ``k``-th best. A small map is instead scanned outright when
  that is cheaper than the next ring. Every path ends, and none is worse than a scan of the pool.

Moves are O(1): a move that stays in the responder's finest cell only updates its coordinates.

**Compiled search.** What the Python search costs at 100,000 members is mostly memory latency:
a dict, a record and three floats per member, scattered over the heap. When
``dispatch/geo/_speedups.c`` is built, the index also keeps a packed copy — a ``Store`` of
points (40 bytes a member, one array) and per map a ``Cells`` table (cell key -> list of
slots, rows of cells adjacent) — updated wherever the dicts are, and runs the same rings, scan
fallback and haversine ranking over it in C; a query that would need the tree search is handed
back to the Python search, which stays the reference. It is optional, as websockets' speedups
are: :data:`SPEEDUPS` says whether it was built; ``CellIndex(speedups=False)`` forces the
pure-Python path (the property tests run both).
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Container, Iterable, Iterator
from heapq import heapify, heappop, heappush
from itertools import islice
from math import asin, cos, floor, inf, log, log2, pi, radians, sin, sqrt
from typing import TYPE_CHECKING

from dispatch.geo.distance import EARTH_RADIUS_M, haversine_m

if TYPE_CHECKING:
    from dispatch.geo._speedups import Cells, Store

try:
    from dispatch.geo import _speedups
except ImportError:  # built without a C compiler: the pure-Python search runs
    _speedups = None  # type: ignore[assignment]

SPEEDUPS = _speedups is not None
"""Whether the compiled search (``dispatch/geo/_speedups.c``) is built; ``CellIndex`` uses it
unless told ``speedups=False``."""

__all__ = ["SPEEDUPS", "CellIndex"]

LEVEL_MIN = -3
"""Coarsest cell: 8 degrees."""
LEVEL_MAX = 16
"""Finest cell: 2**-16 degrees, about 1.7 m of latitude."""
DEFAULT_LEVEL = 10
"""Level of a map before it knows its members: about 108 m of latitude."""

_DELTA = 1e-12
"""Chord margin (unit sphere; about 6.4 µm) covering float error between chord and haversine."""
_EPS = 1e-14
"""Slack taken off every lower bound (ring or tree cell) for rounding."""
_RING_CACHE = 48
"""Rings whose key offsets are cached per level; larger rings are generated on the fly."""
_HALF_PI = pi / 2
_SAMPLE = 1024
"""Cells a map samples to re-pick its level."""
_TREE_DEPTH = 5
"""Levels of the occupancy tree above a map's cells (each 4 x 4 of the one below)."""


class _Resp:
    """One responder's live record, shared by every map it is in."""

    __slots__ = (
        "active",
        "available",
        "ci",
        "cj",
        "has_pos",
        "keys",
        "lat",
        "lmax",
        "lon",
        "maps",
        "nodes",
        "pools",
        "rid",
        "scale",
        "skills",
        "slot",
        "ts",
        "x",
        "y",
        "z",
    )

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.pools: tuple[str, ...] = ()
        self.skills: frozenset[str] = frozenset()
        self.maps: tuple[_Map, ...] = ()
        self.keys: list[int] = []
        self.nodes: list[int] = []
        """Per map, this record's node in the map's compiled cells (when built)."""
        self.slot = -1
        """This record's slot in the compiled store while it is active (when built)."""
        self.available = False
        self.has_pos = False
        self.active = False
        self.lon = 0.0
        self.lat = 0.0
        self.ts = 0.0
        self.x = 0.0
        self.y = 0.0
        self.z = 0.0
        self.lmax = DEFAULT_LEVEL
        self.scale = 2.0**DEFAULT_LEVEL
        self.ci = 0
        self.cj = 0


class _Map:
    """The cells of one (pool, skill group): ``cells[key][rid] = record``.

    ``tree[p - 1]`` (p = 1 … :data:`_TREE_DEPTH`) counts, for each cell of level ``level - 2p``,
    how many of its 4 x 4 sub-cells one level of the tree down are non-empty — a sparse quadtree
    (step 2) over the non-empty cells, kept only for the best-first search of far queries.
    """

    __slots__ = (
        "cellrad",
        "cells",
        "changes",
        "fast",
        "half",
        "imax",
        "imin",
        "jmax",
        "jmin",
        "level",
        "n",
        "n_built",
        "scale",
        "shift",
        "store",
        "tree",
    )

    def __init__(self, level: int = DEFAULT_LEVEL, store: Store | None = None) -> None:
        self.cells: dict[int, dict[str, _Resp]] = {}
        self.tree: list[dict[int, int]] = []
        self.n = 0
        self.n_built = 0
        self.changes = 0
        self.level = level
        self.shift = 0
        self.half = 0
        self.scale = 1.0
        self.cellrad = 0.0
        self.store = store
        self.fast: Cells | None = None
        self.set_level(level)

    def set_level(self, level: int) -> None:
        """Switch to ``level``, emptying the map (the caller re-adds the members)."""
        self.level = level
        # |lon * 2**level| < 2**(level + 8), so keys (i << shift) + j are unique and decodable.
        self.shift = level + 10
        self.half = 1 << (self.shift - 1)
        self.scale = 2.0**level
        self.cellrad = radians(2.0**-level)
        self.cells = {}
        # Tree cells of at most 16 degrees (level -4), as _cell_lb requires.
        self.tree = [{} for _ in range(max(0, min(_TREE_DEPTH, (level + 4) // 2)))]
        self.reset_bbox()
        if self.store is not None:
            self.fast = _speedups.Cells(
                self.store, self.shift, self.scale, self.cellrad, bool(self.tree)
            )

    def reset_bbox(self) -> None:
        self.imin = self.jmin = 1 << 62
        self.imax = self.jmax = -(1 << 62)

    def key_of(self, r: _Resp) -> int:
        d = r.lmax - self.level
        return ((r.ci >> d) << self.shift) + (r.cj >> d)

    def add(self, r: _Resp, n: int) -> None:
        """Put ``r`` in its cell ``r.keys[n]`` (this map is ``r.maps[n]``)."""
        key = r.keys[n]
        b = self.cells.get(key)
        if b is None:
            self.new_cell(key, r)
        else:
            b[r.rid] = r
        if self.fast is not None:
            r.nodes[n] = self.fast.add(key, r.slot)

    def discard(self, r: _Resp, n: int) -> None:
        key = r.keys[n]
        b = self.cells[key]
        del b[r.rid]
        if not b:
            self.drop_cell(key)
        if self.fast is not None:
            self.fast.remove(r.nodes[n])

    def new_cell(self, key: int, r: _Resp) -> None:
        """Create cell ``key`` holding ``r``: widen the bounding box, count it up the tree."""
        self.cells[key] = {r.rid: r}
        shift = self.shift
        i = (key + self.half) >> shift
        j = key - (i << shift)
        if i < self.imin:
            self.imin = i
        if i > self.imax:
            self.imax = i
        if j < self.jmin:
            self.jmin = j
        if j > self.jmax:
            self.jmax = j
        for level in self.tree:  # one more non-empty sub-cell, up to the first known parent
            i >>= 2
            j >>= 2
            shift -= 2
            pk = (i << shift) + j
            c = level.get(pk, 0)
            level[pk] = c + 1
            if c:
                break

    def drop_cell(self, key: int) -> None:
        """Remove the (now empty) cell ``key`` and count it down the tree."""
        del self.cells[key]
        shift = self.shift
        i = (key + self.half) >> shift
        j = key - (i << shift)
        for level in self.tree:
            i >>= 2
            j >>= 2
            shift -= 2
            pk = (i << shift) + j
            c = level[pk] - 1
            if c:
                level[pk] = c
                break
            del level[pk]

    def members(self) -> list[_Resp]:
        return [r for b in self.cells.values() for r in b.values()]


def _tree_buckets(
    m: _Map, qx: float, qy: float, qz: float, qi: int, qj: int, done: int, box: list[float]
) -> Iterator[dict[str, _Resp]]:
    """The non-empty cells of ``m`` nearest-bound first, skipping those within Chebyshev
    distance ``done`` of the query cell ``(qi, qj)`` (already scanned), and stopping once the
    next bound exceeds the threshold ``box[0]`` (which the consumer lowers as it goes)."""
    tree = m.tree
    depth = len(tree)
    top_shift = m.shift - 2 * depth
    top_half = 1 << (top_shift - 1)
    top_size = 2.0 ** (2 * depth - m.level)
    heap: list[tuple[float, int, int, int]] = []
    for key in tree[-1]:
        i = (key + top_half) >> top_shift
        j = key - (i << top_shift)
        heap.append((_cell_lb(qx, qy, qz, i, j, top_size), depth, i, j))
    heapify(heap)
    cells = m.cells
    while heap:
        lb, p, i, j = heappop(heap)
        thr = box[0]
        if lb > 0.0 and lb * lb > thr:
            return
        if p == 0:
            yield cells[(i << m.shift) + j]
            continue
        cp = p - 1
        below: Container[int] = cells if cp == 0 else tree[cp - 1]
        cshift = m.shift - 2 * cp
        csize = 2.0 ** (2 * cp - m.level)
        for ii in range(i << 2, (i << 2) + 4):
            row = ii << cshift
            for jj in range(j << 2, (j << 2) + 4):
                if row + jj not in below:
                    continue
                if cp == 0 and abs(ii - qi) < done and abs(jj - qj) < done:
                    continue
                clb = _cell_lb(qx, qy, qz, ii, jj, csize)
                if clb <= 0.0 or clb * clb <= thr:
                    heappush(heap, (clb, cp, ii, jj))


def _cell_lb(qx: float, qy: float, qz: float, i: int, j: int, size: float) -> float:
    """A lower bound on the chord from unit vector ``q`` to any point of cell ``(i, j)`` of side
    ``size`` degrees (at most 16): the distance from ``q`` to the cell's axis-aligned 3-D
    bounding box, which contains every point of the cell. Loose by at most about a cell side."""
    pa = radians(i * size)
    pb = pa + radians(size)
    if pa < -_HALF_PI:
        pa = -_HALF_PI
    if pb > _HALF_PI:
        pb = _HALF_PI
    za = sin(pa)
    zb = sin(pb)
    ca = cos(pa)
    cb = cos(pb)
    # cos(lat) peaks at the equator, which is always a cell edge (cell edges are multiples of
    # powers of two), so its range over the cell is spanned by the edge values.
    fmin = ca if ca < cb else cb
    fmax = ca if ca > cb else cb
    la = radians(j * size)
    lb = la + radians(size)
    c1 = cos(la)
    c2 = cos(lb)
    s1 = sin(la)
    s2 = sin(lb)
    gmin, gmax = (c1, c2) if c1 < c2 else (c2, c1)
    hmin, hmax = (s1, s2) if s1 < s2 else (s2, s1)
    # cos and sin reach +-1 inside [la, lb] when it holds a multiple of pi/2 (|la|, |lb| < 4 pi)
    for turn in (-2.0 * pi, 0.0, 2.0 * pi):
        if la <= turn <= lb:
            gmax = 1.0
        if la <= turn + pi <= lb:
            gmin = -1.0
        if la <= turn + _HALF_PI <= lb:
            hmax = 1.0
        if la <= turn - _HALF_PI <= lb:
            hmin = -1.0
    xlo = fmin * gmin if fmin * gmin < fmax * gmin else fmax * gmin
    xhi = fmax * gmax if fmax * gmax > fmin * gmax else fmin * gmax
    ylo = fmin * hmin if fmin * hmin < fmax * hmin else fmax * hmin
    yhi = fmax * hmax if fmax * hmax > fmin * hmax else fmin * hmax
    dx = xlo - qx if qx < xlo else (qx - xhi if qx > xhi else 0.0)
    dy = ylo - qy if qy < ylo else (qy - yhi if qy > yhi else 0.0)
    dz = za - qz if qz < za else (qz - zb if qz > zb else 0.0)
    return sqrt(dx * dx + dy * dy + dz * dz) - _EPS


def _rings_cost(thr: float, r: int, m: _Map, cq: float, lon_room: float) -> float:
    """About how many cell lookups the rings from ``r`` would take before their lower bound
    passes the threshold — infinite when it never can (near a pole or the antimeridian, the
    longitude part of the bound stays below the threshold however far the rings go)."""
    c = sqrt(thr)
    if cq * sin(lon_room) <= c:
        return inf
    rings = asin(c / cq) / m.cellrad + 1.0
    if rings < r:
        return inf  # the bound should have passed by now: never trust the rings further
    return 4.0 * (rings * rings - r * r)


_ring_cache: dict[tuple[int, int], tuple[int, ...]] = {}


def _ring(shift: int, r: int) -> tuple[int, ...]:
    """Key offsets of the cells at Chebyshev distance ``r`` from a cell, for key width ``shift``."""
    if r == 0:
        return (0,)
    got = _ring_cache.get((shift, r))
    if got is not None:
        return got
    w = 1 << shift
    offs = [-r * w + dj for dj in range(-r, r + 1)]
    offs += [r * w + dj for dj in range(-r, r + 1)]
    for di in range(-r + 1, r):
        offs.append(di * w - r)
        offs.append(di * w + r)
    out = tuple(offs)
    if r <= _RING_CACHE:
        _ring_cache[(shift, r)] = out
    return out


def _bbox_level(dlat: float, dlon: float, n: int, target: float) -> int:
    """The level at which ``n`` points spread over ``dlat`` x ``dlon`` degrees average about
    ``target`` per cell."""
    side = sqrt(target * max(dlat, 1e-4) * max(dlon, 1e-4) / n)
    return max(LEVEL_MIN, min(LEVEL_MAX, round(-log2(side))))


def _choose_level(m: _Map, target: float) -> int:
    """The level at which ``m``'s members would share a cell with about ``target`` others.

    Looks at up to :data:`_SAMPLE` of the map's cells (O(1) in the pool size): the member-weighted
    mean cell count ``w`` is ``1 + λ`` for locally Poisson members with ``λ`` per cell, and each
    level down divides ``λ`` by 4, so crowds (clusters) get finer cells where the members are.
    When every sampled member is alone, the bounding box of the sample sets a coarser level.
    Rounding in log-4 makes a level stick until ``λ`` is off by a factor of 2.
    """
    cells = m.cells
    if m.n < 2 or not cells:
        return m.level
    step = max(1, len(cells) // _SAMPLE)
    total = squares = 0
    lat0 = lon0 = inf
    lat1 = lon1 = -inf
    for b in islice(cells.values(), 0, None, step):
        c = len(b)
        total += c
        squares += c * c
        for r in b.values():
            lat0 = min(lat0, r.lat)
            lat1 = max(lat1, r.lat)
            lon0 = min(lon0, r.lon)
            lon1 = max(lon1, r.lon)
            break
    lam = squares / total - 1.0
    if lam * 8.0 < target:
        level = min(m.level - 1, _bbox_level(lat1 - lat0, lon1 - lon0, m.n, target))
    else:
        level = m.level + round(log(lam / target, 4))
    return max(LEVEL_MIN, min(LEVEL_MAX, level))


class CellIndex:
    """Exact nearest-eligible-responder index (see the module docstring for how).

    Tuning (the defaults are measured best; the rest exist so tests can force every path):
    ``target_per_cell`` — members a map aims to hold per cell (about 0.4 is best for ``k = 1``);
    ``fixed_level`` — pin every map to one level, never rebuild; ``ring_limit`` — rings walked
    before the tree search may take over; ``tree_budget`` — cell lookups the remaining rings may
    cost before it does; ``scan_fallback`` — scan a small map outright when that is cheaper.
    Not thread-safe: the one task that owns a town owns its index.
    """

    def __init__(
        self,
        *,
        target_per_cell: float = 0.4,
        fixed_level: int | None = None,
        ring_limit: int = 3,
        tree_budget: float = 300.0,
        scan_fallback: bool = True,
        speedups: bool = True,
    ) -> None:
        if fixed_level is not None and not LEVEL_MIN <= fixed_level <= LEVEL_MAX:
            raise ValueError(f"fixed_level must be in {LEVEL_MIN}..{LEVEL_MAX}")
        self._target = target_per_cell
        self._fixed = fixed_level
        self._ring_limit = ring_limit
        self._tree_budget = tree_budget
        self._scan_fallback = scan_fallback
        self._store = _speedups.Store() if speedups and SPEEDUPS else None
        self._resp: dict[str, _Resp] = {}
        self._maps: dict[tuple[str, str], _Map] = {}
        self.rebuilds = 0
        """How many times a map re-picked its level (for tests and metrics)."""

    # -- the ResponderIndex protocol -------------------------------------------------------------

    def register(self, rid: str, pools: Iterable[str], skills: frozenset[str]) -> None:
        """Make ``rid`` a member of ``pools`` with ``skills``; registering again replaces both.

        Availability and position are kept across re-registration.
        """
        r = self._get(rid)
        if r.active:
            self._deactivate(r)
        r.pools = tuple(dict.fromkeys(pools))
        r.skills = frozenset(skills)
        groups = ("*",) if "*" in r.skills else tuple(sorted(r.skills))
        maps: list[_Map] = []
        for pool in r.pools:
            for g in groups:
                m = self._maps.get((pool, g))
                if m is None:
                    m = self._maps[(pool, g)] = _Map(
                        DEFAULT_LEVEL if self._fixed is None else self._fixed, self._store
                    )
                maps.append(m)
        r.maps = tuple(maps)
        r.keys = [0] * len(maps)
        r.nodes = [0] * len(maps)
        self._refresh(r)

    def set_available(self, rid: str, available: bool) -> None:
        r = self._get(rid)
        r.available = available
        self._refresh(r)

    def move(self, rid: str, lon: float, lat: float, ts: float) -> None:
        """Record a position (degrees) at ``ts``. Raises ``ValueError`` for impossible coordinates.

        An unknown ``rid`` is remembered (with no pools) so ``position`` works before ``register``.
        """
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            raise ValueError(f"position out of range: lon={lon!r} lat={lat!r}")
        r = self._resp.get(rid)
        if r is None:
            r = self._get(rid)
        p = radians(lat)
        q = radians(lon)
        c = cos(p)
        r.x = c * cos(q)
        r.y = c * sin(q)
        r.z = sin(p)
        r.lon = lon
        r.lat = lat
        r.ts = ts
        if not r.active:
            if not r.has_pos:
                r.has_pos = True
                self._refresh(r)
            return
        if r.slot >= 0:
            self._store.update(r.slot)  # type: ignore[union-attr]
        s = r.scale
        ci = floor(lat * s)
        cj = floor(lon * s)
        if ci == r.ci and cj == r.cj:
            return
        r.ci = ci
        r.cj = cj
        keys = r.keys
        lmax = r.lmax
        rid = r.rid
        due: list[_Map] | None = None
        for n, m in enumerate(r.maps):
            d = lmax - m.level
            key = ((ci >> d) << m.shift) + (cj >> d)
            old = keys[n]
            if key != old:
                cells = m.cells
                ob = cells[old]
                del ob[rid]
                if not ob:
                    m.drop_cell(old)
                nb = cells.get(key)
                if nb is None:
                    m.new_cell(key, r)
                else:
                    nb[rid] = r
                keys[n] = key
                if m.fast is not None:
                    m.fast.relink(r.nodes[n], key)
                m.changes += 1
                if m.changes > 4 * m.n + 64:
                    due = [m] if due is None else [*due, m]
        if due is not None:
            for m in due:
                self._maintain(m)

    def position(self, rid: str) -> tuple[float, float, float] | None:
        """``(lon, lat, ts)`` of the last position, or ``None``."""
        r = self._resp.get(rid)
        if r is None or not r.has_pos:
            return None
        return (r.lon, r.lat, r.ts)

    def nearest(
        self,
        pool: str,
        lon: float,
        lat: float,
        *,
        skill: str,
        fresh_since: float,
        exclude: Container[str] = (),
        k: int = 1,
    ) -> list[tuple[str, float]]:
        """Up to ``k`` ``(responder id, metres)`` pairs, nearest first (ties: smaller id).

        Raises ``ValueError`` for impossible coordinates, as :meth:`move` does."""
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            raise ValueError(f"query point out of range: lon={lon!r} lat={lat!r}")
        if k <= 0:
            return []
        maps = self._maps
        m1 = maps.get((pool, "*"))
        m2 = maps.get((pool, skill)) if skill != "*" else None
        if m1 is not None and not m1.n:
            m1 = None
        if m2 is not None and not m2.n:
            m2 = None
        if m1 is None and m2 is None:
            return []
        if self._store is not None:
            got = _speedups.nearest(
                None if m1 is None else m1.fast, None if m2 is None else m2.fast,
                lon, lat, fresh_since, exclude, k,
                self._ring_limit, self._tree_budget, self._scan_fallback,
            )  # fmt: skip
            if got is not None:
                return got
        p = radians(lat)
        q = radians(lon)
        cq = cos(p)
        qx = cq * cos(q)
        qy = cq * sin(q)
        qz = sin(p)
        # Angular room to the antimeridian caps the longitude lower bound (see module docstring).
        lon_room = radians(min(180.0 - lon, 180.0 + lon))
        if lon_room > _HALF_PI:
            lon_room = _HALF_PI
        cands: list[tuple[float, _Resp]] = []
        best: list[float] = []
        thr = inf
        for m in (m1, m2):
            if m is not None:
                thr = self._search(
                    m, lon, lat, qx, qy, qz, cq, lon_room, fresh_since, exclude, k, cands, best, thr
                )
        if not cands:
            return []
        out = sorted((haversine_m(lon, lat, r.lon, r.lat), r.rid) for d2, r in cands if d2 <= thr)
        return [(rid, d) for d, rid in out[:k]]

    # -- extras ----------------------------------------------------------------------------------

    def all_positions(self) -> Iterator[tuple[str, float, float, float]]:
        """``(rid, lon, lat, ts)`` of every responder with a position (for screens)."""
        for r in self._resp.values():
            if r.has_pos:
                yield (r.rid, r.lon, r.lat, r.ts)

    def remove(self, rid: str) -> None:
        """Forget ``rid`` entirely (no-op when unknown)."""
        r = self._resp.pop(rid, None)
        if r is not None and r.active:
            self._deactivate(r)

    def is_available(self, rid: str) -> bool:
        r = self._resp.get(rid)
        return r is not None and r.available

    def __len__(self) -> int:
        return len(self._resp)

    def __contains__(self, rid: object) -> bool:
        return rid in self._resp

    def pool_levels(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """``(pool, skill group) -> (level, members, cells)``, for diagnostics and benchmarks."""
        return {key: (m.level, m.n, len(m.cells)) for key, m in self._maps.items()}

    # -- internals -------------------------------------------------------------------------------

    def _get(self, rid: str) -> _Resp:
        r = self._resp.get(rid)
        if r is None:
            r = self._resp[rid] = _Resp(rid)
        return r

    def _refresh(self, r: _Resp) -> None:
        """Bring ``r``'s map membership in line with its availability and position."""
        want = r.available and r.has_pos and bool(r.maps)
        if want and not r.active:
            self._activate(r)
        elif r.active and not want:
            self._deactivate(r)

    def _place(self, r: _Resp) -> None:
        """Recompute ``r``'s finest cell from its position and the levels of its maps."""
        r.lmax = max(m.level for m in r.maps)
        r.scale = s = 2.0**r.lmax
        r.ci = floor(r.lat * s)
        r.cj = floor(r.lon * s)

    def _activate(self, r: _Resp) -> None:
        self._place(r)
        if self._store is not None:
            r.slot = self._store.add(r)
        for n, m in enumerate(r.maps):
            r.keys[n] = m.key_of(r)
            m.add(r, n)
            m.n += 1
        r.active = True
        for m in r.maps:
            if m.n > 2 * m.n_built + 16:
                self._maintain(m)

    def _deactivate(self, r: _Resp) -> None:
        for n, m in enumerate(r.maps):
            m.discard(r, n)
            m.n -= 1
        if r.slot >= 0:
            self._store.remove(r.slot)  # type: ignore[union-attr]
            r.slot = -1
        r.active = False
        for m in r.maps:
            if m.n_built > 64 and 4 * m.n < m.n_built:
                self._maintain(m)

    def _maintain(self, m: _Map) -> None:
        """Re-pick ``m``'s level (cheap, sampled); rebuild the map if it changed (O(members))."""
        m.changes = 0
        m.n_built = m.n
        if self._fixed is not None:
            return
        level = _choose_level(m, self._target)
        if level == m.level:
            return
        self.rebuilds += 1
        members = m.members()
        m.set_level(level)
        for r in members:
            self._place(r)
            n = r.maps.index(m)
            r.keys[n] = m.key_of(r)
            m.add(r, n)

    def _search(
        self,
        m: _Map,
        lon: float,
        lat: float,
        qx: float,
        qy: float,
        qz: float,
        cq: float,
        lon_room: float,
        fresh: float,
        exclude: Container[str],
        k: int,
        cands: list[tuple[float, _Resp]],
        best: list[float],
        thr: float,
    ) -> float:
        """Add to ``cands`` every eligible member of ``m`` that can be among the ``k`` nearest.

        ``best`` holds the smallest squared chords seen so far (at most ``k``) and ``thr`` the
        squared chord of the k-th best plus the margin; the new ``thr`` is returned.
        """
        s = m.scale
        fy = lat * s
        fx = lon * s
        i = floor(fy)
        j = floor(fx)
        fmin = fy - i
        if fmin > 0.5:
            fmin = 1.0 - fmin
        gmin = fx - j
        if gmin > 0.5:
            gmin = 1.0 - gmin
        shift = m.shift
        cells = m.cells
        get = cells.get
        r = max(0, m.imin - i, i - m.imax, m.jmin - j, j - m.jmax)
        rmax = max(i - m.imin, m.imax - i, j - m.jmin, m.jmax - j)
        ncells = len(cells)
        visited = 0
        cellrad = m.cellrad
        kth = best[k - 1] if len(best) >= k else inf
        base = (i << shift) + j
        box = [thr]  # the tree search reads the current threshold through this
        while r <= rmax:
            nring = 8 * r if r else 1
            if visited + nring > ncells and self._scan_fallback:
                # Scanning what is left is cheaper than the next ring: finish with a scan.
                half = m.half
                src: Iterable[dict[str, _Resp] | None] = [
                    b
                    for key, b in cells.items()
                    if abs(((key + half) >> shift) - i) >= r
                    or abs(key - (((key + half) >> shift) << shift) - j) >= r
                ]
                rmax = -1
            elif (
                r > self._ring_limit
                and m.tree
                and (thr == inf or _rings_cost(thr, r, m, cq, lon_room) > self._tree_budget)
            ):
                # Far from anything (sparse or clustered members), the rings still to walk would
                # cost more lookups than a best-first search down the tree.
                src = _tree_buckets(m, qx, qy, qz, i, j, r, box)
                rmax = -1
            else:
                src = map(get, map(base.__add__, _ring(shift, r)))
                visited += nring
            for b in src:
                if b is None:
                    continue
                for rec in b.values():
                    dx = rec.x - qx
                    dy = rec.y - qy
                    dz = rec.z - qz
                    d2 = dx * dx + dy * dy + dz * dz
                    if d2 <= thr:
                        if rec.ts < fresh or rec.rid in exclude:
                            continue
                        cands.append((d2, rec))
                        if d2 < kth:
                            insort(best, d2)
                            if len(best) > k:
                                best.pop()
                            if len(best) == k:
                                kth = best[-1]
                                c = sqrt(kth) + _DELTA
                                thr = box[0] = c * c
            if thr < inf:
                dphi = (r + fmin) * cellrad
                lb = 2.0 * sin(dphi * 0.5) if dphi < pi else 2.0
                dlam = (r + gmin) * cellrad
                if dlam > lon_room:
                    dlam = lon_room
                lb2 = cq * sin(dlam)
                if lb2 < lb:
                    lb = lb2
                lb -= _EPS
                if lb > 0.0 and lb * lb > thr:
                    break
            r += 1
        return thr



if _speedups is not None:
    _speedups.setup(_Resp, EARTH_RADIUS_M, _DELTA, _EPS)
