"""The one config loader: settings, roster, categories, and the towns built from them.

Read once at the edge (``dispatch serve``/``token``/``demo``), never by the engine, which gets
plain values (:class:`~dispatch.engine.model.Town`, :class:`~dispatch.engine.model.Timing`).

* :func:`load_settings` reads a TOML file (see ``config/dispatch.toml``, which documents every key),
  then applies environment overrides ``DISPATCH_<SECTION>_<KEY>`` (``DISPATCH_AUTH_SECRET``,
  ``DISPATCH_SERVER_PORT``, ``DISPATCH_STORE_URL`` …), and returns a frozen :class:`Settings`.
  Durations are stored as float seconds, paths as absolute :class:`~pathlib.Path`\\ s.
* :func:`load_roster` and :func:`load_categories` read ``roster.csv`` and ``categories.toml``.
* :func:`load_data` loads grids, categories and roster and builds one engine ``Town`` per
  level-1 grid.

Rules:

* Every problem raises :class:`~dispatch.errors.ConfigError` whose message starts with where it
  is — ``FILE: [section] key = value: problem``, ``environment DISPATCH_X: [section] key = …``,
  ``FILE:LINE: …`` for the roster, ``FILE: [categories.code] key …`` for categories — so a person
  can fix it. The secret is never echoed.
* Unknown sections and keys in the file are errors (with a "did you mean"). In the environment,
  ``DISPATCH_<SECTION>_<KEY>`` with a known section and an unknown key is an error; variables whose
  second word is not a section (``DISPATCH_CONFIG``, ``DISPATCH_TEST_…``) are ignored.
* Environment values are text: numbers and durations as in the file, booleans
  ``true/false/1/0/yes/no/on/off``, lists comma-separated, tables ``k=v,k=v``; an empty value
  unsets an optional key (``auth.secret``, ``server.static_dir``).
* Relative paths in the file are relative to the file's folder; relative paths from the
  environment are relative to the working directory. That holds for a relative sqlite path in
  ``[store] url`` (``sqlite:///dispatch.db``) too (:attr:`StoreSettings.base_dir`): a service
  whose config lives in ``/etc`` keeps its log in its working directory. ``~`` is
  expanded.
* ``[auth] secret`` may be absent when loading (tools that need no tokens); one shorter than 16
  characters is accepted with a warning (PROTOCOL.md's own example is ``change-me``).
  :meth:`Settings.require_secret` is what ``serve`` and ``token`` call.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib
import itertools
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Collection, Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, cast

from dispatch.durations import DURATION_HELP, format_duration, parse_duration
from dispatch.engine.model import (
    RESPONDER_KINDS,
    SAFETY_GROUPS,
    Category,
    ResponderInfo,
    ResponderKind,
    SafetyGroup,
    Timing,
    Town,
)
from dispatch.errors import ConfigError

__all__ = [
    "ROSTER_COLUMNS",
    "AuthSettings",
    "CategoryExtras",
    "ClusterSettings",
    "DataSettings",
    "DispatchSettings",
    "LogSettings",
    "ServerSettings",
    "Settings",
    "StatsSettings",
    "StoreSettings",
    "TownData",
    "format_duration",
    "load_categories",
    "load_category_table",
    "load_data",
    "load_roster",
    "load_settings",
    "parse_duration",
    "settings_from_dict",
]

_SPEC = "dispatch.config.spec"
MIN_SECRET_LENGTH = 16
_REPO_STATIC = Path(__file__).resolve().parent.parent / "static"


@dataclass(frozen=True, slots=True)
class _Spec:
    """How one config key is read: its kind, range and choices."""

    kind: str  # str | int | float | bool | duration | strs | path | weights
    optional: bool = False
    lo: float | None = None
    lo_open: bool = False  # value must be > lo rather than >= lo
    hi: float | None = None
    choices: tuple[str, ...] = ()
    secret: bool = False
    check: Callable[[Any], Any] | None = None  # extra validation / normalisation of one value


def _key(default: Any, kind: str, **kw: Any) -> Any:
    return field(default=default, metadata={_SPEC: _Spec(kind, **kw)})


def _dur(text: str, *, zero_ok: bool = False) -> Any:
    return _key(parse_duration(text), "duration", lo=0.0, lo_open=not zero_ok)


def _factory(factory: Callable[[], Any], kind: str, **kw: Any) -> Any:
    return field(default_factory=factory, metadata={_SPEC: _Spec(kind, **kw)})


class _Bad(Exception):
    """A value problem; the caller adds where it is."""


def _origin_ok(value: str) -> str:
    if value == "*":
        return value
    if not re.fullmatch(r"https?://[^/\s?#]+", value):
        raise _Bad(
            f"{value!r} is not an origin: write scheme://host[:port] with no path, "
            f'e.g. "https://screen.example.org", or "*" for any'
        )
    return value.lower()


def _instance_ok(value: str) -> str:
    if re.search(r"\s", value):
        raise _Bad("must not contain spaces")
    return value


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _default_static_dir() -> Path | None:
    for candidate in (Path(__file__).resolve().parent / "static", _REPO_STATIC):
        if candidate.is_dir():
            return candidate
    return None


# ---------------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """``[server]``: the listening socket and the per-connection limits of PROTOCOL.md."""

    host: str = _key("127.0.0.1", "str")
    port: int = _key(8080, "int", lo=0, hi=65535)
    max_message_bytes: int = _key(65536, "int", lo=256)
    rate: float = _key(20.0, "float", lo=0.0, lo_open=True)  # messages/s sustained
    burst: int = _key(100, "int", lo=1)
    flood_close_after: float = _dur("10s")
    allowed_origins: tuple[str, ...] = _key((), "strs", check=_origin_ok)
    queue_limit: int = _key(4096, "int", lo=1)
    position_flush: float = _dur("250ms")
    hello_timeout: float = _dur("10s")
    heartbeat: float = _dur("20s", zero_ok=True)  # 0 turns websocket pings off
    stats_interval: float = _dur("5s")
    static_dir: Path | None = field(
        default_factory=_default_static_dir, metadata={_SPEC: _Spec("path", optional=True)}
    )
    tiles: str = _key("", "str")  # optional local map tiles, e.g. "/tiles/{z}/{x}/{y}.png"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """``[auth]``: the JWT signing secret and who may read ``/metrics``."""

    secret: str | None = field(
        default=None, repr=False, metadata={_SPEC: _Spec("str", optional=True, secret=True)}
    )
    metrics_open: bool = _key(False, "bool")
    default_ttl: float = _dur("8h")


@dataclass(frozen=True, slots=True)
class DataSettings:
    """``[data]``: the town's static files (absolute paths once loaded)."""

    grids: Path = field(default=Path("grids.geojson"), metadata={_SPEC: _Spec("path")})
    roster: Path = field(default=Path("roster.csv"), metadata={_SPEC: _Spec("path")})
    categories: Path = field(default=Path("categories.toml"), metadata={_SPEC: _Spec("path")})


def _store_url_ok(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in (
        "sqlite", "redis", "rediss", "redis-cluster", "rediss-cluster", "memory"
    ):
        raise _Bad(
            'must be "sqlite:///path/to/file.db", "redis://host:port/db", "rediss://…", '
            '"redis-cluster://host:port[,host:port…]" or "memory://"'
        )
    if scheme == "sqlite" and (not rest.startswith("/") or rest in ("/", "/:memory:")):
        raise _Bad(
            'write "sqlite:///relative/file.db" or "sqlite:////absolute/file.db" '
            '(for a throw-away store use "memory://")'
        )
    if scheme == "memory" and rest:
        raise _Bad('the in-memory store is written "memory://" with nothing after it')
    if scheme.startswith("redis") and not rest.split("/")[0]:
        raise _Bad('a redis url needs a host: "redis://127.0.0.1:6379/0"')
    return url


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """``[store]``: where the event log lives.

    ``url`` is kept as written; ``base_dir`` is the config file's folder (the working directory
    without a file), which a relative sqlite path is relative to — see :attr:`sqlite_path`.
    """

    url: str = _key("sqlite:///dispatch.db", "str", check=_store_url_ok)
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def scheme(self) -> str:
        """``"sqlite"``, ``"redis"`` (also for ``rediss://`` and Redis Cluster urls) or
        ``"memory"``."""
        scheme = self.url.partition("://")[0]
        return "redis" if scheme.startswith("redis") else scheme

    @property
    def sqlite_path(self) -> Path | None:
        """The absolute database file for a sqlite url, else ``None``."""
        if self.scheme != "sqlite":
            return None
        p = Path(self.url[len("sqlite:///") :]).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """``[dispatch]``: the dispatch clocks; the engine gets them as :attr:`timing`."""

    offer_timeout: float = _dur("60s")
    position_stale_after: float = _dur("120s")
    offline_after: float = _dur("30s")

    @property
    def timing(self) -> Timing:
        return Timing(
            offer_timeout=self.offer_timeout,
            position_stale_after=self.position_stale_after,
            offline_after=self.offline_after,
        )


_DEFAULT_WEIGHTS = {"public_security": 0.4, "fire": 0.3, "traffic": 0.3, "other": 0.0}
_DEFAULT_SATURATION = {"public_security": 10.0, "fire": 3.0, "traffic": 10.0, "other": 20.0}


@dataclass(frozen=True, slots=True)
class StatsSettings:
    """``[stats]``: the safety index (平安指数), version 1 of the formula.

    For a grid with ``population`` P > 0, over the last ``window``, each safety group k
    (public_security, fire, traffic, other) has a rate ``r_k`` = incidents of that group reported
    in the grid (or below it) ÷ P × 10 000. Its sub-score is ``100 × max(0, 1 − r_k /
    saturation[k])`` and the score is the ``weights``-weighted mean of the sub-scores (0–100,
    higher is safer; see :meth:`score`). The warning colour (:meth:`colour`) is the most severe
    of red ≤ ``red``, orange ≤ ``orange``, yellow ≤ ``yellow``, blue ≤ ``blue``; above ``blue``
    there is no warning. Grids without a population have no index.
    """

    window: float = _dur("24h")
    timezone_offset_hours: float = _key(8.0, "float", lo=-14.0, hi=14.0)
    weights: Mapping[str, float] = _factory(
        lambda: MappingProxyType(dict(_DEFAULT_WEIGHTS)), "weights", lo=0.0
    )
    saturation: Mapping[str, float] = _factory(
        lambda: MappingProxyType(dict(_DEFAULT_SATURATION)), "weights", lo=0.0, lo_open=True
    )
    blue: float = _key(90.0, "float", lo=0.0, hi=100.0)
    yellow: float = _key(75.0, "float", lo=0.0, hi=100.0)
    orange: float = _key(60.0, "float", lo=0.0, hi=100.0)
    red: float = _key(40.0, "float", lo=0.0, hi=100.0)

    def score(self, rates: Mapping[str, float]) -> float:
        """The composite score for ``rates`` (alerts per 10 000 residents per window, by group)."""
        total = sum(self.weights.values())
        acc = 0.0
        for group, weight in self.weights.items():
            if weight:
                ratio = rates.get(group, 0.0) / self.saturation[group]
                acc += weight * 100.0 * max(0.0, 1.0 - ratio)
        return acc / total

    def colour(self, score: float) -> str | None:
        """``"red"``, ``"orange"``, ``"yellow"``, ``"blue"`` or ``None`` (no warning)."""
        for name, cut in (("red", self.red), ("orange", self.orange), ("yellow", self.yellow)):
            if score <= cut:
                return name
        return "blue" if score <= self.blue else None


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``: ``format = "auto"`` means console on a terminal, JSON otherwise."""

    level: str = _key("info", "str", choices=("debug", "info", "warning", "error", "critical"))
    format: str = _key("auto", "str", choices=("auto", "json", "console"))


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """``[cluster]``: this process's name and its town-writer lease clocks."""

    instance_id: str = _factory(_default_instance_id, "str", check=_instance_ok)
    lease_ttl: float = _dur("3s")
    renew: float = _dur("750ms")


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "auth": AuthSettings,
    "data": DataSettings,
    "store": StoreSettings,
    "dispatch": DispatchSettings,
    "stats": StatsSettings,
    "log": LogSettings,
    "cluster": ClusterSettings,
}


def _keys(section: str) -> dict[str, _Spec]:
    return {
        f.name: f.metadata[_SPEC]
        for f in dataclasses.fields(_SECTIONS[section])
        if _SPEC in f.metadata
    }


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything read from the config file and the environment. Frozen; build it once."""

    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    data: DataSettings = field(default_factory=DataSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    stats: StatsSettings = field(default_factory=StatsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    source: Path | None = None  # the config file, if any
    base_dir: Path = field(default_factory=Path.cwd)  # its folder (else the working directory)

    @property
    def timing(self) -> Timing:
        return self.dispatch.timing

    def require_secret(self) -> str:
        """The JWT secret, or :class:`ConfigError` when none is configured."""
        if self.auth.secret is None:
            where = str(self.source) if self.source else "no config file"
            raise ConfigError(
                f"{where}: [auth] secret is required: set it in the config file or in "
                f"DISPATCH_AUTH_SECRET (at least {MIN_SECRET_LENGTH} characters, e.g. from "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        return self.auth.secret

    @property
    def weak_secret(self) -> bool:
        """A secret shorter than 16 characters works but is logged as a warning at start-up:
        anyone who guesses it can mint admin tokens."""
        return self.auth.secret is not None and len(self.auth.secret) < MIN_SECRET_LENGTH

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every key as JSON-friendly text for logs and ``--print-config``; secrets hidden."""
        out: dict[str, dict[str, Any]] = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            values: dict[str, Any] = {}
            for key, spec in _keys(name).items():
                values[key] = _describe(spec, getattr(section, key))
            out[name] = values
        url = self.store.url
        out["store"]["url"] = re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)
        return out


def _describe(spec: _Spec, value: Any) -> Any:
    if value is None:
        return None
    if spec.secret:
        return "***"
    if spec.kind == "duration":
        return format_duration(value)
    if spec.kind == "path":
        return str(value)
    if spec.kind == "strs":
        return list(value)
    if spec.kind == "weights":
        return dict(value)
    return value


# ---------------------------------------------------------------------------------- loading


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)  # fmt: skip


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(spec: _Spec, value: Any, *, from_env: bool, base: Path) -> Any:
    """The typed value of one key, or :class:`_Bad`."""
    if from_env:
        value = value.strip()
        if value == "" and (spec.optional or spec.kind == "strs"):
            return None if spec.optional else ()
    elif spec.optional and value == "":
        return None
    kind = spec.kind
    out: Any
    if kind == "str" or kind == "path":
        if not isinstance(value, str):
            raise _Bad(f"expected a string, got {_tname(value)}")
        out = value.strip()
        if not out:
            raise _Bad("must not be empty")
        if spec.choices:
            out = out.lower()
            if out not in spec.choices:
                raise _Bad("must be one of " + ", ".join(spec.choices))
        if kind == "path":
            path = Path(out).expanduser()
            out = path if path.is_absolute() else base / path
    elif kind == "int":
        if from_env:
            if not re.fullmatch(r"[+-]?\d+", value):
                raise _Bad("expected an integer")
            value = int(value)
        elif not isinstance(value, int) or isinstance(value, bool):
            raise _Bad(f"expected an integer, got {_tname(value)}")
        out = value
    elif kind == "float":
        out = _number(value, from_env)
    elif kind == "bool":
        if from_env:
            low = value.lower()
            if low not in _TRUE | _FALSE:
                raise _Bad("expected true or false")
            value = low in _TRUE
        elif not isinstance(value, bool):
            raise _Bad(f"expected true or false, got {_tname(value)}")
        out = value
    elif kind == "duration":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise _Bad(f"a duration needs a unit: {DURATION_HELP}")
        if not isinstance(value, str):
            raise _Bad(f"expected a duration string, got {_tname(value)}; {DURATION_HELP}")
        try:
            out = parse_duration(value)
        except ValueError as exc:
            raise _Bad(str(exc)) from None
    elif kind == "strs":
        if from_env:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Bad("expected a list of strings")
        out = tuple(spec.check(v) if spec.check else v for v in value)
        return out
    else:  # weights: a table of safety group -> number
        if from_env:
            table: dict[str, Any] = {}
            for part in filter(None, (p.strip() for p in value.split(","))):
                k, sep, v = part.partition("=")
                if not sep:
                    raise _Bad('write the table as "public_security=0.4,fire=0.3,…"')
                table[k.strip()] = v.strip()
            value = table
        if not isinstance(value, dict):
            raise _Bad(f"expected a table of group = number, got {_tname(value)}")
        weights: dict[str, float] = {}
        for group, number in value.items():
            if group not in SAFETY_GROUPS:
                raise _Bad(
                    f"unknown group {group!r}; groups are " + ", ".join(sorted(SAFETY_GROUPS))
                )
            try:
                weights[group] = _ranged(spec, _number(number, from_env))
            except _Bad as exc:
                raise _Bad(f"{group}: {exc}") from None
        return MappingProxyType(weights)
    out = _ranged(spec, out) if kind in ("int", "float", "duration") else out
    return spec.check(out) if spec.check else out


def _number(value: Any, from_env: bool) -> float:
    if from_env and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _Bad("expected a number") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Bad(f"expected a number, got {_tname(value)}")
    if not math.isfinite(value):
        raise _Bad("must be a finite number")
    return float(value)


def _ranged(spec: _Spec, value: Any) -> Any:
    def shown(limit: float) -> str:
        return format_duration(limit) if spec.kind == "duration" else f"{limit:g}"

    if spec.lo is not None:
        if spec.lo_open and value <= spec.lo:
            raise _Bad(f"must be more than {shown(spec.lo)}")
        if value < spec.lo:
            raise _Bad(f"must be at least {shown(spec.lo)}")
    if spec.hi is not None and value > spec.hi:
        raise _Bad(f"must be at most {shown(spec.hi)}")
    return value


def _unknown(what: str, name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {what} {name!r}; {hint}known: {', '.join(known)}"


def load_settings(path: Path | str | None, env: Mapping[str, str] = os.environ) -> Settings:
    """Read ``path`` (TOML) and then ``env`` overrides into :class:`Settings`.

    With ``path`` ``None``: defaults and the environment only, relative to the working directory.
    Raises :class:`ConfigError` naming the file (or variable), the key and the bad value.
    """
    if path is None:
        return settings_from_dict({}, env=env)
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return settings_from_dict(raw, env=env, source=path)


def settings_from_dict(
    raw: Mapping[str, Any], *, env: Mapping[str, str] | None = None, source: Path | None = None
) -> Settings:
    """:class:`Settings` from an already parsed TOML document (tests build them this way).

    ``source`` is the file it came from (relative paths are relative to its folder; without it,
    to the working directory). ``env`` defaults to none, unlike :func:`load_settings`.
    """
    base = source.absolute().parent if source is not None else Path.cwd()
    cwd = Path.cwd()
    label = str(source) if source is not None else "<settings>"
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    origin: dict[tuple[str, str], str] = {}

    def fail(where: str, section: str, key: str, value: Any, problem: str) -> ConfigError:
        shown = "<hidden>" if _keys(section)[key].secret else _show(value)
        return ConfigError(f"{where}: [{section}] {key} = {shown}: {problem}")

    for section, table in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{label}: " + _unknown("section", f"[{section}]", _bracketed()))
        if not isinstance(table, dict):
            raise ConfigError(f"{label}: {section} must be a [{section}] table")
        specs = _keys(section)
        for key, value in table.items():
            if key not in specs:
                raise ConfigError(f"{label}: [{section}] " + _unknown("key", key, specs))
            try:
                values[section][key] = _convert(specs[key], value, from_env=False, base=base)
            except _Bad as exc:
                raise fail(label, section, key, value, str(exc)) from None
            origin[section, key] = label

    store_base = base
    for name, text in sorted((env or {}).items()):
        if not name.startswith("DISPATCH_"):
            continue
        section, _, key = name[len("DISPATCH_") :].partition("_")
        section, key = section.lower(), key.lower()
        if section not in _SECTIONS:
            continue  # DISPATCH_CONFIG and friends belong to other tools
        where = f"environment {name}"
        specs = _keys(section)
        if key not in specs:
            raise ConfigError(f"{where}: [{section}] " + _unknown("key", key, specs))
        try:
            values[section][key] = _convert(specs[key], text, from_env=True, base=cwd)
        except _Bad as exc:
            raise fail(where, section, key, text, str(exc)) from None
        origin[section, key] = where
        if (section, key) == ("store", "url"):
            store_base = cwd  # a relative sqlite path from the environment, like every path

    # Defaults that are relative paths are relative to the config file's folder.
    for key in _keys("data"):
        if key not in values["data"]:
            default = getattr(DataSettings(), key)
            values["data"][key] = default if default.is_absolute() else base / default
    sections = {name: cls(**values[name]) for name, cls in _SECTIONS.items() if name != "store"}
    sections["store"] = StoreSettings(**values["store"], base_dir=store_base)

    def source_of(section: str, key: str) -> str:
        return origin.get((section, key), "default")

    for section, key, problem in _cross_check(sections, source_of):
        value = getattr(sections[section], key)
        where = origin.get((section, key), f"{label} (default)")
        raise fail(where, section, key, _describe(_keys(section)[key], value), problem)
    return Settings(**sections, source=source, base_dir=base)


def _bracketed() -> list[str]:
    return [f"[{s}]" for s in _SECTIONS]


def _cross_check(
    s: Mapping[str, Any], source_of: Callable[[str, str], str]
) -> list[tuple[str, str, str]]:
    """Rules between keys: ``(section, key to blame, problem)``.

    Of two keys in conflict, the one given last (environment over file over default) is blamed,
    and the message names the other and where it came from.
    """
    problems: list[tuple[str, str, str]] = []

    def rank(section: str, key: str) -> int:
        where = source_of(section, key)
        return 2 if where.startswith("environment") else 0 if where == "default" else 1

    def order(section: str, low: str, high: str, shown: Callable[[float], str]) -> None:
        lo_value, hi_value = getattr(s[section], low), getattr(s[section], high)
        if lo_value < hi_value:
            return
        if rank(section, low) > rank(section, high):
            other, value = high, shown(hi_value)
            problems.append(
                (section, low, f"must be below {other} ({value}, {source_of(section, other)})")
            )
        else:
            other, value = low, shown(lo_value)
            problems.append(
                (section, high, f"must be above {other} ({value}, {source_of(section, other)})")
            )

    order("cluster", "renew", "lease_ttl", format_duration)
    stats: StatsSettings = s["stats"]
    if not any(stats.weights.values()):
        problems.append(("stats", "weights", "at least one group needs a weight above 0"))
    for group, weight in stats.weights.items():
        if weight and group not in stats.saturation:
            problems.append(
                ("stats", "saturation", f"needs a value for {group} (weighted {weight:g})")
            )
    for low, high in itertools.pairwise(("red", "orange", "yellow", "blue")):
        order("stats", low, high, lambda v: f"{v:g}")
    static_dir: Path | None = s["server"].static_dir
    if static_dir is not None and not static_dir.is_dir():
        problems.append(("server", "static_dir", "is not a directory"))
    return problems


# ---------------------------------------------------------------------------------- roster

ROSTER_COLUMNS = ("id", "name", "kind", "home_grid", "skills", "department")


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f'{path}:{line}: not UTF-8 text (save the {what} as UTF-8, e.g. "CSV UTF-8")'
        ) from exc


def load_roster(
    path: Path | str, grid_ids: Container[str], *, categories: Collection[str] | None = None
) -> dict[str, ResponderInfo]:
    """Responders from ``roster.csv``, in file order.

    Rules (each broken one is a :class:`ConfigError` ``FILE:LINE: problem``): UTF-8 (a BOM is
    fine); the header names exactly the columns of :data:`ROSTER_COLUMNS` (any order); blank lines
    are skipped; every row has six fields; ``id`` is non-empty, has no spaces and is unique;
    ``name`` is non-empty; ``kind`` is ``grid_worker``, ``department`` or ``volunteer``;
    ``home_grid`` is in ``grid_ids``; ``skills`` is ``*`` alone or ``;``-separated category codes
    (with ``categories`` given, each must be one of them) and not empty; ``department`` is required
    when ``kind = department`` and must be empty otherwise.
    """
    path = Path(path)
    reader = csv.reader(_read_text(path, "roster").splitlines(keepends=True))
    header: list[str] | None = None
    roster: dict[str, ResponderInfo] = {}
    first_line: dict[str, int] = {}
    known = set(categories) if categories is not None else None
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ConfigError(f"{path}:{line}: {exc}") from exc
        if not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if header is None:
            missing = [c for c in ROSTER_COLUMNS if c not in cells]
            extra = [c for c in cells if c not in ROSTER_COLUMNS]
            if missing or extra or len(cells) != len(ROSTER_COLUMNS):
                problem = (
                    f"missing column {', '.join(missing)}" if missing
                    else f"unknown column {', '.join(extra)}" if extra
                    else "a column is repeated"
                )  # fmt: skip
                raise ConfigError(
                    f"{path}:{line}: header: {problem}; expected {','.join(ROSTER_COLUMNS)}"
                )
            header = cells
            continue
        if len(cells) != len(header):
            raise ConfigError(
                f"{path}:{line}: has {len(cells)} fields, expected {len(header)} "
                "(quote a value that contains a comma)"
            )
        rec = dict(zip(header, cells, strict=True))

        def bad(
            column: str, problem: str, line: int = line, rec: dict[str, str] = rec
        ) -> ConfigError:
            return ConfigError(f"{path}:{line}: {column} {_show(rec[column])}: {problem}")

        rid = rec["id"]
        if not rid:
            raise ConfigError(f"{path}:{line}: id is empty")
        if re.search(r"\s", rid):
            raise bad("id", "must not contain spaces")
        if rid in roster:
            raise bad("id", f"duplicate id (first on line {first_line[rid]})")
        if not rec["name"]:
            raise ConfigError(f"{path}:{line}: name is empty")
        kind = rec["kind"]
        if kind not in RESPONDER_KINDS:
            raise bad("kind", "unknown kind; use " + ", ".join(sorted(RESPONDER_KINDS)))
        if rec["home_grid"] not in grid_ids:
            raise bad("home_grid", "no grid with this id in the grids file")
        skills = frozenset(s.strip() for s in rec["skills"].split(";") if s.strip())
        if not skills:
            raise bad("skills", 'is empty; list category codes separated by ";" or write "*"')
        if "*" in skills and len(skills) > 1:
            raise bad("skills", '"*" already means every category; write it alone')
        if known is not None:
            for skill in sorted(skills - {"*"}):
                if skill not in known:
                    raise bad("skills", _unknown("category", skill, sorted(known)))
        department = rec["department"] or None
        if kind == "department" and department is None:
            raise ConfigError(f"{path}:{line}: department is required when kind is department")
        if kind != "department" and department is not None:
            raise bad("department", f"only kind=department rows have a department, not {kind}")
        roster[rid] = ResponderInfo(
            id=rid,
            name=rec["name"],
            kind=cast(ResponderKind, kind),  # checked against RESPONDER_KINDS
            home_grid=rec["home_grid"],
            skills=skills,
            department=department,
        )
        first_line[rid] = line
    if header is None:
        raise ConfigError(f"{path}:1: empty file; expected the header {','.join(ROSTER_COLUMNS)}")
    return roster


# ---------------------------------------------------------------------------------- categories


@dataclass(frozen=True, slots=True)
class CategoryExtras:
    """What ``categories.toml`` says about a category beyond :class:`Category`."""

    code: str
    department: str | None = None  # the default transfer target
    name_zh: str | None = None
    description: str | None = None


_CATEGORY_REQUIRED = ("name", "group", "priority", "limits")
_CATEGORY_OPTIONAL = ("verify", "department", "name_zh", "description")
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def load_category_table(
    path: Path | str,
) -> tuple[dict[str, Category], dict[str, CategoryExtras]]:
    """Categories and their extras from ``categories.toml``, in file order.

    Each ``[categories.<code>]`` (code: letters, digits, ``_ . -``) has ``name`` (text), ``group``
    (public_security, fire, traffic, other), ``priority`` (1 most urgent … 4), ``limits`` (a
    duration for each of the levels "3", "2" and "1"), and optionally ``verify`` (default false),
    ``department`` (default transfer target), ``name_zh`` and ``description``. Nothing else.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(_read_text(path, "categories file"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    extra_top = [k for k in raw if k != "categories"]
    if extra_top:
        raise ConfigError(
            f"{path}: unknown top-level key {extra_top[0]!r}; only [categories.<code>]"
        )
    table = raw.get("categories")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: defines no categories; add [categories.<code>] tables")
    categories: dict[str, Category] = {}
    extras: dict[str, CategoryExtras] = {}
    for code, entry in table.items():
        where = f"{path}: [categories.{code}]"
        if not _CODE.fullmatch(code):
            raise ConfigError(f"{where}: a code is letters, digits, '_', '.' or '-'")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in entry:
            if key not in _CATEGORY_REQUIRED + _CATEGORY_OPTIONAL:
                raise ConfigError(
                    f"{where} " + _unknown("key", key, _CATEGORY_REQUIRED + _CATEGORY_OPTIONAL)
                )
        for key in _CATEGORY_REQUIRED:
            if key not in entry:
                raise ConfigError(
                    f"{where} {key}: missing (required: {', '.join(_CATEGORY_REQUIRED)})"
                )

        def text(key: str, entry: dict[str, Any] = entry, where: str = where) -> str | None:
            value = entry.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where} {key} = {_show(value)}: expected non-empty text")
            return value.strip()

        name = text("name")
        assert name is not None
        group = entry["group"]
        if group not in SAFETY_GROUPS:
            raise ConfigError(
                f"{where} group = {_show(group)}: use " + ", ".join(sorted(SAFETY_GROUPS))
            )
        priority = entry["priority"]
        if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= 4:
            raise ConfigError(f"{where} priority = {_show(priority)}: expected 1 (most urgent) … 4")
        verify = entry.get("verify", False)
        if not isinstance(verify, bool):
            raise ConfigError(f"{where} verify = {_show(verify)}: expected true or false")
        categories[code] = Category(
            code=code,
            name=name,
            group=cast(SafetyGroup, group),  # checked against SAFETY_GROUPS
            priority=priority,
            verify=verify,
            limits=MappingProxyType(_limits(entry["limits"], where)),
        )
        extras[code] = CategoryExtras(
            code=code,
            department=text("department"),
            name_zh=text("name_zh"),
            description=text("description"),
        )
    return categories, extras


def _limits(value: Any, where: str) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ConfigError(
            f'{where} limits: expected a table {{ "3" = "2h", "2" = "24h", "1" = "72h" }}'
        )
    for level in value:
        if level not in ("3", "2", "1"):
            raise ConfigError(f'{where} limits: unknown level {level!r}; levels are "3", "2", "1"')
    out: dict[int, float] = {}
    for level in ("3", "2", "1"):
        if level not in value:
            raise ConfigError(
                f'{where} limits: missing level "{level}" (all of "3", "2", "1" are required)'
            )
        text = value[level]
        try:
            if not isinstance(text, str):
                raise ValueError(f"a duration needs a unit: {DURATION_HELP}")
            seconds = parse_duration(text)
        except ValueError as exc:
            raise ConfigError(f'{where} limits."{level}" = {_show(text)}: {exc}') from None
        if seconds <= 0:
            raise ConfigError(f'{where} limits."{level}" = {_show(text)}: must be more than 0s')
        out[int(level)] = seconds
    return out


def load_categories(path: Path | str) -> dict[str, Category]:
    """The categories of ``categories.toml`` (see :func:`load_category_table`)."""
    return load_category_table(path)[0]


# ---------------------------------------------------------------------------------- towns


class _GridLike(Protocol):
    @property
    def level(self) -> int: ...
    @property
    def parent(self) -> str | None: ...


class GridSetLike(Protocol):
    """What :func:`load_data` needs of ``dispatch.geo.grids.GridSet``."""

    @property
    def grids(self) -> Mapping[str, _GridLike]: ...

    def to_town(
        self,
        town_id: str,
        categories: Mapping[str, Category],
        roster: Mapping[str, ResponderInfo],
    ) -> Town: ...


@dataclass(frozen=True, slots=True)
class TownData:
    """The static data of a deployment: grids, categories, roster, one engine ``Town`` each."""

    gridset: Any  # dispatch.geo.grids.GridSet
    categories: Mapping[str, Category]
    category_extras: Mapping[str, CategoryExtras]
    roster: Mapping[str, ResponderInfo]
    towns: Mapping[str, Town]
    town_of: Mapping[str, str]  # grid id -> id of its level-1 grid


def _default_grid_loader(path: Path) -> GridSetLike:
    module = importlib.import_module("dispatch.geo.grids")
    gridset: GridSetLike = module.load_grids(path)
    return gridset


def load_data(
    settings: Settings, *, grid_loader: Callable[[Path], GridSetLike] | None = None
) -> TownData:
    """Load ``[data]`` files and build one ``Town`` per level-1 grid.

    A responder belongs to the town of its home grid. ``grid_loader`` defaults to
    ``dispatch.geo.grids.load_grids``. Any failure is a :class:`ConfigError` naming the file.
    """
    paths = settings.data
    loader = grid_loader or _default_grid_loader
    with _naming(paths.grids):
        gridset = loader(paths.grids)
        grids = gridset.grids
    categories, extras = load_category_table(paths.categories)
    roster = load_roster(paths.roster, grids, categories=categories)

    town_of: dict[str, str] = {}
    for gid in grids:
        chain = [gid]
        while (parent := grids[chain[-1]].parent) is not None:
            if parent not in grids or parent in chain:
                raise ConfigError(
                    f"{paths.grids}: grid {chain[-1]!r}: parent {parent!r} is invalid"
                )
            chain.append(parent)
        if grids[chain[-1]].level != 1:
            raise ConfigError(f"{paths.grids}: grid {gid!r}: its top ancestor is not level 1")
        town_of[gid] = chain[-1]
    towns: dict[str, Town] = {}
    for tid in (g for g, grid in grids.items() if grid.level == 1):
        members = {rid: r for rid, r in roster.items() if town_of[r.home_grid] == tid}
        with _naming(paths.grids):
            towns[tid] = gridset.to_town(tid, categories, members)
    if not towns:
        raise ConfigError(f"{paths.grids}: no level-1 grid (town) defined")
    return TownData(
        gridset=gridset,
        categories=MappingProxyType(categories),
        category_extras=MappingProxyType(extras),
        roster=MappingProxyType(roster),
        towns=MappingProxyType(towns),
        town_of=MappingProxyType(town_of),
    )


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    # A start-up boundary: whatever goes wrong reading a data file, the operator needs its name.
    try:
        yield
    except ConfigError as exc:
        if str(path) in str(exc):
            raise
        raise ConfigError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{path}: cannot load: {type(exc).__name__}: {exc}") from exc
