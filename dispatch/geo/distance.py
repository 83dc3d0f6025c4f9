"""The project's one great-circle distance.

Every distance the dispatch rules compare ("nearest by great-circle distance", PROTOCOL.md rule 3)
is :func:`haversine_m` on a sphere of the mean earth radius. Anything that ranks responders by
another measure (the responder index ranks by chord length, which orders points exactly as the
great-circle distance does) must report and break ties with this function, so that two parts of
the system never disagree about who is nearer.
"""

from __future__ import annotations

from math import asin, cos, radians, sin, sqrt

EARTH_RADIUS_M = 6371008.8
"""Mean earth radius (IUGG R1), metres."""


def haversine_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Great-circle distance in metres between two WGS84 points given in degrees.

    The argument order is ``lon, lat`` as everywhere on the wire. The result is exactly
    symmetric in its two points only up to rounding; callers that compare distances for ties
    (the responder index and its tests) call it as ``haversine_m(query, candidate)``.
    """
    p1 = radians(lat1)
    p2 = radians(lat2)
    s_dp = sin((p2 - p1) * 0.5)
    s_dl = sin(radians(lon2 - lon1) * 0.5)
    a = s_dp * s_dp + cos(p1) * cos(p2) * s_dl * s_dl
    if a > 1.0:  # rounding at antipodes
        a = 1.0
    return 2.0 * EARTH_RADIUS_M * asin(sqrt(a))
