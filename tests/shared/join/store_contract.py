"""Behaviour every JoinStore must show, as a suite any implementation can run.

Subclass :class:`JoinStoreContract` in a test module and provide a ``store``
fixture that returns a fresh, empty store.
"""

from __future__ import annotations

import datetime as dt

import pytest

from shared.events import Impression, LabeledExample, LabelSource
from shared.join.store import ChangeSet, HeldClick, ImpressionRecord, JoinStore, RecordState


def impression(impression_id: str, event_time: float, **features: object) -> Impression:
    return Impression(
        impression_id=impression_id,
        event_time=event_time,
        item_id="item-1",
        user_id="user-1",
        features=features or {"ad": "a"},
    )


def example(impression_id: str, label: int = 0) -> LabeledExample:
    return LabeledExample(
        impression=impression(impression_id, 0.0),
        label=label,
        label_delay_seconds=600.0,
        label_source=LabelSource.WINDOW_CLOSED if label == 0 else LabelSource.CLICK,
        decided_at=dt.datetime.fromtimestamp(600.0, dt.UTC),
    )


def pending(impression_id: str, event_time: float, timer: float) -> ImpressionRecord:
    return ImpressionRecord(impression(impression_id, event_time), RecordState.PENDING, timer)


class JoinStoreContract:
    """The store behaviour the join state machine relies on."""

    def test_empty_partition_has_no_state(self, store: JoinStore) -> None:
        state = store.load(0, ["a"], 100.0, 60.0)

        assert state.max_event_time is None
        assert state.records == {}
        assert state.held_clicks == {}
        assert store.max_event_time(0) is None
        assert store.pending_count(0) == 0
        assert store.outbox(0) == []

    def test_commit_then_load_by_id(self, store: JoinStore) -> None:
        record = pending("a", 10.0, 610.0)
        store.commit(0, ChangeSet(max_event_time=10.0, upserts={"a": record}))

        state = store.load(0, ["a"], 10.0, 60.0)

        assert state.max_event_time == 10.0
        assert state.records["a"] == record
        assert state.records["a"].impression == record.impression
        assert store.pending_count(0) == 1

    def test_loaded_objects_are_copies(self, store: JoinStore) -> None:
        store.commit(0, ChangeSet(max_event_time=10.0, upserts={"a": pending("a", 10.0, 610.0)}))

        loaded = store.load(0, ["a"], 10.0, 60.0).records["a"]
        loaded.state = RecordState.CLICKED
        loaded.timer = 1.0

        again = store.load(0, ["a"], 10.0, 60.0).records["a"]
        assert again.state == RecordState.PENDING
        assert again.timer == 610.0

    def test_load_returns_records_due_at_new_watermark(self, store: JoinStore) -> None:
        change = ChangeSet(
            max_event_time=100.0,
            upserts={
                "due": pending("due", 0.0, 600.0),
                "edge": pending("edge", 40.0, 640.0),
                "later": pending("later", 100.0, 700.0),
            },
        )
        store.commit(0, change)

        # Watermark = max(100, 700) - 60 = 640: "due" and "edge" qualify.
        state = store.load(0, [], 700.0, 60.0)

        assert set(state.records) == {"due", "edge"}

    def test_watermark_uses_stored_maximum(self, store: JoinStore) -> None:
        store.commit(0, ChangeSet(max_event_time=1000.0, upserts={"a": pending("a", 0.0, 600.0)}))

        # The batch's own maximum is lower than the stored one.
        state = store.load(0, [], 5.0, 60.0)

        assert set(state.records) == {"a"}
        assert state.max_event_time == 1000.0

    def test_held_clicks_by_id_and_when_due(self, store: JoinStore) -> None:
        change = ChangeSet(
            max_event_time=50.0,
            held_upserts={"x": HeldClick(10.0, 10.0), "y": HeldClick(500.0, 500.0)},
        )
        store.commit(0, change)

        by_id = store.load(0, ["y"], 50.0, 60.0)
        due = store.load(0, [], 80.0, 60.0)

        assert by_id.held_clicks == {"y": HeldClick(500.0, 500.0)}
        assert due.held_clicks == {"x": HeldClick(10.0, 10.0)}

    def test_deletes_remove_records_and_timers(self, store: JoinStore) -> None:
        store.commit(0, ChangeSet(max_event_time=0.0, upserts={"a": pending("a", 0.0, 600.0)}))
        store.commit(0, ChangeSet(max_event_time=0.0, held_upserts={"a": HeldClick(1.0, 1.0)}))

        store.commit(0, ChangeSet(max_event_time=0.0, deletes={"a"}, held_deletes={"a"}))

        state = store.load(0, ["a"], 10_000.0, 60.0)
        assert state.records == {}
        assert state.held_clicks == {}
        assert store.pending_count(0) == 0

    def test_upsert_moves_timer(self, store: JoinStore) -> None:
        store.commit(0, ChangeSet(max_event_time=0.0, upserts={"a": pending("a", 0.0, 600.0)}))
        clicked = ImpressionRecord(impression("a", 0.0), RecordState.CLICKED, 1200.0)

        store.commit(0, ChangeSet(max_event_time=10.0, upserts={"a": clicked}))

        assert store.load(0, [], 700.0, 60.0).records == {}
        assert store.load(0, [], 1300.0, 60.0).records == {"a": clicked}
        assert store.pending_count(0) == 0

    def test_outbox_keeps_order_until_acknowledged(self, store: JoinStore) -> None:
        first, second, third = example("a"), example("b", 1), example("c")
        store.commit(0, ChangeSet(max_event_time=0.0, emitted=[first, second]))
        store.commit(0, ChangeSet(max_event_time=0.0, emitted=[third]))

        assert store.outbox(0) == [first, second, third]

        store.acknowledge(0, [first.dedup_key, third.dedup_key])
        assert store.outbox(0) == [second]

    def test_same_example_twice_is_one_outbox_entry(self, store: JoinStore) -> None:
        store.commit(0, ChangeSet(max_event_time=0.0, emitted=[example("a")]))
        store.commit(0, ChangeSet(max_event_time=0.0, emitted=[example("a")]))

        assert store.outbox(0) == [example("a")]

    def test_partitions_are_isolated(self, store: JoinStore) -> None:
        store.commit(1, ChangeSet(max_event_time=5.0, upserts={"a": pending("a", 0.0, 600.0)}))

        assert store.load(2, ["a"], 10_000.0, 0.0).records == {}
        assert store.max_event_time(2) is None
        assert store.max_event_time(1) == 5.0

    def test_features_round_trip_with_types(self, store: JoinStore) -> None:
        record = ImpressionRecord(
            impression("a", 1.5, price=9.99, count=3, flag=True, name="x"),
            RecordState.PENDING,
            601.5,
        )
        store.commit(0, ChangeSet(max_event_time=1.5, upserts={"a": record}))

        loaded = store.load(0, ["a"], 1.5, 60.0).records["a"]

        assert loaded.impression.features == {"price": 9.99, "count": 3, "flag": True, "name": "x"}
        assert loaded.impression.event_time == record.impression.event_time

    @pytest.mark.parametrize("timer", [0.0, -1.5, 1e12])
    def test_timers_of_any_magnitude(self, store: JoinStore, timer: float) -> None:
        record = pending("a", 0.0, timer)
        store.commit(0, ChangeSet(max_event_time=timer - 10.0, upserts={"a": record}))

        assert "a" not in store.load(0, [], timer - 1.0, 0.0).records
        assert "a" in store.load(0, [], timer, 0.0).records
