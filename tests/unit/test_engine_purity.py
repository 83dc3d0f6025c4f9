"""The engine is sans-I/O (ARCHITECTURE §1, STYLE 1): no asyncio, sockets, disks, clocks or
randomness may be imported there — only plain data types and our own engine modules."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).parents[2] / "dispatch" / "engine"
ALLOWED = {"__future__", "collections", "collections.abc", "dataclasses", "typing", "heapq",
           "math", "msgspec", "dispatch.errors"}


def test_engine_imports_nothing_with_side_effects() -> None:
    found: dict[str, set[str]] = {}
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module or ""}
            else:
                continue
            bad = {n for n in names if n not in ALLOWED and not n.startswith("dispatch.engine")}
            if bad:
                found[path.name] = found.get(path.name, set()) | bad
    assert not found, f"impure imports in the engine: {found}"
