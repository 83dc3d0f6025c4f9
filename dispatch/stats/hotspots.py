"""Hotspots: level-3 grids and categories whose count today is unusual against their own past.

For each candidate (a level-3 grid of the scope, or a category within the scope):

* ``count``: cases reported today (local day, so far);
* ``x_1 … x_n``: its counts on each of the previous ``n = hotspot_days`` full local days (days
  before the town's first recorded incident are left out; a day without cases is a 0);
* ``mean = Σx / n``; ``sd = √(Σ(x − mean)² / n)`` (population standard deviation);
* ``spread = max(sd, √(mean + 1))`` — counts are roughly Poisson, whose standard deviation is
  √mean, so a flat history (sd = 0) does not make every small rise a hotspot;
* it is a hotspot when ``count ≥ hotspot_min_count`` and ``count ≥ mean + hotspot_sigmas·spread``;
* ``score = (count − mean) / √(mean + 1)``; hotspots are listed by score, highest first.

With no previous day recorded there is no baseline and no hotspot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hotspot:
    key: str
    count: int
    mean: float
    sd: float
    score: float


def detect(
    today: Mapping[str, int],
    history: Sequence[Mapping[str, int]],
    *,
    min_count: int,
    sigmas: float,
    limit: int,
    keys: Iterable[str] | None = None,
) -> list[Hotspot]:
    """Hotspots among ``keys`` (default: every key counted today), given today's counts and one
    mapping of counts per previous day."""
    n = len(history)
    if n == 0:
        return []
    found: list[Hotspot] = []
    for key in today if keys is None else keys:
        count = today.get(key, 0)
        if count < min_count:
            continue
        xs = [h.get(key, 0) for h in history]
        mean = sum(xs) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
        spread = max(sd, math.sqrt(mean + 1.0))
        if count >= mean + sigmas * spread:
            found.append(Hotspot(key, count, mean, sd, (count - mean) / math.sqrt(mean + 1.0)))
    found.sort(key=lambda h: (-h.score, -h.count, h.key))
    return found[:limit]
