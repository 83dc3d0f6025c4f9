"""The small town most tests use: town T0 (lon 113.00–113.04, lat 22.60–22.64), villages V1
(west) and V2 (east), each split into a south (A) and a north (B) basic grid of 10,000 people."""

from __future__ import annotations

from typing import Any


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[list[float]]]:
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


GRIDS: list[tuple[str, int, str | None, list[list[list[float]]], int]] = [
    ("T0", 1, None, rect(113.00, 22.60, 113.04, 22.64), 40000),
    ("V1", 2, "T0", rect(113.00, 22.60, 113.02, 22.64), 20000),
    ("V2", 2, "T0", rect(113.02, 22.60, 113.04, 22.64), 20000),
    ("V1A", 3, "V1", rect(113.00, 22.60, 113.02, 22.62), 10000),
    ("V1B", 3, "V1", rect(113.00, 22.62, 113.02, 22.64), 10000),
    ("V2A", 3, "V2", rect(113.02, 22.60, 113.04, 22.62), 10000),
    ("V2B", 3, "V2", rect(113.02, 22.62, 113.04, 22.64), 10000),
]


def feature_collection() -> dict[str, Any]:
    """The town as the GeoJSON FeatureCollection of PROTOCOL.md "Grids"."""
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": poly},
                "properties": {"id": gid, "level": lvl, "parent": parent, "name": gid,
                               "population": pop},
            }
            for gid, lvl, parent, poly, pop in GRIDS
        ],
    }
