"""The event log: the interface, its backends, and :func:`open_log` to pick one from a URL.

=====================================  =====================================================
``memory://``                          :class:`MemoryLog` — in memory, for tests and demos
``sqlite:///var/dispatch.db``          :class:`SqliteLog` — relative to ``base_dir``
``sqlite:////srv/dispatch/log.db``     :class:`SqliteLog` — absolute (four slashes)
``redis://host:6379/0``                :class:`RedisLog` — also ``rediss://`` and ``unix://``
``redis-cluster://host:6379``          :class:`RedisLog` on a Redis Cluster — also
                                       ``rediss-cluster://``; several seed nodes as
                                       ``redis-cluster://h1:p1,h2:p2``; database 0 only
=====================================  =====================================================

See :mod:`dispatch.log.base` for the contract every backend honours.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from dispatch.errors import ConfigError
from dispatch.log.base import EventLog, Record
from dispatch.log.memory import MemoryLog
from dispatch.log.redis import CLUSTER_SCHEMES, RedisLog
from dispatch.log.sqlite import SqliteLog

__all__ = ["EventLog", "MemoryLog", "Record", "RedisLog", "SqliteLog", "open_log"]

_EXPECTED = (
    "expected memory://, sqlite:///path/to/file.db, redis://host:port/db or "
    "redis-cluster://host:port"
)


def open_log(url: str, *, base_dir: Path | None = None) -> EventLog:
    """Create the backend named by ``url`` (the ``[store] url`` setting).

    A relative SQLite path is resolved against ``base_dir`` (the config file's folder; the current
    directory when None). Raises :class:`~dispatch.errors.ConfigError` for a URL it cannot use and
    :class:`~dispatch.errors.LogUnavailable` when a SQLite file cannot be opened. A Redis log
    connects on first use, so an unreachable server shows up then (and in ``ping()``).
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"[store] url {url!r}: not a URL; {_EXPECTED}")
    if scheme == "memory":
        if rest not in ("", "/"):
            raise ConfigError(f"[store] url {url!r}: memory:// takes no path")
        return MemoryLog()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ConfigError(
                f"[store] url {url!r}: expected sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (no host)"
            )
        path = Path(rest[1:])
        if not path.is_absolute():
            path = (base_dir if base_dir is not None else Path.cwd()) / path
        return SqliteLog(path)
    if scheme in ("redis", "rediss", "unix"):
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ConfigError(f"[store] url {url!r}: {exc}") from exc
        if scheme != "unix" and not parts.hostname:
            raise ConfigError(f"[store] url {url!r}: no host")
        try:
            return RedisLog.from_url(url)
        except ValueError as exc:
            raise ConfigError(f"[store] url {url!r}: {exc}") from exc
    if scheme in CLUSTER_SCHEMES:
        try:
            return RedisLog.from_url(url)
        except ValueError as exc:
            raise ConfigError(f"[store] url {url!r}: {exc}") from exc
    raise ConfigError(f"[store] url {url!r}: unknown scheme {scheme!r}; {_EXPECTED}")
