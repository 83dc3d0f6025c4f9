"""Geography: grids (GeoJSON loading, hierarchy checks, locating points) and the responder index.

* :func:`haversine_m` — the one great-circle distance of the project.
* :func:`load_grids` / :func:`check_grids` / :class:`GridSet` — the three-level grids; a
  ``GridSet`` is the engine's ``Locator``.
* :class:`CellIndex` — the engine's ``ResponderIndex``: exact nearest eligible responder.
"""

from dispatch.geo.distance import EARTH_RADIUS_M, haversine_m
from dispatch.geo.grids import (
    GridSet,
    Problem,
    check_geojson,
    check_grids,
    grids_from_geojson,
    load_grids,
)
from dispatch.geo.index import CellIndex

__all__ = [
    "EARTH_RADIUS_M",
    "CellIndex",
    "GridSet",
    "Problem",
    "check_geojson",
    "check_grids",
    "grids_from_geojson",
    "haversine_m",
    "load_grids",
]
