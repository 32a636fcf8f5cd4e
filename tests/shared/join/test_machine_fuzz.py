"""The join state machine under random interleavings, duplicates, crashes and watermark jumps.

A run is a sequence of epochs 10 000 s of event time apart. Each epoch has
impressions, clicks inside and outside their windows, clicks before their
impression, orphan clicks, duplicates of any of them, and events far ahead
that jump the watermark, in random order. A simulated joiner processes them
in random batches and, at random, crashes:

- before acknowledging the outbox: the batch's examples stay in the outbox
  and are delivered when it restarts;
- before committing offsets: the examples were delivered, but the events
  since the last commit are processed again on the same store.

Every event of an epoch lies between 50 s before and 1 100 s after its
start, so no impression
is forgotten while its duplicates can still arrive. A duplicate that arrives
after ``closed_retention_seconds`` is dropped as ``impression_expired``, and
``test_machine.py`` checks that case.

Invariants, with the window W = 600 s:

- each impression gets exactly one final label (click or window closed),
  plus at most one late-click correction, and only under ``correct``;
- the join never emits a dedup key twice, so every copy the trainer sees
  under one key comes from the outbox and is the same example;
- no timer is overdue after a batch: no record or held click whose time the
  watermark has passed is left unfired;
- once the next epoch's watermark passes every deadline plus retention, the
  store holds nothing of the previous epoch, and a final flush empties it.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.events import Click, Impression, LabeledExample
from shared.join import InMemoryJoinStore, JoinSettings, JoinStateMachine
from shared.join.redis_store import RedisJoinStore
from shared.join.store import JoinStore, RecordState

PARTITION = 0
EPOCH_SECONDS = 10_000.0
EPOCH_SPAN_SECONDS = 1_100.0
WINDOW_SECONDS = 600.0
OUTCOMES = ["ok", "ok", "ok", "crash before ack", "crash before commit"]
MAX_CRASHES_PER_EPOCH = 5


@st.composite
def epoch_events(draw: st.DrawFn, epoch: int) -> list[Impression | Click]:
    """One epoch's events, shuffled, with duplicates."""
    start = epoch * EPOCH_SECONDS
    times = st.integers(0, 200).map(float)
    events: list[Impression | Click] = []

    for number in range(draw(st.integers(1, 6))):
        impression_id = f"e{epoch}-i{number}"
        impression_time = start + draw(times)
        events.append(
            Impression(impression_id=impression_id, event_time=impression_time, item_id="a")
        )
        # Clicks from before the impression to past its window.
        for _ in range(draw(st.integers(0, 2))):
            offset = draw(st.integers(-50, 900))
            events.append(Click(impression_id=impression_id, event_time=impression_time + offset))

    for number in range(draw(st.integers(0, 2))):
        orphan_time = start + draw(st.integers(0, int(EPOCH_SPAN_SECONDS)))
        events.append(Click(impression_id=f"e{epoch}-orphan{number}", event_time=orphan_time))

    # Impressions far ahead move the watermark past other impressions' windows.
    for number in range(draw(st.integers(0, 2))):
        jump_time = start + draw(st.integers(300, int(EPOCH_SPAN_SECONDS)))
        events.append(
            Impression(impression_id=f"e{epoch}-jump{number}", event_time=jump_time, item_id="a")
        )

    duplicates = draw(st.lists(st.sampled_from(events), max_size=4))
    return draw(st.permutations(events + duplicates))


class SimulatedJoiner:
    """Process, deliver, acknowledge and commit as the joiner does, with crashes on request."""

    def __init__(self, machine: JoinStateMachine) -> None:
        self.machine = machine
        self.store = machine.store
        self.emitted: list[LabeledExample] = []
        self.delivered: list[LabeledExample] = []

    def run_epoch(
        self, data: st.DataObject, events: list[Impression | Click], start: float
    ) -> None:
        committed = position = crashes = 0
        while position < len(events):
            size = data.draw(st.integers(1, 6), label="batch size")
            batch = events[position : position + size]
            result = self.machine.process(PARTITION, batch)
            self.emitted += result.examples
            self.check_no_overdue_timers()

            outcome = "ok"
            if crashes < MAX_CRASHES_PER_EPOCH:
                outcome = data.draw(st.sampled_from(OUTCOMES), label="outcome")
                crashes += outcome != "ok"
            if outcome == "crash before ack":
                # A restarted joiner delivers the outbox before anything else.
                self.deliver(self.store.outbox(PARTITION))
                position = committed
                continue
            self.deliver(result.examples)
            if outcome == "crash before commit":
                position = committed
                continue
            position += len(batch)
            if data.draw(st.booleans(), label="commit succeeds"):
                committed = position

        if data.draw(st.booleans(), label="idle jump"):
            target = start + data.draw(st.integers(0, int(EPOCH_SPAN_SECONDS)), label="jump")
            self.advance_to(float(target))

    def advance_to(self, event_time: float) -> None:
        result = self.machine.advance_to(PARTITION, event_time)
        self.emitted += result.examples
        self.deliver(result.examples)

    def deliver(self, examples: list[LabeledExample]) -> None:
        self.delivered += examples
        self.store.acknowledge(PARTITION, [example.dedup_key for example in examples])

    def check_no_overdue_timers(self) -> None:
        max_event_time = self.store.max_event_time(PARTITION)
        if max_event_time is None:
            return
        lateness = self.machine.settings.allowed_lateness_seconds
        overdue = self.store.load(PARTITION, (), max_event_time, lateness)
        assert overdue.records == {}, f"records left unfired: {sorted(overdue.records)}"
        assert overdue.held_clicks == {}, f"held clicks left unfired: {sorted(overdue.held_clicks)}"


def check_forgotten(store: JoinStore, ids: set[str], lateness: float) -> None:
    max_event_time = store.max_event_time(PARTITION)
    state = store.load(PARTITION, ids, max_event_time, lateness)
    assert not set(state.records) & ids, f"records kept: {sorted(set(state.records) & ids)}"
    assert not set(state.held_clicks) & ids, (
        f"held clicks kept: {sorted(set(state.held_clicks) & ids)}"
    )


def check_labels(
    emitted: list[LabeledExample],
    delivered: list[LabeledExample],
    impression_ids: set[str],
    settings: JoinSettings,
) -> None:
    keys = [example.dedup_key for example in emitted]
    assert len(keys) == len(set(keys)), "the join emitted a dedup key twice"

    by_key: dict[str, LabeledExample] = {}
    for example in delivered:
        first = by_key.setdefault(example.dedup_key, example)
        assert example == first, f"two different examples under {example.dedup_key}"
    assert set(by_key) == set(keys), "an emitted example was never delivered"

    sources: dict[str, list[str]] = defaultdict(list)
    for example in by_key.values():
        sources[example.impression.impression_id].append(example.label_source.value)
    assert set(sources) == impression_ids
    for impression_id, labels in sources.items():
        final = [label for label in labels if label in ("click", "window_closed")]
        corrections = labels.count("late_click_correction")
        assert len(final) == 1, f"{impression_id}: final labels {labels}"
        if settings.late_click_policy == "correct":
            assert corrections <= 1, f"{impression_id}: {labels}"
            assert corrections == 0 or final == ["window_closed"], f"{impression_id}: {labels}"
        else:
            assert corrections == 0, f"{impression_id}: {labels}"


join_settings = st.builds(
    JoinSettings,
    window_seconds=st.just(WINDOW_SECONDS),
    allowed_lateness_seconds=st.sampled_from([0.0, 60.0]),
    late_click_policy=st.sampled_from(["drop", "correct"]),
    closed_retention_seconds=st.sampled_from([None, 900.0]),
)


def run_and_check(store: JoinStore, join: JoinSettings, epochs: int, data: st.DataObject) -> None:
    """Run the epochs through a simulated joiner on ``store`` and check every invariant."""
    joiner = SimulatedJoiner(JoinStateMachine(store, join))
    impression_ids: set[str] = set()
    every_id: set[str] = set()
    previous_ids: set[str] = set()

    for epoch in range(epochs):
        events = data.draw(epoch_events(epoch), label=f"epoch {epoch}")
        joiner.run_epoch(data, events, epoch * EPOCH_SECONDS)
        if previous_ids:
            check_forgotten(store, previous_ids, join.allowed_lateness_seconds)
        previous_ids = {event.impression_id for event in events}
        every_id |= previous_ids
        impression_ids |= {event.impression_id for event in events if event.type == "impression"}

    joiner.advance_to(float("inf"))

    check_labels(joiner.emitted, joiner.delivered, impression_ids, join)
    check_forgotten(store, every_id, join.allowed_lateness_seconds)
    assert store.pending_count(PARTITION) == 0
    assert store.outbox(PARTITION) == []


FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@settings(FUZZ_SETTINGS, max_examples=150)
@given(join_settings, st.integers(1, 3), st.data())
def test_invariants_on_memory_store(join: JoinSettings, epochs: int, data: st.DataObject) -> None:
    store = InMemoryJoinStore()

    run_and_check(store, join, epochs, data)

    assert store.record_count(PARTITION) == 0
    assert store.held_click_count(PARTITION) == 0


@pytest.mark.integration
def test_invariants_on_redis_store(redis_server, unique_name: str) -> None:
    client = redis.Redis.from_url(redis_server.url)
    runs = iter(range(1_000_000))

    @settings(FUZZ_SETTINGS, max_examples=30)
    @given(join_settings, st.integers(1, 3), st.data())
    def check(join: JoinSettings, epochs: int, data: st.DataObject) -> None:
        store = RedisJoinStore(client, namespace=f"test:{unique_name}:{next(runs)}")
        run_and_check(store, join, epochs, data)

    try:
        check()
    finally:
        client.close()


@settings(max_examples=100, deadline=None, database=None)
@given(join_settings, st.data())
def test_pending_count_matches_records(join: JoinSettings, data: st.DataObject) -> None:
    store = InMemoryJoinStore()
    machine = JoinStateMachine(store, join)
    events = data.draw(epoch_events(0))

    for start in range(0, len(events), 3):
        machine.process(PARTITION, events[start : start + 3])
        ids = {event.impression_id for event in events}
        records = store.load(PARTITION, ids, store.max_event_time(PARTITION), 0.0).records
        pending = sum(record.state == RecordState.PENDING for record in records.values())
        assert store.pending_count(PARTITION) == pending
