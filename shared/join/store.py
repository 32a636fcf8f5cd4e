"""The join's state store: its interface and the in-memory implementation.

The state machine in :mod:`shared.join.machine` decides every transition; a
store only loads the part of a partition's state that a batch of events can
touch and writes the batch's changes back atomically, together with the
examples the batch emitted (the outbox). Keeping the decisions out of the
store means replay and the live joiner run the same transition code, and a
store is correct when it passes ``tests/shared/join/store_contract.py``.

Each record carries one timer, in event time: its window deadline while the
impression waits for a click, then the moment it may be forgotten. A held
orphan click carries the moment its hold ends. ``load`` returns every record
and held click whose timer the new watermark has reached, so the state
machine can fire them in order.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from sortedcontainers import SortedList

from shared.events import Impression, LabeledExample


class RecordState(enum.IntEnum):
    """The life-cycle state of an impression."""

    PENDING = 0
    """Its window is open and no click has arrived."""

    CLICKED = 1
    """A click inside the window made it positive."""

    CLOSED = 2
    """Its window closed without a click and the negative was emitted."""

    LATE_HANDLED = 3
    """A late click arrived after the negative and was dropped or corrected."""


@dataclass(slots=True)
class ImpressionRecord:
    """The joiner's state for one impression."""

    impression: Impression
    state: RecordState
    timer: float

    def copy(self) -> ImpressionRecord:
        """Return a copy that shares the impression, which nothing mutates."""
        return ImpressionRecord(self.impression, self.state, self.timer)


@dataclass(slots=True)
class HeldClick:
    """A click whose impression has not arrived yet."""

    click_time: float
    hold_until: float

    def copy(self) -> HeldClick:
        """Return a copy."""
        return HeldClick(self.click_time, self.hold_until)


@dataclass(slots=True)
class PartitionState:
    """The part of a partition's state that one batch can read or change."""

    max_event_time: float | None
    records: dict[str, ImpressionRecord]
    held_clicks: dict[str, HeldClick]


@dataclass(slots=True)
class ChangeSet:
    """Everything one batch changes, written by ``JoinStore.commit`` as one unit."""

    max_event_time: float | None
    upserts: dict[str, ImpressionRecord] = field(default_factory=dict)
    deletes: set[str] = field(default_factory=set)
    held_upserts: dict[str, HeldClick] = field(default_factory=dict)
    held_deletes: set[str] = field(default_factory=set)
    emitted: list[LabeledExample] = field(default_factory=list)


class JoinStore(Protocol):
    """Durable state of the attribution windows, one namespace per partition."""

    def load(
        self,
        partition: int,
        impression_ids: Collection[str],
        batch_max_event_time: float,
        allowed_lateness_seconds: float,
    ) -> PartitionState:
        """Return the state a batch needs.

        That is the stored maximum event time, the records and held clicks of
        ``impression_ids``, and every record and held click whose timer is at
        or below the watermark the batch will reach:
        ``max(stored maximum, batch_max_event_time) - allowed_lateness_seconds``.
        The returned objects are copies; changing them changes nothing stored.
        """
        ...

    def commit(self, partition: int, change: ChangeSet) -> None:
        """Apply a batch's changes and append its emitted examples to the outbox, atomically."""
        ...

    def outbox(self, partition: int) -> list[LabeledExample]:
        """Return the examples emitted but not yet acknowledged, in emission order."""
        ...

    def acknowledge(self, partition: int, dedup_keys: Collection[str]) -> None:
        """Remove examples from the outbox once the sink has durably accepted them."""
        ...

    def max_event_time(self, partition: int) -> float | None:
        """Return the maximum event time the partition has seen, or None before any event."""
        ...

    def pending_count(self, partition: int) -> int:
        """Return the number of impressions whose window is still open."""
        ...


class _MemoryPartition:
    def __init__(self) -> None:
        self.max_event_time: float | None = None
        self.records: dict[str, ImpressionRecord] = {}
        self.held_clicks: dict[str, HeldClick] = {}
        # Timers as (time, kind, id); kind 0 is a record, 1 a held click.
        self.timers: SortedList = SortedList()
        self.outbox: dict[str, LabeledExample] = {}
        self.pending = 0


class InMemoryJoinStore:
    """A :class:`JoinStore` in process memory, for replay and tests; nothing survives a restart."""

    def __init__(self) -> None:
        self._partitions: dict[int, _MemoryPartition] = {}

    def _partition(self, partition: int) -> _MemoryPartition:
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _MemoryPartition()
        return state

    def load(
        self,
        partition: int,
        impression_ids: Collection[str],
        batch_max_event_time: float,
        allowed_lateness_seconds: float,
    ) -> PartitionState:
        part = self._partition(partition)
        records: dict[str, ImpressionRecord] = {}
        held: dict[str, HeldClick] = {}

        for impression_id in impression_ids:
            record = part.records.get(impression_id)
            if record is not None:
                records[impression_id] = record.copy()
            click = part.held_clicks.get(impression_id)
            if click is not None:
                held[impression_id] = click.copy()

        stored_max = part.max_event_time
        new_max = (
            batch_max_event_time if stored_max is None else max(stored_max, batch_max_event_time)
        )
        watermark = new_max - allowed_lateness_seconds
        for _, kind, impression_id in part.timers.irange(maximum=(watermark, 2, "")):
            if kind == 0:
                records.setdefault(impression_id, part.records[impression_id].copy())
            else:
                held.setdefault(impression_id, part.held_clicks[impression_id].copy())

        return PartitionState(stored_max, records, held)

    def commit(self, partition: int, change: ChangeSet) -> None:
        part = self._partition(partition)
        part.max_event_time = change.max_event_time

        for impression_id in change.deletes:
            old = part.records.pop(impression_id, None)
            if old is not None:
                part.timers.discard((old.timer, 0, impression_id))
                part.pending -= old.state == RecordState.PENDING
        for impression_id, record in change.upserts.items():
            old = part.records.get(impression_id)
            if old is not None:
                part.timers.discard((old.timer, 0, impression_id))
                part.pending -= old.state == RecordState.PENDING
            part.records[impression_id] = record.copy()
            part.timers.add((record.timer, 0, impression_id))
            part.pending += record.state == RecordState.PENDING

        for impression_id in change.held_deletes:
            old_click = part.held_clicks.pop(impression_id, None)
            if old_click is not None:
                part.timers.discard((old_click.hold_until, 1, impression_id))
        for impression_id, click in change.held_upserts.items():
            old_click = part.held_clicks.get(impression_id)
            if old_click is not None:
                part.timers.discard((old_click.hold_until, 1, impression_id))
            part.held_clicks[impression_id] = click.copy()
            part.timers.add((click.hold_until, 1, impression_id))

        for example in change.emitted:
            part.outbox[example.dedup_key] = example

    def outbox(self, partition: int) -> list[LabeledExample]:
        return list(self._partition(partition).outbox.values())

    def acknowledge(self, partition: int, dedup_keys: Collection[str]) -> None:
        outbox = self._partition(partition).outbox
        for key in dedup_keys:
            outbox.pop(key, None)

    def max_event_time(self, partition: int) -> float | None:
        return self._partition(partition).max_event_time

    def pending_count(self, partition: int) -> int:
        return self._partition(partition).pending

    def record_count(self, partition: int) -> int:
        """Return the number of impressions remembered, pending or decided."""
        return len(self._partition(partition).records)

    def held_click_count(self, partition: int) -> int:
        """Return the number of orphan clicks waiting for their impression."""
        return len(self._partition(partition).held_clicks)
