"""Governance statistics (placeholder until dispatch.stats.kpi lands)."""

from __future__ import annotations

from typing import Any


def compute_stats(engine: Any, scope: str, now: float, config: Any = None) -> dict[str, Any]:
    state = engine.state
    by_level = {"3": 0, "2": 0, "1": 0}
    for iid in state.open_ids:
        inc = state.incidents[iid]
        if scope in inc.grids.values():
            by_level[str(inc.level)] += 1
    return {"scope": scope, "open_by_level": by_level}
