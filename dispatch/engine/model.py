"""Static facts the engine reasons about: grids, categories, the roster, and the two geographic
services it needs (locating a point, finding the nearest eligible responder).

These are plain, immutable values built once at start-up by the config loader (``dispatch.config``)
and handed to the engine. Nothing here does I/O. Times throughout the engine are ``float`` seconds
since the Unix epoch (UTC); durations are ``float`` seconds.

The geographic services are described as ``Protocol``s so that the engine depends on their
contract, not on shapely or on the index implementation in ``dispatch.geo``.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Level = Literal[1, 2, 3]
LEVELS: tuple[Level, Level, Level] = (3, 2, 1)

ResponderKind = Literal["grid_worker", "department", "volunteer"]
RESPONDER_KINDS: frozenset[str] = frozenset({"grid_worker", "department", "volunteer"})

SafetyGroup = Literal["public_security", "fire", "traffic", "other"]
SAFETY_GROUPS: frozenset[str] = frozenset({"public_security", "fire", "traffic", "other"})

Source = Literal["field", "hotline", "citizen", "operator"]
SOURCES: frozenset[str] = frozenset({"field", "hotline", "citizen", "operator"})


@dataclass(frozen=True, slots=True)
class Grid:
    """One grid of the three-level hierarchy. ``parent`` is ``None`` only at level 1."""

    id: str
    level: Level
    parent: str | None
    name: str
    population: int | None = None


@dataclass(frozen=True, slots=True)
class Category:
    """A case category: who may handle it and how long each level has to resolve it.

    ``limits`` maps level (3, 2, 1) to the seconds that level has, counted from the moment
    the incident arrives at that level.
    """

    code: str
    name: str
    group: SafetyGroup
    priority: int
    verify: bool
    limits: Mapping[int, float]


@dataclass(frozen=True, slots=True)
class ResponderInfo:
    """A roster row: who a responder is. Its live state lives in the engine."""

    id: str
    name: str
    kind: ResponderKind
    home_grid: str
    skills: frozenset[str]
    department: str | None = None

    def can_handle(self, category: str) -> bool:
        return "*" in self.skills or category in self.skills


@dataclass(frozen=True, slots=True)
class Located:
    """The grids a point falls in, one per level."""

    g3: str
    g2: str
    g1: str

    def at(self, level: int) -> str:
        return self.g3 if level == 3 else self.g2 if level == 2 else self.g1

    def as_dict(self) -> dict[str, str]:
        return {"3": self.g3, "2": self.g2, "1": self.g1}


class Locator(Protocol):
    """Point-in-polygon service over the town's grids (boundary points count as inside)."""

    def locate(self, lon: float, lat: float) -> Located | None:
        """The level-3/2/1 grids containing the point, or ``None`` when it is in no grid."""
        ...


class ResponderIndex(Protocol):
    """Positions of responders and the nearest-eligible query the dispatch rules rely on.

    The engine registers every responder with the pools it belongs to (one pool per grid id:
    its home grid and every ancestor), tells the index whenever a responder becomes or stops
    being ``available``, and feeds it positions. ``nearest`` must return the *exact* nearest
    responder by great-circle distance among those that are available, in the pool, have the
    skill (``"*"`` in their skills matches any category), are not in ``exclude`` and whose last
    position is at or after ``fresh_since``; ties go to the smaller responder id.
    """

    def register(self, rid: str, pools: Iterable[str], skills: frozenset[str]) -> None: ...

    def set_available(self, rid: str, available: bool) -> None: ...

    def move(self, rid: str, lon: float, lat: float, ts: float) -> None: ...

    def position(self, rid: str) -> tuple[float, float, float] | None:
        """``(lon, lat, ts)`` of the last position, or ``None``."""
        ...

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
        """Up to ``k`` ``(responder id, metres)`` pairs, nearest first."""
        ...


def ancestors_of(grids: Mapping[str, Grid], grid_id: str) -> list[str]:
    """``grid_id`` and every grid above it, nearest first (a home grid's responder pools)."""
    out: list[str] = []
    g: str | None = grid_id
    while g is not None:
        out.append(g)
        g = grids[g].parent
    return out


@dataclass(frozen=True, slots=True)
class Town:
    """Everything static the engine needs about one town."""

    id: str
    grids: Mapping[str, Grid]
    categories: Mapping[str, Category]
    roster: Mapping[str, ResponderInfo]
    children: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def ancestors(self, grid_id: str) -> list[str]:
        """``grid_id`` and every grid above it, nearest first."""
        return ancestors_of(self.grids, grid_id)

    def in_subtree(self, grid_id: str, root: str) -> bool:
        return root in self.ancestors(grid_id)

    def screen_scopes(self, grid_id: str) -> tuple[str, ...]:
        """The level-2 and level-1 grids at or above ``grid_id``: the wall screens that see it."""
        return tuple(g for g in self.ancestors(grid_id) if self.grids[g].level < 3)


@dataclass(frozen=True, slots=True)
class Timing:
    """The dispatch clocks from config ``[dispatch]``, in seconds."""

    offer_timeout: float = 60.0
    position_stale_after: float = 120.0
    offline_after: float = 30.0
