"""``open_log``: the ``[store] url`` setting to a backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.errors import ConfigError
from dispatch.log import MemoryLog, Record, RedisLog, SqliteLog, open_log


async def test_memory() -> None:
    log = open_log("memory://")
    assert isinstance(log, MemoryLog)
    await log.close()


async def test_sqlite_relative_to_base_dir(tmp_path: Path) -> None:
    log = open_log("sqlite:///var/dispatch.db", base_dir=tmp_path)
    assert isinstance(log, SqliteLog)
    assert log.path == tmp_path / "var" / "dispatch.db"
    await log.append("t", [Record(1, b"x")])
    await log.close()
    assert (tmp_path / "var" / "dispatch.db").exists()


async def test_sqlite_absolute(tmp_path: Path) -> None:
    log = open_log(f"sqlite:///{tmp_path}/abs.db", base_dir=Path("/nonexistent"))
    assert isinstance(log, SqliteLog)
    assert log.path == tmp_path / "abs.db"
    await log.close()


async def test_redis(redis_url: str) -> None:
    log = open_log(redis_url)
    assert isinstance(log, RedisLog)
    await log.ping()
    await log.close()


async def test_redis_connects_lazily() -> None:
    log = open_log("redis://127.0.0.1:1/0")  # nothing listens there; no error until used
    assert isinstance(log, RedisLog)
    await log.close()


@pytest.mark.parametrize(
    "url",
    [
        "dispatch.db",
        "postgres://db/x",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/x.db",
        "memory://something",
        "redis://",
        "redis://localhost:port/0",
    ],
)
def test_bad_urls_name_the_setting(url: str) -> None:
    with pytest.raises(ConfigError, match=r"\[store\] url"):
        open_log(url)
