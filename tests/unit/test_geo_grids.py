"""Grid files: every kind of invalid file is refused with the file, the feature and the reason;
check_grids lists every problem; a GridSet locates points (boundaries inside, outside None)."""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dispatch.engine.model import Category, Located, ResponderInfo
from dispatch.errors import ConfigError
from dispatch.geo.grids import GridSet, check_grids, load_grids

LON0, LAT0, U = 113.19, 22.61, 0.01  # one unit is about 1 km


def rect(x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
    """A GeoJSON Polygon for the box [x0, x1] x [y0, y1] in units around the demo town."""
    a, b, c, d = LON0 + x0 * U, LAT0 + y0 * U, LON0 + x1 * U, LAT0 + y1 * U
    return {"type": "Polygon", "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]}


def feature(gid: str, level: int, parent: str | None, geom: dict[str, Any], **extra: Any) -> Any:
    props = {"id": gid, "level": level, "parent": parent, "name": f"Grid {gid}", **extra}
    return {"type": "Feature", "properties": props, "geometry": geom}


def town() -> dict[str, Any]:
    """T = [0,4]x[0,2]; V1 = left half, V2 = right half; B11|B12 split V1 at x=1,
    B21/B22 split V2 at y=1."""
    return {
        "type": "FeatureCollection",
        "features": [
            feature("T", 1, None, rect(0, 0, 4, 2), population=52000),
            feature("V1", 2, "T", rect(0, 0, 2, 2)),
            feature("V2", 2, "T", rect(2, 0, 4, 2)),
            feature("B11", 3, "V1", rect(0, 0, 1, 2), population=1200, patrol="north"),
            feature("B12", 3, "V1", rect(1, 0, 2, 2)),
            feature("B21", 3, "V2", rect(2, 0, 4, 1)),
            feature("B22", 3, "V2", rect(2, 1, 4, 2), population=None),
        ],
    }


def write(tmp_path: Path, data: Any, name: str = "grids.geojson") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def by_id(fc: dict[str, Any], gid: str) -> dict[str, Any]:
    for f in fc["features"]:
        if f["properties"]["id"] == gid:
            return f  # type: ignore[no-any-return]
    raise KeyError(gid)


def pt(x: float, y: float) -> tuple[float, float]:
    return LON0 + x * U, LAT0 + y * U


# -- a valid file ------------------------------------------------------------------------------


def test_valid_town_loads_with_hierarchy(tmp_path: Path) -> None:
    gs = load_grids(write(tmp_path, town()))
    assert gs.towns == ("T",)
    assert set(gs.grids) == {"T", "V1", "V2", "B11", "B12", "B21", "B22"}
    assert gs.grids["B11"].level == 3 and gs.grids["B11"].parent == "V1"
    assert gs.grids["T"].population == 52000 and gs.grids["B22"].population is None
    assert gs.children["T"] == ("V1", "V2") and gs.children["V2"] == ("B21", "B22")
    assert gs.children["B11"] == ()
    assert gs.town_of("B22") == "T" and gs.town_of("T") == "T"
    assert gs.ancestors("B21") == ["B21", "V2", "T"]
    assert gs.warnings == []
    # the original collection, extras included, is kept for GET /api/grids
    assert gs.feature_collection == town()
    assert by_id(gs.feature_collection, "B11")["properties"]["patrol"] == "north"


def test_to_town_filters_roster_and_fills_children(tmp_path: Path) -> None:
    gs = load_grids(write(tmp_path, town()))
    cats = {"fire": Category("fire", "Fire", "fire", 1, False, {3: 7200.0, 2: 86400.0, 1: 3e5})}
    roster = {
        "w1": ResponderInfo("w1", "Wu", "grid_worker", "B11", frozenset({"*"})),
        "x9": ResponderInfo("x9", "Xu", "grid_worker", "elsewhere", frozenset({"*"})),
    }
    t = gs.to_town("T", cats, roster)
    assert t.id == "T" and set(t.roster) == {"w1"} and t.categories == cats
    assert t.children["V1"] == ("B11", "B12") and t.children["B12"] == ()
    assert t.ancestors("B12") == ["B12", "V1", "T"]
    with pytest.raises(KeyError):
        gs.to_town("V1", cats, roster)


def test_multipolygon_and_two_separate_towns(tmp_path: Path) -> None:
    fc = town()
    far = {
        "type": "MultiPolygon",
        "coordinates": [rect(10, 0, 11, 1)["coordinates"], rect(12, 0, 13, 1)["coordinates"]],
    }
    fc["features"] += [
        feature("S", 1, None, far),
        feature("SV", 2, "S", far),
        feature("SB", 3, "SV", far),
    ]
    gs = load_grids(write(tmp_path, fc))
    assert gs.towns == ("S", "T")
    assert gs.town_of("SB") == "S"
    assert gs.locate(*pt(12.5, 0.5)) == Located("SB", "SV", "S")
    assert gs.locate(*pt(11.5, 0.5)) is None  # between the two parts


# -- locating ----------------------------------------------------------------------------------


def test_locate_inside_boundaries_and_outside(tmp_path: Path) -> None:
    gs = load_grids(write(tmp_path, town()))
    assert gs.locate(*pt(0.5, 1.0)) == Located("B11", "V1", "T")
    assert gs.locate(*pt(3.0, 0.5)) == Located("B21", "V2", "T")
    located = gs.locate(*pt(3.0, 1.5))
    assert located is not None and located.as_dict() == {"3": "B22", "2": "V2", "1": "T"}
    # a boundary shared by two level-3 grids goes to the smaller id
    assert gs.locate(*pt(1.0, 1.0)) == Located("B11", "V1", "T")
    assert gs.locate(*pt(3.0, 1.0)) == Located("B21", "V2", "T")
    # the town's own outline and corners count as inside
    assert gs.locate(*pt(0.0, 1.0)) == Located("B11", "V1", "T")
    assert gs.locate(*pt(4.0, 2.0)) == Located("B22", "V2", "T")
    assert gs.locate(*pt(2.0, 0.0)) == Located("B12", "V1", "T")
    # outside
    assert gs.locate(*pt(4.001, 1.0)) is None
    assert gs.locate(*pt(-1.0, -1.0)) is None
    assert gs.locate(0.0, 0.0) is None
    assert gs.locate(math.nan, LAT0) is None


def test_locate_many_equals_locate(tmp_path: Path) -> None:
    gs = load_grids(write(tmp_path, town()))
    rng = random.Random(7)
    xs = [rng.choice([0.0, 1.0, 2.0, 4.0, rng.uniform(-0.5, 4.5)]) for _ in range(400)]
    ys = [rng.choice([0.0, 1.0, 2.0, rng.uniform(-0.5, 2.5)]) for _ in range(400)]
    lons = [LON0 + x * U for x in xs] + [math.nan]
    lats = [LAT0 + y * U for y in ys] + [LAT0]
    got = gs.locate_many(lons, lats)
    assert got == [gs.locate(lo, la) for lo, la in zip(lons, lats, strict=True)]
    assert sum(g is None for g in got) > 10 and sum(g is not None for g in got) > 100
    with pytest.raises(ValueError):
        gs.locate_many([1.0, 2.0], [1.0])


# -- one error at a time -----------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(gid: str, key: str, value: Any) -> Mutation:
    def m(fc: dict[str, Any]) -> None:
        by_id(fc, gid)["properties"][key] = value

    return m


def _drop(gid: str, key: str) -> Mutation:
    def m(fc: dict[str, Any]) -> None:
        del by_id(fc, gid)["properties"][key]

    return m


def _geom(gid: str, geom: Any) -> Mutation:
    def m(fc: dict[str, Any]) -> None:
        by_id(fc, gid)["geometry"] = geom

    return m


def _dup(fc: dict[str, Any]) -> None:
    fc["features"].append(copy.deepcopy(by_id(fc, "B21")))


BOWTIE = {
    "type": "Polygon",
    "coordinates": [
        [list(pt(2, 1)), list(pt(4, 2)), list(pt(4, 1)), list(pt(2, 2)), list(pt(2, 1))]
    ],
}

# (mutation, the feature the message must name, what it must say)
CASES: dict[str, tuple[Mutation, str, str]] = {
    "missing name": (_drop("B12", "name"), "features[4] (id 'B12')", "missing property 'name'"),
    "missing parent key": (
        _drop("V1", "parent"),
        "features[1] (id 'V1')",
        "missing property 'parent'",
    ),
    "level as string": (
        _set("B21", "level", "3"),
        "features[5] (id 'B21')",
        "'level' must be 1, 2 or 3",
    ),
    "level 4": (_set("B21", "level", 4), "features[5] (id 'B21')", "'level' must be 1, 2 or 3"),
    "numeric id": (_set("B22", "id", 22), "features[6]", "'id' must be a non-empty string"),
    "bad population": (_set("T", "population", -5), "features[0] (id 'T')", "'population'"),
    "duplicate id": (_dup, "features[7] (id 'B21')", "duplicate id: features[5] (id 'B21')"),
    "invalid polygon": (_geom("B22", BOWTIE), "features[6] (id 'B22')", "invalid polygon"),
    "point geometry": (
        _geom("B22", {"type": "Point", "coordinates": list(pt(3, 1.5))}),
        "features[6] (id 'B22')",
        "must be a Polygon or MultiPolygon",
    ),
    "lat lon swapped": (
        _geom(
            "B22",
            {
                "type": "Polygon",
                "coordinates": [[[y, x] for x, y in rect(2, 1, 4, 2)["coordinates"][0]]],
            },
        ),
        "features[6] (id 'B22')",
        "[lon, lat]",
    ),
    "parent missing": (
        _set("B12", "parent", "V9"),
        "features[4] (id 'B12')",
        "parent 'V9' does not exist",
    ),
    "parent wrong level": (
        _set("B12", "parent", "T"),
        "features[4] (id 'B12')",
        "parent 'T' is level 1; a level-3 grid's parent must be level 2",
    ),
    "town with parent": (_set("T", "parent", "V1"), "features[0] (id 'T')", "has no parent"),
    "village without parent": (
        _set("V2", "parent", None),
        "features[2] (id 'V2')",
        "needs a parent",
    ),
    "child outside parent": (
        _geom("B22", rect(2, 1, 4, 2.5)),
        "features[6] (id 'B22')",
        "not inside its parent 'V2'",
    ),
    "overlapping siblings": (
        _geom("B12", rect(0.8, 0, 2, 2)),
        "features[4] (id 'B12')",
        "overlaps sibling 'B11' (features[3] (id 'B11'))",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_error_is_named(tmp_path: Path, case: str) -> None:
    mutate, where, what = CASES[case]
    fc = town()
    mutate(fc)
    path = write(tmp_path, fc)
    with pytest.raises(ConfigError) as err:
        load_grids(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {where}: "), msg
    assert what in msg, msg
    problems = [p for p in check_grids(path) if p.severity == "error"]
    assert any(p.feature == where and what in p.message for p in problems), problems


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.geojson"
    with pytest.raises(ConfigError, match=r"nope\.geojson: cannot read the file"):
        load_grids(missing)
    bad = write(tmp_path, '{"type": "FeatureCollection", "features": [', "bad.geojson")
    with pytest.raises(ConfigError, match=r"bad\.geojson: not valid JSON \(line 1"):
        load_grids(bad)
    feat = write(tmp_path, town()["features"][0], "one.geojson")
    with pytest.raises(ConfigError, match=r"one\.geojson: not a GeoJSON FeatureCollection"):
        load_grids(feat)
    empty = write(tmp_path, {"type": "FeatureCollection", "features": []}, "empty.geojson")
    with pytest.raises(ConfigError, match="no features"):
        load_grids(empty)
    [problem] = check_grids(bad)
    assert problem.severity == "error" and problem.feature == ""


def test_overlapping_towns_are_refused(tmp_path: Path) -> None:
    fc = town()
    fc["features"].append(feature("T2", 1, None, rect(3, 0, 6, 2)))
    with pytest.raises(ConfigError, match=r"features\[7\] \(id 'T2'\): overlaps town 'T'"):
        load_grids(write(tmp_path, fc))


def test_small_slivers_are_tolerated(tmp_path: Path) -> None:
    fc = town()
    # B22 pokes 0.0004 units (0.02% of its area) out of V2 and into B21: within tolerance.
    by_id(fc, "B22")["geometry"] = rect(2, 0.9996, 4, 2.0004)
    gs = load_grids(write(tmp_path, fc))
    assert gs.locate(*pt(3.0, 2.0002)) == Located("B22", "V2", "T")


def test_many_problems_all_reported(tmp_path: Path) -> None:
    fc = town()
    by_id(fc, "B11")["properties"]["level"] = "three"  # 3
    by_id(fc, "B12")["properties"]["parent"] = "nowhere"  # 4
    by_id(fc, "B22")["geometry"] = BOWTIE  # 6
    fc["features"].append(
        feature("V3", 2, "T", rect(3.5, 1.5, 5, 2.5))
    )  # 7: outside T, overlaps V2
    fc["features"].append(feature("V4", 2, "V1", rect(0, 0, 0.5, 0.5)))  # 8: parent of wrong level
    fc["features"].append({"type": "Feature", "properties": None, "geometry": None})  # 9
    path = write(tmp_path, fc)
    problems = check_grids(path)
    found = {(p.severity, p.feature, next(w for w in WORDS if w in p.message)) for p in problems}
    assert found == {
        ("error", "features[3] (id 'B11')", "'level'"),
        ("error", "features[4] (id 'B12')", "does not exist"),
        ("error", "features[6] (id 'B22')", "invalid polygon"),
        ("error", "features[7] (id 'V3')", "not inside its parent"),
        ("error", "features[7] (id 'V3')", "overlaps sibling"),
        ("error", "features[8] (id 'V4')", "must be level 1"),
        ("error", "features[9]", "no 'properties'"),
        # V1 lost B11 and B12, V2 lost B22, V3 has no children: coverage warnings
        ("warning", "features[1] (id 'V1')", "no level-3 grids"),
        ("warning", "features[2] (id 'V2')", "covered by none"),
        ("warning", "features[7] (id 'V3')", "no level-3 grids"),
        ("warning", "features[8] (id 'V4')", "no level-3 grids"),
    }
    assert len(found) == len(problems)
    indexes = [-1 if p.index is None else p.index for p in problems]
    assert indexes == sorted(indexes)  # in file order
    with pytest.raises(ConfigError, match=r"and 6 more error\(s\)"):
        load_grids(path)


WORDS = (
    "'level'",
    "does not exist",
    "invalid polygon",
    "not inside its parent",
    "overlaps sibling",
    "must be level 1",
    "no 'properties'",
    "no level-3 grids",
    "covered by none",
)


def test_coverage_gap_is_a_warning_only(tmp_path: Path) -> None:
    fc = town()
    fc["features"] = [f for f in fc["features"] if f["properties"]["id"] != "B22"]
    gs = load_grids(write(tmp_path, fc))
    [warning] = gs.warnings
    assert warning.severity == "warning" and warning.grid_id == "V2"
    assert "50%" in warning.message
    assert gs.locate(*pt(3.0, 1.5)) is None  # in V2 but in no level-3 grid
    assert str(warning).startswith("warning: features[2] (id 'V2'): ")


def test_gridset_repr_and_len(tmp_path: Path) -> None:
    gs = load_grids(write(tmp_path, town()))
    assert len(gs) == 7 and "1 town(s)" in repr(gs)
    assert isinstance(gs, GridSet)


@pytest.mark.parametrize(
    "geometry, what",
    [
        ({"type": "Polygon"}, "has no 'coordinates'"),
        ({"type": "Polygon", "coordinates": 5}, "malformed Polygon coordinates"),
        ({"type": "Polygon", "coordinates": [[[1, 2], [3, 4]]]}, "malformed Polygon coordinates"),
        ({"type": "MultiPolygon", "coordinates": [[1]]}, "malformed MultiPolygon coordinates"),
        ({"type": "Polygon", "coordinates": []}, "is empty"),
        (None, "geometry is missing"),
    ],
)
def test_malformed_geometries_are_named(tmp_path: Path, geometry: Any, what: str) -> None:
    fc = town()
    by_id(fc, "B21")["geometry"] = geometry
    with pytest.raises(ConfigError, match=r"features\[5\] \(id 'B21'\): ") as err:
        load_grids(write(tmp_path, fc))
    assert what in str(err.value)
