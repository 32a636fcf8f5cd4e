import pytest

from shared.join.store import InMemoryJoinStore
from tests.shared.join.store_contract import JoinStoreContract


class TestInMemoryJoinStore(JoinStoreContract):
    @pytest.fixture
    def store(self) -> InMemoryJoinStore:
        return InMemoryJoinStore()
