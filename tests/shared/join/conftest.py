from collections.abc import Callable

import pytest

from shared.join import InMemoryJoinStore, JoinSettings, JoinStateMachine
from shared.join.store import JoinStore


def _memory_store(request: pytest.FixtureRequest) -> JoinStore:
    return InMemoryJoinStore()


# Store kinds every join test runs against; the Redis store adds itself here.
STORE_FACTORIES: dict[str, Callable[[pytest.FixtureRequest], JoinStore]] = {
    "memory": _memory_store,
}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def make_machine(request: pytest.FixtureRequest) -> Callable[..., JoinStateMachine]:
    """Build a join state machine on a fresh store of each registered kind."""

    def build(**settings: object) -> JoinStateMachine:
        store = STORE_FACTORIES[request.param](request)
        return JoinStateMachine(store, JoinSettings(**settings))

    return build
