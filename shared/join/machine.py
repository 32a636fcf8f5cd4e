"""The delayed-label join: impressions and clicks in, labelled examples out.

One :class:`JoinStateMachine` serves replay and the live joiner; only its store
differs. It works in event time. A partition's watermark is the maximum event
time it has seen minus the allowed lateness, and an impression's window closes
when the watermark reaches ``impression time + window``.

Transitions of one impression, with the stated policy for each odd case:

==========================  ============================================================
event                       outcome
==========================  ============================================================
impression, first           PENDING until a click or its window closes
impression, repeated        ignored: the first one wins (``impression_duplicate``)
impression, window already  negative at once (``impression_after_window``), unless a held
closed by the watermark     click inside its window makes it positive
impression, already past    dropped (``impression_expired``): its record, had it been read
its retention               before, is forgotten, so it cannot be told from a copy read
                            again after a crash
click inside the window     positive at once; the impression becomes CLICKED
click after the window      the negative is decided first, then the late-click policy
click after the negative    late: ``drop`` counts it, ``correct`` also emits a positive
                            correction; either way later clicks count as duplicates
click before impression     held until the watermark passes the click time, then counted
arrives                     as ``click_orphan_expired``; matched if its impression arrives
click earlier than its      counted as ``click_before_impression`` and ignored
impression's event time
repeated click              ignored: the first one wins (``click_duplicate``)
window closes, no click     negative
==========================  ============================================================

A decided impression is remembered for ``closed_retention_seconds`` of event
time after its window ends, so that duplicates and late clicks are recognised;
after that it is forgotten and a click for it counts as an orphan.
"""

from __future__ import annotations

import datetime as dt
import enum
import heapq
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.clock import Clock, SystemClock
from shared.events import Click, Impression, LabeledExample, LabelSource
from shared.join.settings import JoinSettings, LateClickPolicy
from shared.join.store import (
    ChangeSet,
    HeldClick,
    ImpressionRecord,
    JoinStore,
    PartitionState,
    RecordState,
)

logger = logging.getLogger(__name__)


class JoinOutcome(enum.StrEnum):
    """Counted outcomes of the join; each event adds at least one."""

    IMPRESSION_OPENED = "impression_opened"
    IMPRESSION_DUPLICATE = "impression_duplicate"
    IMPRESSION_AFTER_WINDOW = "impression_after_window"
    IMPRESSION_EXPIRED = "impression_expired"
    CLICK_ATTRIBUTED = "click_attributed"
    CLICK_DUPLICATE = "click_duplicate"
    CLICK_LATE = "click_late"
    CLICK_HELD = "click_held"
    CLICK_ORPHAN_MATCHED = "click_orphan_matched"
    CLICK_ORPHAN_EXPIRED = "click_orphan_expired"
    CLICK_BEFORE_IMPRESSION = "click_before_impression"
    WINDOW_CLOSED = "window_closed"
    CORRECTION_EMITTED = "correction_emitted"


@dataclass(slots=True)
class JoinResult:
    """The output of one batch: examples in emission order, and outcome counts.

    ``event_offsets[i]`` is how many examples had been emitted when event i
    itself was handled, after the watermark its event time reached had
    released what it could. Replay uses it to learn those examples before it
    scores impression i, exactly as if events came one at a time.
    """

    examples: list[LabeledExample]
    counts: Counter[JoinOutcome]
    event_offsets: list[int] = field(default_factory=list)


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


class _Batch:
    """The working set of one batch: loaded state, changes, and due timers in order."""

    def __init__(self, state: PartitionState, settings: JoinSettings) -> None:
        self.settings = settings
        self.window = settings.window_seconds
        self.lateness = settings.allowed_lateness_seconds
        self.retention = settings.retention_seconds
        self.records = state.records
        self.held = state.held_clicks
        self.max_event_time = state.max_event_time
        self.watermark = (
            -math.inf if state.max_event_time is None else state.max_event_time - self.lateness
        )
        self.change = ChangeSet(max_event_time=state.max_event_time)
        self.counts: Counter[JoinOutcome] = Counter()
        # (timer, sequence, kind, id): the sequence keeps firing order stable
        # for equal timers; kind 0 is a record, 1 a held click.
        self.timers: list[tuple[float, int, int, str]] = []
        self.sequence = 0
        for impression_id, record in self.records.items():
            self._schedule(record.timer, 0, impression_id)
        for impression_id, click in self.held.items():
            self._schedule(click.hold_until, 1, impression_id)

    # Bookkeeping.

    def _schedule(self, timer: float, kind: int, impression_id: str) -> None:
        self.sequence += 1
        heapq.heappush(self.timers, (timer, self.sequence, kind, impression_id))

    def _save(self, impression_id: str, record: ImpressionRecord) -> None:
        self.records[impression_id] = record
        self.change.upserts[impression_id] = record
        self.change.deletes.discard(impression_id)
        self._schedule(record.timer, 0, impression_id)

    def _forget(self, impression_id: str) -> None:
        del self.records[impression_id]
        self.change.upserts.pop(impression_id, None)
        self.change.deletes.add(impression_id)

    def _hold(self, impression_id: str, click: HeldClick) -> None:
        self.held[impression_id] = click
        self.change.held_upserts[impression_id] = click
        self.change.held_deletes.discard(impression_id)
        self._schedule(click.hold_until, 1, impression_id)

    def _release(self, impression_id: str) -> HeldClick:
        click = self.held.pop(impression_id)
        self.change.held_upserts.pop(impression_id, None)
        self.change.held_deletes.add(impression_id)
        return click

    def _emit(
        self, impression: Impression, label: int, source: LabelSource, decided_at: float
    ) -> None:
        self.change.emitted.append(
            LabeledExample(
                impression=impression,
                label=label,
                label_delay_seconds=max(0.0, decided_at - impression.ts),
                label_source=source,
                decided_at=_utc(decided_at),
            )
        )

    # Event time.

    def advance(self, event_time: float) -> None:
        """Raise the maximum event time and fire every timer the new watermark reaches."""
        if self.max_event_time is not None and event_time <= self.max_event_time:
            return
        self.max_event_time = event_time
        self.change.max_event_time = event_time
        self.watermark = event_time - self.lateness
        self._fire_due()

    def _fire_due(self) -> None:
        while self.timers and self.timers[0][0] <= self.watermark:
            timer, _, kind, impression_id = heapq.heappop(self.timers)
            if kind == 0:
                record = self.records.get(impression_id)
                if record is not None and record.timer == timer:
                    self._fire_record(impression_id, record)
            else:
                click = self.held.get(impression_id)
                if click is not None and click.hold_until == timer:
                    self._release(impression_id)
                    self.counts[JoinOutcome.CLICK_ORPHAN_EXPIRED] += 1

    def _fire_record(self, impression_id: str, record: ImpressionRecord) -> None:
        deadline = record.impression.ts + self.window
        if record.state == RecordState.PENDING:
            self._close(record, deadline)
        forget_at = deadline + self.retention
        if record.timer < forget_at:
            record.timer = forget_at
            self._save(impression_id, record)
        else:
            self._forget(impression_id)

    def _close(self, record: ImpressionRecord, deadline: float) -> None:
        record.state = RecordState.CLOSED
        self._emit(record.impression, 0, LabelSource.WINDOW_CLOSED, deadline)
        self.counts[JoinOutcome.WINDOW_CLOSED] += 1

    # Events.

    def on_impression(self, impression: Impression) -> None:
        impression_id = impression.impression_id
        if impression_id in self.records:
            self.counts[JoinOutcome.IMPRESSION_DUPLICATE] += 1
            return

        deadline = impression.ts + self.window
        if deadline + self.retention <= self.watermark:
            # A joiner restarted after a crash reads its last batch again, which
            # can span any amount of event time. Labelling this impression could
            # contradict the label it got before its record was forgotten.
            self.counts[JoinOutcome.IMPRESSION_EXPIRED] += 1
            return

        record = ImpressionRecord(impression, RecordState.PENDING, deadline)
        self.counts[JoinOutcome.IMPRESSION_OPENED] += 1
        if self.settings.emit_served:
            # Before any label, so a trainer reading in order learns the fake negative first.
            self._emit(impression, 0, LabelSource.SERVED, impression.ts)

        if impression_id in self.held:
            held = self._release(impression_id)
            self.counts[JoinOutcome.CLICK_ORPHAN_MATCHED] += 1
            self._apply_click(record, held.click_time)

        if record.state == RecordState.PENDING and deadline <= self.watermark:
            self.counts[JoinOutcome.IMPRESSION_AFTER_WINDOW] += 1
            self._close(record, deadline)
        self._save(impression_id, record)
        # A record saved with an already-due timer must still fire in this batch.
        self._fire_due()

    def on_click(self, click: Click) -> None:
        impression_id = click.impression_id
        record = self.records.get(impression_id)
        if record is not None:
            state_before = record.state
            self._apply_click(record, click.ts)
            if record.state != state_before:
                self._save(impression_id, record)
            return

        if impression_id in self.held:
            self.counts[JoinOutcome.CLICK_DUPLICATE] += 1
        elif click.ts <= self.watermark:
            # Its hold would end at once: the watermark has passed the click.
            self.counts[JoinOutcome.CLICK_ORPHAN_EXPIRED] += 1
        else:
            self._hold(impression_id, HeldClick(click_time=click.ts, hold_until=click.ts))
            self.counts[JoinOutcome.CLICK_HELD] += 1

    def _apply_click(self, record: ImpressionRecord, click_time: float) -> None:
        impression = record.impression
        deadline = impression.ts + self.window

        if record.state in (RecordState.CLICKED, RecordState.LATE_HANDLED):
            self.counts[JoinOutcome.CLICK_DUPLICATE] += 1
            return
        if record.state == RecordState.CLOSED:
            self._late(record, click_time)
            return
        if click_time < impression.ts:
            self.counts[JoinOutcome.CLICK_BEFORE_IMPRESSION] += 1
            return
        if click_time <= deadline:
            record.state = RecordState.CLICKED
            self._emit(impression, 1, LabelSource.CLICK, click_time)
            self.counts[JoinOutcome.CLICK_ATTRIBUTED] += 1
            return

        # The click proves the window ended in event time, even if the
        # watermark has not reached the deadline yet: decide the negative first.
        self._close(record, deadline)
        self._late(record, click_time)

    def _late(self, record: ImpressionRecord, click_time: float) -> None:
        record.state = RecordState.LATE_HANDLED
        self.counts[JoinOutcome.CLICK_LATE] += 1
        if self.settings.late_click_policy == LateClickPolicy.CORRECT:
            self._emit(record.impression, 1, LabelSource.LATE_CLICK_CORRECTION, click_time)
            self.counts[JoinOutcome.CORRECTION_EMITTED] += 1


class JoinStateMachine:
    """Join impressions and clicks of one or more partitions into labelled examples."""

    def __init__(
        self, store: JoinStore, settings: JoinSettings | None = None, clock: Clock | None = None
    ) -> None:
        self.store = store
        self.settings = settings or JoinSettings()
        self.clock = clock or SystemClock()

    def process(self, partition: int, events: Sequence[Impression | Click]) -> JoinResult:
        """Apply a batch of events in order and commit the resulting state with its examples.

        Events of one partition must come through one caller at a time: the
        store's single-writer rule per partition is the caller's to keep.
        """
        if not events:
            return JoinResult([], Counter())

        batch_max = max(event.ts for event in events)
        impression_ids = {event.impression_id for event in events}
        state = self.store.load(
            partition, impression_ids, batch_max, self.settings.allowed_lateness_seconds
        )
        batch = _Batch(state, self.settings)

        emitted = batch.change.emitted
        offsets = []
        for event in events:
            batch.advance(event.ts)
            offsets.append(len(emitted))
            if event.type == "impression":
                batch.on_impression(event)
            else:
                batch.on_click(event)

        self.store.commit(partition, batch.change)
        return JoinResult(emitted, batch.counts, offsets)

    def advance_to(self, partition: int, event_time: float) -> JoinResult:
        """Move a partition's maximum event time forward without an event.

        End of input calls this with ``math.inf`` to close every window; an
        idle partition may call it to let time pass.
        """
        state = self.store.load(partition, (), event_time, self.settings.allowed_lateness_seconds)
        batch = _Batch(state, self.settings)
        batch.advance(event_time)
        if math.isinf(event_time):
            # Infinity is not a time to store; the partition is finished.
            batch.change.max_event_time = state.max_event_time
        self.store.commit(partition, batch.change)
        return JoinResult(batch.change.emitted, batch.counts)

    def flush(self, partition: int) -> JoinResult:
        """Close every open window and expire every held click: the end of a finite input."""
        return self.advance_to(partition, math.inf)

    def watermark(self, partition: int) -> float | None:
        """Return the partition's watermark in event-time seconds, or None before any event."""
        max_event_time = self.store.max_event_time(partition)
        if max_event_time is None:
            return None
        return max_event_time - self.settings.allowed_lateness_seconds
