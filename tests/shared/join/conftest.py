import uuid
from collections.abc import Callable

import pytest
import redis

from shared.join import InMemoryJoinStore, JoinSettings, JoinStateMachine
from shared.join.redis_store import RedisJoinStore
from shared.join.store import JoinStore


def _memory_store(request: pytest.FixtureRequest) -> JoinStore:
    return InMemoryJoinStore()


def _redis_store(request: pytest.FixtureRequest) -> JoinStore:
    """Build a RedisJoinStore on the session's Redis server, in a namespace of its own."""
    server = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.url)
    request.addfinalizer(client.close)
    # One test may build several stores, so each gets its own suffix.
    namespace = f"test:{request.getfixturevalue('unique_name')}:{uuid.uuid4().hex[:8]}"
    return RedisJoinStore(client, namespace=namespace)


# Store kinds every join test runs against.
STORE_FACTORIES: dict[str, Callable[[pytest.FixtureRequest], JoinStore]] = {
    "memory": _memory_store,
    "redis": _redis_store,
}
# Kinds that need a real server carry the integration mark.
_INTEGRATION_KINDS = {"redis"}


@pytest.fixture(
    params=[
        pytest.param(kind, marks=pytest.mark.integration) if kind in _INTEGRATION_KINDS else kind
        for kind in sorted(STORE_FACTORIES)
    ]
)
def make_machine(request: pytest.FixtureRequest) -> Callable[..., JoinStateMachine]:
    """Build a join state machine on a fresh store of each registered kind."""

    def build(**settings: object) -> JoinStateMachine:
        store = STORE_FACTORIES[request.param](request)
        return JoinStateMachine(store, JoinSettings(**settings))

    return build
