"""The fast point locator (a raster over the basic grids) answers exactly as an STRtree query
with shapely's 'intersects' — boundary points included, shared boundaries to the smallest id."""

from __future__ import annotations

import itertools
from pathlib import Path

import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.geo.grids import load_grids

GRIDS = load_grids(Path(__file__).parents[2] / "config" / "demo" / "grids.geojson")
X0, Y0, X1, Y1 = shapely.total_bounds(list(GRIDS.geoms.values())).tolist()
VERTICES = [c for g in GRIDS._geoms3 for c in g.exterior.coords]


def reference(lon: float, lat: float) -> object:
    hits = GRIDS._tree.query(shapely.Point(lon, lat), predicate="intersects")
    return None if len(hits) == 0 else GRIDS._l3_located[int(hits.min())]


@settings(max_examples=3000)
@given(st.floats(X0 - 0.01, X1 + 0.01), st.floats(Y0 - 0.01, Y1 + 0.01))
def test_any_point_is_located_as_the_strtree_does(lon: float, lat: float) -> None:
    assert GRIDS.locate(lon, lat) == reference(lon, lat)


def test_vertices_and_midpoints_of_every_boundary() -> None:
    for (x0, y0), (x1, y1) in itertools.pairwise(VERTICES):
        for lon, lat in ((x0, y0), ((x0 + x1) / 2, (y0 + y1) / 2)):
            assert GRIDS.locate(lon, lat) == reference(lon, lat)


def test_far_edges_and_outside() -> None:
    assert GRIDS.locate(X1 + 1, Y1 + 1) is None
    assert GRIDS.locate(float("nan"), Y0) is None
    for lon, lat in ((X0, Y0), (X1, Y1), (X1, Y0), (X0, Y1)):
        assert GRIDS.locate(lon, lat) == reference(lon, lat)
