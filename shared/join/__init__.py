"""The delayed-label join: state machine, settings and state stores."""

from shared.join.machine import JoinOutcome, JoinResult, JoinStateMachine
from shared.join.settings import JoinSettings, LateClickPolicy
from shared.join.store import InMemoryJoinStore, JoinStore

__all__ = [
    "InMemoryJoinStore",
    "JoinOutcome",
    "JoinResult",
    "JoinSettings",
    "JoinStateMachine",
    "JoinStore",
    "LateClickPolicy",
]
