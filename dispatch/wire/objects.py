"""The incident and responder objects clients see (PROTOCOL.md "Grids, responders, incidents"
plus the additions in docs/protocol.md), built from engine state."""

from __future__ import annotations

from typing import Any

from dispatch.engine.state import Incident, Responder
from dispatch.wire.codec import iso


def incident_obj(
    inc: Incident, *, verify: bool = False, timeline: list[Any] | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": inc.id,
        "ref": inc.ref,
        "category": inc.category,
        "priority": inc.priority,
        "lon": inc.lon,
        "lat": inc.lat,
        "description": inc.description,
        "grids": inc.grids,
        "level": inc.level,
        "status": inc.status,
        "responder": inc.responder,
        "department": inc.department,
        "source": inc.source,
        "reported_at": iso(inc.reported_at),
        "closed_at": iso(inc.closed_at),
        "deadline": iso(inc.deadline),
        "offer_expires_at": iso(inc.offer_expires_at),
        "overdue": inc.overdue,
        "on_time": inc.on_time,
        "reporter": inc.reporter,
        "handled": inc.handled,
        "offered_at": iso(inc.offered_at),
        "assigned_at": iso(inc.assigned_at),
        "arrived_at": iso(inc.arrived_at),
        "resolved_at": iso(inc.resolved_at),
        "resolved_by": inc.resolved_by,
        "reopened": inc.reopened,
        "escalations": [
            {
                "from_level": e.from_level,
                "to_level": e.to_level,
                "reason": e.reason,
                "at": iso(e.at),
            }
            for e in inc.escalations
        ],
        "verify": verify,
        "photos": inc.photos,
    }
    if timeline is not None:
        doc["timeline"] = timeline
    return doc


def responder_obj(r: Responder, position: tuple[float, float, float] | None) -> dict[str, Any]:
    info = r.info
    return {
        "id": info.id,
        "name": info.name,
        "kind": info.kind,
        "home_grid": info.home_grid,
        "skills": sorted(info.skills),
        "department": info.department,
        "status": r.status,
        "lon": position[0] if position else None,
        "lat": position[1] if position else None,
        "position_at": iso(position[2]) if position else None,
        "incident": r.incident,
        "online": r.online,
    }
