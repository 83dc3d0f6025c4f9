"""Fixtures for the log contract tests: a real ``redis-server`` (AOF, ``appendfsync always``).

``redis_server`` is one server for the whole session; ``redis_url`` hands it to a test with an
empty database. Tests that stop or kill Redis take ``private_redis`` instead, a server of their own.

``redis_cluster`` is a real Redis Cluster (three ``redis-server --cluster-enabled yes`` primaries,
AOF with ``appendfsync always``), started only when a test asks for it and kept for the session;
``redis_cluster_url`` (``redis-cluster://127.0.0.1:<port>``) hands it over with every node empty.
Tests that stop or kill a node take ``private_redis_cluster``, a cluster of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisClusterServers, RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    for url in redis_cluster.urls:
        with redis.Redis.from_url(url) as client:
            client.flushall()
    return redis_cluster.url


@pytest.fixture
def private_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    # A long node timeout: the nodes that stay up do not declare the cluster down while a test
    # has one node stopped for a few seconds.
    cluster = RedisClusterServers(tmp_path / "redis-cluster", node_timeout_ms=15_000)
    cluster.start()
    yield cluster
    cluster.kill()
