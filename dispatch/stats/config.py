"""The knobs of the statistics: :class:`StatsConfig` (frozen, validated, with defaults).

The server maps the ``[stats]`` section of its config file onto it
(:meth:`StatsConfig.from_settings` does that for ``dispatch.config.StatsSettings``). Every
formula that uses a field is written out in ``docs/statistics.md``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_DAY_S = 86_400.0

SAFETY_INDEX_VERSION = "safety index v1"
"""Name and version of the safety-index formula (:mod:`dispatch.stats.safety`)."""

ALERT_GROUPS: tuple[str, str, str] = ("public_security", "fire", "traffic")
"""The category groups that count as safety alerts; ``other`` never does."""

_GROUPS = frozenset({*ALERT_GROUPS, "other"})


def _default_weights() -> Mapping[str, float]:
    return MappingProxyType({"public_security": 0.4, "fire": 0.3, "traffic": 0.3, "other": 0.0})


def _default_saturation() -> Mapping[str, float]:
    return MappingProxyType(
        {"public_security": 10.0, "fire": 3.0, "traffic": 10.0, "other": 20.0}
    )


@dataclass(frozen=True, slots=True)
class StatsConfig:
    """Settings of :func:`dispatch.stats.compute_stats` and friends.

    Times: the statistics day is the *local* calendar day at UTC+``timezone_offset_hours``
    (China Standard Time, no daylight saving). Safety index v1: see :mod:`dispatch.stats.safety`.
    Hotspots: see :mod:`dispatch.stats.hotspots`.
    """

    timezone_offset_hours: float = 8.0
    """The local day starts at 00:00 at this offset from UTC (8 = China Standard Time)."""

    category_names_zh: Mapping[str, str] = field(default_factory=dict)
    """Chinese category names from ``categories.toml`` (``name_zh``), passed to screens."""

    safety_weights: Mapping[str, float] = field(default_factory=_default_weights)
    """Relative weight of each group's sub-score (normalised to sum 1). ``other`` is 0: it is
    not a safety signal."""
    safety_saturation: Mapping[str, float] = field(default_factory=_default_saturation)
    """Alerts per 10,000 residents per day at which a group's sub-score reaches 0."""
    safety_blue: float = 90.0
    """Score at or below which the colour is blue (warning level IV); above it: no warning."""
    safety_yellow: float = 75.0
    safety_orange: float = 60.0
    safety_red: float = 40.0
    """Score at or below which the colour is red (warning level I)."""
    safety_window_s: float | None = None
    """``None`` (default): today's live index covers the local day so far. A number: it covers
    the trailing window of that many seconds ending at ``now`` instead (history stays per day)."""
    safety_history_days: int = 30
    """Days in the ``safety_trend`` of :func:`~dispatch.stats.compute_stats` (today included)."""

    hotspot_days: int = 14
    """Number of previous full local days a grid's or category's count today is compared with."""
    hotspot_min_count: int = 3
    """A hotspot has at least this many cases today."""
    hotspot_sigmas: float = 2.0
    """... and at least mean + this many standard deviations (Poisson floor, see hotspots)."""
    hotspot_limit: int = 10
    """At most this many grid hotspots and this many category hotspots, highest score first."""

    top_categories: int = 5
    """Length of ``top_categories``."""

    reconcile_every_s: float = 60.0
    """The per-engine cache re-checks every closed incident at most this often (seconds of
    ``now``), catching a reopen and re-close that both happened between two calls."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not -14.0 <= self.timezone_offset_hours <= 14.0:
            problems.append("timezone_offset_hours must be between -14 and 14")
        for name, mapping in (("safety_weights", self.safety_weights),
                              ("safety_saturation", self.safety_saturation)):
            unknown = sorted(set(mapping) - _GROUPS)
            if unknown:
                problems.append(f"{name}: unknown group(s) {', '.join(unknown)}")
        if any(not (w >= 0 and math.isfinite(w)) for w in self.safety_weights.values()):
            problems.append("safety_weights must be finite and at least 0")
        if not any(w > 0 for w in self.safety_weights.values()):
            problems.append("safety_weights: at least one group needs a weight above 0")
        for group, weight in self.safety_weights.items():
            if weight > 0 and not self.safety_saturation.get(group, 0.0) > 0:
                problems.append(f"safety_saturation needs a value above 0 for {group}")
        cuts = (self.safety_red, self.safety_orange, self.safety_yellow, self.safety_blue)
        if not all(0.0 <= c <= 100.0 for c in cuts):
            problems.append("safety colour cut-offs must be within 0..100")
        if not all(a < b for a, b in itertools.pairwise(cuts)):
            problems.append("safety cut-offs must satisfy red < orange < yellow < blue")
        if self.safety_window_s is not None and not self.safety_window_s > 0:
            problems.append("safety_window_s must be above 0 (or None for the local day)")
        if self.safety_history_days < 1:
            problems.append("safety_history_days must be at least 1")
        if self.hotspot_days < 1:
            problems.append("hotspot_days must be at least 1")
        if self.hotspot_min_count < 1:
            problems.append("hotspot_min_count must be at least 1")
        if not self.hotspot_sigmas >= 0:
            problems.append("hotspot_sigmas must be at least 0")
        if self.hotspot_limit < 0 or self.top_categories < 0:
            problems.append("hotspot_limit and top_categories must be at least 0")
        if not self.reconcile_every_s >= 0:
            problems.append("reconcile_every_s must be at least 0")
        if problems:
            raise ValueError("StatsConfig: " + "; ".join(problems))
        # Freeze the mappings even when a caller passed plain dicts.
        object.__setattr__(self, "safety_weights", MappingProxyType(dict(self.safety_weights)))
        object.__setattr__(
            self, "safety_saturation", MappingProxyType(dict(self.safety_saturation))
        )

    @property
    def offset_s(self) -> float:
        return self.timezone_offset_hours * 3600.0

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> StatsConfig:
        """Build from ``dispatch.config.StatsSettings`` (duck-typed: ``weights``, ``saturation``,
        ``blue``, ``yellow``, ``orange``, ``red``, and optionally ``window`` and
        ``timezone_offset_hours``). A ``window`` of 24 h (the default) is the local calendar day,
        as the seed city publishes it; any other length is a trailing window ending now."""
        kwargs: dict[str, Any] = {
            "safety_weights": dict(settings.weights),
            "safety_saturation": dict(settings.saturation),
            "safety_blue": float(settings.blue),
            "safety_yellow": float(settings.yellow),
            "safety_orange": float(settings.orange),
            "safety_red": float(settings.red),
        }
        window = getattr(settings, "window", _DAY_S)
        if window != _DAY_S:
            kwargs["safety_window_s"] = float(window)
        offset = getattr(settings, "timezone_offset_hours", None)
        if offset is not None:
            kwargs["timezone_offset_hours"] = float(offset)
        kwargs.update(overrides)
        return cls(**kwargs)


DEFAULT_CONFIG = StatsConfig()


def coerce_config(config: object) -> StatsConfig:
    """``None`` → defaults; a :class:`StatsConfig` as is; a ``StatsSettings``-like object is
    converted with :meth:`StatsConfig.from_settings`."""
    if config is None:
        return DEFAULT_CONFIG
    if isinstance(config, StatsConfig):
        return config
    if hasattr(config, "weights") and hasattr(config, "saturation"):
        return StatsConfig.from_settings(config)
    raise TypeError(f"expected StatsConfig, got {type(config).__name__}")


def config_from_settings(settings: Any) -> StatsConfig:
    """The server's entry point: a :class:`StatsConfig` from ``dispatch.config.Settings`` (its
    ``stats`` section) or from a ``StatsSettings`` directly."""
    section = getattr(settings, "stats", settings)
    return StatsConfig.from_settings(section)
