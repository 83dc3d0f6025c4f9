"""dispatch.config and dispatch.durations: every documented rule and error message."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.config import (
    ROSTER_COLUMNS,
    Settings,
    load_categories,
    load_category_table,
    load_data,
    load_roster,
    load_settings,
    settings_from_dict,
)
from dispatch.durations import format_duration, parse_duration
from dispatch.engine.model import Category, Grid, ResponderInfo, Timing, Town
from dispatch.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "dispatch.toml"
SECRET = "s3cret-s3cret-s3cret"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def config_error(fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return str(info.value)


# ------------------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("3d", 259_200),
        ("1h30m", 5400),
        ("1d12h", 129_600),
        ("2m30s500ms", 150.5),
        ("1.5h", 5400),
        (" 90s ", 90),
        ("0s", 0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "  ", "90", "1h1h", "30m1h", "1 h", "1h 30m", "-5s", "+5s", "5x", "h", "5S", ".5s"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"500ms|largest first"):
        parse_duration(text)


def test_parse_duration_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="expected a string"):
        parse_duration(60)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (60, "1m"), (90, "1m30s"), (5400, "1h30m"), (86_400, "1d")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-1.0, float("inf"), float("nan")])
def test_format_duration_rejects(seconds: float) -> None:
    with pytest.raises(ValueError):
        format_duration(seconds)


@given(st.integers(min_value=0, max_value=10**12))
def test_duration_round_trip(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000, abs=1e-6)


# ------------------------------------------------------------------------------ settings


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, {})
    assert s.source is None and s.base_dir == tmp_path
    assert (s.server.host, s.server.port, s.server.max_message_bytes) == ("127.0.0.1", 8080, 65536)
    assert (s.server.rate, s.server.burst, s.server.queue_limit) == (20.0, 100, 4096)
    assert s.server.flood_close_after == 10 and s.server.position_flush == 0.25
    assert (s.server.hello_timeout, s.server.heartbeat, s.server.stats_interval) == (10, 20, 5)
    assert s.server.allowed_origins == ()
    assert s.auth.secret is None and s.auth.metrics_open is False and s.auth.default_ttl == 8 * 3600
    assert s.data.grids == tmp_path / "grids.geojson"
    assert s.data.roster == tmp_path / "roster.csv"
    assert s.data.categories == tmp_path / "categories.toml"
    assert s.store.url == "sqlite:///dispatch.db" and s.store.base_dir == tmp_path
    assert s.store.sqlite_path == tmp_path / "dispatch.db"
    assert s.timing == Timing(60.0, 120.0, 30.0) == s.dispatch.timing
    assert (s.log.level, s.log.format) == ("info", "auto")
    assert s.cluster.instance_id and (s.cluster.lease_ttl, s.cluster.renew) == (3, 0.75)


def test_static_dir_defaults_to_the_repo_static_folder() -> None:
    s = load_settings(None, {})
    if (REPO / "static").is_dir():
        assert s.server.static_dir == REPO / "static"


def test_settings_are_frozen() -> None:
    s = load_settings(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.port = 1  # type: ignore[misc]


def test_example_config_loads_and_documents_every_key() -> None:
    s = load_settings(EXAMPLE, {})
    assert s.source == EXAMPLE and s.base_dir == EXAMPLE.parent
    assert s.data.grids == EXAMPLE.parent / "demo" / "grids.geojson"
    text = EXAMPLE.read_text(encoding="utf-8")
    for section, values in s.describe().items():
        assert f"[{section}]" in text
        for key in values:
            assert re.search(rf"^#?\s*{key}\s*=", text, re.MULTILINE), f"[{section}] {key}"


def test_the_protocol_example_minus_its_placeholder_secret_loads(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "d.toml",
        '[server]\nhost = "127.0.0.1"\nport = 8080\n[auth]\nmetrics_open = false\n'
        '[data]\ngrids = "grids.geojson"\nroster = "roster.csv"\ncategories = "categories.toml"\n'
        '[store]\nurl = "sqlite:///dispatch.db"\n[dispatch]\noffer_timeout = "60s"\n'
        'position_stale_after = "120s"\noffline_after = "30s"\n',
    )
    assert load_settings(cfg, {}).data.roster == tmp_path / "roster.csv"


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = write(
        tmp_path / "etc" / "dispatch.toml",
        '[data]\ngrids = "town/grids.geojson"\nroster = "/srv/roster.csv"\n'
        '[store]\nurl = "sqlite:///var/log.db"\n[server]\nstatic_dir = "www"\n',
    )
    (tmp_path / "etc" / "www").mkdir()
    s = load_settings(Path("etc/dispatch.toml"), {})
    etc = tmp_path / "etc"
    assert s.base_dir == etc and s.store.base_dir == etc
    assert s.data.grids == etc / "town" / "grids.geojson"
    assert s.data.roster == Path("/srv/roster.csv")
    assert s.data.categories == etc / "categories.toml"  # defaults too
    assert s.server.static_dir == etc / "www"
    assert s.store.url == "sqlite:///var/log.db"  # kept as written
    assert s.store.sqlite_path == etc / "var" / "log.db"
    assert cfg.exists()


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = settings_from_dict({"data": {"grids": "~/g.geojson"}})
    assert s.data.grids == tmp_path / "g.geojson"


def test_environment_paths_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path / "etc" / "d.toml", "")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    s = load_settings(
        cfg, {"DISPATCH_DATA_ROSTER": "r.csv", "DISPATCH_STORE_URL": "sqlite:///x.db"}
    )
    assert s.data.roster == tmp_path / "run" / "r.csv"
    # the sqlite path too: a service whose config lives in /etc keeps its log where it runs
    assert s.store.sqlite_path == tmp_path / "run" / "x.db"
    s = load_settings(cfg, {"DISPATCH_STORE_URL": "sqlite:////abs/x.db"})
    assert s.store.sqlite_path == Path("/abs/x.db")


@pytest.mark.parametrize(
    ("url", "scheme", "path"),
    [
        ("sqlite:////var/lib/d.db", "sqlite", Path("/var/lib/d.db")),
        ("memory://", "memory", None),
        ("redis://127.0.0.1:6379/0", "redis", None),
        ("rediss://user:pw@redis.example:6380/1", "redis", None),
    ],
)
def test_store_urls(url: str, scheme: str, path: Path | None) -> None:
    s = load_settings(None, {"DISPATCH_STORE_URL": url})
    assert (s.store.url, s.store.scheme, s.store.sqlite_path) == (url, scheme, path)


def test_environment_overrides(tmp_path: Path) -> None:
    cfg = write(tmp_path / "d.toml", '[server]\nport = 8080\n[dispatch]\noffer_timeout = "60s"\n')
    env = {
        "DISPATCH_AUTH_SECRET": f"  {SECRET}\n",
        "DISPATCH_AUTH_METRICS_OPEN": "yes",
        "DISPATCH_SERVER_PORT": "9000",
        "DISPATCH_SERVER_RATE": "2.5",
        "DISPATCH_SERVER_ALLOWED_ORIGINS": "https://A.example, http://b.example:8080,",
        "DISPATCH_DISPATCH_OFFER_TIMEOUT": "1m30s",
        "DISPATCH_STORE_URL": "memory://",
        "DISPATCH_STATS_WEIGHTS": "fire=1, traffic=1",
        "DISPATCH_LOG_LEVEL": "DEBUG",
        "DISPATCH_CLUSTER_INSTANCE_ID": "node-a",
        "DISPATCH_CONFIG": "ignored: not a section",
        "DISPATCH_TEST_REDIS_URL": "ignored too",
        "PATH": "/usr/bin",
    }
    s = load_settings(cfg, env)
    assert s.auth.secret == SECRET and s.require_secret() == SECRET
    assert s.auth.metrics_open is True
    assert (s.server.port, s.server.rate) == (9000, 2.5)
    assert s.server.allowed_origins == ("https://a.example", "http://b.example:8080")
    assert s.dispatch.offer_timeout == 90 and s.timing.offer_timeout == 90
    assert s.store.scheme == "memory"
    assert dict(s.stats.weights) == {"fire": 1.0, "traffic": 1.0}
    assert s.log.level == "debug" and s.cluster.instance_id == "node-a"


@pytest.mark.parametrize(("text", "value"), [("true", True), ("0", False), ("Off", False)])
def test_environment_booleans(text: str, value: bool) -> None:
    assert load_settings(None, {"DISPATCH_AUTH_METRICS_OPEN": text}).auth.metrics_open is value


def test_empty_environment_values_unset_optional_keys(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "d.toml", f'[auth]\nsecret = "{SECRET}"\n[server]\nallowed_origins = ["*"]'
    )
    s = load_settings(cfg, {"DISPATCH_AUTH_SECRET": "", "DISPATCH_SERVER_ALLOWED_ORIGINS": ""})
    assert s.auth.secret is None and s.server.allowed_origins == ()


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_SERVER_PORT", "8123")
    assert load_settings(None).server.port == 8123


def test_secret_is_never_shown(tmp_path: Path) -> None:
    s = load_settings(None, {"DISPATCH_AUTH_SECRET": SECRET})
    assert SECRET not in repr(s)
    assert s.describe()["auth"]["secret"] == "***"
    cfg = write(tmp_path / "d.toml", '[auth]\nsecret = "change-me"\n')
    short = load_settings(cfg, {})
    assert short.weak_secret and "change-me" not in repr(short)
    assert not s.weak_secret


def test_require_secret_names_the_file_and_the_variable(tmp_path: Path) -> None:
    cfg = write(tmp_path / "d.toml", "")
    msg = config_error(load_settings(cfg, {}).require_secret)
    assert msg.startswith(f"{cfg}: [auth] secret is required") and "DISPATCH_AUTH_SECRET" in msg
    assert "no config file" in config_error(load_settings(None, {}).require_secret)


def test_describe_hides_store_passwords() -> None:
    s = load_settings(None, {"DISPATCH_STORE_URL": "redis://app:hunter2@r.example:6379/0"})
    assert s.describe()["store"]["url"] == "redis://app:***@r.example:6379/0"
    json.dumps(s.describe())


# Each row: the file's text, then what the message must contain after "<file>: ".
FILE_ERRORS = [
    ("[servr]\nport = 1\n", "unknown section '[servr]'; did you mean '[server]'?"),
    ("[server]\nprot = 1\n", "[server] unknown key 'prot'; did you mean 'port'?"),
    ("server = 1\n", "server must be a [server] table"),
    ('[server]\nport = "80"\n', '[server] port = "80": expected an integer, got a string'),
    ("[server]\nport = true\n", "[server] port = true: expected an integer, got a boolean"),
    ("[server]\nport = 70000\n", "[server] port = 70000: must be at most 65535"),
    ("[server]\nrate = 0\n", "[server] rate = 0: must be more than 0"),
    ('[server]\nrate = "fast"\n', '[server] rate = "fast": expected a number'),
    ("[server]\nburst = 0\n", "[server] burst = 0: must be at least 1"),
    ('[server]\nhost = ""\n', '[server] host = "": must not be empty'),
    ('[server]\nallowed_origins = "x"\n', '[server] allowed_origins = "x": expected a list'),
    (
        '[server]\nallowed_origins = ["https://a.example/app"]\n',
        "[server] allowed_origins = [\"https://a.example/app\"]: 'https://a.example/app' is not an",
    ),
    ('[server]\nstatic_dir = "nowhere"\n', '[server] static_dir = "'),
    (
        '[dispatch]\noffer_timeout = "6o s"\n',
        "[dispatch] offer_timeout = \"6o s\": '6o s' is not a duration; write a number and a unit",
    ),
    ("[dispatch]\noffer_timeout = 60\n", "[dispatch] offer_timeout = 60: a duration needs a unit"),
    ('[dispatch]\noffline_after = "0s"\n', '[dispatch] offline_after = "0s": must be more than 0s'),
    ("[auth]\nmetrics_open = 1\n", "[auth] metrics_open = 1: expected true or false"),
    ('[log]\nlevel = "loud"\n', '[log] level = "loud": must be one of debug, info,'),
    ('[log]\nformat = "xml"\n', '[log] format = "xml": must be one of auto, json, console'),
    ('[store]\nurl = "postgres://db"\n', '[store] url = "postgres://db": must be "sqlite:///'),
    ('[store]\nurl = "sqlite://rel.db"\n', '[store] url = "sqlite://rel.db": write "sqlite:///'),
    ('[store]\nurl = "sqlite:///:memory:"\n', 'for a throw-away store use "memory://"'),
    ('[store]\nurl = "redis:///0"\n', '[store] url = "redis:///0": a redis url needs a host'),
    ('[store]\nurl = "memory://x"\n', '[store] url = "memory://x": the in-memory store'),
    ('[cluster]\nrenew = "5s"\n', '[cluster] renew = "5s": must be below lease_ttl (3s, default)'),
    ('[cluster]\ninstance_id = "a b"\n', '[cluster] instance_id = "a b": must not contain spaces'),
    ("[stats]\nweights = { crime = 1.0 }\n", '[stats] weights = {"crime": 1.0}: unknown group'),
    (
        "[stats]\nweights = { fire = -1 }\n",
        '[stats] weights = {"fire": -1}: fire: must be at least 0',
    ),
    (
        "[stats]\nweights = { fire = 0 }\n",
        '[stats] weights = {"fire": 0.0}: at least one group needs a weight above 0',
    ),
    (
        "[stats]\nsaturation = { fire = 1.0 }\n",
        '[stats] saturation = {"fire": 1.0}: needs a value for public_security',
    ),
    ("[stats]\nsaturation = { fire = 0 }\n", "fire: must be more than 0"),
    ("[stats]\nred = 95\n", "[stats] red = 95.0: must be below orange (60, default)"),
    ("[stats]\nblue = 101\n", "[stats] blue = 101: must be at most 100"),
    ("[stats]\norange = 30\nred = 40\n", "[stats] orange = 30.0: must be above red (40, "),
]


@pytest.mark.parametrize(("text", "expected"), FILE_ERRORS)
def test_file_errors_name_the_file_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    cfg = write(tmp_path / "dispatch.toml", text)
    msg = config_error(load_settings, cfg, {})
    assert msg.startswith(f"{cfg}: "), msg
    assert expected in msg, msg


ENV_ERRORS = [
    ("DISPATCH_SERVER_PORT", "8o", '[server] port = "8o": expected an integer'),
    ("DISPATCH_SERVER_PROT", "1", "[server] unknown key 'prot'; did you mean 'port'?"),
    ("DISPATCH_SERVER_RATE", "fast", '[server] rate = "fast": expected a number'),
    ("DISPATCH_SERVER_RATE", "inf", "must be a finite number"),
    ("DISPATCH_AUTH_METRICS_OPEN", "maybe", "expected true or false"),
    ("DISPATCH_DISPATCH_OFFER_TIMEOUT", "1h1h", '[dispatch] offer_timeout = "1h1h"'),
    ("DISPATCH_STATS_WEIGHTS", "fire:1", 'write the table as "public_security=0.4'),
    ("DISPATCH_STATS_WEIGHTS", "fire=x", "fire: expected a number"),
    ("DISPATCH_STATS_RED", "80", "[stats] red = 80.0: must be below orange (60, default)"),
    ("DISPATCH_LOG_LEVEL", "", '[log] level = "": must not be empty'),
]


@pytest.mark.parametrize(("name", "value", "expected"), ENV_ERRORS)
def test_environment_errors_name_the_variable(name: str, value: str, expected: str) -> None:
    msg = config_error(load_settings, None, {name: value})
    assert msg.startswith(f"environment {name}: "), msg
    assert expected in msg, msg


def test_conflict_blames_the_key_given_last(tmp_path: Path) -> None:
    cfg = write(tmp_path / "d.toml", '[cluster]\nlease_ttl = "3s"\n')
    msg = config_error(load_settings, cfg, {"DISPATCH_CLUSTER_RENEW": "4s"})
    assert msg == (
        f'environment DISPATCH_CLUSTER_RENEW: [cluster] renew = "4s": '
        f"must be below lease_ttl (3s, {cfg})"
    )


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "d.toml", '[server]\nport = 80\nhost = "x\n')
    msg = config_error(load_settings, cfg, {})
    assert msg.startswith(f"{cfg}: invalid TOML:") and "line 3" in msg


def test_missing_file(tmp_path: Path) -> None:
    msg = config_error(load_settings, tmp_path / "nope.toml", {})
    assert msg.startswith(f"{tmp_path / 'nope.toml'}: cannot read the config file")


def test_settings_from_dict() -> None:
    s = settings_from_dict({"server": {"port": 0}, "store": {"url": "memory://"}})
    assert s.server.port == 0 and s.store.scheme == "memory"
    assert isinstance(s, Settings)


# ------------------------------------------------------------------------------ safety index


def test_safety_score_and_colour() -> None:
    stats = load_settings(None, {}).stats
    assert stats.score({}) == 100.0 and stats.colour(100.0) is None
    # public_security at half its saturation: 0.4 × 50 + 0.3 × 100 + 0.3 × 100 = 80
    assert stats.score({"public_security": 5.0}) == pytest.approx(80.0)
    assert stats.score({"fire": 99.0, "other": 99.0}) == pytest.approx(70.0)
    assert [stats.colour(x) for x in (95, 90, 80, 75, 60, 41, 40, 0)] == [
        None, "blue", "blue", "yellow", "orange", "orange", "red", "red",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ roster

GRIDS = {"T", "V1", "G1", "G2"}
HEADER = ",".join(ROSTER_COLUMNS)


def roster_file(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    return write(tmp_path / "roster.csv", "\n".join([header, *rows]) + "\n")


def test_roster(tmp_path: Path) -> None:
    path = write(
        tmp_path / "roster.csv",
        "\ufeffname,id,kind,home_grid,skills,department\r\n"
        '"Li, Wei",w1,grid_worker,G1,fire_hazard;dispute,\r\n'
        "\r\n"
        "Police unit 1,p1,department,V1,*,police\r\n"
        "Zhang San,v1,volunteer,G2, dispute ; ,\r\n",
    )
    roster = load_roster(path, GRIDS, categories={"fire_hazard", "dispute"})
    assert list(roster) == ["w1", "p1", "v1"]
    assert roster["w1"] == ResponderInfo(
        "w1", "Li, Wei", "grid_worker", "G1", frozenset({"fire_hazard", "dispute"}), None
    )
    assert roster["p1"].department == "police" and roster["p1"].can_handle("anything")
    assert roster["v1"].skills == frozenset({"dispute"})


ROSTER_ERRORS = [
    (("id,name,kind,home_grid,skills",), 1, "header: missing column department; expected id,"),
    ((HEADER + ",phone",), 1, "header: unknown column phone"),
    (("id,name,kind,home_grid,skills,id",), 1, "missing column department"),
    (("id,name,kind,home_grid,skills,department,id",), 1, "header: a column is repeated"),
    ((HEADER, "w1,A,grid_worker,G1,*"), 2, "has 5 fields, expected 6"),
    ((HEADER, "w1,Li, Wei,grid_worker,G1,*,"), 2, "has 7 fields, expected 6 (quote a value"),
    ((HEADER, " ,A,grid_worker,G1,*,"), 2, "id is empty"),
    ((HEADER, "w 1,A,grid_worker,G1,*,"), 2, 'id "w 1": must not contain spaces'),
    ((HEADER, "w1,A,grid_worker,G1,*,", "", "w1,B,grid_worker,G1,*,"), 4, "duplicate id (first on"),
    ((HEADER, "w1,,grid_worker,G1,*,"), 2, "name is empty"),
    ((HEADER, "w1,A,worker,G1,*,"), 2, 'kind "worker": unknown kind; use department, grid_worker,'),
    ((HEADER, "w1,A,grid_worker,G9,*,"), 2, 'home_grid "G9": no grid with this id'),
    ((HEADER, "w1,A,grid_worker,G1, ; ,"), 2, 'skills ";": is empty'),
    ((HEADER, "w1,A,grid_worker,G1,*;fire,"), 2, 'skills "*;fire": "*" already means every'),
    ((HEADER, "w1,A,grid_worker,G1,fire_hazrd,"), 2, "did you mean 'fire_hazard'?"),
    ((HEADER, "p1,A,department,V1,*,"), 2, "department is required when kind is department"),
    ((HEADER, "w1,A,grid_worker,G1,*,police"), 2, 'department "police": only kind=department rows'),
    ((HEADER, 'w1,"A,grid_worker,G1,*,'), 2, "has 2 fields, expected 6"),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "line", "expected"), ROSTER_ERRORS)
def test_roster_errors_name_the_file_and_line(
    tmp_path: Path, lines: tuple[str, ...], line: int, expected: str
) -> None:
    path = write(tmp_path / "roster.csv", "\n".join(lines) + "\n")
    msg = config_error(load_roster, path, GRIDS, categories={"fire_hazard"})
    assert msg.startswith(f"{path}:{line}: "), msg
    assert expected in msg, msg


def test_roster_without_categories_accepts_any_skill(tmp_path: Path) -> None:
    path = roster_file(tmp_path, "w1,A,grid_worker,G1,whatever,")
    assert load_roster(path, GRIDS)["w1"].skills == frozenset({"whatever"})


def test_roster_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "roster.csv", "\n")
    assert config_error(load_roster, path, GRIDS).startswith(f"{path}:1: empty file")


def test_roster_with_only_a_header_is_empty(tmp_path: Path) -> None:
    assert load_roster(roster_file(tmp_path), GRIDS) == {}


def test_roster_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "roster.csv", f"{HEADER}\nw1,网格员,grid_worker,G1,*,\n", "gbk")
    msg = config_error(load_roster, path, GRIDS)
    assert msg.startswith(f"{path}:2: not UTF-8 text"), msg


def test_roster_missing_file(tmp_path: Path) -> None:
    msg = config_error(load_roster, tmp_path / "r.csv", GRIDS)
    assert msg.startswith(f"{tmp_path / 'r.csv'}: cannot read the roster")


# ------------------------------------------------------------------------------ categories

FIRE = """
[categories.fire_hazard]
name = "Fire hazard"
name_zh = "消防隐患"
group = "fire"
priority = 1
limits = { "3" = "30m", "2" = "1h", "1" = "2h" }
"""
DISPUTE = """
[categories.dispute]
name = "Dispute"
group = "public_security"
priority = 3
verify = true
department = "mediation"
description = "Neighbour quarrels"
limits = { "3" = "2h", "2" = "24h", "1" = "3d" }
"""


def test_categories(tmp_path: Path) -> None:
    path = write(tmp_path / "categories.toml", FIRE + DISPUTE)
    categories, extras = load_category_table(path)
    assert list(categories) == ["fire_hazard", "dispute"]
    assert categories["fire_hazard"] == Category(
        "fire_hazard", "Fire hazard", "fire", 1, False, {3: 1800.0, 2: 3600.0, 1: 7200.0}
    )
    assert categories["dispute"].verify is True
    assert dict(categories["dispute"].limits) == {3: 7200.0, 2: 86_400.0, 1: 259_200.0}
    assert extras["fire_hazard"].name_zh == "消防隐患" and extras["fire_hazard"].department is None
    assert extras["dispute"].department == "mediation"
    assert extras["dispute"].description == "Neighbour quarrels"
    assert load_categories(path) == categories


def category(**changes: object) -> str:
    entry: dict[str, object] = {
        "name": '"Fire hazard"',
        "group": '"fire"',
        "priority": "1",
        "limits": '{ "3" = "30m", "2" = "1h", "1" = "2h" }',
    }
    entry.update(changes)
    body = "".join(f"{k} = {v}\n" for k, v in entry.items() if v is not None)
    return f"[categories.fire_hazard]\n{body}"


CATEGORY_ERRORS = [
    ('x = 1\n[categories.a]\nname = "A"', "unknown top-level key 'x'"),
    ("", "defines no categories"),
    ("[categories]\n", "defines no categories"),
    ('[categories."fire hazard"]\nname = "x"', "[categories.fire hazard]: a code is letters"),
    ("[categories]\nfire = 1", "[categories.fire]: must be a table"),
    (
        category(verfy="true"),
        "[categories.fire_hazard] unknown key 'verfy'; did you mean 'verify'?",
    ),
    (category(group=None), "[categories.fire_hazard] group: missing (required: name, group"),
    (category(name='""'), '[categories.fire_hazard] name = "": expected non-empty text'),
    (category(group='"crime"'), '[categories.fire_hazard] group = "crime": use fire, other'),
    (category(priority="0"), "[categories.fire_hazard] priority = 0: expected 1 (most urgent)"),
    (category(priority="5"), "priority = 5: expected 1"),
    (category(priority="true"), "priority = true: expected 1"),
    (category(priority='"1"'), 'priority = "1": expected 1'),
    (category(verify='"yes"'), '[categories.fire_hazard] verify = "yes": expected true or false'),
    (category(department="3"), "[categories.fire_hazard] department = 3: expected non-empty text"),
    (category(limits='"2h"'), '[categories.fire_hazard] limits: expected a table { "3" = "2h"'),
    (
        category(limits='{ "3" = "30m", "2" = "1h" }'),
        '[categories.fire_hazard] limits: missing level "1"',
    ),
    (
        category(limits='{ "3" = "30m", "2" = "1h", "1" = "2h", "0" = "1d" }'),
        "[categories.fire_hazard] limits: unknown level '0'",
    ),
    (
        category(limits='{ "3" = "30 min", "2" = "1h", "1" = "2h" }'),
        '[categories.fire_hazard] limits."3" = "30 min": \'30 min\' is not a duration',
    ),
    (
        category(limits='{ "3" = "30m", "2" = 60, "1" = "2h" }'),
        '[categories.fire_hazard] limits."2" = 60: a duration needs a unit',
    ),
    (
        category(limits='{ "3" = "30m", "2" = "1h", "1" = "0s" }'),
        '[categories.fire_hazard] limits."1" = "0s": must be more than 0s',
    ),
    ("[categories.a\n", "invalid TOML"),
]


@pytest.mark.parametrize(("text", "expected"), CATEGORY_ERRORS)
def test_category_errors_name_the_file_category_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path / "categories.toml", text)
    msg = config_error(load_categories, path)
    assert msg.startswith(f"{path}: "), msg
    assert expected in msg, msg


def test_categories_missing_file(tmp_path: Path) -> None:
    msg = config_error(load_categories, tmp_path / "c.toml")
    assert msg.startswith(f"{tmp_path / 'c.toml'}: cannot read the categories file")


# ------------------------------------------------------------------------------ load_data


class FakeGridSet:
    """Stands in for dispatch.geo.grids.GridSet: the grids and ``to_town``."""

    def __init__(self, grids: list[Grid]) -> None:
        self.grids = {g.id: g for g in grids}

    def to_town(
        self,
        town_id: str,
        categories: Mapping[str, Category],
        roster: Mapping[str, ResponderInfo],
    ) -> Town:
        mine = {gid: g for gid, g in self.grids.items() if gid.startswith(town_id)}
        return Town(town_id, mine, categories, roster)


TWO_TOWNS = [
    Grid("A", 1, None, "Town A"),
    Grid("A-V1", 2, "A", "Village 1"),
    Grid("A-V1-G1", 3, "A-V1", "Grid 1"),
    Grid("B", 1, None, "Town B"),
    Grid("B-V1", 2, "B", "Village 1"),
    Grid("B-V1-G1", 3, "B-V1", "Grid 1"),
]


def data_settings(tmp_path: Path, roster: str) -> Settings:
    write(tmp_path / "data" / "categories.toml", FIRE + DISPUTE)
    write(tmp_path / "data" / "roster.csv", f"{HEADER}\n{roster}")
    write(tmp_path / "data" / "grids.geojson", "{}")
    cfg = write(
        tmp_path / "dispatch.toml",
        '[data]\ngrids = "data/grids.geojson"\nroster = "data/roster.csv"\n'
        'categories = "data/categories.toml"\n',
    )
    return load_settings(cfg, {})


def test_load_data_builds_one_town_per_level1_grid(tmp_path: Path) -> None:
    settings = data_settings(
        tmp_path,
        "a1,A,grid_worker,A-V1-G1,fire_hazard,\nb1,B,grid_worker,B-V1-G1,*,\n"
        "b2,Police,department,B,dispute,police\n",
    )
    seen: list[Path] = []

    def loader(path: Path) -> FakeGridSet:
        seen.append(path)
        return FakeGridSet(TWO_TOWNS)

    data = load_data(settings, grid_loader=loader)
    assert seen == [tmp_path / "data" / "grids.geojson"]
    assert set(data.towns) == {"A", "B"}
    assert set(data.towns["A"].roster) == {"a1"} and set(data.towns["B"].roster) == {"b1", "b2"}
    assert set(data.towns["A"].categories) == {"fire_hazard", "dispute"}
    assert set(data.roster) == {"a1", "b1", "b2"}
    assert data.town_of["B-V1-G1"] == "B" and data.town_of["A"] == "A"
    assert data.category_extras["dispute"].department == "mediation"
    assert isinstance(data.gridset, FakeGridSet)


def test_load_data_roster_errors_name_the_roster(tmp_path: Path) -> None:
    settings = data_settings(tmp_path, "a1,A,grid_worker,C-V1-G1,*,\n")
    msg = config_error(load_data, settings, grid_loader=lambda p: FakeGridSet(TWO_TOWNS))
    assert msg.startswith(f"{settings.data.roster}:2: home_grid"), msg
    settings = data_settings(tmp_path, "a1,A,grid_worker,A-V1-G1,fire,\n")
    msg = config_error(load_data, settings, grid_loader=lambda p: FakeGridSet(TWO_TOWNS))
    assert (
        msg.startswith(f"{settings.data.roster}:2: skills") and "known: dispute, fire_hazard" in msg
    )


def test_load_data_category_errors_name_the_categories_file(tmp_path: Path) -> None:
    settings = data_settings(tmp_path, "")
    write(settings.data.categories, category(priority="9"))
    msg = config_error(load_data, settings, grid_loader=lambda p: FakeGridSet(TWO_TOWNS))
    assert msg.startswith(f"{settings.data.categories}: [categories.fire_hazard] priority")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ValueError("bad polygon"), ": cannot load: ValueError: bad polygon"),
        (FileNotFoundError(2, "No such file"), ": cannot load: FileNotFoundError"),
        (ConfigError("feature 3: parent 'X' is missing"), ": feature 3: parent 'X' is missing"),
    ],
)
def test_load_data_grid_failures_name_the_grids_file(
    tmp_path: Path, exc: Exception, expected: str
) -> None:
    settings = data_settings(tmp_path, "")

    def loader(path: Path) -> FakeGridSet:
        raise exc

    msg = config_error(load_data, settings, grid_loader=loader)
    assert msg.startswith(f"{settings.data.grids}{expected}"), msg


def test_load_data_keeps_grid_errors_that_already_name_the_file(tmp_path: Path) -> None:
    settings = data_settings(tmp_path, "")

    def loader(path: Path) -> FakeGridSet:
        raise ConfigError(f"{path}: feature 3: overlaps feature 4")

    msg = config_error(load_data, settings, grid_loader=loader)
    assert msg == f"{settings.data.grids}: feature 3: overlaps feature 4"


def test_load_data_to_town_failures_name_the_grids_file(tmp_path: Path) -> None:
    settings = data_settings(tmp_path, "")

    class Broken(FakeGridSet):
        def to_town(self, *args: object, **kw: object) -> Town:
            raise KeyError("A-V1")

    msg = config_error(load_data, settings, grid_loader=lambda p: Broken(TWO_TOWNS))
    assert msg.startswith(f"{settings.data.grids}: cannot load: KeyError"), msg


def test_load_data_needs_a_town(tmp_path: Path) -> None:
    settings = data_settings(tmp_path, "")
    msg = config_error(load_data, settings, grid_loader=lambda p: FakeGridSet([]))
    assert msg == f"{settings.data.grids}: no level-1 grid (town) defined"


def test_load_data_rejects_a_broken_hierarchy(tmp_path: Path) -> None:
    settings = data_settings(tmp_path, "")
    orphans = [Grid("V", 2, "X", "Village")]
    msg = config_error(load_data, settings, grid_loader=lambda p: FakeGridSet(orphans))
    assert msg == f"{settings.data.grids}: grid 'V': parent 'X' is invalid"
    rootless = [Grid("V", 2, None, "Village")]
    msg = config_error(load_data, settings, grid_loader=lambda p: FakeGridSet(rootless))
    assert msg == f"{settings.data.grids}: grid 'V': its top ancestor is not level 1"


def test_load_data_with_the_real_grid_loader(tmp_path: Path) -> None:
    pytest.importorskip("dispatch.geo.grids", reason="dispatch/geo/grids.py not written yet")

    def square(x0: float, x1: float) -> list[list[list[float]]]:
        return [[[x0, 22.60], [x1, 22.60], [x1, 22.62], [x0, 22.62], [x0, 22.60]]]

    def feature(gid: str, level: int, parent: str | None, ring: list[list[list[float]]]) -> object:
        return {
            "type": "Feature",
            "properties": {"id": gid, "level": level, "parent": parent, "name": gid},
            "geometry": {"type": "Polygon", "coordinates": ring},
        }

    collection = {
        "type": "FeatureCollection",
        "features": [
            feature("T", 1, None, square(113.18, 113.20)),
            feature("V1", 2, "T", square(113.18, 113.19)),
            feature("V2", 2, "T", square(113.19, 113.20)),
            feature("G1", 3, "V1", square(113.18, 113.19)),
            feature("G2", 3, "V2", square(113.19, 113.20)),
        ],
    }
    settings = data_settings(tmp_path, "w1,A,grid_worker,G1,*,\nw2,B,grid_worker,G2,*,\n")
    write(settings.data.grids, json.dumps(collection))
    data = load_data(settings)
    assert set(data.towns) == {"T"} and set(data.towns["T"].roster) == {"w1", "w2"}


def test_example_categories_if_generated() -> None:
    path = EXAMPLE.parent / "demo" / "categories.toml"
    if not path.exists():
        pytest.skip("config/demo/ is generated by the demo tooling")
    categories = load_categories(path)
    assert categories and tomllib.loads(path.read_text(encoding="utf-8"))
