"""The operator's contract on the command line: grids check, refusing bad data, tokens, replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from tests.e2e.harness import SECRET, ServerProcess, field

DISPATCH = [sys.executable, "-m", "dispatch.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DISPATCH, *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def test_grids_check_reports_every_problem(tmp_path: Path) -> None:
    def sq(x0: float, y0: float, x1: float, y1: float) -> list[list[list[float]]]:
        return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]

    def feat(gid: str, level: int, parent: str | None, poly: object) -> dict[str, object]:
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": poly},
                "properties": {"id": gid, "level": level, "parent": parent, "name": gid}}

    bad = {"type": "FeatureCollection", "features": [
        feat("T", 1, None, sq(0, 0, 10, 10)),
        feat("A", 2, "T", sq(0, 0, 6, 10)),
        feat("B", 2, "T", sq(5, 0, 10, 10)),       # overlaps A
        feat("A1", 3, "A", sq(0, 0, 6, 5)),        # leaves a gap in A (warning)
        feat("X1", 3, "NOPE", sq(0, 5, 1, 6)),     # parent missing
        feat("Z1", 3, "T", sq(6, 0, 7, 1)),        # parent of the wrong level
        feat("Q1", 3, "B", sq(20, 20, 21, 21)),    # outside its parent
    ]}
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps(bad))
    out = run("grids", "check", str(path))
    assert out.returncode != 0
    text = out.stdout
    for needle in ("overlap", "NOPE", "Z1", "Q1", "warning"):
        assert needle in text, (needle, text)

    good = Path(__file__).parents[2] / "config" / "demo" / "grids.geojson"
    out = run("grids", "check", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 error(s)" in out.stdout


def test_serve_refuses_bad_data_naming_file_and_row(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path)
    roster = tmp_path / "roster.csv"
    roster.write_text(roster.read_text() + "w9,Worker Nine,grid_worker,NO_SUCH_GRID,*,\n")
    out = run("serve", "--config", str(srv.config))
    assert out.returncode == 2
    assert "roster.csv" in out.stderr and "NO_SUCH_GRID" in out.stderr
    assert "roster.csv:10:" in out.stderr, out.stderr


def test_token_command_mints_what_the_server_accepts(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path)
    out = run("token", "--config", str(srv.config), "--role", "operator", "--sub", "clerk",
              "--scope", "V1", "--ttl", "2h")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert (claims["role"], claims["sub"], claims["scope"]) == ("operator", "clerk", "V1")
    out = run("token", "--config", str(srv.config), "--role", "operator", "--sub", "clerk")
    assert out.returncode == 2 and "--scope" in out.stderr
    # a token the server would refuse at once is minted (that is how 4403 is tested), with a
    # warning naming what is wrong
    out = run("token", "--config", str(srv.config), "--role", "operator", "--sub", "clerk",
              "--scope", "NOPE")
    assert out.returncode == 0 and "'NOPE' is not a grid" in out.stderr
    assert jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])["scope"] == "NOPE"
    out = run("token", "--config", str(srv.config), "--role", "field", "--sub", "nobody")
    assert out.returncode == 0 and "'nobody' is not in the roster" in out.stderr
    out = run("token", "--config", str(srv.config), "--role", "field", "--sub", "w1")
    assert out.returncode == 0 and "warning" not in out.stderr
    out = run("token", "--config", str(srv.config), "--role", "admin", "--sub", "a", "--ttl", "5x")
    assert out.returncode == 2 and "--ttl: '5x' is not a duration" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.asyncio
async def test_replay_prints_the_towns_events(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path)
    srv.start()
    try:
        w1 = await field(srv, "w1", (113.005, 22.605))
        ack = await w1.request({"type": "report", "category": "sanitation", "lon": 113.006,
                                "lat": 22.606, "handled": True})
        assert ack["type"] == "ack"
    finally:
        srv.stop()
    out = run("replay", "--config", str(srv.config))
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    types = [e["type"] for e in events]
    assert "incident.reported" in types and "incident.closed" in types
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    out = run("replay", "--config", str(srv.config), "--summary")
    assert "town T0:" in out.stdout and "incident.reported" in out.stdout
