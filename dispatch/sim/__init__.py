"""The demo town and its simulated field devices.

* :mod:`dispatch.sim.town` — ``generate_demo_town(out_dir, seed=7) -> DemoTown``: grids, roster,
  categories and a demo config, deterministic per seed (``python -m dispatch.sim.town DIR``).
* :mod:`dispatch.sim.devices` — ``Fleet``: simulated grid workers, department units and
  volunteers on real websockets (``FieldClient`` + ``PatrolBehaviour``, reusable for load tests).
* :mod:`dispatch.sim.names` — Chinese names for places, people and units.

The names below are imported from those modules on first use (so ``python -m
dispatch.sim.town`` does not import the module twice).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatch.sim.devices import (
        BehaviourConfig,
        DeviceSpec,
        FieldClient,
        FieldError,
        Fleet,
        FleetStats,
        PatrolBehaviour,
        load_devices,
    )
    from dispatch.sim.town import CATEGORIES, DemoTown, generate_demo_town

_WHERE = {
    "BehaviourConfig": "devices",
    "DeviceSpec": "devices",
    "FieldClient": "devices",
    "FieldError": "devices",
    "Fleet": "devices",
    "FleetStats": "devices",
    "PatrolBehaviour": "devices",
    "load_devices": "devices",
    "CATEGORIES": "town",
    "DemoTown": "town",
    "generate_demo_town": "town",
}

__all__ = [
    "CATEGORIES",
    "BehaviourConfig",
    "DemoTown",
    "DeviceSpec",
    "FieldClient",
    "FieldError",
    "Fleet",
    "FleetStats",
    "PatrolBehaviour",
    "generate_demo_town",
    "load_devices",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"dispatch.sim.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'dispatch.sim' has no attribute {name!r}")
